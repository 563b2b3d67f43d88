"""The host's QMP commands, served by the coordinator. Each command registers
itself under its QMP name; its docstring is its help (query-commands, HMP
`help`, docs)."""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import types
import typing
from collections.abc import Callable
from dataclasses import asdict

from livemig.actors.base import ActorError, log
from livemig.machine.runstate import MigrationStatus, RunState, StateError
from livemig.protocol import events as ev
from livemig.protocol.objects import ObjectError, ObjectStore, describe
from livemig.protocol.tls import client_tls, server_tls
from livemig.protocol.tlscreds import TlsError
from livemig.protocol.transport import TransportError
from livemig.protocol.uri import UriError, parse_uri

# MigrationStats members livemig reports (0 when nothing happened). QEMU 7.2 also has
# skipped and dirty-sync-missed-zero-copy, which livemig never counts (docs/qmp.md), and
# multifd-bytes, reported once the multifd capability exists.
RAM_STATS = ("transferred", "remaining", "total", "duplicate", "normal", "normal-bytes",
             "dirty-pages-rate", "mbps", "dirty-sync-count", "postcopy-requests", "page-size",
             "pages-per-second", "precopy-bytes", "downtime-bytes", "postcopy-bytes")
# Guest devices a host can be given (--device DRIVER,id=ID, device_add): driver -> help.
DEVICE_DRIVERS = {"no-migrate": "a device whose state cannot be migrated: it blocks migration"}
MIGRATION_ACTIVE = "There's a migration process in progress"

COMMANDS: dict[str, Callable] = {}
TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array",
              dict: "object"}


def parse_device(text: str) -> dict:
    """--device DRIVER,id=ID[,...] -> {"driver": DRIVER, "id": ID, ...}."""
    driver, *props = text.split(",")
    dev = {"driver": driver}
    for prop in props:
        key, eq, value = prop.partition("=")
        if not eq:
            raise ValueError(f"device {driver!r}: expected KEY=VALUE, not {prop!r}")
        dev[key] = value
    if driver not in DEVICE_DRIVERS:
        raise ValueError(f"'{driver}' is not a valid device model name (known: {', '.join(DEVICE_DRIVERS)})")
    if not dev.get("id"):
        raise ValueError(f"device {driver!r} needs an id: --device {driver},id=NAME")
    if set(dev) - {"driver", "id"}:
        raise ValueError(f"device {driver!r} has no property {sorted(set(dev) - {'driver', 'id'})[0]!r}")
    return dev


def socket_address(uri: str) -> dict | None:
    """QEMU's SocketAddress of a listening tcp: or unix: URI (what query-migrate shows on
    the destination)."""
    kind, _, rest = uri.partition(":")
    if kind == "unix":
        return {"type": "unix", "path": rest}
    if kind != "tcp":
        return None
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")
    return {"type": "inet", "host": host, "port": port, **({"ipv6": True} if ":" in host else {"ipv4": True})}


def command(name: str):
    """Register a QMP command; its docstring is its help."""
    def wrap(fn):
        COMMANDS[name] = fn
        return fn
    return wrap


