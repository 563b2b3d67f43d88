"""The hand-over between two livemig hosts: exactly one guest runs after it."""

from __future__ import annotations

import os
import signal
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


def coordinator_pid(h) -> int:
    from livemig.tools.bench.accounting import actor_pids

    return actor_pids(h.proc.pid)["coordinator"]


def answers_within(h, seconds: float) -> float:
    """How long until the host's QMP answers query-status again."""
    t0 = time.monotonic()
    while True:
        try:
            h.cmd("query-status")
            return time.monotonic() - t0
        except Exception:
            assert time.monotonic() - t0 < seconds, "QMP did not answer again"
            time.sleep(0.02)


def steps(h) -> int:
    return h.cmd("x-query-vcpus")[0]["step"]


def test_coordinator_killed_outside_a_migration_is_taken_over(hosts, tmp_path):
    h = hosts.start("src", *ARGS)
    h.cmd("migrate-set-parameters", **{"max-bandwidth": 12345678, "downtime-limit": 777})
    h.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-digest", "state": True}])
    time.sleep(0.3)  # the coordinator writes its state every 50 ms
    old = coordinator_pid(h)
    before = steps(h)
    os.kill(old, signal.SIGKILL)
    time.sleep(0.1)
    took = answers_within(h, 30)
    assert coordinator_pid(h) != old and h.alive()
    assert h.cmd("query-status")["status"] == "running"
    params = h.cmd("query-migrate-parameters")
    assert params["max-bandwidth"] == 12345678 and params["downtime-limit"] == 777
    caps = {c["capability"]: c["state"] for c in h.cmd("query-migrate-capabilities")}
    assert caps["x-digest"]
    time.sleep(0.5)
    assert steps(h) > before
    result = replay_matches(h, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]
    print(f"QMP answered again {took:.2f} s after the kill")


def test_coordinator_killed_during_a_migration_guest_runs_on(hosts, tmp_path, port):
    dst = hosts.start("dst", *ARGS, "--incoming", f"tcp:127.0.0.1:{port}")
    src = hosts.start("src", *ARGS)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.wait_migration(30, states=("active",))
    time.sleep(0.5)
    os.kill(coordinator_pid(src), signal.SIGKILL)
    time.sleep(0.1)
    answers_within(src, 30)
    info = src.wait_migration(30)
    assert info["status"] == "failed" and "coordinator died" in info["error-desc"], info
    assert src.cmd("query-status")["status"] == "running"
    before = steps(src)
    time.sleep(0.5)
    assert steps(src) > before
    assert dst.wait_migration(60, states=("failed",))["status"] == "failed"
    dst.cmd("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration(60)["status"] == "completed"
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]


def test_an_actor_with_no_part_in_the_migration_does_not_fail_it(hosts, tmp_path, port):
    """A RAM-only migration goes on when the block sender dies: it is restarted."""
    from livemig.tools.bench.accounting import actor_pids

    dst = hosts.start("dst", *ARGS, "--incoming", f"tcp:127.0.0.1:{port}")
    src = hosts.start("src", *ARGS)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.wait_migration(30, states=("active",))
    os.kill(actor_pids(src.proc.pid)["block_sender"], signal.SIGKILL)
    time.sleep(1.5)  # the supervisor notices and restarts it
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    info = src.wait_migration(60)
    assert info["status"] == "completed", info
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"]
