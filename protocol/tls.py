"""TLS on migration channels, with QEMU's credentials and authorization objects.

The credential and authorization objects are in protocol/tlscreds.py. The
handshake runs first on a freshly connected channel, before any savevm byte.

Over a socket (tcp, unix, fd: of a socket), `SocketTlsChannel` lets OpenSSL
do the socket I/O itself (an ssl.SSLSocket): one call encrypts and sends a
whole batch, no copy through Python. Over an exec: command's two pipes,
`TlsChannel` runs the engine over memory BIOs and does its own I/O on the
descriptors. Both keep a deadline over the whole handshake and let the
source's return-path thread read while the writer writes: one lock guards the
engine, the descriptors are non-blocking, and nobody waits on I/O while
holding the lock.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from livemig.protocol.tlscreds import CLIENT_CERT, Authz, TlsError, X509Creds, peer_dn
from livemig.protocol.transport import Channel

CHUNK = 256 << 10  # plaintext handed to the engine per step, and raw bytes read per call
CLOSE_WAIT = 1.0  # seconds a closing channel waits to send its close_notify

# sessions ---------------------------------------------------------------------

@dataclass(frozen=True)
class Tls:
    """What one end of a channel needs for its handshake; the `tls=` argument
    of transport.connect and Listener.accept."""

    creds: X509Creds
    hostname: str | None = None  # client: the name the server's certificate must carry
    authz: Authz | None = None  # server: who may connect
    context: ssl.SSLContext = field(default=None, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.context is None:
            object.__setattr__(self, "context", self.creds.context())

    @property
    def server_side(self) -> bool:
        return self.creds.endpoint == "server"

    def wrap(self, channel: Channel, timeout: float | None) -> Channel:
        """Run the handshake on a freshly opened channel; close it on failure."""
        try:
            if channel.sock is not None:
                return SocketTlsChannel(channel, self, timeout)
            return TlsChannel(channel, self, timeout)
        except BaseException:
            channel.abort()
            channel.close()
            raise


def client_tls(creds: X509Creds, uri: Any, tls_hostname: str = "") -> Tls:
    """The source's side; `uri` has .scheme and .host (uri.Uri)."""
    if creds.endpoint != "client":
        raise TlsError(f"tls-creds {creds.id!r} has endpoint=server; a migration source needs endpoint=client")
    hostname = tls_hostname or (uri.host if uri.scheme == "tcp" else "")
    if creds.verify_peer and not hostname:
        raise TlsError(f"No hostname for certificate validation: a {uri.scheme}: migration over TLS "
                       "needs the tls-hostname parameter")
    return Tls(creds, hostname=hostname or None)


def server_tls(creds: X509Creds, authz: Authz | None = None) -> Tls:
    if creds.endpoint != "server":
        raise TlsError(f"tls-creds {creds.id!r} has endpoint=client; a migration destination needs endpoint=server")
    if authz is not None and not creds.verify_peer:
        raise TlsError(f"tls-authz {authz.id!r} needs client certificates: set verify-peer=on on "
                       f"tls-creds {creds.id!r}")
    return Tls(creds, authz=authz)


def _why(exc: BaseException, server: bool) -> str:
    """A handshake or session failure in words that name the cause."""
    peer = "source" if server else "destination"
    if isinstance(exc, ssl.SSLCertVerificationError):
        whose = "the source's client certificate" if server else "the destination's certificate"
        return f"{whose} was refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError | BrokenPipeError):
        return f"the {peer} closed the connection during the TLS handshake (does it use TLS?)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    reason = getattr(exc, "reason", None) or ""
    words = {
        "WRONG_VERSION_NUMBER": f"the {peer} does not speak TLS (a plaintext migration?)",
        "HTTP_REQUEST": f"the {peer} does not speak TLS",
        "UNKNOWN_PROTOCOL": f"the {peer} does not speak TLS",
        "RECORD_LAYER_FAILURE": f"the {peer} does not speak TLS",
        "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the source sent no client certificate, and this "
                                             "destination's tls-creds has verify-peer=on",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the destination requires a client certificate "
                                             f"({CLIENT_CERT} in this source's tls-creds dir)",
        "TLSV1_ALERT_UNKNOWN_CA": f"the {peer} does not trust our certificate (unknown CA)",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED": f"the {peer} says our certificate has expired",
        "SSLV3_ALERT_BAD_CERTIFICATE": f"the {peer} refused our certificate",
        "SSLV3_ALERT_CERTIFICATE_REVOKED": f"the {peer} says our certificate is revoked",
        "SSLV3_ALERT_HANDSHAKE_FAILURE": f"the {peer} found no common TLS parameters",
    }
    if reason in words:
        return words[reason]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _wait(fd: int, event: int, deadline: float | None) -> None:
    poller = select.poll()
    poller.register(fd, event)
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(errno.ETIMEDOUT, "timed out")
        if poller.poll(None if left is None else max(1, int(left * 1000))):
            return


