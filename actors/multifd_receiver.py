"""Multifd on the destination: after the main connection, `multifd-channels`
more from the same listener, told apart by their init packets. Each has its
own thread that lays packets' pages straight into guest RAM. At every RAM end
of section the main stream waits for one SYNC per channel, and a channel that
has sent its SYNC waits until the main stream has passed that end of section
(QEMU 7.2's multifd_recv_sync_main): so a page sent whole on a channel in one
pass and as a zero page on the main channel in the next lands in that order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

import numpy as np

from livemig.machine.ram import PAGE_SIZE
from livemig.protocol.multifd import INIT_SIZE, MultifdError, PacketReceiver, parse_init, read_exact
from livemig.protocol.savevm import StreamError
from livemig.protocol.transport import Channel, Handshake, Listener

Landed = Callable[[str, np.ndarray], None]  # block name, page indexes written with data


class Lane:
    """One incoming channel and its thread."""

    def __init__(self, cid: int, channel: Channel, method: str, blocks: Mapping[str, np.ndarray]) -> None:
        self.cid = cid
        self.channel = channel
        self.receiver = PacketReceiver(channel, method, blocks)
        self.synced = threading.Semaphore(0)  # SYNCs read that the main stream has not taken yet
        self.release = threading.Semaphore(0)  # the main stream passed the end of section
        self.stopping = False
        self.ended = False  # the source closed the channel (between packets)
        self.error: str | None = None
        self.pages_at_sync = 0  # pages announced up to its last SYNC
        self.thread: threading.Thread | None = None

    def run(self, landed: Landed, on_error: Callable[[str], None]) -> None:
        try:
            while not self.stopping:
                packet = self.receiver.receive()
                if packet is None:
                    self.ended = True
                    return
                if packet.normal:
                    landed(packet.ramblock, packet.offsets // PAGE_SIZE)
                if packet.sync:
                    self.pages_at_sync = self.receiver.announced
                    self.synced.release()
                    self.release.acquire()
        except (MultifdError, OSError) as exc:
            if not self.stopping:
                self.error = f"multifd channel {self.cid}: {exc}"
                on_error(self.error)

    def progress(self) -> int:
        return self.receiver.bytes


class MultifdIncoming:
    def __init__(self, lanes: list[Lane], timeout: float) -> None:
        self.lanes = lanes
        self.timeout = timeout
        self.syncs = 0  # RAM ends of section passed
        self.error: str | None = None

    @property
    def bytes(self) -> int:
        return sum(lane.receiver.bytes + INIT_SIZE for lane in self.lanes)

    def start(self, landed: Landed, on_error: Callable[[str], None]) -> None:
        def failed(desc: str) -> None:
            if self.error is None:
                self.error = desc
            on_error(desc)

        for lane in self.lanes:
            lane.thread = threading.Thread(target=lane.run, args=(landed, failed), daemon=True,
                                           name=f"multifd-recv-{lane.cid}")
            lane.thread.start()

    def sync(self) -> None:
        """A RAM end of section: wait for every channel's SYNC, then let them go on."""
        for lane in self.lanes:
            self.wait_sync(lane)
        self.syncs += 1
        for lane in self.lanes:
            lane.release.release()

    def wait_sync(self, lane: Lane) -> None:
        mark, deadline = lane.progress(), time.monotonic() + self.timeout
        while not lane.synced.acquire(timeout=0.05):
            if lane.error is not None:
                raise StreamError(lane.error)
            if lane.ended:
                raise StreamError(f"multifd channel {lane.cid} ended without the SYNC of RAM end of "
                                  f"section {self.syncs + 1}")
            if lane.progress() != mark:
                mark, deadline = lane.progress(), time.monotonic() + self.timeout
            elif time.monotonic() > deadline:
                raise StreamError(f"multifd channel {lane.cid}: no SYNC for RAM end of section "
                                  f"{self.syncs + 1} after {self.timeout:g} s without progress")

    def finish(self) -> None:
        """The main stream is loaded: stop the channels; one that sent pages
        after its last SYNC is refused (they would land unsynchronised). QEMU
        sends an empty packet after it, which is fine."""
        self.stop()
        if self.error is not None:
            raise StreamError(self.error)
        for lane in self.lanes:
            if lane.receiver.announced > lane.pages_at_sync:
                raise StreamError(f"multifd channel {lane.cid} sent pages after its last SYNC "
                                  f"(a SYNC is missing before the RAM end of section)")

    def stop(self) -> None:
        for lane in self.lanes:
            lane.stopping = True
            lane.release.release()
            lane.channel.abort()
        for lane in self.lanes:
            if lane.thread is not None:
                lane.thread.join(10)
            lane.channel.close()


def accept_channels(listener: Listener, config: dict, blocks: Mapping[str, np.ndarray], tls: Handshake | None,
                    timeout: float) -> MultifdIncoming:
    """The multifd channels that follow the main one, each checked by its init packet."""
    count, lanes = config["channels"], {}
    try:
        while len(lanes) < count:
            try:
                channel = listener.accept(timeout=timeout, tls=tls, handshake_timeout=timeout)
            except TimeoutError:
                raise MultifdError(f"multifd: {len(lanes)} of {count} channels connected within "
                                   f"{timeout:g} s") from None
            try:
                channel.settimeout(timeout)
                init = bytearray(INIT_SIZE)
                try:
                    read_exact(channel, memoryview(init))
                except TimeoutError:
                    raise MultifdError(f"multifd: no init packet within {timeout:g} s") from None
                cid = parse_init(bytes(init), count)
                if cid in lanes:
                    raise MultifdError(f"multifd: channel id {cid} connected twice")
            except BaseException:
                channel.close()
                raise
            channel.settimeout(None)  # a channel may idle while pages are zero; the main stream keeps time
            lanes[cid] = Lane(cid, channel, config["compression"], blocks)
    except (MultifdError, OSError) as exc:
        for lane in lanes.values():
            lane.channel.close()
        raise StreamError(str(exc)) from None
    return MultifdIncoming([lanes[i] for i in range(count)], timeout)

