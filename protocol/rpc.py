"""Request/reply between actors over ZeroMQ: DEALER clients (sync and asyncio)
and ROUTER servers speaking the three-field envelope of protocol.messages,
with request ids so that a late reply is never taken for a new one."""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from livemig.protocol.messages import ERROR, REPLY, Message

log = logging.getLogger("livemig")


class ActorError(RuntimeError):
    def __init__(self, desc: str, cls: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.cls = cls


_rids = itertools.count(1)


class Client:
    """Synchronous request/reply to one actor's ROUTER (DEALER underneath)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, node_id: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.node_id = node_id
        self.endpoint = endpoint

    def call(self, mtype: str, data: dict | None = None, timeout: float = 10.0,
             frames: list | None = None) -> Message:
        data = dict(data or {})
        rid = next(_rids)
        data["rid"] = rid
        self.sock.send_multipart(Message(mtype, data, self.node_id, frames or []).serialize(), copy=False)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                raise ActorError(f"{mtype} to {self.endpoint} timed out after {timeout:.0f} s")
            msg = Message.unserialize(self.sock.recv_multipart(copy=False))
            if msg.data.get("rid") != rid:
                continue  # a late reply to an earlier request that timed out
            if msg.type == ERROR:
                raise ActorError(msg.data.get("desc", "error"), msg.data.get("class", "GenericError"))
            return msg

    def close(self) -> None:
        self.sock.close(linger=0)


class AsyncPeer:
    """Asynchronous request/reply to one worker, plus the notifications it sends
    unasked (marks, progress); used by the coordinator and the monitor."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, node_id: str,
                 on_notify: Callable[[Message], Awaitable[None] | None] | None = None) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.endpoint = endpoint
        self.node_id = node_id
        self.pending: dict[int, asyncio.Future] = {}
        self.on_notify = on_notify
        self.tasks: set[asyncio.Task] = set()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        while True:
            parts = await self.sock.recv_multipart(copy=False)
            try:
                msg = Message.unserialize(parts)
            except ValueError as exc:
                log.warning("dropping message from %s: %s", self.endpoint, exc)
                continue
            fut = self.pending.pop(msg.data.get("rid"), None) if msg.type in (REPLY, ERROR) else None
            if fut is not None:
                if not fut.done():
                    fut.set_result(msg)
            elif self.on_notify is not None:
                result = self.on_notify(msg)
                if asyncio.iscoroutine(result):
                    # Its own task: a handler may call this same peer and wait for the reply.
                    task = asyncio.get_running_loop().create_task(result)
                    self.tasks.add(task)
                    task.add_done_callback(self.tasks.discard)

    def fail_pending(self, desc: str) -> None:
        """The worker died: every request it had will never be answered."""
        for fut in self.pending.values():
            if not fut.done():
                fut.set_result(Message(ERROR, {"class": "GenericError", "desc": desc}, self.endpoint))

    async def call(self, mtype: str, data: dict | None = None, timeout: float = 10.0,
                   frames: list | None = None) -> Message:
        data = dict(data or {})
        rid = next(_rids)
        data["rid"] = rid
        fut = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            await self.sock.send_multipart(Message(mtype, data, self.node_id, frames or []).serialize())
            # Not wait_for: on Python 3.11 it swallows a cancel (migrate_cancel) that
            # arrives together with the reply, and the migration would just go on.
            async with asyncio.timeout(timeout):
                msg = await fut
        except TimeoutError:
            raise ActorError(f"{mtype} to {self.endpoint} timed out after {timeout:.0f} s") from None
        finally:
            self.pending.pop(rid, None)
        if msg.type == ERROR:
            raise ActorError(msg.data.get("desc", "error"), msg.data.get("class", "GenericError"))
        return msg

    def close(self) -> None:
        self.reader.cancel()
        self.sock.close(linger=0)


class Server:
    """A worker's ROUTER: requests in, replies and notifications out."""

    def __init__(self, ctx: zmq.Context, endpoint: str, node_id: str) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(endpoint)
        self.node_id = node_id
        self.peers: dict[str, bytes] = {}

    def recv(self, timeout_ms: int | None) -> tuple[bytes, Message] | None:
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        ident, *parts = self.sock.recv_multipart(copy=False)
        msg = Message.unserialize(parts)
        self.peers[msg.node_id] = ident.bytes
        return ident.bytes, msg

    def reply(self, ident: bytes, request: Message, result=None, frames: list | None = None) -> None:
        out = Message(REPLY, {"rid": request.data.get("rid"), "result": result}, self.node_id, frames or [])
        self.sock.send_multipart([ident, *out.serialize()], copy=False)

    def error(self, ident: bytes, request: Message, desc: str, cls: str = "GenericError") -> None:
        out = Message(ERROR, {"rid": request.data.get("rid"), "class": cls, "desc": desc}, self.node_id)
        self.sock.send_multipart([ident, *out.serialize()])

    def notify(self, peer: str, mtype: str, data: dict) -> None:
        ident = self.peers.get(peer)
        if ident is not None:
            self.sock.send_multipart([ident, *Message(mtype, data, self.node_id).serialize()])

    def serve(self, handlers: dict[str, Callable[[Message], object]], timeout_ms: int | None) -> bool:
        """Serve at most one request. Returns False when nothing came in time."""
        got = self.recv(timeout_ms)
        if got is None:
            return False
        ident, msg = got
        handler = handlers.get(msg.type)
        if handler is None:
            self.error(ident, msg, f"unknown request {msg.type!r}")
            return True
        try:
            result = handler(msg)
        except ActorError as exc:
            self.error(ident, msg, exc.desc, exc.cls)
        except Exception as exc:  # report, keep serving: one bad request must not kill an actor
            log.exception("%s failed", msg.type)
            self.error(ident, msg, f"{msg.type} failed: {exc}")
        else:
            frames: list = []
            if isinstance(result, tuple):
                result, frames = result
            self.reply(ident, msg, result, frames)
        return True

    def serve_forever(self, handlers: dict[str, Callable[[Message], object]], notices: Notices) -> None:
        """Serve requests, and pass on to the coordinator what the actor's data
        thread posted."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(notices.wake, zmq.POLLIN)
        while True:
            events = dict(poller.poll())
            if notices.wake in events:
                for mtype, data in notices.take():
                    self.notify("coordinator", mtype, data)
            if self.sock in events:
                self.serve(handlers, 0)


class Notices:
    """Notifications that an actor's data thread hands to its control loop:
    ZeroMQ sockets stay in the thread that made them, so the data thread only
    queues the message and wakes the loop (through a socket of its own)."""

    def __init__(self, ctx: zmq.Context, name: str) -> None:
        self.ctx = ctx
        self.endpoint = f"inproc://{name}-notices"
        self.wake = ctx.socket(zmq.PULL)
        self.wake.bind(self.endpoint)
        self.lock = threading.Lock()
        self.items: list[tuple[str, dict]] = []
        self.local = threading.local()

    def post(self, mtype: str, data: dict) -> None:
        with self.lock:
            self.items.append((mtype, data))
        push = getattr(self.local, "push", None)
        if push is None:
            push = self.local.push = self.ctx.socket(zmq.PUSH)
            push.connect(self.endpoint)
        push.send(b"")

    def take(self) -> list[tuple[str, dict]]:
        while self.wake.poll(0):
            self.wake.recv()
        with self.lock:
            items, self.items = self.items, []
        return items

