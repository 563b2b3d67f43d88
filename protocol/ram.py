"""The RAM section of the savevm stream ("ram", instance 0, version 4): its
record flags, the page encoder the writer uses, the loader the receiver uses
and a skipper for streams being refused. QEMU keeps this apart from the
stream's framing too (ram.c beside savevm.c); see docs/stream-format.md."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from livemig.machine.ram import PAGE_SHIFT, PAGE_SIZE
from livemig.protocol import xbzrle
from livemig.protocol.savevm import BufferedReader, StreamError, encode_idstr
from livemig.protocol.transport import iovec_table

RAM_VERSION = 4
# Record flags, in the low bits of a be64 whose high bits are the page's offset.
RAM_FULL = 0x01
RAM_ZERO = 0x02
RAM_MEM_SIZE = 0x04
RAM_PAGE = 0x08
RAM_EOS = 0x10
RAM_CONTINUE = 0x20
RAM_XBZRLE = 0x40
RAM_HOOK = 0x80
RAM_COMPRESS_PAGE = 0x100
RAM_MULTIFD_FLUSH = 0x200
RAM_KNOWN_FLAGS = RAM_ZERO | RAM_MEM_SIZE | RAM_PAGE | RAM_EOS | RAM_CONTINUE | RAM_XBZRLE | RAM_MULTIFD_FLUSH

PAGE_MASK = PAGE_SIZE - 1
MAX_RAM_BLOCKS = 1024  # in one block list (a QEMU pc guest has about 10)

_be64 = struct.Struct(">Q")


def ram_mem_size(blocks: list[tuple[str, int]]) -> bytes:
    total = sum(size for _, size in blocks)
    out = [_be64.pack(total | RAM_MEM_SIZE)]
    for name, size in blocks:
        out.append(encode_idstr(name) + _be64.pack(size))
    return b"".join(out)


def ram_eos() -> bytes:
    return _be64.pack(RAM_EOS)


# Copying page runs: up to this many runs, one slice copy each (memcpy speed);
# beyond it one fancy-indexed copy. np.take into the strided record array is
# the slowest of all (about a third of memcpy speed).
MAX_RUNS = 32


def copy_pages(dst: np.ndarray, dst_idx: np.ndarray | None, src: np.ndarray, src_idx: np.ndarray | None) -> None:
    """dst[dst_idx] = src[src_idx] for (n, PAGE_SIZE) arrays, where exactly one
    side is indexed (None: the whole other side, in order)."""
    idx = src_idx if src_idx is not None else dst_idx
    assert idx is not None
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    if len(breaks) >= MAX_RUNS:
        if src_idx is not None:
            dst[:] = src[src_idx]
        else:
            dst[dst_idx] = src
        return
    lo = 0
    for hi in (*breaks.tolist(), len(idx)):
        first = int(idx[lo])
        if src_idx is not None:
            dst[lo:hi] = src[first:first + hi - lo]
        else:
            dst[first:first + hi - lo] = src[lo:hi]
        lo = hi


NORMAL_DTYPE = np.dtype([("hdr", ">u8"), ("page", "u1", PAGE_SIZE)])
ZERO_DTYPE = np.dtype([("hdr", ">u8"), ("fill", "u1")])
NORMAL_RECORD = NORMAL_DTYPE.itemsize
ZERO_RECORD = ZERO_DTYPE.itemsize


class PageVectors:
    """A run of full-page records as an iovec table: each record's header from
    the encoder's header array, its page straight from guest RAM, so the
    kernel copies pages to the socket without a copy of ours in between."""

    def __init__(self, table: np.ndarray, ram: np.ndarray) -> None:
        self.table = table
        self.ram = ram  # the addresses point into it: keep it alive

    def __bytes__(self) -> bytes:
        return b"".join(ctypes.string_at(addr, n) for addr, n in self.table.tolist())


class PageEncoder:
    """Turns page indexes into RAM page records.

    Records of one batch are grouped: full pages first, then zero pages, so that
    the receiver sees long runs of same-sized records it can load in bulk.
    The first record of a section for a block carries the block's idstr; later
    ones set CONTINUE, as QEMU does.
    """

    def __init__(self, batch_pages: int) -> None:
        self.headers = np.zeros(batch_pages, ">u8")
        self.table = iovec_table(2 * batch_pages)
        self.table[0::2, 0] = self.headers.ctypes.data + 8 * np.arange(batch_pages, dtype=np.uint64)
        self.table[0::2, 1] = 8
        self.table[1::2, 1] = PAGE_SIZE
        self.zero = np.zeros(batch_pages, ZERO_DTYPE)
        self.last_block: str | None = None

    def new_section(self) -> None:
        self.last_block = None

    def encode(self, block: str, pages: np.ndarray, block_pages: np.ndarray,
               zero: np.ndarray) -> Iterator[PageVectors | memoryview | bytes]:
        """`pages`: page indexes within `block_pages` (a (n, 4096) uint8 view of
        guest RAM); `zero`: bool mask of pages found all-zero. Yields what to
        write in order; each item stays valid only until the next is taken, as
        the encoder's arrays are reused."""
        if block_pages.strides != (PAGE_SIZE, 1):
            raise ValueError("block_pages must be a contiguous (n, PAGE_SIZE) array")
        step = len(self.headers)
        for idx, kind in ((pages[~zero], RAM_PAGE), (pages[zero], RAM_ZERO)):
            if not len(idx):
                continue
            if self.last_block != block:
                # A record with the idstr, written on its own; the rest CONTINUE.
                yield _be64.pack((int(idx[0]) << PAGE_SHIFT) | kind) + encode_idstr(block)
                yield bytes(block_pages[idx[0]]) if kind == RAM_PAGE else b"\0"
                self.last_block = block
                idx = idx[1:]
            flags = np.uint64(kind | RAM_CONTINUE)
            for lo in range(0, len(idx), step):
                chunk = idx[lo:lo + step].astype(np.uint64)
                n = len(chunk)
                if kind == RAM_PAGE:
                    self.headers[:n] = (chunk << np.uint64(PAGE_SHIFT)) | flags
                    self.table[1:2 * n:2, 0] = block_pages.ctypes.data + (chunk << np.uint64(PAGE_SHIFT))
                    yield PageVectors(self.table[:2 * n], block_pages)
                else:
                    recs = self.zero[:n]
                    recs["hdr"] = (chunk << np.uint64(PAGE_SHIFT)) | flags
                    yield memoryview(recs).cast("B")



