"""qcow2 mapping tables: the whole L1 table and an LRU write-back cache of whole
L2 tables.

Write-back order: the refcounts of every cluster a table references first, then
the L2 tables, then the L1 table that points at them, each step made durable
before the next.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np

from ..errors import CorruptImage
from ..image import pread_full, pwrite_full, pwritev_full
from . import format as F
from .refcounts import Refcounts

_U64 = np.uint64


class L2Table:
    __slots__ = ("offset", "entries", "dirty")

    def __init__(self, offset: int, entries: np.ndarray, dirty: bool) -> None:
        self.offset = offset
        self.entries = entries  # native uint64
        self.dirty = dirty


class L2Cache:
    """The L1 table (`l1`, native uint64) and the L2 tables it points at."""

    def __init__(self, fd: int, path: str, h: F.Header, capacity: int,
                 refcounts: Refcounts) -> None:
        self._fd = fd
        self._path = path
        self._h = h
        self._cs = h.cluster_size
        self._cb = h.cluster_bits
        self._entries = self._cs // 8
        self._capacity = capacity
        self._refcounts = refcounts
        self.l1: np.ndarray = np.frombuffer(pread_full(fd, h.l1_size * 8, h.l1_table_offset),
                                            ">u8").astype(_U64)
        self._l1_dirty = False
        self._cache: OrderedDict[int, L2Table] = OrderedDict()

    def get(self, l1i: int) -> L2Table | None:
        """The L2 table L1 entry l1i points at, or None if it has none."""
        l1e = int(self.l1[l1i])
        off = l1e & F.OFFSET_MASK
        if not off:
            return None
        t = self._cache.get(off)
        if t is not None:
            self._cache.move_to_end(off)
            return t
        if off & (self._cs - 1) or l1e & F.L1_RESERVED:
            raise CorruptImage(f"{self._path}: L1 entry {l1i} is invalid (0x{l1e:x})")
        entries = np.frombuffer(pread_full(self._fd, self._cs, off), ">u8").astype(_U64)
        t = L2Table(off, entries, False)
        self._insert(t)
        return t

    def alloc(self, l1i: int) -> L2Table:
        """A new, empty L2 table for L1 entry l1i."""
        off = self._refcounts.alloc(1) << self._cb
        t = L2Table(off, np.zeros(self._entries, _U64), True)
        self._insert(t)
        self.l1[l1i] = _U64(off | F.COPIED)
        self._l1_dirty = True
        return t

    def flush(self) -> None:
        """Write dirty L2 tables, then the L1 table (refcounts must be durable already)."""
        dirty = sorted((t for t in self._cache.values() if t.dirty), key=lambda t: t.offset)
        i = 0
        while i < len(dirty):  # coalesce tables that are adjacent on disk
            j = i + 1
            while j < len(dirty) and dirty[j].offset == dirty[j - 1].offset + self._cs:
                j += 1
            pwritev_full(self._fd, [t.entries.astype(">u8").tobytes() for t in dirty[i:j]],
                         dirty[i].offset)
            for t in dirty[i:j]:
                t.dirty = False
            i = j
        if self._l1_dirty:
            if dirty:
                os.fdatasync(self._fd)  # L2 tables before the L1 entries pointing at them
            pwrite_full(self._fd, self.l1.astype(">u8").tobytes(), self._h.l1_table_offset)
            self._l1_dirty = False
        if dirty or self._l1_dirty:
            os.fdatasync(self._fd)

    def _insert(self, t: L2Table) -> None:
        while len(self._cache) >= self._capacity:
            _, old = self._cache.popitem(last=False)
            if old.dirty:
                # The evicted table may reference clusters counted only in cached refcount
                # blocks: those must be durable first.
                self._refcounts.flush()
                pwrite_full(self._fd, old.entries.astype(">u8").tobytes(), old.offset)
                old.dirty = False
        self._cache[t.offset] = t
