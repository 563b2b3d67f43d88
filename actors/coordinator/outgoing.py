"""The outgoing migration: setup, rate-limited iterations until what is left
fits in the downtime limit, the completion with the guest stopped, and the
undo of one that did not complete."""

from __future__ import annotations

import asyncio
import time

from livemig.actors.base import ActorError, log
from livemig.actors.coordinator.convergence import Link
from livemig.actors.coordinator.state import (
    SID_BLOCK,
    SID_DEVICES,
    SID_RAM,
    MigrationFailed,
    MigrationState,
)
from livemig.machine.ram import PAGE_SIZE
from livemig.machine.runstate import MigrationStatus, RunState
from livemig.protocol import events as ev
from livemig.protocol import savevm
from livemig.protocol.devices import (
    DEVICES,
    DIGEST_SECTION,
    SWITCHOVER_SECTION,
    VCPU_SECTION,
    describe,
    full_section,
)
from livemig.protocol.messages import Message
from livemig.protocol.ram import NORMAL_RECORD, RAM_VERSION, ram_mem_size
from livemig.protocol.transport import no_progress
from livemig.protocol.xbzrle import XbzrleStats

PAUSE = 0.005  # seconds to wait when nothing could be queued


class Outgoing:
    """Mixin of the Coordinator."""

    # notifications --------------------------------------------------------------
    def on_writer_notice(self, msg: Message) -> None:
        if self.on_postcopy_notice(msg):
            return
        if msg.type == "mark":
            self.wire_bytes = msg.data["bytes"]
            producer, _, n = msg.data["mark"].partition(":")
            self.marks_reached[producer] = max(self.marks_reached.get(producer, 0), int(n))
            if msg.data.get("error"):
                self.writer_failure = msg.data["error"]
            fut = self.marks.pop(msg.data["mark"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg.data)
        elif msg.type == "failed":
            self.writer_failure = msg.data["desc"]
            for fut in self.marks.values():
                if not fut.done():
                    fut.set_result(msg.data)

    async def wait_mark(self, mark: str, timeout: float) -> None:
        """Wait until the writer has put everything before `mark` ("producer:n")
        on the wire; a producer's marks increase, so an earlier report counts."""
        producer, _, n = mark.partition(":")
        if self.marks_reached.get(producer, 0) >= int(n) or self.writer_failure:
            return
        fut = self.marks.setdefault(mark, asyncio.get_running_loop().create_future())
        try:
            # Not wait_for: on Python 3.11 it can swallow a cancel that lands with the mark.
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise MigrationFailed(f"migration channel stalled for {timeout:.0f} s") from None
        finally:
            self.marks.pop(mark, None)

    # the outgoing migration -------------------------------------------------------
    def start_migration(self, uri: str, blk: bool = False, inc: bool = False) -> None:
        if (blk or inc) and not self.guest_drives:
            raise ActorError("block migration needs guest drives, and this guest has none")
        self.writer_failure = self.actor_failure = None
        self.mig = MigrationState(start=time.monotonic(), incremental=inc)
        self.set_status(MigrationStatus.SETUP)
        self.task = asyncio.get_running_loop().create_task(self.migrate(uri, blk or inc))

    async def migrate(self, uri: str, blk: bool = False) -> None:
        mig = self.mig
        was_running = self.runstate.running
        stopped = inactivated = False
        ram = self.ram_sender
        try:
            await self.fault("connect")
            timeout = self.parameters["x-transport-timeout"]
            cache = self.parameters["xbzrle-cache-size"] if self.capabilities["xbzrle"] else 0
            mig.xbzrle = XbzrleStats(cache_size=cache).to_qmp() if cache else None
            reply = await self.writer.call("connect", {"uri": uri, "timeout": timeout, "tls": self.tls_out,
                                                       "xbzrle_cache_size": cache,
                                                       "multifd": self.multifd_config(uri)},
                                           timeout=timeout / 1000 + 30)  # the TLS handshake has `timeout`
            mig.tls = reply.data["result"].get("tls")
            # As QEMU: post-copy opens the return path whatever the capability says.
            return_path = reply.data["result"]["return_path"] and (
                self.capabilities["return-path"] or self.capabilities["postcopy-ram"])
            blocks = [(b.name, b.size) for b in self.ram.blocks]
            head = [savevm.header(), savevm.configuration(self.guest.machine)]
            if return_path:
                head.append(savevm.command(savevm.CMD_OPEN_RETURN_PATH))
            head += self.postcopy_head(return_path)
            await self.wait_mark((await ram.call("emit", {"mark": True}, frames=head)).data["result"]["mark"], 60)
            if blk:
                # QEMU registers "block" before "ram", so its sections come first.
                setup = (await self.block_sender.call(
                    "setup", {"inc": mig.incremental, "section_id": SID_BLOCK}, timeout=300)).data["result"]
                await self.wait_mark(setup["mark"], 60)
                mig.disk = {"transferred": 0, "remaining": setup["remaining"], "total": setup["total"]}
            await self.fault("setup")
            status = (await ram.call("setup")).data["result"]
            await ram.call("emit", {"ram_eos": SID_RAM}, frames=[
                savevm.section_start(savevm.SECTION_START, SID_RAM, "ram", 0, RAM_VERSION),
                ram_mem_size(blocks)])
            mig.ram.update({"total": self.ram.size, "remaining": status["remaining"],
                            "dirty-sync-count": 1, "page-size": PAGE_SIZE})
            self.publish(ev.MIGRATION_PASS, {"pass": 1}, qmp=self.capabilities["events"])
            mig.setup_time = int((time.monotonic() - mig.start) * 1000)
            self.set_status(MigrationStatus.ACTIVE)
            await self.iterate(status["remaining"], blk)

            # Completion, with the guest stopped.
            await self.fault("before-stop")
            stop_at = time.monotonic()
            sent_runstate = self.runstate.value  # as QEMU: the state the guest had before the switch
            await self.set_running(False, RunState.FINISH_MIGRATE)
            stopped = True
            await self.release_brakes()  # stopped now: wherever the guest runs next, it runs at full speed
            mig.step("stopped", stop_at)
            await self.fault("after-stop")
            await self.pause_before_switchover()
            if blk:
                await self.block_step(0, end=True)
            if mig.postcopy_requested:
                package = await self.postcopy_prepare(sent_runstate, stop_at)
                if self.guest_drives:
                    await self.vcpus[0].call("drives_inactivate", timeout=120)
                    inactivated = True
                await self.postcopy_start(package, stop_at)
                await self.postcopy_finish(stop_at)
                return
            sync = (await ram.call("sync")).data["result"]
            self.count_pass(sync)
            mig.step("synced", stop_at)
            last = (await ram.call("iterate", {"budget": 0, "end": True, "section_id": SID_RAM},
                                   timeout=600)).data["result"]
            self.account(last)
            mig.ram["downtime-bytes"] = last["queued"]
            mig.step("pages", stop_at)
            *devices, eof, trailer = self.device_sections(
                await self.vcpu_states(), sent_runstate)
            await ram.call("emit", {}, frames=devices)
            mig.step("devices", stop_at)
            if self.guest_drives:
                # Images are flushed and let go before EOF: the destination may
                # take them as soon as it has the whole stream.
                await self.vcpus[0].call("drives_inactivate", timeout=120)
                inactivated = True
            self.begin_handover(uri, return_path, was_running and stopped)
            mark = (await ram.call("emit", {"mark": True}, frames=[eof, trailer])).data["result"]["mark"]
            mig.committed = True
            await self.hand_over(mark, uri, return_path, stop_at, was_running and stopped, inactivated)
        except asyncio.CancelledError:
            if self.actor_failure:
                await self.abandon(was_running and stopped, MigrationStatus.FAILED, self.actor_failure, inactivated)
            else:
                await self.abandon(was_running and stopped, MigrationStatus.CANCELLED, "migration cancelled", inactivated)
        except (ActorError, MigrationFailed, OSError) as exc:
            await self.abandon(was_running and stopped, MigrationStatus.FAILED, str(exc), inactivated)

    async def resume_after_failure(self) -> None:
        """Run the source guest again. Its images may still be held for a moment
        by a destination that is giving up, so taking them back is retried."""
        deadline = time.monotonic() + 30
        while True:
            try:
                await self.set_running(True)
                return
            except ActorError as exc:
                if "in use" not in exc.desc or time.monotonic() > deadline:
                    log.error("cannot resume the guest: %s", exc)
                    self.set_runstate(RunState.PAUSED)
                    return
                self.runstate = RunState.FINISH_MIGRATE
                await asyncio.sleep(0.2)

    async def block_step(self, budget: int, end: bool = False) -> int:
        """One block section (PART, or END with the guest stopped); waits until
        the writer has it all, so that RAM's section cannot overtake it."""
        result = (await self.block_sender.call(
            "iterate", {"budget": budget, "end": end, "section_id": SID_BLOCK}, timeout=600)).data["result"]
        await self.fault("block-bulk")
        await self.wait_mark(result["mark"], 600)
        self.mig.disk = {"transferred": result["transferred"], "remaining": result["remaining"],
                         "total": result["total"]}
        self.mig.block_bulk_done = result["bulk_done"]
        return result["queued"]

    async def iterate(self, remaining: int, blk: bool = False) -> None:
        """Send dirty pages (and disk chunks) until what is left fits in the
        downtime limit, decided on the link's honest figures (convergence.Link):
        bytes that left the host, and everything queued short of that pending."""
        mig = self.mig
        link = Link(time.monotonic(), await self.wire_sent())
        self.real_mark = (time.monotonic(), self.wire_real)
        dirty_at_sync = remaining
        self.start_convergence()
        while True:
            if self.writer_failure:
                raise MigrationFailed(self.writer_failure)
            if mig.postcopy_requested and (not blk or mig.block_bulk_done):
                await self.postcopy_drain()
                return  # switch to post-copy now
            limit = self.parameters["max-bandwidth"]
            downtime_ms = self.parameters["downtime-limit"]
            switchover_bw = self.parameters["x-avail-switchover-bandwidth"]
            disk_left = mig.disk.get("remaining", 0) if blk else 0
            if link.observe(time.monotonic(), await self.wire_sent()):
                timeout = self.parameters["x-transport-timeout"] / 1000
                if link.stuck_for(time.monotonic()) > timeout:
                    raise MigrationFailed(f"write to migration channel failed: {no_progress(timeout)}")
                link.close_budget_window(limit)
                self.window_figures(link, dirty_at_sync + disk_left, switchover_bw)
                if mig.dirty_limit:
                    mig.dirty_limit_time = await self.dirty_limit_time()
            if link.fits(remaining + disk_left, downtime_ms, switchover_bw) and (not blk or mig.block_bulk_done):
                sync = (await self.ram_sender.call("sync")).data["result"]
                self.count_pass(sync)
                await self.fault("pass")
                remaining = dirty_at_sync = sync["remaining"]
                if blk:
                    await self.block_step(1)  # harvests: the disk's exact pending bytes
                    disk_left = mig.disk["remaining"]
                now = time.monotonic()
                link.observe(now, await self.wire_sent())
                await self.on_sync(now, sync["dirtied"], link.sent, remaining + disk_left + link.pending,
                                   link.expected_ms(remaining + disk_left, switchover_bw), link.bandwidth)
                if link.fits(remaining + disk_left, downtime_ms, switchover_bw):
                    # The estimate the switchover was decided on.
                    mig.expected_downtime = link.expected_ms(remaining + disk_left, switchover_bw) or 0
                    return
            budget = link.budget(limit)
            queued = 0
            if budget > 0 and blk and disk_left:
                queued += await self.block_step(budget)
            if budget > queued and remaining:
                result = (await self.ram_sender.call(
                    "iterate", {"budget": budget - queued, "section_id": SID_RAM}, timeout=120)).data["result"]
                self.account(result)
                remaining = result["remaining"]
                queued += result["queued"]
                if blk:
                    await self.wait_mark(result["mark"], 600)
            link.add(queued)
            if not queued:
                await asyncio.sleep(link.pause(PAUSE))  # nothing to send, or enough on its way: let the wire work

    def window_figures(self, link: Link, left: int, switchover_bw: int) -> None:
        """What query-migrate shows of the window that just closed."""
        expected = link.expected_ms(left, switchover_bw)
        if expected is not None:
            self.mig.expected_downtime = expected
        # The rate on the wire: the real bytes (XBZRLE sends fewer than it queues).
        now, (then, real) = time.monotonic(), self.real_mark
        if now > then:
            self.mig.ram["mbps"] = round((self.wire_real - real) / (now - then) * 8 / 1e6, 3)
        self.real_mark = (now, self.wire_real)
        self.mig.ram["pages-per-second"] = int(link.bandwidth / NORMAL_RECORD)

    async def wire_sent(self) -> int:
        """Bytes of this migration that have left the host, counted as the RAM
        sender counts what it queues (a page sent as an XBZRLE delta counts
        as a whole page), so that they compare; the real count goes to
        self.wire_real."""
        stats = (await self.writer.call("stats", timeout=10)).data["result"]
        self.wire_real = stats["sent"]
        if stats["multifd"]:
            self.mig.ram["multifd-bytes"] = stats["multifd"]
        if stats["xbzrle"] is not None:
            self.mig.xbzrle = stats["xbzrle"]
        return stats["sent"] + stats["saved"]

    def count_pass(self, sync: dict) -> None:
        ram = self.mig.ram
        ram["dirty-sync-count"] = ram.get("dirty-sync-count", 0) + 1
        after = self.parameters["x-postcopy-after-passes"]
        if after and self.capabilities["postcopy-ram"] and ram["dirty-sync-count"] >= after:
            self.mig.postcopy_requested = True  # the policy's migrate-start-postcopy
        ram["remaining"] = sync["remaining"]
        ram["dirty-pages-rate"] = sync["dirty_pages_rate"]
        self.publish(ev.MIGRATION_PASS, {"pass": ram["dirty-sync-count"]}, qmp=self.capabilities["events"])

    def account(self, result: dict) -> None:
        ram = self.mig.ram
        ram["duplicate"] = ram.get("duplicate", 0) + result["zero"]
        ram["normal"] = ram.get("normal", 0) + result["normal"]
        ram["normal-bytes"] = ram["normal"] * PAGE_SIZE
        ram["transferred"] = ram.get("transferred", 0) + result["queued"]
        ram["precopy-bytes"] = ram.get("precopy-bytes", 0) + (0 if self.runstate is RunState.FINISH_MIGRATE
                                                               else result["queued"])
        ram["remaining"] = result["remaining"]

    def device_sections(self, vcpus: list[dict], runstate: str) -> list[bytes]:
        """Every FULL section the machine profile has, then EOF and the vmdesc."""
        states: list[tuple[str, int, object]] = []
        if self.profile.has_vcpus:
            states += [(VCPU_SECTION, i, regs) for i, regs in enumerate(vcpus)]
            states.append((SWITCHOVER_SECTION, 0, None))
            if self.capabilities["x-digest"]:
                states.append((DIGEST_SECTION, 0, self.ram.digests()))
        for name in self.profile.devices:
            state = runstate if name == "globalstate" else self.device_state.get(name)
            states.append((name, 0, state))
        out, desc = [], []
        for sid, (name, instance, state) in enumerate(states, SID_DEVICES):
            device = DEVICES[name]
            payload = device.encode(state)
            out += full_section(sid, device, instance, payload)
            desc.append(describe(device, instance, payload))
        out += [savevm.eof(), savevm.vmdescription({"page_size": PAGE_SIZE, "devices": desc})]
        return out

    async def abandon(self, resume: bool, status: MigrationStatus, desc: str, inactivated: bool = False) -> None:
        """Undo a migration that did not complete: the source guest runs on,
        with its images taken back -- unless the destination was already told
        to run it, in which case the source stays paused."""
        log.warning("migration %s%s", status.value, "" if desc == f"migration {status.value}" else f": {desc}")
        await self.release_brakes()
        if self.mig.go_sent:
            resume = inactivated = False
            status = MigrationStatus.FAILED  # past RUN nothing can be cancelled any more
            desc += "; the destination was told to run the guest, so the source stays paused"
            if self.mig.postcopy_requested:
                desc += (" (post-copy: the guest's memory was split between the hosts; "
                         "if the destination host is lost, so is the guest)")
        try:
            await self.writer.call("abort", timeout=5)
            await self.ram_sender.call("cleanup", timeout=120)
            if self.guest_drives:
                await self.block_sender.call("cleanup", timeout=120)
            await self.writer.call("close", {"abort": True}, timeout=40)
            if inactivated:
                await self.vcpus[0].call("drives_activate", timeout=60)
        except ActorError as exc:
            log.warning("cleanup after migration: %s", exc)
        self.mig.error = desc
        self.mig.end = time.monotonic()
        self.set_status(status)
        if resume or self.runstate is RunState.FINISH_MIGRATE:
            if resume:
                await self.resume_after_failure()
            else:
                self.set_runstate(RunState.PAUSED)

