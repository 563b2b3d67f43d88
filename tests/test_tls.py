"""TLS on migration channels with real certificates over loopback sockets:
QEMU's objects, the handshake, authorization, and each refusal's cause."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from livemig.protocol.objects import ObjectError, ObjectStore, create, parse_option
from livemig.protocol.tls import Tls, client_tls, server_tls
from livemig.protocol.tlscreds import Authz, TlsError, peer_dn
from livemig.protocol.transport import Channel, Listener, connect, iovec_table
from livemig.protocol.uri import parse_uri
from livemig.tools.tls_certs import CLIENT_DN, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def creds(path: Path, endpoint: str, **props):
    return create({"qom-type": "tls-creds-x509", "id": f"tls-{endpoint}", "dir": str(path),
                   "endpoint": endpoint, **props})


def simple(identity: str = CLIENT_DN) -> Authz:
    return create({"qom-type": "authz-simple", "id": "auth0", "identity": identity})


class Ends:
    """A listener and a client on loopback, each end's handshake in its own thread."""

    def __init__(self, server: Tls | None, client: Tls | None, uri: str = "tcp:127.0.0.1:0",
                 timeout: float = 5.0) -> None:
        self.listener = Listener(parse_uri(uri))
        self.results: dict[str, object] = {}
        target = parse_uri(self.listener.actual_uri)
        threads = [threading.Thread(target=self.run, args=("server", lambda: self.accept(server, timeout))),
                   threading.Thread(target=self.run, args=("client", lambda: self.connect(target, client, timeout)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.listener.close()

    def accept(self, tls: Tls | None, timeout: float) -> Channel:
        channel = self.listener.accept(timeout=10)
        return tls.wrap(channel, timeout) if tls else channel

    @staticmethod
    def connect(uri, tls: Tls | None, timeout: float) -> Channel:
        channel = connect(uri)
        return tls.wrap(channel, timeout) if tls else channel

    def run(self, name: str, fn) -> None:
        try:
            self.results[name] = fn()
        except Exception as exc:  # the test looks at it
            self.results[name] = exc

    def channel(self, name: str) -> Channel:
        got = self.results[name]
        assert isinstance(got, Channel), f"{name}: {got}"
        return got

    def error(self, name: str) -> str:
        got = self.results[name]
        assert isinstance(got, TlsError), f"{name} did not fail with a TLS error: {got!r}"
        return str(got)

    def close(self) -> None:
        for got in self.results.values():
            if isinstance(got, Channel):
                got.close()


def read_exact(channel: Channel, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = channel.read_into(view[got:])
        assert k, f"end of input after {got} of {n} bytes"
        got += k
    return bytes(buf)


def tcp_client(pki, path=None, **kw) -> Tls:
    return client_tls(creds(path or pki.client, "client", **kw), parse_uri("tcp:127.0.0.1:1"))


# the session works ------------------------------------------------------------

def test_stream_both_ways_with_client_certificate_and_authz(pki):
    ends = Ends(server_tls(creds(pki.server, "server"), simple()), tcp_client(pki))
    try:
        src, dst = ends.channel("client"), ends.channel("server")
        assert dst.peer_dn == CLIENT_DN
        assert src.version in ("TLSv1.3", "TLSv1.2") and src.cipher == dst.cipher
        ram = np.random.default_rng(1).integers(0, 256, 8 << 20, np.uint8)
        headers = np.arange(64, dtype=">u8")
        table = iovec_table(128)  # header, page, header, page ... as the page encoder builds
        table[0::2, 0] = headers.ctypes.data + 8 * np.arange(64, dtype=np.uint64)
        table[0::2, 1] = 8
        table[1::2, 0] = ram.ctypes.data + 4096 * np.arange(0, 128, 2, dtype=np.uint64)
        table[1::2, 1] = 4096
        expect = b"".join(headers[i:i + 1].tobytes() + ram[8192 * i:8192 * i + 4096].tobytes() for i in range(64))
        back: list[bytes] = []
        # The return path: the destination writes while the source's own thread reads.
        reader = threading.Thread(target=lambda: back.append(read_exact(src, 4 * 1000)))
        reader.start()
        sender = threading.Thread(target=lambda: [dst.write(b"pong" * 10) for _ in range(100)])
        sender.start()
        src.write(ram.data)
        assert src.write_vectors(table) == len(expect)
        got = read_exact(dst, len(ram) + len(expect))
        sender.join(10)
        reader.join(10)
        assert got[:len(ram)] == ram.tobytes() and got[len(ram):] == expect
        assert back == [b"pong" * 1000]
        src.close()  # close_notify, then the end of input
        assert dst.read_into(memoryview(bytearray(10))) == 0
    finally:
        ends.close()


def test_unix_needs_tls_hostname_and_works_with_it(pki, tmp_path):
    uri = parse_uri(f"unix:{tmp_path}/mig.sock")
    with pytest.raises(TlsError, match="No hostname for certificate validation.*tls-hostname"):
        client_tls(creds(pki.client, "client"), uri)
    client = client_tls(creds(pki.client, "client"), uri, tls_hostname="migration.test")
    ends = Ends(server_tls(creds(pki.server, "server")), client, uri=str(uri))
    try:
        ends.channel("client").write(b"QEVM")
        assert read_exact(ends.channel("server"), 4) == b"QEVM"
    finally:
        ends.close()


def test_ragged_end_reads_as_end_of_input(pki):
    """QEMU never sends close_notify: its end of stream is the socket's end."""
    ends = Ends(server_tls(creds(pki.server, "server")), tcp_client(pki))
    try:
        src, dst = ends.channel("client"), ends.channel("server")
        src.write(b"tail")
        src.sock.close()  # no close_notify
        assert read_exact(dst, 4) == b"tail"
        assert dst.read_into(memoryview(bytearray(10))) == 0
    finally:
        ends.close()


# each refusal names its cause --------------------------------------------------

def test_wrong_ca(pki):
    ends = Ends(server_tls(creds(pki.server, "server")), tcp_client(pki, pki.client_wrong_ca))
    ends.close()
    # The server sends its CA along with its certificate: one the source does not trust.
    assert "destination's certificate was refused: self-signed certificate in certificate chain" \
        in ends.error("client")
    assert "does not trust our certificate (unknown CA)" in ends.error("server")


def test_client_certificate_from_another_ca(pki):
    rogue = tcp_client(pki, pki.client_rogue, **{"sanity-check": False})
    ends = Ends(server_tls(creds(pki.server, "server")), rogue)
    ends.close()
    assert "source's client certificate was refused: unable to get local issuer certificate" in ends.error("server")


def test_server_certificate_from_another_ca(pki):
    ends = Ends(server_tls(creds(pki.server_rogue, "server", **{"sanity-check": False})), tcp_client(pki))
    ends.close()
    assert "destination's certificate was refused: unable to get local issuer certificate" in ends.error("client")


def test_hostname_mismatch(pki):
    client = client_tls(creds(pki.client, "client"), parse_uri("tcp:127.0.0.1:1"), tls_hostname="other.example")
    ends = Ends(server_tls(creds(pki.server, "server")), client)
    ends.close()
    assert "Hostname mismatch, certificate is not valid for 'other.example'" in ends.error("client")


def test_expired_certificate(pki):
    with pytest.raises(ObjectError, match="server-cert.pem fails against ca-cert.pem: certificate has expired"):
        creds(pki.server_expired, "server")
    ends = Ends(server_tls(creds(pki.server_expired, "server", **{"sanity-check": "off"})), tcp_client(pki))
    ends.close()
    assert "destination's certificate was refused: certificate has expired" in ends.error("client")
    assert "says our certificate has expired" in ends.error("server")


def test_plaintext_source_to_tls_destination(pki):
    listener = Listener(parse_uri("tcp:127.0.0.1:0"))
    with socket.create_connection(listener.address) as plain:
        plain.sendall(b"QEVM\0\0\0\x03")
        with pytest.raises(TlsError, match=r"the source does not speak TLS \(a plaintext migration\?\)"):
            server_tls(creds(pki.server, "server")).wrap(listener.accept(timeout=10), 5)
    listener.close()


def test_tls_source_to_plaintext_destination(pki):
    def plain_destination() -> None:
        conn = listener.accept(timeout=10)
        read_exact(conn, 5)  # a ClientHello is no savevm stream: give up on it
        conn.close()

    listener = Listener(parse_uri("tcp:127.0.0.1:0"))
    t = threading.Thread(target=plain_destination)
    t.start()
    try:
        with pytest.raises(TlsError, match="destination closed the connection during the TLS handshake"):
            tcp_client(pki).wrap(connect(parse_uri(listener.actual_uri)), 5)
    finally:
        t.join(10)
        listener.close()


def test_denied_dn(pki):
    ends = Ends(server_tls(creds(pki.server, "server"), simple()), tcp_client(pki, pki.client_other))
    ends.close()
    assert ends.error("server") == ("TLS client 'O=livemig,CN=intruder' is not allowed by "
                                    "authz-simple 'auth0'")


def test_authz_list_rules_in_order_then_default(pki):
    rules = create(parse_option("authz-list,id=auth1,policy=deny,"
                                "rules.0.match=O=livemig,,CN=intruder,rules.0.policy=deny,"
                                "rules.1.match=O=livemig*,rules.1.policy=allow,rules.1.format=glob"))
    assert not rules.allows("O=livemig,CN=intruder") and rules.allows("O=livemig,CN=client")
    assert not rules.allows("O=other,CN=client")
    ends = Ends(server_tls(creds(pki.server, "server"), rules), tcp_client(pki))
    ends.close()
    assert isinstance(ends.results["server"], Channel)


def test_no_client_certificate(pki):
    ends = Ends(server_tls(creds(pki.server, "server")), tcp_client(pki, pki.client_nocert))
    try:
        assert "sent no client certificate" in ends.error("server")
        # Under TLS 1.3 the source learns it on its first read.
        with pytest.raises(TlsError, match="destination requires a client certificate"):
            read_exact(ends.channel("client"), 1)
    finally:
        ends.close()


def test_verify_peer_off_takes_a_client_without_certificate(pki):
    ends = Ends(server_tls(creds(pki.server, "server", **{"verify-peer": False})),
                tcp_client(pki, pki.client_nocert))
    try:
        ends.channel("client").write(b"x")
        assert read_exact(ends.channel("server"), 1) == b"x"
    finally:
        ends.close()


def test_handshake_deadline_holds_against_a_byte_drip(pki):
    """A peer that sends a byte now and then gets the handshake's one deadline,
    not a fresh timeout per byte."""
    listener = Listener(parse_uri("tcp:127.0.0.1:0"))
    addr = listener.address

    def drip() -> None:
        with socket.create_connection(addr) as s:
            for b in b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 3:
                try:
                    s.send(bytes([b]))
                except OSError:
                    return
                time.sleep(0.25)

    t = threading.Thread(target=drip)
    t.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TlsError, match="the source did not complete it within 1 s"):
            server_tls(creds(pki.server, "server")).wrap(listener.accept(timeout=10), 1.0)
        assert time.monotonic() - t0 < 2.0
    finally:
        t.join(15)
        listener.close()


def test_endpoint_must_fit_the_side(pki):
    with pytest.raises(TlsError, match="a migration source needs endpoint=client"):
        client_tls(creds(pki.server, "server"), parse_uri("tcp:127.0.0.1:1"))
    with pytest.raises(TlsError, match="a migration destination needs endpoint=server"):
        server_tls(creds(pki.client, "client"))
    with pytest.raises(TlsError, match="tls-authz 'auth0' needs client certificates: set verify-peer=on"):
        server_tls(creds(pki.server, "server", **{"verify-peer": "off"}), simple())


def test_one_way_channel_is_refused(pki, tmp_path):
    r, w = os.pipe()
    os.close(r)
    with pytest.raises(TlsError, match="TLS needs a two-way channel"):
        tcp_client(pki).wrap(Channel(w), 1)


# objects ------------------------------------------------------------------------

def test_object_store_as_qemu_names_it(pki):
    store = ObjectStore()
    store.add(parse_option(f"tls-creds-x509,id=tls0,dir={pki.server},endpoint=server,verify-peer=on"))
    store.add({"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN})
    assert store.query() == [
        {"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki.server), "endpoint": "server",
         "verify-peer": True, "sanity-check": True},
        {"qom-type": "authz-simple", "id": "auth0", "identity": CLIENT_DN}]
    assert store.creds("tls0").endpoint == "server"
    with pytest.raises(ObjectError, match="an object with id 'tls0' already exists"):
        store.add({"qom-type": "authz-simple", "id": "tls0", "identity": "x"})
    with pytest.raises(ObjectError, match="No TLS credentials with id 'auth0'"):
        store.creds("auth0")
    store.delete("tls0")
    with pytest.raises(ObjectError, match="object 'tls0' not found"):
        store.delete("tls0")
    assert [o["id"] for o in store.query()] == ["auth0"]


@pytest.mark.parametrize("props, error", [
    ({"qom-type": "tls-creds-psk", "id": "p", "dir": "/tmp", "endpoint": "server"},
     "'tls-creds-psk' is not supported: it needs Python >= 3.13"),
    ({"qom-type": "memory-backend-ram", "id": "m"}, "'memory-backend-ram' is not supported"),
    ({"qom-type": "tls-creds-x509", "id": "1x", "dir": "/tmp"}, "not an identifier"),
    ({"qom-type": "tls-creds-x509", "id": "t"}, "needs a 'dir'"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "/nonexistent"}, "missing /nonexistent/ca-cert.pem"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "/tmp", "endpoint": "both"},
     "'endpoint' must be one of client, server"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "/tmp", "priority": "NORMAL"},
     "'priority' .* is not supported"),
    ({"qom-type": "tls-creds-x509", "id": "t", "dir": "/tmp", "colour": "red"}, "has no property 'colour'"),
    ({"qom-type": "authz-simple", "id": "a"}, "needs an 'identity'"),
    ({"qom-type": "authz-list", "id": "a", "rules": [{"policy": "allow"}]}, "rule 0 needs a 'match'"),
    ({"qom-type": "authz-list", "id": "a", "rules": [{"match": "x", "format": "regex"}]},
     "'rules.0.format' must be one of exact, glob"),
    ({"qom-type": "authz-list", "id": "a", "policy": "maybe"}, "'policy' must be one of allow, deny"),
])
def test_bad_objects_are_refused_clearly(props, error):
    with pytest.raises(ObjectError, match=error):
        create(props)


def test_server_creds_without_its_key(pki, tmp_path):
    (tmp_path / "ca-cert.pem").write_bytes((pki.server / "ca-cert.pem").read_bytes())
    (tmp_path / "server-cert.pem").write_bytes((pki.server / "server-cert.pem").read_bytes())
    with pytest.raises(ObjectError, match="missing .*server-key.pem"):
        creds(tmp_path, "server")


def test_option_syntax():
    assert parse_option('{"qom-type": "authz-simple", "id": "a", "identity": "O=x"}')["identity"] == "O=x"
    got = parse_option("authz-list,id=a,rules.0.match=O=a,,CN=b,rules.0.policy=allow")
    assert got == {"qom-type": "authz-list", "id": "a", "rules": [{"match": "O=a,CN=b", "policy": "allow"}]}
    with pytest.raises(ObjectError, match="must count from 0"):
        parse_option("authz-list,id=a,rules.1.match=x")


def test_dn_format():
    cert = {"subject": ((("countryName", "GB"),), (("organizationName", "livemig, ltd"),),
                        (("commonName", "client"), ("emailAddress", "a@b")))}
    assert peer_dn(cert) == "C=GB,O=livemig\\, ltd,CN=client+EMAIL=a@b"


RELAY = """
import os, socket, sys, threading
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def up():
    try:
        while data := os.read(0, 65536):
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
    except OSError:  # the far end went first
        pass
threading.Thread(target=up, daemon=True).start()
try:
    while data := s.recv(65536):
        os.write(1, data)
except ConnectionResetError:
    pass
"""


@pytest.mark.parametrize("side", ["source", "destination"])
def test_exec_channel_carries_tls(pki, tmp_path, side):
    """exec: both ways: the command's stdin and stdout carry the session."""
    relay = tmp_path / "relay.py"
    relay.write_text(RELAY)
    listener = Listener(parse_uri("tcp:127.0.0.1:0"))
    exec_uri = parse_uri(f"exec:{sys.executable} {relay} {listener.address[1]}")
    server = server_tls(creds(pki.server, "server"), simple())
    client = client_tls(creds(pki.client, "client"), exec_uri, tls_hostname="localhost")
    out: list = []

    def far_end() -> None:  # the tcp end behind the relay
        try:
            raw = listener.accept(timeout=10)
            out.append(client.wrap(raw, 10) if side == "destination" else server.wrap(raw, 10))
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=far_end)
    t.start()
    try:
        if side == "source":
            near = connect(exec_uri, tls=client)
        else:
            near = Listener(exec_uri).accept(tls=server, handshake_timeout=10)
        t.join(15)
        far = out[0]
        assert isinstance(far, Channel), far
        writer, reader = (near, far) if side == "source" else (far, near)
        writer.write(b"QEVM" * 1000)
        assert read_exact(reader, 4000) == b"QEVM" * 1000
        assert not near.has_return_path  # exec: as in QEMU
        far.close()
        assert near.close() == 0
    finally:
        t.join(15)
        listener.close()


def test_listener_refuses_bad_handshakes_and_takes_the_real_source(pki):
    """A plaintext peer and a rogue certificate connect first: both refused,
    each with its cause, and the real source's connection is the one returned."""
    listener = Listener(parse_uri("tcp:127.0.0.1:0"))
    target = parse_uri(listener.actual_uri)
    refused: list[str] = []
    results: dict[str, object] = {}

    def client(name: str, tls: Tls) -> None:
        try:
            results[name] = tls.wrap(connect(target), 10)
        except Exception as exc:
            results[name] = exc

    rogue = tcp_client(pki, pki.client_rogue, **{"sanity-check": False})
    with socket.create_connection(listener.address) as plain:
        plain.sendall(b"QEVM\0\0\0\x03")
        threads = [threading.Thread(target=client, args=("rogue", rogue)),
                   threading.Thread(target=client, args=("real", tcp_client(pki)))]
        threads[0].start()
        time.sleep(0.3)  # the rogue connects before the real source
        threads[1].start()
        chan = listener.accept(tls=server_tls(creds(pki.server, "server"), simple()),
                               handshake_timeout=5, on_refused=refused.append)
        for t in threads:
            t.join(15)
    try:
        assert len(refused) == 2, refused
        assert "source does not speak TLS" in refused[0]
        assert "source's client certificate was refused: unable to get local issuer certificate" in refused[1]
        assert chan.peer_dn == CLIENT_DN
        real = results["real"]
        assert isinstance(real, Channel), real
        real.write(b"QEVM")
        assert read_exact(chan, 4) == b"QEVM"
        real.close()
    finally:
        chan.close()
        listener.close()
