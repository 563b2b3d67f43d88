"""The byte channels behind migration URIs (parsed by protocol.uri).

tcp:HOST:PORT, unix:PATH, exec:CMD, fd:N and file:PATH[,offset=N], in both
directions. Sockets (tcp, unix, and fd: when the descriptor is a socket) also
carry a return path from the destination back to the source. Every kind keeps
to its timeout (settimeout): a socket by its own, a pipe or FIFO (exec:, fd:,
file:) by being non-blocking and waiting in poll; a regular file never waits.
"""

from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import math
import os
import select
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np

from livemig.protocol.uri import Uri


class TransportError(OSError):
    """A URI that cannot be used, or a channel that failed."""


# writev over (address, length) tables that numpy builds in bulk: a page
# record is an 8-byte header plus a page of guest RAM, so a batch is hundreds
# of small vectors that os.writev would want as so many Python objects.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.writev.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_libc.writev.restype = ctypes.c_ssize_t
IOV_MAX = 1024  # the kernel's limit on vectors per call
UNIX_SEND_BUFFER = 4 << 20
SIOCOUTQ = 0x5411  # bytes a socket holds that the peer has not acknowledged (TIOCOUTQ)


def no_progress(seconds: float) -> str:
    """Why a channel was given up on when its bytes stopped moving."""
    return f"no progress for {seconds:g} s (x-transport-timeout)"


def iovec_table(n: int) -> np.ndarray:
    """An empty table of n struct iovec: column 0 the address, column 1 the length."""
    return np.zeros((n, 2), np.uint64)


def _wait(fd: int, event: int, timeout: float | None) -> None:
    """Wait for `event` on a non-blocking descriptor, at most `timeout` seconds."""
    poller = select.poll()
    poller.register(fd, event)
    if not poller.poll(None if timeout is None else math.ceil(timeout * 1000)):
        raise TimeoutError(errno.ETIMEDOUT, "timed out")


def _writev(fd: int, table: np.ndarray, timeout: float | None) -> int:
    """One writev of up to IOV_MAX vectors of `table`, waiting at most
    `timeout` for room (sockets with a timeout are non-blocking)."""
    count = min(len(table), IOV_MAX)
    while True:
        n = _libc.writev(fd, table.ctypes.data, count)
        if n >= 0:
            return n
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err != errno.EAGAIN:
            raise OSError(err, os.strerror(err))
        _wait(fd, select.POLLOUT, timeout)


def iovec_skip(table: np.ndarray, done: int) -> np.ndarray:
    """The vectors of `table` after its first `done` bytes (a copy when a vector is cut)."""
    ends = np.cumsum(table[:, 1])
    i = int(np.searchsorted(ends, done, side="right"))
    rest = table[i:]
    cut = done - (int(ends[i - 1]) if i else 0)
    if cut and len(rest):
        rest = rest.copy()
        rest[0, 0] += np.uint64(cut)
        rest[0, 1] -= np.uint64(cut)
    return rest


