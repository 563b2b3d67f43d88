"""Machine profiles: what a guest of each machine type consists of, and so
which sections its migration stream carries, in order."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MachineProfile:
    name: str
    ram_block: str  # name of the default RAM block
    has_vcpus: bool  # whether vCPU state travels (a `none` guest's vCPUs, if any, stay local)
    devices: tuple[str, ...]  # FULL device sections after the vCPUs, in stream order


PROFILES = {
    "pc": MachineProfile("pc", "pc.ram", True, ("globalstate",)),
    # QEMU's `-M none -m SIZE`: one RAM block named "ram", no vCPU, and exactly
    # the FULL sections QEMU 7.2 sends for it, so either side can be QEMU.
    "none": MachineProfile("none", "ram", False, ("timer", "globalstate")),
}


def profile(name: str) -> MachineProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown machine {name!r}: choose from {', '.join(sorted(PROFILES))}") from None
