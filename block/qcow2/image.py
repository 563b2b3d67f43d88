"""The qcow2 driver: open, read, write, flush, activate and inactivate; the
caches it fills and writes back live in l2cache.py and refcounts.py.

Cached state (all dropped by activate(), all written back by inactivate()):
  * the header (fields, feature bits, extensions, backing name);
  * the whole L1 table, written back at flush after the L2 tables;
  * an LRU cache of whole L2 tables, write-back;
  * the whole refcount table and an LRU write-back cache of refcount blocks;
  * the next-free-cluster hint.

Crash safety comes from write-back *ordering*, not from write-through: data is
pwritten at once, refcount blocks (then the refcount table) reach disk before
any L2 table, and L2 tables before the L1 table, each step separated by
fdatasync.  A crash can therefore leak clusters but never leave a reference to
a cluster whose refcount is 0.  The dirty bit is set before the first metadata
change and cleared by a clean flush.
"""

from __future__ import annotations

import os
import zlib

import numpy as np

from ..errors import CorruptImage, ImageNotFound, UnsupportedFeature
from ..image import Image, pread_full, pwrite_full, pwritev_full
from . import format as F
from .l2cache import L2Cache
from .refcounts import Refcounts

DEFAULT_L2_CACHE_BYTES = 4 << 20
DEFAULT_REFCOUNT_CACHE_BYTES = 1 << 20

_U64 = np.uint64
_OFFSET_MASK = _U64(F.OFFSET_MASK)
_COPIED = _U64(F.COPIED)


