"""QEMU's savevm stream, version 3: the wire between hosts.

Everything is big-endian. See docs/stream-format.md for the layout. This module
knows bytes and records only; what a section means to a guest is decided by the
handlers that the receiving actor registers with `StreamLoader`.
"""

from __future__ import annotations

import ctypes
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from livemig.protocol.transport import iovec_table

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
VERSION_COMPAT = 2

EOF = 0x00
SECTION_START = 0x01
SECTION_PART = 0x02
SECTION_END = 0x03
SECTION_FULL = 0x04
SUBSECTION = 0x05
VMDESCRIPTION = 0x06
CONFIGURATION = 0x07
COMMAND = 0x08
SECTION_FOOTER = 0x7E

SECTION_NAMES = {
    EOF: "EOF", SECTION_START: "START", SECTION_PART: "PART", SECTION_END: "END",
    SECTION_FULL: "FULL", SUBSECTION: "SUBSECTION", VMDESCRIPTION: "VMDESCRIPTION",
    CONFIGURATION: "CONFIGURATION", COMMAND: "COMMAND", SECTION_FOOTER: "FOOTER",
}

# COMMAND sub-commands (be16) that livemig sends or understands.
CMD_OPEN_RETURN_PATH = 1
CMD_PING = 2
# The rest of QEMU's numbering, so that a refusal can say what was sent.
COMMAND_NAMES = {1: "OPEN_RETURN_PATH", 2: "PING", 3: "POSTCOPY_ADVISE", 4: "POSTCOPY_LISTEN",
                 5: "POSTCOPY_RUN", 6: "POSTCOPY_RAM_DISCARD", 7: "PACKAGED", 8: "ENABLE_COLO",
                 9: "POSTCOPY_RESUME", 10: "RECV_BITMAP", 11: "SWITCHOVER_START"}

# Return-path messages (destination -> source), be16 type + be16 length + data.
RP_SHUT = 1
RP_PONG = 2

# RAM section ("ram", instance 0, version 4) record flags, in the low bits of a be64.
RAM_VERSION = 4
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
RAM_KNOWN_FLAGS = RAM_ZERO | RAM_MEM_SIZE | RAM_PAGE | RAM_EOS | RAM_CONTINUE | RAM_MULTIFD_FLUSH

PAGE_SIZE = 4096
PAGE_SHIFT = 12
PAGE_MASK = PAGE_SIZE - 1

GLOBALSTATE_RUNSTATE_LEN = 100
MAX_VMDESC = 16 << 20
MAX_MACHINE_NAME = 256

_be32 = struct.Struct(">I")
_be64 = struct.Struct(">Q")


class StreamError(ValueError):
    """A stream that is malformed or that this destination cannot accept."""


def _idstr(name: str) -> bytes:
    raw = name.encode()
    if not 0 < len(raw) < 256:
        raise ValueError(f"id string {name!r} must be 1..255 bytes")
    return bytes([len(raw)]) + raw


# --------------------------------------------------------------------------- writing


def header() -> bytes:
    return _be32.pack(MAGIC) + _be32.pack(VERSION)


def configuration(machine: str) -> bytes:
    raw = machine.encode()
    return bytes([CONFIGURATION]) + _be32.pack(len(raw)) + raw


def section_start(kind: int, section_id: int, idstr: str, instance_id: int, version: int) -> bytes:
    return (bytes([kind]) + _be32.pack(section_id) + _idstr(idstr)
            + _be32.pack(instance_id) + _be32.pack(version))


def section_part(kind: int, section_id: int) -> bytes:
    return bytes([kind]) + _be32.pack(section_id)


def footer(section_id: int) -> bytes:
    return bytes([SECTION_FOOTER]) + _be32.pack(section_id)


def command(cmd: int, data: bytes = b"") -> bytes:
    return bytes([COMMAND]) + struct.pack(">HH", cmd, len(data)) + data


def eof() -> bytes:
    return bytes([EOF])


