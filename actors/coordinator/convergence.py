"""The convergence decisions of an outgoing migration, as plain arithmetic on
the numbers the coordinator gathers (times, byte counts, page counts), so
that they are tested without a link:

- `Link`: how fast the link really is and how much is still on its way. The
  bandwidth counts only bytes that left the host (the writer's count minus
  the kernel's unsent queue), every byte handed to the writer and not yet
  gone counts as pending, and the requests are sized so that little more
  than a window's worth waits ahead of the wire (a small first request until
  a rate is measured). So a full queue never makes a slow link look fast,
  and the switchover is decided on what is really left.
- `AutoConverge`: QEMU's trigger and throttle steps (auto-converge and,
  with the same trigger, dirty-limit).
- `Stall`: the verdict that a migration is not getting anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW = 0.1  # seconds: rate-limit and measurement window, as QEMU's BUFFER_DELAY
FIRST_PENDING = 1 << 20  # bytes queued ahead of the wire before any rate was measured
MIN_PENDING = 256 << 10  # ... and at least this much afterwards, so a slow link stays busy
PENDING_WINDOWS = 1.0  # with a rate measured: this many windows' worth queued ahead
REFILL = 4  # ... topped up once a quarter of it has left, in one request
PERIOD = 1.0  # seconds: the auto-converge trigger is evaluated once per sync period this long
STALL_SYNCS = 4  # the stall verdict looks back over this many syncs
STALL_SHRINK = 0.9  # ... and wants what is left to have shrunk below this share of it


class Link:
    """Bytes handed to the writer against bytes that left the host."""

    def __init__(self, now: float, sent: int) -> None:
        self.sent0 = sent
        self.queued = 0  # bytes handed to the writer in this migration
        self.sent = 0  # bytes of them that left the host
        self.bandwidth = 0.0  # bytes/s, 0 until a window measured it
        self.window_start = now
        self.window_sent = 0
        self.window_queued = 0  # bytes queued in this window, for max-bandwidth
        self.moved_at = now  # when bytes last left the host, or nothing was waiting to

    @property
    def pending(self) -> int:
        return max(0, self.queued - self.sent)

    def observe(self, now: float, sent: int) -> bool:
        """Take the writer's count of bytes gone; True when a window closed
        (and the bandwidth was measured anew)."""
        if sent - self.sent0 > self.sent or not self.pending:
            self.moved_at = now
        self.sent = sent - self.sent0
        elapsed = now - self.window_start
        if elapsed < WINDOW:
            return False
        rate = (self.sent - self.window_sent) / elapsed
        # A link that ran dry in the window says nothing about its speed, unless it was faster.
        if self.pending or rate > self.bandwidth or not self.bandwidth:
            self.bandwidth = rate
        self.window_start, self.window_sent = now, self.sent
        return True

    def stuck_for(self, now: float) -> float:
        """Seconds that queued bytes have waited without any leaving the host:
        a link that died while the socket still had room is seen here, as no
        write of the writer's ever blocks to time out."""
        return now - self.moved_at if self.pending else 0.0

    def close_budget_window(self, limit: int) -> None:
        """A rate-limit window ended: what it overshot (a batch does not split) is owed by the next."""
        self.window_queued = max(0, self.window_queued - int(limit * WINDOW)) if limit else 0

    def add(self, queued: int) -> None:
        self.queued += queued
        self.window_queued += queued

    def budget(self, limit: int) -> int:
        """Bytes the senders may queue now: within max-bandwidth (0 = unlimited),
        and only as much as keeps the link busy."""
        ahead = max(MIN_PENDING, int(self.bandwidth * WINDOW * PENDING_WINDOWS)) if self.bandwidth \
            else FIRST_PENDING
        budget = ahead - self.pending
        if self.pending and budget < ahead // REFILL:
            budget = 0  # nearly a window's worth waits: refill it in a few large requests, not many small ones
        if limit:
            budget = min(budget, int(limit * WINDOW) - self.window_queued)
        return max(0, budget)

    def pause(self, shortest: float) -> float:
        """Seconds to wait when nothing was queued: until a refill's worth
        has left at the measured rate (at least `shortest`, at most a window's
        share), so that a slow link is not asked many times a window."""
        if not self.bandwidth:
            return shortest
        ahead = max(MIN_PENDING, int(self.bandwidth * WINDOW * PENDING_WINDOWS))
        drain = (self.pending - (ahead - ahead // REFILL)) / self.bandwidth
        return min(max(shortest, drain), WINDOW / REFILL)

    def threshold(self, downtime_ms: int, switchover_bw: int = 0) -> float:
        """Bytes that may be left at the switchover (0 while nothing was measured)."""
        return (switchover_bw or self.bandwidth) * downtime_ms / 1000

    def fits(self, left: int, downtime_ms: int, switchover_bw: int = 0) -> bool:
        """Whether `left` bytes not yet queued, and everything queued but not
        yet gone, go out within the downtime limit."""
        total = left + self.pending
        return total == 0 or (total <= self.threshold(downtime_ms, switchover_bw) and self.sent > 0)

    def expected_ms(self, left: int, switchover_bw: int = 0) -> int | None:
        bw = switchover_bw or self.bandwidth
        return int((left + self.pending) / bw * 1000) if bw else None


@dataclass
class AutoConverge:
    """QEMU's throttle trigger: checked once per sync period of at least a
    second; when the bytes dirtied in a period exceed `threshold` % of the
    bytes sent in it for the second time, throttle (harder)."""

    threshold: int = 50  # throttle-trigger-threshold, %
    initial: int = 20  # cpu-throttle-initial
    increment: int = 10  # cpu-throttle-increment
    tailslow: bool = False  # cpu-throttle-tailslow
    maximum: int = 99  # max-cpu-throttle
    hits: int = 0
    percentage: int = 0
    period_start: float | None = None
    period_dirty: int = 0
    period_sent: int = 0

    def on_sync(self, now: float, dirty_bytes: int, sent: int) -> bool:
        """A sync found `dirty_bytes` newly dirtied, with `sent` bytes gone so
        far; True when the trigger fires at the end of a period."""
        if self.period_start is None:
            self.period_start, self.period_sent = now, sent
            return False
        self.period_dirty += dirty_bytes
        if now - self.period_start < PERIOD:
            return False
        fired = self.trigger(self.period_dirty, sent - self.period_sent)
        self.period_start, self.period_dirty, self.period_sent = now, 0, sent
        return fired

    def trigger(self, dirty_bytes: int, xfer_bytes: int) -> bool:
        """One period's figures; True when the guest is to be slowed down (now)."""
        if dirty_bytes <= xfer_bytes * self.threshold / 100:
            return False
        self.hits += 1
        if self.hits < 2:
            return False
        self.hits = 0  # only reset by firing: the two hits need not be consecutive
        return True

    def step(self, dirty_bytes: int, xfer_bytes: int) -> int:
        """The next throttle percentage, after the trigger fired."""
        if not self.percentage:
            self.percentage = self.initial
            return self.percentage
        increment = self.increment
        if self.tailslow:
            # Only as far as the share of CPU that would bring dirtying down to the threshold.
            cpu_now = 100 - self.percentage
            cpu_ideal = cpu_now * (xfer_bytes * self.threshold / 100) / dirty_bytes
            increment = min(int(cpu_now - cpu_ideal), self.increment)
        self.percentage = min(self.percentage + increment, self.maximum)
        return self.percentage


@dataclass
class Stall:
    """Not converging: what is left at the syncs has not shrunk over the last
    STALL_SYNCS syncs, and the expected downtime stays above the limit."""

    history: list[int] = field(default_factory=list)
    stalled: bool = False

    def on_sync(self, left: int, expected_ms: int | None, limit_ms: int, braking: bool = False) -> bool:
        """Record one sync; True when the verdict has just become 'stalled'.
        `braking`: a brake (auto-converge, dirty-limit) still has a step to take."""
        self.history.append(left)
        del self.history[:-(STALL_SYNCS + 1)]
        over = expected_ms is None or expected_ms > limit_ms
        flat = len(self.history) > STALL_SYNCS and min(self.history[1:]) >= STALL_SHRINK * self.history[0]
        was, self.stalled = self.stalled, over and flat and not braking
        return self.stalled and not was
