"""Post-copy (capability postcopy-ram): the guest switches to the destination
early and fetches each page it touches from the source while the rest is
pushed in the background.

Source: ADVISE after the return path opens; pre-copy runs until
migrate-start-postcopy; then the guest stops, every page dirty since it was
sent is discarded on the destination, the device state goes in one PACKAGED
blob (LISTEN, devices, PING, RUN), and from RUN on the guest belongs to the
destination: the source never resumes it. The writer then sends asked-for
pages first and pushes the rest within max-postcopy-bandwidth.

Destination: RUN resumes the guest at once (postcopy-active on both sides);
EOF means every page arrived."""

from __future__ import annotations

import asyncio
import struct
import time

from livemig.actors.base import ActorError, log
from livemig.actors.coordinator.state import SID_DEVICES, SID_RAM, MigrationFailed
from livemig.machine.ram import PAGE_SIZE
from livemig.machine.runstate import MigrationStatus, RunState, StateError
from livemig.protocol import postcopy, savevm
from livemig.protocol.devices import DEVICES, VCPU_SECTION, full_section
from livemig.protocol.messages import Message
from livemig.protocol.ram import ram_eos

POLL = 0.2  # how often the source refreshes its post-copy statistics
DRAINED = 64 << 10  # bytes still short of the peer that count as a drained link
DRAIN_WAIT = 10.0  # s at most that the switch waits for the link to drain


