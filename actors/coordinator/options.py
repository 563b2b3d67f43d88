"""Migration parameters and capabilities: set only as protocol.parameters allows,
all checked before any is applied."""

from __future__ import annotations

from livemig.actors.base import ActorError
from livemig.actors.coordinator.commands import invalid_type, type_ok
from livemig.actors.coordinator.faults import parse_fault
from livemig.machine.runstate import MigrationStatus
from livemig.protocol import multifd
from livemig.protocol.parameters import PARAMETERS, capability_refusal, parameter_refusal
from livemig.protocol.uri import parse_uri
from livemig.protocol.xbzrle import check_cache_size


def check_fault(spec: str) -> None:
    if spec:  # "" injects nothing
        parse_fault(spec)


# Checks beyond a parameter's type and range; each raises ValueError or ActorError.
CHECKS = {"x-fault": check_fault, "xbzrle-cache-size": check_cache_size,
          **{name: (lambda v, name=name: multifd.check_parameter(name, v))
             for name in ("multifd-channels", "multifd-compression", "multifd-zlib-level", "multifd-zstd-level")}}
MULTIFD_SETTINGS = ("multifd", "multifd-channels", "multifd-compression", "multifd-zlib-level",
                    "multifd-zstd-level")


class Options:
    """Mixin of the Coordinator."""

    def set_parameters(self, params: dict) -> None:
        new = dict(self.parameters)
        for key, value in params.items():
            if key not in new:
                raise ActorError(parameter_refusal(key))
            row = PARAMETERS[key]
            if value is None and row.nullable:
                value = row.type()  # QEMU's StrOrNull: null turns it off
            if not type_ok(row.type, value):
                raise invalid_type(key, row.type)
            if row.type is int and (problem := row.range_error(value)):
                raise ActorError(problem)
            if (check := CHECKS.get(key)) is not None:
                try:
                    check(value)
                except ValueError as exc:
                    raise ActorError(str(exc)) from None
            new[key] = value
        self.check_incoming_multifd({**new, **self.capabilities})
        self.parameters = new

    def set_capabilities(self, capabilities: list) -> None:
        new = dict(self.capabilities)
        for i, item in enumerate(capabilities):
            where = f"capabilities[{i}]"
            if not isinstance(item, dict):
                raise ActorError(f"Invalid parameter type for '{where}', expected: object")
            for key, expected in (("capability", str), ("state", bool)):
                if key not in item:
                    raise ActorError(f"Parameter '{where}.{key}' is missing")
                if not type_ok(expected, item[key]):
                    raise invalid_type(f"{where}.{key}", expected)
            if extra := set(item) - {"capability", "state"}:
                raise ActorError(f"Parameter '{where}.{sorted(extra)[0]}' is unexpected")
            if item["capability"] not in new:
                raise ActorError(capability_refusal(item["capability"], f"{where}.capability"))
            new[item["capability"]] = item["state"]
        if new["auto-converge"] and new["dirty-limit"]:
            raise ActorError("dirty-limit conflicts with auto-converge either enable one")
        if new["postcopy-ram"] and new["multifd"]:
            raise ActorError("Postcopy is not yet compatible with multifd")
        self.check_incoming_multifd({**self.parameters, **new})
        self.capabilities = new

    def check_incoming_multifd(self, settings: dict) -> None:
        """The destination takes its channels as set at migrate-incoming: it
        needs -incoming defer to have them set first, as QEMU does."""
        listening = self.mig.incoming and self.mig.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE)
        current = {**self.parameters, **self.capabilities}
        if listening and any(settings[k] != current[k] for k in MULTIFD_SETTINGS):
            raise ActorError("multifd settings cannot change once the destination listens: start it "
                             "with -incoming defer and set them before migrate-incoming")

    def multifd_config(self, uri: str) -> dict | None:
        """What the writer or receiver needs of multifd for a migration over `uri`."""
        if not self.capabilities["multifd"]:
            return None
        scheme = parse_uri(uri).scheme
        if scheme not in ("tcp", "unix"):
            raise ActorError(f"multifd is not supported by current protocol ({scheme}:); use tcp: or unix:")
        method = self.parameters["multifd-compression"]
        return {"channels": self.parameters["multifd-channels"], "compression": method,
                "level": self.parameters.get(f"multifd-{method}-level", 0)}
