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

from livemig.tools.rig import Rig, Scenario, leftovers, report
from tests.conftest import TAG

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"),
                                reason="network namespaces and tc need root and iproute2")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")



def run_scenario(tmp_path, example: str, loopback: bool = False) -> list[dict]:
    rig = Rig(Scenario.load(os.path.join(EXAMPLES, example)), str(tmp_path / "out"), loopback=loopback)
    rig.env = {"LIVEMIG_TEST_TAG": TAG}
    try:
        return rig.execute()
    finally:
        mine = [ns for ns in leftovers() if ns.startswith(f"lm{rig.net.tag}")]
        assert not mine, f"namespaces left behind: {mine}"


def by_guest(results: list[dict], guest: str, to: str) -> dict:
    return next(r for r in results if r["guest"] == guest and r["to"] == to)


def test_links_convergence_and_a_cut(tmp_path):
    results = run_scenario(tmp_path, "ci-three-hosts.toml")
    fast, slow = by_guest(results, "fast", "B"), by_guest(results, "slow", "C")
    assert fast["status"] == slow["status"] == "completed" and fast["verified"] and slow["verified"]
    assert 0.85 * 100 <= slow["mbps"] <= 1.15 * 100, slow
    assert 0.85 * 1000 <= fast["mbps"] <= 1.15 * 1000, fast
    dirty_slow, dirty_fast = by_guest(results, "dirty1", "C"), by_guest(results, "dirty2", "B")
    # past the scenario's timeout: cancelled, reported not converged, the guest running on at the source
    assert not dirty_slow["converged"] and dirty_slow["expected-downtime"], dirty_slow
    assert dirty_slow["status"] == "cancelled" and dirty_slow["source-running"] and "cancel-time" in dirty_slow
    assert dirty_fast["converged"] and dirty_fast["verified"], dirty_fast
    cut = by_guest(results, "slow", "A")
    assert cut["status"] == "failed" and cut["source-running"] and cut["error-desc"], cut
    path = report(str(tmp_path / "out"))
    text = open(path).read()
    assert (tmp_path / "out" / "remaining.png").stat().st_size > 1000
    assert "failed" in text and "dirty1" in text
    lines = (tmp_path / "out" / "runs" / "run000.jsonl").read_text().splitlines()
    kinds = {json.loads(line)["kind"] for line in lines}
    assert {"event", "query", "result"} <= kinds


@pytest.mark.long  # tests/test_convergence.py and test_rig_report.py run the rig by default
def test_evacuation_with_concurrency(tmp_path):
    results = run_scenario(tmp_path, "evacuation.toml")
    assert len(results) == 4
    assert all(r["status"] == "completed" and r["verified"] for r in results), results
    assert {r["to"] for r in results} == {"B", "C"}
    out = subprocess.run(["ip", "link", "show"], capture_output=True, text=True).stdout
    assert "lm1a" not in out and "lm1b" not in out


@pytest.mark.long
def test_matrix_and_repeat_on_loopback(tmp_path):
    """A parameter matrix with repetitions: one run per combination and repeat."""
    results = run_scenario(tmp_path, "matrix-loopback.toml", loopback=True)
    assert sorted({(r["max-bandwidth"], r["run"]) for r in results}) == sorted(
        {(bw, f"run{n:03d}") for n, bw in enumerate([64 << 20, 64 << 20, 0, 0])})
    assert all(r["status"] == "completed" and r["verified"] for r in results)
    report(str(tmp_path / "out"))
    assert (tmp_path / "out" / "times.png").exists()
