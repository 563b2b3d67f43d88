"""The qcow2 driver: read-write, with write-back L2 and refcount caches.

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
from collections import OrderedDict

import numpy as np

from . import qcow2_format as F
from .errors import BlockError, CorruptImage, ImageNotFound, UnsupportedFeature
from .image import Image, pread_full, pwrite_full, pwritev_full

DEFAULT_L2_CACHE_BYTES = 4 << 20
DEFAULT_REFCOUNT_CACHE_BYTES = 1 << 20

_U64 = np.uint64
_OFFSET_MASK = _U64(F.OFFSET_MASK)
_COPIED = _U64(F.COPIED)


class _L2Table:
    __slots__ = ("offset", "entries", "dirty")

    def __init__(self, offset: int, entries: np.ndarray, dirty: bool) -> None:
        self.offset = offset
        self.entries = entries  # native uint64
        self.dirty = dirty


class _RefBlock:
    __slots__ = ("offset", "values", "dirty")

    def __init__(self, offset: int, values: np.ndarray, dirty: bool) -> None:
        self.offset = offset
        self.values = values  # uint64, one refcount per cluster
        self.dirty = dirty


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
        self._l1: np.ndarray = np.zeros(0, _U64)
        self._l1_dirty = False
        self._rt: np.ndarray = np.zeros(0, _U64)
        self._rt_dirty = False
        self._l2_cache: OrderedDict[int, _L2Table] = OrderedDict()
        self._rc_cache: OrderedDict[int, _RefBlock] = OrderedDict()
        self._free_hint = 0
        self._marked_dirty = False
        if getattr(self, "backing", None) is not None:
            self.backing.close()
        self.backing = None

    def _load(self, for_write: bool) -> None:
        fd, path = self._fd, self.path
        head = pread_full(fd, 512, 0)
        cb = F.peek_cluster_bits(head, path)
        h = F.parse_header(pread_full(fd, 1 << cb, 0), path)
        self._check_features(h, for_write)
        if for_write and h.incompatible & F.INCOMPAT_DIRTY:
            # Left by a crash (ours, or QEMU's with lazy refcounts): the refcounts may be
            # missing increments, so rebuild them from the metadata before any allocation.
            from .repair import rebuild_refcounts

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
        self._rc_order = h.refcount_order
        self._rc_max = (1 << (1 << h.refcount_order)) - 1
        self._rb_entries = cs * 8 >> h.refcount_order
        self._l2_capacity = max(2, self._l2_cache_bytes // cs)
        self._rc_capacity = max(2, self._rc_cache_bytes // cs)
        self._zero_cluster = memoryview(bytes(cs))
        self._l1 = np.frombuffer(pread_full(fd, h.l1_size * 8, h.l1_table_offset),
                                 ">u8").astype(_U64)
        self._rt = np.frombuffer(pread_full(fd, h.refcount_table_clusters * cs,
                                            h.refcount_table_offset), ">u8").astype(_U64)
        if h.backing_file:
            self.backing = self._open_backing(h)

    def _check_features(self, h: F.Header, for_write: bool) -> None:
        path = self.path
        if h.crypt_method:
            kind = {1: "AES", 2: "LUKS"}.get(h.crypt_method, str(h.crypt_method))
            raise UnsupportedFeature(f"{path}: encrypted qcow2 images ({kind} encryption) "
                                     "are not supported")
        unknown = h.incompatible & ~F.KNOWN_INCOMPAT
        if unknown:
            names = [h.feature_name(0, b) for b in range(64) if unknown >> b & 1]
            raise UnsupportedFeature(f"{path}: unsupported qcow2 incompatible feature(s): "
                                     f"{', '.join(names)} (bits 0x{unknown:x})")
        if h.extension(F.EXT_DATA_FILE) is not None:
            raise UnsupportedFeature(f"{path}: external data files are not supported")
        if h.compression_type != 0:
            raise UnsupportedFeature(f"{path}: compression type {h.compression_type} "
                                     "(zstd) is not supported")
        if not for_write:
            return
        if h.incompatible & F.INCOMPAT_CORRUPT:
            raise CorruptImage(f"{path}: image is marked corrupt (corrupt bit set); "
                               f"run 'qemu-img check -r all {path}' before writing to it")
        if h.incompatible & F.INCOMPAT_DIRTY and h.extension(F.EXT_BITMAPS) is not None:
            raise CorruptImage(f"{path}: image is dirty (not closed cleanly) and has "
                               "persistent bitmaps, which this driver cannot account for "
                               f"when rebuilding refcounts; run 'qemu-img check -r all {path}'")

    def _open_backing(self, h: F.Header) -> Image:
        from .api import open_image

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

    def _flush_refcounts(self) -> bool:
        """Write dirty refcount blocks, then the refcount table; durable on return."""
        wrote = False
        for bi, rb in self._rc_cache.items():
            if rb.dirty:
                self._write_refblock(bi, rb)
                wrote = True
        if self._rt_dirty:
            if wrote:
                os.fdatasync(self._fd)  # a table entry may only point at a written block
            self._write_refcount_table()
            wrote = True
        if wrote:
            os.fdatasync(self._fd)
        return wrote

    def _write_refblock(self, bi: int, rb: _RefBlock) -> None:
        pwrite_full(self._fd, F.encode_refcounts(rb.values, self._rc_order), rb.offset)
        rb.dirty = False

    def _write_refcount_table(self) -> None:
        pwrite_full(self._fd, self._rt.astype(">u8").tobytes(), self._h.refcount_table_offset)
        self._rt_dirty = False

    def _flush_metadata(self) -> None:
        """Write back everything in dependency order: refcounts, L2 tables, L1."""
        self._flush_refcounts()
        dirty = sorted((t for t in self._l2_cache.values() if t.dirty), key=lambda t: t.offset)
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
            pwrite_full(self._fd, self._l1.astype(">u8").tobytes(), self._h.l1_table_offset)
            self._l1_dirty = False
        if dirty or self._l1_dirty:
            os.fdatasync(self._fd)

    # ====================================================================== L2 cache
    def _l2_get(self, l1i: int) -> _L2Table | None:
        l1e = int(self._l1[l1i])
        off = l1e & F.OFFSET_MASK
        if not off:
            return None
        t = self._l2_cache.get(off)
        if t is not None:
            self._l2_cache.move_to_end(off)
            return t
        if off & (self._cs - 1) or l1e & F.L1_RESERVED:
            raise CorruptImage(f"{self.path}: L1 entry {l1i} is invalid (0x{l1e:x})")
        entries = np.frombuffer(pread_full(self._fd, self._cs, off), ">u8").astype(_U64)
        t = _L2Table(off, entries, False)
        self._l2_insert(t)
        return t

    def _l2_insert(self, t: _L2Table) -> None:
        while len(self._l2_cache) >= self._l2_capacity:
            _, old = self._l2_cache.popitem(last=False)
            if old.dirty:
                # The evicted table may reference clusters counted only in cached refcount
                # blocks: those must be durable first.
                self._flush_refcounts()
                pwrite_full(self._fd, old.entries.astype(">u8").tobytes(), old.offset)
                old.dirty = False
        self._l2_cache[t.offset] = t

    def _l2_alloc(self, l1i: int) -> _L2Table:
        off = self._alloc_clusters(1) << self._cb
        t = _L2Table(off, np.zeros(self._l2_entries, _U64), True)
        self._l2_insert(t)
        self._l1[l1i] = _U64(off | F.COPIED)
        self._l1_dirty = True
        return t

    # ================================================================ refcount cache
    def _rb_get(self, bi: int) -> _RefBlock | None:
        rb = self._rc_cache.get(bi)
        if rb is not None:
            self._rc_cache.move_to_end(bi)
            return rb
        if bi >= len(self._rt):
            return None
        off = int(self._rt[bi]) & F.RT_OFFSET_MASK
        if not off:
            return None
        if off & (self._cs - 1):
            raise CorruptImage(f"{self.path}: refcount block {bi} is not cluster aligned")
        values = F.decode_refcounts(pread_full(self._fd, self._cs, off), self._rc_order)
        rb = _RefBlock(off, values, False)
        self._rc_insert(bi, rb)
        return rb

    def _rc_insert(self, bi: int, rb: _RefBlock) -> None:
        while len(self._rc_cache) >= self._rc_capacity:
            obi, old = self._rc_cache.popitem(last=False)
            if old.dirty:
                self._write_refblock(obi, old)
        self._rc_cache[bi] = rb

    def refcount(self, cluster: int) -> int:
        """Refcount of a host cluster (through the cache)."""
        bi, i = divmod(cluster, self._rb_entries)
        rb = self._rb_get(bi)
        return 0 if rb is None else int(rb.values[i])

    def _find_free_run(self, n: int) -> int:
        """First run of n free clusters at or after the hint (next fit)."""
        rbe = self._rb_entries
        c = self._free_hint
        run_start = c
        while c - run_start < n:
            bi, i = divmod(c, rbe)
            rb = self._rb_get(bi)
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

    def _alloc_clusters(self, n: int) -> int:
        """Allocate n contiguous clusters (refcount 1); returns the first cluster index."""
        while True:
            start = self._find_free_run(n)
            # Creating a refcount block takes a cluster, possibly one of ours: search again.
            if not self._ensure_refblocks(start, n):
                break
        self._add_refcounts(start, n, 1)
        self._free_hint = start + n
        return start

    def _free_clusters(self, start: int, n: int) -> None:
        self._add_refcounts(start, n, -1)
        self._free_hint = min(self._free_hint, start)

    def _add_refcounts(self, start: int, n: int, delta: int) -> None:
        rbe = self._rb_entries
        if n == 1:  # the common case (one cluster per request): skip the array reductions
            bi, i = divmod(start, rbe)
            rb = self._rb_get(bi)
            if rb is not None:
                new = int(rb.values[i]) + delta
                if 0 <= new <= self._rc_max:
                    rb.values[i] = new
                    rb.dirty = True
                    return
        end = start + n
        c = start
        while c < end:
            bi, i = divmod(c, rbe)
            j = min(rbe, i + end - c)
            rb = self._rb_get(bi)
            if rb is None:
                raise CorruptImage(f"{self.path}: no refcount block for cluster {c}")
            v = rb.values[i:j]
            if delta < 0 and (v < _U64(-delta)).any():
                raise CorruptImage(f"{self.path}: refcount underflow at cluster "
                                   f"{bi * rbe + i + int(np.argmax(v < _U64(-delta)))}")
            if delta > 0 and (v > _U64(self._rc_max - delta)).any():
                raise UnsupportedFeature(f"{self.path}: refcount overflow (refcount_bits="
                                         f"{1 << self._rc_order})")
            if delta > 0:
                v += _U64(delta)
            else:
                v -= _U64(-delta)
            rb.dirty = True
            c = bi * rbe + j

    def _ensure_refblocks(self, start: int, n: int) -> bool:
        created = False
        for bi in range(start // self._rb_entries, (start + n - 1) // self._rb_entries + 1):
            if self._rb_get(bi) is None:
                self._create_refblock(bi)
                created = True
        return created

    def _install_refblock(self, bi: int, cluster: int, values: np.ndarray) -> None:
        self._rt[bi] = _U64(cluster << self._cb)
        self._rt_dirty = True
        self._rc_insert(bi, _RefBlock(cluster << self._cb, values, True))

    def _create_refblock(self, bi: int) -> None:
        rbe = self._rb_entries
        while True:
            if bi >= len(self._rt):
                self._grow_refcount_table(bi)
                return
            if self._rb_get(bi) is not None:
                return
            c = self._find_free_run(1)
            holder_bi = c // rbe
            if holder_bi == bi:  # the new block lies in its own range: it counts itself
                values = np.zeros(rbe, _U64)
                values[c % rbe] = 1
                self._install_refblock(bi, c, values)
                return
            holder = self._rb_get(holder_bi)
            if holder is None:
                self._create_refblock(holder_bi)
                continue  # c may be taken now; look again
            self._install_refblock(bi, c, np.zeros(rbe, _U64))
            self._add_refcounts(c, 1, 1)
            return

    def _grow_refcount_table(self, need_bi: int) -> None:
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
                      if self._rb_get(bi) is None}
            if self._rb_get(need_bi) is None:
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
            self._install_refblock(bi, start + nclus + idx, np.zeros(rbe, _U64))
        used = nclus + len(needed)
        self._add_refcounts(start, used, 1)
        self._free_hint = max(self._free_hint, start + used)
        self._mark_dirty()
        # Blocks first, then the new table, then the header that points at it.
        for bi, rb in self._rc_cache.items():
            if rb.dirty:
                self._write_refblock(bi, rb)
        os.fdatasync(self._fd)
        h = self._h
        old_off, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
        pwrite_full(self._fd, new_rt.astype(">u8").tobytes(), start << self._cb)
        os.fdatasync(self._fd)
        h.refcount_table_offset, h.refcount_table_clusters = start << self._cb, nclus
        self._write_header()
        os.fdatasync(self._fd)
        self._rt_dirty = False
        self._free_clusters(old_off >> self._cb, old_clusters)

    # ====================================================================== L1 growth
    def _grow_l1(self, min_entries: int, exact: bool = False) -> None:
        h = self._h
        old = h.l1_size
        if min_entries <= old:
            return
        new_size = min_entries if exact else max(min_entries, old + old // 2)
        self._mark_dirty()
        self._flush_metadata()  # the new L1 copy must only point at tables already on disk
        nclus = -(-new_size * 8 // self._cs)
        start = self._alloc_clusters(nclus)
        self._flush_refcounts()
        new_l1 = np.zeros(new_size, _U64)
        new_l1[:old] = self._l1
        pwrite_full(self._fd, new_l1.astype(">u8").tobytes(), start << self._cb)
        os.fdatasync(self._fd)
        old_off = h.l1_table_offset
        h.l1_table_offset, h.l1_size = start << self._cb, new_size
        self._write_header()
        os.fdatasync(self._fd)
        self._l1 = new_l1
        if old:
            self._free_clusters(old_off >> self._cb, -(-old * 8 // self._cs))

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
            yield pos, cend, self._l2_get(l1i)
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
            l1e = int(self._l1[l1i])
            if l1e & F.OFFSET_MASK:
                if not l1e & F.COPIED:
                    raise UnsupportedFeature(f"{self.path}: writing through a shared L2 "
                                             "table (COPIED flag clear, e.g. internal "
                                             "snapshots) is not supported")
                t = self._l2_get(l1i)
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
        t = self._l2_get(l1i)
        if t is not None:
            l1e = int(self._l1[l1i])
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
                t = self._l2_alloc(l1i)
            if new:
                first = self._alloc_clusters(len(new))
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
        t = self._l2_get(c >> self._l2_bits)
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
            t = self._l2_get(l1i)
            if t is None and self.backing is None:
                c = stop  # no table and no backing file: already reads as zeros
                continue
            self._mark_dirty()
            if t is None:
                t = self._l2_alloc(l1i)
            sl = t.entries[c & self._l2_mask:(c & self._l2_mask) + stop - c]
            # Allocated clusters keep their host cluster (ZERO_ALLOC): freeing them would
            # need the L2 update to reach disk before the refcount decrement.
            keep = sl & (_OFFSET_MASK | _COPIED)
            sl[:] = np.where((sl & _OFFSET_MASK) != 0, keep | _U64(F.ZERO), _U64(F.ZERO))
            t.dirty = True
            c = stop


def create_qcow2(path: str, size: int, cluster_size: int = 65536, backing: str | None = None,
                 backing_format: str | None = None, compat: str = "1.1",
                 refcount_bits: int = 16) -> None:
    """Write an empty qcow2 image: header, refcount table and block, then an L1 table."""
    if cluster_size & (cluster_size - 1) or not 512 <= cluster_size <= 2 << 20:
        raise BlockError(f"{path}: cluster size {cluster_size} must be a power of two "
                         "between 512 and 2097152")
    if compat not in ("0.10", "1.1"):
        raise BlockError(f"{path}: compat must be '0.10' (v2) or '1.1' (v3), not {compat!r}")
    if refcount_bits & (refcount_bits - 1) or not 1 <= refcount_bits <= 64:
        raise BlockError(f"{path}: refcount_bits must be a power of two from 1 to 64")
    version = 3 if compat == "1.1" else 2
    if version == 2 and refcount_bits != 16:
        raise BlockError(f"{path}: qcow2 v2 (compat=0.10) only supports refcount_bits=16")
    cb = cluster_size.bit_length() - 1
    order = refcount_bits.bit_length() - 1
    # Size 0 until the L1 table exists: a header must never promise more than its L1 maps.
    h = F.Header(version=version, backing_file_offset=0, backing_file_size=0, cluster_bits=cb,
                 size=0, crypt_method=0, l1_size=0, l1_table_offset=0,
                 refcount_table_offset=cluster_size, refcount_table_clusters=1,
                 nb_snapshots=0, snapshots_offset=0, refcount_order=order,
                 header_length=F.V3_HEADER_LEN if version == 3 else F.V2_HEADER_LEN)
    if backing:
        h.backing_file = backing
        if backing_format:
            h.extensions.append((F.EXT_BACKING_FORMAT, backing_format.encode()))
    if version == 3:
        h.extensions.append((F.EXT_FEATURE_TABLE, F.pack_feature_table(F.FEATURE_TABLE)))
        if len(h.pack()) > cluster_size:  # the table is optional: drop it to make room
            h.extensions.pop()
    hdr = h.pack()
    if len(hdr) > cluster_size:
        raise BlockError(f"{path}: backing file name is too long for {cluster_size}-byte "
                         "clusters")
    rb = np.zeros(cluster_size * 8 >> order, _U64)
    rb[:3] = 1  # header, refcount table, this refcount block
    rt = np.zeros(cluster_size // 8, _U64)
    rt[0] = 2 * cluster_size
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        pwrite_full(fd, hdr + bytes(cluster_size - len(hdr)), 0)
        pwrite_full(fd, rt.astype(">u8").tobytes(), cluster_size)
        pwrite_full(fd, F.encode_refcounts(rb, order), 2 * cluster_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    # The L1 table goes through the normal allocator, so huge tables that need more
    # refcount blocks (or a bigger refcount table) are handled by the same code.
    need_l1 = max(1, -(-size // (cluster_size * cluster_size // 8)))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    img = Qcow2Image(path, fd, read_only=False, inactive=True)
    img._open()
    img._do_activate()
    try:
        img._grow_l1(need_l1, exact=True)
        img._h.size = size
        img._write_header()
    finally:
        img.close()
