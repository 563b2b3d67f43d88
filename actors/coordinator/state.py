"""The state of the current or last migration, as query-migrate reports it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from livemig.machine.ram import PAGE_SIZE
from livemig.machine.runstate import MigrationStatus, check_migration_transition

# section ids: block, RAM, then the device sections in stream order
SID_BLOCK, SID_RAM, SID_DEVICES = 1, 2, 3


class MigrationFailed(Exception):
    pass


@dataclass
class MigrationState:
    status: MigrationStatus = MigrationStatus.NONE
    start: float = 0.0
    end: float = 0.0
    setup_time: int = 0
    downtime: int | None = None
    guest_downtime: int | None = None
    expected_downtime: int = 0
    error: str | None = None
    ram: dict = field(default_factory=dict)
    incoming: bool = False
    committed: bool = False  # EOF sent: too late to cancel
    go_sent: bool = False  # the destination was told it may run the guest
    return_path: bool = False  # the source opened one (and reads the destination's answers)
    holder: str | None = None  # from EOF on: "source", "destination" or "unknown" (x-guest-holder)
    handover_desc: str | None = None  # why the hand-over is being resolved
    disk: dict = field(default_factory=dict)
    xbzrle: dict | None = None  # XBZRLECacheStats, with the capability on
    block_bulk_done: bool = False
    incremental: bool = False
    # Milliseconds from the stop to each step of the switchover: where a downtime went.
    switchover: dict[str, int] = field(default_factory=dict)
    postcopy_requested: bool = False  # migrate-start-postcopy was called
    postcopy_at: float = 0.0  # the destination resumed the guest
    postcopy: dict | None = None  # the destination's final post-copy figures
    refused: list[str] = field(default_factory=list)  # incoming connections refused, and why
    tls: dict | None = None  # the session's version, cipher and (on a destination) peer DN
    throttle: int = 0  # auto-converge's CPU throttle now, %
    dirty_limit: bool = False  # the dirty-limit capability's limit is in force
    dirty_limit_time: int = 0  # us a vCPU was held in its last round, the last reading
    stalled: dict | None = None  # the stall verdict, while it holds

    def set(self, status: MigrationStatus) -> None:
        check_migration_transition(self.status, status)
        self.status = status

    def step(self, name: str, stop_at: float) -> None:
        self.switchover[name] = int((time.monotonic() - stop_at) * 1000)

    def info(self) -> dict:
        """query-migrate in QEMU 7.2's shape: a failed or cancelled outgoing migration
        shows its status (and error), a destination its status only; livemig's own
        figures are under x- names (docs/monitor.md)."""
        if self.status is MigrationStatus.NONE:
            return {}
        out: dict = {"status": self.status.value}
        if self.tls:
            out["x-tls"] = dict(self.tls)
        if self.refused:
            out["x-refused"] = self.refused[-10:]
        if self.holder:
            out["x-guest-holder"] = self.holder
        if self.handover_desc and not self.status.ended:
            out["x-handover"] = self.handover_desc
        if self.incoming:
            if self.error and self.status is MigrationStatus.FAILED:
                out["error-desc"] = self.error  # QEMU would have quit; livemig stays up and says why
            if self.ram:
                out["x-ram"] = dict(self.ram)
            return out
        if self.status is MigrationStatus.FAILED:
            return {**out, **({"error-desc": self.error} if self.error else {})}
        if self.status is MigrationStatus.CANCELLED:
            return out
        now = self.end or time.monotonic()
        if self.ram:
            out["ram"] = dict(self.ram)
            if self.xbzrle and "normal" in self.ram:  # pages sent as deltas are XBZRLE's, as QEMU counts
                out["ram"]["normal"] -= self.xbzrle["pages"]
                out["ram"]["normal-bytes"] = out["ram"]["normal"] * PAGE_SIZE
        if self.status is not MigrationStatus.SETUP:
            out["total-time"] = int((now - self.start) * 1000)
        if self.disk:
            out["disk"] = dict(self.disk)
        if self.xbzrle is not None:
            out["xbzrle-cache"] = dict(self.xbzrle)
        out["setup-time"] = self.setup_time
        if self.status is MigrationStatus.ACTIVE:
            out["expected-downtime"] = self.expected_downtime
            if self.throttle:
                out["cpu-throttle-percentage"] = self.throttle
            if self.dirty_limit:
                out["dirty-limit-throttle-time-per-round"] = self.dirty_limit_time
            if self.stalled:
                out["x-stalled"] = dict(self.stalled)
        if self.status is MigrationStatus.COMPLETED:
            out["x-expected-downtime"] = self.expected_downtime  # the estimate the switchover went on
            if self.downtime is not None:
                out["downtime"] = self.downtime
            if self.guest_downtime is not None:
                out["x-guest-downtime"] = self.guest_downtime
            if self.switchover:
                out["x-switchover"] = dict(self.switchover)
        return out

