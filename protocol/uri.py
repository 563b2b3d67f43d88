"""Addresses as text, parsed in one place: migration URIs (tcp:HOST:PORT,
unix:PATH, exec:CMD, fd:N, file:PATH[,offset=N]) and QMP monitor addresses
(unix:PATH, tcp:HOST:PORT). An IPv6 host is written in brackets: tcp:[::1]:4444; no host
(tcp::PORT) is every address to listen on, as in QEMU."""

from __future__ import annotations

from dataclasses import dataclass

from livemig.protocol.units import parse_size

SCHEMES = ("tcp", "unix", "exec", "fd", "file")


class UriError(ValueError):
    """An address that cannot be parsed."""


@dataclass(frozen=True)
class Uri:
    scheme: str
    target: str  # host:port, path, command line or descriptor number
    host: str = ""
    port: int = 0
    offset: int = 0  # file: where the stream starts in the file, as QEMU's offset=

    def __str__(self) -> str:
        return f"{self.scheme}:{self.target}" + (f",offset={self.offset}" if self.offset else "")


def tcp_uri(text: str, rest: str, what: str) -> Uri:
    """`rest` of tcp:REST is 'HOST:PORT', '[V6]:PORT' or ':PORT' (no host)."""
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UriError(f"{what} {text!r} must be tcp:HOST:PORT")
    return Uri("tcp", rest, host.strip("[]"), int(port))


def parse_uri(text: str) -> Uri:
    """A migration URI."""
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in SCHEMES:
        raise UriError(
            f"unsupported migration URI {text!r}: use tcp:HOST:PORT, unix:PATH, exec:CMD, fd:N or file:PATH")
    if not rest:
        raise UriError(f"migration URI {text!r} has nothing after {scheme}:")
    if scheme == "tcp":
        return tcp_uri(text, rest, "tcp URI")
    if scheme == "fd" and not rest.isdigit():
        raise UriError(f"fd URI {text!r} must name a descriptor number")
    if scheme == "file":
        return file_uri(text, rest)
    return Uri(scheme, rest)


def file_uri(text: str, rest: str) -> Uri:
    """file:PATH[,offset=N]: as in QEMU, an option follows the last comma and
    offset= (bytes, or with a K/M/G suffix) is the only one."""
    path, sep, option = rest.rpartition(",")
    if not sep:
        return Uri("file", rest)
    name, _, value = option.partition("=")
    if name != "offset":
        raise UriError(f"file URI {text!r} has unknown option {option!r} (file: takes only offset=N)")
    try:
        offset = parse_size(value)
    except ValueError as exc:
        raise UriError(f"file URI {text!r} has a bad offset: {exc}") from None
    if not path:
        raise UriError(f"file URI {text!r} names no file")
    return Uri("file", path, offset=offset)


def parse_qmp_address(text: str) -> Uri:
    """A QMP monitor address: unix:PATH, or tcp:HOST:PORT."""
    scheme, _, rest = text.partition(":")
    if scheme == "unix":
        return Uri(scheme, rest)
    if scheme == "tcp":
        return tcp_uri(text, rest, "QMP address")
    raise UriError(f"QMP address must be unix:PATH or tcp:HOST:PORT, not {text!r}")
