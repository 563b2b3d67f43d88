"""The raw driver: the file is the disk, byte for byte."""

from __future__ import annotations

import os

from .errors import UnsupportedFeature
from .image import Image, pread_full, pwrite_full

_ZERO_CHUNK = bytes(1 << 20)


class RawImage(Image):
    format = "raw"

    def _size(self) -> int:
        return self._cached_size

    def _load(self, for_write: bool) -> None:
        self._cached_size = os.fstat(self._fd).st_size

    def _drop_metadata(self) -> None:
        self._cached_size = 0

    def _do_read(self, offset: int, length: int) -> bytes:
        return pread_full(self._fd, length, offset)

    def _do_write(self, offset: int, data: memoryview) -> None:
        pwrite_full(self._fd, data, offset)

    def _do_write_zeroes(self, offset: int, length: int) -> None:
        while length:
            n = min(length, len(_ZERO_CHUNK))
            pwrite_full(self._fd, memoryview(_ZERO_CHUNK)[:n], offset)
            offset += n
            length -= n

    def _do_flush(self) -> None:
        os.fdatasync(self._fd)

    def _do_resize(self, size: int) -> None:
        if size < self._cached_size:
            raise UnsupportedFeature(f"{self.path}: shrinking an image is not supported")
        os.ftruncate(self._fd, size)
        self._cached_size = size

    def _do_is_allocated(self, offset: int, length: int) -> bool:
        return True  # raw has no backing file: every byte is the top image's


def create_raw(path: str, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
