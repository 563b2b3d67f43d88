"""The Coordinator, put together from its parts, and its control loop: commands
arrive from the monitor already decoded, notices from the migration actors, and
failures from the host supervisor."""

from __future__ import annotations

import asyncio
import sys
import time

import msgpack
import zmq
import zmq.asyncio

from livemig.actors.base import ActorError, AsyncPeer, HostConfig, log, start_actor
from livemig.actors.coordinator.brakes import Brakes
from livemig.actors.coordinator.commands import Commands
from livemig.actors.coordinator.faults import Faults
from livemig.actors.coordinator.handover import Handover
from livemig.actors.coordinator.incoming import Incoming
from livemig.actors.coordinator.options import Options
from livemig.actors.coordinator.outgoing import Outgoing
from livemig.actors.coordinator.postcopy import Postcopy
from livemig.actors.coordinator.state import MigrationState
from livemig.actors.coordinator.takeover import Takeover
from livemig.machine.profile import profile
from livemig.machine.runstate import MigrationStatus, RunState, StateError, check_transition
from livemig.protocol import events as ev
from livemig.protocol.messages import Message
from livemig.protocol.parameters import default_capabilities, default_parameters

MIGRATION_ACTORS = ("writer", "ram_sender", "block_sender")


class Coordinator(Commands, Options, Outgoing, Incoming, Postcopy, Faults, Takeover, Brakes, Handover):
    def __init__(self, cfg: HostConfig, ctx: zmq.asyncio.Context) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.guest = cfg.guest
        self.profile = profile(cfg.guest.machine)
        self.guest_drives = cfg.drives
        self.device_state: dict[str, object] = {}  # device states last loaded from a stream
        self.name = cfg.name
        self.ram = cfg.map_ram()
        self.runstate = RunState.PRELAUNCH
        self.parameters = default_parameters()
        self.capabilities = default_capabilities()
        self.mig = MigrationState()
        self.task: asyncio.Task | None = None
        self.writer_failure: str | None = None
        self.actor_failure: str | None = None  # set when a migration actor died or hung
        self.marks: dict[int, asyncio.Future] = {}
        self.wire_bytes = 0
        self.wire_real = 0
        self.marks_reached: dict[str, int] = {}  # producer -> highest mark the writer passed
        self.stop_event = asyncio.Event()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.bind(cfg.events)
        self.incoming_uri: str | None = None
        self.exit_on_error = False  # quit when an incoming migration fails (QEMU's default)
        self.loaded: dict = {}  # the destination's loaded stream, until the guest runs
        self.resolve_now = asyncio.Event()  # x-migrate-resolve: the source tries again now
        self.handover_uri, self.handover_resume = "", False  # an open hand-over's URI, and resume on take-back
        self.workers_ready = asyncio.Event()  # the receiver's notices wait for a successor's take-over
        self.init_devices(cfg.devices)
        self.init_objects(cfg.objects)
        self.init_brakes()

    async def connect_workers(self, takeover: bool = False) -> None:
        ep = self.cfg.endpoint
        self.vcpus = [AsyncPeer(self.ctx, ep(f"vcpu{i}"), "coordinator") for i in range(self.guest.vcpus)]
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
        try:
            await self.take_over_or_start(takeover)
        finally:
            self.workers_ready.set()

    async def take_over_or_start(self, takeover: bool) -> None:
        if takeover:
            await self.take_over()
        elif self.cfg.incoming:
            self.runstate = RunState.INMIGRATE
            if self.cfg.incoming != "defer":
                await self.start_incoming(self.cfg.incoming)
        elif self.cfg.autostart:
            await self.set_running(True)

    # events ------------------------------------------------------------------
    def publish(self, event: str, data: dict | None = None, qmp: bool = True) -> None:
        now = time.time()
        body = {"event": event, "data": data or {}, "host": self.name,
                "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}, "qmp": qmp}
        self.pub.send_multipart([ev.topic(event), msgpack.packb(body)])

    def set_status(self, status: MigrationStatus) -> None:
        self.mig.set(status)
        self.publish(ev.MIGRATION, {"status": status.value}, qmp=self.capabilities["events"])

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


    # failures --------------------------------------------------------------------
    async def on_actor_failed(self, actor: str, cause: str) -> None:
        """The supervisor restarted an actor that died or hung: fail what it was part of."""
        desc = f"{actor} actor {cause}"
        log.warning("%s", desc)
        # The block sender has a part only in a block migration (blk / inc).
        part = actor in MIGRATION_ACTORS and (actor != "block_sender" or bool(self.mig.disk))
        if part and self.task is not None and not self.task.done():
            self.actor_failure = desc
            self.task.cancel()
        # A source that queued EOF may ask what became of the guest: the new receiver answers.
        answer = actor == "receiver" and self.mig.incoming and self.mig.status is not MigrationStatus.NONE
        handover = answer and self.mig.holder is not None
        if actor == "receiver" and self.mig.incoming and self.mig.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
            if handover:
                await self.fail_incoming(f"incoming migration failed: {desc}")
            else:
                self.mig.error = f"incoming migration failed: {desc}"
                self.mig.end = time.monotonic()
                self.set_status(MigrationStatus.FAILED)
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
        if answer and self.incoming_uri:
            await self.answer_resolves()


async def serve(cfg: HostConfig, takeover: bool = False) -> None:
    ctx = zmq.asyncio.Context()
    coord = Coordinator(cfg, ctx)
    control = ctx.socket(zmq.ROUTER)
    control.setsockopt(zmq.LINGER, 0)
    control.bind(cfg.endpoint("coordinator"))
    await coord.connect_workers(takeover)
    persist = asyncio.get_running_loop().create_task(coord.persist())

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
    persist.cancel()
    if coord.task is not None and not coord.task.done():
        coord.task.cancel()  # quit during a migration: undo it before the sockets go
        await asyncio.wait([coord.task], timeout=10)
    ctx.destroy(linger=0)


def main() -> None:
    cfg = start_actor("coordinator")
    asyncio.run(serve(cfg, takeover=sys.argv[2:] == ["takeover"]))


if __name__ == "__main__":
    main()

