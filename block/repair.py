"""Rebuild the refcount structure of a dirty qcow2 image by scanning its metadata.

A dirty bit means refcounts on disk may lag behind the L1/L2 tables (a crash
in the middle of a write-back, or QEMU's lazy refcounts).  We recount every
cluster the image references, write a fresh refcount table and blocks past the
last referenced cluster, then repoint the header and clear the dirty bit in
one header write.  Until that write the old structure stays in charge, so a
crash during repair leaves the image as it was (still dirty, still repairable).
"""

from __future__ import annotations

import os
import struct

import numpy as np

from .errors import CorruptImage, UnsupportedFeature
from .image import pread_full, pwrite_full
from .qcow2 import format as F


class _Refs:
    def __init__(self, cs: int, file_clusters: int) -> None:
        self.cs = cs
        self.counts = np.zeros(max(file_clusters, 1) + 1, np.uint64)

    def add(self, offset: int, length: int) -> None:
        first = offset // self.cs
        last = (offset + max(length, 1) - 1) // self.cs
        if last >= len(self.counts):
            grown = np.zeros(max(last + 1, 2 * len(self.counts)), np.uint64)
            grown[:len(self.counts)] = self.counts
            self.counts = grown
        self.counts[first:last + 1] += np.uint64(1)


def _scan_l1(fd: int, path: str, h: F.Header, refs: _Refs, l1_off: int, l1_size: int) -> None:
    cs, cb = h.cluster_size, h.cluster_bits
    refs.add(l1_off, l1_size * 8)
    l1 = np.frombuffer(pread_full(fd, l1_size * 8, l1_off), ">u8").astype(np.uint64)
    x = 62 - (cb - 8)
    for l2_off in (l1 & np.uint64(F.OFFSET_MASK)).tolist():
        if not l2_off:
            continue
        if l2_off % cs:
            raise CorruptImage(f"{path}: unaligned L2 table at 0x{l2_off:x}; cannot repair")
        refs.add(l2_off, cs)
        l2 = np.frombuffer(pread_full(fd, cs, l2_off), ">u8").astype(np.uint64)
        comp = (l2 & np.uint64(F.COMPRESSED)) != 0
        hosts = l2[~comp] & np.uint64(F.OFFSET_MASK)
        for host in hosts[hosts != 0].tolist():
            refs.add(host, cs)
        for e in l2[comp].tolist():
            host = e & ((1 << x) - 1)
            nsect = ((e >> x) & ((1 << (cb - 8)) - 1)) + 1
            refs.add(host, nsect * 512 - (host & 511))


def _scan_snapshots(fd: int, path: str, h: F.Header, refs: _Refs) -> None:
    if not h.nb_snapshots:
        return
    off = h.snapshots_offset
    pos = off
    for _ in range(h.nb_snapshots):
        fixed = pread_full(fd, 40, pos)
        l1_off, l1_size, id_len, name_len = struct.unpack_from(">QIHH", fixed, 0)
        extra = struct.unpack_from(">I", fixed, 36)[0]
        _scan_l1(fd, path, h, refs, l1_off, l1_size)
        pos += 40 + extra + id_len + name_len
        pos = (pos + 7) & ~7
    refs.add(off, pos - off)


def rebuild_refcounts(fd: int, path: str, h: F.Header) -> None:
    if h.version < 3:
        return  # v2 has no dirty bit
    if h.extension(F.EXT_BITMAPS) is not None:
        raise UnsupportedFeature(f"{path}: cannot rebuild refcounts of an image with bitmaps")
    cs = h.cluster_size
    refs = _Refs(cs, os.fstat(fd).st_size // cs)
    refs.add(0, cs)  # header, extensions and backing name all live in cluster 0
    _scan_l1(fd, path, h, refs, h.l1_table_offset, h.l1_size)
    _scan_snapshots(fd, path, h, refs)
    counts = refs.counts
    used = np.flatnonzero(counts)
    start = int(used[-1]) + 1 if len(used) else 1
    rbe = cs * 8 >> h.refcount_order
    per = cs // 8
    # Place the table, then the blocks, after everything referenced; grow until the
    # blocks also cover themselves and the table.
    nblocks, table_clusters = 0, 1
    while True:  # sizes only grow, so this settles
        end = start + table_clusters + nblocks
        blocks = sorted(set((used // rbe).tolist()) |
                        set(range(start // rbe, (end - 1) // rbe + 1)))
        need_table = -(-(blocks[-1] + 1) // per)
        if len(blocks) <= nblocks and need_table <= table_clusters:
            break
        nblocks = max(nblocks, len(blocks))
        table_clusters = max(table_clusters, need_table)
    full = np.zeros(max(len(counts), (blocks[-1] + 1) * rbe), np.uint64)
    full[:len(counts)] = counts
    full[start:start + table_clusters + len(blocks)] += np.uint64(1)
    limit = (1 << (1 << h.refcount_order)) - 1
    if int(full.max()) > limit:
        raise CorruptImage(f"{path}: a refcount exceeds refcount_bits; cannot repair")
    table = np.zeros(table_clusters * per, np.uint64)
    for i, bi in enumerate(blocks):
        boff = (start + table_clusters + i) * cs
        table[bi] = np.uint64(boff)
        pwrite_full(fd, F.encode_refcounts(full[bi * rbe:(bi + 1) * rbe], h.refcount_order),
                    boff)
    pwrite_full(fd, table.astype(">u8").tobytes(), start * cs)
    os.fdatasync(fd)
    h.refcount_table_offset, h.refcount_table_clusters = start * cs, table_clusters
    h.incompatible &= ~F.INCOMPAT_DIRTY
    hdr = h.pack()
    pwrite_full(fd, hdr, 0)
    os.fdatasync(fd)
