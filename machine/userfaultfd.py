"""userfaultfd from ctypes: a process that touches guest RAM not yet received
blocks in the kernel until the page is placed, atomically and exactly once.

How a fault in ANOTHER process is served (vCPUs are separate processes that
map the same shared RAM file): every vCPU process creates its own uffd (a uffd
is bound to the mm of its creator), registers its mapping MISSING and passes
the fd to the receiver over a unix socket (SCM_RIGHTS). The receiver registers
its own mapping too and places every page through its own uffd with
UFFDIO_COPY, which puts the page into the shared page cache in one step (no
mapping ever sees half a page); then it UFFDIO_WAKEs the uffds of the vCPUs
that fault on it. This is QEMU's placement (COPY into its own uffd) plus its
wake of shared (vhost-user) uffds, and it does not depend on which vCPUs run.

Hazard: a process that maps the RAM without registering and touches a hole
allocates the page, and the later COPY fails with EEXIST: whoever writes
pages during post-copy goes through `Placer`, never through a plain mapping.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from livemig.machine.ram import PAGE_SIZE

NR_USERFAULTFD = 323  # x86_64
USERFAULTFD_IOC_NEW = 0xAA00  # /dev/userfaultfd: _IO(0xAA, 0x00)
UFFD_USER_MODE_ONLY = 1
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04

REGISTER_MODE_MISSING = 1
COPY_MODE_DONTWAKE = 1
ZEROPAGE_MODE_DONTWAKE = 1
FEATURE_THREAD_ID = 1 << 8
# Bits of the ioctls mask that UFFDIO_REGISTER returns: 1 << (ioctl nr).
IOCTL_WAKE = 1 << 0x02
IOCTL_COPY = 1 << 0x03
IOCTL_ZEROPAGE = 1 << 0x04

EVENT_PAGEFAULT = 0x12
PAGEFAULT_FLAG_WRITE = 1
MSG_SIZE = 32

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


class UffdError(OSError):
    """A userfaultfd operation the kernel refused."""


class PageExists(UffdError):
    """UFFDIO_COPY/ZEROPAGE found the page already present (placed twice, or
    allocated by an unregistered mapping that touched the hole)."""


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Range(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Register(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _Copy(ctypes.Structure):
    _fields_ = [("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64)]


class _Zeropage(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


assert ctypes.sizeof(_Api) == 24 and ctypes.sizeof(_Register) == 32
assert ctypes.sizeof(_Copy) == 40 and ctypes.sizeof(_Zeropage) == 32


def _ioctl(fd: int, request: int, arg: ctypes.Structure, what: str) -> int:
    """0, or the errno for EAGAIN/EEXIST (the callers' retry cases); raises otherwise."""
    while True:
        if _libc.ioctl(fd, request, ctypes.byref(arg)) == 0:
            return 0
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in (errno.EAGAIN, errno.EEXIST):
            return err
        raise UffdError(err, f"userfaultfd {what}: {os.strerror(err)}")


def _open_fd(flags: int) -> int:
    fd = _libc.syscall(NR_USERFAULTFD, flags)
    if fd >= 0:
        return fd
    first = ctypes.get_errno()
    try:  # Linux 6.1+: the device works where the syscall is forbidden (unprivileged_userfaultfd=0)
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        raise UffdError(first, f"userfaultfd(): {os.strerror(first)}") from None
    try:
        fd = _libc.ioctl(dev, USERFAULTFD_IOC_NEW, ctypes.c_void_p(flags))
        if fd < 0:
            err = ctypes.get_errno()
            raise UffdError(err, f"/dev/userfaultfd: {os.strerror(err)}")
        return fd
    finally:
        os.close(dev)


@dataclass(frozen=True)
class Fault:
    address: int  # in the faulting process's address space
    write: bool
    tid: int


def parse_messages(raw: bytes) -> list[Fault]:
    """uffd_msg records: event u8 at 0, flags at 8, address at 16, ptid u32 at 24."""
    if len(raw) % MSG_SIZE:
        raise UffdError(errno.EIO, f"userfaultfd read of {len(raw)} bytes is not whole messages")
    out = []
    for event, flags, address, tid in struct.iter_unpack("<B7xQQI4x", raw):
        if event == EVENT_PAGEFAULT:  # no other event was asked for
            out.append(Fault(address, bool(flags & PAGEFAULT_FLAG_WRITE), tid))
    return out


class Userfaultfd:
    """One uffd: non-blocking, close-on-exec, API handshake done by its creator."""

    def __init__(self, fd: int, features: int = 0) -> None:
        self.fd = fd
        self.features = features
        self.ioctls = 0  # what the last REGISTER offered

    @classmethod
    def create(cls, features: int = FEATURE_THREAD_ID) -> Userfaultfd:
        fd = _open_fd(os.O_CLOEXEC | os.O_NONBLOCK)
        api = _Api(UFFD_API, features, 0)
        try:
            if _ioctl(fd, UFFDIO_API, api, "API"):
                raise UffdError(errno.EINVAL, "userfaultfd API handshake refused")
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, api.features)

    def register(self, start: int, length: int) -> int:
        """Register [start, start+length) for missing-page faults; returns the ioctls offered."""
        reg = _Register(start, length, REGISTER_MODE_MISSING, 0)
        if _ioctl(self.fd, UFFDIO_REGISTER, reg, "REGISTER"):
            raise UffdError(errno.EBUSY, f"userfaultfd REGISTER of {length} bytes at {start:#x} refused")
        if not reg.ioctls & IOCTL_COPY:
            raise UffdError(errno.ENOTSUP, "userfaultfd: this mapping does not offer UFFDIO_COPY")
        self.ioctls = reg.ioctls
        return reg.ioctls

    def unregister(self, start: int, length: int) -> None:
        _ioctl(self.fd, UFFDIO_UNREGISTER, _Range(start, length), "UNREGISTER")

    def wake(self, start: int, length: int) -> None:
        _ioctl(self.fd, UFFDIO_WAKE, _Range(start, length), "WAKE")

    def copy(self, dst: int, src: int, length: int, wake: bool = True) -> int:
        """Copy `length` bytes from our `src` into the registered `dst`. Returns
        the bytes placed before a page that was already present (PageExists
        when that is the first one)."""
        done = 0
        while done < length:
            arg = _Copy(dst + done, src + done, length - done, 0 if wake else COPY_MODE_DONTWAKE, 0)
            err = _ioctl(self.fd, UFFDIO_COPY, arg, "COPY")
            if arg.copy > 0:
                done += arg.copy
            if err == errno.EEXIST or arg.copy == -errno.EEXIST:
                if not done:
                    raise PageExists(errno.EEXIST, f"page at {dst:#x} is already present")
                return done
            if not err:
                return length
        return done

    def zeropage(self, dst: int, length: int, wake: bool = True) -> None:
        arg = _Zeropage(dst, length, 0 if wake else ZEROPAGE_MODE_DONTWAKE, 0)
        while True:
            err = _ioctl(self.fd, UFFDIO_ZEROPAGE, arg, "ZEROPAGE")
            if not err:
                return
            if err == errno.EEXIST or arg.zeropage == -errno.EEXIST:
                raise PageExists(errno.EEXIST, f"page at {dst:#x} is already present")
            if arg.zeropage > 0:
                arg = _Zeropage(arg.start + arg.zeropage, arg.len - arg.zeropage, arg.mode, 0)

    def read_faults(self, max_messages: int = 64) -> list[Fault]:
        """The pending faults; [] when there are none (non-blocking)."""
        try:
            raw = os.read(self.fd, MSG_SIZE * max_messages)
        except BlockingIOError:
            return []
        return parse_messages(raw)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --------------------------------------------------------------------------- passing a uffd


