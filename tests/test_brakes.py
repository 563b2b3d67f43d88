"""The brakes on a guest's vCPUs over QMP and HMP: dirty limits set by hand,
dirty-rate measurement, auto-converge and dirty-limit during a migration
that a max-bandwidth cap makes too slow for the guest, and the stall verdict
when nothing is braking. Migrations go over loopback; tests/test_convergence.py
has the shaped links."""

from __future__ import annotations

import time

import pytest

from tests.conftest import guest_args, replay_matches

HOT = "memtouch:rate=16M,wss=16M"  # 4096 steps/s, twice the 8 MiB/s cap below
CAP = 8 << 20


def step_rate(host, seconds: float = 1.0) -> float:
    a = host.cmd("x-query-vcpus")[0]["step"]
    time.sleep(seconds)
    return (host.cmd("x-query-vcpus")[0]["step"] - a) / seconds


def test_parameters_and_capabilities_as_qemu_has_them(hosts):
    h = hosts.start("p", *guest_args(ram="16M", fill="zero"))
    params = h.cmd("query-migrate-parameters")
    assert {k: params[k] for k in ("throttle-trigger-threshold", "cpu-throttle-initial", "cpu-throttle-increment",
                                   "cpu-throttle-tailslow", "max-cpu-throttle", "vcpu-dirty-limit",
                                   "x-vcpu-dirty-limit-period")} == {
        "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
        "cpu-throttle-tailslow": False, "max-cpu-throttle": 99, "vcpu-dirty-limit": 1,
        "x-vcpu-dirty-limit-period": 1000}
    with pytest.raises(RuntimeError, match="'cpu_throttle_initial' expects an integer in the range of 1 to 99"):
        h.cmd("migrate-set-parameters", **{"cpu-throttle-initial": 100})
    with pytest.raises(RuntimeError, match="range of 1 to 1000"):
        h.cmd("migrate-set-parameters", **{"x-vcpu-dirty-limit-period": 0})
    with pytest.raises(RuntimeError, match="conflicts with auto-converge"):
        h.cmd("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": True},
                                                        {"capability": "dirty-limit", "state": True}])
    caps = {c["capability"]: c["state"] for c in h.cmd("query-migrate-capabilities")}
    assert caps["auto-converge"] is False and caps["dirty-limit"] is False


def test_vcpu_dirty_limit_by_hand(hosts):
    """set-vcpu-dirty-limit outside a migration: 16 MiB/s held at 2, shown by
    query-vcpu-dirty-limit and HMP, lifted by cancel-vcpu-dirty-limit."""
    h = hosts.start("dl", *guest_args(ram="32M", fill="zero", workload=HOT, vcpus=2))
    assert h.cmd("query-vcpu-dirty-limit") == []
    h.cmd("set-vcpu-dirty-limit", **{"dirty-rate": 2})
    # current-rate is the last whole period's (1 s): the one the limit cut in
    # on still holds unlimited steps, so wait for a period under the limit.
    deadline = time.monotonic() + 8
    limits = h.cmd("query-vcpu-dirty-limit")
    while not all(1 <= v["current-rate"] <= 3 for v in limits):
        assert time.monotonic() < deadline, limits
        time.sleep(0.25)
        limits = h.cmd("query-vcpu-dirty-limit")
    assert [v["cpu-index"] for v in limits] == [0, 1] and all(v["limit-rate"] == 2 for v in limits)
    assert step_rate(h, 1.5) == pytest.approx(512, rel=0.2)  # 2 MiB/s of pages, per vCPU
    h.cmd("cancel-vcpu-dirty-limit", **{"cpu-index": 1})
    assert [v["cpu-index"] for v in h.cmd("query-vcpu-dirty-limit")] == [0]
    text = h.cmd("human-monitor-command", **{"command-line": "info vcpu_dirty_limit"})
    assert text.startswith("vcpu[0], limit rate 2 (MB/s), current rate")
    with pytest.raises(RuntimeError, match="incorrect cpu index specified"):
        h.cmd("set-vcpu-dirty-limit", **{"dirty-rate": 2, "cpu-index": 2})
    h.cmd("human-monitor-command", **{"command-line": "cancel_vcpu_dirty_limit"})
    assert h.cmd("query-vcpu-dirty-limit") == []
    assert step_rate(h, 1.0) == pytest.approx(4096, rel=0.15)  # 16 MiB/s again (each vCPU runs the rate)


def measure(h, **args) -> dict:
    h.cmd("calc-dirty-rate", **args)
    assert h.cmd("query-dirty-rate")["status"] == "measuring"
    deadline = time.monotonic() + args["calc-time"] + 20
    while (info := h.cmd("query-dirty-rate"))["status"] != "measured":
        assert time.monotonic() < deadline, info
        time.sleep(0.1)
    return info


