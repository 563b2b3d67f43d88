"""Multifd channels as QEMU 7.2 frames them (migration/multifd.c, multifd.h,
multifd-zlib.c, multifd-zstd.c).

Each extra channel opens with a MultiFDInit_t (64 bytes) and then carries
packets: a fixed 1344-byte MultiFDPacket_t header (320 bytes plus room for
128 page offsets), then the pages it names, raw (normal x 4096 bytes) or as
next_packet_size bytes of one zlib or zstd stream that runs for the whole
migration and is flushed at the end of every packet. Everything is
big-endian. A packet with the SYNC flag answers the main stream's RAM end of
section: the destination waits for one SYNC per channel at every EOS.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import zstandard

from livemig.machine.ram import PAGE_SIZE
from livemig.protocol.transport import iovec_table

MAGIC = 0x11223344
VERSION = 1
FLAG_SYNC = 1 << 0
FLAG_COMPRESSION_MASK = 7 << 1
FLAG_NOCOMP = 0 << 1
FLAG_ZLIB = 1 << 1
FLAG_ZSTD = 2 << 1
COMPRESSION_FLAGS = {"none": FLAG_NOCOMP, "zlib": FLAG_ZLIB, "zstd": FLAG_ZSTD}
PACKET_PAGES = (512 << 10) // PAGE_SIZE  # 128: MULTIFD_PACKET_SIZE over the target page size
RAMBLOCK_NAME = 256
INIT_SIZE = 64
HEADER_SIZE = 320  # the packet header before its offsets
PACKET_SIZE = HEADER_SIZE + 8 * PACKET_PAGES  # what the receiver reads, whatever normal is
MAX_COMPRESSED = 2 * PACKET_PAGES * PAGE_SIZE  # QEMU's receive buffer for one packet
DEFAULT_CHANNELS = 2
DEFAULT_ZLIB_LEVEL = 1
DEFAULT_ZSTD_LEVEL = 1
NO_UUID = bytes(16)  # qemu_uuid without -uuid

_init = struct.Struct(">II16sB7x32x")
_header = struct.Struct(f">IIIIIIQ32x{RAMBLOCK_NAME}s")
assert _init.size == INIT_SIZE and _header.size == HEADER_SIZE


class MultifdError(ValueError):
    """A malformed multifd init packet, packet or compressed payload."""


# --------------------------------------------------------------------------- init packet


def init_packet(channel: int, uuid: bytes = NO_UUID) -> bytes:
    return _init.pack(MAGIC, VERSION, uuid, channel)


def parse_init(data: bytes, channels: int, uuid: bytes = NO_UUID) -> int:
    """The channel id of a MultiFDInit_t, checked as QEMU checks it (except
    that an id must be below the channel count: QEMU's `id > channels`
    would index past its array)."""
    if len(data) != INIT_SIZE:
        raise MultifdError(f"multifd: init packet of {len(data)} bytes (expected {INIT_SIZE})")
    magic, version, got_uuid, channel = _init.unpack(data)
    if magic != MAGIC:
        raise MultifdError(f"multifd: received packet magic {magic:#x} expected {MAGIC:#x}")
    if version != VERSION:
        raise MultifdError(f"multifd: received packet version {version} expected {VERSION}")
    if got_uuid != uuid:
        raise MultifdError(f"multifd: received uuid '{_uuid_text(got_uuid)}' and expected uuid "
                           f"'{_uuid_text(uuid)}' for channel {channel}")
    if channel >= channels:
        raise MultifdError(f"multifd: received channel id {channel}, but multifd-channels is {channels}")
    return channel


def _uuid_text(raw: bytes) -> str:
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --------------------------------------------------------------------------- packets


@dataclass
class Packet:
    flags: int
    pages_alloc: int
    normal: int
    next_packet_size: int  # meaningful only when normal > 0
    packet_num: int
    ramblock: str
    offsets: np.ndarray  # byte offsets in the block, `normal` of them (int64)

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)

    @property
    def compression(self) -> int:
        return self.flags & FLAG_COMPRESSION_MASK


def packet_header(flags: int, ramblock: str, offsets: np.ndarray, next_packet_size: int,
                  packet_num: int) -> bytes:
    """The 1344-byte header of a packet carrying the pages at `offsets`
    (bytes into the block; empty for a bare SYNC)."""
    n = len(offsets)
    if n > PACKET_PAGES:
        raise ValueError(f"a multifd packet holds at most {PACKET_PAGES} pages, not {n}")
    name = ramblock.encode()
    if len(name) >= RAMBLOCK_NAME:
        raise ValueError(f"RAM block name {ramblock!r} is too long for a multifd packet")
    slots = np.zeros(PACKET_PAGES, ">u8")
    slots[:n] = offsets
    return _header.pack(MAGIC, VERSION, flags, PACKET_PAGES, n, next_packet_size, packet_num,
                        name) + slots.tobytes()


def parse_packet(data: bytes | memoryview, block_sizes: Mapping[str, int]) -> Packet:
    """Decode and check one PACKET_SIZE header against the destination's RAM
    blocks (name -> bytes). Refuses what QEMU refuses, and offsets that are
    not page aligned (QEMU would copy a page to them; no sender makes one)."""
    if len(data) != PACKET_SIZE:
        raise MultifdError(f"multifd: packet header of {len(data)} bytes (expected {PACKET_SIZE})")
    magic, version, flags, pages_alloc, normal, next_size, num, raw = _header.unpack_from(data)
    if magic != MAGIC:
        raise MultifdError(f"multifd: received packet magic {magic:#x} and expected magic {MAGIC:#x}")
    if version != VERSION:
        raise MultifdError(f"multifd: received packet version {version} and expected version {VERSION}")
    if pages_alloc > PACKET_PAGES:
        raise MultifdError(f"multifd: received packet with size {pages_alloc} and expected a size of "
                           f"{PACKET_PAGES}")
    if normal > pages_alloc:
        raise MultifdError(f"multifd: received packet with {normal} pages and expected maximum pages "
                           f"are {pages_alloc}")
    name = bytes(raw[:RAMBLOCK_NAME - 1]).split(b"\0", 1)[0].decode(errors="replace")
    offsets = np.frombuffer(data, ">u8", count=normal, offset=HEADER_SIZE).astype(np.int64)
    if normal:
        size = block_sizes.get(name)
        if size is None:
            raise MultifdError(f"multifd: unknown ram block {name!r}")
        too_far = offsets.view(np.uint64) > np.uint64(max(size - PAGE_SIZE, 0)) if size >= PAGE_SIZE \
            else np.ones(normal, np.bool_)
        if too_far.any():
            bad = int(offsets.view(np.uint64)[np.argmax(too_far)])
            raise MultifdError(f"multifd: offset too long {bad} (max {size:#x})")
        if (offsets & (PAGE_SIZE - 1)).any():
            bad = int(offsets[np.argmax(offsets & (PAGE_SIZE - 1) != 0)])
            raise MultifdError(f"multifd: offset {bad:#x} is not page aligned")
        if flags & FLAG_COMPRESSION_MASK and next_size > MAX_COMPRESSED:
            raise MultifdError(f"multifd: compressed payload of {next_size} bytes for {normal} pages "
                               f"(at most {MAX_COMPRESSED})")
    return Packet(flags, pages_alloc, normal, next_size, num, name, offsets)


def payload_size(packet: Packet) -> int:
    """Bytes of page data that follow the header on the channel."""
    if not packet.normal:
        return 0  # next_packet_size may be stale: QEMU never resets it
    if packet.compression == FLAG_NOCOMP:
        return packet.normal * PAGE_SIZE
    return packet.next_packet_size


# --------------------------------------------------------------------------- compression


MAX_CHANNELS = 255  # multifd-channels is a uint8 in QEMU's schema


def check_parameter(name: str, value: int | str) -> None:
    """migrate-set-parameters' checks of the multifd-* parameters, as QEMU words them."""
    if name == "multifd-compression":
        if value not in COMPRESSION_FLAGS:  # the choices of its row in protocol/parameters.py
            raise ValueError(f"Parameter 'multifd-compression' does not accept value '{value}'")
        return
    assert isinstance(value, int)
    if not 0 <= value <= 255:
        raise ValueError(f"Parameter '{name}' expects uint8_t")
    if name == "multifd-channels" and value < 1:
        raise ValueError(f"Parameter 'multifd_channels' expects a value between 1 and {MAX_CHANNELS}")
    if name in ("multifd-zlib-level", "multifd-zstd-level"):
        check_level(name.split("-")[1], value)


