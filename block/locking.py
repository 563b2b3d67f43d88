"""QEMU-compatible image locking with Linux open-file-description (OFD) locks.

QEMU's file-posix driver expresses "who may do what" with shared (read) OFD
locks on single bytes: byte 100+i means "I hold permission i", byte 200+i means
"I do not let others have permission i".  A would-be user tests the bytes that
matter to it for a conflicting lock.  Using the same bytes makes a livemig
writer visible to qemu-img/qemu-io (and vice versa).  Observed with qemu-io
7.2 on a read-write open: bytes 100, 101, 103, 201 and 203 are locked.

OFD locks belong to the open file description, so two opens inside one process
conflict just like two processes do, and closing the fd drops them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

PERM_BASE = 100
SHARED_BASE = 200

# Permission bit numbers (QEMU's BLK_PERM_* bit positions in 7.x).
PERM_CONSISTENT_READ = 0
PERM_WRITE = 1
PERM_WRITE_UNCHANGED = 2
PERM_RESIZE = 3
PERM_NAMES = {0: "consistent read", 1: "write", 2: "write unchanged", 3: "resize"}
ALL_PERMS = (0, 1, 2, 3)

# What an active read-write image holds, and what it refuses to share (as qemu-io does).
WRITER_PERMS = (PERM_CONSISTENT_READ, PERM_WRITE, PERM_RESIZE)
WRITER_UNSHARED = (PERM_WRITE, PERM_RESIZE)

# struct flock on Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = "hhqqi4x"


def _flock(fd: int, cmd: int, ltype: int, start: int) -> int:
    arg = struct.pack(_FLOCK, ltype, os.SEEK_SET, start, 1, 0)
    out = fcntl.fcntl(fd, cmd, arg)
    return struct.unpack(_FLOCK, out)[0]


def _held_by_other(fd: int, byte: int) -> bool:
    # F_OFD_GETLK reports a lock of another description that would block an exclusive lock.
    return _flock(fd, fcntl.F_OFD_GETLK, fcntl.F_WRLCK, byte) != fcntl.F_UNLCK


def conflicts(fd: int, perms: tuple[int, ...], unshared: tuple[int, ...]) -> list[str]:
    """Describe every conflict between what we want and what other openers hold."""
    found = []
    for p in perms:
        if _held_by_other(fd, SHARED_BASE + p):
            found.append(f"another opener does not share the {PERM_NAMES[p]} permission")
    for p in unshared:
        if _held_by_other(fd, PERM_BASE + p):
            found.append(f"another opener holds the {PERM_NAMES[p]} permission")
    return found


def acquire(fd: int, path: str, perms: tuple[int, ...] = WRITER_PERMS,
            unshared: tuple[int, ...] = WRITER_UNSHARED) -> None:
    """Take the lock bytes for perms/unshared, or raise ImageInUse and hold nothing.

    Locks are applied first and checked afterwards (as QEMU does), so two racing
    openers both see each other and both back off rather than both proceeding.
    """
    from .errors import ImageInUse

    try:
        for p in perms:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, PERM_BASE + p)
        for p in unshared:
            _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_RDLCK, SHARED_BASE + p)
        found = conflicts(fd, perms, unshared)
    except OSError as e:
        release(fd)
        if e.errno in (errno.EAGAIN, errno.EACCES):
            found = ["another opener holds a conflicting lock"]
        else:
            raise
    if found:
        release(fd)
        raise ImageInUse(f"{path}: image is in use ({'; '.join(found)}); "
                         "is another process using the image?")


def release(fd: int) -> None:
    """Drop every lock byte this description holds (a no-op when none are held)."""
    for base in (PERM_BASE, SHARED_BASE):
        for p in ALL_PERMS:
            try:
                _flock(fd, fcntl.F_OFD_SETLK, fcntl.F_UNLCK, base + p)
            except OSError:
                pass