@dataclass
class RamBlock:
    name: str
    pages: np.ndarray  # (n, PAGE_SIZE) uint8 view of the block

    @property
    def size(self) -> int:
        return self.pages.shape[0] * PAGE_SIZE


@dataclass
class RamLoadStats:
    normal: int = 0
    zero: int = 0
    xbzrle: int = 0
    sections: int = 0


def _beyond(block: RamBlock, page: int) -> StreamError:
    return StreamError(f"RAM page offset {page << PAGE_SHIFT:#x} beyond block {block.name!r} of {block.size} bytes")


class RamLoader:
    """Loads the payload of "ram" sections (version 4) into local RAM blocks."""

    def __init__(self, blocks: list[RamBlock],
                 create_block: Callable[[str, int], RamBlock] | None = None, zeroed: bool = False) -> None:
        """create_block: make a block the stream announces (tools that take any
        stream). zeroed: the blocks are known to be all zero (a fresh
        destination), so a zero page needs no write until a full page has
        landed on it."""
        self.create_block = create_block
        self.blocks = {b.name: b for b in blocks}
        self.order = [b.name for b in blocks]
        self.last: RamBlock | None = None
        self.sized = False
        self.stats = RamLoadStats()
        # Per block: True where the page is known zero. Writing zero pages over
        # zero memory would cost a full pass over RAM for nothing.
        self.known_zero = {b.name: np.ones(b.pages.shape[0], np.bool_) for b in blocks} if zeroed else None
        # Per block: True once the page arrived (whole, zero, XBZRLE or on a
        # multifd channel); a pre-copy load must end with every page here.
        self.arrived = {b.name: np.zeros(b.pages.shape[0], np.bool_) for b in blocks}
        self._steps = np.zeros(0, np.uint64)  # k << PAGE_SHIFT: the headers of a run of pages, less the first
        # multifd: called at every RAM end of section, which waits for every channel's SYNC
        self.on_eos: Callable[[], None] | None = None

    def skipper(self) -> RamSkipper:
        """What reads this loader's sections instead once the stream is refused."""
        return RamSkipper()

    def _block(self, r: BufferedReader, flags: int) -> RamBlock:
        if flags & RAM_CONTINUE:
            if self.last is None:
                raise StreamError("RAM page with CONTINUE but no previous block")
            return self.last
        name = r.idstr()
        block = self.blocks.get(name)
        if block is None:
            raise StreamError(f"unknown RAM block {name!r} (local blocks: {', '.join(self.order)})")
        self.last = block
        return block

    def load(self, r: BufferedReader, version: int) -> None:
        if version != RAM_VERSION:
            raise StreamError(f"ram section version {version} unsupported (need {RAM_VERSION})")
        self.stats.sections += 1
        while True:
            if self._bulk(r):
                continue
            word = r.be64()
            flags = word & PAGE_MASK
            addr = word & ~PAGE_MASK
            if flags & ~RAM_KNOWN_FLAGS:
                raise StreamError(f"unsupported RAM record flags {flags:#x}")
            if flags & RAM_MEM_SIZE:
                self._mem_size(r, addr)
            elif flags & RAM_EOS:
                if self.on_eos is not None:
                    self.on_eos()
                return
            elif flags & RAM_MULTIFD_FLUSH:
                continue
            elif flags & RAM_XBZRLE:
                self._xbzrle(r, flags, addr)
            elif flags & (RAM_PAGE | RAM_ZERO):
                block, index = self._target(r, flags, addr)
                if flags & RAM_PAGE:
                    block.pages[index] = np.frombuffer(r.take(PAGE_SIZE), np.uint8)
                    self._landed(block, index)
                    self.stats.normal += 1
                else:
                    fill = r.u8()
                    known = self.known_zero.get(block.name) if self.known_zero is not None else None
                    if fill or known is None or not known[index]:
                        block.pages[index] = fill
                    self._landed(block, index, data=bool(fill))
                    self.stats.zero += 1
            else:
                raise StreamError(f"RAM record without a known type: flags {flags:#x}")

    def _target(self, r: BufferedReader, flags: int, addr: int) -> tuple[RamBlock, int]:
        """The block and page a page record names, refused beyond the block."""
        if not self.sized:
            raise StreamError("RAM page before the block list (MEM_SIZE)")
        block = self._block(r, flags)
        index = addr >> PAGE_SHIFT
        if index >= block.pages.shape[0]:
            raise _beyond(block, index)
        return block, index

    def _xbzrle(self, r: BufferedReader, flags: int, addr: int) -> None:
        """A delta against the page this destination holds (from any source,
        with or without the capability here, as QEMU decodes it)."""
        if flags & (RAM_PAGE | RAM_ZERO):
            raise StreamError(f"RAM record flags {flags:#x} combine XBZRLE with another page type")
        block, index = self._target(r, flags, addr)
        encoding, length = r.u8(), r.be16()
        try:
            xbzrle.check_record_header(encoding, length)
            xbzrle.decode_into(block.pages[index], bytes(r.take(length)))
        except xbzrle.XbzrleError as exc:
            raise StreamError(f"{exc} (page {addr:#x} of block {block.name!r})") from None
        self._landed(block, index)
        self.stats.xbzrle += 1

    def landed(self, name: str, index: np.ndarray) -> None:
        """Pages of block `name` were written with data elsewhere (a multifd channel)."""
        self._landed(self.blocks[name], index)

    def _landed(self, block: RamBlock, index, data: bool = True) -> None:
        """These pages of the block arrived; `data`: with non-zero data."""
        self.arrived[block.name][index] = True
        known = self.known_zero.get(block.name) if self.known_zero is not None else None
        if known is not None and data:
            known[index] = False

    def never_arrived(self) -> tuple[str, int] | None:
        """The first block (in block list order) with pages that never
        arrived, and how many; None when every page of every block did."""
        for name in self.order:
            missing = int(np.count_nonzero(~self.arrived[name]))
            if missing:
                return name, missing
        return None

    def _mem_size(self, r: BufferedReader, total: int) -> None:
        """The block list: each block named once and checked against this
        guest's (name and size) as it is read, so a list can hold no more
        entries than the guest has blocks."""
        seen = 0
        names: set[str] = set()
        while seen < total:
            name = r.idstr()
            length = r.be64()
            if name in names:
                raise StreamError(f"RAM block {name!r} listed twice in the block list")
            if len(names) >= MAX_RAM_BLOCKS:
                raise StreamError(f"RAM block list of more than {MAX_RAM_BLOCKS} blocks")
            block = self.blocks.get(name)
            if block is None and self.create_block is not None:
                block = self.blocks[name] = self.create_block(name, length)
                self.arrived[name] = np.zeros(block.pages.shape[0], np.bool_)
                self.order.append(name)
            if block is None:
                raise StreamError(
                    f"unknown RAM block {name!r} of {length} bytes, cannot accept migration "
                    f"(local blocks: {', '.join(self.order)})")
            if length != block.size:
                raise StreamError(
                    f"RAM block {name!r} has {length} bytes in the stream but {block.size} here")
            names.add(name)
            seen += length
        if seen != total:
            raise StreamError(f"RAM block sizes add up to {seen}, MEM_SIZE says {total}")
        self.sized = True

    def _contiguous(self, hdrs: np.ndarray, first: int) -> bool:
        """The headers are `first`, then the same flags on each following page."""
        n = len(hdrs)
        if int(hdrs[n - 1]) != first + ((n - 1) << PAGE_SHIFT):
            return False
        if len(self._steps) < n:
            self._steps = np.arange(n, dtype=np.uint64) << np.uint64(PAGE_SHIFT)
        return bool(np.array_equal(hdrs, self._steps[:n] + np.uint64(first)))

    def _bulk(self, r: BufferedReader) -> bool:
        """Scatter a run of CONTINUE records of one size in one numpy step.
        Returns False when the next record is not part of such a run."""
        if self.last is None or r.available() < 8:
            if r.available() < 8:
                r.try_fill()
            if self.last is None or r.available() < 8:
                return False
        word = _be64.unpack_from(r.buf, r.start)[0]
        flags = word & PAGE_MASK
        if flags == RAM_PAGE | RAM_CONTINUE:
            dtype, size = NORMAL_DTYPE, NORMAL_RECORD
        elif flags == RAM_ZERO | RAM_CONTINUE:
            dtype, size = ZERO_DTYPE, ZERO_RECORD
        else:
            return False
        if r.available() < size:
            r.fill(size)
        n = r.available() // size
        recs = np.frombuffer(r.buf, dtype, count=n, offset=r.start)
        hdrs = recs["hdr"]
        if size == NORMAL_RECORD and self._contiguous(hdrs, word):
            # The usual case: consecutive pages, one copy and no index arrays.
            first = word >> PAGE_SHIFT
            block = self.last
            if first + n > block.pages.shape[0]:
                raise _beyond(block, first + n - 1)
            block.pages[first:first + n] = recs["page"]
            self._landed(block, slice(first, first + n))
            self.stats.normal += n
            r.skip(n * size)
            return True
        bad = np.flatnonzero((hdrs & PAGE_MASK) != flags)
        if len(bad):
            n = int(bad[0])
            recs = recs[:n]
            hdrs = hdrs[:n]
        index = hdrs >> PAGE_SHIFT
        pages = self.last.pages
        if n and int(index.max()) >= pages.shape[0]:
            raise _beyond(self.last, int(index.max()))
        if size == NORMAL_RECORD:
            copy_pages(pages, index, recs["page"], None)
            self._landed(self.last, index)
            self.stats.normal += n
        else:
            fills = recs["fill"]
            if n and not fills.any():
                self._landed(self.last, index, data=False)
                known = self.known_zero.get(self.last.name) if self.known_zero is not None else None
                if known is not None:
                    index = index[~known[index]]
                pages[index] = 0
            else:
                pages[index] = fills[:, None]
                self._landed(self.last, index)
            self.stats.zero += n
        r.skip(n * size)
        return n > 0


