"""Fault injection, a testing aid (docs/reliability.md): the x-fault parameter
names a point of the migration and what to do there."""

from __future__ import annotations

import asyncio
import os
import re
import signal

from livemig.actors.base import ActorError, log
from livemig.actors.coordinator.state import MigrationFailed
from livemig.actors.host import ACTORS

SOURCE_FAULT_POINTS = ("connect", "setup", "pass", "block-bulk", "before-stop", "after-stop", "after-eof",
                       "after-go")
DEST_FAULT_POINTS = ("incoming", "after-eof", "after-shut", "after-go")
# Points that take only some actions: the destination's receiver waits at
# after-shut, so a reset (done by the receiver) or a kill.
POINT_ACTIONS = {"after-shut": ("reset", "kill")}
FAULT_POINTS = tuple(dict.fromkeys(SOURCE_FAULT_POINTS + DEST_FAULT_POINTS))
FAULT_ACTIONS = ("fail", "kill", "stall", "reset", "slow", "cancel")
TARGETED = ("kill", "stall")  # the actions that take -ACTOR
TARGETS = (*ACTORS, "monitor")  # and vcpuN


def parse_fault(spec: str) -> tuple[str, str, str]:
    """'POINT:ACTION[-ACTOR]' -> (point, action, actor or ""). A typo is refused,
    naming what there is: it must not run a migration that only looks tested."""
    point, _, rest = spec.partition(":")
    action, dash, target = rest.partition("-")
    if point not in FAULT_POINTS:
        raise ActorError(f"x-fault {spec!r}: no fault point {point!r} (points: {', '.join(FAULT_POINTS)})")
    if action not in FAULT_ACTIONS:
        raise ActorError(f"x-fault {spec!r}: no action {action!r} (actions: {', '.join(FAULT_ACTIONS)})")
    if action not in POINT_ACTIONS.get(point, FAULT_ACTIONS):
        raise ActorError(f"x-fault {spec!r}: {point} takes only {' or '.join(POINT_ACTIONS[point])}")
    if dash and action not in TARGETED:
        raise ActorError(f"x-fault {spec!r}: only {' and '.join(TARGETED)} name an actor")
    if dash and target not in TARGETS and not re.fullmatch(r"vcpu\d+", target):
        raise ActorError(f"x-fault {spec!r}: no actor {target!r} (actors: {', '.join(TARGETS)}, vcpuN)")
    return point, action, target


class Faults:
    """Mixin of the Coordinator."""

    def spend_fault(self) -> None:
        """A coordinator that took over: the x-fault that killed its
        predecessor is spent (it would kill this one at the same point)."""
        spec = self.parameters["x-fault"]
        if spec and parse_fault(spec)[1:] == ("kill", "coordinator"):
            self.parameters["x-fault"] = ""

    async def fault(self, point: str) -> None:
        """Inject the fault the `x-fault` parameter names for this point, if any."""
        spec = self.parameters["x-fault"]
        if not spec:
            return
        at, action, target = parse_fault(spec)  # checked when it was set
        if at != point:
            return
        incoming = point in DEST_FAULT_POINTS and self.mig.incoming
        log.warning("injecting fault %s", spec)
        if action == "fail":
            if incoming and point == "incoming":
                await self.receiver.call("inject", {"action": "fail"})
                return
            raise MigrationFailed(f"injected fault: {action} at {point}")
        if action in TARGETED:
            actor = target or ("receiver" if incoming else "writer")
            with open(os.path.join(self.cfg.rundir, f"{actor}.pid")) as f:
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

