"""Multifd between real hosts: livemig to livemig with a running guest
(verified by replay), its settings and their refusals, cancel and a
destination killed mid-migration, and malformed channels refused before any
guest starts."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import numpy as np
import pytest

from livemig.protocol import multifd
from livemig.tools.launch import free_port
from tests.conftest import guest_args, replay_matches
from tests.tcp_proxy import Proxy

PAGE = 4096


def multifd_on(host, channels: int = 2, compression: str = "none", **extra) -> None:
    host.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    host.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": compression,
                                          **extra})


def uri_for(transport: str, tmp_path) -> str:
    return f"tcp:127.0.0.1:{free_port()}" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"


@pytest.mark.parametrize("transport, channels, compression", [("tcp", 2, "none"), ("unix", 3, "zstd")])
def test_livemig_to_livemig_with_a_running_guest(hosts, tmp_path, transport, channels, compression):
    args = guest_args(ram="64M", workload="memtouch:rate=4M,wss=8M", vcpus=2)
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", "defer")
    uri = uri_for(transport, tmp_path)
    multifd_on(dst, channels, compression)
    dst.cmd("migrate-incoming", uri=uri)
    multifd_on(src, channels, compression)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 20})
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    ram = info["ram"]
    # Non-zero pages went over the multifd channels, and were counted there.
    assert ram["multifd-bytes"] > 32 << 20, ram
    assert ram["transferred"] >= ram["multifd-bytes"]
    got = dst.wait_migration(30)
    assert got["status"] == "completed" and got["x-ram"]["multifd-bytes"] > 32 << 20, got
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result


def test_settings_are_checked_as_qemu_checks_them(hosts, tmp_path):
    host = hosts.start("h", "--ram", "32M")
    params = host.cmd("query-migrate-parameters")
    assert (params["multifd-channels"], params["multifd-compression"], params["multifd-zlib-level"],
            params["multifd-zstd-level"]) == (2, "none", 1, 1)
    for bad, message in [({"multifd-channels": 0}, "'multifd_channels' expects a value between 1 and 255"),
                         ({"multifd-channels": 256}, "'multifd-channels' expects uint8_t"),
                         ({"multifd-compression": "lz4"}, "'multifd-compression' does not accept value 'lz4'"),
                         ({"multifd-zlib-level": 10}, "'multifd_zlib_level' expects a value between 0 and 9"),
                         ({"multifd-zstd-level": 21}, "'multifd_zstd_level' expects a value between 0 and 20"),
                         ({"multifd-channels": "2"}, "expected: integer")]:
        with pytest.raises(RuntimeError, match=message):
            host.cmd("migrate-set-parameters", **bad)
    hmp = host.cmd("human-monitor-command", **{"command-line": "info migrate_parameters"})
    assert "multifd-channels: 2\r\n" in hmp and "multifd-compression: none\r\n" in hmp
    host.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    with pytest.raises(RuntimeError, match="Postcopy is not yet compatible with multifd"):
        host.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    host.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": False},
                                                       {"capability": "multifd", "state": True}])
    with pytest.raises(RuntimeError, match=r"multifd is not supported by current protocol \(exec:\)"):
        host.cmd("migrate", uri="exec:cat > /dev/null")
    assert host.cmd("query-migrate") == {} and host.cmd("query-status")["status"] == "running"


def test_destination_needs_defer_to_take_multifd(hosts, tmp_path):
    """Set at migrate-incoming: changing them while listening is refused."""
    dst = hosts.start("dst", "--ram", "32M", "--incoming", f"unix:{tmp_path}/in.sock")
    with pytest.raises(RuntimeError, match="start it with -incoming defer"):
        dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    with pytest.raises(RuntimeError, match="start it with -incoming defer"):
        dst.cmd("migrate-set-parameters", **{"multifd-channels": 4})
    dst.cmd("migrate-set-parameters", **{"downtime-limit": 200})  # the others still change
    late = hosts.start("late", "--ram", "32M", "--incoming", "defer")
    multifd_on(late)
    with pytest.raises(RuntimeError, match=r"not supported by current protocol \(file:\)"):
        late.cmd("migrate-incoming", uri=f"file:{tmp_path}/x")


@pytest.mark.parametrize("how", ["cancel", "kill-destination"])
def test_cancel_and_destination_kill_leave_the_source_running(hosts, tmp_path, port, how):
    from tests.test_failures import assert_source_runs_on

    args = guest_args(ram="128M", workload="memtouch:rate=2M,wss=4M")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", "defer")
    multifd_on(dst, 3, "zlib")
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    multifd_on(src, 3, "zlib")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.wait_migration(20, states=("active",))
    time.sleep(0.5)
    if how == "cancel":
        src.cmd("migrate_cancel")
        assert src.wait_migration(30)["status"] == "cancelled"
        info = dst.wait_migration(30, states=("failed",))
        assert "error-desc" in info and dst.cmd("query-status")["status"] == "inmigrate"
    else:
        dst.kill()
        info = src.wait_migration(60)
        assert info["status"] == "failed" and info["error-desc"], info
    assert_source_runs_on(src, tmp_path)


# --------------------------------------------------------------------------- malformed channels


def crafted_source(ram: np.ndarray, channels: int, case: str) -> tuple[list[bytes], bytes]:
    """A `none` source's multifd channels and main stream (tests/fuzz.py's):
    odd pages zero on the main channel, even ones over the channels, one
    SYNC per channel at each of the three EOS; `case` breaks one thing."""
    from tests.fuzz import multifd_lanes, multifd_main

    even = np.arange(ram.shape[0]) % 2 == 0
    lanes = multifd_lanes(ram, even, channels)  # per channel: init, SYNC, 100 pages, 28 pages + SYNC, SYNC
    for cid, lane in enumerate(lanes):
        if case == "count":
            lane[2] = lane[2][:12] + struct.pack(">I", 129) + lane[2][16:]
        if case == "offset" and cid == 1:
            lane[2] = multifd.packet_header(0, "ram", np.array([ram.size]), PAGE, 1) + ram[0].tobytes()
        if case == "channel-id" and cid == 1:
            lane[0] = multifd.init_packet(5)
        if case == "magic" and cid == 0:
            lane[0] = b"\x11\x22\x33\x45" + lane[0][4:]
        if case == "missing-sync" and cid == 1:
            lane.pop()
    return [b"".join(lane) for lane in lanes], multifd_main(ram, even)


@pytest.mark.parametrize("case, message", [
    ("valid", None),
    ("magic", "received packet magic 0x11223345 expected 0x11223344"),
    ("channel-id", "received channel id 5, but multifd-channels is 2"),
    ("count", "received packet with size 129 and expected a size of 128"),
    ("offset", "multifd channel 1: multifd: offset too long 2097152"),
    ("missing-sync", "multifd channel 1 ended without the SYNC of RAM end of section 3"),
])
def test_malformed_channels_are_refused_and_no_guest_starts(hosts, port, case, message):
    rng = np.random.default_rng(2)
    ram = rng.integers(0, 256, (512, PAGE), np.uint8)
    ram[1::2] = 0
    dst = hosts.start("dst", "--machine", "none", "--ram", "2M", "--incoming", "defer")
    multifd_on(dst, 2)
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    lanes, main = crafted_source(ram, 2, case)
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]

    def send(sock: socket.socket, data: bytes) -> None:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the destination refused it and closed

    threads = [threading.Thread(target=send, args=(s, d)) for s, d in zip(socks, [main, *lanes], strict=True)]
    for t in threads:
        t.start()
    try:
        info = dst.wait_migration(60)
    finally:
        for t in threads:
            t.join(30)
        for s in socks:
            s.close()
    if message is None:
        assert info["status"] == "completed", info
        assert np.array_equal(dump(dst, ram.size), ram)
        return
    assert info["status"] == "failed" and message in info["error-desc"], info
    time.sleep(0.3)
    assert dst.cmd("query-status")["status"] == "inmigrate"


def dump(host, size: int) -> np.ndarray:
    import tempfile

    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        host.cmd("pmemsave", val=0, size=size, filename=f.name)
        return np.fromfile(f.name, np.uint8).reshape(-1, PAGE)


def test_multifd_over_tls_each_channel_its_own_session(hosts, tmp_path, port):
    from livemig.tools.tls_certs import make_pki

    pki = make_pki(tmp_path / "pki")
    args = guest_args(ram="32M", workload="memtouch:rate=2M,wss=4M")
    src = hosts.start("src", *args, "--object", f"tls-creds-x509,id=tls0,dir={pki.client},endpoint=client")
    dst = hosts.start("dst", *args, "--incoming", "defer",
                      "--object", f"tls-creds-x509,id=tls0,dir={pki.server},endpoint=server")
    for host in (dst, src):
        multifd_on(host, 2, "zlib")
        host.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(120)
    assert info["status"] == "completed" and info["x-tls"] and info["ram"]["multifd-bytes"] > 0, info
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result


# --------------------------------------------------------------------------- pages that never arrived


class FirstConnectionOnly(Proxy):
    """Forwards the first connection to the destination and reads every
    later one to its end itself: a multifd source's channels look delivered
    to it while the destination, without multifd, never sees them (the
    narrow race where they land in a listener's backlog, made certain)."""

    def forward(self, client: socket.socket) -> None:
        if self.sockets:
            with self.lock:
                self.sockets.append(client)
            self.start_pump(client, None)
        else:
            super().forward(client)


def test_pages_on_channels_the_destination_never_read_fail_the_migration(hosts, tmp_path, port):
    """A destination without multifd cannot tell from QEMU 7.2's main stream
    that pages went elsewhere: it counts what arrived. The source learns it
    on the return path and runs on."""
    from tests.test_failures import assert_source_runs_on

    args = guest_args(ram="32M", workload="memtouch:rate=2M,wss=4M")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    proxy = FirstConnectionOnly(("127.0.0.1", port))
    try:
        multifd_on(src, 2)
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
        info = src.wait_migration(60)
        got = dst.wait_migration(30)
    finally:
        proxy.close()
    assert proxy.dropped > 16 << 20  # the random RAM went over the two channels
    # fill=random: no page is zero, so every one of the 8192 went on a channel
    message = f"ram block pc.ram: {(32 << 20) // PAGE} pages never arrived"
    assert got["status"] == "failed" and got["error-desc"] == message, got
    assert info["status"] == "failed" and message in info["error-desc"], info
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert_source_runs_on(src, tmp_path)


def test_a_main_stream_without_its_channel_pages_is_refused(hosts, port):
    """The crafted multifd source's main stream alone (its even pages are on
    channels this destination, without multifd, never accepts): refused at
    EOF, no guest starts."""
    ram = np.random.default_rng(2).integers(0, 256, (512, PAGE), np.uint8)
    ram[1::2] = 0
    dst = hosts.start("dst", "--machine", "none", "--ram", "2M", "--incoming", f"tcp:127.0.0.1:{port}")
    _lanes, main = crafted_source(ram, 2, "valid")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(main)
        sock.shutdown(socket.SHUT_WR)
        info = dst.wait_migration(30)
    assert info["status"] == "failed" and info["error-desc"] == "ram block ram: 256 pages never arrived", info
    assert dst.cmd("query-status")["status"] == "inmigrate"
