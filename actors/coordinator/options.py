"""Migration parameters and capabilities: set only as protocol.parameters allows,
all checked before any is applied."""

from __future__ import annotations

from livemig.actors.base import ActorError
from livemig.actors.coordinator.commands import invalid_type, type_ok
from livemig.actors.coordinator.faults import parse_fault
from livemig.protocol.parameters import PARAMETERS, capability_refusal, parameter_refusal
from livemig.protocol.xbzrle import check_cache_size


def check_fault(spec: str) -> None:
    if spec:  # "" injects nothing
        parse_fault(spec)


# Checks beyond a parameter's type and range; each raises ValueError or ActorError.
CHECKS = {"x-fault": check_fault, "xbzrle-cache-size": check_cache_size}


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
        self.capabilities = new
