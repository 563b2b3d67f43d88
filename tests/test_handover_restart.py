"""A coordinator killed (SIGKILL) during the hand-over (docs/reliability.md):
at each hand-over point x-fault names, on the source or on the destination,
`POINT:kill-coordinator` kills the host's own coordinator there; the host's
supervisor starts a new one, which takes over. Within 30 s exactly one guest
runs, on the side `x-guest-holder` names, and it equals a replay of its
steps; both sides' run states are sampled all the while and are never both
running. And where the hosts cannot reach each other, a successor keeps
the open hand-over for x-migrate-resolve.

The default suite runs a sample (one kill on each side, one unreachable);
the whole matrix, 3 trials each, with LIVEMIG_LONG=1."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.conftest import replay_matches
from tests.test_handover import answers_within, coordinator_pid
from tests.test_handover_faults import WINDOW, Proxy, check_survivor, start

# (return path, side killed, x-fault point)
CASES = {
    "source-after-stop": (True, "src", "after-stop"),  # before EOF: no hand-over yet, the source resumes
    "source-after-eof": (True, "src", "after-eof"),
    "source-after-go": (True, "src", "after-go"),
    "destination-incoming": (True, "dst", "incoming"),  # mid-stream: the successor follows the load
    "destination-after-eof": (True, "dst", "after-eof"),
    "destination-after-shut": (True, "dst", "after-shut"),
    "destination-after-go": (True, "dst", "after-go"),
    "norp-source-after-eof": (False, "src", "after-eof"),
    "norp-destination-after-eof": (False, "dst", "after-eof"),
    "norp-destination-after-go": (False, "dst", "after-go"),  # it runs after EOF: no GO, same point
}
SAMPLE = ("source-after-go", "destination-after-shut")


def matrix():
    for case in CASES:
        for trial in range(3):
            marks = () if case in SAMPLE and trial == 0 else (pytest.mark.long,)
            yield pytest.param(case, trial, marks=marks, id=f"{case}-{trial}")


class Sampler:
    """Both hosts' run states, read in turn until stopped; a host whose
    coordinator is being replaced answers nothing for a moment (no reading).
    Never two running: a host read running, then the other, then the first
    again, ran both guests at once (no host stops and resumes in a hand-over)."""

    def __init__(self, src, dst) -> None:
        self.hosts = (src, dst)
        self.readings: list[tuple[float, str, str]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def read(self, host) -> str | None:
        try:
            return host.cmd("query-status")["status"]
        except Exception:  # the monitor waits for the new coordinator
            return None

    def run(self) -> None:
        while not self.stop.is_set():
            for host in self.hosts:
                status = self.read(host)
                if status is not None:
                    self.readings.append((time.monotonic(), host.name, status))
            time.sleep(0.005)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)
        r = self.readings
        assert len(r) > 10, "the run states were hardly sampled"
        running = [x for x in r if x[2] == "running"]
        for first, middle, last in zip(running, running[1:], running[2:], strict=False):
            assert not (first[1] == last[1] != middle[1]), f"two guests ran at once: {first, middle, last}"


def wait_one(src, dst, seconds: float) -> str:
    """Until exactly one guest runs and both sides' migrations ended: which one.
    The ends are read first: the run states read after them are final."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            info, dinfo = src.cmd("query-migrate"), dst.cmd("query-migrate")
            states = {"src": src.cmd("query-status")["status"], "dst": dst.cmd("query-status")["status"]}
        except Exception:  # a coordinator is being replaced
            states, info, dinfo = {}, {}, {}
        running = [name for name, st in states.items() if st == "running"]
        ended = info.get("status") in ("completed", "failed") and dinfo.get("status") in ("completed", "failed")
        if len(running) == 1 and ended:
            return running[0]
        assert time.monotonic() < deadline, (states, info, dinfo)
        time.sleep(0.05)