def send_uffd(sock: socket.socket, uffd: Userfaultfd, base: int, size: int, name: str) -> None:
    """Hand our uffd to the page server, with where our mapping of the RAM lies."""
    info = json.dumps({"base": base, "size": size, "name": name, "pid": os.getpid(),
                       "features": uffd.features}).encode()
    socket.send_fds(sock, [struct.pack(">I", len(info)) + info], [uffd.fd])


@dataclass
class RemoteUffd:
    """A uffd received from another process, over that process's mapping."""

    uffd: Userfaultfd
    base: int
    size: int
    name: str
    pid: int

    def page_of(self, address: int) -> int:
        if not self.base <= address < self.base + self.size:
            raise UffdError(errno.EFAULT, f"{self.name}: fault at {address:#x} outside its RAM mapping")
        return (address - self.base) // PAGE_SIZE


def recv_uffd(sock: socket.socket) -> RemoteUffd:
    data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
    if len(fds) != 1 or len(data) < 4:
        for fd in fds:
            os.close(fd)
        raise UffdError(errno.EPROTO, "expected one userfaultfd and its mapping description")
    (n,) = struct.unpack_from(">I", data)
    info = json.loads(data[4:4 + n])
    return RemoteUffd(Userfaultfd(fds[0], info["features"]), info["base"], info["size"], info["name"], info["pid"])


# --------------------------------------------------------------------------- placing pages


@dataclass
class PlacerStats:
    placed: int = 0  # pages placed by COPY or ZEROPAGE
    zero: int = 0
    exists: int = 0  # COPY refused because the page was present: must stay 0
    faults: int = 0  # fault messages read (every process)
    missed: int = 0  # distinct pages faulted on while missing
    wakes: int = 0


