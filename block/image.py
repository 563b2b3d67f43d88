"""The driver-independent part of an open image: state, checks, locks.

A driver subclasses Image and implements the `_do_*` hooks.  The public methods
here do the argument checks, the active/read-only/closed checks and the lock
bookkeeping once, so every driver refuses the same things the same way.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from . import locking
from .errors import ImageClosed, ImageInactive, OutOfRange, ReadOnlyImage


class Image:
    """An open disk image.

    States: *active* (reads and, unless read-only, writes; a writable active
    image holds the QEMU-compatible write lock) and *inactive* (reads only, no
    lock, metadata may be stale).  `inactivate()` flushes and drops the lock,
    `activate()` takes the lock and re-reads all metadata from disk.
    """

    format: str = "?"

    def __init__(self, path: str, fd: int, read_only: bool, inactive: bool) -> None:
        self.path = path
        self.read_only = read_only
        self._fd = fd
        self._active = False
        self._closed = False
        self._locked = False
        self._mutex = threading.RLock()
        self._start_inactive = inactive

    def _open(self) -> None:
        """Second-stage constructor: load metadata, then become active unless told not to."""
        try:
            self._load(for_write=False)
            if not self._start_inactive:
                self._do_activate()
        except BaseException:
            self._release_lock()
            self._close_resources()
            raise

    # -- public API -------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Virtual disk size in bytes."""
        return self._size()

    @property
    def active(self) -> bool:
        return self._active and not self._closed

    @property
    def closed(self) -> bool:
        return self._closed

    def read(self, offset: int, length: int) -> bytes:
        with self._mutex:
            self._check_open()
            self._check_range(offset, length)
            if length == 0:
                return b""
            return self._do_read(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        with self._mutex:
            self._check_writable()
            mv = memoryview(data).cast("B")
            self._check_range(offset, len(mv))
            if len(mv):
                self._do_write(offset, mv)

    def write_zeroes(self, offset: int, length: int) -> None:
        with self._mutex:
            self._check_writable()
            self._check_range(offset, length)
            if length:
                self._do_write_zeroes(offset, length)

    def flush(self) -> None:
        """Make every completed write durable and the on-disk metadata clean."""
        with self._mutex:
            self._check_open()
            if not self._active:
                return  # nothing can be dirty while inactive: inactivate() flushed
            if not self.read_only:
                self._do_flush()

    def resize(self, size: int) -> None:
        """Grow the virtual disk to size bytes (shrinking is refused)."""
        with self._mutex:
            self._check_writable()
            if size < 0:
                raise OutOfRange(f"{self.path}: negative size {size}")
            self._do_resize(size)

    def is_allocated(self, offset: int, length: int) -> bool:
        """True if the top image itself allocates any part of [offset, offset+length).

        "Allocated" means the top image decides the content (data or a zero
        cluster) instead of the backing chain: what incremental block migration
        has to send.
        """
        with self._mutex:
            self._check_open()
            self._check_range(offset, length)
            if length == 0:
                return False
            return self._do_is_allocated(offset, length)

    def inactivate(self) -> None:
        """Flush every cache, leave the image clean on disk, drop write access and the lock."""
        with self._mutex:
            self._check_open()
            if not self._active:
                return
            if not self.read_only:
                self._do_flush()
            self._active = False
            self._release_lock()

    def activate(self) -> None:
        """Take the lock and re-read all metadata from disk, as a fresh open would.

        Nothing cached before is trusted: another host may have written the
        image while we were inactive.
        """
        with self._mutex:
            self._check_open()
            if self._active:
                return
            self._do_activate()

    def close(self) -> None:
        with self._mutex:
            if self._closed:
                return
            try:
                if self._active and not self.read_only:
                    self._do_flush()
            finally:
                self._active = False
                self._release_lock()
                self._close_resources()
                self._closed = True

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        # Only release the fd; flushing from a finalizer could write at a surprising time.
        if not getattr(self, "_closed", True):
            try:
                self._release_lock()
                self._close_resources()
            except Exception:
                pass

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("active" if self._active else "inactive")
        ro = " read-only" if self.read_only else ""
        return f"<{type(self).__name__} {self.path!r} {state}{ro}>"

    # -- helpers ----------------------------------------------------------------------
    def _do_activate(self) -> None:
        if not self.read_only:
            self._acquire_lock()
        try:
            self._drop_metadata()
            self._load(for_write=not self.read_only)
        except BaseException:
            self._release_lock()
            raise
        self._active = True

    def activate_keeping_metadata(self) -> None:
        """Become active but keep the (possibly stale) cached metadata: unsafe.

        This is the bug activate() exists to avoid.  The x-skip-invalidate
        capability and tests use it as a negative control, to show that their
        content checks catch stale caches.
        """
        with self._mutex:
            if not self.read_only:
                self._acquire_lock()
            self._active = True

    def _acquire_lock(self) -> None:
        if not self._locked:
            locking.acquire(self._fd, self.path)
            self._locked = True

    def _release_lock(self) -> None:
        if self._locked:
            locking.release(self._fd)
            self._locked = False

    def _check_open(self) -> None:
        if self._closed:
            raise ImageClosed(f"{self.path}: image is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ReadOnlyImage(f"{self.path}: image was opened read-only")
        if not self._active:
            raise ImageInactive(f"{self.path}: image is inactive (inactivate() was called or "
                                "it was opened inactive); call activate() before writing")

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size():
            raise OutOfRange(f"{self.path}: request [{offset}, {offset + length}) is outside "
                             f"the {self._size()}-byte disk")

    def _close_resources(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # -- driver hooks -----------------------------------------------------------------
    def _size(self) -> int:
        raise NotImplementedError

    def _load(self, for_write: bool) -> None:
        """Read the metadata from disk; for_write also runs the read-write checks."""
        raise NotImplementedError

    def _drop_metadata(self) -> None:
        """Forget every cached structure (no write-back)."""
        raise NotImplementedError

    def _do_read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def _do_write(self, offset: int, data: memoryview) -> None:
        raise NotImplementedError

    def _do_write_zeroes(self, offset: int, length: int) -> None:
        raise NotImplementedError

    def _do_flush(self) -> None:
        raise NotImplementedError

    def _do_is_allocated(self, offset: int, length: int) -> bool:
        raise NotImplementedError

    def _do_resize(self, size: int) -> None:
        raise NotImplementedError


def pread_full(fd: int, length: int, offset: int) -> bytes:
    """pread that zero-fills a short read at end of file."""
    data = os.pread(fd, length, offset)
    if len(data) < length:
        got = [data]
        n = len(data)
        while n < length:
            more = os.pread(fd, length - n, offset + n)
            if not more:
                got.append(bytes(length - n))
                break
            got.append(more)
            n += len(more)
        data = b"".join(got)
    return data


def pwrite_full(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    mv = memoryview(data)
    while len(mv):
        n = os.pwrite(fd, mv, offset)
        mv = mv[n:]
        offset += n


def pwritev_full(fd: int, bufs: list, offset: int) -> None:
    total = sum(len(b) for b in bufs)
    n = os.pwritev(fd, bufs, offset)
    if n < total:  # rare (signals, huge requests): finish with a joined buffer
        pwrite_full(fd, memoryview(b"".join(bytes(b) for b in bufs))[n:], offset + n)
