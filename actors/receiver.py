"""Receiver: the incoming side. Accepts exactly one connection, validates and
loads the stream into shared RAM, collects vCPU and run state, and reports to
the coordinator, which invalidates disks and starts the guest. It answers the
source on the return path only once the coordinator says the guest resumed."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable

import zmq

from livemig.actors.base import (
    ActorError,
    Client,
    HostConfig,
    Notices,
    Server,
    actor_main,
    log,
    release_memory,
)
from livemig.actors.multifd_receiver import MultifdIncoming, accept_channels
from livemig.actors.postcopy import IncomingPages
from livemig.block import BlockError, open_image
from livemig.block.image import Image
from livemig.machine.profile import profile
from livemig.machine.ram import PAGE_SIZE
from livemig.protocol import blockmig, postcopy, returnpath, savevm
from livemig.protocol.devices import (
    DIGEST_SECTION,
    SWITCHOVER_GO,
    SWITCHOVER_SECTION,
    VCPU_SECTION,
    device_loaders,
)
from livemig.protocol.messages import Message
from livemig.protocol.objects import ObjectError, create
from livemig.protocol.ram import RamBlock, RamLoader
from livemig.protocol.tls import Tls, server_tls, tls_info
from livemig.protocol.tlscreds import Authz, X509Creds
from livemig.protocol.transport import Channel, Listener, TransportError, no_progress
from livemig.protocol.uri import parse_uri

GO_WAIT = 10.0  # s the destination waits for GO on the migration connection
POLL = 0.25  # s between looks at the operator's x-migrate-resolve while waiting
LINGER = 60.0  # s a destination answers resolves after a hand-over ended
HANDOVER_DONE = ("running", "abandoned")


def incoming_tls(spec: dict | None) -> Tls | None:
    """The destination's TLS from the coordinator's objects (their properties)."""
    if not spec:
        return None
    authz = create(spec["authz"]) if spec.get("authz") else None
    assert authz is None or isinstance(authz, Authz)
    creds = create(spec["creds"])
    assert isinstance(creds, X509Creds)
    return server_tls(creds, authz)


class ProgressDeadline:
    """x-transport-timeout as one deadline on progress, from the connection
    on (its TLS handshake included): every PROGRESS bytes the loader takes
    earn another `timeout`, so bytes that trickle in, one now and then, do
    not hold the destination."""

    PROGRESS = 64 << 10

    def __init__(self, timeout: float, progress: Callable[[], int], since: float) -> None:
        self.timeout = timeout
        self.progress = progress
        self.mark = 0
        self.deadline = since + timeout

    def left(self) -> float:
        now, done = time.monotonic(), self.progress()
        if done >= self.mark + self.PROGRESS:
            self.mark, self.deadline = done, now + self.timeout
        if now >= self.deadline:
            raise self.expired()
        return self.deadline - now

    def expired(self) -> TimeoutError:
        return TimeoutError(f"{no_progress(self.timeout)}: "
                            f"{self.progress() - self.mark} bytes since byte {self.mark}")


class Receiver:
    def __init__(self, cfg: HostConfig, ctx: zmq.Context) -> None:
        guest = cfg.guest
        self.cfg = cfg
        self.ctx = ctx
        self.ram = cfg.map_ram()
        # A RAM file without data is all zero; then zero pages need no write.
        self.fresh = self.ram.all_holes()
        if cfg.incoming:
            # Back and map the RAM here, in the process that writes it, before
            # any stream arrives: a fault per page would cap the receive rate.
            self.ram.populate(write=True)
        self.vcpus = guest.vcpus
        self.profile = profile(guest.machine)
        self.listener: Listener | None = None
        self.channel: Channel | None = None
        self.thread: threading.Thread | None = None
        self.finish = threading.Event()
        self.verdict: dict = {"rc": 1, "waits": False, "fault": ""}  # the coordinator's finish
        self.ran = threading.Event()  # the coordinator said whether the guest runs here
        self.ran_ok = False
        self.take = threading.Event()  # x-migrate-resolve ran the guest here
        self.stop_linger = threading.Event()
        self.phase = ""  # of the hand-over: waiting, go, then loaded/running/abandoned
        self.loaded: dict | None = None  # the "loaded" notice, for a coordinator that takes over
        self.listen_uri = ""
        self.handshake = False
        self.source_listens = False  # the source opened the return path
        self.notices = Notices(ctx, "receiver")
        self.injected: str | None = None
        self.timeout = 30.0
        self.postcopy_enabled = False  # capability postcopy-ram on this side (the coordinator sets it)
        self.pages: IncomingPages | None = None  # while the guest runs here and pages still arrive
        self.rp_lock = threading.Lock()  # the loader (PONG, SHUT) and the fault thread (requests) both write
        self.vcpu_clients: dict[str, Client] = {}
        self.paused_loader: savevm.StreamLoader | None = None  # post-copy paused: the stream to go on with
        self.package_start = 0  # reader offset where the PACKAGED blob began
        self.tls: Tls | None = None
        self.multifd_config: dict | None = None  # channels and compression, as migrate-incoming found them
        self.multifd: MultifdIncoming | None = None

    def notify(self, mtype: str, data: dict) -> None:
        self.notices.post(mtype, data)

    # control ---------------------------------------------------------------
    def on_listen(self, msg: Message) -> dict:
        if self.thread is not None and self.thread.is_alive() and self.phase in HANDOVER_DONE:
            self.stop_linger.set()  # a finished hand-over answering resolves: give the URI back
            self.thread.join(2 * POLL + 1)
        if self.thread is not None and self.thread.is_alive():
            raise ActorError("an incoming migration is already in progress")
        uri = parse_uri(msg.data["uri"])
        if uri.scheme == "fd" and int(uri.target) not in self.cfg.fds:
            raise ActorError(f"descriptor {uri.target} was not passed to this host (--fd)")
        try:
            self.tls = incoming_tls(msg.data.get("tls"))
            self.multifd_config = msg.data.get("multifd")
            self.listener = Listener(uri, backlog=1 + (self.multifd_config or {}).get("channels", 0))
        except (TransportError, ObjectError) as exc:
            raise ActorError(str(exc)) from None
        self.finish.clear()
        self.ran.clear()
        self.take.clear()
        self.stop_linger.clear()
        self.phase, self.ran_ok, self.loaded = "", False, None
        self.verdict = {"rc": 1, "waits": False, "fault": ""}
        self.listen_uri = self.listener.actual_uri
        self.injected = None
        self.timeout = msg.data.get("timeout", 30_000) / 1000
        self.thread = threading.Thread(target=self.incoming, daemon=True)
        self.thread.start()
        return {"uri": self.listener.actual_uri}

    def on_configure(self, msg: Message) -> dict:
        self.postcopy_enabled = bool(msg.data.get("postcopy"))
        return {}

    def on_stats(self, _msg: Message) -> dict:
        pages = self.pages
        return pages.stats() if pages is not None else {}

    def rp_write(self, channel: Channel | None, data: bytes) -> None:
        """A return-path message; dropped while post-copy is paused (what a
        vCPU waits on is asked for again on resume)."""
        with self.rp_lock:
            if channel is not None:
                channel.write(data)

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

    def read_into(self, channel: Channel, deadline: ProgressDeadline):
        def read(buf: memoryview) -> int:
            channel.settimeout(deadline.left())
            if self.injected == "slow":  # a slow destination: the source feels back-pressure
                time.sleep(0.005)
                buf = buf[:65536]
            try:
                return channel.read_into(buf)
            except TimeoutError:
                raise deadline.expired() from None
        return read

    def on_finish(self, msg: Message) -> dict:
        """The coordinator is ready (rc 0) or not (rc 1) to run the loaded guest.
        Tell the source (SHUT). A livemig source that opened the return path
        lets go (GO) before the guest runs here: the load thread then keeps the
        hand-over open (hand_over) and posts "go". Others: run after EOF, as
        QEMU does. `fault` is x-fault's reset at a hand-over point."""
        rc = int(msg.data.get("rc", 1))
        fault = msg.data.get("fault") or ""
        channel = self.channel
        waits = False
        if channel is not None:
            if fault == "after-eof":
                self.reset(channel)
            self.reply_source(channel, rc, msg.data.get("desc", ""))
            waits = rc == 0 and self.handshake and channel.has_return_path and self.source_listens
        self.verdict = {"rc": rc, "waits": waits, "fault": fault}
        self.finish.set()
        # No channel: this receiver was started afresh and never loaded the guest.
        return {"go": rc == 0 and not waits and channel is not None}

    def on_running(self, msg: Message) -> dict:
        """The coordinator ran the guest here (ok) or could not."""
        self.ran_ok = bool(msg.data.get("ok"))
        self.ran.set()
        return {}

    def on_where(self, _msg: Message) -> dict:
        """Where the incoming migration is, for a coordinator that took over
        from one that died: what it must answer (finish, running) and with what."""
        active = self.thread is not None and self.thread.is_alive()
        return {"active": active, "connected": self.channel is not None, "loaded": self.loaded,
                "finished": self.finish.is_set(), "rc": self.verdict["rc"], "phase": self.phase,
                "ran": self.ran.is_set(), "ran_ok": self.ran_ok}

    def on_take(self, _msg: Message) -> dict:
        """x-migrate-resolve: the operator runs here a guest whose source cannot be reached."""
        if self.phase != "waiting":
            raise ActorError("no hand-over waits for the source here")
        self.take.set()
        return {}

    def on_answer(self, msg: Message) -> dict:
        """A receiver started afresh during a hand-over its predecessor held:
        answer resolves with the coordinator's outcome (running, abandoned)."""
        if self.thread is not None and self.thread.is_alive():
            raise ActorError("an incoming migration is already in progress")
        self.listen_uri, self.phase = msg.data["uri"], returnpath.HANDOVER_STATES[msg.data["state"]]
        self.stop_linger.clear()
        self.thread = threading.Thread(target=self.linger, args=(msg.data["state"],), daemon=True)
        self.thread.start()
        return {}

    @staticmethod
    def reset(channel: Channel) -> None:
        """Close with a RST: what a lost connection looks like to the peer."""
        if channel.closed:
            return
        if channel.sock is not None:
            channel.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        channel.close()

    def hand_over(self, channel: Channel) -> None:
        """The end of a loaded stream: wait for the source's GO (on this
        connection, else on a resolve connection), have the coordinator run the
        guest, tell the source; then answer resolves with the outcome."""
        verdict = self.verdict
        state = returnpath.HANDOVER_ABANDONED
        current: Channel | None = channel
        if verdict["rc"] == 0:
            if verdict["waits"]:
                self.phase = "waiting"
                if verdict["fault"] == "after-shut":
                    self.reset(channel)
                if channel.closed or not self.await_go(channel):
                    self.reset(channel)
                    current, go = self.await_resolve()
                    if not go:  # the source took the guest back
                        self.phase = "abandoned"
                        self.notify("abandoned", {"desc": "the source took the guest back"})
                        self.ran_ok = False
                        self.ran.set()
                if self.phase != "abandoned":
                    self.phase = "go"
                    self.notify("go", {})
            if not self.ran.wait(60):
                log.warning("hand-over: the coordinator did not say whether the guest runs")
            state = returnpath.HANDOVER_RUNNING if self.ran_ok or not self.ran.is_set() else state
        done = False
        if current is not None and not current.closed:
            if verdict["fault"] == "after-go":
                self.reset(current)
            elif verdict["waits"] or current is not channel:
                done = self.tell(current, state)
        if current is not None and current is not channel:
            current.close()
        self.close_channel()
        self.phase = returnpath.HANDOVER_STATES[state]
        if not done and (self.handshake or state == returnpath.HANDOVER_ABANDONED):
            self.linger(state)  # only a livemig source asks

    def tell(self, channel: Channel, state: int) -> bool:
        """The outcome to the source; True once it said it has it (DONE)."""
        try:
            self.rp_write(channel, returnpath.handover(state))
            channel.settimeout(2)
            return channel.recv(len(returnpath.HANDOVER_DONE)) == returnpath.HANDOVER_DONE
        except OSError:
            return False

    def await_go(self, channel: Channel) -> bool:
        """GO on the migration connection within GO_WAIT s; False if it broke
        off, or the operator took the guest (then self.take is set)."""
        if channel.sock is None:
            return False
        deadline = time.monotonic() + GO_WAIT
        got = b""
        try:
            channel.settimeout(POLL)
            while len(got) < len(SWITCHOVER_GO) and time.monotonic() < deadline and not self.take.is_set():
                try:
                    chunk = channel.recv(len(SWITCHOVER_GO) - len(got))
                except TimeoutError:
                    continue
                if not chunk:
                    return False
                got += chunk
        except OSError:
            return False
        return got == SWITCHOVER_GO or self.take.is_set()

    def reopen(self) -> Listener | None:
        """A listener on the migration's own URI again (socket URIs only)."""
        uri = parse_uri(self.listen_uri) if self.listen_uri else None
        if uri is None or uri.scheme not in ("tcp", "unix"):
            return None
        try:
            return Listener(uri)
        except TransportError as exc:
            log.warning("hand-over: cannot listen again: %s", exc)
            return None

    def resolve_accept(self, listener: Listener) -> Channel | None:
        """One resolve connection (its request read), or None."""
        try:
            channel = listener.accept(timeout=POLL, tls=self.tls, handshake_timeout=5)
        except (TimeoutError, OSError, TransportError):
            return None
        try:
            channel.settimeout(5)
            got = b""
            while len(got) < len(returnpath.RESOLVE_REQUEST):
                chunk = channel.recv(len(returnpath.RESOLVE_REQUEST) - len(got))
                if not chunk:
                    break
                got += chunk
            if got == returnpath.RESOLVE_REQUEST:
                return channel
        except OSError:
            pass
        channel.close()
        return None

    def await_resolve(self) -> tuple[Channel | None, bool]:
        """Listen on the migration's URI until a source asks and says GO or
        BACK (the connection to answer on, and whether GO), or the operator
        takes the guest (None, True)."""
        listener = None
        try:
            while not self.take.is_set():
                listener = listener or self.reopen()
                if listener is None:
                    self.take.wait(POLL)
                    continue
                channel = self.resolve_accept(listener)
                if channel is None:
                    continue
                try:
                    self.rp_write(channel, returnpath.handover(returnpath.HANDOVER_LOADED))
                    channel.settimeout(5)
                    word = channel.recv(len(SWITCHOVER_GO))
                    if word in (SWITCHOVER_GO, returnpath.RESOLVE_BACK):
                        return channel, word == SWITCHOVER_GO
                except OSError:
                    pass
                channel.close()
            return None, True
        finally:
            if listener is not None:
                listener.close()

    def linger(self, state: int) -> None:
        """Answer resolve connections with the outcome for LINGER s, or until
        the next listen: a source that lost the last answer learns it."""
        listener = self.reopen()
        deadline = time.monotonic() + LINGER
        try:
            while listener is not None and time.monotonic() < deadline and not self.stop_linger.is_set():
                channel = self.resolve_accept(listener)
                if channel is not None:
                    done = self.tell(channel, state)
                    channel.close()
                    if done:
                        return
        finally:
            if listener is not None:
                listener.close()

    # data thread -----------------------------------------------------------
    def incoming(self) -> None:
        """The data thread: whatever goes wrong in it ends as a failed
        migration with its cause, so the host takes a new migrate-incoming."""
        try:
            self.load_incoming()
        except Exception as exc:  # a bug or a resource (MemoryError, ...): never a wedged receiver
            log.exception("incoming migration")
            try:
                self.close_channel(abort=True)
            finally:
                self.notify("failed", {"desc": f"incoming migration failed: {type(exc).__name__}: {exc}",
                                       "bytes": 0})
        finally:
            # Each failed stream's buffers otherwise stay: memory would grow with
            # the migrations refused.
            release_memory()

    def load_incoming(self) -> None:
        assert self.listener is not None
        listener = self.listener
        def refused(why: str) -> None:
            self.notify("refused", {"desc": why})

        try:
            channel = listener.accept(tls=self.tls, handshake_timeout=self.timeout, on_refused=refused)
        except (OSError, TransportError) as exc:
            listener.close()
            self.notify("failed", {"desc": f"incoming connection failed: {exc}"})
            return
        self.channel = channel
        if self.multifd_config and not self.accept_multifd(listener, channel):
            return
        if listener.sock is not None:
            # Exactly one migration per listen: refuse any later connection.
            listener.close()
        channel.settimeout(self.timeout)  # a source that stops sending fails the migration
        self.notify("started", {"tls": tls_info(channel)})
        t0 = time.monotonic()
        states: dict[str, dict[int, object]] = {}
        wanted = [*((VCPU_SECTION, SWITCHOVER_SECTION, DIGEST_SECTION) if self.profile.has_vcpus else ()),
                  *self.profile.devices]
        loaders = device_loaders(wanted, self.vcpus, states)
        blocks = [RamBlock(b.name, self.ram.block_pages(b)) for b in self.ram.blocks]
        images: dict[str, Image] = {}
        block_loader = blockmig.BlockLoader(lambda name: self.block_target(name, images))
        self.source_listens = False

        def listens() -> None:
            self.source_listens = True

        def pong(value: int) -> None:
            self.rp_write(self.channel, returnpath.pong(value))

        pc = postcopy.IncomingPostcopy({b.name: b.size for b in self.ram.blocks}, self.postcopy_enabled)

        def command(cmd: int, data: bytes, r: savevm.BufferedReader) -> None:
            self.postcopy_command(pc, cmd, data, r, loader, channel, states)

        ram_loader = RamLoader(blocks, zeroed=self.fresh)
        if self.multifd is not None:
            ram_loader.on_eos = self.multifd.sync
            self.multifd.start(ram_loader.landed, lambda _desc: self.stop_main_reads(channel))
        loader = savevm.StreamLoader(
            ram_loader, loaders, machine=self.cfg.guest.machine,
            live={"block": block_loader}, on_return_path=listens,
            on_ping=pong if channel.has_return_path else None, on_command=command)
        self.fresh = False  # whatever happens to this stream, the RAM is no longer known zero
        multifd = self.multifd  # pages on its channels are progress too: the main stream may idle
        deadline = ProgressDeadline(self.timeout, lambda: reader.consumed + (multifd.bytes if multifd else 0),
                                    channel.opened)
        reader = savevm.BufferedReader(self.read_into(channel, deadline))
        try:
            result = loader.load(reader, read_trailer=not channel.has_return_path)
            if pc.in_package:
                raise savevm.StreamError("stream ended inside a PACKAGED blob")
            if pc.state is postcopy.State.RUNNING:
                self.finish_postcopy(channel, reader.consumed)
                return
            if channel.has_return_path:
                channel.settimeout(5)
                try:
                    result.vmdesc = loader.trailer(reader)
                finally:
                    channel.settimeout(None)
            if self.injected in ("fail", "reset"):
                raise savevm.StreamError(f"injected fault: {self.injected}")
            if self.multifd is not None:
                self.multifd.finish()
            if (gap := ram_loader.never_arrived()) is not None:
                # e.g. a multifd source whose channels this side never read
                raise savevm.StreamError(f"ram block {gap[0]}: {gap[1]} pages never arrived")
            vcpu_states = states.get(VCPU_SECTION, {})
            missing = sorted(set(range(self.vcpus)) - set(vcpu_states))
            if self.profile.has_vcpus and missing:
                raise savevm.StreamError(f"stream has no state for vCPUs {missing}")
            runstate = states.get("globalstate", {}).get(0)
            disk = {"transferred": block_loader.bytes, "remaining": 0,
                    "total": sum(img.size for img in images.values())} if images else None
            self.close_images(images)
        except Exception as exc:
            desc = str(exc) if isinstance(exc, savevm.StreamError) else f"incoming stream failed: {exc}"
            if not isinstance(exc, (savevm.StreamError, OSError, BlockError, ActorError)):
                log.exception("loading the incoming stream")
                desc = f"incoming stream failed: {type(exc).__name__}: {exc}"
            if self.multifd is not None and self.multifd.error:
                desc = self.multifd.error  # the main stream was stopped because of it
            try:
                self.close_images(images)
            except (OSError, BlockError) as cleanup:  # a full disk fails its flush too
                desc += f" (and closing the images: {cleanup})"
            if self.injected in ("fail", "reset"):
                desc = f"injected fault: {self.injected} ({desc})"
            if pc.state is postcopy.State.RUNNING:
                self.pause_postcopy(loader, desc, reader.consumed)
                return
            self.end_postcopy()
            self.reply_source(channel, 1, desc)
            self.close_channel(abort=True)
            self.phase = "abandoned"
            self.notify("failed", {"desc": desc, "bytes": reader.consumed})
            self.linger(returnpath.HANDOVER_ABANDONED)  # a source unsure whether we got EOF asks
            return
        stats = loader.ram.stats if loader.ram else None
        # Before "loaded": the coordinator's finish may come back at once, and
        # must know whether the source will send its go-ahead.
        self.handshake = SWITCHOVER_SECTION in states
        self.loaded = {
            "vcpus": [vcpu_states[i] for i in sorted(vcpu_states)],
            "runstate": runstate,
            "devices": {name: st.get(0) for name, st in states.items()
                        if name not in (VCPU_SECTION, SWITCHOVER_SECTION, "globalstate")},
            "machine": result.machine, "bytes": result.bytes,
            "return_path": channel.has_return_path, "disk": disk,
            "multifd": self.multifd.bytes if self.multifd is not None else 0,
            "normal": stats.normal if stats else 0, "zero": stats.zero if stats else 0,
            "seconds": time.monotonic() - t0}
        self.notify("loaded", self.loaded)
        self.finish.wait(300)
        self.hand_over(channel)

    # post-copy ---------------------------------------------------------------
    def postcopy_command(self, pc: postcopy.IncomingPostcopy, cmd: int, data: bytes, r: savevm.BufferedReader,
                         loader: savevm.StreamLoader, channel: Channel, states: dict) -> None:
        handler = pc.handler(cmd)
        if handler is None:
            raise savevm.StreamError(f"unsupported stream command {cmd} ({savevm.COMMAND_NAMES[cmd]})")
        result = handler(data)
        if cmd == postcopy.CMD_ADVISE and result is not None:
            # As QEMU: every page is a hole until it is received, so that a
            # page a vCPU touches is either there or faults.
            self.ram.discard(0, self.ram.pages.shape[0])
            if loader.ram is not None:
                loader.ram.known_zero = None  # zero pages must be written: a hole means "not received"
        elif cmd == postcopy.CMD_RAM_DISCARD:
            block = self.ram.block(result.block)
            for start, length in result.ranges:
                self.ram.discard(block.first_page + start // PAGE_SIZE, length // PAGE_SIZE)
        elif cmd == postcopy.CMD_PACKAGED:
            self.package_start = r.consumed
        elif cmd == postcopy.CMD_LISTEN:
            self.start_postcopy(channel)
            assert self.pages is not None
            loader.live["ram"] = postcopy.PostcopyRamLoader(
                {b.name: b.pages for b in self.ram.blocks}, self.pages.place, self.pages.place_zero)
        elif cmd == postcopy.CMD_RUN:
            if pc.in_package:
                pc.end_package(r.consumed - self.package_start)
            self.notify("postcopy-run", self.guest_states(states))
        elif cmd == postcopy.CMD_RECV_BITMAP and self.pages is not None:
            self.rp_write(self.channel, returnpath.recv_bitmap_reply(result, self.pages.received_bitmap(result)))
        elif cmd == postcopy.CMD_RESUME and self.pages is not None:
            self.rp_write(self.channel, returnpath.resume_ack())
            asked = self.pages.re_request()
            self.notify("postcopy-resumed", {"re-requested": asked})
        else:
            raise savevm.StreamError(f"{savevm.COMMAND_NAMES[cmd]} outside a post-copy recovery")

    def start_postcopy(self, channel: Channel) -> None:
        """LISTEN: the vCPUs register their mappings; faults are served from now on."""
        if not channel.has_return_path or not self.source_listens:
            raise savevm.StreamError("post-copy needs a return path, and the source opened none")
        path = os.path.join(self.cfg.rundir, "uffd.sock")
        pages = IncomingPages(self.ram, path, lambda msg: self.rp_write(self.channel, msg))
        self.pages = pages
        clients = {f"vcpu{i}": Client(self.ctx, self.cfg.endpoint(f"vcpu{i}"), "receiver")
                   for i in range(self.vcpus)}
        self.vcpu_clients = clients

        def register(name: str, at: str) -> None:
            clients[name].call("postcopy_register", {"path": at, "name": name}, timeout=10)

        pages.collect(list(clients), register)
        pages.start()

    def pause_postcopy(self, loader: savevm.StreamLoader, desc: str, consumed: int) -> None:
        """The link broke after RUN: the guest runs here on a memory split
        between the hosts and waits on its missing pages; nothing is lost while
        both hosts live. migrate-recover takes a new connection."""
        self.close_channel()
        self.paused_loader = loader
        self.notify("postcopy-paused", {"desc": desc, "bytes": consumed})

    def on_recover(self, msg: Message) -> dict:
        if self.paused_loader is None or (self.thread is not None and self.thread.is_alive()):
            raise ActorError("migrate-recover needs a post-copy migration in postcopy-paused")
        try:
            listener = Listener(parse_uri(msg.data["uri"]))
        except TransportError as exc:
            raise ActorError(str(exc)) from None
        self.thread = threading.Thread(target=self.recover, args=(listener, self.paused_loader), daemon=True)
        self.paused_loader = None
        self.thread.start()
        return {"uri": listener.actual_uri}

    def recover(self, listener: Listener, loader: savevm.StreamLoader) -> None:
        """The resumed source's stream: RECV_BITMAP per block, POSTCOPY_RESUME, pages, EOF."""
        try:
            channel = listener.accept()
        except (OSError, TransportError) as exc:
            listener.close()
            self.pause_postcopy(loader, f"recovery connection failed: {exc}", 0)
            return
        listener.close()
        self.channel = channel
        channel.settimeout(self.timeout)
        self.notify("recover-started", {})
        deadline = ProgressDeadline(self.timeout, lambda: reader.consumed, channel.opened)
        reader = savevm.BufferedReader(self.read_into(channel, deadline))
        try:
            loader.resume(reader)
        except Exception as exc:  # the link broke again: paused again
            self.pause_postcopy(loader, f"incoming stream failed: {exc}", reader.consumed)
            return
        self.finish_postcopy(channel, reader.consumed)

    def guest_states(self, states: dict) -> dict:
        vcpu_states = states.get(VCPU_SECTION, {})
        missing = sorted(set(range(self.vcpus)) - set(vcpu_states))
        if self.profile.has_vcpus and missing:
            raise savevm.StreamError(f"stream has no state for vCPUs {missing}")
        return {"vcpus": [vcpu_states[i] for i in sorted(vcpu_states)],
                "runstate": states.get("globalstate", {}).get(0),
                "devices": {name: st.get(0) for name, st in states.items()
                            if name not in (VCPU_SECTION, SWITCHOVER_SECTION, "globalstate")}}

    def finish_postcopy(self, channel: Channel, consumed: int) -> None:
        """EOF after RUN: every page is here. Tell the source (SHUT 0) and let go."""
        assert self.pages is not None
        stats = self.pages.stats()
        error = self.pages.error
        self.reply_source(channel, 0 if not error and not stats["missing"] else 1,
                          error or (f"{stats['missing']} pages never arrived" if stats["missing"] else ""))
        stats["bytes"] = consumed
        if error:
            stats["error"] = error
        self.end_postcopy()
        self.close_channel()
        self.notify("postcopy-done", stats)

    def end_postcopy(self) -> None:
        pages, self.pages = self.pages, None
        clients, self.vcpu_clients = self.vcpu_clients, {}
        for client in clients.values():
            try:
                client.call("postcopy_end", timeout=5)
            except ActorError as exc:
                log.warning("post-copy end: %s", exc)
            client.close()
        if pages is not None:
            pages.close()

    def block_target(self, name: str, images: dict[str, Image]) -> blockmig.BlockTarget | None:
        """Block migration writes a drive through an image the receiver opens
        active for the length of the stream; vCPU 0's inactive open re-reads
        the metadata when it is activated afterwards."""
        if name not in images:
            spec = next((d for d in self.cfg.drives if d["id"] == name), None)
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
            # A failure is said first in a message of its own: a source still
            # sending reads it when the close refuses its write.
            self.rp_write(channel, (returnpath.failed(desc) if rc else b"") + returnpath.shut(rc, desc))
        except OSError:
            pass

    def accept_multifd(self, listener: Listener, channel: Channel) -> bool:
        """The multifd channels after the main one; False (reported) if they fail."""
        assert self.multifd_config is not None
        try:
            blocks = {b.name: self.ram.block_pages(b) for b in self.ram.blocks}
            self.multifd = accept_channels(listener, self.multifd_config, blocks, self.tls, self.timeout)
        except savevm.StreamError as exc:
            listener.close()
            self.reply_source(channel, 1, str(exc))
            self.close_channel()
            self.notify("failed", {"desc": str(exc), "bytes": 0})
            return False
        return True

    @staticmethod
    def stop_main_reads(channel: Channel) -> None:
        """A multifd channel failed: the main stream's loader stops at its next
        read (the return path still carries the refusal)."""
        if channel.sock is not None:
            try:
                channel.sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def close_channel(self, abort: bool = False) -> None:
        """abort: after a failure, an exec: command is stopped, not waited for."""
        multifd, self.multifd = self.multifd, None
        if multifd is not None:
            multifd.stop()
        channel, self.channel = self.channel, None
        if channel is not None:
            if abort and channel.proc is not None:
                channel.abort()
            channel.close()


def run(cfg: HostConfig, ctx: zmq.Context) -> None:
    receiver = Receiver(cfg, ctx)
    server = Server(ctx, cfg.endpoint("receiver"), "receiver")
    server.serve_forever({"configure": receiver.on_configure, "stats": receiver.on_stats,
                          "recover": receiver.on_recover,
                          "listen": receiver.on_listen, "finish": receiver.on_finish,
                          "running": receiver.on_running, "take": receiver.on_take, "answer": receiver.on_answer,
                          "where": receiver.on_where,
                          "inject": receiver.on_inject, "ping": lambda _m: {}}, receiver.notices)


if __name__ == "__main__":
    actor_main("receiver", run)
