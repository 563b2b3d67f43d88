"""The host's QMP commands, served by the coordinator. Each command registers
itself under its QMP name; its docstring is its help (query-commands, HMP
`help`, docs)."""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable

from actors.base import ActorError
from machine.runstate import RunState
from protocol import events as ev
from protocol.transport import TransportError, parse_uri

MAX_DOWNTIME_MS = 2_000_000

COMMANDS: dict[str, Callable] = {}


def command(name: str):
    """Register a QMP command; its docstring is its help."""
    def wrap(fn):
        COMMANDS[name] = fn
        return fn
    return wrap


def _check_args(fn: Callable, args: dict) -> None:
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())[1:]
    known = {p.name.replace("_", "-"): p for p in params if p.kind is not p.VAR_KEYWORD}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    for key in args if not open_ended else ():
        if key not in known:
            raise ActorError(f"Parameter '{key}' is unexpected")
    for key, p in known.items():
        if p.default is inspect.Parameter.empty and key not in args:
            raise ActorError(f"Parameter '{key}' is missing")



class Commands:
    """Mixin of the Coordinator: one method per QMP command."""

    # commands --------------------------------------------------------------------------
    async def execute(self, name: str, args: dict):
        fn = COMMANDS.get(name)
        if fn is None:
            raise ActorError(f"The command {name} has not been found", "CommandNotFound")
        if not isinstance(args, dict):
            raise ActorError("'arguments' must be an object")
        _check_args(fn, args)
        kwargs = {k.replace("-", "_"): v for k, v in args.items()}
        return await fn(self, **kwargs)

    @command("query-status")
    async def cmd_query_status(self) -> dict:
        """Run state of the guest."""
        return {"running": self.runstate.running, "singlestep": False, "status": self.runstate.value}

    @command("stop")
    async def cmd_stop(self) -> dict:
        """Pause the guest; returns once no vCPU is mid-step."""
        if self.runstate is RunState.RUNNING:
            await self.set_running(False)
        return {}

    @command("cont")
    async def cmd_cont(self) -> dict:
        """Resume the guest."""
        if self.runstate is RunState.INMIGRATE:
            raise ActorError("Guest is waiting for an incoming migration")
        if self.runstate is RunState.FINISH_MIGRATE or (self.task and not self.task.done()
                                                         and self.mig.status != "active"):
            raise ActorError("Migration is not finished yet")
        if self.runstate is not RunState.RUNNING:
            await self.set_running(True)
        return {}

    @command("quit")
    async def cmd_quit(self) -> dict:
        """Stop the host and every actor of it."""
        asyncio.get_running_loop().call_later(0.2, self.stop_event.set)
        return {}

    @command("migrate")
    async def cmd_migrate(self, uri: str, blk: bool = False, inc: bool = False, detach: bool = True) -> dict:
        """Start migrating the guest to URI (tcp:HOST:PORT, unix:PATH, exec:CMD, fd:N, file:PATH)."""
        if self.task is not None and not self.task.done():
            raise ActorError("migration already in progress")
        if self.mig.incoming and self.mig.status in ("setup", "active"):
            raise ActorError("Guest is waiting for an incoming migration")
        if self.runstate is RunState.INMIGRATE:
            raise ActorError("Guest is waiting for an incoming migration")
        if not isinstance(uri, str):
            raise ActorError("Invalid parameter type for 'uri', expected: string")
        try:
            parse_uri(uri)
        except TransportError as exc:
            raise ActorError(str(exc)) from None
        self.start_migration(uri, blk, inc)
        return {}

    @command("migrate-incoming")
    async def cmd_migrate_incoming(self, uri: str, exit_on_error: bool = False) -> dict:
        """Wait for an incoming migration on URI (host started with --incoming, also
        again after a failed one). With exit-on-error the host quits if it fails,
        as QEMU does by default; livemig stays up by default."""
        if self.runstate is not RunState.INMIGRATE:
            raise ActorError("'-incoming' was not specified on the command line")
        if self.mig.incoming and self.mig.status in ("setup", "active"):
            raise ActorError("The incoming migration has already been started")
        self.exit_on_error = bool(exit_on_error)
        await self.start_incoming(uri)
        return {}

    @command("migrate_cancel")
    async def cmd_migrate_cancel(self) -> dict:
        """Cancel the current outgoing migration; harmless when none runs."""
        if self.task is not None and not self.task.done() and not self.mig.committed:
            self.mig.status = "cancelling"
            self.publish(ev.MIGRATION, {"status": "cancelling"}, qmp=self.capabilities["events"])
            self.task.cancel()
        return {}

    @command("query-migrate")
    async def cmd_query_migrate(self) -> dict:
        """Status and statistics of the current or last migration ({} before any)."""
        return self.mig.info()

    @command("query-migrate-parameters")
    async def cmd_query_parameters(self) -> dict:
        """Every migration parameter and its value."""
        return dict(self.parameters)

    @command("migrate-set-parameters")
    async def cmd_set_parameters(self, **params) -> dict:
        """Set migration parameters: max-bandwidth (bytes/s, 0 = unlimited), downtime-limit (ms)."""
        new = dict(self.parameters)
        for key, value in params.items():
            key = key.replace("_", "-")
            if key not in new:
                raise ActorError(f"Parameter '{key}' is unexpected")
            if isinstance(new[key], str):
                if not isinstance(value, str):
                    raise ActorError(f"Invalid parameter type for '{key}', expected: string")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ActorError(f"Parameter '{key}' expects a non-negative integer")
            if key == "downtime-limit" and value > MAX_DOWNTIME_MS:
                raise ActorError(f"Parameter 'downtime_limit' expects an integer in the range of 0 to "
                                 f"{MAX_DOWNTIME_MS} milliseconds")
            new[key] = value
        self.parameters = new
        return {}

    @command("query-migrate-capabilities")
    async def cmd_query_capabilities(self) -> list:
        """Every migration capability and whether it is on."""
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    @command("migrate-set-capabilities")
    async def cmd_set_capabilities(self, capabilities: list) -> dict:
        """Turn migration capabilities on or off."""
        if self.task is not None and not self.task.done():
            raise ActorError("migration already in progress")
        new = dict(self.capabilities)
        for item in capabilities:
            if not isinstance(item, dict) or set(item) != {"capability", "state"}:
                raise ActorError("capabilities must be a list of {capability, state}")
            if item["capability"] not in new:
                raise ActorError(f"Capability '{item['capability']}' is not supported")
            new[item["capability"]] = bool(item["state"])
        self.capabilities = new
        return {}

    @command("migrate_set_speed")
    async def cmd_set_speed(self, value: int) -> dict:
        """Seed-era: maximum migration speed in bytes per second (negative means 0)."""
        if not isinstance(value, int | float):
            raise ActorError("Invalid parameter type for 'value', expected: integer")
        self.parameters["max-bandwidth"] = max(0, int(value))
        return {}

    @command("migrate_set_downtime")
    async def cmd_set_downtime(self, value: float) -> dict:
        """Seed-era: maximum tolerated downtime in seconds."""
        if not isinstance(value, int | float) or value < 0 or value * 1000 > MAX_DOWNTIME_MS:
            raise ActorError("Parameter 'value' expects a number of seconds from 0 to 2000")
        self.parameters["downtime-limit"] = int(value * 1000)
        return {}

    @command("query-block")
    async def cmd_query_block(self) -> list:
        """The guest's drives: name, image file, format, size, and whether this host holds them active."""
        if not self.guest_drives:
            return []
        return (await self.vcpus[0].call("drives")).data["result"]

    @command("pmemsave")
    async def cmd_pmemsave(self, val: int, size: int, filename: str) -> dict:
        """Save SIZE bytes of guest RAM from guest-physical address VAL to FILENAME."""
        if val < 0 or size < 0 or val + size > self.ram.size:
            raise ActorError(f"Invalid parameter: range {val:#x}+{size:#x} is outside guest RAM")
        try:
            with open(filename, "wb") as f:
                f.write(memoryview(self.ram.bytes[val:val + size]))
        except OSError as exc:
            raise ActorError(f"Could not open '{filename}': {exc.strerror}") from None
        return {}

    @command("x-query-vcpus")
    async def cmd_query_vcpus(self) -> list:
        """livemig: each vCPU's registers (workload, seed, step, PRNG state, accumulator)."""
        return await self.vcpu_states()

    @command("x-query-host")
    async def cmd_query_host(self) -> dict:
        """livemig: this host's name, guest description, endpoints and incoming URI."""
        return {"name": self.name, "guest": self.guest, "events": self.cfg["events"],
                "incoming": self.incoming_uri, "pid": os.getppid()}


