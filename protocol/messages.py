"""Actor messages: a three-field msgpack envelope (type, data, node_id) in the
first ZeroMQ frame, optionally followed by raw binary frames (page indexes,
bitmaps, stream bytes) that travel without being re-encoded."""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack


@dataclass
class Message:
    type: str
    data: dict = field(default_factory=dict)
    node_id: str = ""
    frames: list[bytes | memoryview] = field(default_factory=list)

    def serialize(self) -> list[bytes | memoryview]:
        return [msgpack.packb((self.type, self.data, self.node_id), use_bin_type=True), *self.frames]

    @classmethod
    def unserialize(cls, parts: list) -> Message:
        try:
            mtype, data, node_id = msgpack.unpackb(parts[0], raw=False)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise ValueError(f"malformed actor message: {exc}") from None
        if not isinstance(mtype, str) or not isinstance(data, dict):
            raise ValueError("malformed actor message: bad envelope")
        return cls(mtype, data, node_id, [p.buffer if hasattr(p, "buffer") else p for p in parts[1:]])


REPLY = "reply"
ERROR = "error"