def rp_message(mtype: int, data: bytes = b"") -> bytes:
    """A return-path message (destination -> source)."""
    return struct.pack(">HH", mtype, len(data)) + data


def vmdescription(desc: dict) -> bytes:
    """The JSON trailer. Padded so that no byte of its be32 length is '{':
    analyze-migration.py finds the JSON by searching for that byte."""
    text = json.dumps(desc, separators=(",", ":")).encode()
    while b"{" in _be32.pack(len(text)):
        text += b" "
    return bytes([VMDESCRIPTION]) + _be32.pack(len(text)) + text


def ram_mem_size(blocks: list[tuple[str, int]]) -> bytes:
    total = sum(size for _, size in blocks)
    out = [_be64.pack(total | RAM_MEM_SIZE)]
    for name, size in blocks:
        out.append(_idstr(name) + _be64.pack(size))
    return b"".join(out)


def ram_eos() -> bytes:
    return _be64.pack(RAM_EOS)


def globalstate(runstate: str) -> bytes:
    raw = runstate.encode()
    return _be32.pack(len(raw) + 1) + raw.ljust(GLOBALSTATE_RUNSTATE_LEN, b"\0")


GLOBALSTATE_DESC = {
    "name": "globalstate", "instance_id": 0, "vmsd_name": "globalstate", "version": 1,
    "fields": [{"name": "size", "type": "uint32", "size": 4},
               {"name": "runstate", "type": "buffer", "size": GLOBALSTATE_RUNSTATE_LEN}],
}

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


_NORMAL = np.dtype([("hdr", ">u8"), ("page", "u1", PAGE_SIZE)])
_ZERO = np.dtype([("hdr", ">u8"), ("fill", "u1")])
NORMAL_RECORD = _NORMAL.itemsize
ZERO_RECORD = _ZERO.itemsize


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
        self.zero = np.zeros(batch_pages, _ZERO)
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
                yield _be64.pack((int(idx[0]) << PAGE_SHIFT) | kind) + _idstr(block)
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


# --------------------------------------------------------------------------- reading