def check_level(method: str, level: int) -> None:
    """QEMU's ranges for multifd-zlib-level (0..9) and multifd-zstd-level (0..20)."""
    top = {"zlib": 9, "zstd": 20}.get(method)
    if top is not None and not 0 <= level <= top:
        raise ValueError(f"Parameter 'multifd_{method}_level' expects a value between 0 and {top}")


class Compressor:
    """One channel's stream: every packet's pages continue it, and each
    packet ends with a flush so the destination can decode it whole."""

    def __init__(self, method: str, level: int) -> None:
        if method not in COMPRESSION_FLAGS:
            raise ValueError(f"multifd-compression {method!r}: use none, zlib or zstd")
        check_level(method, level)
        self.method = method
        self.flag = COMPRESSION_FLAGS[method]
        self._zlib = zlib.compressobj(level) if method == "zlib" else None
        self._zstd = zstandard.ZstdCompressor(level=level).compressobj() if method == "zstd" else None

    def compress(self, pages: np.ndarray) -> bytes:
        """The payload for these pages (an (n, 4096) array the guest no
        longer writes: a copy, as zlib must not see its input change)."""
        data = memoryview(np.ascontiguousarray(pages)).cast("B")
        if self._zlib is not None:
            return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        assert self._zstd is not None
        return self._zstd.compress(data) + self._zstd.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)


