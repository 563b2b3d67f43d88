"""Events on a host's PUB socket: a topic frame, then a msgpack body
{event, data, host, timestamp: {seconds, microseconds}, qmp}. `qmp` says
whether the QMP monitor forwards it (MIGRATION events need the `events`
capability there, as in QEMU). Topics are documented in docs/events.md."""

from __future__ import annotations

import msgpack

MIGRATION = "MIGRATION"
MIGRATION_PASS = "MIGRATION_PASS"
MIGRATION_STALLED = "MIGRATION_STALLED"  # livemig's: an outgoing migration is not converging
STOP = "STOP"
RESUME = "RESUME"
DEVICE_DELETED = "DEVICE_DELETED"

TOPICS = {
    MIGRATION: b"migration.status",
    MIGRATION_PASS: b"migration.pass",
    MIGRATION_STALLED: b"migration.stalled",
    STOP: b"runstate.stop",
    RESUME: b"runstate.resume",
    DEVICE_DELETED: b"device.deleted",
}


def topic(event: str) -> bytes:
    """The PUB topic of an event; subscribe to a prefix ("migration.") to filter."""
    return TOPICS.get(event, b"other." + event.lower().encode())


def decode(frames: list[bytes]) -> dict:
    body = msgpack.unpackb(frames[-1], raw=False)
    body["topic"] = bytes(frames[0]).decode()
    return body


def qmp_event(body: dict) -> dict:
    """A PUB body as the QMP event a monitor sends (no `data` when it is empty)."""
    out: dict = {"event": body["event"], "data": body["data"], "timestamp": body["timestamp"]}
    if not body["data"]:
        del out["data"]
    return out
