"""Multifd with QEMU 7.2 (-M none) on the other end, both directions, 2 and
4 channels, compression none, zlib and zstd: the destination's RAM equals
the source's, over unix (no compression) and tcp (zlib, zstd). Three cases
run by default; LIVEMIG_LONG=1 runs all twelve."""

from __future__ import annotations

import numpy as np
import pytest

from livemig.machine.ram import fill_ram
from tests.test_qemu_interop import FAST, PAGE, needs_qemu, qemu, scratch, uri_for  # noqa: F401 (fixtures)

RAM = "64M"
RAM_BYTES = 64 << 20
MATRIX = [(d, c, m) for d in ("qemu-to-livemig", "livemig-to-qemu") for c in (2, 4) for m in ("none", "zlib", "zstd")]
SAMPLE = {("qemu-to-livemig", 4, "zstd"), ("livemig-to-qemu", 2, "zlib"), ("livemig-to-qemu", 4, "none")}
CASES = [pytest.param(*case, marks=() if case in SAMPLE else pytest.mark.long) for case in MATRIX]


def multifd_caps(channels: int, compression: str) -> tuple[dict, dict]:
    return ({"capabilities": [{"capability": "multifd", "state": True}]},
            {"multifd-channels": channels, "multifd-compression": compression})


def mixed_ram() -> np.ndarray:
    """Random pages, zero pages (the main channel's) and compressible ones."""
    rng = np.random.default_rng(9)
    data = rng.integers(0, 256, (RAM_BYTES // PAGE, PAGE), np.uint8)
    data[::3] = 0
    data[1::3, 1024:] = 0x41
    return data


def dump_ram(mon_cmd, path) -> np.ndarray:
    mon_cmd("pmemsave", val=0, size=RAM_BYTES, filename=str(path))
    data = np.fromfile(path, np.uint8).reshape(-1, PAGE)
    path.unlink()
    return data


@pytest.mark.parametrize("direction, channels, compression", CASES)
@needs_qemu
def test_multifd_with_qemu(hosts, qemu, scratch, tmp_path, direction, channels, compression):  # noqa: F811
    caps, params = multifd_caps(channels, compression)
    uri = uri_for("unix" if compression == "none" else "tcp", tmp_path)  # both transports QEMU allows
    if direction == "qemu-to-livemig":
        mem = scratch / "qemu.ram"
        image = mixed_ram()
        image.tofile(mem)
        dst = hosts.start("dst", "--machine", "none", "--ram", RAM, "--incoming", "defer")
        dst.cmd("migrate-set-capabilities", **caps)
        dst.cmd("migrate-set-parameters", **params)
        dst.cmd("migrate-incoming", uri=uri)
        src = qemu("-M", "none", "-m", RAM, "-S",
                   "-object", f"memory-backend-file,id=ram,size={RAM},mem-path={mem},share=off",
                   "-machine", "memory-backend=ram")
        src.cmd("migrate-set-capabilities", **caps)
        src.cmd("migrate-set-parameters", **params, **{"max-bandwidth": FAST})
        src.cmd("migrate", uri=uri)
        sent = src.wait_migration(120)
        assert sent["status"] == "completed", sent
        got = dst.wait_migration(60)
        assert got["status"] == "completed", got
        assert got["x-ram"]["multifd-bytes"] > 0
        assert np.array_equal(dump_ram(dst.cmd, scratch / "dst.ram"), image)
    else:
        src = hosts.start("src", "--machine", "none", "--ram", RAM, "--fill", "half", "--seed", "3")
        dst = qemu("-M", "none", "-m", RAM, "-incoming", "defer")
        dst.cmd("migrate-set-capabilities", **caps)
        dst.cmd("migrate-set-parameters", **params)
        dst.cmd("migrate-incoming", uri=uri)
        src.cmd("migrate-set-capabilities", **caps)
        src.cmd("migrate-set-parameters", **params, **{"max-bandwidth": 0})
        src.cmd("migrate", uri=uri)
        info = src.wait_migration(120)
        assert info["status"] == "completed", info
        assert info["ram"]["multifd-bytes"] > RAM_BYTES // 2, info  # the non-zero half
        assert dst.wait_migration(30)["status"] == "completed"
        expected = np.zeros(RAM_BYTES, np.uint8)
        fill_ram(expected, "half", 3)
        assert np.array_equal(dump_ram(src.cmd, scratch / "src.ram").reshape(-1), expected)
        assert np.array_equal(dump_ram(dst.cmd, scratch / "dst.ram").reshape(-1), expected)