class Channel:
    """One direction of a migration (plus, for sockets, the return path)."""

    def __init__(self, fd: int, sock: socket.socket | None = None,
                 proc: subprocess.Popen | None = None, owns_fd: bool = True) -> None:
        self.fd = fd
        self.sock = sock
        self.proc = proc
        self.owns_fd = owns_fd
        self.closed = False
        self.opened = time.monotonic()  # a deadline over the whole connection starts here
        self.out = 0  # bytes handed to the kernel, counted per system call
        self.timeout: float | None = None  # for a descriptor: the longest wait for room or data

    def unsent(self) -> int:
        """Bytes written but still in this host's kernel (or unacknowledged):
        for a socket its send queue; other channels do not say (0)."""
        if self.sock is None or self.closed:
            return 0
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self.sock.fileno(), SIOCOUTQ, buf)
        except OSError:
            return 0
        return buf[0]

    @property
    def has_return_path(self) -> bool:
        return self.sock is not None

    def write(self, data: bytes | memoryview) -> None:
        if self.sock is not None:
            self.sock.sendall(data)
            self.out += len(data)
            return
        view = memoryview(data).cast("B")
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                _wait(self.fd, select.POLLOUT, self.timeout)
                continue
            self.out += n
            view = view[n:]

    def read_into(self, buf: memoryview) -> int:
        if self.sock is not None:
            return self.sock.recv_into(buf)
        while True:
            try:
                return os.readv(self.fd, [buf])
            except BlockingIOError:
                _wait(self.fd, select.POLLIN, self.timeout)

    def recv(self, n: int) -> bytes:
        """Up to n bytes (b"" at the end), for small messages such as the return path's."""
        buf = bytearray(n)
        return bytes(buf[:self.read_into(memoryview(buf))])

    def write_vectors(self, table: np.ndarray) -> int:
        """Write every vector of an iovec table (see iovec_table) in order;
        returns the bytes written."""
        fd, timeout = (self.sock.fileno(), self.sock.gettimeout()) if self.sock is not None else (self.fd, self.timeout)
        total = int(table[:, 1].sum())
        left = total
        while left:
            n = _writev(fd, table, timeout)
            self.out += n
            left -= n
            if left:
                table = iovec_skip(table, n)
        return total

    def settimeout(self, seconds: float | None) -> None:
        self.timeout = seconds
        if self.sock is not None:
            self.sock.settimeout(seconds)

    def shutdown_write(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def abort(self) -> None:
        """Make a blocked read or write in another thread fail now."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> int:
        """Close; for exec: channels, wait for the command and return its status."""
        if self.closed:
            return 0
        self.closed = True
        if self.sock is not None:
            self.sock.close()
        elif self.owns_fd:
            try:
                os.close(self.fd)
            except OSError:
                pass
        if self.proc is not None:
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(timeout=5)
        return 0


def _socket_from_fd(fd: int) -> socket.socket | None:
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        return None
    return socket.socket(fileno=os.dup(fd))


def _fd_channel(fd: int, mode: int) -> Channel:
    """A channel over a passed descriptor that is not a socket. A pipe or FIFO
    is opened again (its own open file description, non-blocking, so that
    the timeout bounds every wait and the passer's stays as it was); a file
    is duplicated, keeping the offset where the passer left it."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return Channel(os.dup(fd))
    try:
        return Channel(os.open(f"/proc/self/fd/{fd}", mode | os.O_NONBLOCK))
    except OSError:
        return Channel(os.dup(fd))  # cannot be opened again (a tty?): blocking, as passed


def _nonblocking(channel: Channel) -> Channel:
    os.set_blocking(channel.fd, False)
    return channel


def _open_file(uri: Uri, timeout: float) -> Channel:
    """file:PATH[,offset=N] for writing: created or truncated to the offset
    (as QEMU does), the stream written from there. A FIFO waits, up to
    `timeout`, for its reader."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(uri.target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK, 0o600)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() >= deadline:
                raise  # ENXIO: a FIFO nobody reads yet
            time.sleep(0.05)
    channel = Channel(fd)
    try:
        _seek(fd, uri, truncate=True)
    except OSError:
        channel.close()
        raise
    return channel


def _seek(fd: int, uri: Uri, truncate: bool = False) -> None:
    if not uri.offset:
        return
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        raise TransportError(f"{uri}: offset= needs a regular file")
    if truncate:
        os.ftruncate(fd, uri.offset)
    os.lseek(fd, uri.offset, os.SEEK_SET)


class Handshake(Protocol):
    """What `tls=` takes (protocol/tls.py's Tls): it runs a handshake on a
    freshly opened channel and returns the channel to use instead."""

    def wrap(self, channel: Channel, timeout: float | None) -> Channel: ...


def connect(uri: Uri, timeout: float = 10.0, tls: Handshake | None = None) -> Channel:
    """Open the outgoing side of a migration; with `tls`, the TLS handshake
    runs first, within `timeout`."""
    channel = _open(uri, timeout, two_way=tls is not None)
    return tls.wrap(channel, timeout) if tls is not None else channel


def _open(uri: Uri, timeout: float, two_way: bool) -> Channel:
    try:
        if uri.scheme == "tcp":
            if not uri.host:
                raise TransportError(f"tcp URI {uri} names no host to connect to")
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return Channel(sock.fileno(), sock)
        if uri.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            # Room for a whole batch of page records: a unix socket's default
            # (about 200 KiB, never grown) cut each writev into a dozen.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SEND_BUFFER)
            sock.settimeout(timeout)
            sock.connect(uri.target)
            sock.settimeout(None)
            return Channel(sock.fileno(), sock)
        if uri.scheme == "exec":
            # A TLS handshake needs the command's answers too: its stdout.
            proc = subprocess.Popen(["/bin/sh", "-c", uri.target], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE if two_way else None)
            assert proc.stdin is not None
            return _nonblocking(Channel(proc.stdin.fileno(), proc=proc))
        if uri.scheme == "fd":
            fd = int(uri.target)
            sock = _socket_from_fd(fd)
            if sock is not None:
                return Channel(sock.fileno(), sock)
            return _fd_channel(fd, os.O_WRONLY)
        if two_way:
            raise TransportError(f"TLS needs a two-way channel; {uri} is a file")
        return _open_file(uri, timeout)
    except TransportError:
        raise
    except OSError as exc:
        raise TransportError(f"cannot open {uri}: {exc.strerror or exc}") from None


def tcp_listener(host: str, port: int) -> socket.socket:
    """A socket bound to exactly the address named; none (tcp::PORT) is every
    address, IPv4 and IPv6, as in QEMU."""
    if not host:
        host = "::" if socket.has_ipv6 else "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class Listener:
    """The incoming side: accepts exactly one connection."""

    def __init__(self, uri: Uri, backlog: int = 1) -> None:
        """backlog: connections the kernel completes before they are accepted
        (multifd's channels arrive together with the main one)."""
        self.uri = uri
        self.sock: socket.socket | None = None
        self.address: tuple | str | None = None
        try:
            if uri.scheme == "tcp":
                self.sock = tcp_listener(uri.host, uri.port)
                self.sock.listen(backlog)
                self.address = self.sock.getsockname()[:2]
            elif uri.scheme == "unix":
                if os.path.exists(uri.target) and stat.S_ISSOCK(os.stat(uri.target).st_mode):
                    os.unlink(uri.target)
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.bind(uri.target)
                self.sock.listen(backlog)
                self.address = uri.target
        except OSError as exc:
            raise TransportError(f"cannot listen on {uri}: {exc.strerror or exc}") from None

    @property
    def actual_uri(self) -> str:
        if self.uri.scheme == "tcp" and self.address:
            host, port = self.address
            host = f"[{host}]" if ":" in host else host
            return f"tcp:{host}:{port}"
        return str(self.uri)

    def accept(self, timeout: float | None = None, tls: Handshake | None = None,
               handshake_timeout: float | None = 30.0,
               on_refused: Callable[[str], None] | None = None) -> Channel:
        """The migration's connection. With `tls`, a connection whose handshake
        fails (a plaintext or wrongly certified peer, one the authz rules deny,
        one that dawdles past `handshake_timeout`) is closed, reported to
        `on_refused`, and a socket listener waits for the next one."""
        while True:
            channel = self._accept(timeout, two_way=tls is not None)
            if tls is None:
                return channel
            try:
                return tls.wrap(channel, handshake_timeout)
            except OSError as exc:
                if self.sock is None:
                    raise  # exec: and fd: have no second connection to wait for
                if on_refused is not None:
                    on_refused(str(exc))

    def _accept(self, timeout: float | None, two_way: bool) -> Channel:
        try:
            if self.sock is not None:
                self.sock.settimeout(timeout)
                conn, _ = self.sock.accept()
                conn.settimeout(None)
                if self.uri.scheme == "tcp":
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
                return Channel(conn.fileno(), conn)
            if self.uri.scheme == "exec":
                proc = subprocess.Popen(["/bin/sh", "-c", self.uri.target], stdout=subprocess.PIPE,
                                        stdin=subprocess.PIPE if two_way else None)
                assert proc.stdout is not None
                return _nonblocking(Channel(proc.stdout.fileno(), proc=proc))
            if self.uri.scheme == "fd":
                fd = int(self.uri.target)
                sock = _socket_from_fd(fd)
                if sock is not None:
                    return Channel(sock.fileno(), sock)
                return _fd_channel(fd, os.O_RDONLY)
            if two_way:
                raise TransportError(f"TLS needs a two-way channel; {self.uri} is a file")
            # Blocking open: a FIFO waits for its writer here, as a socket for its connection.
            channel = _nonblocking(Channel(os.open(self.uri.target, os.O_RDONLY)))
            try:
                _seek(channel.fd, self.uri)
            except OSError:
                channel.close()
                raise
            return channel
        except (TimeoutError, TransportError):
            raise
        except OSError as exc:
            raise TransportError(f"cannot accept on {self.uri}: {exc.strerror or exc}") from None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.uri.scheme == "unix":
                try:
                    os.unlink(self.uri.target)
                except OSError:
                    pass
