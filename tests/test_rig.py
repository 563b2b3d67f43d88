"""The rig on a CI-sized scenario: three hosts in network namespaces with
links of 1 Gbit/s and 100 Mbit/s shaped by tc, migrations over each link, a
guest that out-dirties the slow link, an evacuation, and a link cut mid-way.
Afterwards no namespace, veth, qdisc or process is left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from actors.rig import Rig, Scenario, leftovers, report
from tests.conftest import TAG

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"),
                                reason="network namespaces and tc need root and iproute2")

SCENARIO = """
name = "ci"
timeout = 6
parameters = { max-bandwidth = 0, x-transport-timeout = 2000 }
[hosts.A]
[hosts.B]
[hosts.C]
[[links]]
a = "A"
b = "B"
rate = "1gbit"
[[links]]
a = "A"
b = "C"
rate = "100mbit"
[guests.fast]
host = "A"
ram = "96M"
[guests.slow]
host = "A"
ram = "40M"
[guests.dirty1]
host = "A"
ram = "64M"
workload = "memtouch:rate=20M,wss=48M"
[guests.dirty2]
host = "A"
ram = "64M"
workload = "memtouch:rate=20M,wss=48M"
[[migrations]]
guest = "fast"
to = "B"
[[migrations]]
guest = "slow"
to = "C"
[[migrations]]
guest = "dirty1"
to = "C"
[[migrations]]
guest = "dirty2"
to = "B"
[[migrations]]
guest = "slow"
to = "A"
link_down_after = 1.0
"""

EVACUATION = """
name = "evacuation"
verify = true
[hosts.A]
[hosts.B]
[hosts.C]
[[links]]
a = "A"
b = "B"
rate = "1gbit"
[[links]]
a = "A"
b = "C"
rate = "1gbit"
[evacuation]
from = "A"
to = ["B", "C"]
concurrency = 2
""" + "".join(f"""
[guests.g{i}]
host = "A"
ram = "16M"
workload = "memtouch:rate=1M,wss=4M"
seed = {i}
""" for i in range(4))


def run_scenario(tmp_path, text: str) -> list[dict]:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    rig = Rig(Scenario.load(str(path)), str(tmp_path / "out"))
    rig.env = {"LIVEMIG_TEST_TAG": TAG}
    try:
        return rig.execute()
    finally:
        assert not leftovers(), "namespaces left behind"


def by_guest(results: list[dict], guest: str, to: str) -> dict:
    return next(r for r in results if r["guest"] == guest and r["to"] == to)


def test_links_convergence_and_a_cut(tmp_path):
    results = run_scenario(tmp_path, SCENARIO)
    fast, slow = by_guest(results, "fast", "B"), by_guest(results, "slow", "C")
    assert fast["status"] == slow["status"] == "completed" and fast["verified"] and slow["verified"]
    assert 0.85 * 100e6 <= slow["rate_bps"] <= 1.15 * 100e6, slow
    assert 0.85 * 1e9 <= fast["rate_bps"] <= 1.15 * 1e9, fast
    dirty_slow, dirty_fast = by_guest(results, "dirty1", "C"), by_guest(results, "dirty2", "B")
    assert not dirty_slow["converged"] and dirty_slow["expected_downtime_ms"], dirty_slow
    assert dirty_fast["converged"] and dirty_fast["verified"], dirty_fast
    cut = by_guest(results, "slow", "A")
    assert cut["status"] == "failed" and cut["source_running"] and cut["error"], cut
    path = report(str(tmp_path / "out"))
    text = open(path).read()
    assert (tmp_path / "out" / "remaining.png").stat().st_size > 1000
    assert "failed" in text and "dirty1" in text
    lines = (tmp_path / "out" / "runs" / "run000.jsonl").read_text().splitlines()
    kinds = {json.loads(line)["kind"] for line in lines}
    assert {"event", "query", "result"} <= kinds


def test_evacuation_with_concurrency(tmp_path):
    results = run_scenario(tmp_path, EVACUATION)
    assert len(results) == 4
    assert all(r["status"] == "completed" and r["verified"] for r in results), results
    assert {r["to"] for r in results} == {"B", "C"}
    out = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert "lm1a" not in out and "lm1b" not in out
