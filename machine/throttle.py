"""Pacing one vCPU: which of its workload's steps are due, under two brakes.

- CPU throttling (auto-converge), as QEMU does it: at throttle p the vCPU
  works a 10 ms time slice, then sleeps p/(1-p) x 10 ms, so it runs a share
  1-p of wall time.
- A dirty-page-rate limit (dirty-limit): the vCPU dirties at most `limit`
  MiB/s (QEMU's "MB" is 2^20 bytes), enforced over every window of `period`
  seconds. QEMU approximates this from outside through KVM's dirty ring; a
  livemig vCPU runs its own steps, so it holds them back exactly: a token
  bucket of pages, refilled at the limit and never holding more than one
  period's worth, is charged with the pages each batch of steps wrote.

Steps come due at the workload's rate per second of *running* time (time not
spent in a throttle sleep). Everything here is a pure function of the times
passed in, so it is tested without a clock.
"""

from __future__ import annotations

import math

from livemig.machine.ram import PAGE_SIZE

SLICE = 0.01  # seconds of work between two throttle sleeps (QEMU's time slice)
MIB = 1 << 20
MAX_THROTTLE = 99  # percent; QEMU refuses more


def throttle_sleep(percentage: int) -> float:
    """Seconds a vCPU sleeps after each time slice of work at this throttle."""
    p = percentage / 100
    return p / (1 - p) * SLICE


class Pacer:
    def __init__(self, rate: float) -> None:
        self.rate = rate  # steps per second of running time
        self.throttle = 0  # percent
        self.limit = 0.0  # MiB/s, 0 = no dirty limit
        self.period = 1.0  # seconds
        self.start(0.0)

    def start(self, now: float) -> None:
        """The vCPU (re)starts running at `now`: a fresh clock, brakes kept."""
        self.done = 0  # steps run since start
        self.run_base = 0.0  # running time before `since`
        self.lost = 0.0  # running time the dirty limit held the vCPU: its steps are never run
        self.since = now  # when the throttle last changed (or the vCPU started)
        self.credit = 0.0  # pages the dirty limit lets the vCPU write now
        self.refilled = now
        self.pages_per_step = 1.0  # estimate from the last batch, to size the next one
        self.held_since: float | None = None  # when the dirty limit began holding steps back
        self.round_start, self.round_pages, self.round_held = now, 0.0, 0.0
        self.last_rate = 0.0  # MiB/s dirtied in the last full round
        self.last_held = 0.0  # seconds held back by the dirty limit in the last full round

    # CPU throttle -------------------------------------------------------------
    def set_throttle(self, percentage: int, now: float) -> None:
        if not 0 <= percentage <= MAX_THROTTLE:
            raise ValueError(f"throttle must be 0..{MAX_THROTTLE} %, not {percentage}")
        self.run_base, self.since = self.run_time(now), now
        self.throttle = percentage

    def run_time(self, now: float) -> float:
        """Seconds of running time since start: slices of work between sleeps."""
        t = max(0.0, now - self.since)
        if not self.throttle:
            return self.run_base + t
        full, rest = divmod(t, SLICE + throttle_sleep(self.throttle))
        return self.run_base + full * SLICE + min(rest, SLICE)

    def _wall_for_run_time(self, target: float) -> float:
        """The earliest wall time at which running time reaches `target`."""
        extra = target - self.run_base
        if not self.throttle:
            return self.since + extra
        full = math.floor(extra / SLICE)
        return self.since + full * (SLICE + throttle_sleep(self.throttle)) + (extra - full * SLICE)

    # dirty limit ----------------------------------------------------------------
    def set_dirty_limit(self, limit_mib: float, period: float, now: float) -> None:
        """Limit the vCPU to `limit_mib` MiB/s over `period` s windows (0: no limit)."""
        if limit_mib < 0 or period <= 0:
            raise ValueError("a dirty limit needs a rate >= 0 and a period > 0")
        self._refill(now)
        self.limit, self.period = float(limit_mib), float(period)
        self.credit = min(self.credit, self.capacity)
        if not self.limit:
            self._end_hold(now)

    @property
    def limit_pages(self) -> float:
        """Pages per second the dirty limit allows."""
        return self.limit * MIB / PAGE_SIZE

    @property
    def capacity(self) -> float:
        return self.limit_pages * self.period

    def _refill(self, now: float) -> None:
        if self.limit:
            self.credit = min(self.capacity, self.credit + (now - self.refilled) * self.limit_pages)
        self.refilled = now

    # steps -------------------------------------------------------------------------
    def due(self, now: float, most: int) -> int:
        """How many steps (at most `most`) the vCPU may run now."""
        if self.limit:
            self._refill(now)
            if self.credit <= 0:
                if self.held_since is None and self._steps_owed(now) > 0:
                    self.held_since = now
                return 0
            self._end_hold(now)
        n = min(most, self._steps_owed(now))
        if n <= 0 or not self.limit:
            return max(0, n)
        return max(1, min(n, int(self.credit / self.pages_per_step)))

    def _steps_owed(self, now: float) -> int:
        return int((self.run_time(now) - self.lost) * self.rate) - self.done

    def _end_hold(self, now: float) -> None:
        """A held vCPU goes on from where it was held: those steps are lost, not caught up."""
        if self.held_since is not None:
            if now > self.held_since:
                self.lost += self.run_time(now) - self.run_time(self.held_since)
                self.round_held += now - self.held_since
            self.held_since = None

    def ran(self, steps: int, pages: float, now: float) -> None:
        """Account a batch of `steps` that wrote `pages` distinct pages."""
        self.done += steps
        if steps:
            self.pages_per_step = max(pages / steps, 1e-6)
        if self.limit:
            self._refill(now)
            self.credit -= pages
            if self.credit <= 0:
                # Held back from when the next step is due until the bucket refills.
                self.held_since = max(now, self._wall_for_run_time((self.done + 1) / self.rate + self.lost))
        self.round_pages += pages
        if now - self.round_start >= self.period:
            elapsed = now - self.round_start
            self.last_rate = self.round_pages * PAGE_SIZE / MIB / elapsed
            self.last_held = self.round_held * self.period / elapsed  # per nominal round
            self.round_start, self.round_pages, self.round_held = now, 0.0, 0.0

    def next_due(self, now: float) -> float:
        """Wall time at which the next step may run."""
        at = self._wall_for_run_time((self.done + 1) / self.rate + self.lost)
        if self.limit and self.credit <= 0:
            at = max(at, self.refilled + (1e-6 - self.credit) / self.limit_pages)
        return max(now, at)

    def info(self, now: float) -> dict:
        """The vCPU's brakes and its measured dirty rate (MiB/s, last full round)."""
        return {"throttle": self.throttle, "limit": self.limit, "period": self.period,
                "current-rate": self.last_rate, "throttle-us-per-round": int(self.last_held * 1e6)}