class Postcopy:
    """Mixin of the Coordinator."""

    # source ----------------------------------------------------------------
    def postcopy_head(self, return_path: bool) -> list[bytes]:
        """What follows OPEN_RETURN_PATH when postcopy-ram is on: PING 1, ADVISE."""
        if not self.capabilities.get("postcopy-ram"):
            return []
        if not return_path:
            raise MigrationFailed("postcopy-ram needs a return path (a tcp:, unix: or socket fd: URI)")
        return [savevm.command(savevm.CMD_PING, struct.pack(">I", 1)), postcopy.advise()]

    async def postcopy_drain(self) -> None:
        """Before the guest stops for the switch, with it still running: let
        the pre-copy pages already queued (the writer's, the socket's send
        queue, a shaped link's) reach the destination, so that the package
        does not wait behind them with the guest stopped. Pages the guest
        dirties meanwhile are discarded at the switch as any others."""
        mark = (await self.ram_sender.call("emit", {"mark": True})).data["result"]["mark"]
        await self.wait_mark(mark, 60)
        deadline = time.monotonic() + DRAIN_WAIT
        while time.monotonic() < deadline and not self.writer_failure:
            stats = (await self.writer.call("stats", timeout=10)).data["result"]
            if stats["bytes"] - stats["sent"] <= DRAINED:
                return
            await asyncio.sleep(0.005)

    async def postcopy_prepare(self, runstate: str, stop_at: float) -> bytes:
        """With the guest stopped: final dirty sync, discards, and the PACKAGED blob."""
        mig = self.mig
        ram = self.ram_sender
        sync = (await ram.call("sync")).data["result"]
        self.count_pass(sync)
        mig.step("synced", stop_at)
        discarded = (await ram.call("postcopy_discard", timeout=60)).data["result"]["pages"]
        mig.ram["postcopy-discarded"] = discarded
        await ram.call("emit", {}, frames=[savevm.command(savevm.CMD_PING, struct.pack(">I", 2))])
        mig.step("discarded", stop_at)
        sections = []
        states = [(VCPU_SECTION, i, regs) for i, regs in enumerate(await self.vcpu_states())]
        states += [(name, 0, runstate if name == "globalstate" else self.device_state.get(name))
                   for name in self.profile.devices]
        for sid, (name, instance, state) in enumerate(states, SID_DEVICES):
            device = DEVICES[name]
            sections += full_section(sid, device, instance, device.encode(state))
        return b"".join([postcopy.listen(), *sections,
                         savevm.command(savevm.CMD_PING, struct.pack(">I", 3)), postcopy.run()])

    async def postcopy_start(self, package: bytes, stop_at: float) -> None:
        """Send the package. Once it is on the wire the destination runs the guest."""
        mig = self.mig
        ram = self.ram_sender
        mark = (await ram.call("emit", {"mark": True}, frames=[postcopy.packaged(package)])).data["result"]["mark"]
        await self.wait_mark(mark, 60)
        if self.writer_failure:
            raise MigrationFailed(self.writer_failure)
        mig.go_sent = True  # RUN is out: never resume the guest here
        self.wire_earlier = 0  # bytes on connections broken since (the writer counts per connection)
        mig.downtime = int((time.monotonic() - stop_at) * 1000)
        mig.step("package", stop_at)
        self.set_status(MigrationStatus.POSTCOPY_ACTIVE)
        self.postcopy_sent = asyncio.get_running_loop().create_future()
        left = (await ram.call("postcopy_push", {
            "section_id": SID_RAM, "bandwidth": self.parameters["max-postcopy-bandwidth"]})).data["result"]
        mig.ram["remaining"] = left["pages"] * PAGE_SIZE

    async def postcopy_finish(self, stop_at: float) -> None:
        """Wait for the writer to send every page, then END, EOF and the destination's SHUT."""
        mig = self.mig
        while not self.postcopy_sent.done():
            if self.writer_failure:
                await self.postcopy_pause(self.writer_failure)
                continue
            await asyncio.wait([self.postcopy_sent], timeout=POLL)
            self.postcopy_account((await self.writer.call("stats", timeout=10)).data["result"])
        self.postcopy_account(self.postcopy_sent.result())
        mig.step("pushed", stop_at)
        mark = (await self.ram_sender.call("emit", {"mark": True}, frames=[
            savevm.section_part(savevm.SECTION_END, SID_RAM), ram_eos(), savevm.footer(SID_RAM),
            savevm.eof()])).data["result"]["mark"]
        mig.committed = True
        await self.wait_mark(mark, 600)
        if self.writer_failure:
            raise MigrationFailed(self.writer_failure)
        answer = (await self.writer.call("await_return", {"timeout": 60}, timeout=70)).data["result"]
        if answer["shut"] != 0:
            raise MigrationFailed(answer["desc"] or "destination failed in post-copy")
        mig.step("answered", stop_at)
        await self.writer.call("close", timeout=40)
        mig.ram["transferred"] = self.wire_earlier + self.wire_bytes
        mig.end = time.monotonic()
        mig.ram["remaining"] = 0
        self.set_runstate(RunState.POSTMIGRATE)
        self.set_status(MigrationStatus.COMPLETED)

    async def postcopy_pause(self, desc: str) -> None:
        """The link broke after RUN: postcopy-paused until `migrate resume=true`
        has reconnected (the destination waits in postcopy-paused too)."""
        mig = self.mig
        log.warning("post-copy paused: %s", desc)
        mig.error = desc
        self.set_status(MigrationStatus.POSTCOPY_PAUSED)
        self.wire_earlier += self.wire_bytes
        self.wire_bytes = 0
        try:
            await self.writer.call("close", {"abort": True}, timeout=40)
        except ActorError as exc:
            log.warning("closing the broken post-copy channel: %s", exc)
        self.postcopy_resumed = asyncio.get_running_loop().create_future()
        await self.postcopy_resumed  # set by a successful migrate resume=true

    async def postcopy_resume(self, uri: str) -> None:
        """migrate {uri, resume: true}: reconnect, learn what the destination
        holds (RECV_BITMAP per block), POSTCOPY_RESUME, and go on pushing."""
        mig = self.mig
        self.set_status(MigrationStatus.POSTCOPY_RECOVER)
        self.writer_failure = None
        loop = asyncio.get_running_loop()
        self.resume_ack = loop.create_future()
        try:
            await self.writer.call("connect", {"uri": uri, "resume": True,
                                               "timeout": self.parameters["x-transport-timeout"]}, timeout=30)
            frames = [postcopy.recv_bitmap(b.name) for b in self.ram.blocks] + [postcopy.resume()]
            await self.ram_sender.call("emit", {}, frames=frames)
            async with asyncio.timeout(30):
                await self.resume_ack
            if self.writer_failure:
                raise MigrationFailed(self.writer_failure)
        except (ActorError, MigrationFailed, TimeoutError) as exc:
            desc = f"post-copy recovery failed: {exc}"
            mig.error = desc
            log.warning("%s", desc)
            self.set_status(MigrationStatus.POSTCOPY_PAUSED)
            try:
                await self.writer.call("close", {"abort": True}, timeout=40)
            except ActorError:
                pass
            return
        mig.error = None
        self.set_status(MigrationStatus.POSTCOPY_ACTIVE)
        self.postcopy_sent = loop.create_future()
        await self.ram_sender.call("postcopy_resume", {
            "section_id": SID_RAM, "bandwidth": self.parameters["max-postcopy-bandwidth"]})
        if not self.postcopy_resumed.done():
            self.postcopy_resumed.set_result(None)

    def postcopy_account(self, stats: dict) -> None:
        ram = self.mig.ram
        for key in ("postcopy-requests", "postcopy-bytes", "remaining"):
            if key in stats:
                ram[key] = stats[key]
        if "bytes" in stats:
            self.wire_bytes = stats["bytes"]

    def on_postcopy_notice(self, msg: Message) -> bool:
        """Writer notices of post-copy; True if handled."""
        if msg.type == "postcopy-sent":
            fut = getattr(self, "postcopy_sent", None)
            if fut is not None and not fut.done():
                fut.set_result(msg.data)
            return True
        if msg.type == "resume-ack":
            fut = getattr(self, "resume_ack", None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return True
        if msg.type == "recv-bitmap":
            self.mig.ram["remaining"] = msg.data["left"] * PAGE_SIZE
            return True
        if msg.type == "return-path-failed":
            if self.mig.status is MigrationStatus.POSTCOPY_ACTIVE:
                self.writer_failure = msg.data["desc"]
            return True
        return False

    # destination -----------------------------------------------------------
    async def postcopy_run(self, data: dict) -> None:
        """RUN: load the vCPUs and resume at once; pages keep arriving."""
        mig = self.mig
        self.device_state.update(data.get("devices", {}))
        try:
            states = data["vcpus"]
            if len(states) != len(self.vcpus):
                raise ActorError(f"stream carries {len(states)} vCPUs, this guest has {len(self.vcpus)}")
            await asyncio.gather(*(v.call("set_state", {"registers": s})
                                   for v, s in zip(self.vcpus, states, strict=True)))
            if self.guest_drives:
                await self.vcpus[0].call("drives_activate", {
                    "skip_invalidate": self.capabilities["x-skip-invalidate"]}, timeout=60)
            mig.postcopy_at = time.monotonic()
            self.set_status(MigrationStatus.POSTCOPY_ACTIVE)
            if self.cfg.autostart and data.get("runstate") == "running":
                await self.set_running(True)
            else:
                self.set_runstate(RunState.PAUSED)
        except (ActorError, StateError) as exc:
            # The source will not resume the guest: say so, loudly.
            log.error("post-copy: cannot run the guest here: %s", exc)
            mig.error = f"post-copy: cannot run the migrated guest: {exc}; the guest is lost"
            self.set_status(MigrationStatus.FAILED)

    def postcopy_done(self, data: dict) -> None:
        mig = self.mig
        mig.ram.update({"transferred": data.get("bytes", 0), "remaining": 0, "total": self.ram.size,
                        "page-size": PAGE_SIZE})
        mig.postcopy = data
        mig.end = time.monotonic()
        if data.get("error") or data.get("missing"):
            mig.error = data.get("error") or f"{data['missing']} pages never arrived"
            self.set_status(MigrationStatus.FAILED)
        elif mig.status is MigrationStatus.POSTCOPY_ACTIVE:
            self.set_status(MigrationStatus.COMPLETED)

    def postcopy_paused(self, data: dict) -> None:
        self.mig.error = data["desc"]
        log.warning("post-copy paused: %s", data["desc"])
        if self.mig.status is not MigrationStatus.POSTCOPY_PAUSED:
            self.set_status(MigrationStatus.POSTCOPY_PAUSED)

    async def postcopy_info(self) -> dict:
        """The destination's post-copy figures for query-migrate: QEMU's blocktime
        (with capability postcopy-blocktime) and livemig's own under x-postcopy."""
        stats = self.mig.postcopy
        if stats is None:
            try:
                stats = (await self.receiver.call("stats", timeout=5)).data["result"]
            except ActorError:
                return {}
        stats = dict(stats)
        out: dict = {}
        blocktime = stats.pop("postcopy-blocktime", None)
        per_vcpu = stats.pop("postcopy-vcpu-blocktime", None)
        if self.capabilities.get("postcopy-blocktime") and blocktime is not None:
            out["postcopy-blocktime"] = blocktime
            out["postcopy-vcpu-blocktime"] = per_vcpu
        else:
            stats["vcpu-blocktime"] = per_vcpu
        out["x-postcopy"] = stats
        return out