class Qcow2Image(Image):
    format = "qcow2"

    def __init__(self, path: str, fd: int, read_only: bool, inactive: bool,
                 l2_cache_size: int | None = None, refcount_cache_size: int | None = None) -> None:
        super().__init__(path, fd, read_only, inactive)
        self._l2_cache_bytes = l2_cache_size or DEFAULT_L2_CACHE_BYTES
        self._rc_cache_bytes = refcount_cache_size or DEFAULT_REFCOUNT_CACHE_BYTES
        self.backing: Image | None = None
        self._h: F.Header | None = None
        self._drop_metadata()

    # ================================================================ metadata lifecycle
    def _drop_metadata(self) -> None:
        """Forget everything read from disk. Dirty state is discarded, never written."""
        self._h = None
        self._rc: Refcounts | None = None
        self._l2: L2Cache | None = None
        self._marked_dirty = False
        if getattr(self, "backing", None) is not None:
            self.backing.close()
        self.backing = None

    def _load(self, for_write: bool) -> None:
        fd, path = self._fd, self.path
        head = pread_full(fd, 512, 0)
        cb = F.peek_cluster_bits(head, path)
        h = F.parse_header(pread_full(fd, 1 << cb, 0), path)
        F.check_features(h, path, for_write)
        if for_write and h.incompatible & F.INCOMPAT_DIRTY:
            # Left by a crash (ours, or QEMU's with lazy refcounts): the refcounts may be
            # missing increments, so rebuild them from the metadata before any allocation.
            from ..repair import rebuild_refcounts

            rebuild_refcounts(fd, path, h)
            h = F.parse_header(pread_full(fd, 1 << cb, 0), path)
        self._h = h
        cs = h.cluster_size
        self._cb = cb
        self._cs = cs
        self._l2_bits = cb - 3
        self._l2_entries = cs // 8
        self._l2_mask = self._l2_entries - 1
        self._v3 = h.version >= 3
        self._zero_cluster = memoryview(bytes(cs))
        rc = Refcounts(fd, path, h, max(2, self._rc_cache_bytes // cs),
                       self._mark_dirty, self._write_header)
        self._l2 = L2Cache(fd, path, h, max(2, self._l2_cache_bytes // cs), rc)
        self._rc = rc
        if h.backing_file:
            self.backing = self._open_backing(h)

    def _open_backing(self, h: F.Header) -> Image:
        from ..api import open_image

        name = h.backing_file or ""
        if ":" in name.split("/")[0] or name.startswith("json:"):
            raise UnsupportedFeature(f"{self.path}: backing file {name!r} uses a protocol "
                                     "prefix; only plain file paths are supported")
        if not os.path.isabs(name):
            name = os.path.join(os.path.dirname(os.path.abspath(self.path)), name)
        fmt = h.backing_format
        if fmt not in (None, "raw", "qcow2"):
            raise UnsupportedFeature(f"{self.path}: backing format {fmt!r} is not supported")
        try:
            return open_image(name, format=fmt, read_only=True)
        except FileNotFoundError as e:
            raise ImageNotFound(f"{self.path}: backing file {name} not found") from e

    def _close_resources(self) -> None:
        if self.backing is not None:
            self.backing.close()
            self.backing = None
        super()._close_resources()

    def _size(self) -> int:
        return self._h.size if self._h else 0

    # ============================================================ header and dirty bit
    @property
    def header(self) -> F.Header:
        """The parsed header as last read or written (for inspection and tests)."""
        return self._h

    def _write_header(self) -> None:
        data = self._h.pack()
        if len(data) > self._cs:
            raise UnsupportedFeature(f"{self.path}: header, extensions and backing name do "
                                     "not fit in the first cluster")
        pwrite_full(self._fd, data, 0)

    def _mark_dirty(self) -> None:
        """Before the first metadata change: set the dirty bit, clear unknown autoclear bits."""
        if self._marked_dirty:
            return
        h = self._h
        if self._v3:
            # We maintain none of the autoclear-protected structures (e.g. bitmaps), so
            # every autoclear bit must go before we change anything they describe.
            h.autoclear = 0
            h.incompatible |= F.INCOMPAT_DIRTY
            self._write_header()
            os.fdatasync(self._fd)
        self._marked_dirty = True

    def _mark_clean(self) -> None:
        if self._v3 and self._h.incompatible & F.INCOMPAT_DIRTY:
            self._h.incompatible &= ~F.INCOMPAT_DIRTY
            self._write_header()
        os.fdatasync(self._fd)
        self._marked_dirty = False

    # ======================================================================= flushing
    def _do_flush(self) -> None:
        self._flush_metadata()
        if self._marked_dirty:
            self._mark_clean()
        else:
            os.fdatasync(self._fd)

    def _flush_metadata(self) -> None:
        """Write back everything in dependency order: refcounts, L2 tables, L1."""
        self._rc.flush()
        self._l2.flush()

    def refcount(self, cluster: int) -> int:
        """Refcount of a host cluster (through the cache)."""
        return self._rc.refcount(cluster)

    # ====================================================================== L1 growth
    def grow_l1(self, entries: int) -> None:
        """Make the L1 table hold at least `entries` entries (create lays the first one)."""
        with self._mutex:
            self._check_writable()
            self._grow_l1(entries)

    def _grow_l1(self, min_entries: int) -> None:
        h = self._h
        old = h.l1_size
        if min_entries <= old:
            return
        new_size = max(min_entries, old + old // 2)
        self._mark_dirty()
        self._flush_metadata()  # the new L1 copy must only point at tables already on disk
        nclus = -(-new_size * 8 // self._cs)
        start = self._rc.alloc(nclus)
        self._rc.flush()
        new_l1 = np.zeros(new_size, _U64)
        new_l1[:old] = self._l2.l1
        pwrite_full(self._fd, new_l1.astype(">u8").tobytes(), start << self._cb)
        os.fdatasync(self._fd)
        old_off = h.l1_table_offset
        h.l1_table_offset, h.l1_size = start << self._cb, new_size
        self._write_header()
        os.fdatasync(self._fd)
        self._l2.l1 = new_l1
        if old:
            self._rc.free(old_off >> self._cb, -(-old * 8 // self._cs))

    def _do_resize(self, new_size: int) -> None:
        if new_size < self._h.size:
            raise UnsupportedFeature(f"{self.path}: shrinking a qcow2 image is not supported")
        need = -(-new_size // (1 << (self._cb + self._l2_bits)))
        self._mark_dirty()
        self._grow_l1(need)
        self._h.size = new_size
        self._write_header()

    # ========================================================================= reads
    def _entry_kind(self, e: int) -> int:
        """0 unallocated, 1 zero, 2 normal, 3 compressed."""
        if e & F.COMPRESSED:
            return 3
        if self._v3 and e & F.ZERO:
            return 1
        return 2 if e & F.OFFSET_MASK else 0

    def _do_read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        mv = memoryview(out)
        for pos, cend, t in self._l2_spans(offset, length):
            if t is None:
                self._read_unallocated(mv[pos - offset:cend - offset], pos)
            else:
                self._read_chunk(t.entries, pos, cend, mv[pos - offset:cend - offset])
        return bytes(out)

    def _l2_spans(self, offset: int, length: int):
        """(start, end, L2 table or None) for each piece of the range that one
        L2 table maps."""
        end = offset + length
        pos = offset
        span = self._l2_bits + self._cb
        while pos < end:
            l1i = pos >> span
            cend = min(end, (l1i + 1) << span)
            yield pos, cend, self._l2.get(l1i)
            pos = cend

    def _read_unallocated(self, buf: memoryview, pos: int) -> None:
        b = self.backing
        if b is None:
            return  # buffer is already zero
        n = min(len(buf), max(0, b.size - pos))
        if n:
            buf[:n] = b.read(pos, n)

    def _read_chunk(self, entries: np.ndarray, pos: int, end: int, buf: memoryview) -> None:
        cb, cs = self._cb, self._cs
        c0 = pos >> cb
        i0 = c0 & self._l2_mask
        es = entries[i0:i0 + ((end - 1) >> cb) - c0 + 1].tolist()
        n = len(es)
        j = 0
        while j < n:
            e = es[j]
            kind = self._entry_kind(e)
            host = e & F.OFFSET_MASK
            k = j + 1
            if kind == 2:
                if host & (cs - 1):
                    raise CorruptImage(f"{self.path}: data cluster offset 0x{host:x} "
                                       "is not aligned")
                while k < n and self._entry_kind(es[k]) == 2 and \
                        es[k] & F.OFFSET_MASK == host + (k - j) * cs:
                    k += 1
            elif kind in (0, 1):
                while k < n and self._entry_kind(es[k]) == kind:
                    k += 1
            gs = max(pos, (c0 + j) << cb)
            ge = min(end, (c0 + k) << cb)
            dst = buf[gs - pos:ge - pos]
            if kind == 2:
                got = os.preadv(self._fd, [dst], host + gs - ((c0 + j) << cb))
                if got < len(dst):  # past EOF reads as zeros; finish any short read
                    dst[got:] = pread_full(self._fd, len(dst) - got,
                                           host + gs - ((c0 + j) << cb) + got)
            elif kind == 0:
                self._read_unallocated(dst, gs)
            elif kind == 3:
                data = self._read_compressed(e)
                s = gs - ((c0 + j) << cb)
                dst[:] = data[s:s + len(dst)]
            j = k

    def _read_compressed(self, e: int) -> bytes:
        x = 62 - (self._cb - 8)
        host = e & ((1 << x) - 1)
        nsect = ((e >> x) & ((1 << (self._cb - 8)) - 1)) + 1
        raw = pread_full(self._fd, nsect * 512 - (host & 511), host)
        try:
            d = zlib.decompressobj(-15)
            data = d.decompress(raw, self._cs)
        except zlib.error as err:
            raise CorruptImage(f"{self.path}: compressed cluster at 0x{host:x} is "
                               f"corrupt: {err}") from err
        if len(data) != self._cs:
            raise CorruptImage(f"{self.path}: compressed cluster at 0x{host:x} is truncated")
        return data

    def _do_is_allocated(self, offset: int, length: int) -> bool:
        for pos, cend, t in self._l2_spans(offset, length):
            if t is not None:
                i0 = (pos >> self._cb) & self._l2_mask
                i1 = ((cend - 1) >> self._cb & self._l2_mask) + 1
                if (t.entries[i0:i1] & ~_COPIED).any():
                    return True
        return False

    # ======================================================================== writes
    def _refuse_shared_or_compressed(self, e: int, guest: int) -> None:
        if e & F.COMPRESSED:
            raise UnsupportedFeature(f"{self.path}: writing over a compressed cluster "
                                     f"(guest offset {guest}) is not supported")
        if e & F.OFFSET_MASK and not e & F.COPIED:
            raise UnsupportedFeature(f"{self.path}: writing over a shared cluster (COPIED "
                                     f"flag clear, e.g. internal snapshots; guest offset "
                                     f"{guest}) is not supported")

    def _precheck(self, offset: int, length: int) -> None:
        """Refuse a whole request up front, so a refusal never writes a byte."""
        end = offset + length
        pos = offset
        cb = self._cb
        span = self._l2_bits + cb
        while pos < end:
            l1i = pos >> span
            cend = min(end, (l1i + 1) << span)
            l1e = int(self._l2.l1[l1i])
            if l1e & F.OFFSET_MASK:
                if not l1e & F.COPIED:
                    raise UnsupportedFeature(f"{self.path}: writing through a shared L2 "
                                             "table (COPIED flag clear, e.g. internal "
                                             "snapshots) is not supported")
                t = self._l2.get(l1i)
                i0 = (pos >> cb) & self._l2_mask
                i1 = ((cend - 1) >> cb & self._l2_mask) + 1
                sl = t.entries[i0:i1]
                bad = ((sl & _U64(F.COMPRESSED)) != 0) | \
                      (((sl & _OFFSET_MASK) != 0) & ((sl & _COPIED) == 0))
                if bad.any():
                    j = int(np.argmax(bad))
                    self._refuse_shared_or_compressed(int(sl[j]), (pos >> cb << cb) +
                                                      j * self._cs)
            pos = cend

    def _fill(self, kind: str, guest: int, n: int) -> bytes | memoryview:
        if kind == "b":
            buf = bytearray(n)
            self._read_unallocated(memoryview(buf), guest)
            return buf
        return self._zero_cluster[:n]

    def _do_write(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        span = self._l2_bits + self._cb
        if (offset >> span) != ((end - 1) >> span):
            self._precheck(offset, len(data))  # single-table requests check inline
        pos = offset
        while pos < end:
            l1i = pos >> span
            cend = min(end, (l1i + 1) << span)
            self._write_chunk(l1i, pos, cend, data[pos - offset:cend - offset])
            pos = cend

    def _write_chunk(self, l1i: int, pos: int, end: int, data: memoryview) -> None:
        cb, cs = self._cb, self._cs
        c0 = pos >> cb
        n = ((end - 1) >> cb) - c0 + 1
        i0 = c0 & self._l2_mask
        t = self._l2.get(l1i)
        if t is not None:
            l1e = int(self._l2.l1[l1i])
            if not l1e & F.COPIED:
                self._precheck(pos, end - pos)
            es = t.entries[i0:i0 + n].tolist()
        else:
            es = [0] * n
        hosts = [0] * n
        fills: list[str | None] = [None] * n  # how to fill the unwritten part of a cluster
        new: list[int] = []
        update: list[int] = []
        backing_fill = "b" if self.backing is not None else "z"
        v3 = self._v3
        for j, e in enumerate(es):
            off = e & F.OFFSET_MASK
            if e & (F.COMPRESSED | F.COPIED) != F.COPIED and (off or e & F.COMPRESSED):
                self._refuse_shared_or_compressed(e, (c0 + j) << cb)
            if v3 and e & F.ZERO:
                fills[j] = "z"  # a zero cluster never shows backing data
                if off:
                    hosts[j] = off
                    update.append(j)
                else:
                    new.append(j)
            elif off:
                hosts[j] = off
            else:
                fills[j] = backing_fill
                new.append(j)
        if new or update:
            self._mark_dirty()
            if t is None:
                t = self._l2.alloc(l1i)
            if new:
                first = self._rc.alloc(len(new))
                for k, j in enumerate(new):
                    hosts[j] = (first + k) << cb
        # One pwritev per run of clusters that are contiguous on the host.
        j = 0
        while j < n:
            k = j + 1
            while k < n and hosts[k] == hosts[k - 1] + cs:
                k += 1
            g0 = (c0 + j) << cb
            g1 = (c0 + k) << cb
            ds, de = max(pos, g0), min(end, g1)
            head, tail = ds - g0, g1 - de
            bufs: list = []
            at = hosts[j] + head
            if head and fills[j] is not None:
                bufs.append(self._fill(fills[j], g0, head))
                at = hosts[j]
            bufs.append(data[ds - pos:de - pos])
            if tail and fills[k - 1] is not None:
                bufs.append(self._fill(fills[k - 1], de, tail))
            pwritev_full(self._fd, bufs, at)
            j = k
        # Data is written and counted; now the mapping may point at it.
        if new or update:
            ent = t.entries
            for j in new:
                ent[i0 + j] = hosts[j] | F.COPIED
            for j in update:
                ent[i0 + j] = hosts[j] | F.COPIED
            t.dirty = True

    def _cluster_reads_zero(self, c: int) -> bool:
        t = self._l2.get(c >> self._l2_bits)
        e = 0 if t is None else int(t.entries[c & self._l2_mask])
        kind = self._entry_kind(e)
        return kind == 1 or (kind == 0 and self.backing is None)

    def _do_write_zeroes(self, offset: int, length: int) -> None:
        cb, cs = self._cb, self._cs
        end = offset + length
        first_full = -(-offset // cs)
        last_full = end >> cb  # exclusive
        if not self._v3 or first_full >= last_full:
            self._write_zero_bytes(offset, length)
            return
        self._precheck(offset, length)
        if offset < first_full << cb:
            self._write_zero_bytes(offset, (first_full << cb) - offset)
        self._zero_clusters(first_full, last_full)
        if end > last_full << cb:
            self._write_zero_bytes(last_full << cb, end - (last_full << cb))

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        end = offset + length
        pos = offset
        while pos < end:
            c = pos >> self._cb
            cend = min(end, (c + 1) << self._cb)
            if not self._cluster_reads_zero(c):
                self._do_write(pos, self._zero_cluster[:cend - pos])
            pos = cend

    def _zero_clusters(self, c_start: int, c_end: int) -> None:
        """Turn whole clusters into zero clusters (v3): metadata only, no refcount change."""
        l2e = self._l2_entries
        c = c_start
        while c < c_end:
            l1i = c >> self._l2_bits
            stop = min(c_end, (l1i + 1) * l2e)
            t = self._l2.get(l1i)
            if t is None and self.backing is None:
                c = stop  # no table and no backing file: already reads as zeros
                continue
            self._mark_dirty()
            if t is None:
                t = self._l2.alloc(l1i)
            sl = t.entries[c & self._l2_mask:(c & self._l2_mask) + stop - c]
            # Allocated clusters keep their host cluster (ZERO_ALLOC): freeing them would
            # need the L2 update to reach disk before the refcount decrement.
            keep = sl & (_OFFSET_MASK | _COPIED)
            sl[:] = np.where((sl & _OFFSET_MASK) != 0, keep | _U64(F.ZERO), _U64(F.ZERO))
            t.dirty = True
            c = stop
