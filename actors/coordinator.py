"""Coordinator: the host's brain. Owns the run state, the migration state
machine (setup -> active -> completed / failed / cancelled), its parameters
and capabilities, the rate limiter and convergence decision, the completion
phase with the guest stopped, and the event PUB socket. Commands arrive from
the monitor already decoded; each one is registered below with its QMP name
and its docstring is its help."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field

import msgpack
import zmq
import zmq.asyncio

from livemig.actors.base import ActorError, AsyncPeer, HostConfig, log, start_actor
from livemig.actors.commands import Commands
from livemig.machine.profile import profile
from livemig.machine.ram import PAGE_SIZE, GuestRam
from livemig.machine.runstate import RunState, StateError, check_transition
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
from livemig.protocol.transport import TransportError, parse_uri

DEFAULT_PARAMETERS = {
    "max-bandwidth": 128 << 20,  # bytes/s, QEMU's default since 5.2; 0 = unlimited
    "downtime-limit": 300,  # ms
    "avail-switchover-bandwidth": 0,
    # testing aids (docs/reliability.md): a fault to inject, "POINT:ACTION", and how
    # long a connected transport may make no progress before the migration fails
    "x-fault": "",
    "x-transport-timeout": 30_000,  # ms
}
SOURCE_FAULT_POINTS = ("connect", "setup", "pass", "block-bulk", "before-stop", "after-stop", "after-eof")
DEST_FAULT_POINTS = ("incoming", "after-eof")
FAULT_ACTIONS = ("fail", "kill", "stall", "reset", "slow", "cancel")
MIGRATION_ACTORS = ("writer", "ram_sender", "block_sender")
DEFAULT_CAPABILITIES = {"events": False, "return-path": True,
                        # testing aid: the destination keeps stale image metadata (the seed's bug)
                        "x-skip-invalidate": False,
                        # integrity: send digests of the final RAM, checked before the guest runs
                        "x-digest": False,
                        "pause-before-switchover": False}
WINDOW = 0.1  # rate-limit window, as QEMU's BUFFER_DELAY
# Bandwidth unlimited: each iterate request asks for what the link moved in
# this many windows, so that a fast link is not held up by a request per few
# milliseconds and a slow one still lets the switchover be decided often.
UNLIMITED_WINDOWS = 2
UNLIMITED_FIRST = 64 << 20  # bytes in the first request, before anything was measured
UNLIMITED_MIN = 4 << 20
MAX_DOWNTIME_MS = 2_000_000

# section ids: RAM first, then the device sections in stream order
SID_BLOCK, SID_RAM, SID_DEVICES = 1, 2, 3


class MigrationFailed(Exception):
    pass


@dataclass
class MigrationState:
    status: str = "none"
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
    disk: dict = field(default_factory=dict)
    block_bulk_done: bool = False
    incremental: bool = False
    # Milliseconds from the stop to each step of the switchover: where a downtime went.
    switchover: dict[str, int] = field(default_factory=dict)

    def step(self, name: str, stop_at: float) -> None:
        self.switchover[name] = int((time.monotonic() - stop_at) * 1000)

    def info(self) -> dict:
        if self.status == "none":
            return {}
        out: dict = {"status": self.status}
        now = self.end or time.monotonic()
        if self.status not in ("setup",) or self.ram:
            out["ram"] = dict(self.ram)
        out["total-time"] = int((now - self.start) * 1000)
        if self.status == "setup":
            del out["total-time"]
        if self.disk:
            out["disk"] = dict(self.disk)
        if not self.incoming:
            out["setup-time"] = self.setup_time
        if self.status == "active" and not self.incoming:
            out["expected-downtime"] = self.expected_downtime
        if self.status == "completed" and not self.incoming:
            out["x-expected-downtime"] = self.expected_downtime  # the estimate the switchover went on
        if self.status == "completed":
            if self.downtime is not None:
                out["downtime"] = self.downtime
            if self.guest_downtime is not None:
                out["x-guest-downtime"] = self.guest_downtime
            if self.switchover:
                out["x-switchover"] = dict(self.switchover)
        if self.error and self.status in ("failed", "cancelled"):
            out["error-desc"] = self.error
        return out


class Coordinator(Commands):
    def __init__(self, cfg: HostConfig, ctx: zmq.asyncio.Context) -> None:
        self.cfg = cfg
        self.ctx = ctx
        guest = cfg["guest"]
        self.guest = guest
        self.profile = profile(guest["machine"])
        self.guest_drives: list[dict] = cfg["drives"]
        self.device_state: dict[str, object] = {}  # device states last loaded from a stream
        self.name = cfg["name"]
        self.ram = GuestRam(cfg["ram_path"], [tuple(b) for b in guest["blocks"]])
        self.runstate = RunState.PRELAUNCH
        self.parameters = dict(DEFAULT_PARAMETERS)
        self.capabilities = dict(DEFAULT_CAPABILITIES)
        self.mig = MigrationState()
        self.task: asyncio.Task | None = None
        self.writer_failure: str | None = None
        self.actor_failure: str | None = None  # set when a migration actor died or hung
        self.marks: dict[int, asyncio.Future] = {}
        self.wire_bytes = 0
        self.marks_reached: dict[str, int] = {}  # producer -> highest mark the writer passed
        self.stop_event = asyncio.Event()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind(cfg["events"])
        self.incoming_uri: str | None = None
        self.exit_on_error = False  # quit when an incoming migration fails (QEMU's default)
        self.init_devices(cfg.raw.get("devices", []))

    async def connect_workers(self) -> None:
        ep = self.cfg.endpoint
        self.vcpus = [AsyncPeer(self.ctx, ep(f"vcpu{i}"), "coordinator") for i in range(self.guest["vcpus"])]
        self.ram_sender = AsyncPeer(self.ctx, ep("ram_sender"), "coordinator")
        self.block_sender = AsyncPeer(self.ctx, ep("block_sender"), "coordinator")
        self.writer = AsyncPeer(self.ctx, ep("writer"), "coordinator", self.on_writer_notice)
        self.receiver = AsyncPeer(self.ctx, ep("receiver"), "coordinator", self.on_receiver_notice)
        deadline = time.monotonic() + 30
        for peer in [*self.vcpus, self.ram_sender, self.block_sender, self.writer, self.receiver]:
            while True:
                try:
                    await peer.call("ping", timeout=1)
                    break
                except ActorError:
                    if time.monotonic() > deadline:
                        raise
        if self.cfg["incoming"]:
            self.runstate = RunState.INMIGRATE
            if self.cfg["incoming"] != "defer":
                await self.start_incoming(self.cfg["incoming"])
        elif self.cfg["autostart"]:
            await self.set_running(True)

    # events ------------------------------------------------------------------
    def publish(self, event: str, data: dict | None = None, qmp: bool = True) -> None:
        now = time.time()
        body = {"event": event, "data": data or {}, "host": self.name,
                "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}, "qmp": qmp}
        self.pub.send_multipart([ev.topic(event), msgpack.packb(body)])

    def set_status(self, status: str) -> None:
        self.mig.status = status
        self.publish(ev.MIGRATION, {"status": status}, qmp=self.capabilities["events"])

    # run state -----------------------------------------------------------------
    def set_runstate(self, new: RunState) -> None:
        check_transition(self.runstate, new)
        self.runstate = new

    async def set_running(self, running: bool, paused_state: RunState = RunState.PAUSED) -> None:
        """Start or stop every vCPU; returns once none is mid-step."""
        if running:
            self.set_runstate(RunState.RUNNING)
            await asyncio.gather(*(v.call("cont") for v in self.vcpus))
            self.publish(ev.RESUME)
        else:
            was_running = self.runstate.running
            self.set_runstate(paused_state)
            await asyncio.gather(*(v.call("stop") for v in self.vcpus))
            if was_running:
                self.publish(ev.STOP)

    async def vcpu_states(self) -> list[dict]:
        replies = await asyncio.gather(*(v.call("get_state") for v in self.vcpus))
        return [r.data["result"] for r in replies]

    # notifications --------------------------------------------------------------
    def on_writer_notice(self, msg: Message) -> None:
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

    async def on_receiver_notice(self, msg: Message) -> None:
        if msg.type == "started":
            self.mig.start = time.monotonic()
            self.set_status("active")
            if not self.parameters["x-fault"].endswith(":slow"):
                await asyncio.sleep(0.2)  # so that a fault strikes mid-stream
            await self.fault("incoming")
        elif msg.type == "failed":
            self.mig.status = "failed" if self.mig.incoming or self.mig.status == "none" else self.mig.status
            self.mig.incoming = True
            self.mig.error = msg.data["desc"]
            self.mig.end = time.monotonic()
            log.warning("incoming migration failed: %s", msg.data["desc"])
            self.set_status("failed")
            if self.exit_on_error:
                self.stop_event.set()
        elif msg.type == "loaded":
            await self.finish_incoming(msg.data)

    async def finish_incoming(self, data: dict) -> None:
        """The whole stream is in: load vCPU state, re-read disk metadata, run."""
        self.mig.ram = {"transferred": data["bytes"], "remaining": 0, "total": self.ram.size,
                        "duplicate": data["zero"], "normal": data["normal"],
                        "normal-bytes": data["normal"] * PAGE_SIZE, "page-size": PAGE_SIZE}
        digests = data.get("devices", {}).pop(DIGEST_SECTION, None)
        self.device_state.update(data.get("devices", {}))
        try:
            await self.fault("after-eof")
            if digests is not None:
                local = await asyncio.get_running_loop().run_in_executor(None, self.ram.digests)
                bad = [name for name, digest in digests.items() if local.get(name) != digest]
                if bad:
                    raise MigrationFailed(f"RAM digest mismatch in block {bad[0]!r}: the stream was damaged")
            states = data["vcpus"]
            if len(states) != len(self.vcpus):
                raise ActorError(f"stream carries {len(states)} vCPUs, this guest has {len(self.vcpus)}")
            await asyncio.gather(*(v.call("set_state", {"registers": s}) for v, s in zip(self.vcpus, states, strict=False)))
            if self.guest_drives:
                # The seed's fix: drop every image's cached metadata and re-read it
                # (the source wrote to shared images until the end), before anything runs.
                await self.vcpus[0].call("drives_activate", {
                    "skip_invalidate": self.capabilities["x-skip-invalidate"]}, timeout=60)
            if data.get("disk"):
                self.mig.disk = data["disk"]
            if self.mig.status != "active":
                raise MigrationFailed(self.mig.error or "incoming migration failed")
            # Everything that can fail is done: tell the source, and wait for its go-ahead.
            go = (await self.receiver.call("finish", {"rc": 0}, timeout=15)).data["result"]["go"]
            if not go:
                raise MigrationFailed("the source did not confirm the switchover")
        except (ActorError, StateError, MigrationFailed) as exc:
            self.mig.error = f"cannot start the migrated guest: {exc}"
            self.mig.end = time.monotonic()
            self.set_status("failed")
            try:
                await self.receiver.call("finish", {"rc": 1, "desc": str(exc)}, timeout=5)
            except ActorError as cleanup:
                log.warning("after a failed incoming migration: %s", cleanup)
            if self.guest_drives:
                try:
                    await self.vcpus[0].call("drives_inactivate", timeout=60)  # the source takes them back
                except ActorError as cleanup:
                    log.warning("after a failed incoming migration: %s", cleanup)
            return
        if self.cfg["autostart"] and data.get("runstate") == "running":
            await self.set_running(True)
        else:
            self.set_runstate(RunState.PRELAUNCH if not self.cfg["autostart"] else RunState.PAUSED)
        self.mig.end = time.monotonic()
        self.set_status("completed")

    async def start_incoming(self, uri: str) -> str:
        try:
            parse_uri(uri)
        except TransportError as exc:
            raise ActorError(str(exc)) from None
        # The state first: the receiver may report "started" before it answers.
        self.mig = MigrationState(start=time.monotonic(), incoming=True)
        self.mig.status = "setup"
        self.publish(ev.MIGRATION, {"status": "setup"}, qmp=True)  # QEMU emits this one ungated
        try:
            reply = await self.receiver.call("listen", {"uri": uri, "timeout": self.parameters["x-transport-timeout"]})
        except ActorError as exc:
            self.mig.status, self.mig.error = "failed", str(exc)
            raise
        self.incoming_uri = reply.data["result"]["uri"]
        return self.incoming_uri

    # failures --------------------------------------------------------------------
    async def on_actor_failed(self, actor: str, cause: str) -> None:
        """The supervisor restarted an actor that died or hung: fail what it was part of."""
        desc = f"{actor} actor {cause}"
        log.warning("%s", desc)
        if actor in MIGRATION_ACTORS and self.task is not None and not self.task.done():
            self.actor_failure = desc
            self.task.cancel()
        if actor == "receiver" and self.mig.incoming and self.mig.status in ("setup", "active"):
            self.mig.error = f"incoming migration failed: {desc}"
            self.mig.end = time.monotonic()
            self.set_status("failed")
        peer = {"writer": self.writer, "ram_sender": self.ram_sender,
                "block_sender": self.block_sender, "receiver": self.receiver}.get(actor)
        if peer is not None:
            peer.fail_pending(desc)
        deadline = time.monotonic() + 15
        while peer is not None and time.monotonic() < deadline:
            try:
                await peer.call("ping", timeout=1)  # the new instance learns who we are
                break
            except ActorError:
                continue

    async def fault(self, point: str) -> None:
        """Inject the fault the `x-fault` parameter names for this point, if any."""
        spec = self.parameters["x-fault"]
        if not spec or spec.split(":")[0] != point:
            return
        action, _, target = spec.split(":", 1)[1].partition("-")
        incoming = point in DEST_FAULT_POINTS and self.mig.incoming
        log.warning("injecting fault %s", spec)
        if action == "fail":
            if incoming and point == "incoming":
                await self.receiver.call("inject", {"action": "fail"})
                return
            raise MigrationFailed(f"injected fault: {action} at {point}")
        if action in ("kill", "stall"):
            actor = target or ("receiver" if incoming else "writer")
            with open(os.path.join(self.cfg["rundir"], f"{actor}.pid")) as f:
                os.kill(int(f.read()), signal.SIGKILL if action == "kill" else signal.SIGSTOP)
            if not incoming:
                await asyncio.sleep(30)  # the supervisor notices and the migration is failed
            return
        if action == "cancel":
            # What a user's migrate_cancel would do at this very moment (twice: harmless).
            await self.cmd_migrate_cancel()
            await self.cmd_migrate_cancel()
            await asyncio.sleep(0)
            return
        if action in ("reset", "slow"):
            if incoming:
                await self.receiver.call("inject", {"action": action})
            else:
                await self.writer.call("abort")

    # the outgoing migration -------------------------------------------------------
    def start_migration(self, uri: str, blk: bool = False, inc: bool = False) -> None:
        if (blk or inc) and not self.guest_drives:
            raise ActorError("block migration needs guest drives, and this guest has none")
        self.writer_failure = self.actor_failure = None
        self.mig = MigrationState(start=time.monotonic(), incremental=inc)
        self.set_status("setup")
        self.task = asyncio.get_running_loop().create_task(self.migrate(uri, blk or inc))

    async def migrate(self, uri: str, blk: bool = False) -> None:
        mig = self.mig
        was_running = self.runstate.running
        stopped = inactivated = False
        ram = self.ram_sender
        try:
            await self.fault("connect")
            reply = await self.writer.call("connect", {"uri": uri, "timeout": self.parameters["x-transport-timeout"]},
                                           timeout=30)
            return_path = reply.data["result"]["return_path"] and self.capabilities["return-path"]
            blocks = [(b.name, b.size) for b in self.ram.blocks]
            head = [savevm.header(), savevm.configuration(self.guest["machine"])]
            if return_path:
                head.append(savevm.command(savevm.CMD_OPEN_RETURN_PATH))
            await self.wait_mark((await ram.call("emit", {"mark": True}, frames=head)).data["result"]["mark"], 60)
            if blk:
                # QEMU registers "block" before "ram", so its sections come first.
                setup = (await self.block_sender.call(
                    "setup", {"inc": mig.incremental, "section_id": SID_BLOCK}, timeout=300)).data["result"]
                await self.wait_mark(setup["mark"], 60)
                mig.disk = {"transferred": 0, "remaining": setup["remaining"], "total": setup["total"]}
            await self.fault("setup")
            status = (await ram.call("setup")).data["result"]
            await ram.call("emit", {}, frames=[
                savevm.section_start(savevm.SECTION_START, SID_RAM, "ram", 0, savevm.RAM_VERSION),
                savevm.ram_mem_size(blocks), savevm.ram_eos(), savevm.footer(SID_RAM)])
            mig.ram.update({"total": self.ram.size, "remaining": status["remaining"],
                            "dirty-sync-count": 1, "page-size": PAGE_SIZE})
            self.publish(ev.MIGRATION_PASS, {"pass": 1}, qmp=self.capabilities["events"])
            mig.setup_time = int((time.monotonic() - mig.start) * 1000)
            self.set_status("active")
            await self.iterate(status["remaining"], blk)

            # Completion, with the guest stopped.
            await self.fault("before-stop")
            stop_at = time.monotonic()
            sent_runstate = self.runstate.value  # as QEMU: the state the guest had before the switch
            await self.set_running(False, RunState.FINISH_MIGRATE)
            stopped = True
            mig.step("stopped", stop_at)
            await self.fault("after-stop")
            await self.pause_before_switchover()
            if blk:
                await self.block_step(0, end=True)
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
            mark = (await ram.call("emit", {"mark": True}, frames=[eof, trailer])).data["result"]["mark"]
            mig.committed = True
            await self.wait_mark(mark, 600)
            if self.writer_failure:
                raise MigrationFailed(self.writer_failure)
            mig.step("written", stop_at)
            await self.fault("after-eof")
            mig.ram["transferred"] = self.wire_bytes
            if return_path:
                answer = (await self.writer.call("await_return", {"timeout": 60}, timeout=70)).data["result"]
                if answer["shut"] != 0:
                    raise MigrationFailed(answer["desc"] or "destination failed to load the stream")
                mig.step("answered", stop_at)
                if self.profile.has_vcpus:
                    # From here on the destination may run the guest: never resume it here.
                    mig.go_sent = True
                    await self.writer.call("confirm", timeout=10)
                mig.guest_downtime = int((time.monotonic() - stop_at) * 1000)
            await self.writer.call("close", timeout=40)
            mig.downtime = int((time.monotonic() - stop_at) * 1000)
            mig.end = time.monotonic()
            mig.ram["remaining"] = 0
            self.set_runstate(RunState.POSTMIGRATE)
            self.set_status("completed")
        except asyncio.CancelledError:
            if self.actor_failure:
                await self.abandon(was_running and stopped, "failed", self.actor_failure, inactivated)
            else:
                await self.abandon(was_running and stopped, "cancelled", "migration cancelled", inactivated)
        except (ActorError, MigrationFailed, OSError) as exc:
            await self.abandon(was_running and stopped, "failed", str(exc), inactivated)

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
        downtime limit. Bandwidth is measured on what the writer has put on
        the wire, and bytes still queued for it count as pending: a queue that
        fills fast must not make a slow link look fast."""
        mig = self.mig
        threshold = 0.0
        window_start, window_bytes = time.monotonic(), 0
        written_start = window_written = await self.wire_written()
        queued_total = 0
        bandwidth = 0.0  # bytes/s
        dirty_at_sync = remaining
        in_flight = 0
        while True:
            if self.writer_failure:
                raise MigrationFailed(self.writer_failure)
            disk_left = mig.disk.get("remaining", 0) if blk else 0
            if remaining + disk_left + in_flight <= threshold and (not blk or mig.block_bulk_done):
                sync = (await self.ram_sender.call("sync")).data["result"]
                self.count_pass(sync)
                await self.fault("pass")
                remaining = dirty_at_sync = sync["remaining"]
                if blk:
                    await self.block_step(1)  # harvests: the disk's exact pending bytes
                    disk_left = mig.disk["remaining"]
                if remaining + disk_left + in_flight <= threshold:
                    # The estimate the switchover was decided on (pending / bandwidth).
                    mig.expected_downtime = (int((remaining + disk_left + in_flight)
                                                 * self.parameters["downtime-limit"] / threshold)
                                             if threshold else 0)
                    return
            limit = self.parameters["max-bandwidth"]
            if limit:
                budget = int(limit * WINDOW) - window_bytes
            else:
                budget = max(UNLIMITED_MIN, int(bandwidth * WINDOW * UNLIMITED_WINDOWS)) if bandwidth else UNLIMITED_FIRST
            if budget > 0 and blk and disk_left:
                sent = await self.block_step(budget)
                window_bytes += sent
                queued_total += sent
                budget -= sent
            if budget > 0:
                result = (await self.ram_sender.call(
                    "iterate", {"budget": budget, "section_id": SID_RAM}, timeout=120)).data["result"]
                self.account(result)
                remaining = result["remaining"]
                window_bytes += result["queued"]
                queued_total += result["queued"]
                if blk:
                    await self.wait_mark(result["mark"], 600)
            now = time.monotonic()
            elapsed = now - window_start
            if elapsed < WINDOW and limit and window_bytes >= limit * WINDOW:
                await asyncio.sleep(window_start + WINDOW - now)
                now = time.monotonic()
                elapsed = now - window_start
            if elapsed >= WINDOW:
                written = await self.wire_written()
                bandwidth = (written - window_written) / elapsed
                in_flight = max(0, queued_total - (written - written_start))
                window_written = written
                # What a window overshot (a chunk does not split) is owed by the next one.
                window_start = now
                window_bytes = max(0, window_bytes - int(limit * WINDOW)) if limit else 0
                switchover_bw = self.parameters["avail-switchover-bandwidth"] or bandwidth
                threshold = switchover_bw * self.parameters["downtime-limit"] / 1000
                if switchover_bw:
                    mig.expected_downtime = int((dirty_at_sync + disk_left + in_flight) / switchover_bw * 1000)
                mig.ram["mbps"] = round(bandwidth * 8 / 1e6, 3)
                mig.ram["pages-per-second"] = int(bandwidth / savevm.NORMAL_RECORD)

    async def wire_written(self) -> int:
        """Bytes the writer has put on the wire so far in this migration."""
        return (await self.writer.call("stats", timeout=10)).data["result"]["bytes"]

    def count_pass(self, sync: dict) -> None:
        ram = self.mig.ram
        ram["dirty-sync-count"] = ram.get("dirty-sync-count", 0) + 1
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
        states: list[tuple[str, int, object]] = [(VCPU_SECTION, i, regs) for i, regs in enumerate(vcpus)]
        if self.profile.has_vcpus:
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

    async def abandon(self, resume: bool, status: str, desc: str, inactivated: bool = False) -> None:
        """Undo a migration that did not complete: the source guest runs on,
        with its images taken back -- unless the destination was already told
        to run it, in which case the source stays paused."""
        log.warning("migration %s: %s", status, desc)
        if self.mig.go_sent:
            resume = inactivated = False
            desc += "; the destination was told to run the guest, so the source stays paused"
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

