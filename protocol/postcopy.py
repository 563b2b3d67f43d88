"""Post-copy on the wire, as QEMU 7.2 frames it: the savevm commands (source ->
destination) and the return-path messages (destination -> source).

Commands reuse savevm's framing (0x08, be16 cmd, be16 length, data). The
order is fixed: ADVISE (before pre-copy), RAM_DISCARD* (at the switch),
PACKAGED(LISTEN, device state, PING, RUN), then pages; on recovery
RECV_BITMAP per block and POSTCOPY_RESUME. `IncomingPostcopy` holds the
destination's place in that order and refuses anything out of it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from livemig.machine.ram import PAGE_SHIFT, PAGE_SIZE
from livemig.protocol import savevm
from livemig.protocol.ram import (
    NORMAL_DTYPE,
    NORMAL_RECORD,
    PAGE_MASK,
    RAM_CONTINUE,
    RAM_EOS,
    RAM_KNOWN_FLAGS,
    RAM_MEM_SIZE,
    RAM_MULTIFD_FLUSH,
    RAM_PAGE,
    RAM_VERSION,
    RAM_ZERO,
)
from livemig.protocol.returnpath import block_name, check_range
from livemig.protocol.savevm import StreamError

CMD_ADVISE = 3
CMD_LISTEN = 4
CMD_RUN = 5
CMD_RAM_DISCARD = 6
CMD_PACKAGED = 7
CMD_RESUME = 9
CMD_RECV_BITMAP = 10


DISCARD_VERSION = 0
MAX_DISCARD_RANGES = 12  # per RAM_DISCARD command, as QEMU sends them
MAX_PACKAGED = 1 << 24  # QEMU's limit on a PACKAGED blob

_be64 = struct.Struct(">Q")
_be32 = struct.Struct(">I")
_range = struct.Struct(">QQ")


# --------------------------------------------------------------------------- commands: writing


def advise(pagesize_summary: int = PAGE_SIZE, target_page: int = PAGE_SIZE) -> bytes:
    """ADVISE: the OR of every block's page size, and the target page size."""
    return savevm.command(CMD_ADVISE, _be64.pack(pagesize_summary) + _be64.pack(target_page))


def listen() -> bytes:
    return savevm.command(CMD_LISTEN)


def run() -> bytes:
    return savevm.command(CMD_RUN)


def resume() -> bytes:
    return savevm.command(CMD_RESUME)


def recv_bitmap(block: str) -> bytes:
    """The source asks for the destination's received bitmap of one block (recovery)."""
    return savevm.command(CMD_RECV_BITMAP, block_name(block))


def packaged(blob: bytes) -> bytes:
    """PACKAGED: be32 length, then the blob (LISTEN, device state, PING, RUN) inline."""
    if len(blob) > MAX_PACKAGED:
        raise ValueError(f"PACKAGED blob of {len(blob)} bytes exceeds {MAX_PACKAGED}")
    return savevm.command(CMD_PACKAGED, _be32.pack(len(blob))) + blob


def page_runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Runs of True in a per-page bool array, as (first page, count)."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], pages.astype(np.bool_), [False])).astype(np.int8)))
    return [(int(a), int(b - a)) for a, b in zip(edges[0::2], edges[1::2], strict=True)]


def ram_discard(block: str, ranges: Iterable[tuple[int, int]]) -> list[bytes]:
    """RAM_DISCARD commands for byte ranges (start, length) of one block, at
    most MAX_DISCARD_RANGES per command: u8 version 0, u8 length, name, NUL,
    then be64 start/length pairs."""
    head = bytes([DISCARD_VERSION]) + block_name(block) + b"\0"
    ranges = list(ranges)
    return [savevm.command(CMD_RAM_DISCARD, head + b"".join(_range.pack(s, n) for s, n in
                                                             ranges[i:i + MAX_DISCARD_RANGES]))
            for i in range(0, len(ranges), MAX_DISCARD_RANGES)]


def discard_pages(block: str, pages: np.ndarray) -> list[bytes]:
    """RAM_DISCARD commands for the pages set in a per-page bool array of one block."""
    return ram_discard(block, [(a * PAGE_SIZE, n * PAGE_SIZE) for a, n in page_runs(pages)])


# --------------------------------------------------------------------------- commands: reading


@dataclass(frozen=True)
class Advise:
    pagesize_summary: int
    target_page: int


@dataclass(frozen=True)
class Discard:
    block: str
    ranges: list[tuple[int, int]]  # (start, length) in bytes


class State(enum.Enum):
    """The destination's place in the post-copy order (QEMU's PostcopyState)."""

    NONE = "none"
    ADVISE = "advise"
    DISCARD = "discard"
    LISTENING = "listening"
    RUNNING = "running"


