"""The receiver never wedges: input that used to raise past its thread (a
vmdesc nested 200,000 deep) ends as `failed` with an error-desc, the host's
memory stays near idle, and the next good migration completes."""

from __future__ import annotations

import socket
import struct

import pytest

from livemig.protocol import savevm
from livemig.tools.bench.accounting import actor_pids, private_memory
from tests.conftest import guest_args, replay_matches

ARGS = guest_args(ram="32M", workload="memtouch:rate=2M,wss=4M")


def with_trailer(stream: bytes, trailer: bytes) -> bytes:
    """The stream with its vmdesc replaced by `trailer` (JSON text)."""
    at = stream.rindex(b'{"page_size"') - 5
    assert stream[at] == savevm.VMDESCRIPTION
    return stream[:at] + bytes([savevm.VMDESCRIPTION]) + struct.pack(">I", len(trailer)) + trailer


def test_deep_vmdesc_fails_and_the_next_migration_completes(hosts, tmp_path, port):
    dst = hosts.start("dst", *ARGS, "--incoming", f"tcp:127.0.0.1:{port}")
    src = hosts.start("src", *ARGS)
    path = tmp_path / "good.mig"
    src.cmd("migrate", uri=f"file:{path}")
    assert src.wait_migration(60)["status"] == "completed"
    src.cmd("cont")
    receiver = actor_pids(dst.proc.pid)["receiver"]
    idle = private_memory(receiver)["private"]
    deep = with_trailer(path.read_bytes(), b"[" * 200_000 + b"]" * 200_000)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(deep)
        s.shutdown(socket.SHUT_WR)
        info = dst.wait_migration(30, states=("failed",))
    assert "vmdesc nests deeper" in info["error-desc"], info
    assert dst.cmd("query-status")["status"] == "inmigrate"
    assert private_memory(receiver)["private"] - idle < 64 << 20
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")  # accepted at once
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]


def test_parameters_that_would_do_nothing_are_refused(hosts):
    """An x-fault with a typo ran a normal migration; x-transport-timeout 0
    made the socket non-blocking. Both are refused, and nothing changes."""
    h = hosts.start("p", *guest_args(ram="16M"))
    for value, cause in [("pass:kil", "no action 'kil'"), ("pas:kill", "no fault point 'pas'"),
                         ("pass:fail-writer", "only kill and stall name an actor"),
                         ("pass:kill-nobody", "no actor 'nobody'")]:
        with pytest.raises(RuntimeError, match=cause):
            h.cmd("migrate-set-parameters", **{"x-fault": value})
    with pytest.raises(RuntimeError, match="'x-transport-timeout' must be at least 1 ms"):
        h.cmd("migrate-set-parameters", **{"x-transport-timeout": 0})
    params = h.cmd("query-migrate-parameters")
    assert params["x-fault"] == "" and params["x-transport-timeout"] == 30_000
    h.cmd("migrate-set-parameters", **{"x-fault": "block-bulk:kill-block_sender", "x-transport-timeout": 1})
    assert h.cmd("query-migrate-parameters")["x-fault"] == "block-bulk:kill-block_sender"
