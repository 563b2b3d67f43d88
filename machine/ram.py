"""Guest RAM: named blocks laid out back to back in one shared-memory file that
the guest's vCPUs and the migration actors all map."""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass

import numpy as np

PAGE_SIZE = 4096
FILLS = ("zero", "random", "half")
_FILL_CHUNK = 16 << 20


@dataclass(frozen=True)
class BlockLayout:
    name: str
    size: int
    first_page: int  # guest-physical page where the block starts

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE


def layout(blocks: list[tuple[str, int]]) -> list[BlockLayout]:
    out, page = [], 0
    for name, size in blocks:
        if size <= 0 or size % PAGE_SIZE:
            raise ValueError(f"RAM block {name!r}: size {size} is not a positive multiple of {PAGE_SIZE}")
        out.append(BlockLayout(name, size, page))
        page += size // PAGE_SIZE
    return out


class GuestRam:
    """A mapping of the guest's RAM file. `pages` is an (n, 4096) uint8 view."""

    def __init__(self, path: str, blocks: list[tuple[str, int]], create: bool = False) -> None:
        self.path = path
        self.blocks = layout(blocks)
        self.size = sum(b.size for b in self.blocks)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, self.size)
            elif os.fstat(fd).st_size != self.size:
                raise ValueError(f"{path}: RAM file has {os.fstat(fd).st_size} bytes, expected {self.size}")
            self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.bytes = np.frombuffer(self.map, np.uint8)
        self.pages = self.bytes.reshape(-1, PAGE_SIZE)

    def block(self, name: str) -> BlockLayout:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(name)

    def block_pages(self, b: BlockLayout) -> np.ndarray:
        return self.pages[b.first_page:b.first_page + b.pages]

    def digests(self) -> dict[str, bytes]:
        """BLAKE2b of every block's content (hashlib releases the GIL while it works)."""
        return {b.name: hashlib.blake2b(memoryview(self.block_pages(b)).cast("B"), digest_size=32).digest()
                for b in self.blocks}

    def prefault(self) -> None:
        """Back every page now, so that receiving does not pay for page faults."""
        if hasattr(mmap, "MADV_POPULATE_WRITE"):
            try:
                self.map.madvise(mmap.MADV_POPULATE_WRITE)
                return
            except OSError:
                pass
        fd = os.open(self.path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, self.size)
        finally:
            os.close(fd)

    def close(self) -> None:
        del self.pages, self.bytes
        try:
            self.map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with the process


def fill_ram(data: np.ndarray, fill: str, seed: int) -> None:
    """Initial RAM content, deterministic from the seed: `random` is
    incompressible, `half` is random with every odd page zero."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}")
    if fill == "zero":
        return
    rng = np.random.Generator(np.random.PCG64(seed))
    flat = data.reshape(-1)
    for start in range(0, len(flat), _FILL_CHUNK):
        chunk = flat[start:start + _FILL_CHUNK]
        chunk.view(np.uint64)[:] = rng.integers(0, 2**64 - 1, len(chunk) // 8, np.uint64, endpoint=True)
    if fill == "half":
        data.reshape(-1, PAGE_SIZE)[1::2] = 0
