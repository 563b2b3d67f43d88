"""User-created objects as QEMU's object-add / -object makes them: TLS
credentials and authorization rules, by id.

A host's coordinator keeps the store; the actors that open channels get the
objects they need as plain properties (`props`) and rebuild them.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from livemig.protocol.tlscreds import Authz, TlsError, X509Creds

TYPES = ("tls-creds-x509", "authz-simple", "authz-list")
_UNSUPPORTED = {
    "tls-creds-psk": "it needs Python >= 3.13 (TLS-PSK callbacks); this is Python "
                     f"{sys.version_info.major}.{sys.version_info.minor}: use tls-creds-x509",
    "tls-creds-anon": "anonymous TLS has no authentication: use tls-creds-x509",
}

UserObject = X509Creds | Authz


class ObjectError(ValueError):
    """An object that cannot be created, found or deleted."""


def create(props: dict[str, Any]) -> UserObject:
    """One object from object-add's arguments: qom-type, id and its properties."""
    props = dict(props)
    qom_type, oid = props.pop("qom-type", None), props.pop("id", None)
    if not isinstance(qom_type, str):
        raise ObjectError("object-add needs a 'qom-type'")
    if not isinstance(oid, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", oid):
        raise ObjectError(f"object id {oid!r} is not an identifier (a letter, then letters, digits, '-', '.', '_')")
    if qom_type in _UNSUPPORTED:
        raise ObjectError(f"object type {qom_type!r} is not supported: {_UNSUPPORTED[qom_type]}")
    if qom_type not in TYPES:
        raise ObjectError(f"object type {qom_type!r} is not supported (livemig has {', '.join(TYPES)})")
    try:
        if qom_type == "tls-creds-x509":
            return X509Creds.from_props(oid, props)
        return Authz.from_props(qom_type, oid, props)
    except TlsError as exc:
        raise ObjectError(str(exc)) from None


def describe(obj: UserObject) -> dict[str, Any]:
    """object-add's arguments that recreate `obj`."""
    return {"qom-type": obj.qom_type, "id": obj.id, **obj.props()}


class ObjectStore:
    def __init__(self) -> None:
        self.objects: dict[str, UserObject] = {}

    def add(self, props: dict[str, Any]) -> UserObject:
        oid = props.get("id")
        if isinstance(oid, str) and oid in self.objects:
            raise ObjectError(f"an object with id {oid!r} already exists")
        obj = create(props)
        self.objects[obj.id] = obj
        return obj

    def delete(self, oid: str) -> None:
        if oid not in self.objects:
            raise ObjectError(f"object {oid!r} not found")
        del self.objects[oid]

    def query(self) -> list[dict[str, Any]]:
        return [describe(obj) for obj in self.objects.values()]

    def creds(self, oid: str) -> X509Creds:
        obj = self.objects.get(oid)
        if not isinstance(obj, X509Creds):
            raise ObjectError(f"No TLS credentials with id {oid!r}")
        return obj

    def authz(self, oid: str) -> Authz:
        obj = self.objects.get(oid)
        if not isinstance(obj, Authz):
            raise ObjectError(f"No authorization object with id {oid!r}")
        return obj


def parse_option(text: str) -> dict[str, Any]:
    """QEMU's -object syntax: JSON ({"qom-type": ..., "id": ...}) or
    TYPE,key=value,... with ",," for a comma in a value and dotted keys for
    lists (rules.0.match=...)."""
    if text.lstrip().startswith("{"):
        try:
            props = json.loads(text)
        except ValueError as exc:
            raise ObjectError(f"bad JSON object {text!r}: {exc}") from None
        if not isinstance(props, dict):
            raise ObjectError("an object in JSON must be a JSON object")
        return props
    parts = [p.replace("\0", ",") for p in text.replace(",,", "\0").split(",")]
    props: dict[str, Any] = {}
    if parts and "=" not in parts[0]:
        props["qom-type"] = parts.pop(0)
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise ObjectError(f"object option {part!r} is not key=value")
        _put(props, key.split("."), value, part)
    return _lists(props)


def _put(into: dict[str, Any], path: list[str], value: str, part: str) -> None:
    for key in path[:-1]:
        into = into.setdefault(key, {})
        if not isinstance(into, dict):
            raise ObjectError(f"object option {part!r} conflicts with an earlier one")
    if path[-1] in into:
        raise ObjectError(f"object option {path[-1]!r} given twice")
    into[path[-1]] = value


def _lists(node: Any) -> Any:
    """Dicts keyed 0, 1, ... (from dotted keys) become lists."""
    if not isinstance(node, dict):
        return node
    node = {k: _lists(v) for k, v in node.items()}
    if node and all(k.isdigit() for k in node):
        if sorted(int(k) for k in node) != list(range(len(node))):
            raise ObjectError(f"list indexes {sorted(node)} must count from 0 without gaps")
        return [node[str(i)] for i in range(len(node))]
    return node
