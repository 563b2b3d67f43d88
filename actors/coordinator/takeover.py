"""What a coordinator keeps so that a successor can take over: the run
state, parameters, capabilities and objects (tls-creds-x509, authz-*), written to the (private) run directory
whenever they change. A coordinator the supervisor restarts reads them back,
asks the vCPUs whether they run, tidies the migration actors after the
migration its predecessor left, and serves the guest on."""

from __future__ import annotations

import asyncio
import json
import os

from livemig.actors.base import ActorError, log
from livemig.actors.coordinator.state import MigrationState
from livemig.machine.runstate import MigrationStatus, RunState
from livemig.protocol.objects import ObjectError, ObjectStore

STATE_FILE = "coordinator-state.json"
PERSIST_INTERVAL = 0.05  # s


class Takeover:
    """Mixin of the Coordinator."""

    persisted = ""  # the durable state last written

    def durable_state(self) -> dict:
        return {"runstate": self.runstate.value, "parameters": self.parameters,
                "capabilities": self.capabilities, "incoming_uri": self.incoming_uri,
                "migrating": self.task is not None and not self.task.done(),
                "go_sent": self.mig.go_sent, "objects": self.objects.query(),
                "handover": self.handover_record()}

    async def persist(self) -> None:
        """Write the durable state whenever it changed."""
        while True:
            self.persist_now()
            await asyncio.sleep(PERSIST_INTERVAL)

    def persist_now(self) -> None:
        """Write the durable state now if it changed (tmp file, then rename):
        the hand-over calls it before each step a successor must know of."""
        text = json.dumps(self.durable_state(), sort_keys=True)
        if text == self.persisted:
            return
        tmp = os.path.join(self.cfg.rundir, f".{STATE_FILE}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(self.cfg.rundir, STATE_FILE))
        self.persisted = text

    def saved_state(self) -> dict | None:
        try:
            fd = os.open(os.path.join(self.cfg.rundir, STATE_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    async def take_over(self) -> None:
        """Serve the guest a dead coordinator served: its parameters and
        capabilities, its run state; a migration it was running has failed,
        and the guest runs on unless the destination was told to run it."""
        saved = self.saved_state()
        if saved is None:
            raise ActorError("no state left by the previous coordinator: cannot take over")
        self.parameters.update(saved["parameters"])
        self.capabilities.update(saved["capabilities"])
        self.incoming_uri = saved.get("incoming_uri")
        self.restore_objects(saved.get("objects"))
        runstate = RunState(saved["runstate"])
        running = [(await v.call("ping")).data["result"].get("running") for v in self.vcpus]
        if saved["migrating"] and saved.get("handover"):
            await self.tidy_after_migration()
            self.take_over_handover(saved["handover"])
        elif saved["migrating"]:
            await self.tidy_after_migration()
            self.mig = MigrationState(status=MigrationStatus.FAILED,
                                      error="the coordinator died during the migration; a new one took over")
            if runstate is RunState.FINISH_MIGRATE:
                runstate = RunState.POSTMIGRATE if saved["go_sent"] else RunState.RUNNING
        self.runstate = runstate
        if runstate is RunState.RUNNING and not all(running):
            self.runstate = RunState.PAUSED
            await self.set_running(True)
        self.spend_fault()
        if self.incoming_uri and not saved["migrating"]:
            await self.take_over_incoming()
        log.warning("took over the guest (%s)", self.runstate.value)

    def restore_objects(self, saved: list[dict] | None) -> None:
        """The objects the dead coordinator held: --object's and object-add's,
        less those object-del removed (each recreated, and so checked, again)."""
        if saved is None:
            return
        store = ObjectStore()
        for props in saved:
            try:
                store.add(props)
            except ObjectError as exc:
                log.warning("object %r of the previous coordinator is gone: %s", props.get("id"), exc)
        self.objects = store

    async def tidy_after_migration(self) -> None:
        for peer, request, args in ((self.writer, "abort", {}), (self.writer, "close", {"abort": True}),
                                    (self.ram_sender, "cleanup", {}), (self.block_sender, "cleanup", {})):
            try:
                await peer.call(request, args, timeout=30)
            except ActorError as exc:
                log.warning("after the migration of the previous coordinator: %s", exc)
