"""Post-copy in the rig: a migration with `postcopy_after = S` switches S
seconds into pre-copy (migrate-start-postcopy); with `recover = true` a
broken link (`link_down_after`, counted from postcopy-active) is brought up
again once both hosts are postcopy-paused, and migrate-recover on the
destination with `migrate resume=true` on the source resumes it. The result
row gets the source's post-copy figures and the destination's (QEMU's
postcopy-blocktime names, livemig's x-postcopy fault latency and page counts)."""

from __future__ import annotations

import time
from collections.abc import Callable

from livemig.tools.launch import HostProcess

# Capabilities the destination needs as well (QEMU refuses postcopy-ram set on
# one side only; the blocktime is measured where the vCPUs fault).
BOTH_SIDES = ("postcopy-ram", "postcopy-blocktime")
# Parameters the destination's own reads obey (a dead link is noticed there too).
DESTINATION_PARAMETERS = ("x-transport-timeout",)


def wanted(caps: dict) -> bool:
    return bool(caps.get("postcopy-ram"))


def prepare(dst: HostProcess, caps: dict, params: dict, uri: str) -> None:
    """The destination (started with `--incoming defer`) gets its share of the
    capabilities and parameters, then listens on `uri`."""
    both = [{"capability": k, "state": v} for k, v in caps.items() if k in BOTH_SIDES]
    if both:
        dst.cmd("migrate-set-capabilities", capabilities=both)
    mine = {k: v for k, v in params.items() if k in DESTINATION_PARAMETERS}
    if mine:
        dst.cmd("migrate-set-parameters", **mine)
    dst.cmd("migrate-incoming", uri=uri)


def steps(host: HostProcess) -> int:
    return sum(v["step"] for v in host.cmd("x-query-vcpus"))


class Switch:
    """Per poll of a post-copy migration: start it, cut the link, recover,
    and record that the destination guest ran while the source was still
    postcopy-active."""

    def __init__(self, src: HostProcess, dst: HostProcess, migration: dict,
                 set_link: Callable[[bool], None], recover_uri: Callable[[], str]) -> None:
        self.src, self.dst = src, dst
        self.after = migration.get("postcopy_after")
        self.down_after = migration.get("link_down_after")
        self.recover = bool(migration.get("recover"))
        self.set_link = set_link
        self.recover_uri = recover_uri
        self.started = time.monotonic()
        self.active_at: float | None = None
        self.first_steps: int | None = None
        self.steps_while_active = 0
        self.link_down = False
        self.recoveries = 0

    def poll(self, status: str) -> None:
        now = time.monotonic()
        if status == "active" and self.after is not None and now - self.started > float(self.after):
            self.src.cmd("migrate-start-postcopy")
            self.after = None
        if status == "postcopy-active":
            if self.active_at is None:
                self.active_at = now
            self.sample()
            if self.down_after is not None and not self.link_down and now - self.active_at > float(self.down_after):
                self.set_link(False)
                self.link_down = True
                self.down_after = None
        if status == "postcopy-paused" and self.recover and self.dst_paused():
            self.resume()

    def sample(self) -> None:
        """The destination's vCPU steps while the source is still postcopy-active.
        Not while the link is cut: a vCPU waiting on a missing page answers
        only once the page is in."""
        if self.link_down:
            return
        now_steps = steps(self.dst)
        if self.src.cmd("query-migrate")["status"] != "postcopy-active":
            return
        if self.first_steps is None:
            self.first_steps = now_steps
        self.steps_while_active = now_steps - self.first_steps

    def dst_paused(self) -> bool:
        return self.dst.cmd("query-migrate")["status"] == "postcopy-paused"

    def resume(self) -> None:
        if self.link_down:
            self.set_link(True)
            self.link_down = False
        uri = self.recover_uri()
        self.dst.cmd("migrate-recover", uri=uri)
        self.src.cmd("migrate", uri=uri, resume=True)
        self.recoveries += 1

    def figures(self, info: dict) -> dict:
        """The post-copy columns of the result row (after the source's end)."""
        ram = info.get("ram", {})
        out: dict = {"postcopy-requests": ram.get("postcopy-requests", 0),
                     "postcopy-bytes": ram.get("postcopy-bytes", 0),
                     "x-dst-steps-while-postcopy-active": self.steps_while_active,
                     "x-recoveries": self.recoveries}
        if info.get("status") != "completed":
            return out
        dinfo = self.dst.wait_migration(60)
        out["dst-status"] = dinfo.get("status")
        for key in ("postcopy-blocktime", "postcopy-vcpu-blocktime"):
            if key in dinfo:
                out[key] = dinfo[key]
        pc = dinfo.get("x-postcopy", {})
        latency = pc.get("fault-latency", {})
        out.update({"x-faults": pc.get("faults"), "x-placed": pc.get("placed"),
                    "x-placed-twice": pc.get("placed-twice"), "x-missing": pc.get("missing"),
                    "x-fault-p50": latency.get("p50"), "x-fault-p99": latency.get("p99")})
        return {k: v for k, v in out.items() if v is not None}