MAX_LATENCIES = 1 << 20


class Placer:
    """Places pages into the shared RAM through our own registered mapping,
    each exactly once, and wakes whoever faulted on them.

    `base` is our mapping of the whole RAM (`npages` pages). `present` starts
    as the pages already in the page cache (pre-copy loaded them), which are
    never placed again and never fault. Placing and fault reading may run in
    two threads: both hold `lock`.

    Timing: a fault counts from when its message is read to when its page is
    placed (`latencies`, ns); a process is blocked over the same span
    (`blocked_ns` per process, `all_blocked_ns` while every process is).
    """

    def __init__(self, base: int, npages: int, present: np.ndarray | None = None) -> None:
        self.base = base
        self.npages = npages
        self.own = Userfaultfd.create()
        self.own.register(base, npages * PAGE_SIZE)
        self.zeropage_ok = bool(self.own.ioctls & IOCTL_ZEROPAGE)
        self.remotes: list[RemoteUffd] = []
        self.present = np.zeros(npages, np.bool_) if present is None else present.copy()
        self.waiting: dict[int, tuple[int, set[int]]] = {}  # page -> (ns missed, who: remote index, -1 us)
        self.stats = PlacerStats()
        self.lock = threading.Lock()
        self.latencies = np.zeros(MAX_LATENCIES, np.int64)
        self.blocked_ns: list[int] = []
        self._blocked_since: dict[int, int] = {}  # remote index -> ns
        self._all_since = 0
        self.all_blocked_ns = 0
        self._zero = np.zeros(PAGE_SIZE, np.uint8)
        self._poller = select.poll()
        self._poller.register(self.own.fd, select.POLLIN)
        self._by_fd: dict[int, int] = {self.own.fd: -1}

    def add(self, remote: RemoteUffd) -> int:
        """Serve another process's uffd; returns its index (in `blocked_ns`)."""
        if remote.size != self.npages * PAGE_SIZE:
            raise UffdError(errno.EINVAL, f"{remote.name}: maps {remote.size} bytes of a {self.npages}-page RAM")
        with self.lock:
            self._by_fd[remote.uffd.fd] = len(self.remotes)
            self.remotes.append(remote)
            self.blocked_ns.append(0)
            self._poller.register(remote.uffd.fd, select.POLLIN)
        return len(self.remotes) - 1

    def _wake(self, page: int, who: set[int], now: int) -> None:
        for i in who:
            if i >= 0:
                r = self.remotes[i]
                r.uffd.wake(r.base + page * PAGE_SIZE, PAGE_SIZE)
                since = self._blocked_since.pop(i, None)
                if since is not None:
                    self.blocked_ns[i] += now - since
            else:
                self.own.wake(self.base + page * PAGE_SIZE, PAGE_SIZE)
            self.stats.wakes += 1
        if self._all_since and len(self._blocked_since) < len(self.remotes):
            self.all_blocked_ns += now - self._all_since
            self._all_since = 0

    def place(self, first: int, data: np.ndarray | memoryview | bytes) -> int:
        """Place consecutive pages from `first` (data: whole pages), skipping
        those already present. Returns how many were placed."""
        buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
        n = len(buf) // PAGE_SIZE
        if first < 0 or first + n > self.npages:
            raise UffdError(errno.EFAULT, f"pages {first}..{first + n - 1} beyond RAM of {self.npages} pages")
        with self.lock:
            todo = np.flatnonzero(~self.present[first:first + n])
            placed = 0
            for run in np.split(todo, np.flatnonzero(np.diff(todo) != 1) + 1) if len(todo) else ():
                lo, hi = int(run[0]), int(run[-1]) + 1
                placed += self._copy(first + lo, buf[lo * PAGE_SIZE:hi * PAGE_SIZE], hi - lo)
            return placed

    def place_rows(self, index: np.ndarray, rows: np.ndarray) -> int:
        """Place page index[i] from rows[i] (an (n, PAGE_SIZE) array whose rows
        may be strided, e.g. records in a receive buffer), skipping present pages."""
        if rows.shape != (len(index), PAGE_SIZE) or rows.strides[1] != 1:
            raise ValueError("rows must be (n, PAGE_SIZE) with contiguous rows")
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.npages):
            raise UffdError(errno.EFAULT, f"page {int(index.max())} beyond RAM of {self.npages} pages")
        placed = 0
        addr, stride = rows.ctypes.data, rows.strides[0]
        with self.lock:
            for i in np.flatnonzero(~self.present[index]).tolist():
                p = int(index[i])
                if self.present[p]:
                    continue  # twice in this batch
                try:
                    self.own.copy(self.base + p * PAGE_SIZE, addr + i * stride, PAGE_SIZE)
                except PageExists:
                    self.stats.exists += 1
                    self._mark(p, 1)
                    continue
                placed += 1
                self.stats.placed += 1
                self._mark(p, 1)
        return placed

    def _copy(self, page: int, buf: np.ndarray, n: int) -> int:
        placed = 0
        while placed < n:
            p = page + placed
            try:
                done = self.own.copy(self.base + p * PAGE_SIZE, buf.ctypes.data + placed * PAGE_SIZE,
                                     (n - placed) * PAGE_SIZE) // PAGE_SIZE
            except PageExists:
                self.stats.exists += 1
                self._mark(p, 1)  # present already: wake whoever waits and move on
                placed += 1
                continue
            self.stats.placed += done
            self._mark(p, done)
            placed += done
        return placed

    def place_zero(self, page: int) -> bool:
        """Place a zero page unless present; True if placed."""
        if not 0 <= page < self.npages:
            raise UffdError(errno.EFAULT, f"page {page} beyond RAM of {self.npages} pages")
        with self.lock:
            if self.present[page]:
                return False
            try:
                if self.zeropage_ok:
                    self.own.zeropage(self.base + page * PAGE_SIZE, PAGE_SIZE)
                else:
                    self.own.copy(self.base + page * PAGE_SIZE, self._zero.ctypes.data, PAGE_SIZE)
            except PageExists:
                self.stats.exists += 1
                self._mark(page, 1)
                return False
            self.stats.placed += 1
            self.stats.zero += 1
            self._mark(page, 1)
            return True

    def _mark(self, page: int, n: int) -> None:
        self.present[page:page + n] = True
        if not self.waiting:
            return
        now = time.monotonic_ns()
        hits = (range(page, page + n) if n <= len(self.waiting)
                else [p for p in self.waiting if page <= p < page + n])
        for p in hits:
            entry = self.waiting.pop(p, None)
            if entry is not None:
                missed, who = entry
                k = self.stats.missed - len(self.waiting) - 1
                if 0 <= k < MAX_LATENCIES:
                    self.latencies[k] = now - missed
                self._wake(p, who, now)

    def poll(self, timeout: float | None) -> list[int]:
        """Wait up to `timeout` seconds for faults; returns the pages newly
        missed (each once, however many processes wait on it). Faults on pages
        already present are woken here."""
        events = self._poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
        new: list[int] = []
        with self.lock:
            now = time.monotonic_ns()
            for fd, _ in events:
                who = self._by_fd.get(fd)
                if who is None:
                    continue
                uffd = self.own if who < 0 else self.remotes[who].uffd
                for fault in uffd.read_faults():
                    self._fault(who, fault, now, new)
        return new

    def _fault(self, who: int, fault: Fault, now: int, new: list[int]) -> None:
        self.stats.faults += 1
        page = ((fault.address - self.base) // PAGE_SIZE if who < 0
                else self.remotes[who].page_of(fault.address))
        if not 0 <= page < self.npages:
            raise UffdError(errno.EFAULT, f"fault at {fault.address:#x} outside the RAM")
        if self.present[page]:
            self._wake(page, {who}, now)
            return
        if who >= 0:
            self._blocked_since.setdefault(who, now)
            if len(self._blocked_since) == len(self.remotes) and not self._all_since:
                self._all_since = now
        entry = self.waiting.get(page)
        if entry is None:
            self.waiting[page] = (now, {who})
            self.stats.missed += 1
            new.append(page)
        else:
            entry[1].add(who)

    def fault_latency_ms(self) -> dict[str, float]:
        """p50 / p99 / max of fault-to-placement times so far, in ms."""
        n = min(self.stats.missed - len(self.waiting), MAX_LATENCIES)
        if n <= 0:
            return {}
        lat = self.latencies[:n] / 1e6
        return {"count": n, "p50": round(float(np.percentile(lat, 50)), 3),
                "p99": round(float(np.percentile(lat, 99)), 3), "max": round(float(lat.max()), 3)}

    def missing(self) -> int:
        return int(self.npages - np.count_nonzero(self.present))

    def close(self) -> None:
        with self.lock:
            for r in self.remotes:
                r.uffd.close()
            self.remotes.clear()
            self.own.close()


def register_and_send(path: str, base: int, size: int, name: str) -> Userfaultfd:
    """What a vCPU process does when post-copy starts: register its own
    mapping of the RAM and hand the uffd to the page server at `path`. The
    caller keeps the returned uffd open until post-copy ends."""
    uffd = Userfaultfd.create()
    try:
        uffd.register(base, size)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            send_uffd(sock, uffd, base, size, name)
    except BaseException:
        uffd.close()
        raise
    return uffd
