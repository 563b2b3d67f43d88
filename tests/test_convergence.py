"""The convergence arithmetic: the link's honest figures, QEMU's auto-converge
steps and the stall verdict, on made-up numbers."""

from __future__ import annotations

import os
import shutil

import pytest

from livemig.actors.coordinator.convergence import FIRST_PENDING, WINDOW, AutoConverge, Link, Stall
from livemig.tools.rig import Rig, Scenario, leftovers, report
from tests.conftest import TAG


def test_nothing_measured_means_no_switchover():
    """A queue that took 48 MiB at once must not look like a fast link."""
    link = Link(0.0, 0)
    assert link.budget(0) == FIRST_PENDING
    link.add(48 << 20)
    assert not link.fits(0, 300)
    assert link.budget(0) == 0 and link.budget(1 << 30) == 0
    link.observe(0.05, 4 << 20)  # into the kernel, half a window: no rate yet
    assert not link.fits(0, 300)


def test_bandwidth_is_bytes_that_left():
    link = Link(0.0, 1000)
    link.add(10 << 20)
    assert link.observe(WINDOW, 1000 + 1_250_000)  # 100 Mbit/s
    assert link.bandwidth == pytest.approx(12.5e6)
    assert link.pending == (10 << 20) - 1_250_000
    assert link.expected_ms(0) == int(link.pending / 12.5e6 * 1000)
    assert not link.fits(0, 300)  # 9 MB still to go: 700 ms
    link.observe(WINDOW * 8, 1000 + (10 << 20) - 2_000_000)
    assert link.fits(1_000_000, 300)  # 3 MB left of 3.75 MB allowed
    assert not link.fits(2_000_000, 300)


def test_budget_keeps_a_window_ahead_and_respects_max_bandwidth():
    link = Link(0.0, 0)
    link.add(1 << 20)
    link.observe(WINDOW, 1 << 20)  # 10 MiB/s, nothing pending
    assert link.budget(0) == int(link.bandwidth * WINDOW)
    limited = Link(0.0, 0)
    share = int((2 << 20) * WINDOW)
    assert limited.budget(2 << 20) == share
    limited.add(share + 1000)  # a batch overshot
    assert limited.budget(2 << 20) == 0  # the window's max-bandwidth share is spent
    limited.close_budget_window(2 << 20)
    assert limited.budget(2 << 20) == share - 1000  # the overshoot is owed
    link.add(int(link.bandwidth * WINDOW))
    assert link.budget(0) == 0  # a window's worth waits: enough


def test_a_link_that_stops_moving_is_seen_while_nothing_is_written():
    """Bytes queued and none leaving: stuck_for counts from the last that left,
    whether or not the writer is blocked (a full queue asks for no more)."""
    link = Link(0.0, 0)
    link.add(4 << 20)
    link.observe(WINDOW, 1 << 20)
    assert link.stuck_for(WINDOW) == 0
    link.observe(2 * WINDOW, 1 << 20)  # the link died
    link.observe(25 * WINDOW, 1 << 20)
    assert link.stuck_for(25 * WINDOW) == pytest.approx(24 * WINDOW)
    link.observe(26 * WINDOW, 2 << 20)  # it moves again
    assert link.stuck_for(26 * WINDOW) == 0
    link.observe(27 * WINDOW, 4 << 20)  # all gone: nothing waits, nothing is stuck
    assert link.stuck_for(40 * WINDOW) == 0


