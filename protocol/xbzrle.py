"""XBZRLE: a re-dirtied page sent as a delta against the copy sent before,
exactly as QEMU 7.2 encodes it (migration/xbzrle.c, page_cache.c, ram.c).

The encoding alternates a zero run (bytes where old == new) and a non-zero
run (bytes that changed, followed by those bytes from the new page); both
lengths are uleb128 in one or two bytes. The trailing zero run is left out,
an unchanged page encodes as nothing (and is not sent), and an encoding that
would not fit in one page is an overflow (the page is sent whole).

On the wire a page record is the be64 offset|XBZRLE (|CONTINUE), the block's
idstr unless CONTINUE, then u8 ENCODING_FLAG_XBZRLE, be16 length, data. The
destination patches its current copy of the page in place.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

from livemig.machine.ram import PAGE_SIZE

ENCODING_FLAG_XBZRLE = 0x01
RECORD_HEADER = 3  # u8 encoding flag + be16 length, after the 8-byte page header
MAX_ULEB = 0x3FFF  # two uleb128 bytes
DEFAULT_CACHE_SIZE = 64 << 20
CACHED_PAGE_LIFETIME = 2  # a slot refreshed this many syncs ago is not evicted

_be16 = struct.Struct(">H")
_ZERO_PAGE = np.zeros(PAGE_SIZE, np.uint8)


class XbzrleError(ValueError):
    """A malformed XBZRLE record or encoding."""


# --------------------------------------------------------------------------- encoding


def encode(old: np.ndarray, new: np.ndarray, dlen: int = PAGE_SIZE) -> bytes | None:
    """The XBZRLE encoding of page `new` against `old` (uint8 arrays of equal
    length): b"" when they are equal, None on overflow (the encoding would not
    fit in `dlen` bytes, with QEMU's exact overflow checks)."""
    diff = old != new
    if not diff.any():
        return b""
    n = len(diff)
    edges = np.flatnonzero(diff[1:] != diff[:-1]) + 1
    bounds = np.concatenate(([0], edges, [n]))
    runs = np.diff(bounds)
    if diff[0]:
        runs = np.concatenate(([0], runs))  # an empty first zero run
    zrun = runs[0::2]
    nzrun = runs[1::2]
    trailing_zero = len(zrun) > len(nzrun)
    zrun = zrun[:len(nzrun)]
    zlen = 1 + (zrun > 0x7F)
    nzlen = 1 + (nzrun > 0x7F)
    d_after = np.cumsum(zlen + nzlen + nzrun)  # d after each (zrun, nzrun) pair
    d_before = d_after - (zlen + nzlen + nzrun)
    # QEMU checks room for two bytes after writing each zero-run length, the
    # literal bytes after each non-zero-run length, and two bytes again at the
    # top of the loop before the (omitted) trailing zero run.
    total = int(d_after[-1])
    if (d_before + zlen + 2 > dlen).any() or total > dlen or (trailing_zero and total + 2 > dlen):
        return None
    return _assemble(zrun, nzrun, zlen, nzlen, d_before, new[diff], total)


def _assemble(zrun: np.ndarray, nzrun: np.ndarray, zlen: np.ndarray, nzlen: np.ndarray,
              d_before: np.ndarray, literals: np.ndarray, total: int) -> bytes:
    """Lay out the length bytes and the changed bytes without a loop."""
    out = np.empty(total, np.uint8)
    is_header = np.zeros(total, np.bool_)
    values = np.empty(2 * len(zrun), np.int64)
    values[0::2] = zrun
    values[1::2] = nzrun
    lens = np.empty_like(values)
    lens[0::2] = zlen
    lens[1::2] = nzlen
    starts = np.empty_like(values)
    starts[0::2] = d_before
    starts[1::2] = d_before + zlen
    two = lens == 2
    out[starts] = np.where(two, (values & 0x7F) | 0x80, values)
    out[starts[two] + 1] = values[two] >> 7
    is_header[starts] = True
    is_header[starts[two] + 1] = True
    out[~is_header] = literals
    return out.tobytes()


def encode_batch(old: np.ndarray, new: np.ndarray, dlen: int = PAGE_SIZE) -> list[bytes | None]:
    """encode() of every row of two (k, n) uint8 arrays (n a multiple of 8),
    in a fixed number of numpy steps for the whole batch, each costing what
    changed rather than the pages' size: b"" for an unchanged row, None for
    an overflow."""
    k, n = new.shape
    out: list[bytes | None] = [b""] * k
    xor = old.view(np.uint64) ^ new.view(np.uint64)
    wrow, word = np.nonzero(xor)
    if not len(wrow):
        return out
    changed = xor[wrow, word].view(np.uint8).reshape(-1, 8) != 0  # little-endian: byte j of the word
    brow = np.repeat(wrow, 8)[changed.ravel()]
    pos = (np.repeat(word * 8, 8) + np.tile(np.arange(8), len(word)))[changed.ravel()]
    # runs of consecutive changed bytes within a row
    new_run = np.r_[True, (brow[1:] != brow[:-1]) | (pos[1:] != pos[:-1] + 1)]
    run_first = np.flatnonzero(new_run)
    run_last = np.r_[run_first[1:] - 1, len(pos) - 1]
    row = brow[run_first]
    start = pos[run_first]
    end = pos[run_last] + 1
    first = np.r_[True, row[1:] != row[:-1]]
    prev_end = np.r_[0, end[:-1]]
    prev_end[first] = 0
    zrun = start - prev_end
    nzrun = end - start
    zlen = 1 + (zrun > 0x7F)
    nzlen = 1 + (nzrun > 0x7F)
    contrib = zlen + nzlen + nzrun
    firsts = np.flatnonzero(first)
    lasts = np.r_[firsts[1:] - 1, len(row) - 1]
    csum = np.cumsum(contrib)
    d_after = csum - (csum[firsts] - contrib[firsts])[np.cumsum(first) - 1]
    d_before = d_after - contrib
    total = d_after[lasts]
    trailing = end[lasts] < n
    overflow = np.logical_or.reduceat(d_before + zlen + 2 > dlen, firsts) | (total > dlen) \
        | (trailing & (total + 2 > dlen))
    rows = row[firsts]
    for r in rows[overflow].tolist():
        out[r] = None
    keep = ~overflow
    if not keep.any():
        return out
    group = np.cumsum(first) - 1  # each run's index among the changed rows
    sel = keep[group]
    sizes = total[keep]
    row_start = np.r_[0, np.cumsum(sizes)[:-1]]
    where = np.zeros(len(rows), np.int64)
    where[keep] = row_start
    literal = keep[np.cumsum(np.r_[True, brow[1:] != brow[:-1]]) - 1]
    blob = _assemble(zrun[sel], nzrun[sel], zlen[sel], nzlen[sel], d_before[sel] + where[group[sel]],
                     new[brow[literal], pos[literal]], int(sizes.sum()))
    for r, at, size in zip(rows[keep].tolist(), row_start.tolist(), sizes.tolist(), strict=True):
        out[r] = blob[at:at + size]
    return out


def _uleb(data: bytes, i: int) -> tuple[int, int]:
    """(value, bytes used) of the uleb128 at data[i]; the caller checked 2 bytes are there."""
    first = data[i]
    if not first & 0x80:
        return first, 1
    if data[i + 1] & 0x80:
        raise XbzrleError(f"XBZRLE run length at byte {i} needs more than two uleb128 bytes")
    return (first & 0x7F) | (data[i + 1] << 7), 2


def parse(data: bytes, dlen: int = PAGE_SIZE) -> list[tuple[int, int, int]]:
    """Validate an encoding; return its (page offset, data offset, length)
    copies. Refuses every case QEMU's decoder refuses."""
    copies = []
    i = d = 0
    slen = len(data)
    while i < slen:
        if slen - i < 2:
            raise XbzrleError(f"XBZRLE data ends inside the zero-run length at byte {i}")
        count, used = _uleb(data, i)
        if i and not count:
            raise XbzrleError(f"XBZRLE zero run of length 0 at byte {i} (allowed only first)")
        i += used
        d += count
        if d > dlen:
            raise XbzrleError(f"XBZRLE zero run reaches byte {d}, beyond the {dlen}-byte page")
        if slen - i < 2:
            raise XbzrleError(f"XBZRLE data ends inside the non-zero run at byte {i}")
        count, used = _uleb(data, i)
        if not count:
            raise XbzrleError(f"XBZRLE non-zero run of length 0 at byte {i}")
        i += used
        if d + count > dlen:
            raise XbzrleError(f"XBZRLE non-zero run reaches byte {d + count}, beyond the {dlen}-byte page")
        if i + count > slen:
            raise XbzrleError(f"XBZRLE non-zero run of {count} bytes at byte {i} overruns the "
                              f"{slen}-byte encoding")
        copies.append((d, i, count))
        d += count
        i += count
    return copies


def decode_into(page: np.ndarray, data: bytes) -> None:
    """Patch `page` (uint8, the destination's current copy) in place; nothing
    is written unless the whole encoding is valid."""
    copies = parse(data, len(page))
    src = np.frombuffer(data, np.uint8)
    for d, i, count in copies:
        page[d:d + count] = src[i:i + count]


# --------------------------------------------------------------------------- records


def record_body(encoded: bytes) -> bytes:
    """What follows a page header with the XBZRLE flag."""
    return bytes([ENCODING_FLAG_XBZRLE]) + _be16.pack(len(encoded)) + encoded


def check_record_header(flag: int, length: int) -> None:
    """The u8 encoding flag and be16 length of a received XBZRLE record."""
    if flag != ENCODING_FLAG_XBZRLE:
        raise XbzrleError(f"XBZRLE page with encoding flag {flag:#04x} (expected {ENCODING_FLAG_XBZRLE:#04x})")
    if length > PAGE_SIZE:
        raise XbzrleError(f"XBZRLE page of {length} bytes is longer than a {PAGE_SIZE}-byte page")


# --------------------------------------------------------------------------- cache


def check_cache_size(size: int) -> None:
    """QEMU's rule for xbzrle-cache-size."""
    if size < PAGE_SIZE or size & (size - 1):
        raise ValueError("Parameter 'xbzrle_cache_size' expects a power of two no less than the "
                         "target page size")


class PageCache:
    """QEMU's direct-mapped page cache: slot (addr / 4096) & (slots - 1),
    keyed by the page's ram_addr, aged by the dirty-sync count."""

    def __init__(self, size: int = DEFAULT_CACHE_SIZE) -> None:
        check_cache_size(size)
        self.size = size
        self.slots = size // PAGE_SIZE
        self.data = np.zeros((self.slots, PAGE_SIZE), np.uint8)  # untouched slots stay unbacked
        self.addr = np.full(self.slots, -1, np.int64)
        self.age = np.zeros(self.slots, np.uint64)

    def slot(self, addr: int) -> int:
        return (addr // PAGE_SIZE) & (self.slots - 1)

    def lookup(self, addr: int, age: int) -> int | None:
        """The slot holding `addr` (refreshing its age), or None."""
        s = self.slot(addr)
        if self.addr[s] != addr:
            return None
        self.age[s] = age
        return s

    def insert(self, addr: int, page: np.ndarray, age: int) -> int | None:
        """Store a copy of `page`; None when the slot holds another page that
        is still fresh (QEMU's cache_insert returns -1)."""
        s = self.slot(addr)
        held = int(self.addr[s])
        if held != -1 and held != addr and int(self.age[s]) + CACHED_PAGE_LIFETIME > age:
            return None
        self.data[s] = page
        self.addr[s] = addr
        self.age[s] = age
        return s


# --------------------------------------------------------------------------- statistics


@dataclass
class XbzrleStats:
    """QEMU's XBZRLECacheStats; the two rates are per sync period."""

    cache_size: int = DEFAULT_CACHE_SIZE
    bytes: int = 0  # encoded bytes sent, without the 8-byte page headers; overflows count 4096
    pages: int = 0  # cache hits, whatever the encoding turned out to be
    cache_miss: int = 0
    cache_miss_rate: float = 0.0
    encoding_rate: float = 0.0
    overflow: int = 0
    _prev: tuple[int, int, int] = field(default=(0, 0, 0), repr=False)  # cache_miss, pages, bytes

    def update_rates(self, pages_sent: int) -> None:
        """At a dirty sync, given the target pages sent since the last one
        (QEMU's migration_update_rates; nothing changes when none were sent)."""
        if not pages_sent:
            return
        miss, pages, nbytes = self._prev
        self.cache_miss_rate = (self.cache_miss - miss) / pages_sent
        encoded = self.bytes - nbytes
        if self.pages == pages or not encoded:
            self.encoding_rate = 0.0
        else:
            self.encoding_rate = (self.pages - pages) * PAGE_SIZE / encoded
        self._prev = (self.cache_miss, self.pages, self.bytes)

    def to_qmp(self) -> dict:
        return {"cache-size": self.cache_size, "bytes": self.bytes, "pages": self.pages,
                "cache-miss": self.cache_miss, "cache-miss-rate": self.cache_miss_rate,
                "encoding-rate": self.encoding_rate, "overflow": self.overflow}


# --------------------------------------------------------------------------- the source's rule

SKIP = 0  # unchanged since the copy sent: nothing goes on the wire
DELTA = 1  # send record_body(encoded)
WHOLE = 2  # send a normal page, from `page` (the cache's copy when one was made)


class XbzrleEncoder:
    """The source's per-page decision (QEMU's save_xbzrle_page), used only
    once the first full pass over RAM is done."""

    def __init__(self, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.cache = PageCache(cache_size)
        self.stats = XbzrleStats(cache_size=cache_size)

    def resize(self, size: int) -> None:
        """A new cache size drops the cache, as QEMU's xbzrle_cache_resize does."""
        if size != self.cache.size:
            self.cache = PageCache(size)
            self.stats.cache_size = size

    def page(self, addr: int, page: np.ndarray, age: int, last_stage: bool,
             idstr_len: int = 0) -> tuple[int, object]:
        """Decide how to send the page at ram_addr `addr` whose current guest
        content is `page`; `idstr_len`: the bytes of block name a record for it
        would carry (0 with CONTINUE), which QEMU counts in `bytes`. Returns
        (SKIP, None), (DELTA, encoded bytes) or (WHOLE, the array to send from)."""
        s = self.cache.lookup(addr, age)
        if s is None:
            self.stats.cache_miss += 1
            if not last_stage:
                s = self.cache.insert(addr, page, age)
                if s is not None:
                    return WHOLE, self.cache.data[s]
            return WHOLE, page
        self.stats.pages += 1
        cached = self.cache.data[s]
        current = page.copy()  # the guest may write on while we encode
        encoded = encode(cached, current)
        if encoded == b"":
            return SKIP, None
        sent: np.ndarray = current
        if not last_stage:
            cached[:] = current
            sent = cached
        if encoded is None:
            self.stats.overflow += 1
            self.stats.bytes += PAGE_SIZE
            return WHOLE, sent
        self.stats.bytes += idstr_len + RECORD_HEADER + len(encoded)
        return DELTA, encoded

    def batch(self, addrs: np.ndarray, pages: np.ndarray, age: int, last_stage: bool) -> list[tuple[int, object]]:
        """page() for a batch: `addrs` the ram_addrs of the rows of `pages`
        (guest RAM). Same results, in order, as page() one by one; pages that
        share a cache slot are taken in turns so that order holds."""
        out: list[tuple[int, object]] = [(SKIP, None)] * len(addrs)
        slots = (addrs.astype(np.int64) // PAGE_SIZE) & (self.cache.slots - 1)
        order = np.argsort(slots, kind="stable")
        ordered = slots[order]
        head = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        turn = np.empty(len(order), np.int64)
        turn[order] = np.arange(len(order)) - np.repeat(head, np.diff(np.r_[head, len(order)]))
        for t in range(int(turn.max()) + 1 if len(turn) else 0):
            idx = np.flatnonzero(turn == t)
            self._unique_slots(idx, addrs[idx].astype(np.int64), slots[idx], pages, age, last_stage, out)
        return out

    def _unique_slots(self, idx: np.ndarray, addrs: np.ndarray, slots: np.ndarray, pages: np.ndarray,
                      age: int, last_stage: bool, out: list) -> None:
        cache, stats = self.cache, self.stats
        hit = cache.addr[slots] == addrs
        cache.age[slots[hit]] = age
        miss = np.flatnonzero(~hit)
        stats.cache_miss += len(miss)
        if len(miss):
            s = slots[miss]
            free = ~((cache.addr[s] != -1) & (cache.age[s].astype(np.int64) + CACHED_PAGE_LIFETIME > age))
            if last_stage:
                free[:] = False
            ins = miss[free]
            cache.data[slots[ins]] = pages[idx[ins]]
            cache.addr[slots[ins]] = addrs[ins]
            cache.age[slots[ins]] = age
            for i, slot in zip(idx[ins].tolist(), slots[ins].tolist(), strict=True):
                out[i] = (WHOLE, cache.data[slot])
            for i in idx[miss[~free]].tolist():
                out[i] = (WHOLE, pages[i])
        hits = np.flatnonzero(hit)
        if not len(hits):
            return
        stats.pages += len(hits)
        s = slots[hits]
        current = pages[idx[hits]]  # a copy: the guest may write on while we encode
        encoded = encode_batch(cache.data[s], current)
        for j, (i, enc) in enumerate(zip(idx[hits].tolist(), encoded, strict=True)):
            if enc == b"":
                continue
            sent = current[j]
            if not last_stage:
                cache.data[s[j]] = current[j]
                sent = cache.data[s[j]]
            if enc is None:
                stats.overflow += 1
                stats.bytes += PAGE_SIZE
                out[i] = (WHOLE, sent)
            else:
                stats.bytes += RECORD_HEADER + len(enc)
                out[i] = (DELTA, enc)

    def zero_page(self, addr: int, age: int) -> None:
        """A zero page was sent: refresh its slot so no stale copy stays behind."""
        self.cache.insert(addr, _ZERO_PAGE, age)