def _base_type(hint) -> type | None:
    """The JSON type a parameter hint asks for: `int | None` -> int, `list[dict]` -> list."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = members[0] if len(members) == 1 else None
    hint = typing.get_origin(hint) or hint
    return hint if hint in TYPE_NAMES else None


def type_ok(expected: type | None, value) -> bool:
    if expected is None:
        return True
    if isinstance(value, bool) and expected is not bool:
        return False  # JSON true is not a number
    if expected is float:
        return isinstance(value, int | float)
    return isinstance(value, expected)


def invalid_type(key: str, expected: type) -> ActorError:
    return ActorError(f"Invalid parameter type for '{key}', expected: {TYPE_NAMES[expected]}")


@functools.cache
def _parameters(fn: Callable) -> tuple[tuple[tuple[str, str, type | None, bool], ...], bool]:
    """(QMP key, Python name, JSON type, required) per parameter, and whether it takes **extra."""
    hints = typing.get_type_hints(fn)
    out, open_ended = [], False
    for p in list(inspect.signature(fn).parameters.values())[1:]:
        if p.kind is p.VAR_KEYWORD:
            open_ended = True
            continue
        key = p.name.rstrip("_").replace("_", "-")
        out.append((key, p.name, _base_type(hints.get(p.name)), p.default is inspect.Parameter.empty))
    return tuple(out), open_ended


def check_args(fn: Callable, args: dict) -> dict:
    """QMP arguments -> keyword arguments for `fn`, checked against its signature
    and type hints in QEMU's order and words, before anything has happened."""
    params, open_ended = _parameters(fn)
    kwargs: dict = {}
    for key, name, expected, required in params:
        if key not in args:
            if required:
                raise ActorError(f"Parameter '{key}' is missing")
            continue
        if not type_ok(expected, args[key]):
            raise invalid_type(key, expected)
        kwargs[name] = args[key]
    known = {p[0] for p in params}
    for key in args:
        if key in known:
            continue
        if not open_ended or key in kwargs or key == "self":
            raise ActorError(f"Parameter '{key}' is unexpected")
        kwargs[key] = args[key]  # **extra gets QMP's own spelling
    return kwargs