class RamSkipper:
    """Reads "ram" section records and drops them: for a stream that is being
    refused anyway, so that the refusal can name the first unknown section."""

    sized = True

    def load(self, r: BufferedReader, version: int) -> None:
        if version != RAM_VERSION:
            raise StreamError(f"ram section version {version} unsupported (need {RAM_VERSION})")
        while True:
            word = r.be64()
            flags = word & PAGE_MASK
            if flags & ~RAM_KNOWN_FLAGS:
                raise StreamError(f"unsupported RAM record flags {flags:#x}")
            if flags & RAM_MEM_SIZE:
                total, seen = word & ~PAGE_MASK, 0
                for _ in range(MAX_RAM_BLOCKS):
                    if seen >= total:
                        break
                    r.idstr()
                    seen += r.be64()
                else:
                    raise StreamError("RAM block list too long")
            elif flags & RAM_EOS:
                return
            elif flags & (RAM_PAGE | RAM_ZERO | RAM_XBZRLE):
                if not flags & RAM_CONTINUE:
                    r.idstr()
                if flags & RAM_XBZRLE:
                    encoding, length = r.u8(), r.be16()
                    try:
                        xbzrle.check_record_header(encoding, length)
                    except xbzrle.XbzrleError as exc:
                        raise StreamError(str(exc)) from None
                    r.take(length)
                else:
                    r.take(PAGE_SIZE if flags & RAM_PAGE else 1)

