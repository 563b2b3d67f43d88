"""Post-copy across a broken and a shaped link: a proxy reset mid
post-copy on loopback, and the rig's 100 Mbit/s link (network namespaces, tc)
with a guest dirtying about four times what it carries, cut mid post-copy
and recovered. Every migrated guest is checked by replay, and the
destination counts its pages: none placed twice, none missing."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from livemig.tools.launch import free_port
from livemig.tools.rig import Rig, Scenario, leftovers, report
from tests.conftest import TAG, guest_args, replay_matches
from tests.tcp_proxy import Proxy
from tests.test_postcopy import POSTCOPY, wait_status

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
needs_rig = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"),
                               reason="network namespaces and tc need root and iproute2")
LINK = 8 << 20  # bytes/s on loopback: max-bandwidth and max-postcopy-bandwidth
GUEST = guest_args(ram="32M", workload="memtouch:rate=32M,wss=24M")  # 4x the link


def test_proxy_reset_mid_postcopy_then_recover(hosts, tmp_path, port):
    """A middlebox drops the flow (RST both ways) during postcopy-active:
    both sides pause, recovery over a new connection completes, and the
    guest equals its replay with every page placed exactly once."""
    dst_uri = f"tcp:127.0.0.1:{port}"
    proxy = Proxy(("127.0.0.1", port))
    try:
        src = hosts.start("src", *GUEST)
        dst = hosts.start("dst", *GUEST, "--incoming", dst_uri)
        for h in (src, dst):
            h.cmd("migrate-set-capabilities", capabilities=[*POSTCOPY, {"capability": "postcopy-blocktime",
                                                                        "state": True}])
        src.cmd("migrate-set-parameters", **{"max-bandwidth": LINK, "max-postcopy-bandwidth": LINK})
        time.sleep(0.3)
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
        wait_status(src, "active", 10)
        time.sleep(1.0)
        src.cmd("migrate-start-postcopy")
        wait_status(src, "postcopy-active", 20)
        time.sleep(0.5)
        before = proxy.forwarded
        proxy.reset()
        paused = wait_status(src, "postcopy-paused", 20)
        assert paused["ram"]["remaining"] > 0 and before > 0, paused
        wait_status(dst, "postcopy-paused", 20)
        again = f"tcp:127.0.0.1:{free_port()}"
        dst.cmd("migrate-recover", uri=again)
        src.cmd("migrate", uri=again, resume=True)
        final = src.wait_migration(120)
        assert final["status"] == "completed", final
        # Every connection's bytes count, the broken one's too: pre-copy's and post-copy's.
        assert final["ram"]["transferred"] > final["ram"]["postcopy-bytes"] > 0, final
        dinfo = dst.wait_migration(30)
        assert dinfo["status"] == "completed", dinfo
        pc = dinfo["x-postcopy"]
        assert pc["placed-twice"] == 0 and pc["missing"] == 0, pc
        assert len(dinfo["postcopy-vcpu-blocktime"]) == 1 and dinfo["postcopy-blocktime"] > 0, dinfo
        result = replay_matches(dst, tmp_path)
        assert result["ram_equal"] and result["vcpu_equal"], result
    finally:
        proxy.close()


def run_example(tmp_path, keep: slice | None = None) -> list[dict]:
    scenario = Scenario.load(os.path.join(EXAMPLES, "postcopy-link.toml"))
    if keep is not None:
        scenario.migrations = scenario.migrations[keep]
    rig = Rig(scenario, str(tmp_path / "out"))
    rig.env = {"LIVEMIG_TEST_TAG": TAG}
    try:
        return rig.execute()
    finally:
        mine = [ns for ns in leftovers() if ns.startswith(f"lm{rig.net.tag}")]
        assert not mine, f"namespaces left behind: {mine}"


def assert_postcopy_done(r: dict, recoveries: int) -> None:
    assert r["status"] == r["dst-status"] == "completed" and r["verified"], r
    assert r["x-recoveries"] == recoveries, r
    assert r["x-placed-twice"] == 0 and r["x-missing"] == 0, r
    assert r["postcopy-requests"] > 0 and r["x-dst-steps-while-postcopy-active"] > 0, r
    assert r["downtime"] < 1000, r


@needs_rig
def test_rig_postcopy_over_100mbit_with_the_link_cut(tmp_path):
    """The example's migration with the cut: 48 MB/s dirtied over 100 Mbit/s,
    post-copy after 2 s, link down 0.5 s into postcopy-active, recovered."""
    (r,) = run_example(tmp_path, slice(1, 2))
    assert_postcopy_done(r, recoveries=1)
    table = open(report(str(tmp_path / "out")).replace(".html", ".md")).read()
    assert "| fault p50 (ms) | fault p99 (ms) |" in table and f"| {r['x-fault-p99']:.2f} |" in table, table
    print(f"\nrig post-copy with a cut: {r}")


@needs_rig
@pytest.mark.long  # the whole post-copy rig example
def test_rig_postcopy_example_needs_postcopy(tmp_path):
    pre, cut, back = run_example(tmp_path)
    assert pre["status"] == "cancelled" and not pre["converged"] and pre["source-running"], pre
    assert_postcopy_done(cut, recoveries=1)
    assert_postcopy_done(back, recoveries=0)
    # The push held under the link rate leaves no queue for requested pages to wait in.
    assert back["x-fault-p50"] < cut["x-fault-p50"] / 4, (cut, back)
    print(f"\npre-copy {pre}\ncut {cut}\nback {back}")


def test_bench_postcopy_row():
    """One row of `scripts/bench --only postcopy`: 4x the loopback bandwidth,
    post-copy after the first pass, two vCPUs with QEMU's blocktime names."""
    from livemig.tools.bench.postcopy import LOOPBACK_BANDWIDTH, VCPUS, one
    from livemig.tools.bench.report import summary

    row = one("loopback", 4.0, LOOPBACK_BANDWIDTH, "postcopy", {"LIVEMIG_TEST_TAG": TAG})
    assert row["completed"] and row["verified"], row
    assert row["placed_twice"] == 0 and row["missing"] == 0 and row["faults"] > 0, row
    assert 0 < row["fault_p50_ms"] <= row["fault_p99_ms"], row
    assert len(row["vcpu_blocktime_ms"]) == VCPUS and row["blocktime_ms"] <= max(row["vcpu_blocktime_ms"]), row
    assert row["downtime_ms"] < 1000, row
    assert "| loopback | 4.0x 17 MB/s | postcopy | completed |" in summary({"postcopy": [row]})
