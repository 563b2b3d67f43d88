"""Failures and cancels: the source guest always runs on, exactly where it
was, and the destination never runs a guest from an incomplete stream."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from livemig.protocol import savevm
from livemig.protocol.ram import ram_eos, ram_mem_size
from tests.conftest import guest_args, replay_matches

FAST_DIRTY = guest_args(ram="128M", workload="memtouch:rate=32M,wss=64M")


def step_of(host) -> int:
    return sum(r["step"] for r in host.cmd("x-query-vcpus"))


def assert_source_runs_on(src, tmp_path) -> None:
    assert src.cmd("query-status")["status"] == "running"
    before = step_of(src)
    deadline = time.monotonic() + 10
    while step_of(src) <= before:
        assert time.monotonic() < deadline, "source guest does not advance"
        time.sleep(0.05)
    result = replay_matches(src, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result


@pytest.mark.long  # the default suite has it over a shaped link: test_convergence.py
def test_non_converging_guest_keeps_iterating_then_cancel(hosts, tmp_path, port):
    src = hosts.start("src", *FAST_DIRTY)
    dst = hosts.start("dst", *FAST_DIRTY, "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20, "downtime-limit": 30})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while True:
        info = src.cmd("query-migrate")
        assert info["status"] == "active" or info["status"] == "setup", info
        if info.get("ram", {}).get("dirty-sync-count", 0) >= 3:
            break
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert info["expected-downtime"] > 30, info
    assert src.cmd("query-status")["status"] == "running"
    src.cmd("migrate_cancel")
    info = src.wait_migration(30)
    assert info["status"] == "cancelled", info
    assert "downtime" not in info
    src.cmd("migrate_cancel")  # a second cancel is harmless
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert_source_runs_on(src, tmp_path)


def test_cancel_during_setup(hosts, tmp_path):
    # A listener whose backlog is full: connect() hangs, so setup cannot finish.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.settimeout(0.5)
        fillers.append(s)
        try:
            s.connect(lsock.getsockname())
        except TimeoutError:
            break  # the backlog is full now
    try:
        src = hosts.start("src", *guest_args(workload="memtouch:rate=2M,wss=4M"))
        host, port = lsock.getsockname()
        src.cmd("migrate", uri=f"tcp:{host}:{port}")
        time.sleep(0.3)
        assert src.cmd("query-migrate")["status"] == "setup"
        src.cmd("migrate_cancel")
        info = src.wait_migration(40)
        assert info["status"] == "cancelled", info
        assert_source_runs_on(src, tmp_path)
    finally:
        for s in fillers:
            s.close()
        lsock.close()


def test_cancel_during_active(hosts, tmp_path, port):
    src = hosts.start("src", *guest_args(ram="128M", workload="memtouch:rate=2M,wss=4M"))
    dst = hosts.start("dst", *guest_args(ram="128M", workload="memtouch:rate=2M,wss=4M"),
                      "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.wait_migration(20, states=("active",))
    time.sleep(0.5)
    src.cmd("migrate_cancel")
    assert src.wait_migration(30)["status"] == "cancelled"
    info = dst.wait_migration(30, states=("failed",))
    assert "error-desc" in info
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert_source_runs_on(src, tmp_path)


def test_destination_killed_mid_stream(hosts, tmp_path, port):
    args = guest_args(ram="128M", workload="memtouch:rate=2M,wss=4M")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.wait_migration(20, states=("active",))
    time.sleep(0.5)
    dst.kill()
    info = src.wait_migration(60)
    assert info["status"] == "failed", info
    assert info["error-desc"]
    assert_source_runs_on(src, tmp_path)


def raw_stream(*parts: bytes) -> bytes:
    return b"".join(parts)


def good_prefix(name="pc.ram", size=64 << 20, magic=savevm.MAGIC, version=3, machine="pc") -> bytes:
    return raw_stream(struct.pack(">II", magic, version), savevm.configuration(machine),
                      savevm.section_start(savevm.SECTION_START, 2, "ram", 0, 4),
                      ram_mem_size([(name, size)]), ram_eos(), savevm.footer(2))


@pytest.mark.parametrize("stream, message", [
    (good_prefix(magic=0xDEADBEEF), "not a savevm stream"),
    (good_prefix(version=2), "version 2 is obsolete"),
    (good_prefix(version=5), "unsupported savevm stream version 5"),
    (good_prefix(name="vga.vram"), "unknown RAM block 'vga.vram'"),
    (good_prefix(size=32 << 20), "has 33554432 bytes in the stream"),
    (good_prefix()[:40], "stream ended early"),
])
def test_destination_refuses_bad_streams(hosts, port, stream, message):
    dst = hosts.start("dst", *guest_args(), "--incoming", f"tcp:127.0.0.1:{port}")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(stream)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        s.recv(100)
    info = dst.wait_migration(30)
    assert info["status"] == "failed"
    assert message in info["error-desc"], info
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert step_of(dst) == 0


def test_size_mismatch_between_hosts_fails_and_source_runs_on(hosts, tmp_path, port):
    src = hosts.start("src", *guest_args(ram="64M", workload="memtouch:rate=2M,wss=4M"))
    dst = hosts.start("dst", *guest_args(ram="32M"), "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(60)
    assert info["status"] == "failed", info
    assert "has 67108864 bytes in the stream" in dst.wait_migration(30)["error-desc"]
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert_source_runs_on(src, tmp_path)
