"""Bad input never starts a guest or brings a host down, and integrity
digests catch a damaged stream."""

from __future__ import annotations

import os
import random
import socket
import time

import pytest

from tests.conftest import guest_args, replay_matches

ARGS = guest_args(ram="32M", workload="memtouch:rate=2M,wss=4M")


def flip_a_page_byte(path, ram_page: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.rfind(ram_page[:256])  # the copy the destination keeps: the last one sent
    assert at > 0, "page not found in the stream"
    data[at + 100] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("digest", [True, False])
def test_bit_flip_caught_by_digests(hosts, tmp_path, digest):
    src = hosts.start("src", *ARGS)
    if digest:
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-digest", "state": True}])
    path = tmp_path / "guest.mig"
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration(60)["status"] == "completed"
    dump = tmp_path / "page"
    # A page outside the working set: nothing overwrites it after the switch.
    src.cmd("pmemsave", val=5000 * 4096, size=4096, filename=str(dump))
    flip_a_page_byte(path, dump.read_bytes())
    dst = hosts.start("dst", *ARGS, "--incoming", f"file:{path}")
    info = dst.wait_migration(60)
    if digest:
        assert info["status"] == "failed" and "digest mismatch" in info["error-desc"], info
        time.sleep(0.3)
        assert dst.cmd("query-status")["status"] == "inmigrate"
    else:  # the control: without digests the damage goes unnoticed
        assert info["status"] == "completed", info
        assert not replay_matches(dst, tmp_path)["ram_equal"]


def test_second_connection_refused_migration_unaffected(hosts, tmp_path, port):
    src = hosts.start("src", *ARGS)
    dst = hosts.start("dst", *ARGS, "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.wait_migration(20, states=("active",))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]


def test_garbage_and_cut_streams_then_a_good_migration(hosts, tmp_path, port):
    dst = hosts.start("dst", *ARGS, "--incoming", f"tcp:127.0.0.1:{port}")
    src = hosts.start("src", *ARGS)
    path = tmp_path / "good.mig"
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration(60)["status"] == "completed"
    good = path.read_bytes()
    src.cmd("cont")
    rng = random.Random(5)
    attempts = [os.urandom(4096), good[:8] + os.urandom(10000)] + \
               [good[:rng.randrange(len(good))] for _ in range(3)]
    for blob in attempts:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(blob)
            except OSError:
                pass  # the destination may close first
        info = dst.wait_migration(30, states=("failed",))
        assert info["error-desc"]
        assert dst.cmd("query-status")["status"] == "inmigrate"
        dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]


def test_exit_on_error(hosts, port):
    dst = hosts.start("dst", *ARGS, "--incoming", "defer")
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}", **{"exit-on-error": True})
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"not a stream")
    deadline = time.monotonic() + 20
    while dst.alive():
        assert time.monotonic() < deadline, "host did not exit after a failed incoming migration"
        time.sleep(0.1)


def test_qmp_socket_is_private(hosts):
    h = hosts.start("h", *ARGS)
    assert oct(os.stat(h.qmp_addr.removeprefix("unix:")).st_mode & 0o777) == "0o600"