@pytest.mark.parametrize(("case", "trial"), list(matrix()))
def test_coordinator_killed_during_the_handover(hosts, tmp_path, port, case, trial):
    return_path, side, point = CASES[case]
    src, dst = start(hosts, port, return_path)
    victim = src if side == "src" else dst
    victim.cmd("migrate-set-parameters", **{"x-fault": f"{point}:kill-coordinator"})
    if point == "incoming":  # it strikes 0.2 s into the stream: make the stream last longer
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
    pid = coordinator_pid(victim)
    sampler = Sampler(src, dst)
    try:
        t0 = time.monotonic()
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        who = wait_one(src, dst, WINDOW)
        took = time.monotonic() - t0
        time.sleep(0.3)  # and it stays one
    finally:
        sampler.finish()
    assert victim.alive(), "the host stopped instead of replacing its coordinator"
    assert coordinator_pid(victim) != pid, "the coordinator was not killed"
    print(f"{case}: one guest ({who}) after {took:.1f} s, {len(sampler.readings)} readings")
    info, dinfo = src.cmd("query-migrate"), dst.cmd("query-migrate")
    if point == "after-stop":  # nothing was handed over: no holder on either side
        assert who == "src" and info["status"] == dinfo["status"] == "failed", (who, info, dinfo)
        assert "x-guest-holder" not in info and "x-guest-holder" not in dinfo, (info, dinfo)
        before = src.cmd("x-query-vcpus")[0]["step"]
        time.sleep(0.3)
        assert src.cmd("x-query-vcpus")[0]["step"] > before, "the guest does not run on"
        result = replay_matches(src, tmp_path)
        assert result["ram_equal"] and result["vcpu_equal"], result
        return
    holder = info["x-guest-holder"]
    assert holder == ("destination" if who == "dst" else "source"), (who, holder)
    assert dinfo["x-guest-holder"] == holder
    check_survivor(src, dst, who, tmp_path)  # and it equals its replay


@pytest.mark.parametrize("side", ["dst", pytest.param("src", marks=pytest.mark.long)])
def test_coordinator_killed_while_the_hosts_cannot_reach_each_other(hosts, tmp_path, port, side):
    """GO is lost and the proxy goes dark; then one side's coordinator is
    killed. Its successor keeps the open hand-over: neither runs, both name
    the destination as holder, x-migrate-resolve on the destination runs the
    guest, and the source learns it once the link is back."""
    src, dst = start(hosts, port, True)
    proxy = Proxy(port, "go", dark=True)
    sampler = Sampler(src, dst)
    try:
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{proxy.port}")
        deadline = time.monotonic() + WINDOW
        while not (proxy.lost.is_set() and dst.cmd("query-migrate").get("x-guest-holder")):
            assert time.monotonic() < deadline, (src.cmd("query-migrate"), dst.cmd("query-migrate"))
            time.sleep(0.05)
        victim = src if side == "src" else dst
        old = coordinator_pid(victim)
        os.kill(old, signal.SIGKILL)
        time.sleep(0.1)
        answers_within(victim, 10)
        assert coordinator_pid(victim) != old
        time.sleep(1)  # the source tries to resolve, and cannot
        assert src.cmd("query-status")["status"] == "finish-migrate"
        assert dst.cmd("query-status")["status"] == "inmigrate"
        info, dinfo = src.cmd("query-migrate"), dst.cmd("query-migrate")
        assert info["status"] == "device" and info["x-guest-holder"] == "destination", info
        assert dinfo["status"] == "active" and dinfo["x-guest-holder"] == "destination", dinfo
        with pytest.raises(RuntimeError, match="run x-migrate-resolve there"):
            src.cmd("x-migrate-resolve")
        assert dst.cmd("x-migrate-resolve") == {"holder": "destination"}
        dst.wait_status("running", 10)
        assert src.cmd("query-status")["status"] == "finish-migrate"
        proxy.light()
        assert src.wait_migration(15)["status"] == "completed"
    finally:
        sampler.finish()
        proxy.close()
    check_survivor(src, dst, "dst", tmp_path)
