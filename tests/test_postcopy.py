"""Post-copy between real livemig hosts on loopback: a guest that dirties
memory about four times faster than the link carries it completes only by
switching early; its vCPUs fault on missing pages, which the source sends
first; the result is checked by replay."""

from __future__ import annotations

import time

import pytest

from tests.conftest import guest_args, replay_matches

LINK = 4 << 20  # bytes/s: max-bandwidth, and max-postcopy-bandwidth for the push
GUEST = guest_args(ram="32M", workload="memtouch:rate=16M,wss=24M")
POSTCOPY = [{"capability": "postcopy-ram", "state": True}]


def wait_status(host, want: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = host.cmd("query-migrate")
        if info.get("status") == want:
            return info
        if info.get("status") in ("failed", "cancelled", "completed"):
            break
        time.sleep(0.05)
    raise AssertionError(f"{host.name}: wanted {want}, got {info}")


def test_postcopy_completes_a_guest_dirtying_4x_the_link(hosts, tmp_path, port):
    uri = f"tcp:127.0.0.1:{port}"
    src = hosts.start("src", *GUEST)
    dst = hosts.start("dst", *GUEST, "--incoming", uri)
    for h in (src, dst):
        h.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": LINK, "max-postcopy-bandwidth": LINK})
    time.sleep(0.3)
    src.cmd("migrate", uri=uri)
    wait_status(src, "active", 10)
    time.sleep(2.0)  # pre-copy cannot converge: 16 MB/s dirtied over a 4 MB/s link
    assert src.cmd("query-migrate")["status"] == "active"
    src.cmd("migrate-start-postcopy")
    wait_status(src, "postcopy-active", 20)
    wait_status(dst, "postcopy-active", 10)
    # The guest runs on the destination while the source still pushes pages.
    first = [r["step"] for r in dst.cmd("x-query-vcpus")]
    time.sleep(1.0)
    second = [r["step"] for r in dst.cmd("x-query-vcpus")]
    during = src.cmd("query-migrate")
    assert during["status"] == "postcopy-active", during
    assert all(b > a for a, b in zip(first, second, strict=True)), (first, second)
    final = src.wait_migration(120)
    assert final["status"] == "completed", final
    assert final["downtime"] < 1000, final  # the stop until RUN is on the wire
    assert final["ram"]["postcopy-requests"] > 0, final
    assert src.cmd("query-status")["status"] == "postmigrate"
    dinfo = dst.wait_migration(30)
    assert dinfo["status"] == "completed", dinfo
    pc = dinfo["x-postcopy"]
    assert pc["placed-twice"] == 0 and pc["missing"] == 0, pc
    assert dst.cmd("query-status")["status"] == "running"
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result
    print(f"\npost-copy downtime {final['downtime']} ms, requests {final['ram']['postcopy-requests']}, "
          f"destination {pc}")


def test_destination_without_postcopy_refuses_and_source_runs_on(hosts, port):
    uri = f"tcp:127.0.0.1:{port}"
    src = hosts.start("src", *GUEST)
    dst = hosts.start("dst", *GUEST, "--incoming", uri)
    src.cmd("migrate-set-capabilities", capabilities=POSTCOPY)  # the destination lacks it
    src.cmd("migrate-set-parameters", **{"max-bandwidth": LINK})
    time.sleep(0.3)
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(60)
    assert info["status"] == "failed", info
    dinfo = dst.wait_migration(30)
    assert dinfo["status"] == "failed"
    assert "the source advises post-copy but capability postcopy-ram is not set here" in dinfo["error-desc"]
    # Before RUN nothing is lost: the source guest runs on.
    src.wait_status("running", 30)
    before = src.cmd("x-query-vcpus")[0]["step"]
    time.sleep(0.3)
    assert src.cmd("x-query-vcpus")[0]["step"] > before


def test_start_postcopy_needs_the_capability_and_a_migration(hosts):
    src = hosts.start("src", *GUEST)
    with pytest.raises(RuntimeError, match="Enable postcopy with migrate_set_capability"):
        src.cmd("migrate-start-postcopy")
    src.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    with pytest.raises(RuntimeError, match="Postcopy must be started after migration has been started"):
        src.cmd("migrate-start-postcopy")


def test_policy_switches_after_n_passes(hosts, tmp_path, port):
    uri = f"tcp:127.0.0.1:{port}"
    src = hosts.start("src", *GUEST)
    dst = hosts.start("dst", *GUEST, "--incoming", uri)
    for h in (src, dst):
        h.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * LINK, "x-postcopy-after-passes": 3})
    time.sleep(0.3)
    src.cmd("migrate", uri=uri)  # no migrate-start-postcopy: the policy calls it
    final = src.wait_migration(120)
    assert final["status"] == "completed", final
    assert final["ram"]["dirty-sync-count"] >= 3 and final["ram"]["postcopy-bytes"] > 0, final
    assert dst.wait_migration(30)["status"] == "completed"
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result