_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                                   ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_IOV_MAX = 1024


def _rows(addrs: np.ndarray, size: int) -> np.ndarray | None:
    """The vectors of `size` bytes at `addrs` as an (n, size) array: a view of
    one run when they are consecutive, else gathered rows of the span they lie
    in; None when they do not sit on one grid of `size`."""
    lo = int(addrs.min())
    offsets = addrs - np.uint64(lo)
    if np.any(offsets % np.uint64(size)):
        return None
    span = int(offsets.max()) + size
    whole = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(lo)).reshape(-1, size)
    rows = (offsets // np.uint64(size)).astype(np.intp)
    if rows[0] == 0 and len(rows) == len(whole) and np.all(np.diff(rows) == 1):
        return whole
    return whole[rows]


def _gather_records(table: np.ndarray, out: np.ndarray) -> bool:
    """Copy a table of (header, page) vector pairs, each pair of the same two
    sizes (the ram writer's), into `out` with numpy; False for other tables."""
    if len(table) % 2 or not len(table):
        return False
    sizes = table[:2, 1]
    head, body = int(sizes[0]), int(sizes[1])
    if np.any(table[0::2, 1] != sizes[0]) or np.any(table[1::2, 1] != sizes[1]):
        return False
    parts = [_rows(table[0::2, 0], head), _rows(table[1::2, 0], body)]
    if parts[0] is None or parts[1] is None:
        return False
    grid = out[:len(table) // 2 * (head + body)].reshape(-1, head + body)
    grid[:, :head] = parts[0]
    grid[:, head:] = parts[1]
    return True


def _gather(table: np.ndarray, out: np.ndarray, total: int) -> None:
    """Copy the vectors of an iovec table to `out` in order: with numpy for the
    ram writer's (header, page) pairs (a strided copy per run of pages), else
    one process_vm_readv from our own process per IOV_MAX vectors, or memmove
    where the system refuses it."""
    if _gather_records(table, out):
        return
    dest = out.ctypes.data
    local = np.array([[dest, total]], np.uint64)
    at = 0
    for start in range(0, len(table), _IOV_MAX):
        part = np.ascontiguousarray(table[start:start + _IOV_MAX])
        want = int(part[:, 1].sum())
        local[0] = (dest + at, want)
        if _libc.process_vm_readv(os.getpid(), local.ctypes.data, 1, part.ctypes.data, len(part), 0) != want:
            for addr, n in part.tolist():
                ctypes.memmove(dest + at, addr, n)
                at += n
        else:
            at += want


def _joined(buf: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, memoryview]:
    """The vectors of `table` gathered into `buf` (grown as needed): (buf, the bytes)."""
    total = int(table[:, 1].sum())
    if len(buf) < total:
        buf = np.empty(total, np.uint8)
    _gather(table, buf, total)
    return buf, memoryview(buf)[:total]


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def tls_info(channel: Channel) -> dict | None:
    """What a channel's TLS session is, for query-migrate (None for plaintext)."""
    if not isinstance(channel, TlsChannel | SocketTlsChannel):
        return None
    info = {"version": channel.version, "cipher": channel.cipher}
    if channel.peer_dn:
        info["peer"] = channel.peer_dn
    return info


class TlsChannel(Channel):
    """A Channel whose bytes go through a TLS session over memory BIOs, with
    our own I/O on the raw channel's descriptors (an exec command's stdout and
    stdin; sockets use SocketTlsChannel)."""

    def __init__(self, raw: Channel, tls: Tls, timeout: float | None) -> None:
        if raw.proc is not None and raw.proc.stdin is not None and raw.proc.stdout is not None:
            rfd, wfd = raw.proc.stdout.fileno(), raw.proc.stdin.fileno()
            os.set_blocking(rfd, False)
            os.set_blocking(wfd, False)
        else:
            raise TlsError("TLS needs a two-way channel (a socket, or an exec: command's stdin and "
                           "stdout); this one only goes one way")
        super().__init__(wfd, None, raw.proc, raw.owns_fd)
        self.rfd = rfd
        self.tls = tls
        self.timeout = timeout
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = tls.context.wrap_bio(self._in, self._out, server_side=tls.server_side,
                                         server_hostname=tls.hostname)
        self._lock = threading.Lock()  # the TLS engine and its BIOs
        self._wlock = threading.Lock()  # one writer at a time, records in order
        self._rlock = threading.Lock()
        self._rbuf = bytearray(CHUNK)
        self._joined = np.zeros(0, np.uint8)
        self.peer_dn = ""
        try:
            self._handshake(_deadline(timeout))
        except TimeoutError:
            peer = "source" if tls.server_side else "destination"
            raise TlsError(f"TLS handshake failed: the {peer} did not complete it within {timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"TLS handshake failed: {_why(exc, tls.server_side)}") from None
        self.cipher, self.version, _ = self._ssl.cipher()
        self._authorize()

    # handshake ---------------------------------------------------------------
    def _handshake(self, deadline: float | None) -> None:
        while True:
            try:
                with self._lock:
                    self._ssl.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except ssl.SSLError:
                self._send_pending(deadline, best_effort=True)  # the alert tells the peer why
                raise
            self._send_pending(deadline)
            if done:
                return
            self._fill(deadline)

    def _authorize(self) -> None:
        if not self.tls.server_side or not self.tls.creds.verify_peer:
            return
        self.peer_dn = peer_dn(self._ssl.getpeercert() or {})
        authz = self.tls.authz
        if authz is not None and not authz.allows(self.peer_dn):
            raise TlsError(f"TLS client {self.peer_dn!r} is not allowed by {authz.qom_type} {authz.id!r}")

    # raw I/O -----------------------------------------------------------------
    def _fill(self, deadline: float | None) -> int:
        """Move raw bytes from the descriptor into the engine; 0 at end of input."""
        while True:
            try:
                n = os.readv(self.rfd, [self._rbuf])
                break
            except BlockingIOError:
                _wait(self.rfd, select.POLLIN, deadline)
            except ConnectionResetError:
                n = 0
                break
        with self._lock:
            if n:
                self._in.write(memoryview(self._rbuf)[:n])
            else:
                self._in.write_eof()
        return n

    def _send_pending(self, deadline: float | None, best_effort: bool = False) -> None:
        """Send what the engine has produced, in order (caller holds _wlock or
        is alone on the channel)."""
        while True:
            with self._lock:
                data = self._out.read()
            if not data:
                return
            view = memoryview(data)
            try:
                while view:
                    try:
                        view = view[os.write(self.fd, view):]
                    except BlockingIOError:
                        _wait(self.fd, select.POLLOUT, deadline)
            except (BrokenPipeError, ConnectionResetError):
                if not best_effort:
                    raise TlsError(self._why_closed()) from None
            except OSError:
                if not best_effort:
                    raise

    def _why_closed(self) -> str:
        """The peer shut the session while we wrote: its alert, if one came, says why."""
        peer = "source" if self.tls.server_side else "destination"
        try:
            n = os.readv(self.rfd, [self._rbuf])
            with self._lock:
                self._in.write(memoryview(self._rbuf)[:n])
                self._ssl.read(1)
        except ssl.SSLError as exc:
            if exc.reason and not isinstance(exc, ssl.SSLEOFError):
                return f"TLS session failed: {_why(exc, self.tls.server_side)}"
        except OSError:
            pass
        return (f"the {peer} closed the TLS session (if it refused this host's certificate or "
                f"its tls-authz denied it, the {peer} says which)")

    # Channel ---------------------------------------------------------------
    def settimeout(self, seconds: float | None) -> None:
        self.timeout = seconds

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        deadline = _deadline(self.timeout)
        with self._wlock:
            for start in range(0, len(view), CHUNK):
                with self._lock:
                    try:
                        self._ssl.write(view[start:start + CHUNK])
                    except ssl.SSLError as exc:
                        raise TlsError(f"TLS session failed: {_why(exc, self.tls.server_side)}") from None
                self._send_pending(deadline)

    def write_vectors(self, table: np.ndarray) -> int:
        """Gather the vectors into one buffer (the engine encrypts from one
        buffer) and write it."""
        self._joined, view = _joined(self._joined, table)
        self.write(view)
        return len(view)

    def read_into(self, buf: memoryview) -> int:
        if not len(buf):
            return 0
        deadline = _deadline(self.timeout)
        with self._rlock:
            while True:
                got = self._read_decrypted(buf)
                if got is not None:
                    return got
                self._fill(deadline)

    def _read_decrypted(self, buf: memoryview) -> int | None:
        """What the engine holds, as many records as fit; None when it needs input."""
        got = 0
        with self._lock:
            try:
                while got < len(buf):
                    n = self._ssl.read(len(buf) - got, buf[got:])
                    if not n:
                        break
                    got += n
            except ssl.SSLWantReadError:
                if not got:
                    return None
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                pass  # QEMU ends without close_notify; the stream's own end marks a whole stream
            except ssl.SSLError as exc:
                if not got:
                    raise TlsError(f"TLS session failed: {_why(exc, self.tls.server_side)}") from None
            pending = self._out.pending
        if pending and self._wlock.acquire(blocking=False):  # e.g. a key update's answer
            try:
                self._send_pending(_deadline(self.timeout), best_effort=True)
            finally:
                self._wlock.release()
        return got

    def _close_notify(self) -> None:
        if not self._wlock.acquire(timeout=CLOSE_WAIT):
            return
        try:
            with self._lock:
                try:
                    self._ssl.unwrap()
                except ssl.SSLError:
                    pass  # WantRead: ours is sent, the peer's is not awaited
            self._send_pending(_deadline(CLOSE_WAIT), best_effort=True)
        except TimeoutError:
            pass
        finally:
            self._wlock.release()

    def close(self) -> int:
        if not self.closed:
            self._close_notify()
            proc = self.proc
            if proc is not None and proc.stdin is not None and proc.stdout is not None:
                # The command's end of input, then what it still says until it exits:
                # it must not die of a closed pipe while it finishes.
                proc.stdin.close()
                self.owns_fd = False
                self._drain(_deadline(30))
                proc.stdout.close()
        return super().close()

    def _drain(self, deadline: float | None) -> None:
        while True:
            try:
                if not os.readv(self.rfd, [self._rbuf]):
                    return
            except BlockingIOError:
                try:
                    _wait(self.rfd, select.POLLIN, deadline)
                except TimeoutError:
                    return
            except OSError:
                return


class SocketTlsChannel(Channel):
    """A Channel whose bytes go through a TLS session that OpenSSL runs on the
    socket itself (ssl.SSLSocket): a write encrypts and sends a whole batch in
    one call, a read decrypts the records the socket holds into the caller's
    buffer."""

    def __init__(self, raw: Channel, tls: Tls, timeout: float | None) -> None:
        assert raw.sock is not None
        sock = tls.context.wrap_socket(raw.sock, server_side=tls.server_side, server_hostname=tls.hostname,
                                       do_handshake_on_connect=False, suppress_ragged_eofs=False)
        sock.setblocking(False)  # waits are ours, with a deadline, outside the lock
        super().__init__(sock.fileno(), sock, None, raw.owns_fd)
        self.ssl = sock
        self.tls = tls
        self.timeout = timeout
        self._lock = threading.Lock()  # the TLS engine: one call at a time
        self._wlock = threading.Lock()  # one writer at a time, records in order
        self._rlock = threading.Lock()
        self._joined = np.zeros(0, np.uint8)
        self.peer_dn = ""
        try:
            self._start(timeout)
        except BaseException:
            sock.close()
            raise

    def _start(self, timeout: float | None) -> None:
        tls, sock = self.tls, self.ssl
        try:
            self._call(sock.do_handshake, _deadline(timeout))
        except TimeoutError:
            peer = "source" if tls.server_side else "destination"
            raise TlsError(f"TLS handshake failed: the {peer} did not complete it within {timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            raise TlsError(f"TLS handshake failed: {_why(exc, tls.server_side)}") from None
        self.cipher, self.version, _ = sock.cipher()
        if tls.server_side and tls.creds.verify_peer:
            self.peer_dn = peer_dn(sock.getpeercert() or {})
            if tls.authz is not None and not tls.authz.allows(self.peer_dn):
                raise TlsError(f"TLS client {self.peer_dn!r} is not allowed by "
                               f"{tls.authz.qom_type} {tls.authz.id!r}")

    def _call(self, op: Any, deadline: float | None, *args: Any) -> Any:
        """Run one engine operation, waiting (without the lock) for the socket
        whenever it wants to read or write."""
        while True:
            with self._lock:
                try:
                    return op(*args)
                except ssl.SSLWantReadError:
                    event = select.POLLIN
                except ssl.SSLWantWriteError:
                    event = select.POLLOUT
            _wait(self.fd, event, deadline)

    def settimeout(self, seconds: float | None) -> None:
        self.timeout = seconds

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        if not len(view):
            return
        with self._wlock:
            try:
                # SSL_write takes the whole buffer; after a wait it resumes where it stopped.
                self._call(self.ssl.write, _deadline(self.timeout), view)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
                raise TlsError(self._why_closed()) from None
            except ssl.SSLError as exc:
                raise TlsError(f"TLS session failed: {_why(exc, self.tls.server_side)}") from None
            self.out += len(view)

    def write_vectors(self, table: np.ndarray) -> int:
        """Gather the vectors into one buffer (the engine encrypts from one
        buffer) and write it."""
        self._joined, view = _joined(self._joined, table)
        self.write(view)
        return len(view)

    def read_into(self, buf: memoryview) -> int:
        if not len(buf):
            return 0
        with self._rlock:
            got = self._call(self._read_records, _deadline(self.timeout), buf)
            return got

    def _read_records(self, buf: memoryview) -> int:
        """As many decrypted records as the socket holds and `buf` takes (the
        engine returns one record per call); raises SSLWantReadError when none."""
        got = 0
        try:
            while got < len(buf):
                n = self.ssl.read(len(buf) - got, buf[got:])
                if not n:
                    break
                got += n
        except ssl.SSLWantReadError:
            if not got:
                raise
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError):
            pass  # QEMU ends without close_notify; the stream's own end marks a whole stream
        except ssl.SSLError as exc:
            if not got:
                raise TlsError(f"TLS session failed: {_why(exc, self.tls.server_side)}") from None
        return got

    def _why_closed(self) -> str:
        """The peer shut the session while we wrote: its alert, if one came, says why."""
        peer = "source" if self.tls.server_side else "destination"
        try:
            with self._lock:
                self.ssl.read(1)
        except ssl.SSLError as exc:
            if exc.reason and not isinstance(exc, ssl.SSLEOFError | ssl.SSLWantReadError):
                return f"TLS session failed: {_why(exc, self.tls.server_side)}"
        except OSError:
            pass
        return (f"the {peer} closed the TLS session (if it refused this host's certificate or "
                f"its tls-authz denied it, the {peer} says which)")

    def shutdown_write(self) -> None:
        try:
            socket.socket.shutdown(self.ssl, socket.SHUT_WR)  # SSLSocket.shutdown would drop the session
        except OSError:
            pass

    def abort(self) -> None:
        try:
            socket.socket.shutdown(self.ssl, socket.SHUT_RDWR)
        except OSError:
            pass

    def _close_notify(self) -> None:
        deadline = _deadline(CLOSE_WAIT)
        while True:
            with self._lock:
                try:
                    self.ssl.unwrap()
                    return
                except ssl.SSLWantWriteError:
                    pass
                except (OSError, ssl.SSLError, ValueError):
                    return  # WantRead: ours is sent, the peer's is not awaited
            try:
                _wait(self.fd, select.POLLOUT, deadline)
            except TimeoutError:
                return

    def close(self) -> int:
        if not self.closed and self._wlock.acquire(timeout=CLOSE_WAIT):
            try:
                self._close_notify()
            finally:
                self._wlock.release()
        return super().close()