def test_calc_dirty_rate(hosts):
    """An idle guest measures under 1 MB/s; a memtouch guest writing 8 MiB/s
    over 64 MiB measures what it wrote in distinct pages: 64 x (1 - e^-1/8)
    = 7.5 MiB in one second, by sampling and exactly."""
    idle = hosts.start("idle", *guest_args(ram="64M"))
    assert h_rate(idle, **{"calc-time": 1})["dirty-rate"] < 1
    busy = hosts.start("busy", *guest_args(ram="64M", workload="memtouch:rate=8M,wss=64M"))
    info = h_rate(busy, **{"calc-time": 1, "sample-pages": 16384})
    assert info["mode"] == "page-sampling" and info["sample-pages"] == 16384 and info["calc-time"] == 1
    assert 5 <= info["dirty-rate"] <= 10, info
    exact = h_rate(busy, **{"calc-time": 1, "mode": "dirty-bitmap"})
    assert exact["sample-pages"] == 0 and 6 <= exact["dirty-rate"] <= 9, exact
    ring = h_rate(busy, **{"calc-time": 1, "mode": "dirty-ring"})
    assert [v["id"] for v in ring["vcpu-dirty-rate"]] == [0]
    text = busy.cmd("human-monitor-command", **{"command-line": "info dirty_rate"})
    assert "Mode: dirty-ring" in text and "Dirty rate: " in text
    for bad, why in (({"calc-time": 0}, "out of range"), ({"calc-time": 1, "sample-pages": 64}, "out of range"),
                     ({"calc-time": 1, "mode": "dirty-bitmap", "sample-pages": 512}, "only in page-sampling"),
                     ({"calc-time": 1, "mode": "bogus"}, "does not accept")):
        with pytest.raises(RuntimeError, match=why):
            busy.cmd("calc-dirty-rate", **bad)


h_rate = measure


def hot_pair(hosts, port):
    args = guest_args(ram="32M", fill="zero", workload=HOT)
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", f"tcp:127.0.0.1:{port}")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": CAP, "downtime-limit": 100})
    return src, dst


def watch(src, key: str, timeout: float = 60) -> tuple[dict, list]:
    """Poll query-migrate until it ends; the values `key` took meanwhile."""
    seen = []
    deadline = time.monotonic() + timeout
    while (info := src.cmd("query-migrate"))["status"] not in ("completed", "failed", "cancelled"):
        if key in info:
            seen.append(info[key])
        assert time.monotonic() < deadline, info
        time.sleep(0.05)
    return info, seen


def test_auto_converge_completes_a_guest_that_outruns_its_link(hosts, tmp_path, port):
    src, dst = hot_pair(hosts, port)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "auto-converge", "state": True}])
    src.cmd("migrate-set-parameters", **{"cpu-throttle-initial": 40, "cpu-throttle-increment": 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info, throttle = watch(src, "cpu-throttle-percentage")
    assert info["status"] == "completed" and info["downtime"] <= 100 * 1.2 + 10, info
    assert throttle and throttle[0] == 40 and max(throttle) >= 60, throttle
    assert "cpu-throttle-percentage" not in info
    dst.wait_status("running", 30)
    assert step_rate(dst) == pytest.approx(4096, rel=0.15)  # the destination runs free
    src.cmd("cont")  # and the source, were it run again, too
    assert step_rate(src) == pytest.approx(4096, rel=0.15)
    src.cmd("stop")
    assert all(replay_matches(dst, tmp_path, fill="zero").values())


def test_dirty_limit_completes_it_too(hosts, tmp_path, port):
    src, dst = hot_pair(hosts, port)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "dirty-limit", "state": True}])
    src.cmd("migrate-set-parameters", **{"vcpu-dirty-limit": 2, "x-vcpu-dirty-limit-period": 200})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info, held = watch(src, "dirty-limit-throttle-time-per-round")
    assert info["status"] == "completed" and info["downtime"] <= 100 * 1.2 + 10, info
    assert held and max(held) > 100_000, held  # of each 200 ms round, held most: 2 of 16 MiB/s allowed
    assert src.cmd("query-vcpu-dirty-limit") == []  # the migration's limit went with it
    dst.wait_status("running", 30)
    assert step_rate(dst) == pytest.approx(4096, rel=0.15)
    assert all(replay_matches(dst, tmp_path, fill="zero").values())


def test_without_brakes_it_is_stalled_and_a_cancel_leaves_it_at_full_speed(hosts, port):
    src, dst = hot_pair(hosts, port)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    mon = src.qmp()
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while "x-stalled" not in (info := src.cmd("query-migrate")):
            assert time.monotonic() < deadline and info["status"] in ("setup", "active"), info
            time.sleep(0.1)
        verdict = info["x-stalled"]
        assert verdict["expected-downtime"] > 100 and 0.7 * CAP < verdict["bandwidth"] < 1.3 * CAP, verdict
        assert verdict["dirty-rate"] > CAP / 2, verdict  # distinct pages: the 16 MiB working set, rewritten
        event = None
        while event is None or event["event"] != "MIGRATION_STALLED":
            event = mon.pull_event(wait=10)
            assert event is not None
        assert event["data"]["expected-downtime"] > 100
        text = src.cmd("human-monitor-command", **{"command-line": "info migrate"})
        assert "not converging: dirty rate" in text
    finally:
        mon.close()
    src.cmd("migrate_cancel")
    assert src.wait_migration(10)["status"] == "cancelled"
    assert src.cmd("query-status")["status"] == "running"
    assert step_rate(src) == pytest.approx(4096, rel=0.15)