def parse_advise(data: bytes, enabled: bool = True) -> Advise | None:
    """None: the source advises no RAM post-copy (an empty ADVISE)."""
    if not data:
        if enabled:
            raise StreamError("postcopy-ram is enabled here but the source's POSTCOPY_ADVISE is empty")
        return None
    if len(data) != 16:
        raise StreamError(f"POSTCOPY_ADVISE with {len(data)} bytes of data (expected 16)")
    if not enabled:
        raise StreamError("the source advises post-copy but capability postcopy-ram is not set here")
    summary, target = struct.unpack(">QQ", data)
    if target != PAGE_SIZE:
        raise StreamError(f"POSTCOPY_ADVISE: source target pages are {target} bytes, here {PAGE_SIZE}")
    if summary != PAGE_SIZE:
        raise StreamError(f"POSTCOPY_ADVISE: source RAM page sizes {summary:#x}, here {PAGE_SIZE:#x} "
                          "(huge pages are not supported)")
    return Advise(summary, target)


def parse_discard(data: bytes) -> Discard:
    if len(data) < 4 + _range.size:
        raise StreamError(f"POSTCOPY_RAM_DISCARD with {len(data)} bytes of data: too short for one range")
    if data[0] != DISCARD_VERSION:
        raise StreamError(f"POSTCOPY_RAM_DISCARD version {data[0]} (expected {DISCARD_VERSION})")
    n = data[1]
    if 2 + n + 1 > len(data) or data[2 + n] != 0:
        raise StreamError("POSTCOPY_RAM_DISCARD: block name not NUL-terminated")
    try:
        block = data[2:2 + n].decode()
    except UnicodeDecodeError:
        raise StreamError(f"POSTCOPY_RAM_DISCARD: block name is not UTF-8: {data[2:2 + n]!r}") from None
    body = data[3 + n:]
    if not body or len(body) % _range.size:
        raise StreamError(f"POSTCOPY_RAM_DISCARD: {len(body)} bytes of ranges is not whole (start, length) pairs")
    return Discard(block, list(_range.iter_unpack(body)))


def parse_recv_bitmap(data: bytes) -> str:
    if not data or len(data) != data[0] + 1:
        raise StreamError(f"RECV_BITMAP command of {len(data)} bytes does not hold one block name")
    try:
        return data[1:].decode()
    except UnicodeDecodeError:
        raise StreamError(f"RECV_BITMAP: block name is not UTF-8: {data[1:]!r}") from None


def parse_packaged(data: bytes) -> int:
    if len(data) != 4:
        raise StreamError(f"PACKAGED command with {len(data)} bytes of data (expected 4)")
    length = _be32.unpack(data)[0]
    if length > MAX_PACKAGED:
        raise StreamError(f"PACKAGED blob of {length} bytes exceeds the {MAX_PACKAGED}-byte limit")
    return length


class IncomingPostcopy:
    """Validates post-copy commands on the destination in the order QEMU sends them.

    `blocks`: RAM block name -> size in bytes. Each `on_*` returns the parsed
    record or raises StreamError (malformed, out of order, beyond RAM).
    """

    def __init__(self, blocks: dict[str, int], enabled: bool = True) -> None:
        self.blocks = blocks
        self.enabled = enabled  # capability postcopy-ram on this side
        self.state = State.NONE
        self.in_package = 0  # bytes of the PACKAGED blob still to come (0: not in one)

    def _expect(self, name: str, *allowed: State) -> None:
        if self.state not in allowed:
            want = " or ".join(s.value for s in allowed)
            raise StreamError(f"{name} out of order: post-copy state is {self.state.value}, needs {want}")

    def on_advise(self, data: bytes) -> Advise | None:
        self._expect("POSTCOPY_ADVISE", State.NONE)
        advise_ = parse_advise(data, self.enabled)
        if advise_ is not None:
            self.state = State.ADVISE
        return advise_

    def on_discard(self, data: bytes) -> Discard:
        self._expect("POSTCOPY_RAM_DISCARD", State.ADVISE, State.DISCARD)
        d = parse_discard(data)
        for start, length in d.ranges:
            check_range(self.blocks, d.block, start, length, "POSTCOPY_RAM_DISCARD")
        self.state = State.DISCARD
        return d

    def on_packaged(self, data: bytes) -> int:
        self._expect("PACKAGED", State.ADVISE, State.DISCARD)
        if self.in_package:
            raise StreamError("PACKAGED inside a PACKAGED blob")
        self.in_package = parse_packaged(data)
        if not self.in_package:
            raise StreamError("empty PACKAGED blob")
        return self.in_package

    def on_listen(self, data: bytes) -> None:
        self._expect("POSTCOPY_LISTEN", State.ADVISE, State.DISCARD)
        if data:
            raise StreamError(f"POSTCOPY_LISTEN with {len(data)} bytes of data")
        self.state = State.LISTENING

    def on_run(self, data: bytes) -> None:
        self._expect("POSTCOPY_RUN", State.LISTENING)
        if data:
            raise StreamError(f"POSTCOPY_RUN with {len(data)} bytes of data")
        self.state = State.RUNNING

    def on_recv_bitmap(self, data: bytes) -> str:
        self._expect("RECV_BITMAP", State.RUNNING)
        block = parse_recv_bitmap(data)
        if block not in self.blocks:
            raise StreamError(f"RECV_BITMAP for unknown RAM block {block!r}")
        return block

    def on_resume(self, data: bytes) -> None:
        self._expect("POSTCOPY_RESUME", State.RUNNING)
        if data:
            raise StreamError(f"POSTCOPY_RESUME with {len(data)} bytes of data")

    def end_package(self, consumed: int) -> None:
        """The blob was read up to RUN: it must end exactly there."""
        if consumed != self.in_package:
            raise StreamError(f"PACKAGED blob of {self.in_package} bytes ended after {consumed} (RUN must end it)")
        self.in_package = 0

    def handler(self, cmd: int) -> Callable[[bytes], object] | None:
        return {CMD_ADVISE: self.on_advise, CMD_RAM_DISCARD: self.on_discard, CMD_PACKAGED: self.on_packaged,
                CMD_LISTEN: self.on_listen, CMD_RUN: self.on_run, CMD_RECV_BITMAP: self.on_recv_bitmap,
                CMD_RESUME: self.on_resume}.get(cmd)


