"""The hand-over between two livemig hosts (docs/reliability.md): once the
source has queued EOF the guest runs nowhere until one side knows it may run
it. The destination holds the guest's last state as soon as it has loaded it
all; the source never runs it again unless the destination says it never will
(SHUT(1), or ABANDONED to a resolve). A lost message or connection is resolved
by the source reconnecting to the same URI and asking; x-migrate-resolve is
the operator's command when the two cannot reach each other."""

from __future__ import annotations

import asyncio
import time

from livemig.actors.base import ActorError, log
from livemig.actors.coordinator.commands import command
from livemig.actors.coordinator.state import MigrationFailed, MigrationState
from livemig.machine.runstate import MigrationStatus, RunState
from livemig.protocol import returnpath
from livemig.protocol.uri import parse_uri

RESOLVE_WINDOW = 25.0  # s of quick retries; then one a second until resolved
DEST_POINTS = ("after-eof", "after-shut", "after-go")  # the receiver's own reset points


class HandoverLost(Exception):
    """A hand-over message or its connection was lost: resolve it."""


class DestinationRefused(MigrationFailed):
    """The destination said it will not run the guest: the source resumes."""


class Handover:
    """Mixin of the Coordinator."""

    go_taken = False  # the destination acted on the source's go-ahead
    takeover_task: asyncio.Task | None = None  # a successor's finish or run of the incoming guest

    # the source ---------------------------------------------------------------------
    def begin_handover(self, uri: str, return_path: bool, resume: bool) -> None:
        """Before EOF is queued: from here a successor (takeover.py) resolves
        the hand-over rather than resume the guest, so it is on disk first."""
        self.mig.holder = "unknown"
        self.mig.return_path = return_path
        self.handover_uri, self.handover_resume = uri, resume
        self.persist_now()

    async def hand_over(self, mark: str, uri: str, return_path: bool, stop_at: float,
                        resume: bool, inactivated: bool) -> None:
        """From EOF queued to one guest running. Raises MigrationFailed only
        when the destination said it will not run the guest (the source resumes)."""
        mig = self.mig
        self.resolve_now = asyncio.Event()
        why = None
        while True:
            try:
                if why is None:
                    await self.handshake(mark, uri, return_path, stop_at)
                else:
                    await self.resolve(uri, why, stop_at, resume, inactivated)
                return
            except DestinationRefused:
                raise
            except (HandoverLost, MigrationFailed, ActorError, OSError) as exc:
                if not self.profile.has_vcpus and why is None:
                    # No vCPUs of ours, so perhaps a QEMU peer, which cannot answer a
                    # resolve: as QEMU's source does, fail and run the guest on here.
                    mig.holder = "source"
                    raise MigrationFailed(str(exc)) from None
                why = str(exc)
            except asyncio.CancelledError:
                if self.stop_event.is_set():
                    mig.error = "the host quit during the hand-over; the guest's last state may be on the destination"
                    log.warning("%s", mig.error)  # stays paused: never two
                    return
                # An actor died (it is being replaced): the hand-over goes on.
                asyncio.current_task().uncancel()
                why = self.actor_failure or "interrupted"

    async def handshake(self, mark: str, uri: str, return_path: bool, stop_at: float) -> None:
        mig = self.mig
        await self.wait_mark(mark, 600)
        if self.writer_failure:
            raise HandoverLost(self.writer_failure)
        mig.step("written", stop_at)
        await self.fault("after-eof")
        mig.ram["transferred"] = self.wire_bytes
        if not return_path:
            await self.writer.call("close", timeout=40)
            if self.profile.has_vcpus and parse_uri(uri).scheme in ("tcp", "unix"):
                # A livemig destination runs after EOF: ask it, so as not to report a lie.
                raise HandoverLost("no return path: asking the destination whether it runs the guest")
            self.complete_handover(stop_at)
            return
        answer = (await self.writer.call("await_return", {"timeout": 60}, timeout=70)).data["result"]
        if answer["shut"] is None:
            raise HandoverLost(answer["desc"])
        if answer["shut"] != 0:
            mig.holder = "source"
            raise DestinationRefused(answer["desc"] or "destination failed to load the stream")
        mig.holder = "destination"  # it loaded everything
        mig.step("answered", stop_at)
        if self.profile.has_vcpus:
            mig.go_sent = True  # from here on never resume the guest here
            self.persist_now()  # nor may a successor
            await self.writer.call("confirm", timeout=10)
            await self.fault("after-go")
            state = (await self.writer.call("await_handover", {"timeout": 15}, timeout=25)).data["result"]
            if state["state"] == returnpath.HANDOVER_ABANDONED:
                self.take_back()
                raise DestinationRefused("the destination could not run the guest")
            if state["state"] != returnpath.HANDOVER_RUNNING:
                raise HandoverLost(state["desc"])
            mig.guest_downtime = int((time.monotonic() - stop_at) * 1000)
        else:  # a destination with no vCPUs of ours (QEMU's -M none): its SHUT(0) is the word
            mig.guest_downtime = int((time.monotonic() - stop_at) * 1000)
        if mig.xbzrle is not None or self.capabilities["multifd"]:
            await self.wire_sent()  # the final statistics
        await self.writer.call("close", timeout=40)
        self.complete_handover(stop_at)

    def take_back(self) -> None:
        """The destination said it never ran the guest and never will."""
        self.mig.go_sent = False
        self.mig.holder = "source"

    def complete_handover(self, stop_at: float) -> None:
        mig = self.mig
        mig.holder = "destination"
        mig.handover_desc = None
        mig.downtime = int((time.monotonic() - stop_at) * 1000)
        mig.end = time.monotonic()
        mig.ram["remaining"] = 0
        self.set_runstate(RunState.POSTMIGRATE)
        self.set_status(MigrationStatus.COMPLETED)

    async def resolve(self, uri: str, why: str, stop_at: float, resume: bool, inactivated: bool) -> None:
        """Reconnect to the destination until it says where the guest is."""
        mig = self.mig
        log.warning("hand-over interrupted (%s): asking the destination", why)
        mig.handover_desc = why
        if mig.status is MigrationStatus.ACTIVE:
            self.set_status(MigrationStatus.DEVICE)
        deadline = time.monotonic() + RESOLVE_WINDOW
        while True:
            try:
                # GO once it was said (or at EOF, with no return path); else take it back.
                go = mig.go_sent or not mig.return_path
                answer = (await self.writer.call("resolve", {"uri": uri, "tls": self.tls_out, "timeout": 2,
                                                             "go": go}, timeout=30)).data["result"]
            except ActorError as exc:  # the writer died and is being replaced
                answer = {"state": None, "desc": str(exc)}
            if answer.get("go"):
                mig.go_sent = True
                mig.holder = "destination"
            if answer["state"] == returnpath.HANDOVER_RUNNING:
                log.warning("hand-over resolved: the guest runs on the destination")
                self.complete_handover(stop_at)
                return
            if answer["state"] == returnpath.HANDOVER_ABANDONED:
                self.take_back()
                log.warning("hand-over resolved: the destination did not run the guest; resuming it here")
                await self.abandon(resume, MigrationStatus.FAILED,
                                   f"{why}; the destination did not run the guest", inactivated)
                return
            mig.handover_desc = f"{why}; the destination cannot be reached: {answer['desc']}"
            self.resolve_now.clear()
            try:
                async with asyncio.timeout(0.3 if time.monotonic() < deadline else 1.0):
                    await self.resolve_now.wait()
            except TimeoutError:
                pass

    async def resume_handover(self, uri: str, resume: bool, inactivated: bool) -> None:
        """A coordinator taking over from one that died during a hand-over:
        resolve it with the destination, never resume on its own."""
        try:
            await self.resolve(uri, "the coordinator died during the hand-over", time.monotonic(),
                               resume, inactivated)
        except (ActorError, MigrationFailed) as exc:
            log.warning("hand-over after a takeover: %s", exc)

    def handover_record(self) -> dict | None:
        """What a successor needs to go on with an open hand-over."""
        mig = self.mig
        if mig.incoming or mig.holder is None or mig.status.ended:
            return None
        return {"uri": self.handover_uri, "go_sent": mig.go_sent, "return_path": mig.return_path,
                "holder": mig.holder, "resume": self.handover_resume}

    def take_over_handover(self, record: dict) -> None:
        self.mig = MigrationState(status=MigrationStatus.DEVICE, committed=True, go_sent=record["go_sent"],
                                  return_path=record["return_path"], holder=record["holder"],
                                  start=time.monotonic())
        self.handover_uri, self.handover_resume = record["uri"], record["resume"]
        try:
            self.tls_out = self.tls_spec(record["uri"], server=False)  # objects are restored by now
        except ActorError as exc:
            log.warning("hand-over after a takeover: %s", exc)
        self.runstate = RunState.FINISH_MIGRATE
        self.task = asyncio.get_running_loop().create_task(
            self.resume_handover(record["uri"], record["resume"], bool(self.guest_drives)))

    def resolving(self) -> bool:
        return not self.mig.incoming and self.mig.holder is not None and self.migrating()

    # the destination ----------------------------------------------------------------
    def handover_fault(self) -> str:
        """x-fault's reset at a hand-over point, done by the receiver itself."""
        point, _, action = self.parameters["x-fault"].partition(":")
        return point if action == "reset" and point in DEST_POINTS else ""

    async def run_incoming(self) -> None:
        """The source let go (or the operator resolved here): run the guest,
        once (a successor may learn of the go-ahead twice)."""
        if self.go_taken:
            return
        self.go_taken = True
        data = self.loaded
        if self.mig.status is not MigrationStatus.ACTIVE or not data:
            # It failed meanwhile, or this coordinator took over from one that
            # died: the guest does not run here, the source takes it back.
            await self.receiver.call("running", {"ok": False}, timeout=10)
            return
        ok = False
        try:
            if self.handover_fault() != "after-go":
                await self.fault("after-go")
            if self.cfg.autostart and data.get("runstate") == "running":
                await self.set_running(True)
            else:
                self.set_runstate(RunState.PRELAUNCH if not self.cfg.autostart else RunState.PAUSED)
            ok = True
        except (ActorError, MigrationFailed) as exc:
            self.mig.error = f"cannot start the migrated guest: {exc}"
            self.mig.holder = "source"
        finally:
            await self.receiver.call("running", {"ok": ok}, timeout=10)
        self.mig.end = time.monotonic()
        self.set_status(MigrationStatus.COMPLETED if ok else MigrationStatus.FAILED)

    async def take_over_incoming(self) -> None:
        """A destination coordinator replacing one that died: go on where the
        receiver is. It keeps what it loaded, so this one finishes the load,
        waits for GO, or runs the guest, as its predecessor would have."""
        where = (await self.receiver.call("where")).data["result"]
        data = where["loaded"]  # kept after the hand-over, until the next listen
        if not where["active"] and not where["ran"]:
            return
        mig = self.mig = MigrationState(incoming=True, start=time.monotonic(), status=(
            MigrationStatus.ACTIVE if where["connected"] or data else MigrationStatus.SETUP))
        if data is None:
            return  # still loading: its "loaded" comes to this coordinator
        if not where["finished"]:
            self.takeover_task = asyncio.get_running_loop().create_task(self.finish_incoming(data))
            return
        self.note_loaded(data)
        running = [(await v.call("ping")).data["result"].get("running") for v in self.vcpus]
        if where["rc"] != 0 or where["phase"] == "abandoned" or (where["ran"] and not where["ran_ok"]):
            mig.holder, mig.error = "source", "the guest does not run here"
            mig.end = time.monotonic()
            self.set_status(MigrationStatus.FAILED)
            return
        mig.holder = "destination"
        if where["ran"] or any(running):  # ran (and maybe not yet said so) before the kill
            self.go_taken = True
            if any(running) and (self.runstate is not RunState.RUNNING or not all(running)):
                self.runstate = RunState.PAUSED
                await self.set_running(True)
            if not where["ran"]:
                await self.receiver.call("running", {"ok": True}, timeout=10)
            mig.end = time.monotonic()
            self.set_status(MigrationStatus.COMPLETED)
            return
        self.loaded = data
        if where["phase"] != "waiting":  # else GO (or x-migrate-resolve) runs it
            self.takeover_task = asyncio.get_running_loop().create_task(self.run_incoming())

    async def answer_resolves(self) -> None:
        """The receiver was started afresh during a hand-over: it answers the
        source's resolves with what became of the guest here."""
        running = self.mig.status is MigrationStatus.COMPLETED
        state = returnpath.HANDOVER_RUNNING if running else returnpath.HANDOVER_ABANDONED
        try:
            await self.receiver.call("answer", {"uri": self.incoming_uri, "state": state})
        except ActorError as exc:
            log.warning("hand-over: the new receiver cannot answer the source: %s", exc)

    # the command --------------------------------------------------------------------
    @command("x-migrate-resolve")
    async def cmd_migrate_resolve(self) -> dict:
        """Resolve a hand-over the two hosts could not finish: run the guest
        here if this host holds its last state (x-guest-holder in
        query-migrate), refuse if it does not. Safe on either side."""
        mig = self.mig
        if mig.incoming:
            if mig.holder == "destination" and mig.status is MigrationStatus.ACTIVE:
                await self.receiver.call("take")
                await self.wait_until(lambda: mig.status.ended)
            if mig.status is MigrationStatus.COMPLETED and mig.holder == "destination":
                return {"holder": "destination"}
            raise ActorError("the guest's last state is not on this host: run x-migrate-resolve on the source")
        if self.resolving():
            self.resolve_now.set()  # one more try now
            await self.wait_until(lambda: mig.status.ended, 5)
        if mig.holder == "source" and mig.status.ended:
            if self.runstate is not RunState.RUNNING:
                await self.set_running(True)
            return {"holder": "source"}
        if mig.status is MigrationStatus.COMPLETED:
            raise ActorError("the guest runs on the destination")
        if mig.holder == "destination":
            raise ActorError("the destination holds the guest's last state and cannot be reached: "
                             "run x-migrate-resolve there")
        if mig.holder == "unknown":
            raise ActorError("the destination cannot be reached and may hold the guest's last state: "
                             "run x-migrate-resolve there")
        raise ActorError("no hand-over to resolve")

    async def wait_until(self, done, seconds: float = 15) -> None:
        deadline = time.monotonic() + seconds
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