class _PageSink:
    """The zstd decoder's output, laid straight into the packet's pages; it
    stops the decoder as soon as more arrives than the packet names."""

    def __init__(self) -> None:
        self.targets: list[np.ndarray] = []
        self.filled = 0

    def write(self, chunk: bytes) -> int:
        view = np.frombuffer(chunk, np.uint8)
        pos = 0
        while pos < len(view):
            page, at = divmod(self.filled, PAGE_SIZE)
            if page >= len(self.targets):
                raise MultifdError("multifd: zstd payload decompresses to more than its packet's pages")
            n = min(PAGE_SIZE - at, len(view) - pos)
            self.targets[page][at:at + n] = view[pos:pos + n]
            pos += n
            self.filled += n
        return len(chunk)


class Decompressor:
    """One channel's receiving stream, continued packet after packet. Output
    never exceeds the pages a packet names (no decompression bombs)."""

    def __init__(self, method: str) -> None:
        if method not in COMPRESSION_FLAGS:
            raise ValueError(f"multifd-compression {method!r}: use none, zlib or zstd")
        self.method = method
        self.flag = COMPRESSION_FLAGS[method]
        self._zlib = zlib.decompressobj() if method == "zlib" else None
        self._sink = _PageSink()
        # The zstd writer flushes all output of a packet as long as its
        # buffer exceeds the packet's pages: it only fills when output is too much.
        self._zstd = zstandard.ZstdDecompressor().stream_writer(
            self._sink, write_size=MAX_COMPRESSED) if method == "zstd" else None

    def check_flags(self, packet: Packet) -> None:
        if packet.normal and packet.compression != self.flag:
            raise MultifdError(f"multifd: flags received {packet.compression:#x} flags expected {self.flag:#x}")

    def decompress_into(self, data: bytes | memoryview, targets: list[np.ndarray]) -> None:
        """Decode one packet's payload into `targets` (4096-byte uint8 pages)."""
        expected = len(targets) * PAGE_SIZE
        try:
            if self._zlib is not None:
                out = self._zlib.decompress(data, expected + 1)
                if len(out) != expected or self._zlib.unconsumed_tail or self._zlib.unused_data:
                    more = len(out) > expected or self._zlib.unconsumed_tail or self._zlib.unused_data
                    raise MultifdError(f"multifd: zlib payload gives {'more than ' if more else ''}"
                                       f"{min(len(out), expected)} bytes for {len(targets)} pages ({expected} bytes)")
                flat = np.frombuffer(out, np.uint8).reshape(-1, PAGE_SIZE)
                for page, src in zip(targets, flat, strict=True):
                    page[:] = src
                return
            assert self._zstd is not None
            self._sink.targets, self._sink.filled = targets, 0
            self._zstd.write(data)
            if self._sink.filled != expected:
                raise MultifdError(f"multifd: zstd payload gave {self._sink.filled} bytes for "
                                   f"{len(targets)} pages ({expected} bytes)")
        except (zlib.error, zstandard.ZstdError) as exc:
            raise MultifdError(f"multifd: {self.method} payload does not decompress: {exc}") from None
        finally:
            self._sink.targets = []


# --------------------------------------------------------------------------- one channel


