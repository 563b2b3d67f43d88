"""Guest RAM: named blocks laid out back to back in one shared-memory file that
the guest's vCPUs and the migration actors all map."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
from dataclasses import dataclass

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
FILLS = ("zero", "random", "half", "text")
_FILL_CHUNK = 16 << 20
# Python 3.11's mmap module lacks these (Linux 5.14+); the values are the kernel's.
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


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
        except BaseException:
            os.close(fd)
            raise
        # Kept open: SEEK_DATA/SEEK_HOLE on it tell which pages were never written.
        self.fd = fd
        self.bytes = np.frombuffer(self.map, np.uint8)
        self.pages = self.bytes.reshape(-1, PAGE_SIZE)
        self._backed = np.zeros(self.pages.shape[0], np.bool_)  # pages known to hold data (see holes)

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

    def data_ranges(self, first: int = 0, end: int | None = None) -> list[tuple[int, int]]:
        """Page ranges [a, b) within [first, end) that are backed by memory. The
        rest are holes of the RAM file: never written, so zero, and reading
        them through the mapping would allocate them."""
        end = self.pages.shape[0] if end is None else end
        out = []
        pos = first * PAGE_SIZE
        stop = end * PAGE_SIZE
        while pos < stop:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # nothing but a hole up to the end of the file
                raise
            if data >= stop:
                break
            hole = min(os.lseek(self.fd, data, os.SEEK_HOLE), stop)
            out.append((data // PAGE_SIZE, -(-hole // PAGE_SIZE)))
            pos = hole
        return out

    def holes(self, pages: np.ndarray) -> np.ndarray:
        """Bool mask: which of these sorted page indexes lie in holes now.
        Pages only ever go from hole to data (nothing punches holes), so what
        was once seen backed is remembered and asked about no more: asking the
        kernel walks the whole data run, which per batch would be quadratic."""
        backed = self._backed
        hole = ~backed[pages]
        if not hole.any():
            return hole
        idx = np.flatnonzero(hole)
        pos, stop = int(pages[idx[0]]) * PAGE_SIZE, (int(pages[idx[-1]]) + 1) * PAGE_SIZE
        while pos < stop:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break
                raise
            if data >= stop:
                break
            end = os.lseek(self.fd, data, os.SEEK_HOLE)
            backed[data // PAGE_SIZE:-(-end // PAGE_SIZE)] = True
            pos = end
        hole[idx] = ~backed[pages[idx]]
        return hole

    def discard(self, first: int, count: int) -> None:
        """Punch pages [first, first+count) out of the RAM file: they read as
        missing again (post-copy re-fetches them) and are unmapped everywhere."""
        if first < 0 or count < 0 or first + count > self.pages.shape[0]:
            raise ValueError(f"pages {first}+{count} beyond RAM of {self.pages.shape[0]} pages")
        if count:
            _punch_hole(self.fd, first * PAGE_SIZE, count * PAGE_SIZE)
            self._backed[first:first + count] = False

    def zero_pages(self, batch: np.ndarray) -> np.ndarray:
        """Bool mask: which of these sorted page indexes hold only zeros.
        Holes are zero without a look (a look would back them); most other
        pages show data in their first word, and only the rest are read in
        full. A run of consecutive pages is read through a strided view."""
        is_zero = self.holes(batch)
        data = np.flatnonzero(~is_zero)
        if len(data):
            held = batch[data]
            first, last = int(held[0]), int(held[-1])
            pages = self.pages
            words = pages[first:last + 1, :8] if last - first + 1 == len(held) else pages[held, :8]
            zero = words.view(np.uint64)[:, 0] == 0
            if zero.any():
                idx = np.flatnonzero(zero)
                zero[idx] = ~pages[held[idx]].any(axis=1)
            is_zero[data] = zero
        return is_zero

    def all_holes(self) -> bool:
        """True when no page was ever written: the RAM is known to be zero."""
        return not self.data_ranges()

    def populate(self, write: bool) -> None:
        """Map every page into this process now, so that the migration does not
        pay a page fault per page (on a VM a fault costs microseconds: a cold
        mapping caps copying at a fraction of memory speed). write=True also
        backs holes (the destination, about to receive); write=False maps only
        the pages that hold data (the source, about to read)."""
        ranges = [(0, self.pages.shape[0])] if write else self.data_ranges()
        advice = MADV_POPULATE_WRITE if write else MADV_POPULATE_READ
        for a, b in ranges:
            self._backed[a:b] = True  # what holes() need not ask the kernel about again
            try:
                self.map.madvise(advice, a * PAGE_SIZE, (b - a) * PAGE_SIZE)
            except OSError:  # before Linux 5.14: touch one byte a page
                view = self.pages[a:b, 0]
                if write:
                    np.add(view, 0, out=view)
                else:
                    int(view.max())

    def close(self) -> None:
        del self.pages, self.bytes
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.map.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with the process


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot discard RAM at {offset:#x}+{length:#x}: {os.strerror(err)}")


def _fill_text(flat: np.ndarray, rng: np.random.Generator) -> None:
    """4 MiB of words (4096 of them, drawn with Zipf's frequencies), repeated
    with a fresh rotation per 4 MiB: far apart enough that no compressor
    window sees the repeat."""
    lengths = rng.integers(2, 10, 4096)
    letters = rng.integers(ord("a"), ord("z") + 1, int(lengths.sum()), np.uint8)
    words = [w.tobytes() + b" " for w in np.split(letters, np.cumsum(lengths)[:-1])]
    size = min(4 << 20, len(flat))
    picks = (rng.zipf(1.3, size // 3) - 1) % len(words)
    text = np.frombuffer(b"".join(words[i] for i in picks.tolist())[:size], np.uint8)
    for start in range(0, len(flat), size):
        chunk = flat[start:start + size]
        cut = int(rng.integers(0, size))
        head = text[cut:][:len(chunk)]
        chunk[:len(head)] = head
        chunk[len(head):] = text[:len(chunk) - len(head)]


def fill_ram(data: np.ndarray, fill: str, seed: int) -> None:
    """Initial RAM content, deterministic from the seed: `random` is
    incompressible, `half` is random with every odd page zero, `text` is
    words of lower-case letters (compressible, as logs or source text are)."""
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {', '.join(FILLS)}")
    if fill == "zero":
        return
    rng = np.random.Generator(np.random.PCG64(seed))
    flat = data.reshape(-1)
    if fill == "text":
        _fill_text(flat, rng)
        return
    for start in range(0, len(flat), _FILL_CHUNK):
        chunk = flat[start:start + _FILL_CHUNK]
        chunk.view(np.uint64)[:] = rng.integers(0, 2**64 - 1, len(chunk) // 8, np.uint64, endpoint=True)
    if fill == "half":
        data.reshape(-1, PAGE_SIZE)[1::2] = 0
