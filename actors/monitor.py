"""Monitor: the host's QMP server (UNIX and/or TCP sockets). It negotiates
capabilities, turns commands into requests to the coordinator, serves human
monitor commands, and forwards the coordinator's events to every negotiated
client.

Each client is a Session with three tasks: a reader that decodes the byte
stream, an executor that runs its commands one at a time (so replies keep
their order and a long HMP `migrate` holds only that client), and a pump
that writes. Replies and events go through a bounded queue: a client that
stops reading is dropped when it fills, and nothing else ever waits for it."""

from __future__ import annotations

import asyncio
import os
from importlib import metadata

import msgpack
import zmq
import zmq.asyncio

from livemig.actors.base import ActorError, AsyncPeer, HostConfig, log, start_actor
from livemig.actors.coordinator.commands import COMMANDS, check_args
from livemig.protocol import events as ev
from livemig.protocol import hmp, qmp
from livemig.protocol.transport import tcp_listener
from livemig.protocol.uri import parse_qmp_address

# The QEMU release whose QMP interface livemig follows (7.2's, micro 0: no stable
# release changed it), and what livemig is: qemu.qmp reads only the greeting's
# shape, so `package` can say it (docs/monitor.md).
VERSION = (7, 2, 0)
PACKAGE = f"livemig {metadata.version('livemig')}"
MAX_QUEUED = 1000  # replies and events waiting for one client
MAX_REQUESTS = 64  # commands read ahead of the one running, per client
COMMAND_TIMEOUT = 120  # s; no coordinator command lasts longer (HMP migrate polls instead)
COORDINATOR_CHECK = 0.25  # s between looks, while a command runs, at whether the coordinator died
SUBSCRIBE_TIMEOUT = 30  # s to reach the coordinator's event socket at start-up


class Session:
    def __init__(self, monitor: Monitor, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.monitor = monitor
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.closed = False
        self.out: asyncio.Queue[bytes] = asyncio.Queue(MAX_QUEUED)
        self.requests: asyncio.Queue[object] = asyncio.Queue(MAX_REQUESTS)

    def send(self, obj: dict) -> None:
        if self.closed:
            return
        try:
            self.out.put_nowait(qmp.encode(obj))
        except asyncio.QueueFull:
            log.warning("QMP client does not read: %d messages queued; dropping it", MAX_QUEUED)
            self.drop()

    def drop(self) -> None:
        self.closed = True
        self.writer.transport.abort()  # close() would wait to flush to a client that never reads

    async def pump(self) -> None:
        while True:
            self.writer.write(await self.out.get())
            await self.writer.drain()

    async def execute_loop(self) -> None:
        while True:
            item = await self.requests.get()
            if isinstance(item, qmp.FramingError):
                self.send(qmp.error("GenericError", str(item)))
            else:
                await self.handle(item)

    async def read_loop(self) -> None:
        stream = qmp.JsonStream()
        while not self.closed and (data := await self.reader.read(65536)):
            for item in stream.feed(data):
                await self.requests.put(item)  # a full queue stops reading this client only

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(self.pump()), loop.create_task(self.execute_loop())]
        self.send(qmp.greeting(VERSION, PACKAGE))
        try:
            await self.read_loop()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self.monitor.sessions.discard(self)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # also reaps a pump that failed
            self.writer.transport.abort()

    async def handle(self, req) -> None:
        if not isinstance(req, dict):
            self.send(qmp.error("GenericError", "QMP input must be a JSON object"))
            return
        id_ = req.get("id")
        unknown = sorted(set(req) - {"execute", "exec-oob", "arguments", "id"})
        if unknown:
            self.send(qmp.error("GenericError", f"QMP input member '{unknown[0]}' is unexpected", id_))
            return
        name = req.get("execute", req.get("exec-oob"))
        if not isinstance(name, str):
            self.send(qmp.error("GenericError", "QMP input member 'execute' must be a string"
                                if name is not None else "QMP input lacks member 'execute'", id_))
            return
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            self.send(qmp.error("GenericError", "QMP input member 'arguments' must be an object", id_))
            return
        if "exec-oob" in req:
            self.send(qmp.error("GenericError", "QMP input member 'exec-oob' is unexpected", id_))
            return
        try:
            self.reply(await self.dispatch(name, args), id_)
        except ActorError as exc:
            self.send(qmp.error(exc.cls, exc.desc, id_))

    async def dispatch(self, name: str, args: dict):
        if not self.negotiated:
            if name != "qmp_capabilities":
                raise ActorError("Expecting capabilities negotiation with 'qmp_capabilities'",
                                 "CommandNotFound")
            enable = check_args(Session.qmp_capabilities, args).get("enable", [])
            if enable:
                raise ActorError(f"Capability '{enable[0]}' not available")
            self.negotiated = True
            return {}
        local = LOCAL_COMMANDS.get(name)
        if local is not None:
            return await local(self, **check_args(local, args))
        return await self.monitor.execute(name, args)

    def reply(self, result, id_) -> None:
        msg: dict = {"return": result}
        if id_ is not None:
            msg["id"] = id_
        self.send(msg)

    # commands served here rather than by the coordinator ------------------------------------
    async def qmp_capabilities(self, enable: list | None = None) -> dict:
        """Leave capabilities negotiation (no QMP capabilities are offered)."""
        raise ActorError("Capabilities negotiation is already complete, command ignored",
                         "CommandNotFound")

    async def query_version(self) -> dict:
        """The QEMU version this monitor speaks as, and livemig's own in `package`."""
        return qmp.greeting(VERSION, PACKAGE)["QMP"]["version"]

    async def query_commands(self) -> list:
        """Every command this monitor accepts."""
        return [{"name": n} for n in sorted({*LOCAL_COMMANDS, *COMMANDS})]

    async def human_monitor_command(self, command_line: str, cpu_index: int | None = None) -> str:
        """Run a human monitor (HMP) command line; returns its text output."""
        return await hmp.run(command_line, self.monitor.execute)


