"""The hand-over between two livemig hosts: exactly one guest runs after it."""

from __future__ import annotations

import time

from tests.conftest import guest_args, replay_matches

ARGS = guest_args(ram="32M", workload="memtouch:rate=2M,wss=4M")


def test_without_return_path_the_destination_runs_after_eof(hosts, tmp_path, port):
    """return-path off between two livemig hosts over tcp: no go-ahead comes,
    so the destination runs once it has the whole stream, as QEMU's does."""
    dst = hosts.start("dst", *ARGS, "--incoming", f"tcp:127.0.0.1:{port}")
    src = hosts.start("src", *ARGS)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": False}])
    t0 = time.monotonic()
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    assert time.monotonic() - t0 < 30
    assert dst.wait_migration(10)["status"] == "completed"
    assert src.cmd("query-status")["status"] == "postmigrate"
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]
