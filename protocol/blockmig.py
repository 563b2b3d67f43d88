"""The `block` section (instance 0, version 1) of QEMU's old block migration.

Records are a be64 `(sector << 9) | flags`: DEVICE_BLOCK is followed by the
drive's name and exactly 1 MiB of data (even for a short last chunk; only the
sectors that exist are written); with ZERO_BLOCK there is no data; PROGRESS
carries a percentage in place of the sector; EOS ends a section's payload.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from livemig.protocol import savevm

VERSION = 1
CHUNK = 1 << 20
SECTOR_BITS = 9
DEVICE_BLOCK = 0x01
EOS = 0x02
PROGRESS = 0x04
ZERO_BLOCK = 0x08
KNOWN = DEVICE_BLOCK | EOS | PROGRESS | ZERO_BLOCK

_be64 = struct.Struct(">Q")
_ZERO_CHUNK = bytes(CHUNK)


def eos() -> bytes:
    return _be64.pack(EOS)


def progress(percent: int) -> bytes:
    return _be64.pack((percent << SECTOR_BITS) | PROGRESS)


def chunk_records(drive: str, chunk: int, data: bytes) -> list[bytes]:
    """Records for one chunk: a zero chunk costs only its header."""
    sector = chunk * CHUNK >> SECTOR_BITS
    name = bytes([len(drive.encode())]) + drive.encode()
    if data == _ZERO_CHUNK[:len(data)]:
        return [_be64.pack((sector << SECTOR_BITS) | DEVICE_BLOCK | ZERO_BLOCK) + name]
    if len(data) < CHUNK:
        data = data + bytes(CHUNK - len(data))
    return [_be64.pack((sector << SECTOR_BITS) | DEVICE_BLOCK) + name, data]


@dataclass
class BlockTarget:
    """Where the destination puts a drive's chunks."""

    size: int
    write: Callable[[int, memoryview], None]
    write_zeroes: Callable[[int, int], None]


class BlockLoader:
    def __init__(self, targets: Callable[[str], BlockTarget | None]) -> None:
        self.targets = targets
        self.progress = 0
        self.chunks = 0
        self.bytes = 0

    def load(self, r: savevm.BufferedReader, version: int) -> None:
        if version != VERSION:
            raise savevm.StreamError(f"block section version {version} unsupported (need {VERSION})")
        while True:
            word = r.be64()
            flags = word & ((1 << SECTOR_BITS) - 1)
            if flags & ~KNOWN:
                raise savevm.StreamError(f"unknown block migration flags {flags:#x}")
            if flags & EOS:
                return
            if flags & PROGRESS:
                self.progress = word >> SECTOR_BITS
                continue
            if not flags & DEVICE_BLOCK:
                raise savevm.StreamError(f"block record without a type: flags {flags:#x}")
            name = r.idstr()
            target = self.targets(name)
            if target is None:
                raise savevm.StreamError(f"block migration for unknown drive {name!r}")
            offset = (word >> SECTOR_BITS) << SECTOR_BITS
            if offset >= target.size:
                raise savevm.StreamError(f"block chunk at {offset:#x} beyond drive {name!r} of {target.size} bytes")
            length = min(CHUNK, target.size - offset)
            if flags & ZERO_BLOCK:
                target.write_zeroes(offset, length)
            else:
                data = r.take(CHUNK)
                target.write(offset, data[:length])
            self.chunks += 1
            self.bytes += length
