"""vCPU pacing under a CPU throttle and a dirty limit, and dirty-rate
measurement: first the arithmetic on a simulated clock, then real vCPU
processes of a running host, spoken to on their own sockets."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import zmq

from livemig.actors.base import ActorError, Client
from livemig.machine.dirtyrate import DirtyMeter, PageSampler
from livemig.machine.ram import PAGE_SIZE, GuestRam
from livemig.machine.throttle import SLICE, Pacer, throttle_sleep
from tests.conftest import guest_args

MIB = 1 << 20


def simulate(pacer: Pacer, seconds: float, pages_per_step: float = 1.0, tick: float = 0.001,
             start: float = 0.0) -> list[tuple[float, int]]:
    """Drive a pacer the way the vCPU loop does; returns (time, steps) per batch."""
    batches, t = [], start
    batch = max(1, int(pacer.rate * SLICE))
    while t < start + seconds:
        n = pacer.due(t, batch)
        if n:
            pacer.ran(n, n * pages_per_step, t)  # a fraction: pages shared by batches
            batches.append((t, n))
        t = max(t + tick, pacer.next_due(t)) if not n else t
    return batches


def test_throttle_sleep_is_qemus():
    assert throttle_sleep(0) == 0
    assert throttle_sleep(50) == pytest.approx(0.010)
    assert throttle_sleep(20) == pytest.approx(0.0025)
    assert throttle_sleep(99) == pytest.approx(0.99)


@pytest.mark.parametrize("percent", [0, 20, 50, 80, 99])
def test_throttle_leaves_the_running_share(percent):
    pacer = Pacer(10_000)
    pacer.set_throttle(percent, 0.0)
    steps = sum(n for _, n in simulate(pacer, 10.0))
    assert steps == pytest.approx(10_000 * 10 * (1 - percent / 100), rel=0.02, abs=110)


def test_throttle_sleeps_between_slices():
    """At 50 % the vCPU works 10 ms, then nothing comes due for 10 ms."""
    pacer = Pacer(100_000)
    pacer.set_throttle(50, 0.0)
    times = [t for t, _ in simulate(pacer, 0.1, tick=0.0005)]
    gaps = np.diff(times)
    assert gaps.max() == pytest.approx(0.010, abs=0.0011)
    assert pacer.run_time(0.1) == pytest.approx(0.05)


def test_throttle_change_keeps_the_steps_already_run():
    pacer = Pacer(1000)
    simulate(pacer, 1.0)
    before = pacer.done
    pacer.set_throttle(90, 1.0)
    simulate(pacer, 1.0, start=1.0)
    assert before == pytest.approx(1000, abs=2)
    assert pacer.done - before == pytest.approx(100, abs=11)
    with pytest.raises(ValueError):
        pacer.set_throttle(100, 2.0)


@pytest.mark.parametrize("limit,period", [(1, 1.0), (4, 0.2), (0.5, 0.05)])
def test_dirty_limit_holds_the_page_rate(limit, period):
    """A vCPU able to dirty 16 MiB/s is held at the limit, measured per round."""
    pacer = Pacer(16 * MIB / PAGE_SIZE)
    pacer.set_dirty_limit(limit, period, 0.0)
    pages = sum(n for _, n in simulate(pacer, 5.0))
    allowed = limit * MIB / PAGE_SIZE * 5
    assert pages == pytest.approx(allowed, rel=0.03, abs=2 * int(pacer.rate * SLICE))
    info = pacer.info(5.0)
    assert info["current-rate"] == pytest.approx(limit, rel=0.1)
    # Held back for the share of every round it could not run: it wanted 16 MiB/s.
    assert info["throttle-us-per-round"] == pytest.approx((1 - limit / 16) * period * 1e6, rel=0.05)


def test_dirty_limit_counts_pages_not_steps():
    """kv-like steps write a sixteenth of a page each: sixteen times the steps of a page-per-step workload."""
    pacer = Pacer(50_000)
    pacer.set_dirty_limit(1, 1.0, 0.0)
    steps = sum(n for _, n in simulate(pacer, 4.0, pages_per_step=1 / 16))
    assert steps == pytest.approx(256 * 4 * 16, rel=0.05)


def test_dirty_limit_below_the_workload_changes_nothing():
    pacer = Pacer(256)  # 1 MiB/s
    pacer.set_dirty_limit(8, 1.0, 0.0)
    steps = sum(n for _, n in simulate(pacer, 3.0))
    assert steps == pytest.approx(768, abs=3)
    assert pacer.info(3.0)["throttle-us-per-round"] == 0
    pacer.set_dirty_limit(0, 1.0, 3.0)  # cancel
    assert not pacer.limit


def test_dirty_meter_counts_distinct_pages():
    meter = DirtyMeter(100)
    meter.mark(np.array([1, 2]))  # not started: ignored
    meter.start()
    meter.mark(np.array([1, 2, 3]))
    meter.mark(np.array([3, 4]))
    assert meter.stop() == 4
    assert not meter.active and meter.stop() == 0


def test_page_sampler_sees_writes(tmp_path):
    ram = GuestRam(str(tmp_path / "ram"), [("pc.ram", 64 << 20), ("tiny", 64 << 10)], create=True)
    try:
        sampler = PageSampler(ram, 4096, seed=1)
        assert len(sampler.pages) == 256  # 4096 per GiB of 64 MiB; the tiny block is skipped
        assert sampler.rate(1.0) == 0.0
        ram.pages[: ram.pages.shape[0] // 2] = 1  # half the big block
        assert sampler.rate(2.0) == pytest.approx(16, rel=0.3)
    finally:
        ram.close()


# real vCPU processes ---------------------------------------------------------------
@pytest.fixture
def vcpu_host(hosts):
    host = hosts.start("pace", *guest_args(ram="32M", fill="zero", workload="memtouch:rate=8M,wss=32M"))
    rundir = os.path.dirname(host.info["events"].removeprefix("ipc://"))
    ctx = zmq.Context()
    client = Client(ctx, f"ipc://{rundir}/vcpu0.sock", "test")
    yield host, client
    client.close()
    ctx.destroy(linger=0)


def step_rate(client: Client, seconds: float) -> float:
    a = client.call("pace").data["result"]["step"]
    time.sleep(seconds)
    return (client.call("pace").data["result"]["step"] - a) / seconds


def test_vcpu_process_throttle_and_dirty_limit(vcpu_host):
    """A real vCPU: 8 MiB/s (2048 steps/s) free, half under a 50 % throttle,
    1 MiB/s under a dirty limit of 1, and back to full speed when both end."""
    _, vcpu = vcpu_host
    free = step_rate(vcpu, 1.0)
    assert free == pytest.approx(2048, rel=0.1)
    assert vcpu.call("throttle", {"percentage": 50}).data["result"]["throttle"] == 50
    assert step_rate(vcpu, 1.5) == pytest.approx(1024, rel=0.15)
    vcpu.call("throttle", {"percentage": 0})
    vcpu.call("dirty_limit", {"limit": 1, "period": 250})
    time.sleep(0.5)
    assert step_rate(vcpu, 1.5) == pytest.approx(256, rel=0.15)
    info = vcpu.call("pace").data["result"]
    assert info["current-rate"] == pytest.approx(1, rel=0.2)
    assert info["throttle-us-per-round"] > 150_000
    vcpu.call("dirty_limit", {"limit": 0})
    assert step_rate(vcpu, 1.0) == pytest.approx(2048, rel=0.1)
    with pytest.raises(ActorError, match="invalid throttle"):
        vcpu.call("throttle", {"percentage": 100})


def test_vcpu_process_measures_distinct_pages(vcpu_host):
    """dirty-bitmap mode's count: memtouch at 8 MiB/s over 32 MiB for 1 s
    writes about 32 x (1 - e^-0.25) MiB of distinct pages."""
    _, vcpu = vcpu_host
    vcpu.call("measure_start")
    time.sleep(1.0)
    pages = vcpu.call("measure_stop").data["result"]["pages"]
    expected = 8192 * (1 - np.exp(-2048 * 1.0 / 8192))
    assert pages == pytest.approx(expected, rel=0.15)
