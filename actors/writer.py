"""Transport writer: owns the outgoing connection. It turns page descriptors
into QEMU page records straight from shared RAM, writes them with the other
stream bytes in order, counts bytes, reports marks, and reads the return path.

The data loop runs in its own thread so that the control loop can abort a
write that is blocked on a stalled peer.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from livemig.actors.base import ActorError, HostConfig, Notices, Server, actor_main
from livemig.machine.ram import GuestRam
from livemig.protocol import returnpath
from livemig.protocol.devices import SWITCHOVER_GO
from livemig.protocol.messages import Message
from livemig.protocol.ram import PageEncoder, PageVectors
from livemig.protocol.transport import Channel, TransportError, connect, parse_uri

BATCH_PAGES = 512


class Writer:
    def __init__(self, cfg: HostConfig, ctx: zmq.Context) -> None:
        guest = cfg["guest"]
        self.ram = GuestRam(cfg["ram_path"], [tuple(b) for b in guest["blocks"]])
        self.ram.populate(write=False)  # map what holds data now: no fault per page later
        self.ctx = ctx
        self.cfg = cfg
        self.channel: Channel | None = None
        self.encoder = PageEncoder(BATCH_PAGES)
        self.written = 0
        self.error: str | None = None
        self.lock = threading.Lock()
        self.notices = Notices(ctx, "writer")

    # data thread -----------------------------------------------------------
    def data_loop(self) -> None:
        pull = self.ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, 2)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(self.cfg.endpoint("writer-data"))
        while True:
            try:
                parts = pull.recv_multipart(copy=False)
            except zmq.ContextTerminated:
                return
            kind = parts[0].bytes
            try:
                if kind == b"bytes":
                    self.encoder.new_section()
                    for p in parts[1:]:
                        self.write(p.buffer)
                elif kind == b"pages":
                    self.write_pages(parts)
                elif kind == b"mark":
                    self.notices.post("mark", {"mark": parts[1].bytes.decode(), "bytes": self.written,
                                               "error": self.error})
            except (OSError, TransportError) as exc:
                with self.lock:
                    first = self.error is None
                    if first:
                        self.error = f"write to migration channel failed: {exc.strerror or exc}"
                if first:
                    self.notices.post("failed", {"desc": self.error, "bytes": self.written})

    def write(self, data) -> None:
        if self.error is not None or self.channel is None:
            return  # drop everything after a failure; the coordinator is told once
        if isinstance(data, PageVectors):
            self.written += self.channel.write_vectors(data.table)  # pages straight from guest RAM
        else:
            self.channel.write(data)
            self.written += len(data)

    def write_pages(self, parts: list) -> None:
        block = self.ram.block(parts[1].bytes.decode())
        pages = np.frombuffer(parts[3].buffer, np.uint32)
        zero = np.frombuffer(parts[4].buffer, np.bool_)
        for item in self.encoder.encode(block.name, pages, self.ram.block_pages(block), zero):
            self.write(item)

    # control ---------------------------------------------------------------
    def on_connect(self, msg: Message) -> dict:
        if self.channel is not None:
            raise ActorError("migration channel already open")
        uri = parse_uri(msg.data["uri"])
        if uri.scheme == "fd":
            # An fd: URI names a descriptor the host was given at start.
            if int(uri.target) not in self.cfg["fds"]:
                raise ActorError(f"descriptor {uri.target} was not passed to this host (--fd)")
        try:
            channel = connect(uri)
        except TransportError as exc:
            raise ActorError(str(exc)) from None
        # A peer that takes nothing for this long fails the migration.
        channel.settimeout(msg.data.get("timeout", 30_000) / 1000)
        with self.lock:
            self.written, self.error = 0, None
            self.channel = channel
        return {"return_path": channel.has_return_path}

    def on_await_return(self, msg: Message) -> dict:
        """Wait for the destination's SHUT on the return path."""
        channel = self.channel
        if channel is None or not channel.has_return_path:
            raise ActorError("no return path on this channel")
        channel.settimeout(msg.data.get("timeout", 30))
        try:
            shut = returnpath.read_shut(channel.sock.recv)
        except returnpath.ReturnPathError as exc:
            return {"shut": None, "desc": str(exc)}
        except TimeoutError:
            return {"shut": None, "desc": "destination did not answer on the return path in time"}
        except OSError as exc:
            return {"shut": None, "desc": f"return path failed: {exc.strerror or exc}"}
        if shut is None:
            return {"shut": None, "desc": "destination closed the connection before it resumed"}
        rc, desc = shut
        return {"shut": rc, "at": time.time(), "desc": desc}

    def on_confirm(self, _msg: Message) -> dict:
        """Tell a livemig destination that it may run the guest now."""
        if self.channel is None:
            raise ActorError("no migration channel")
        try:
            self.channel.write(SWITCHOVER_GO)
        except OSError as exc:
            raise ActorError(f"could not confirm the switchover: {exc.strerror or exc}") from None
        return {}

    def on_close(self, msg: Message) -> dict:
        with self.lock:
            channel, self.channel = self.channel, None
        status = 0
        if channel is not None:
            if msg.data.get("abort"):
                channel.abort()
            status = channel.close()
        if status:
            raise ActorError(f"migration command exited with status {status}")
        return {"bytes": self.written}

    def on_abort(self, _msg: Message) -> dict:
        """Unblock a stalled write; the data thread then reports the failure."""
        channel = self.channel
        if channel is not None:
            with self.lock:
                if self.error is None:
                    self.error = "migration channel aborted"
            channel.abort()
        return {}


def run(cfg: HostConfig, ctx: zmq.Context) -> None:
    writer = Writer(cfg, ctx)
    server = Server(ctx, cfg.endpoint("writer"), "writer")
    threading.Thread(target=writer.data_loop, daemon=True).start()
    server.serve_forever({"connect": writer.on_connect, "close": writer.on_close, "abort": writer.on_abort,
                          "await_return": writer.on_await_return, "confirm": writer.on_confirm,
                          "stats": lambda _m: {"bytes": writer.written}, "ping": lambda _m: {}},
                         writer.notices)


if __name__ == "__main__":
    actor_main("writer", run)