class BufferedReader:
    """A byte reader over `read_into(memoryview) -> int` with a large buffer,
    so that runs of page records can be decoded in bulk."""

    def __init__(self, read_into: Callable[[memoryview], int], capacity: int = 8 << 20) -> None:
        self._read_into = read_into
        self.buf = bytearray(capacity)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        self.consumed = 0  # bytes handed out so far

    def available(self) -> int:
        return self.end - self.start

    def fill(self, need: int) -> None:
        """Make at least `need` bytes available, or raise StreamError at end of input."""
        if need > len(self.buf):
            raise StreamError(f"record of {need} bytes exceeds the reader's buffer")
        while self.end - self.start < need:
            if self.start and len(self.buf) - self.start < need + (len(self.buf) >> 2):
                n = self.end - self.start
                self.buf[:n] = bytes(self.view[self.start:self.end])
                self.start, self.end = 0, n
            got = self._read_into(self.view[self.end:])
            if not got:
                raise StreamError(
                    f"stream ended early: wanted {need} more bytes at offset "
                    f"{self.consumed}, got {self.end - self.start}")
            self.end += got

    def try_fill(self) -> bool:
        """One read if there is room; False at end of input."""
        if self.start and self.start == self.end:
            self.start = self.end = 0
        if self.end == len(self.buf):
            return True
        got = self._read_into(self.view[self.end:])
        self.end += got
        return bool(got)

    def take(self, n: int) -> memoryview:
        self.fill(n)
        out = self.view[self.start:self.start + n]
        self.start += n
        self.consumed += n
        return out

    def skip(self, n: int) -> None:
        self.start += n
        self.consumed += n

    def u8(self) -> int:
        self.fill(1)
        b = self.buf[self.start]
        self.start += 1
        self.consumed += 1
        return b

    def peek_u8(self) -> int:
        self.fill(1)
        return self.buf[self.start]

    def be16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def be32(self) -> int:
        return _be32.unpack(self.take(4))[0]

    def be64(self) -> int:
        return _be64.unpack(self.take(8))[0]

    def idstr(self) -> str:
        n = self.u8()
        raw = bytes(self.take(n))
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise StreamError(f"id string is not UTF-8: {raw!r}") from None


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
        self._steps = np.zeros(0, np.uint64)  # k << PAGE_SHIFT: the headers of a run of pages, less the first

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
                return
            elif flags & RAM_MULTIFD_FLUSH:
                continue
            elif flags & (RAM_PAGE | RAM_ZERO):
                if not self.sized:
                    raise StreamError("RAM page before the block list (MEM_SIZE)")
                block = self._block(r, flags)
                index = addr >> PAGE_SHIFT
                if index >= block.pages.shape[0]:
                    raise _beyond(block, index)
                if flags & RAM_PAGE:
                    block.pages[index] = np.frombuffer(r.take(PAGE_SIZE), np.uint8)
                    self._landed(block, index)
                    self.stats.normal += 1
                else:
                    fill = r.u8()
                    known = self.known_zero.get(block.name) if self.known_zero is not None else None
                    if fill or known is None or not known[index]:
                        block.pages[index] = fill
                        if fill:
                            self._landed(block, index)
                    self.stats.zero += 1
            else:
                raise StreamError(f"RAM record without a known type: flags {flags:#x}")

    def _landed(self, block: RamBlock, index) -> None:
        """Non-zero data was written to these pages of the block."""
        known = self.known_zero.get(block.name) if self.known_zero is not None else None
        if known is not None:
            known[index] = False

    def _mem_size(self, r: BufferedReader, total: int) -> None:
        seen = 0
        names = []
        while seen < total:
            name = r.idstr()
            length = r.be64()
            block = self.blocks.get(name)
            if block is None and self.create_block is not None:
                block = self.blocks[name] = self.create_block(name, length)
                self.order.append(name)
            if block is None:
                raise StreamError(
                    f"unknown RAM block {name!r} of {length} bytes, cannot accept migration "
                    f"(local blocks: {', '.join(self.order)})")
            if length != block.size:
                raise StreamError(
                    f"RAM block {name!r} has {length} bytes in the stream but {block.size} here")
            names.append(name)
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
            dtype, size = _NORMAL, NORMAL_RECORD
        elif flags == RAM_ZERO | RAM_CONTINUE:
            dtype, size = _ZERO, ZERO_RECORD
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
            if self.known_zero is not None:
                self.known_zero[block.name][first:first + n] = False
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
                for _ in range(1024):
                    if seen >= total:
                        break
                    r.idstr()
                    seen += r.be64()
                else:
                    raise StreamError("RAM block list too long")
            elif flags & RAM_EOS:
                return
            elif flags & (RAM_PAGE | RAM_ZERO):
                if not flags & RAM_CONTINUE:
                    r.idstr()
                r.take(PAGE_SIZE if flags & RAM_PAGE else 1)


class LiveLoader(Protocol):
    """The loader of an iterative section (START, PARTs, END): ram, block."""

    def load(self, r: BufferedReader, version: int) -> None: ...


DeviceLoader = Callable[[BufferedReader, int, int], None]
"""A FULL-section loader: (reader, instance_id, version_id) -> None."""


@dataclass
class LoadResult:
    machine: str | None = None
    configuration: dict = field(default_factory=dict)
    sections: list[tuple[str, int, int]] = field(default_factory=list)  # (idstr, instance, version)
    return_path: bool = False
    vmdesc: dict | None = None
    bytes: int = 0


