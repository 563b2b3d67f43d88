"""Monitor: the host's QMP server (UNIX and/or TCP socket). It negotiates
capabilities, turns commands into requests to the coordinator, and forwards
the coordinator's events to every negotiated client. A slow or vanished
client only loses its own events; it never holds up the host."""

from __future__ import annotations

import asyncio
import os

import msgpack
import zmq
import zmq.asyncio

from actors.base import ActorError, AsyncPeer, HostConfig, log, start_actor
from actors.commands import COMMANDS
from protocol import qmp

VERSION = (7, 2, 0)
PACKAGE = "livemig 0.1.0"
MAX_QUEUED_EVENTS = 1000
LOCAL_COMMANDS = ("qmp_capabilities", "query-version", "query-commands")


class Session:
    def __init__(self, monitor: Monitor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.monitor = monitor
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.out: asyncio.Queue[bytes | None] = asyncio.Queue(MAX_QUEUED_EVENTS)

    def send(self, obj: dict) -> None:
        try:
            self.out.put_nowait(qmp.encode(obj))
        except asyncio.QueueFull:
            log.warning("QMP client too slow; dropping it")
            self.writer.close()

    async def pump(self) -> None:
        while (data := await self.out.get()) is not None:
            self.writer.write(data)
            await self.writer.drain()

    async def run(self) -> None:
        pump = asyncio.get_running_loop().create_task(self.pump())
        stream = qmp.JsonStream()
        self.send(qmp.greeting(VERSION, PACKAGE))
        try:
            while data := await self.reader.read(65536):
                for item in stream.feed(data):
                    if isinstance(item, qmp.FramingError):
                        self.send(qmp.error("GenericError", str(item)))
                    else:
                        await self.handle(item)
        except (ConnectionError, OSError):
            pass
        finally:
            self.monitor.sessions.discard(self)
            pump.cancel()
            self.writer.close()

    async def handle(self, req) -> None:
        if not isinstance(req, dict):
            self.send(qmp.error("GenericError", "QMP input must be a JSON object"))
            return
        id_ = req.get("id")
        name = req.get("execute", req.get("exec-oob"))
        if not isinstance(name, str):
            self.send(qmp.error("GenericError", "QMP input lacks member 'execute'", id_))
            return
        unknown = set(req) - {"execute", "exec-oob", "arguments", "id"}
        if unknown:
            self.send(qmp.error("GenericError", f"QMP input member '{sorted(unknown)[0]}' is unexpected", id_))
            return
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            self.send(qmp.error("GenericError", "QMP input member 'arguments' must be an object", id_))
            return
        if "exec-oob" in req:
            self.send(qmp.error("GenericError", "Out-Of-Band is not enabled for this monitor", id_))
            return
        if not self.negotiated:
            if name != "qmp_capabilities":
                self.send(qmp.error("CommandNotFound",
                                    "Expecting capabilities negotiation with 'qmp_capabilities'", id_))
                return
            enable = args.get("enable", [])
            if set(args) - {"enable"} or not isinstance(enable, list):
                self.send(qmp.error("GenericError", "Parameter 'enable' expects a list of capabilities", id_))
                return
            if enable:
                self.send(qmp.error("GenericError", f"Capability '{enable[0]}' not available", id_))
                return
            self.negotiated = True
            self.reply({}, id_)
            return
        if name == "qmp_capabilities":
            self.send(qmp.error("CommandNotFound",
                                "Capabilities negotiation is already complete, command ignored", id_))
            return
        if name == "query-version":
            major, minor, micro = VERSION
            self.reply({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}, id_)
            return
        if name == "query-commands":
            self.reply([{"name": n} for n in sorted({*LOCAL_COMMANDS, *COMMANDS})], id_)
            return
        try:
            result = await self.monitor.execute(name, args)
        except ActorError as exc:
            self.send(qmp.error(exc.cls, exc.desc, id_))
            return
        self.reply(result, id_)

    def reply(self, result, id_) -> None:
        msg: dict = {"return": result}
        if id_ is not None:
            msg["id"] = id_
        self.send(msg)


class Monitor:
    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self.sessions: set[Session] = set()
        self.lock = asyncio.Lock()

    async def execute(self, name: str, args: dict):
        # Long commands (migrate without detach via HMP) must not block others: one
        # request in flight per command, replies matched by id in AsyncPeer.
        reply = await self.coordinator.call("qmp", {"execute": name, "arguments": args}, timeout=120)
        return reply.data["result"]

    async def events(self, ctx: zmq.asyncio.Context) -> None:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.cfg["events"])
        while True:
            frames = await sub.recv_multipart()
            body = msgpack.unpackb(frames[-1], raw=False)
            if not body.get("qmp"):
                continue
            event = {"event": body["event"], "data": body["data"], "timestamp": body["timestamp"]}
            if not body["data"]:
                del event["data"]
            for s in list(self.sessions):
                if s.negotiated:
                    s.send(event)

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        self.sessions.add(session)
        await session.run()

    async def serve(self) -> None:
        ctx = zmq.asyncio.Context()
        self.coordinator = AsyncPeer(ctx, self.cfg.endpoint("coordinator"), "monitor")
        servers = []
        for addr in self.cfg["qmp"]:
            kind, _, where = addr.partition(":")
            if kind == "unix":
                if os.path.exists(where):
                    os.unlink(where)
                old = os.umask(0o177)  # the socket is private: mode 0600
                try:
                    servers.append(await asyncio.start_unix_server(self.client, where))
                finally:
                    os.umask(old)
            else:
                host, _, port = where.rpartition(":")
                servers.append(await asyncio.start_server(self.client, host.strip("[]"), int(port)))
        await self.events(ctx)


def main() -> None:
    cfg = start_actor("monitor")
    asyncio.run(Monitor(cfg).serve())


if __name__ == "__main__":
    main()