# --------------------------------------------------------------------------- pages while the guest runs here

Place = Callable[[str, np.ndarray, np.ndarray], None]
"""(block, page indexes, (n, PAGE_SIZE) rows): put these pages in place atomically."""
PlaceZero = Callable[[str, np.ndarray], None]


class PostcopyRamLoader:
    """Loads "ram" section records once the guest runs on the destination:
    every page goes to `place` (atomic placement, never a plain write into
    RAM a vCPU may be reading). Runs of CONTINUE full pages are handed over in
    bulk, straight from the reader's buffer."""

    sized = True

    def __init__(self, blocks: dict[str, int], place: Place, place_zero: PlaceZero) -> None:
        self.pages = blocks  # block name -> pages
        self.place = place
        self.place_zero = place_zero
        self.last: str | None = None
        self.normal = 0
        self.zero = 0

    def _index(self, block: str, index: int) -> int:
        if index >= self.pages[block]:
            raise StreamError(f"RAM page offset {index * PAGE_SIZE:#x} beyond block {block!r} "
                              f"of {self.pages[block] * PAGE_SIZE} bytes")
        return index

    def load(self, r: savevm.BufferedReader, version: int) -> None:
        if version != RAM_VERSION:
            raise StreamError(f"ram section version {version} unsupported (need {RAM_VERSION})")
        while True:
            if self._bulk(r):
                continue
            word = r.be64()
            flags = word & PAGE_MASK
            if flags & ~RAM_KNOWN_FLAGS:
                raise StreamError(f"unsupported RAM record flags {flags:#x}")
            if flags & RAM_EOS:
                return
            if flags & RAM_MULTIFD_FLUSH:
                continue
            if flags & RAM_MEM_SIZE:
                raise StreamError("RAM block list (MEM_SIZE) after post-copy started")
            if not flags & (RAM_PAGE | RAM_ZERO):
                raise StreamError(f"RAM record with flags {flags:#x} carries nothing")
            if flags & RAM_CONTINUE:
                if self.last is None:
                    raise StreamError("RAM page with CONTINUE but no previous block")
            else:
                name = r.idstr()
                if name not in self.pages:
                    raise StreamError(f"unknown RAM block {name!r}")
                self.last = name
            index = np.array([self._index(self.last, word >> PAGE_SHIFT)], np.int64)
            if flags & RAM_PAGE:
                self.place(self.last, index, np.frombuffer(r.take(PAGE_SIZE), np.uint8).reshape(1, PAGE_SIZE))
                self.normal += 1
            else:
                fill = r.u8()
                if fill:
                    self.place(self.last, index, np.full((1, PAGE_SIZE), fill, np.uint8))
                else:
                    self.place_zero(self.last, index)
                self.zero += 1

    def _bulk(self, r: savevm.BufferedReader) -> bool:
        """A run of CONTINUE full-page records in one call; False if the next record is not one."""
        if self.last is None:
            return False
        if r.available() < 8:  # every record has 8 bytes or more: this read never waits for too much
            r.try_fill()
            if r.available() < 8:
                return False
        flags = struct.unpack_from(">Q", r.buf, r.start)[0] & PAGE_MASK
        if flags != RAM_PAGE | RAM_CONTINUE:
            return False
        r.fill(NORMAL_RECORD)  # the record it announces
        n = r.available() // NORMAL_RECORD
        recs = np.frombuffer(r.buf, NORMAL_DTYPE, count=n, offset=r.start)
        bad = np.flatnonzero((recs["hdr"] & np.uint64(PAGE_MASK)) != flags)
        if len(bad):
            recs = recs[:int(bad[0])]
        index = (recs["hdr"] >> np.uint64(PAGE_SHIFT)).astype(np.int64)
        if int(index.max()) >= self.pages[self.last]:
            self._index(self.last, int(index.max()))
        self.place(self.last, index, recs["page"])
        self.normal += len(recs)
        r.skip(len(recs) * NORMAL_RECORD)
        return True
