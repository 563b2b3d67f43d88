"""Block sender: block migration of the guest's drives (`blk`: whole disks;
`inc`: only what the top image allocates over a shared base), in QEMU's
`block` section format. A bulk phase walks every drive in 1 MiB chunks, then
chunks the guest dirtied are sent again, and a last pass runs with the guest
stopped. Chunks are read through vCPU 0, which owns the open images, so that
what is sent is what the guest's own block layer sees."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import zmq

from livemig.actors.base import Client, HostConfig, Server, actor_main
from livemig.machine.disk import CHUNK
from livemig.protocol import blockmig, savevm
from livemig.protocol.messages import Message

READ_BATCH = 4  # chunks per read request to the vCPU


@dataclass
class Drive:
    name: str
    size: int
    bulk: np.ndarray  # chunks still to send in the bulk phase, in order
    dirty: np.ndarray = field(default_factory=lambda: np.zeros(0, np.bool_))
    bulk_pos: int = 0

    @property
    def chunks(self) -> int:
        return (self.size + CHUNK - 1) // CHUNK


class BlockSender:
    def __init__(self, cfg: HostConfig, ctx: zmq.Context) -> None:
        self.vcpu = Client(ctx, cfg.endpoint("vcpu0"), "block_sender") if cfg.drives else None
        self.data = ctx.socket(zmq.PUSH)
        self.data.setsockopt(zmq.SNDHWM, 8)
        self.data.setsockopt(zmq.LINGER, 0)
        self.data.connect(cfg.endpoint("writer-data"))
        self.drives: list[Drive] = []
        self.marks = 0
        self.total = 0
        self.sent = 0
        self.percent = -1

    def mark(self) -> str:
        self.marks += 1
        mark = f"block:{self.marks}"
        self.data.send_multipart([b"mark", mark.encode()])
        return mark

    def emit(self, *chunks: bytes) -> None:
        self.data.send_multipart([b"bytes", *chunks], copy=False)

    def harvest(self) -> None:
        assert self.vcpu is not None
        reply = self.vcpu.call("harvest_blocks", timeout=10)
        for drive, bits in zip(self.drives, reply.frames, strict=True):
            drive.dirty |= np.frombuffer(bits, np.bool_)

    # requests ---------------------------------------------------------------
    def on_setup(self, msg: Message) -> dict:
        if self.vcpu is None:
            raise ValueError("block migration needs guest drives, and this guest has none")
        self.vcpu.call("harvest_blocks", timeout=10)  # start the dirty log afresh
        infos = self.vcpu.call("drives", {"allocation": msg.data["inc"]}, timeout=120).data["result"]
        self.drives = []
        for info in infos:
            size = info["inserted"]["virtual-size"]
            chunks = (size + CHUNK - 1) // CHUNK
            if msg.data["inc"]:
                bulk = np.flatnonzero(np.frombuffer(info["allocated"], np.bool_))
            else:
                bulk = np.arange(chunks)
            self.drives.append(Drive(info["device"], size, bulk, np.zeros(chunks, np.bool_)))
        self.total = sum(d.size for d in self.drives)
        self.sent, self.percent = 0, -1
        self.emit(savevm.section_start(savevm.SECTION_START, msg.data["section_id"], "block", 0,
                                       blockmig.VERSION),
                  blockmig.eos(), savevm.footer(msg.data["section_id"]))
        return self.status() | {"mark": self.mark()}

    def on_iterate(self, msg: Message) -> dict:
        """Send chunks worth at most `budget` bytes (0: all that is left)."""
        budget = msg.data["budget"]
        end = bool(msg.data.get("end"))
        sid = msg.data["section_id"]
        self.emit(savevm.section_part(savevm.SECTION_END if end else savevm.SECTION_PART, sid))
        self.harvest()
        sent = 0
        for drive in self.drives:
            # Bulk first, then what the guest dirtied since it was read.
            while drive.bulk_pos < len(drive.bulk) and (not budget or sent < budget):
                batch = drive.bulk[drive.bulk_pos:drive.bulk_pos + self.batch(budget, sent)]
                drive.bulk_pos += len(batch)
                drive.dirty[batch] = False
                sent += self.send_chunks(drive, batch)
                self.progress()
            if drive.bulk_pos < len(drive.bulk):
                continue
            while (not budget or sent < budget) and drive.dirty.any():
                batch = np.flatnonzero(drive.dirty)[:self.batch(budget, sent)]
                drive.dirty[batch] = False
                sent += self.send_chunks(drive, batch)
        if end:
            self.emit(blockmig.progress(100))
        self.emit(blockmig.eos(), savevm.footer(sid))
        return self.status() | {"queued": sent, "mark": self.mark()}

    @staticmethod
    def batch(budget: int, sent: int) -> int:
        """Chunks to read next: a few at a time, but no more than the budget allows."""
        if not budget:
            return READ_BATCH
        return max(1, min(READ_BATCH, -(-(budget - sent) // CHUNK)))

    def send_chunks(self, drive: Drive, chunks: np.ndarray) -> int:
        assert self.vcpu is not None
        reply = self.vcpu.call("read_chunks", {"drive": drive.name, "chunks": [int(c) for c in chunks]},
                               timeout=30)
        wire = 0
        for chunk, data in zip(chunks, reply.frames, strict=True):
            records = blockmig.chunk_records(drive.name, int(chunk), bytes(data))
            self.emit(*records)
            wire += sum(len(r) for r in records)
            self.sent += len(data)
        return wire

    def progress(self) -> None:
        percent = min(99, self.sent * 100 // max(1, self.total))
        if percent != self.percent:
            self.percent = percent
            self.emit(blockmig.progress(percent))

    def status(self) -> dict:
        bulk_left = sum(max(0, len(d.bulk) - d.bulk_pos) for d in self.drives) * CHUNK
        dirty = sum(int(d.dirty.sum()) for d in self.drives) * CHUNK
        return {"remaining": bulk_left + dirty, "bulk_done": bulk_left == 0, "total": self.total,
                "transferred": self.sent}

    def on_cleanup(self, _msg: Message) -> dict:
        self.drives = []
        return {"mark": self.mark()}


def run(cfg: HostConfig, ctx: zmq.Context) -> None:
    sender = BlockSender(cfg, ctx)
    server = Server(ctx, cfg.endpoint("block_sender"), "block_sender")
    handlers = {"setup": sender.on_setup, "iterate": sender.on_iterate, "cleanup": sender.on_cleanup,
                "ping": lambda _m: {}}
    while True:
        server.serve(handlers, None)


if __name__ == "__main__":
    actor_main("block_sender", run)
