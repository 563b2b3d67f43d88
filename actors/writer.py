"""Transport writer: owns the outgoing connection. It turns page descriptors
into QEMU page records straight from shared RAM, writes them with the other
stream bytes in order, counts bytes, reports marks, and reads the return path.

The data loop runs in its own thread so that the control loop can abort a
write that is blocked on a stalled peer.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import numpy as np
import zmq

from livemig.actors.base import ActorError, HostConfig, Notices, Server, actor_main
from livemig.actors.multifd_sender import MultifdSender
from livemig.actors.postcopy import Pusher
from livemig.machine.ram import PAGE_SHIFT, PAGE_SIZE
from livemig.protocol import ram, returnpath, savevm, xbzrle
from livemig.protocol.devices import SWITCHOVER_GO
from livemig.protocol.messages import Message
from livemig.protocol.objects import ObjectError, create
from livemig.protocol.ram import PageEncoder, PageVectors, ram_eos
from livemig.protocol.savevm import encode_idstr
from livemig.protocol.tls import Tls, client_tls, tls_info
from livemig.protocol.tlscreds import X509Creds
from livemig.protocol.transport import Channel, TransportError, connect, no_progress
from livemig.protocol.uri import Uri, parse_uri
from livemig.protocol.xbzrle import XbzrleEncoder

BATCH_PAGES = 512
# Post-copy: small sections and a small send buffer, so that an asked-for page
# waits behind little background data (QEMU 7.2 shares one channel the same way).
POSTCOPY_BATCH = 32
POSTCOPY_SNDBUF = 256 << 10


def outgoing_tls(spec: dict | None, uri: Uri) -> Tls | None:
    """The source's TLS from the coordinator's objects (their properties)."""
    if not spec:
        return None
    creds = create(spec["creds"])
    assert isinstance(creds, X509Creds)
    return client_tls(creds, uri, spec.get("hostname", ""))


class Writer:
    def __init__(self, cfg: HostConfig, ctx: zmq.Context) -> None:
        self.ram = cfg.map_ram()
        self.ram.populate(write=False)  # map what holds data now: no fault per page later
        self.ctx = ctx
        self.cfg = cfg
        self.channel: Channel | None = None
        self.multifd: MultifdSender | None = None  # its channels, with the multifd capability
        self.encoder = PageEncoder(BATCH_PAGES)
        self.written = 0
        self.multifd_written = 0  # what the last migration's multifd channels wrote, once closed
        self.saved = 0  # bytes fewer than the RAM sender counted on: what XBZRLE saved
        self.sent_pages = self.rate_pages = self.rate_age = 0
        self.rate_time = 0.0
        self.xbzrle: XbzrleEncoder | None = None
        self.error: str | None = None
        self.timeout: float | None = None  # x-transport-timeout of the open channel
        self.lock = threading.Lock()
        self.notices = Notices(ctx, "writer")
        self.pusher: Pusher | None = None
        self.postcopy_bytes = 0
        self.rp_thread: threading.Thread | None = None
        self.shut: dict | None = None  # the destination's SHUT, as the return-path thread read it
        self.shut_event = threading.Event()

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
                elif kind == b"ram-eos":
                    self.end_ram_section(parts[1:])
                elif kind in (b"postcopy", b"postcopy-resume"):
                    self.run_postcopy(parts)
                elif kind == b"mark":
                    if (multifd := self.multifd) is not None and self.error is None:
                        multifd.drain()  # everything before a mark is on the wire, multifd too
                    self.notices.post("mark", {"mark": parts[1].bytes.decode(), "bytes": self.total(),
                                               "error": self.error})
            except (OSError, TransportError) as exc:
                cause = self.destination_cause()
                with self.lock:
                    first = self.error is None
                    if first:
                        self.error = (f"the destination failed: {cause}" if cause else
                                      f"write to migration channel failed: {self.why(exc)}")
                if first:
                    self.notices.post("failed", {"desc": self.error, "bytes": self.total()})

    def why(self, exc: OSError) -> str:
        if isinstance(exc, TimeoutError) and self.timeout is not None:
            return no_progress(self.timeout)
        return str(exc.strerror or exc)

    def destination_cause(self) -> str | None:
        """After a refused write: why the destination failed, if it said so
        (X_FAILED) before it closed the connection."""
        channel = self.channel
        if channel is None or not channel.has_return_path or self.rp_thread is not None:
            return None
        try:
            channel.settimeout(0.5)
            shut = returnpath.read_shut(channel.recv)
        except (OSError, returnpath.ReturnPathError):
            return None
        return shut[1] if shut is not None and shut[0] else None

    def write(self, data) -> None:
        if self.error is not None or self.channel is None:
            return  # drop everything after a failure; the coordinator is told once
        if isinstance(data, PageVectors):
            self.written += self.channel.write_vectors(data.table)  # pages straight from guest RAM
        else:
            self.channel.write(data)
            self.written += len(data)

    def total(self) -> int:
        """Bytes written on the main channel and the multifd channels."""
        multifd = self.multifd  # read once: the control thread may close it meanwhile
        return self.written + (multifd.stats()["bytes"] if multifd is not None else self.multifd_written)

    def end_ram_section(self, frames: list) -> None:
        """RAM's end of section, after a SYNC on every multifd channel (QEMU 7.2's
        multifd_send_sync_main), then what follows it (the footer)."""
        if (multifd := self.multifd) is not None and self.error is None:
            multifd.sync()
        self.write(ram_eos() + b"".join(f.bytes for f in frames))

    def write_pages(self, parts: list) -> None:
        block = self.ram.block(parts[1].bytes.decode())
        pages = np.frombuffer(parts[3].buffer, np.uint32)
        zero = np.frombuffer(parts[4].buffer, np.bool_)
        age = int(parts[5].bytes)
        self.sent_pages += len(pages)
        if (multifd := self.multifd) is not None:
            if self.error is None:  # zero pages on the main channel, the others on the multifd ones
                multifd.send_pages(block.name, self.ram.block_pages(block), pages[~zero])
                gone = pages[zero]
                for item in self.encoder.encode(block.name, gone, self.ram.block_pages(block),
                                                np.ones(len(gone), np.bool_)):
                    self.write(item)
            return
        if self.xbzrle is not None and age:
            self.write_xbzrle(block, pages, zero, age, parts[6].bytes == b"1")
            return
        for item in self.encoder.encode(block.name, pages, self.ram.block_pages(block), zero):
            self.write(item)

    # post-copy -------------------------------------------------------------
    def run_postcopy(self, parts: list) -> None:
        """Send what the destination lacks: asked-for pages first, the rest in
        the background within max-postcopy-bandwidth, in small RAM sections."""
        params = json.loads(parts[-1].bytes)
        if parts[0].bytes == b"postcopy":
            dirty = np.unpackbits(np.frombuffer(parts[1].buffer, np.uint8), count=self.ram.pages.shape[0],
                                  bitorder="little").view(np.bool_)
            self.pusher = Pusher(dirty, self.ram.blocks)
        pusher = self.pusher
        channel = self.channel
        if channel is None or self.error is not None or pusher is None:
            return
        if channel.sock is not None and channel.sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX):
            channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, POSTCOPY_SNDBUF)
        self.start_return_path(channel)
        sid, limit = params["section_id"], params.get("bandwidth", 0)
        start, sent = time.monotonic(), 0
        while self.error is None and self.shut is None and pusher.remaining():
            # Asked-for pages go at once; the background keeps to max-postcopy-bandwidth.
            wait = start + sent / limit - time.monotonic() if limit else 0
            batch = pusher.next_batch(POSTCOPY_BATCH, background=wait <= 0)
            if batch is None:
                if wait <= 0:
                    break
                pusher.wait_request(wait)
                continue
            block, idx, _ = batch
            before = self.written
            self.encoder.new_section()
            self.write(savevm.section_part(savevm.SECTION_PART, sid))
            pages = self.ram.block_pages(block)
            for item in self.encoder.encode(block.name, idx.astype(np.uint32), pages,
                                            self.ram.zero_pages(idx + block.first_page)):
                self.write(item)
            self.write(ram_eos() + savevm.footer(sid))
            sent += self.written - before
            self.postcopy_bytes += self.written - before
        if self.error is None and not pusher.remaining():
            self.notices.post("postcopy-sent", self.postcopy_stats())

    def postcopy_stats(self) -> dict:
        p = self.pusher
        if p is None:
            return {}
        return {"postcopy-requests": p.requests, "postcopy-bytes": self.postcopy_bytes,
                "requested-pages": p.requested_pages, "background-pages": p.background_pages,
                "remaining": p.remaining() * PAGE_SIZE}

    def start_return_path(self, channel: Channel) -> None:
        if self.rp_thread is None:
            self.shut, self.shut_event = None, threading.Event()
            self.rp_thread = threading.Thread(target=self.read_return_path, args=(channel,), daemon=True)
            self.rp_thread.start()

    def read_return_path(self, channel: Channel) -> None:
        """The return path while post-copy runs: page requests go to the pusher
        at once, a received bitmap (recovery) sets what is left to send; the
        destination's SHUT ends it."""
        requests = returnpath.PageRequests({b.name: b.size for b in self.ram.blocks})
        pending = bytearray()

        def take(n: int) -> bytes:
            while len(pending) < n:
                try:
                    # Through the channel: over TLS the engine decrypts, under its lock.
                    chunk = channel.recv(65536) if channel.sock is not None else b""
                except TimeoutError:
                    continue  # a destination that needs nothing asks for nothing
                if not chunk:
                    raise savevm.StreamError("destination closed the return path")
                pending.extend(chunk)
            out = bytes(pending[:n])
            del pending[:n]
            return out

        try:
            while True:
                mtype, length = struct.unpack(">HH", take(4))
                body = take(length)
                if mtype == returnpath.RP_SHUT and length >= 4:
                    self.shut = {"shut": struct.unpack(">I", body[:4])[0], "at": time.time(),
                                 "desc": body[4:].decode(errors="replace")}
                    return
                if mtype in (returnpath.RP_REQ_PAGES, returnpath.RP_REQ_PAGES_ID) and self.pusher is not None:
                    self.pusher.request(requests.parse(mtype, body))
                elif mtype == returnpath.RP_RECV_BITMAP and self.pusher is not None:
                    block = self.ram.block(returnpath.parse_recv_bitmap_header(body))
                    left = self.pusher.set_received(block.name, returnpath.read_recv_bitmap(take, block.pages))
                    self.notices.post("recv-bitmap", {"block": block.name, "left": left})
                elif mtype == returnpath.RP_RESUME_ACK:
                    returnpath.parse_resume_ack(body)
                    self.notices.post("resume-ack", {})
        except (OSError, savevm.StreamError, KeyError) as exc:
            desc = str(exc) if isinstance(exc, savevm.StreamError) else f"return path failed: {exc}"
            self.shut = {"shut": None, "desc": desc}
            self.notices.post("return-path-failed", {"desc": desc})
        finally:
            self.shut_event.set()
            if self.pusher is not None:
                with self.pusher.cond:
                    self.pusher.cond.notify_all()

    def write_xbzrle(self, block, pages: np.ndarray, zero: np.ndarray, age: int, last_stage: bool) -> None:
        """After the first full pass: each non-zero page as QEMU's
        save_xbzrle_page decides (a delta, whole from the cache's copy, or
        nothing); zero pages as before, refreshing their cache slots."""
        enc = self.xbzrle
        assert enc is not None
        if age != self.rate_age:
            self.update_rates(age)
        block_pages = self.ram.block_pages(block)
        held = pages[~zero]
        base = block.first_page * PAGE_SIZE
        chunks: list = []
        for page, (kind, payload) in zip(held.tolist(), enc.batch(
                base + held.astype(np.int64) * PAGE_SIZE, block_pages[held], age, last_stage), strict=True):
            if kind == xbzrle.SKIP:
                continue
            flags = ram.RAM_XBZRLE if kind == xbzrle.DELTA else ram.RAM_PAGE
            name = b""
            if self.encoder.last_block != block.name:
                name = encode_idstr(block.name)
                self.encoder.last_block = block.name
                if kind == xbzrle.DELTA:
                    enc.stats.bytes += len(name)  # QEMU counts the block name in
            else:
                flags |= ram.RAM_CONTINUE
            chunks.append(struct.pack(">Q", (page << PAGE_SHIFT) | flags) + name)
            chunks.append(xbzrle.record_body(payload) if kind == xbzrle.DELTA else memoryview(payload))
        blob = b"".join(chunks)
        self.write(blob)
        self.saved += len(held) * ram.NORMAL_RECORD - len(blob)
        gone = pages[zero]
        if len(gone):
            for item in self.encoder.encode(block.name, gone, block_pages, np.ones(len(gone), np.bool_)):
                self.write(item)
            for page in gone.tolist():
                enc.zero_page(base + page * PAGE_SIZE, age)

    def update_rates(self, age: int) -> None:
        """QEMU's per-period rates, at a dirty sync at least a second after the last."""
        now = time.monotonic()
        self.rate_age = age
        if self.xbzrle is not None and now - self.rate_time >= 1.0:
            self.xbzrle.stats.update_rates(self.sent_pages - self.rate_pages)
            self.rate_time, self.rate_pages = now, self.sent_pages

    # control ---------------------------------------------------------------
    def stats(self) -> dict:
        """Bytes written; `sent`: of them those that left the host (counted per
        system call, not per batch, the socket's unsent queue subtracted);
        `saved`: what XBZRLE spared of the whole pages queued."""
        channel = self.channel
        # A channel that counts per system call is ahead of the per-batch count.
        out = self.written if channel is None else max(self.written, channel.out)
        sent = out if channel is None else max(0, out - channel.unsent())
        done = self.multifd_written  # a closed migration's multifd channels: all of it left
        live = self.multifd
        multifd = live.stats() if live is not None else {"bytes": done, "sent": done, "saved": 0}
        return {"bytes": self.written + multifd["bytes"], "sent": sent + multifd["sent"],
                "saved": self.saved + multifd["saved"], "multifd": multifd["bytes"], **self.postcopy_stats(),
                "xbzrle": self.xbzrle.stats.to_qmp() if self.xbzrle is not None else None}

    def on_connect(self, msg: Message) -> dict:
        if self.channel is not None:
            raise ActorError("migration channel already open")
        uri = parse_uri(msg.data["uri"])
        if uri.scheme == "fd":
            # An fd: URI names a descriptor the host was given at start.
            if int(uri.target) not in self.cfg.fds:
                raise ActorError(f"descriptor {uri.target} was not passed to this host (--fd)")
        timeout = self.timeout = msg.data.get("timeout", 30_000) / 1000
        multifd = None
        try:
            tls = outgoing_tls(msg.data.get("tls"), uri)
            channel = connect(uri, timeout=timeout, tls=tls)
        except (TransportError, ObjectError) as exc:
            raise ActorError(str(exc)) from None
        if msg.data.get("multifd"):
            try:  # the main channel first: the destination tells them apart by order
                multifd = MultifdSender(uri, msg.data["multifd"], tls, timeout)
            except TransportError as exc:
                channel.close()
                raise ActorError(str(exc)) from None
        # A peer that takes nothing for this long fails the migration.
        channel.settimeout(timeout)
        with self.lock:
            self.written, self.error, self.multifd_written = 0, None, 0
            if not msg.data.get("resume"):  # post-copy recovery goes on with what is left
                self.pusher, self.postcopy_bytes = None, 0
            self.rp_thread, self.shut = None, None
            self.saved = self.sent_pages = self.rate_pages = self.rate_age = 0
            self.rate_time = time.monotonic()
            size = msg.data.get("xbzrle_cache_size", 0)
            # As QEMU 7.2: with multifd, no page goes as an XBZRLE delta.
            self.xbzrle = XbzrleEncoder(size) if size and multifd is None else None
            self.channel, self.multifd = channel, multifd
        if msg.data.get("resume"):
            self.start_return_path(channel)
        return {"return_path": channel.has_return_path, "tls": tls_info(channel)}

    def on_await_return(self, msg: Message) -> dict:
        """Wait for the destination's SHUT on the return path."""
        channel = self.channel
        if channel is None or not channel.has_return_path:
            raise ActorError("no return path on this channel")
        if self.rp_thread is not None:  # post-copy: its own thread reads the return path
            if not self.shut_event.wait(msg.data.get("timeout", 30)):
                return {"shut": None, "desc": "destination did not answer on the return path in time"}
            return self.shut
        channel.settimeout(msg.data.get("timeout", 30))
        try:
            shut = returnpath.read_shut(channel.recv)
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

    def on_await_handover(self, msg: Message) -> dict:
        """After GO: the destination's X_HANDOVER (it runs, or it could not)."""
        channel = self.channel
        if channel is None:
            return {"state": None, "desc": "no migration channel"}
        channel.settimeout(msg.data.get("timeout", 10))
        return self.read_state(channel)

    @staticmethod
    def read_state(channel: Channel) -> dict:
        try:
            state = returnpath.read_handover(channel.recv)
        except TimeoutError:
            return {"state": None, "desc": "destination did not answer in time"}
        except (OSError, returnpath.ReturnPathError) as exc:
            return {"state": None, "desc": f"hand-over connection failed: {getattr(exc, 'strerror', None) or exc}"}
        if state is None:
            return {"state": None, "desc": "destination closed the connection"}
        if state != returnpath.HANDOVER_LOADED:
            try:
                channel.write(returnpath.HANDOVER_DONE)  # the outcome arrived: no more resolves
            except OSError:
                pass
        return {"state": state, "desc": ""}

    def on_resolve(self, msg: Message) -> dict:
        """The resolve exchange (docs/reliability.md): drop the old connection,
        connect to the same URI, ask the destination where the guest is, and
        to LOADED say GO (`go`) or BACK. Returns its last answer (state None:
        unreachable; "go": GO was said)."""
        with self.lock:
            old, self.channel = self.channel, None
        if old is not None:
            old.abort()
            old.close()
        uri = parse_uri(msg.data["uri"])
        timeout = msg.data.get("timeout", 2.0)
        try:
            channel = connect(uri, timeout=timeout, tls=outgoing_tls(msg.data.get("tls"), uri))
        except (TransportError, ObjectError, OSError) as exc:
            return {"state": None, "desc": str(exc)}
        try:
            channel.settimeout(timeout)
            channel.write(returnpath.RESOLVE_REQUEST)
            answer = self.read_state(channel)
            if answer["state"] == returnpath.HANDOVER_LOADED:
                go = bool(msg.data.get("go"))
                channel.write(SWITCHOVER_GO if go else returnpath.RESOLVE_BACK)
                channel.settimeout(msg.data.get("run_timeout", 10))
                answer = {**self.read_state(channel), "go": go}
            return answer
        except OSError as exc:
            return {"state": None, "desc": f"hand-over connection failed: {exc.strerror or exc}"}
        finally:
            channel.close()

    def on_close(self, msg: Message) -> dict:
        with self.lock:
            channel, self.channel = self.channel, None
            multifd, self.multifd = self.multifd, None
        if multifd is not None:
            self.multifd_written = multifd.stats()["bytes"]
            multifd.close(abort=bool(msg.data.get("abort")))
        status = 0
        if channel is not None:
            if msg.data.get("abort"):
                channel.abort()
            status = channel.close()
        if status:
            raise ActorError(f"migration command exited with status {status}")
        return {"bytes": self.written + self.multifd_written}

    def on_abort(self, _msg: Message) -> dict:
        """Unblock a stalled write; the data thread then reports the failure."""
        channel = self.channel
        if channel is not None:
            with self.lock:
                if self.error is None:
                    self.error = "migration channel aborted"
            channel.abort()
        if (multifd := self.multifd) is not None:
            multifd.abort()
        return {}


def run(cfg: HostConfig, ctx: zmq.Context) -> None:
    writer = Writer(cfg, ctx)
    server = Server(ctx, cfg.endpoint("writer"), "writer")
    threading.Thread(target=writer.data_loop, daemon=True).start()
    server.serve_forever({"connect": writer.on_connect, "close": writer.on_close, "abort": writer.on_abort,
                          "await_return": writer.on_await_return, "confirm": writer.on_confirm,
                          "await_handover": writer.on_await_handover, "resolve": writer.on_resolve,
                          "stats": lambda _m: writer.stats(), "ping": lambda _m: {}},
                         writer.notices)


if __name__ == "__main__":
    actor_main("writer", run)