class ChannelLike(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...
    def write_vectors(self, table: np.ndarray) -> int: ...
    def read_into(self, buf: memoryview) -> int: ...


def read_exact(channel: ChannelLike, view: memoryview) -> None:
    """Fill `view` from the channel; a short stream is an error."""
    got = 0
    while got < len(view):
        n = channel.read_into(view[got:])
        if not n:
            raise MultifdError(f"multifd: channel ended early: wanted {len(view) - got} more bytes")
        got += n


class PacketSender:
    """The source side of one multifd channel: its init packet, then packets
    of up to 128 pages each, raw pages written straight from guest RAM."""

    def __init__(self, channel: ChannelLike, channel_id: int, method: str = "none", level: int = 1,
                 uuid: bytes = NO_UUID) -> None:
        self.channel = channel
        self.compressor = Compressor(method, level) if method != "none" else None
        self.headers = bytearray(PACKET_SIZE)
        self.table = iovec_table(PACKET_PAGES + 1)
        self.bytes = 0
        channel.write(init_packet(channel_id, uuid))
        self.bytes += INIT_SIZE

    def send(self, block: str, block_pages: np.ndarray, pages: np.ndarray, packet_num: int,
             sync: bool = False) -> int:
        """One packet with the pages at indexes `pages` of `block_pages` (a
        contiguous (n, 4096) view of guest RAM); with no pages, a bare SYNC.
        Returns the bytes written."""
        flags = FLAG_SYNC if sync else 0
        offsets = pages.astype(np.int64) * PAGE_SIZE
        if not len(pages):
            header = packet_header(flags, block, offsets, 0, packet_num)
            self.channel.write(header)
            self.bytes += len(header)
            return len(header)
        if self.compressor is not None:
            payload = self.compressor.compress(block_pages[pages])
            header = packet_header(flags | self.compressor.flag, block, offsets, len(payload), packet_num)
            self.channel.write(header + payload)
            n = len(header) + len(payload)
        else:
            header = packet_header(flags, block, offsets, len(pages) * PAGE_SIZE, packet_num)
            self.headers[:] = header
            table = self.table[:len(pages) + 1]
            table[0] = (np.frombuffer(self.headers, np.uint8).ctypes.data, PACKET_SIZE)
            table[1:, 0] = block_pages.ctypes.data + pages.astype(np.uint64) * np.uint64(PAGE_SIZE)
            table[1:, 1] = PAGE_SIZE
            n = self.channel.write_vectors(table)
        self.bytes += n
        return n


class PacketReceiver:
    """The destination side of one multifd channel after its init packet:
    each packet's pages land straight in guest RAM (raw pages are read into
    the pages themselves)."""

    def __init__(self, channel: ChannelLike, method: str, blocks: Mapping[str, np.ndarray]) -> None:
        self.channel = channel
        self.blocks = blocks  # name -> (n, 4096) uint8 view of guest RAM
        self.sizes = {name: pages.shape[0] * PAGE_SIZE for name, pages in blocks.items()}
        self.decompressor = Decompressor(method)
        self.header = bytearray(PACKET_SIZE)
        self.payload = bytearray(MAX_COMPRESSED)
        self.pages = 0
        self.announced = 0  # pages named by the headers read (some may still be on their way)
        self.bytes = 0

    def receive(self) -> Packet | None:
        """The next packet, its pages already in place; None at a clean end
        of the channel (between packets)."""
        view = memoryview(self.header)
        first = self.channel.read_into(view)
        if not first:
            return None
        read_exact(self.channel, view[first:])
        packet = parse_packet(self.header, self.sizes)
        self.decompressor.check_flags(packet)
        size = payload_size(packet)
        self.bytes += PACKET_SIZE + size
        self.announced += packet.normal
        if not packet.normal:
            return packet
        ram = self.blocks[packet.ramblock]
        index = packet.offsets // PAGE_SIZE
        if packet.compression == FLAG_NOCOMP:
            # consecutive pages are one read into guest RAM
            breaks = np.flatnonzero(np.diff(index) != 1) + 1
            for run in np.split(index, breaks):
                read_exact(self.channel, memoryview(ram[int(run[0]):int(run[-1]) + 1]).cast("B"))
        else:
            data = memoryview(self.payload)[:size]
            read_exact(self.channel, data)
            self.decompressor.decompress_into(data, [ram[i] for i in index.tolist()])
        self.pages += packet.normal
        return packet