LOCAL_COMMANDS = {"qmp_capabilities": Session.qmp_capabilities, "query-version": Session.query_version,
                  "query-commands": Session.query_commands,
                  "human-monitor-command": Session.human_monitor_command}


class Monitor:
    def __init__(self, cfg: HostConfig) -> None:
        self.cfg = cfg
        self.sessions: set[Session] = set()

    async def execute(self, name: str, args: dict):
        """Forward one command to the coordinator: one request each, replies matched by id,
        so clients' commands run side by side there."""
        pid = self.coordinator_pid()
        try:
            call = asyncio.ensure_future(self.coordinator.call("qmp", {"execute": name, "arguments": args},
                                                               timeout=COMMAND_TIMEOUT))
        except (TypeError, ValueError, OverflowError) as exc:  # not representable in msgpack
            raise ActorError(f"Invalid arguments: {exc}") from None
        while not (await asyncio.wait({call}, timeout=COORDINATOR_CHECK))[0]:
            if self.coordinator_pid() != pid:  # its reply will never come
                call.cancel()
                raise ActorError(f"the coordinator died during {name}; a new one took over")
        return call.result().data["result"]

    def coordinator_pid(self) -> int | None:
        """The running coordinator's pid (a successor writes its own)."""
        try:
            with open(os.path.join(self.cfg.rundir, "coordinator.pid")) as f:
                pid = int(f.read())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    async def subscribe(self, ctx: zmq.asyncio.Context) -> zmq.asyncio.Socket:
        """Connect to the coordinator's PUB socket and wait until the connection is up:
        the QMP sockets open only then, so no client can miss an event that its own
        command caused (the PUB side drops whatever it sends before a subscriber joined)."""
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RECONNECT_IVL, 20)  # the coordinator may bind after we start
        watch = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        sub.connect(self.cfg.events)
        try:
            await asyncio.wait_for(watch.recv_multipart(), SUBSCRIBE_TIMEOUT)
        except TimeoutError:
            log.warning("no event connection to the coordinator after %d s; serving QMP anyway",
                        SUBSCRIBE_TIMEOUT)
        finally:
            sub.disable_monitor()
            watch.close(linger=0)
        return sub

    async def events(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sub.recv_multipart()
            try:
                body = msgpack.unpackb(frames[-1], raw=False)
            except (ValueError, msgpack.UnpackException):
                continue
            if not body.get("qmp"):
                continue
            event = ev.qmp_event(body)
            for s in list(self.sessions):
                if s.negotiated:
                    s.send(event)

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(self, reader, writer)
        self.sessions.add(session)
        await session.run()

    async def listen(self, addr: str) -> asyncio.Server:
        uri = parse_qmp_address(addr)
        if uri.scheme == "unix":
            if os.path.exists(uri.target):
                os.unlink(uri.target)
            old = os.umask(0o177)  # the socket is private: mode 0600
            try:
                return await asyncio.start_unix_server(self.client, uri.target)
            finally:
                os.umask(old)
        # Exactly the address named; none (tcp::PORT) is every address, as in QEMU.
        sock = tcp_listener(uri.host, uri.port)
        return await asyncio.start_server(self.client, sock=sock)

    async def serve(self) -> None:
        ctx = zmq.asyncio.Context()
        self.coordinator = AsyncPeer(ctx, self.cfg.endpoint("coordinator"), "monitor")
        sub = await self.subscribe(ctx)
        self.servers = [await self.listen(addr) for addr in self.cfg.qmp]
        await self.events(sub)


def main() -> None:
    cfg = start_actor("monitor")
    asyncio.run(Monitor(cfg).serve())


if __name__ == "__main__":
    main()
