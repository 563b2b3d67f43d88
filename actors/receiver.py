"""Receiver: the incoming side. Accepts exactly one connection, validates and
loads the stream into shared RAM, collects vCPU and run state, and reports to
the coordinator, which invalidates disks and starts the guest. It answers the
source on the return path only once the coordinator says the guest resumed."""

from __future__ import annotations

import socket
import struct
import threading
import time

import zmq

from livemig.actors.base import ActorError, HostConfig, Notices, Server, actor_main
from livemig.block import BlockError, open_image
from livemig.block.image import Image
from livemig.machine.profile import profile
from livemig.machine.ram import GuestRam
from livemig.protocol import blockmig, returnpath, savevm
from livemig.protocol.devices import (
    DEVICES,
    DIGEST_SECTION,
    SWITCHOVER_GO,
    SWITCHOVER_SECTION,
    VCPU_SECTION,
    Device,
)
from livemig.protocol.messages import Message
from livemig.protocol.ram import RamBlock, RamLoader
from livemig.protocol.transport import Channel, Listener, TransportError, parse_uri


class Receiver:
    def __init__(self, cfg: HostConfig, ctx: zmq.Context) -> None:
        guest = cfg["guest"]
        self.cfg = cfg
        self.ctx = ctx
        self.ram = GuestRam(cfg["ram_path"], [tuple(b) for b in guest["blocks"]])
        # A RAM file without data is all zero; then zero pages need no write.
        self.fresh = self.ram.all_holes()
        if cfg["incoming"]:
            # Back and map the RAM here, in the process that writes it, before
            # any stream arrives: a fault per page would cap the receive rate.
            self.ram.populate(write=True)
        self.vcpus = guest["vcpus"]
        self.profile = profile(guest["machine"])
        self.listener: Listener | None = None
        self.channel: Channel | None = None
        self.thread: threading.Thread | None = None
        self.finish = threading.Event()
        self.handshake = False
        self.source_listens = False  # the source opened the return path
        self.notices = Notices(ctx, "receiver")
        self.injected: str | None = None
        self.timeout = 30.0

    def notify(self, mtype: str, data: dict) -> None:
        self.notices.post(mtype, data)

    # control ---------------------------------------------------------------
    def on_listen(self, msg: Message) -> dict:
        if self.thread is not None and self.thread.is_alive():
            raise ActorError("an incoming migration is already in progress")
        uri = parse_uri(msg.data["uri"])
        if uri.scheme == "fd" and int(uri.target) not in self.cfg["fds"]:
            raise ActorError(f"descriptor {uri.target} was not passed to this host (--fd)")
        try:
            self.listener = Listener(uri)
        except TransportError as exc:
            raise ActorError(str(exc)) from None
        self.finish.clear()
        self.injected = None
        self.timeout = msg.data.get("timeout", 30_000) / 1000
        self.thread = threading.Thread(target=self.incoming, daemon=True)
        self.thread.start()
        return {"uri": self.listener.actual_uri}

    def on_inject(self, msg: Message) -> dict:
        """Testing aid (x-fault on the destination): break the incoming stream."""
        action = msg.data["action"]
        channel = self.channel
        self.injected = action
        if channel is None:
            raise ActorError("no incoming migration to inject a fault into")
        if action == "fail":
            channel.abort()
        elif action == "reset" and channel.sock is not None:
            channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            channel.sock.shutdown(socket.SHUT_RD)  # the loader stops; closing then sends a RST
        elif action != "slow":
            raise ActorError(f"cannot inject {action!r} into the receiver")
        return {}

    def read_into(self, channel: Channel):
        def read(buf: memoryview) -> int:
            if self.injected == "slow":  # a slow destination: the source feels back-pressure
                time.sleep(0.005)
                return channel.read_into(buf[:65536])
            return channel.read_into(buf)
        return read

    def on_finish(self, msg: Message) -> dict:
        """The coordinator is ready (rc 0) or not (rc 1) to run the loaded guest.
        Tell the source; when it is a livemig source (the switchover section was
        in the stream), resume only on its go-ahead, so that the two hosts never
        both run the guest: the source resumes on any failure unless it sent it."""
        rc = int(msg.data.get("rc", 1))
        channel = self.channel
        go = False
        try:
            if channel is not None:
                self.reply_source(channel, rc, msg.data.get("desc", ""))
                if rc == 0:
                    go = not (self.handshake and channel.has_return_path) or self.await_go(channel)
        finally:
            self.finish.set()
        return {"go": go}

    def await_go(self, channel: Channel) -> bool:
        if channel.sock is None:
            return False
        channel.settimeout(10)
        try:
            got = b""
            while len(got) < len(SWITCHOVER_GO):
                chunk = channel.sock.recv(len(SWITCHOVER_GO) - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == SWITCHOVER_GO
        except OSError:
            return False

    # data thread -----------------------------------------------------------
    def incoming(self) -> None:
        assert self.listener is not None
        listener = self.listener
        try:
            channel = listener.accept()
        except (OSError, TransportError) as exc:
            listener.close()
            self.notify("failed", {"desc": f"incoming connection failed: {exc}"})
            return
        if listener.sock is not None:
            # Exactly one migration per listen: refuse any later connection.
            listener.close()
        self.channel = channel
        channel.settimeout(self.timeout)  # a source that stops sending fails the migration
        self.notify("started", {})
        t0 = time.monotonic()
        states: dict[str, dict[int, object]] = {}

        def loader_for(device: Device):
            def load(r: savevm.BufferedReader, instance: int, version: int) -> None:
                if device.idstr == VCPU_SECTION and instance >= self.vcpus:
                    raise savevm.StreamError(
                        f"vCPU {instance} in the stream but this guest has {self.vcpus} vCPUs")
                states.setdefault(device.idstr, {})[instance] = device.load(r, version)
            return load

        wanted = [*((VCPU_SECTION, SWITCHOVER_SECTION, DIGEST_SECTION) if self.profile.has_vcpus else ()),
                  *self.profile.devices]
        loaders = {name: loader_for(DEVICES[name]) for name in wanted}
        blocks = [RamBlock(b.name, self.ram.block_pages(b)) for b in self.ram.blocks]
        images: dict[str, Image] = {}
        block_loader = blockmig.BlockLoader(lambda name: self.block_target(name, images))
        self.source_listens = False

        def listens() -> None:
            self.source_listens = True

        def pong(value: int) -> None:
            channel.write(returnpath.pong(value))

        loader = savevm.StreamLoader(
            RamLoader(blocks, zeroed=self.fresh), loaders, machine=self.cfg["guest"]["machine"],
            live={"block": block_loader}, on_return_path=listens,
            on_ping=pong if channel.has_return_path else None)
        self.fresh = False  # whatever happens to this stream, the RAM is no longer known zero
        reader = savevm.BufferedReader(self.read_into(channel))
        try:
            result = loader.load(reader, read_trailer=not channel.has_return_path)
            if channel.has_return_path:
                channel.settimeout(5)
                try:
                    result.vmdesc = loader.trailer(reader)
                finally:
                    channel.settimeout(None)
            if self.injected in ("fail", "reset"):
                raise savevm.StreamError(f"injected fault: {self.injected}")
            vcpu_states = states.get(VCPU_SECTION, {})
            missing = sorted(set(range(self.vcpus)) - set(vcpu_states))
            if self.profile.has_vcpus and missing:
                raise savevm.StreamError(f"stream has no state for vCPUs {missing}")
            runstate = states.get("globalstate", {}).get(0)
            disk = {"transferred": block_loader.bytes, "remaining": 0,
                    "total": sum(img.size for img in images.values())} if images else None
            self.close_images(images)
        except (savevm.StreamError, OSError, BlockError) as exc:
            self.close_images(images)
            desc = str(exc) if isinstance(exc, savevm.StreamError) else f"incoming stream failed: {exc}"
            if self.injected in ("fail", "reset"):
                desc = f"injected fault: {self.injected} ({desc})"
            self.reply_source(channel, 1, desc)
            self.close_channel()
            self.notify("failed", {"desc": desc, "bytes": reader.consumed})
            return
        stats = loader.ram.stats if loader.ram else None
        # Before "loaded": the coordinator's finish may come back at once, and
        # must know whether the source will send its go-ahead.
        self.handshake = SWITCHOVER_SECTION in states
        self.notify("loaded", {
            "vcpus": [vcpu_states[i] for i in sorted(vcpu_states)],
            "runstate": runstate,
            "devices": {name: st.get(0) for name, st in states.items()
                        if name not in (VCPU_SECTION, SWITCHOVER_SECTION, "globalstate")},
            "machine": result.machine, "bytes": result.bytes,
            "return_path": channel.has_return_path, "disk": disk,
            "normal": stats.normal if stats else 0, "zero": stats.zero if stats else 0,
            "seconds": time.monotonic() - t0})
        self.finish.wait(300)
        self.close_channel()

    def block_target(self, name: str, images: dict[str, Image]) -> blockmig.BlockTarget | None:
        """Block migration writes a drive through an image the receiver opens
        active for the length of the stream; vCPU 0's inactive open re-reads
        the metadata when it is activated afterwards."""
        if name not in images:
            spec = next((d for d in self.cfg["drives"] if d["id"] == name), None)
            if spec is None:
                return None
            try:
                images[name] = open_image(spec["file"], spec["format"])
            except BlockError as exc:
                raise savevm.StreamError(f"cannot open drive {name!r} for block migration: {exc}") from None
        img = images[name]
        return blockmig.BlockTarget(img.size, img.write, img.write_zeroes)

    @staticmethod
    def close_images(images: dict[str, Image]) -> None:
        for img in images.values():
            if not img.closed:
                img.close()

    def reply_source(self, channel: Channel, rc: int, desc: str) -> None:
        # Only a source that sent OPEN_RETURN_PATH reads answers (QEMU's is off by default).
        if not channel.has_return_path or not self.source_listens:
            return
        try:
            channel.write(returnpath.shut(rc, desc))
        except OSError:
            pass

    def close_channel(self) -> None:
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.close()


def run(cfg: HostConfig, ctx: zmq.Context) -> None:
    receiver = Receiver(cfg, ctx)
    server = Server(ctx, cfg.endpoint("receiver"), "receiver")
    server.serve_forever({"listen": receiver.on_listen, "finish": receiver.on_finish,
                          "inject": receiver.on_inject, "ping": lambda _m: {}}, receiver.notices)


if __name__ == "__main__":
    actor_main("receiver", run)
