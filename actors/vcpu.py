"""vCPU actor: runs its workload over shared guest RAM, paced in wall-clock
time (under a CPU throttle and a dirty-rate limit when set, machine/throttle.py),
and between two steps serves stop / cont / dirty-log harvests / state."""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import zmq

from livemig.actors.base import ActorError, HostConfig, Server, actor_main
from livemig.block import BlockError
from livemig.machine.dirtyrate import DirtyMeter
from livemig.machine.disk import Disk, DriveSpec
from livemig.machine.throttle import Pacer
from livemig.machine.userfaultfd import Userfaultfd, register_and_send
from livemig.machine.workload import Workload, WorkloadSpec
from livemig.protocol.messages import Message

# At most this long between two chances to serve a request.
SLICE_SECONDS = 0.01


class Vcpu:
    def __init__(self, cfg: HostConfig, index: int) -> None:
        guest = cfg.guest
        self.ram = cfg.map_ram()
        spec = WorkloadSpec.parse(guest.workload)
        self.workload = Workload(spec, guest.seed, index, guest.vcpus, self.ram.pages.shape[0])
        self.dirty = np.zeros(self.ram.pages.shape[0], np.bool_)
        # vCPU 0 owns the guest's drives; an incoming guest opens them inactive,
        # reading their metadata now as QEMU's incoming side does.
        self.disks: list[Disk] = []
        if index == 0:
            for d in cfg.drives:
                self.disks.append(Disk(DriveSpec(**d), inactive=bool(cfg.incoming)))
        self.uffd: Userfaultfd | None = None  # while post-copy serves our faults
        self.measure = DirtyMeter(self.ram.pages.shape[0])
        self.running = False
        self.pacer = Pacer(spec.steps_per_second)
        self.batch = max(1, int(spec.steps_per_second * SLICE_SECONDS))

    def steps_due(self, now: float) -> int:
        return self.pacer.due(now, self.batch)

    def run_due(self) -> None:
        now = time.monotonic()
        n = self.steps_due(now)
        if n > 0:
            written = self.workload.run(self.ram.pages, n, self.disks)
            self.dirty[written] = True  # marked after writing, as KVM's log does
            self.measure.mark(written)
            self.pacer.ran(n, len(written), time.monotonic())

    def idle_ms(self) -> int:
        if not self.running:
            return 1000
        now = time.monotonic()
        return max(0, math.ceil((self.pacer.next_due(now) - now) * 1000))

    # requests ---------------------------------------------------------------
    def stop(self, _msg: Message) -> dict:
        self.running = False
        for d in self.disks:
            if d.image.active:
                d.image.flush()  # as QEMU flushes every drive when the guest stops
        return {"step": self.workload.step}

    def cont(self, _msg: Message) -> dict:
        if not self.running:
            try:
                for d in self.disks:
                    if not d.image.active:
                        d.image.activate()  # refused while the other host holds the image
            except BlockError as exc:
                raise ActorError(f"cannot run the guest: {exc}") from None
            self.running = True
            self.pacer.start(time.monotonic())
        return {"step": self.workload.step}

    # brakes and measurements ------------------------------------------------------
    def throttle(self, msg: Message) -> dict:
        """Set the CPU throttle, in percent (0 ends it)."""
        try:
            self.pacer.set_throttle(int(msg.data["percentage"]), time.monotonic())
        except (KeyError, ValueError) as exc:
            raise ActorError(f"invalid throttle: {exc}") from None
        return self.pace(msg)

    def dirty_limit(self, msg: Message) -> dict:
        """Hold the page-dirtying rate at `limit` MiB/s over `period` ms windows (0 ends it)."""
        try:
            self.pacer.set_dirty_limit(float(msg.data["limit"]), msg.data.get("period", 1000) / 1000,
                                       time.monotonic())
        except (KeyError, ValueError, TypeError) as exc:
            raise ActorError(f"invalid dirty limit: {exc}") from None
        return self.pace(msg)

    def pace(self, _msg: Message) -> dict:
        return {**self.pacer.info(time.monotonic()), "step": self.workload.step}

    def measure_start(self, _msg: Message) -> dict:
        self.measure.start()
        return {}

    def measure_stop(self, _msg: Message) -> dict:
        """Distinct pages written since measure_start."""
        return {"pages": self.measure.stop()}

    def harvest(self, _msg: Message) -> tuple[dict, list]:
        """Return and clear the dirty log, as one packed bitmap frame."""
        bits = np.packbits(self.dirty, bitorder="little")
        count = int(np.count_nonzero(self.dirty))
        self.dirty[:] = False
        return {"dirty": count}, [bits.tobytes()]

    # drives ------------------------------------------------------------------
    def disk(self, name: str) -> Disk:
        for d in self.disks:
            if d.id == name:
                return d
        raise ActorError(f"Device '{name}' not found", "DeviceNotFound")

    def drives(self, msg: Message) -> list:
        out = []
        for d in self.disks:
            info = d.info()
            if msg.data.get("allocation"):
                info["allocated"] = d.allocated_chunks().tobytes()
            out.append(info)
        return out

    def harvest_blocks(self, _msg: Message) -> tuple[dict, list]:
        return {"drives": [d.id for d in self.disks]}, [d.harvest().tobytes() for d in self.disks]

    def read_chunks(self, msg: Message) -> tuple[dict, list]:
        disk = self.disk(msg.data["drive"])
        return {}, [disk.read_chunk(i) for i in msg.data["chunks"]]

    def drives_inactivate(self, _msg: Message) -> dict:
        """Flush and let go of every image (the other host may take them now)."""
        if self.running:
            raise ActorError("cannot inactivate drives while the vCPU runs")
        for d in self.disks:
            d.image.inactivate()
        return {}

    def drives_activate(self, msg: Message) -> dict:
        """Take the images back: drop every cached piece of metadata and re-read
        it, unless told to skip that (a testing aid that shows the hazard)."""
        try:
            for d in self.disks:
                if d.image.active:
                    continue
                if msg.data.get("skip_invalidate"):
                    d.image.activate_keeping_metadata()
                else:
                    d.image.activate()
        except BlockError as exc:
            raise ActorError(f"cannot activate drives: {exc}") from None
        return {}

    def postcopy_register(self, msg: Message) -> dict:
        """Post-copy starts here: register our own mapping of the RAM with a
        userfaultfd (a uffd serves only its creator's mm) and hand it to the
        receiver, which places pages and wakes us when we touch a missing one."""
        if self.uffd is not None:
            raise ActorError("this vCPU is already registered for post-copy")
        try:
            self.uffd = register_and_send(msg.data["path"], self.ram.bytes.ctypes.data, self.ram.size,
                                          msg.data["name"])
        except OSError as exc:
            raise ActorError(f"cannot register guest RAM for post-copy: {exc}") from None
        return {}

    def postcopy_end(self, _msg: Message) -> dict:
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        return {}

    def get_state(self, _msg: Message) -> dict:
        return self.workload.registers

    def set_state(self, msg: Message) -> dict:
        if self.running:
            raise ActorError("cannot load vCPU state while the vCPU runs")
        try:
            self.workload.load_registers(msg.data["registers"])
        except (KeyError, ValueError) as exc:
            raise ActorError(f"invalid vCPU state: {exc}") from None
        return self.workload.registers


