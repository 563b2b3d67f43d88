"""The coordinator's brakes on its guest's vCPUs: the CPU throttle of
auto-converge, dirty limits (the `dirty-limit` capability's, and the ones
set-vcpu-dirty-limit sets by hand), and dirty-rate measurement. The vCPU
processes pace themselves (machine/throttle.py); this side decides.
"""

from __future__ import annotations

import asyncio
import time

from livemig.actors.base import ActorError, log
from livemig.actors.coordinator.commands import command
from livemig.actors.coordinator.convergence import AutoConverge, Stall
from livemig.machine.dirtyrate import (
    CALC_TIME_RANGE,
    SAMPLE_PAGES_DEFAULT,
    SAMPLE_PAGES_RANGE,
    PageSampler,
    rate_mib,
)
from livemig.machine.dirtyrate import MODES as DIRTY_RATE_MODES
from livemig.machine.ram import PAGE_SIZE
from livemig.protocol import events as ev


class Brakes:
    """Mixed into the coordinator: needs vcpus, parameters, capabilities, mig, ram, publish."""

    def init_brakes(self) -> None:
        self.manual_limits: dict[int, int] = {}  # cpu-index -> MiB/s, set by set-vcpu-dirty-limit
        self.migration_limit = 0  # MiB/s the dirty-limit capability applied to every vCPU (0: none)
        self.throttle = 0  # percent the auto-converge throttle holds the vCPUs at
        self.auto: AutoConverge | None = None
        self.stall = Stall()
        self.dirty_rate: dict = {"status": "unstarted", "start-time": 0, "calc-time": 0, "sample-pages": 0,
                                 "mode": "page-sampling"}
        self.dirty_rate_task: asyncio.Task | None = None

    # during a migration --------------------------------------------------------------
    def start_convergence(self) -> None:
        p = self.parameters
        self.auto = AutoConverge(p["throttle-trigger-threshold"], p["cpu-throttle-initial"],
                                 p["cpu-throttle-increment"], p["cpu-throttle-tailslow"], p["max-cpu-throttle"])
        self.stall = Stall()

    async def on_sync(self, now: float, dirtied_pages: int, sent: int, left: int, expected_ms: int | None,
                      bandwidth: float) -> None:
        """After each dirty-log sync: the throttle trigger, and the stall verdict."""
        auto = self.auto
        if auto is not None and (self.capabilities["auto-converge"] or self.capabilities["dirty-limit"]):
            dirty = dirtied_pages * PAGE_SIZE
            period_dirty, period_sent = auto.period_dirty + dirty, sent - auto.period_sent
            if auto.on_sync(now, dirty, sent):
                if self.capabilities["dirty-limit"]:
                    await self.apply_migration_limit()
                else:
                    await self.set_throttle(auto.step(period_dirty, period_sent))
        limit = self.parameters["downtime-limit"]
        # Not stalled while a brake is still to come: livemig is doing something about it.
        braking = (self.capabilities["auto-converge"] and self.throttle < self.parameters["max-cpu-throttle"]) \
            or (self.capabilities["dirty-limit"] and not self.migration_limit)
        became = self.stall.on_sync(left, expected_ms, limit, braking)
        self.mig.stalled = None
        if self.stall.stalled:
            self.mig.stalled = {"dirty-rate": self.mig.ram.get("dirty-pages-rate", 0) * PAGE_SIZE,
                                "bandwidth": int(bandwidth), "expected-downtime": expected_ms,
                                "downtime-limit": limit, "remaining": left,
                                "pass": self.mig.ram.get("dirty-sync-count", 0)}
        if became:
            log.warning("migration is not converging: %s", self.mig.stalled)
            self.publish(ev.MIGRATION_STALLED, self.mig.stalled, qmp=self.capabilities["events"])

    async def set_throttle(self, percentage: int) -> None:
        self.throttle = percentage
        self.mig.throttle = percentage
        await asyncio.gather(*(v.call("throttle", {"percentage": percentage}) for v in self.vcpus))

    async def apply_migration_limit(self) -> None:
        rate = self.parameters["vcpu-dirty-limit"]
        if rate == self.migration_limit:
            return  # in force already, as QEMU keeps it
        self.migration_limit = rate
        self.mig.dirty_limit = True
        await self.push_limits()

    async def push_limits(self) -> None:
        """Every vCPU's limit: the migration's, else its own by hand, else none."""
        period = self.parameters["x-vcpu-dirty-limit-period"]
        await asyncio.gather(*(v.call("dirty_limit", {
            "limit": self.migration_limit or self.manual_limits.get(i, 0), "period": period})
            for i, v in enumerate(self.vcpus)))

    async def release_brakes(self) -> None:
        """The migration is over (or its guest stopped for good): the vCPUs run
        at full speed again, bar the limits set by hand."""
        try:
            if self.throttle:
                await self.set_throttle(0)
            if self.migration_limit:
                self.migration_limit = 0
                await self.push_limits()
        except ActorError as exc:
            log.warning("cannot release the vCPU brakes: %s", exc)
        self.mig.throttle = 0
        self.auto = None

    async def dirty_limit_time(self) -> int:
        """dirty-limit-throttle-time-per-round: the longest any vCPU was held in its last round, us."""
        paces = await asyncio.gather(*(v.call("pace") for v in self.vcpus))
        return max(p.data["result"]["throttle-us-per-round"] for p in paces)

    # dirty-rate measurement ------------------------------------------------------------
    def start_dirty_rate(self, calc_time: int, sample_pages: int, mode: str) -> None:
        self.dirty_rate = {"status": "measuring", "start-time": int(time.time()), "calc-time": calc_time,
                           "sample-pages": sample_pages if mode == "page-sampling" else 0, "mode": mode}
        self.dirty_rate_task = asyncio.get_running_loop().create_task(
            self.measure_dirty_rate(calc_time, sample_pages, mode))

    async def measure_dirty_rate(self, calc_time: int, sample_pages: int, mode: str) -> None:
        try:
            await self._measure(calc_time, sample_pages, mode)
        except ActorError as exc:
            log.warning("dirty-rate measurement failed: %s", exc)
            self.dirty_rate["status"] = "unstarted"

    async def _measure(self, calc_time: int, sample_pages: int, mode: str) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        if mode == "page-sampling":
            sampler = await loop.run_in_executor(None, PageSampler, self.ram, sample_pages)
            t0 = time.monotonic()
            await asyncio.sleep(calc_time)
            rate = await loop.run_in_executor(None, sampler.rate, time.monotonic() - t0)
        else:
            await asyncio.gather(*(v.call("measure_start") for v in self.vcpus))
            await asyncio.sleep(calc_time)
            replies = await asyncio.gather(*(v.call("measure_stop") for v in self.vcpus))
            seconds = time.monotonic() - t0
            pages = [r.data["result"]["pages"] for r in replies]
            rate = rate_mib(sum(pages), seconds)
            if mode == "dirty-ring":  # per vCPU, as QEMU's ring mode reports it
                self.dirty_rate["vcpu-dirty-rate"] = [{"id": i, "dirty-rate": int(round(rate_mib(n, seconds)))}
                                                      for i, n in enumerate(pages)]
        self.dirty_rate.update({"status": "measured", "dirty-rate": int(round(rate))})

    # the commands ---------------------------------------------------------------------
    @command("set-vcpu-dirty-limit")
    async def cmd_set_vcpu_dirty_limit(self, dirty_rate: int, cpu_index: int | None = None) -> dict:
        """Hold a vCPU's page-dirtying rate (every vCPU's without cpu-index) at dirty-rate MB/s;
        0 cancels it. Each vCPU process paces its own steps to the limit."""
        if dirty_rate < 0:
            raise ActorError("Parameter 'dirty-rate' expects uint64")
        if not dirty_rate:
            return await self.cmd_cancel_vcpu_dirty_limit(cpu_index)
        for i in self.cpu_indexes(cpu_index):
            self.manual_limits[i] = dirty_rate
        await self.push_limits()
        return {}

    @command("cancel-vcpu-dirty-limit")
    async def cmd_cancel_vcpu_dirty_limit(self, cpu_index: int | None = None) -> dict:
        """Lift the dirty limit set-vcpu-dirty-limit set on a vCPU (every vCPU without cpu-index)."""
        if self.migration_limit:
            raise ActorError("dirty-limit live migration is running, do not allow dirty page limit "
                             "to be canceled")
        for i in self.cpu_indexes(cpu_index):
            self.manual_limits.pop(i, None)
        await self.push_limits()
        return {}

    @command("query-vcpu-dirty-limit")
    async def cmd_query_vcpu_dirty_limit(self) -> list:
        """Every vCPU under a dirty limit: cpu-index, limit-rate and current-rate (MB/s)."""
        paces = await asyncio.gather(*(v.call("pace") for v in self.vcpus))
        return [{"cpu-index": i, "limit-rate": int(p["limit"]), "current-rate": int(round(p["current-rate"]))}
                for i, p in enumerate(r.data["result"] for r in paces) if p["limit"]]

    def cpu_indexes(self, cpu_index: int | None) -> range:
        if cpu_index is None:
            return range(len(self.vcpus))
        if not 0 <= cpu_index < len(self.vcpus):
            raise ActorError("incorrect cpu index specified")
        return range(cpu_index, cpu_index + 1)

    @command("calc-dirty-rate")
    async def cmd_calc_dirty_rate(self, calc_time: int, sample_pages: int | None = None,
                                  mode: str = "page-sampling") -> dict:
        """Measure the guest's dirty rate over calc-time seconds (1-60), in the background:
        mode page-sampling (CRC32 of sample-pages random pages per GiB, 128-16384,
        default 512), dirty-bitmap (every vCPU's exact count of pages written) or
        dirty-ring (the same, per vCPU). query-dirty-rate has the result."""
        if mode not in DIRTY_RATE_MODES:
            raise ActorError(f"Parameter 'mode' does not accept value '{mode}'")
        if not CALC_TIME_RANGE[0] <= calc_time <= CALC_TIME_RANGE[1]:
            raise ActorError(f"Parameter 'calc-time' is out of range[{CALC_TIME_RANGE[0]}, "
                             f"{CALC_TIME_RANGE[1]}]")
        if sample_pages is not None and mode != "page-sampling":
            raise ActorError("Parameter 'sample-pages' is valid only in page-sampling mode")
        sample_pages = SAMPLE_PAGES_DEFAULT if sample_pages is None else sample_pages
        if not SAMPLE_PAGES_RANGE[0] <= sample_pages <= SAMPLE_PAGES_RANGE[1]:
            raise ActorError(f"Parameter 'sample-pages' is out of range[{SAMPLE_PAGES_RANGE[0]}, "
                             f"{SAMPLE_PAGES_RANGE[1]}]")
        if self.dirty_rate["status"] == "measuring":
            raise ActorError("the dirty rate is already being measured")
        self.start_dirty_rate(calc_time, sample_pages, mode)
        return {}

    @command("query-dirty-rate")
    async def cmd_query_dirty_rate(self) -> dict:
        """The last calc-dirty-rate: status (unstarted, measuring, measured), dirty-rate (MB/s,
        once measured), start-time, calc-time, sample-pages, mode, vcpu-dirty-rate (dirty-ring)."""
        return dict(self.dirty_rate)