def test_a_full_queue_is_refilled_in_large_requests():
    """A link whose queue is nearly full is not asked for crumbs: the next
    request waits (and the coordinator sleeps) until a quarter has left."""
    link = Link(0.0, 0)
    link.add(100 << 20)
    link.observe(WINDOW, 60 << 20)  # 600 MiB/s measured: 60 MiB a window ahead, 40 MiB pending
    ahead = int(link.bandwidth * WINDOW)
    link.add(ahead - link.pending - (1 << 20))  # 1 MiB short of a window ahead
    assert link.budget(0) == 0
    assert link.pause(0.005) == pytest.approx((ahead // 4 - (1 << 20)) / link.bandwidth)  # 23 ms
    sent = link.sent + ahead // 2  # half of the queue left
    link.observe(1.5 * WINDOW, sent)  # within the window: the rate stands
    assert link.budget(0) == ahead - link.pending > ahead // 4
    assert link.pause(0.005) == 0.005


def test_an_idle_window_keeps_the_rate():
    link = Link(0.0, 0)
    link.add(4 << 20)
    link.observe(WINDOW, 2 << 20)
    fast = link.bandwidth
    link.observe(2 * WINDOW, 4 << 20)  # drained halfway through the window
    assert link.pending == 0
    link.observe(3 * WINDOW, 4 << 20)  # nothing to send
    assert link.bandwidth == fast


def test_auto_converge_fires_on_the_second_hit_per_period():
    ac = AutoConverge()
    assert not ac.on_sync(0.0, 0, 0)
    assert not ac.on_sync(0.5, 30 << 20, 10 << 20)  # period not over
    assert not ac.on_sync(1.0, 0, 40 << 20)  # first hit: 30 MiB dirtied > 50 % of 40 MiB sent
    assert not ac.on_sync(2.1, 1 << 20, 80 << 20)  # below the threshold: no hit, counter kept
    assert ac.on_sync(3.2, 30 << 20, 120 << 20)  # second hit
    assert ac.step(30 << 20, 40 << 20) == 20
    assert ac.step(30 << 20, 40 << 20) == 30
    ac.percentage = 95
    assert ac.step(30 << 20, 40 << 20) == 99  # capped at max-cpu-throttle


def test_tailslow_steps_only_to_the_ideal_share():
    ac = AutoConverge(tailslow=True, percentage=40)
    # cpu_now 60; ideal 60 * (50 % of 100) / 55 = 54.5: step 5, not 10
    assert ac.step(55, 100) == 45
    assert AutoConverge(tailslow=True, percentage=40).step(500, 100) == 50


def test_stall_verdict():
    st = Stall()
    for left in (30, 31, 29, 30):
        assert not st.on_sync(left << 20, 2000, 50)
    assert st.on_sync(32 << 20, 2000, 50)
    assert st.stalled and not st.on_sync(30 << 20, 2000, 50)  # said once
    assert not st.on_sync(30 << 20, 40, 50) and not st.stalled  # now it would fit
    braking = Stall()
    for left in (30, 31, 29, 30, 32):
        assert not braking.on_sync(left << 20, 2000, 50, braking=True)  # a throttle step is still to come
    shrinking = Stall()
    for left in (30, 25, 20, 15, 10, 5):
        assert not shrinking.on_sync(left << 20, 2000, 50)


# on shaped links ---------------------------------------------------------------------
needs_rig = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("tc"),
                               reason="network namespaces and tc need root and iproute2")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_scenario(tmp_path, example: str) -> list[dict]:
    rig = Rig(Scenario.load(os.path.join(EXAMPLES, example)), str(tmp_path / "out"))
    rig.env = {"LIVEMIG_TEST_TAG": TAG}
    try:
        return rig.execute()
    finally:
        mine = [ns for ns in leftovers() if ns.startswith(f"lm{rig.net.tag}")]
        assert not mine, f"namespaces left behind: {mine}"


@needs_rig
def test_downtime_limit_holds_on_every_link(tmp_path):
    """100 Mbit/s with max-bandwidth 0 and 1 GiB/s, idle and dirtying; 1 Gbit/s
    with a 50 ms limit: each downtime within the limit + 20 % (+10 ms), each
    guest verified by replay."""
    results = run_scenario(tmp_path, "converge-links.toml")
    assert len(results) == 5
    for r in results:
        assert r["status"] == "completed" and r["verified"], r
        assert r["downtime"] <= r["downtime-limit"] * 1.2 + 10, r


@needs_rig
def test_a_guest_that_outruns_its_link(tmp_path):
    """Twice the link's rate: without a brake stalled, and cancelled at its
    timeout with the guest running on at the source; with auto-converge the
    throttle rises until it completes within the limit; with dirty-limit too.
    Both verified by replay, the throttle plotted beside the remaining bytes."""
    plain, auto, limited = run_scenario(tmp_path, "converge-hot.toml")
    assert plain["status"] == "cancelled" and not plain["converged"] and plain["x-stalled"], plain
    assert plain["x-stalled"]["expected-downtime"] > plain["downtime-limit"], plain
    assert plain["source-running"] and plain["cancel-time"] < 5000, plain
    for r in (auto, limited):
        assert r["status"] == "completed" and r["verified"], r
        assert r["downtime"] <= r["downtime-limit"] * 1.2 + 10, r
    assert auto["peak-cpu-throttle-percentage"] >= 30, auto
    assert "peak-cpu-throttle-percentage" not in limited, limited
    text = open(report(str(tmp_path / "out"))).read()
    assert "peak cpu throttle" in text and "CPU throttle of 1 throttled" in text and (tmp_path / "out" / "remaining.png").stat().st_size > 1000
