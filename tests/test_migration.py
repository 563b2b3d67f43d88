"""End-to-end migrations between real hosts (separate process trees) on
loopback, each checked by replaying the guest's steps without migration."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.conftest import guest_args, replay_matches

RUNNING = guest_args(workload="memtouch:rate=4M,wss=8M")


def migrate_and_verify(hosts, tmp_path, src_uri, dst_uri=None, pass_fds=((), ()), src_extra=(),
                       dst_extra=(), params=None):
    src = hosts.start("src", *RUNNING, *src_extra, pass_fds=pass_fds[0])
    dst = hosts.start("dst", *RUNNING, "--incoming", dst_uri or src_uri, *dst_extra, pass_fds=pass_fds[1])
    time.sleep(0.3)
    if params:
        src.cmd("migrate-set-parameters", **params)
    src.cmd("migrate", uri=src_uri)
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    assert src.cmd("query-status")["status"] == "postmigrate"
    dst.wait_migration(60)
    dst.wait_status("running", 30)
    time.sleep(0.3)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result
    return src, dst, info


def test_tcp(hosts, tmp_path, port):
    _, dst, info = migrate_and_verify(hosts, tmp_path, f"tcp:127.0.0.1:{port}")
    ram = info["ram"]
    assert ram["total"] == 64 << 20 and ram["normal"] >= 16384 and ram["dirty-sync-count"] >= 2
    assert info["downtime"] >= 0 and info["x-guest-downtime"] >= 0 and info["setup-time"] >= 0
    # Where the downtime went, step by step, in order and within it.
    steps = info["x-switchover"]
    assert list(steps) == ["stopped", "synced", "pages", "devices", "written", "answered"]
    assert list(steps.values()) == sorted(steps.values()) and steps["answered"] <= info["downtime"]
    assert dst.cmd("query-migrate")["status"] == "completed"


def test_unix(hosts, tmp_path):
    path = str(tmp_path / "mig.sock")
    migrate_and_verify(hosts, tmp_path, f"unix:{path}")


def test_exec_through_a_fifo(hosts, tmp_path):
    fifo = tmp_path / "mig.fifo"
    os.mkfifo(fifo)
    migrate_and_verify(hosts, tmp_path, f"exec:cat > {fifo}", f"exec:cat {fifo}")


def test_fd_socketpair(hosts, tmp_path):
    a, b = socket.socketpair()
    try:
        migrate_and_verify(hosts, tmp_path, f"fd:{a.fileno()}", f"fd:{b.fileno()}",
                           pass_fds=((a.fileno(),), (b.fileno(),)),
                           src_extra=("--fd", str(a.fileno())), dst_extra=("--fd", str(b.fileno())))
    finally:
        a.close()
        b.close()


def test_file_then_restore(hosts, tmp_path):
    path = tmp_path / "guest.mig"
    src = hosts.start("src", *RUNNING)
    time.sleep(0.3)
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration(60)["status"] == "completed"
    assert path.read_bytes()[:8] == b"QEVM\0\0\0\3"
    dst = hosts.start("dst", *RUNNING, "--incoming", f"file:{path}")
    dst.wait_migration(60)
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result


def test_zero_guest_puts_under_one_percent_on_the_wire(hosts, tmp_path, port):
    args = guest_args(ram="1G", fill="zero")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    assert info["ram"]["transferred"] < 0.01 * (1 << 30), info["ram"]
    assert info["ram"]["duplicate"] == 262144
    dst.wait_status("running", 30)


def test_rate_limit_holds(hosts, tmp_path, port):
    """max-bandwidth 32 MiB/s: the active phase averages within 15 % of it."""
    args = guest_args(ram="160M")
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    limit = 32 << 20
    src.cmd("migrate-set-parameters", **{"max-bandwidth": limit})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    active_ms = info["total-time"] - info["setup-time"] - info["downtime"]
    rate = info["ram"]["precopy-bytes"] / (active_ms / 1000)
    assert 0.85 * limit <= rate <= 1.15 * limit, (rate / limit, info)
    dst.wait_status("running", 30)


def test_second_migrate_is_refused(hosts, port):
    src = hosts.start("src", *guest_args(ram="128M"))
    dst = hosts.start("dst", *guest_args(ram="128M"), "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    with pytest.raises(RuntimeError, match="migration already in progress"):
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.cmd("migrate_cancel")
    assert src.wait_migration(30)["status"] == "cancelled"
    assert dst.alive()