class StreamLoader:
    """Reads a whole stream, dispatching each section to its loader.

    Raises StreamError for anything malformed or unknown; the caller must not
    run the guest unless `load()` returned normally (EOF was reached).
    """

    def __init__(self, ram: RamLoader | None, devices: dict[str, DeviceLoader],
                 machine: str | None = None,
                 on_return_path: Callable[[], None] | None = None,
                 live: dict[str, LiveLoader] | None = None,
                 on_ping: Callable[[int], None] | None = None) -> None:
        self.ram = ram
        self.devices = devices
        self.live: dict[str, LiveLoader] = dict(live or {})
        if ram is not None:
            self.live["ram"] = ram
        self.machine = machine
        self.on_return_path = on_return_path
        self.on_ping = on_ping
        self.return_path = False  # the source asked for answers on the return path
        self.open_sections: dict[int, tuple[str, int]] = {}  # section id -> (idstr, version)
        self.refusal: str | None = None  # the stream is refused; reading on only to say more

    def load(self, r: BufferedReader, read_trailer: bool = True) -> LoadResult:
        result = LoadResult()
        magic = r.be32()
        if magic != MAGIC:
            raise StreamError(f"not a savevm stream: magic {magic:#010x}, expected {MAGIC:#010x} ('QEVM')")
        version = r.be32()
        if version == VERSION_COMPAT:
            raise StreamError("savevm stream version 2 is obsolete and not supported")
        if version != VERSION:
            raise StreamError(f"unsupported savevm stream version {version} (need {VERSION})")
        while True:
            kind = r.u8()
            if kind == EOF:
                break
            if kind == CONFIGURATION:
                result.machine = self._configuration(r, result)
            elif kind == COMMAND:
                self._command(r, result)
            elif kind in (SECTION_START, SECTION_FULL):
                sid = r.be32()
                idstr = r.idstr()
                instance = r.be32()
                ver = r.be32()
                result.sections.append((idstr, instance, ver))
                if idstr in self.live and instance == 0:
                    if kind == SECTION_FULL:
                        raise StreamError(f"{idstr} section sent as FULL")
                    self.open_sections[sid] = (idstr, ver)
                    self.live[idstr].load(r, ver)
                elif kind == SECTION_FULL and idstr in self.devices:
                    self.devices[idstr](r, instance, ver)
                    if r.peek_u8() == SUBSECTION:
                        # Optional device state the loader does not know (e.g. QEMU's
                        # timer/icount): refuse rather than drop it.
                        r.u8()
                        raise StreamError(f"section {idstr!r} carries subsection {r.idstr()!r}, "
                                          "which this machine cannot load")
                else:
                    machine = f" {self.machine!r}" if self.machine else ""
                    unknown = (f"unknown savevm section or instance {idstr!r} {instance} "
                               f"(version {ver}): this{machine} machine cannot load it")
                    if self.refusal:
                        raise StreamError(f"{self.refusal}; the first section it lacks: {unknown}")
                    raise StreamError(unknown)
                self._footer(r, sid)
            elif kind in (SECTION_PART, SECTION_END):
                sid = r.be32()
                opened = self.open_sections.get(sid)
                if opened is None:
                    raise StreamError(f"{SECTION_NAMES[kind]} for unknown section id {sid}")
                self.live[opened[0]].load(r, opened[1])
                if kind == SECTION_END:
                    del self.open_sections[sid]
                self._footer(r, sid)
            else:
                raise StreamError(f"unknown section type {kind:#04x} at offset {r.consumed - 1}")
        if self.refusal:
            raise StreamError(self.refusal)
        if self.ram is not None and not self.ram.sized:
            raise StreamError("stream ended without a RAM block list")
        if read_trailer:
            result.vmdesc = self._trailer(r)
        result.bytes = r.consumed
        return result

    def _configuration(self, r: BufferedReader, result: LoadResult) -> str:
        config = read_configuration(r)
        result.configuration = config
        name = config["machine"]
        if self.machine is not None and name != self.machine:
            # Refused; but read on (RAM discarded, nothing started) to name the
            # first section this machine does not have, which says more.
            self.refusal = (f"configuration section: machine type received is {name!r} and local is "
                            f"{self.machine!r}; a {self.machine!r} guest cannot load that machine's sections")
            if "ram" in self.live:
                self.live["ram"] = RamSkipper()
        return name

    def _command(self, r: BufferedReader, result: LoadResult) -> None:
        cmd = r.be16()
        length = r.be16()
        data = bytes(r.take(length))
        if cmd == CMD_OPEN_RETURN_PATH:
            result.return_path = self.return_path = True
            if self.on_return_path:
                self.on_return_path()
        elif cmd == CMD_PING:
            # QEMU pings right after opening the return path and expects a PONG with the value.
            if length != 4:
                raise StreamError(f"PING command with {length} bytes of data (expected 4)")
            if not self.return_path:
                raise StreamError("PING command received with no return path open")
            if self.on_ping:
                self.on_ping(_be32.unpack(data)[0])
        else:
            name = COMMAND_NAMES.get(cmd, "unknown")
            raise StreamError(f"unsupported stream command {cmd} ({name})")

    def _footer(self, r: BufferedReader, sid: int) -> None:
        if r.peek_u8() != SECTION_FOOTER:
            raise StreamError(f"missing footer for section {sid} at offset {r.consumed}")
        r.u8()
        got = r.be32()
        if got != sid:
            raise StreamError(f"footer for section {got} where {sid} was expected")

    def _trailer(self, r: BufferedReader) -> dict | None:
        try:
            kind = r.u8()
        except StreamError:
            return None  # no trailer: QEMU does not need one either
        if kind != VMDESCRIPTION:
            raise StreamError(f"unexpected byte {kind:#04x} after EOF")
        n = r.be32()
        if n > MAX_VMDESC:
            raise StreamError(f"vmdesc of {n} bytes is too large")
        try:
            return json.loads(bytes(r.take(n)))
        except ValueError as exc:
            raise StreamError(f"vmdesc is not JSON: {exc}") from None


