"""Events on a host's PUB socket: a topic frame, then a msgpack body
{event, data, host, timestamp: {seconds, microseconds}, qmp}. `qmp` says
whether the QMP monitor forwards it (MIGRATION events need the `events`
capability there, as in QEMU). Topics are documented in docs/events.md."""

from __future__ import annotations

import msgpack

MIGRATION = "MIGRATION"
MIGRATION_PASS = "MIGRATION_PASS"
STOP = "STOP"
RESUME = "RESUME"

TOPICS = {
    MIGRATION: b"migration.status",
    MIGRATION_PASS: b"migration.pass",
    STOP: b"runstate.stop",
    RESUME: b"runstate.resume",
}


def topic(event: str) -> bytes:
    return TOPICS.get(event, b"other." + event.lower().encode())


def decode(frames: list[bytes]) -> dict:
    body = msgpack.unpackb(frames[-1], raw=False)
    body["topic"] = frames[0].decode()
    return body