def run(cfg: HostConfig, ctx: zmq.Context) -> None:
    index = int(sys.argv[2])
    vcpu = Vcpu(cfg, index)
    server = Server(ctx, cfg.endpoint(f"vcpu{index}"), f"vcpu{index}")
    handlers = {"stop": vcpu.stop, "cont": vcpu.cont, "harvest": vcpu.harvest,
                "get_state": vcpu.get_state, "set_state": vcpu.set_state,
                "drives": vcpu.drives, "harvest_blocks": vcpu.harvest_blocks,
                "read_chunks": vcpu.read_chunks, "drives_inactivate": vcpu.drives_inactivate,
                "drives_activate": vcpu.drives_activate, "throttle": vcpu.throttle,
                "dirty_limit": vcpu.dirty_limit, "pace": vcpu.pace,
                "measure_start": vcpu.measure_start, "measure_stop": vcpu.measure_stop,
                "postcopy_register": vcpu.postcopy_register, "postcopy_end": vcpu.postcopy_end,
                "ping": lambda _m: {"step": vcpu.workload.step, "running": vcpu.running}}
    while True:
        # Serve everything pending, then run the steps that are due.
        while server.serve(handlers, vcpu.idle_ms() if vcpu.running else 200):
            if vcpu.running and vcpu.steps_due(time.monotonic()) > 0:
                break
        if vcpu.running:
            vcpu.run_due()


if __name__ == "__main__":
    actor_main("vcpu", run)