# Subsections of QEMU's configuration section (vmstate "configuration").
CONFIG_PAGE_BITS = "configuration/target-page-bits"
CONFIG_CAPABILITIES = "configuration/capabilities"
CONFIG_UUID = "configuration/uuid"
# Capabilities that change how RAM travels: a stream made with them cannot be read here.
RAM_FORMAT_CAPABILITIES = ("x-ignore-shared", "mapped-ram")


def read_configuration(r: BufferedReader) -> dict:
    """The body of a CONFIGURATION record: machine name, then the optional
    subsections QEMU sends when they matter (page size, capabilities, UUID)."""
    n = r.be32()
    if n > MAX_MACHINE_NAME:
        raise StreamError(f"machine name of {n} bytes in the configuration section")
    config: dict = {"machine": bytes(r.take(n)).decode(errors="replace")}
    while r.peek_u8() == SUBSECTION:
        r.u8()
        name = r.idstr()
        r.be32()  # subsection version: every known one is 1
        if name == CONFIG_PAGE_BITS:
            bits = r.be32()
            if bits != PAGE_SHIFT:
                raise StreamError(f"stream uses target pages of {1 << bits} bytes; livemig needs {PAGE_SIZE}")
            config["target-page-bits"] = bits
        elif name == CONFIG_CAPABILITIES:
            caps = [r.idstr() for _ in range(r.be32())]
            refused = [c for c in caps if c in RAM_FORMAT_CAPABILITIES]
            if refused:
                raise StreamError(f"stream was made with capability {refused[0]!r}, which changes the RAM "
                                  "format; livemig cannot read it")
            config["capabilities"] = caps
        elif name == CONFIG_UUID:
            config["uuid"] = bytes(r.take(16)).hex()  # livemig guests have no UUID to check it against
        else:
            raise StreamError(f"unsupported configuration subsection {name!r}")
    return config


def read_globalstate(r: BufferedReader, version: int) -> str:
    if version != 1:
        raise StreamError(f"globalstate version {version} unsupported")
    size = r.be32()
    raw = bytes(r.take(GLOBALSTATE_RUNSTATE_LEN))
    if size > GLOBALSTATE_RUNSTATE_LEN:
        raise StreamError(f"globalstate run state of {size} bytes")
    return raw[:size].split(b"\0", 1)[0].decode(errors="replace")
