"""qcow2 refcounts: the whole refcount table, an LRU write-back cache of refcount
blocks, and the cluster allocator built on them.

Dirty blocks reach disk before the table that points at them, and both before
any L2 table that references the clusters they count (the L2 cache calls
flush() before writing a table back).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..errors import CorruptImage, UnsupportedFeature
from ..image import pread_full, pwrite_full
from . import format as F

_U64 = np.uint64


class _RefBlock:
    __slots__ = ("offset", "values", "dirty")

    def __init__(self, offset: int, values: np.ndarray, dirty: bool) -> None:
        self.offset = offset
        self.values = values  # uint64, one refcount per cluster
        self.dirty = dirty


class Refcounts:
    """Refcounts of one open image, read from its header's refcount table.

    mark_dirty is called before the first change to the refcount structure on
    disk; write_header after the header's refcount table fields were repointed.
    """

    def __init__(self, fd: int, path: str, h: F.Header, capacity: int,
                 mark_dirty: Callable[[], None], write_header: Callable[[], None]) -> None:
        self._fd = fd
        self._path = path
        self._h = h
        self._cs = h.cluster_size
        self._cb = h.cluster_bits
        self._order = h.refcount_order
        self._max = (1 << (1 << h.refcount_order)) - 1
        self._rb_entries = self._cs * 8 >> h.refcount_order
        self._capacity = capacity
        self._mark_dirty = mark_dirty
        self._write_header = write_header
        self._rt = np.frombuffer(pread_full(fd, h.refcount_table_clusters * self._cs,
                                            h.refcount_table_offset), ">u8").astype(_U64)
        self._rt_dirty = False
        self._cache: OrderedDict[int, _RefBlock] = OrderedDict()
        self._free_hint = 0

    # ===================================================================== public
    def refcount(self, cluster: int) -> int:
        """Refcount of a host cluster (through the cache)."""
        bi, i = divmod(cluster, self._rb_entries)
        rb = self._get(bi)
        return 0 if rb is None else int(rb.values[i])

    def flush(self) -> bool:
        """Write dirty refcount blocks, then the refcount table; durable on return."""
        wrote = False
        for bi, rb in self._cache.items():
            if rb.dirty:
                self._write_block(bi, rb)
                wrote = True
        if self._rt_dirty:
            if wrote:
                os.fdatasync(self._fd)  # a table entry may only point at a written block
            self._write_table()
            wrote = True
        if wrote:
            os.fdatasync(self._fd)
        return wrote

    def alloc(self, n: int) -> int:
        """Allocate n contiguous clusters (refcount 1); returns the first cluster index."""
        while True:
            start = self._find_free_run(n)
            # Creating a refcount block takes a cluster, possibly one of ours: search again.
            if not self._ensure_blocks(start, n):
                break
        self._add(start, n, 1)
        self._free_hint = start + n
        return start

    def free(self, start: int, n: int) -> None:
        self._add(start, n, -1)
        self._free_hint = min(self._free_hint, start)

    # ============================================================= block cache
    def _write_block(self, bi: int, rb: _RefBlock) -> None:
        pwrite_full(self._fd, F.encode_refcounts(rb.values, self._order), rb.offset)
        rb.dirty = False

    def _write_table(self) -> None:
        pwrite_full(self._fd, self._rt.astype(">u8").tobytes(), self._h.refcount_table_offset)
        self._rt_dirty = False

    def _get(self, bi: int) -> _RefBlock | None:
        rb = self._cache.get(bi)
        if rb is not None:
            self._cache.move_to_end(bi)
            return rb
        if bi >= len(self._rt):
            return None
        off = int(self._rt[bi]) & F.RT_OFFSET_MASK
        if not off:
            return None
        if off & (self._cs - 1):
            raise CorruptImage(f"{self._path}: refcount block {bi} is not cluster aligned")
        values = F.decode_refcounts(pread_full(self._fd, self._cs, off), self._order)
        rb = _RefBlock(off, values, False)
        self._insert(bi, rb)
        return rb

    def _insert(self, bi: int, rb: _RefBlock) -> None:
        while len(self._cache) >= self._capacity:
            obi, old = self._cache.popitem(last=False)
            if old.dirty:
                self._write_block(obi, old)
        self._cache[bi] = rb

    # ================================================================ allocation
    def _find_free_run(self, n: int) -> int:
        """First run of n free clusters at or after the hint (next fit)."""
        rbe = self._rb_entries
        c = self._free_hint
        run_start = c
        while c - run_start < n:
            bi, i = divmod(c, rbe)
            rb = self._get(bi)
            stop = min(rbe, i + n - (c - run_start))
            if rb is not None:
                if stop - i == 1:
                    busy = rb.values[i] != 0
                    last = i if busy else -1
                else:
                    nz = np.flatnonzero(rb.values[i:stop])
                    last = i + int(nz[-1]) if len(nz) else -1
                if last >= 0:  # restart after the last used cluster in the window
                    c = bi * rbe + last + 1
                    run_start = c
                    continue
            c = bi * rbe + stop
        return run_start

    def _add(self, start: int, n: int, delta: int) -> None:
        rbe = self._rb_entries
        if n == 1:  # the common case (one cluster per request): skip the array reductions
            bi, i = divmod(start, rbe)
            rb = self._get(bi)
            if rb is not None:
                new = int(rb.values[i]) + delta
                if 0 <= new <= self._max:
                    rb.values[i] = new
                    rb.dirty = True
                    return
        end = start + n
        c = start
        while c < end:
            bi, i = divmod(c, rbe)
            j = min(rbe, i + end - c)
            rb = self._get(bi)
            if rb is None:
                raise CorruptImage(f"{self._path}: no refcount block for cluster {c}")
            v = rb.values[i:j]
            if delta < 0 and (v < _U64(-delta)).any():
                raise CorruptImage(f"{self._path}: refcount underflow at cluster "
                                   f"{bi * rbe + i + int(np.argmax(v < _U64(-delta)))}")
            if delta > 0 and (v > _U64(self._max - delta)).any():
                raise UnsupportedFeature(f"{self._path}: refcount overflow (refcount_bits="
                                         f"{1 << self._order})")
            if delta > 0:
                v += _U64(delta)
            else:
                v -= _U64(-delta)
            rb.dirty = True
            c = bi * rbe + j

    def _ensure_blocks(self, start: int, n: int) -> bool:
        created = False
        for bi in range(start // self._rb_entries, (start + n - 1) // self._rb_entries + 1):
            if self._get(bi) is None:
                self._create_block(bi)
                created = True
        return created

    def _install_block(self, bi: int, cluster: int, values: np.ndarray) -> None:
        self._rt[bi] = _U64(cluster << self._cb)
        self._rt_dirty = True
        self._insert(bi, _RefBlock(cluster << self._cb, values, True))

    def _create_block(self, bi: int) -> None:
        rbe = self._rb_entries
        while True:
            if bi >= len(self._rt):
                self._grow_table(bi)
                return
            if self._get(bi) is not None:
                return
            c = self._find_free_run(1)
            holder_bi = c // rbe
            if holder_bi == bi:  # the new block lies in its own range: it counts itself
                values = np.zeros(rbe, _U64)
                values[c % rbe] = 1
                self._install_block(bi, c, values)
                return
            holder = self._get(holder_bi)
            if holder is None:
                self._create_block(holder_bi)
                continue  # c may be taken now; look again
            self._install_block(bi, c, np.zeros(rbe, _U64))
            self._add(c, 1, 1)
            return

    def _grow_table(self, need_bi: int) -> None:
        """Move the refcount table to a larger place (and add the blocks that need).

        The new table and any new refcount blocks go in one free run; the blocks
        describing that run are created with it, so it counts itself.  The header
        is repointed only after blocks and table are durable, then the old table
        is freed.
        """
        cs, rbe = self._cs, self._rb_entries
        per = cs // 8
        old_n = len(self._rt)
        entries = max(need_bi + 1, old_n + old_n // 2 + 1)
        k = 0
        while True:
            nclus = -(-entries // per)
            start = self._find_free_run(nclus + k)
            end = start + nclus + k
            needed = {bi for bi in range(start // rbe, (end - 1) // rbe + 1)
                      if self._get(bi) is None}
            if self._get(need_bi) is None:
                needed.add(need_bi)
            top = max(needed | {old_n - 1})
            if top >= nclus * per:
                entries = top + 1 + per
                continue
            if len(needed) > k:
                k = len(needed)
                continue
            break
        new_rt = np.zeros(nclus * per, _U64)
        new_rt[:old_n] = self._rt
        self._rt = new_rt
        for idx, bi in enumerate(sorted(needed)):
            self._install_block(bi, start + nclus + idx, np.zeros(rbe, _U64))
        used = nclus + len(needed)
        self._add(start, used, 1)
        self._free_hint = max(self._free_hint, start + used)
        self._mark_dirty()
        # Blocks first, then the new table, then the header that points at it.
        for bi, rb in self._cache.items():
            if rb.dirty:
                self._write_block(bi, rb)
        os.fdatasync(self._fd)
        h = self._h
        old_off, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
        pwrite_full(self._fd, new_rt.astype(">u8").tobytes(), start << self._cb)
        os.fdatasync(self._fd)
        h.refcount_table_offset, h.refcount_table_clusters = start << self._cb, nclus
        self._write_header()
        os.fdatasync(self._fd)
        self._rt_dirty = False
        self.free(old_off >> self._cb, old_clusters)