def test_demo_postcopy():
    from livemig.tools.demo import run_demo

    result = run_demo(ram=64 << 20, quiet=True, postcopy=True)
    assert result["status"] == "completed", result
    assert result["ram"]["postcopy-bytes"] > 0 and result["downtime"] < 1000, result
    v = result["verify"]
    assert v["ram-equal"] and v["vcpu-equal"], v


def test_pause_and_recover_mid_postcopy(hosts, tmp_path, port):
    uri = f"tcp:127.0.0.1:{port}"
    src = hosts.start("src", *GUEST)
    dst = hosts.start("dst", *GUEST, "--incoming", uri)
    for h in (src, dst):
        h.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": LINK, "max-postcopy-bandwidth": LINK // 2})
    time.sleep(0.3)
    src.cmd("migrate", uri=uri)
    wait_status(src, "active", 10)
    time.sleep(1.0)
    src.cmd("migrate-start-postcopy")
    wait_status(src, "postcopy-active", 20)
    time.sleep(1.0)
    with pytest.raises(RuntimeError, match="Migrate recover can only be run when postcopy is paused"):
        dst.cmd("migrate-recover", uri=f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-pause")  # the link breaks on purpose, mid post-copy
    paused = wait_status(src, "postcopy-paused", 20)
    assert paused["ram"]["remaining"] > 0, paused  # pages still on the source only
    wait_status(dst, "postcopy-paused", 20)
    from livemig.tools.launch import free_port

    again = f"tcp:127.0.0.1:{free_port()}"
    dst.cmd("migrate-recover", uri=again)
    src.cmd("migrate", uri=again, resume=True)
    final = src.wait_migration(120)
    assert final["status"] == "completed", final
    dinfo = dst.wait_migration(30)
    assert dinfo["status"] == "completed", dinfo
    pc = dinfo["x-postcopy"]
    # No page placed twice, none lost: what was in flight at the break was asked for again.
    assert pc["placed-twice"] == 0 and pc["missing"] == 0, pc
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result


def test_postcopy_opens_the_return_path_without_the_capability(hosts, tmp_path, port):
    """As QEMU: postcopy-ram alone opens the return path (return-path off, its default)."""
    uri = f"tcp:127.0.0.1:{port}"
    src = hosts.start("src", *GUEST, return_path=False)
    dst = hosts.start("dst", *GUEST, "--incoming", uri, return_path=False)
    for h in (src, dst):
        h.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    assert not {c["capability"]: c["state"] for c in src.cmd("query-migrate-capabilities")}["return-path"]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 * LINK, "x-postcopy-after-passes": 1})
    src.cmd("migrate", uri=uri)
    final = src.wait_migration(120)
    assert final["status"] == "completed" and final["ram"]["postcopy-bytes"] > 0, final
    assert dst.wait_migration(30)["status"] == "completed"
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result