class Commands:
    """Mixin of the Coordinator: one method per QMP command."""

    # commands --------------------------------------------------------------------------
    async def execute(self, name: str, args: dict):
        fn = COMMANDS.get(name)
        if fn is None:
            raise ActorError(f"The command {name} has not been found", "CommandNotFound")
        if not isinstance(args, dict):
            raise ActorError("QMP input member 'arguments' must be an object")
        kwargs = check_args(fn, args)
        try:
            return await fn(self, **kwargs)
        except (ActorError, StateError):
            raise
        except Exception as exc:  # a bug must answer the client, not leave it waiting
            log.exception("QMP command %s failed", name)
            raise ActorError(f"{name} failed: {exc}") from None

    # hooks the coordinator calls ------------------------------------------------------------
    def init_devices(self, devices: list[dict]) -> None:
        """Guest devices from the host's config; a no-migrate one registers a blocker."""
        self.devices: dict[str, dict] = {}
        self.blockers: dict[str, str] = {}  # owner -> reason; migrate is refused while any
        self.switchover_gate: asyncio.Event | None = None
        for dev in devices:
            self.add_device(dict(dev))

    def add_device(self, dev: dict) -> None:
        driver, id_ = dev.get("driver"), dev.get("id")
        if driver not in DEVICE_DRIVERS:
            raise ActorError(f"'{driver}' is not a valid device model name")
        if not isinstance(id_, str) or not id_:
            raise ActorError("Parameter 'id' is missing")
        if id_ in self.devices:
            raise ActorError(f"Duplicate device ID '{id_}'")
        self.devices[id_] = dev
        if driver == "no-migrate":
            self.blockers[id_] = f"State blocked by non-migratable device '{id_}'"

    def migrating(self) -> bool:
        """An outgoing migration runs and has not reached its end status yet (after it,
        its task may still be tidying up: a cancel must not interrupt that)."""
        return self.task is not None and not self.task.done() and not self.mig.status.ended

    async def pause_before_switchover(self) -> None:
        """With pause-before-switchover on: wait in pre-switchover, guest stopped,
        until migrate-continue (or a cancel), then serialise devices in `device`."""
        if not self.capabilities.get("pause-before-switchover"):
            return
        self.switchover_gate = asyncio.Event()
        try:
            self.set_status(MigrationStatus.PRE_SWITCHOVER)
            await self.switchover_gate.wait()
        finally:
            self.switchover_gate = None
        self.set_status(MigrationStatus.DEVICE)

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
                                                         and self.mig.status is not MigrationStatus.ACTIVE):
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
    async def cmd_migrate(self, uri: str, blk: bool = False, inc: bool = False, detach: bool = True,
                          resume: bool = False) -> dict:
        """Start migrating the guest to URI (tcp:HOST:PORT, unix:PATH, exec:CMD, fd:N, file:PATH);
        returns at once, progress is in query-migrate. resume: reconnect a post-copy
        migration in postcopy-paused (the destination ran migrate-recover)."""
        if resume:
            if self.mig.incoming or self.mig.status is not MigrationStatus.POSTCOPY_PAUSED:
                raise ActorError("Cannot resume if there is no paused migration")
            try:
                parse_uri(uri)
            except TransportError as exc:
                raise ActorError(str(exc)) from None
            asyncio.get_running_loop().create_task(self.postcopy_resume(uri))
            return {}
        if self.migrating():
            raise ActorError("migration already in progress")
        if self.task is not None and not self.task.done():
            # It has ended and is tidying up (resuming the guest): a new one waits for that.
            await asyncio.wait([self.task], timeout=60)
        if self.mig.incoming and self.mig.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
            raise ActorError("Guest is waiting for an incoming migration")
        if self.runstate is RunState.INMIGRATE:
            raise ActorError("Guest is waiting for an incoming migration")
        if self.blockers:
            raise ActorError(next(iter(self.blockers.values())))
        try:
            parse_uri(uri)
        except UriError as exc:
            raise ActorError(str(exc)) from None
        self.multifd_config(uri)  # refused now, not once it has started
        self.tls_out = self.tls_spec(uri, server=False)
        # As QEMU: capability block is what blk asks for, block-incremental what inc does.
        blk = blk or self.capabilities["block"]
        self.start_migration(uri, blk, inc or (blk and self.parameters["block-incremental"]))
        return {}

    @command("migrate-incoming")
    async def cmd_migrate_incoming(self, uri: str, exit_on_error: bool = False) -> dict:
        """Wait for an incoming migration on URI (host started with --incoming, also
        again after a failed one). With exit-on-error the host quits if it fails,
        as QEMU does by default; livemig stays up by default."""
        if self.runstate is not RunState.INMIGRATE:
            raise ActorError("'-incoming' was not specified on the command line")
        if self.mig.incoming and self.mig.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE):
            raise ActorError("The incoming migration has already been started")
        self.exit_on_error = bool(exit_on_error)
        await self.start_incoming(uri)
        return {}

    @command("migrate_cancel")
    async def cmd_migrate_cancel(self) -> dict:
        """Cancel the current outgoing migration; harmless when none runs."""
        if self.migrating() and self.mig.status is not MigrationStatus.CANCELLING and not self.mig.committed:
            self.set_status(MigrationStatus.CANCELLING)
            self.task.cancel()
        return {}

    @command("migrate-continue")
    async def cmd_migrate_continue(self, state: str) -> dict:
        """Let a migration paused in STATE (pre-switchover) go on."""
        if state not in set(MigrationStatus):
            raise ActorError(f"Parameter 'state' does not accept value '{state}'")
        if self.mig.status != state or self.switchover_gate is None:
            raise ActorError(f"Migration not in expected state: {self.mig.status.value}")
        self.switchover_gate.set()
        return {}

    @command("object-add")
    async def cmd_object_add(self, **props) -> dict:
        """Create an object as QEMU does: qom-type tls-creds-x509 (id, dir, endpoint
        client|server, verify-peer, sanity-check; files ca-cert.pem, server-cert.pem,
        server-key.pem, client-cert.pem, client-key.pem, ca-crl.pem), authz-simple
        (identity, a DN such as O=livemig,CN=client) or authz-list (rules of match,
        policy allow|deny, format exact|glob; policy for the rest, deny by default)."""
        try:
            self.objects.add(props)
        except ObjectError as exc:
            raise ActorError(str(exc)) from None
        return {}

    @command("object-del")
    async def cmd_object_del(self, id: str) -> dict:
        """Delete the object ID (a migration already under way keeps what it took)."""
        try:
            self.objects.delete(id)
        except ObjectError as exc:
            raise ActorError(str(exc)) from None
        return {}

    @command("x-query-objects")
    async def cmd_query_objects(self) -> list:
        """Every object made by object-add or --object: qom-type, id and its properties."""
        return self.objects.query()

    def init_objects(self, objects: list[dict]) -> None:
        self.objects = ObjectStore()
        self.tls_out: dict | None = None
        for props in objects:
            self.objects.add(props)

    def tls_spec(self, uri: str, server: bool) -> dict | None:
        """The TLS a channel actor needs (objects as their properties), checked
        now so that a mistake is refused before anything starts."""
        name = self.parameters["tls-creds"]
        if not name:
            return None
        authz_id = self.parameters["tls-authz"] if server else ""
        try:
            target = parse_uri(uri)
            if target.scheme == "file":
                raise TlsError("TLS does not apply to file: migrations")
            creds = self.objects.creds(name)
            authz = self.objects.authz(authz_id) if authz_id else None
            if server:
                server_tls(creds, authz)
            else:
                client_tls(creds, target, self.parameters["tls-hostname"])
        except (ObjectError, TransportError, UriError) as exc:
            raise ActorError(str(exc)) from None
        return {"creds": describe(creds), "authz": describe(authz) if authz else None,
                "hostname": self.parameters["tls-hostname"]}

    @command("query-migrate")
    async def cmd_query_migrate(self) -> dict:
        """Status and statistics of the current or last migration ({} before any), and what
        blocks a new one."""
        info = self.mig.info()
        if self.mig.incoming and self.mig.status.startswith("postcopy") or self.mig.postcopy:
            info.update(await self.postcopy_info())
        if "ram" in info:
            stats = RAM_STATS + (("multifd-bytes",) if "multifd" in self.capabilities else ())
            info["ram"] = {**dict.fromkeys(stats, 0), **info["ram"]}
        if self.mig.incoming and self.mig.status in ("setup", "active") and self.incoming_uri:
            if (address := socket_address(self.incoming_uri)) is not None:
                info["socket-address"] = [address]
        if self.blockers and not self.mig.incoming:
            info["blocked-reasons"] = list(self.blockers.values())
        return info

    @command("query-migrate-parameters")
    async def cmd_query_parameters(self) -> dict:
        """Every migration parameter and its value."""
        return dict(self.parameters)

    @command("migrate-set-parameters")
    async def cmd_set_parameters(self, **params) -> dict:
        """Set migration parameters: max-bandwidth (bytes/s, 0 = unlimited), downtime-limit (ms),
        x-avail-switchover-bandwidth (bytes/s, 0 = measured), and any other in
        query-migrate-parameters. All are checked before any is applied."""
        self.set_parameters(params)
        return {}

    @command("query-migrate-capabilities")
    async def cmd_query_capabilities(self) -> list:
        """Every migration capability and whether it is on."""
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    @command("migrate-set-capabilities")
    async def cmd_set_capabilities(self, capabilities: list) -> dict:
        """Turn migration capabilities on or off: [{capability, state}, ...]. events: MIGRATION
        and MIGRATION_PASS on QMP; return-path: wait for the destination's verdict;
        pause-before-switchover: stop in pre-switchover until migrate-continue."""
        if self.migrating():
            raise ActorError(MIGRATION_ACTIVE)
        self.set_capabilities(capabilities)
        # The destination checks postcopy-ram when the source's ADVISE arrives.
        await self.receiver.call("configure", {"postcopy": self.capabilities["postcopy-ram"]})
        return {}

    @command("migrate-pause")
    async def cmd_migrate_pause(self) -> dict:
        """Break a post-copy migration's link on purpose (postcopy-active only); both
        sides go to postcopy-paused and wait for migrate-recover / migrate resume=true."""
        if self.mig.status is not MigrationStatus.POSTCOPY_ACTIVE:
            raise ActorError("migrate-pause is currently only supported during postcopy-active state")
        if self.mig.incoming:
            await self.receiver.call("inject", {"action": "fail"})
        else:
            await self.writer.call("abort", timeout=5)
        return {}

    @command("migrate-recover")
    async def cmd_migrate_recover(self, uri: str) -> dict:
        """Destination: listen on URI for the source's `migrate resume=true` (postcopy-paused only)."""
        if not self.mig.incoming or self.mig.status is not MigrationStatus.POSTCOPY_PAUSED:
            raise ActorError("Migrate recover can only be run when postcopy is paused.")
        try:
            parse_uri(uri)
        except TransportError as exc:
            raise ActorError(str(exc)) from None
        await self.receiver.call("recover", {"uri": uri})
        return {}

    @command("migrate-start-postcopy")
    async def cmd_migrate_start_postcopy(self) -> dict:
        """Switch the running migration to post-copy: the guest moves to the destination
        at the next chance and its pages follow on demand (needs capability postcopy-ram)."""
        if not self.capabilities.get("postcopy-ram"):
            raise ActorError("Enable postcopy with migrate_set_capability before the start of migration")
        if self.mig.incoming or self.mig.status is MigrationStatus.NONE:
            raise ActorError("Postcopy must be started after migration has been started")
        self.mig.postcopy_requested = True
        return {}

    @command("device_add")
    async def cmd_device_add(self, driver: str, id_: str, **props) -> dict:
        """Add a guest device: driver no-migrate (a device that blocks migration), id ID."""
        if props:
            raise ActorError(f"Property '{driver}.{sorted(props)[0]}' not found")
        if self.migrating():
            raise ActorError(MIGRATION_ACTIVE)
        self.add_device({"driver": driver, "id": id_})
        return {}

    @command("device_del")
    async def cmd_device_del(self, id_: str) -> dict:
        """Remove guest device ID; the migration blocker it held goes with it."""
        if id_ not in self.devices:
            raise ActorError(f"Device '{id_}' not found", "DeviceNotFound")
        del self.devices[id_]
        self.blockers.pop(id_, None)
        self.publish(ev.DEVICE_DELETED, {"device": id_, "path": f"/machine/peripheral/{id_}"})
        return {}

    @command("query-block")
    async def cmd_query_block(self) -> list:
        """The guest's drives: name, image file, format, size, and whether this host holds them active."""
        if not self.guest_drives:
            return []
        return (await self.vcpus[0].call("drives")).data["result"]

    @command("pmemsave")
    async def cmd_pmemsave(self, val: int, size: int, filename: str) -> dict:
        """Save SIZE bytes of guest RAM from guest-physical address VAL to FILENAME (RAM blocks
        are laid out from address 0 in order)."""
        if val < 0 or size < 0 or val + size > self.ram.size:
            raise ActorError(f"Invalid parameter: range {val:#x}+{size:#x} is outside guest RAM "
                             f"(0x0+{self.ram.size:#x})")
        if self.mig.incoming and self.mig.status in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_PAUSED):
            # Reading a page not yet placed would allocate it here: the guest's copy would be lost.
            raise ActorError("guest RAM is still arriving in post-copy: pmemsave after it completes")

        def save() -> None:
            with open(filename, "wb") as f:
                f.write(self.ram.bytes[val:val + size].data)
        try:
            await asyncio.to_thread(save)  # large dumps must not stall the coordinator
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
        return {"name": self.name, "guest": asdict(self.guest), "events": self.cfg.events,
                "incoming": self.incoming_uri, "pid": os.getppid()}


# Commands that live in other modules of the package register on import.
from livemig.actors.coordinator import brakes, handover  # noqa: E402, F401  (their commands)