async def serve(cfg: HostConfig) -> None:
    ctx = zmq.asyncio.Context()
    coord = Coordinator(cfg, ctx)
    control = ctx.socket(zmq.ROUTER)
    control.setsockopt(zmq.LINGER, 0)
    control.bind(cfg.endpoint("coordinator"))
    await coord.connect_workers()

    async def handle(ident, msg: Message) -> None:
        try:
            result = await coord.execute(msg.data.get("execute", ""), msg.data.get("arguments") or {})
            out = Message("reply", {"rid": msg.data.get("rid"), "result": result}, "coordinator")
        except ActorError as exc:
            out = Message("error", {"rid": msg.data.get("rid"), "class": exc.cls, "desc": exc.desc},
                          "coordinator")
        except (StateError, ValueError, TypeError) as exc:
            out = Message("error", {"rid": msg.data.get("rid"), "class": "GenericError", "desc": str(exc)},
                          "coordinator")
        await control.send_multipart([ident, *out.serialize()])

    async def receive() -> None:
        tasks = set()
        while True:
            ident, *parts = await control.recv_multipart()
            try:
                msg = Message.unserialize(parts)
            except ValueError:
                continue
            if msg.type == "actor_failed":
                t = asyncio.get_running_loop().create_task(
                    coord.on_actor_failed(msg.data["actor"], msg.data["cause"]))
            else:
                t = asyncio.get_running_loop().create_task(handle(ident, msg))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    receiver = asyncio.get_running_loop().create_task(receive())
    await coord.stop_event.wait()
    receiver.cancel()
    if coord.task is not None and not coord.task.done():
        coord.task.cancel()  # quit during a migration: undo it before the sockets go
        await asyncio.wait([coord.task], timeout=10)
    ctx.destroy(linger=0)


def main() -> None:
    cfg = start_actor("coordinator")
    asyncio.run(serve(cfg))


if __name__ == "__main__":
    main()
