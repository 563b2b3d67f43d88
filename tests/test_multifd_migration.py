"""Multifd between real hosts: livemig to livemig with a running guest
(verified by replay), its settings and their refusals, cancel and a
destination killed mid-migration, and malformed channels refused before any
guest starts."""

from __future__ import annotations


import pytest

from livemig.tools.launch import free_port
from tests.conftest import guest_args, replay_matches

PAGE = 4096


def multifd_on(host, channels: int = 2, compression: str = "none", **extra) -> None:
    host.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    host.cmd("migrate-set-parameters", **{"multifd-channels": channels, "multifd-compression": compression,
                                          **extra})


def uri_for(transport: str, tmp_path) -> str:
    return f"tcp:127.0.0.1:{free_port()}" if transport == "tcp" else f"unix:{tmp_path}/mig.sock"


@pytest.mark.parametrize("transport, channels, compression", [("tcp", 2, "none"), ("unix", 3, "zstd")])
def test_livemig_to_livemig_with_a_running_guest(hosts, tmp_path, transport, channels, compression):
    args = guest_args(ram="64M", workload="memtouch:rate=4M,wss=8M", vcpus=2)
    src = hosts.start("src", *args)
    dst = hosts.start("dst", *args, "--incoming", "defer")
    uri = uri_for(transport, tmp_path)
    multifd_on(dst, channels, compression)
    dst.cmd("migrate-incoming", uri=uri)
    multifd_on(src, channels, compression)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 64 << 20})
    src.cmd("migrate", uri=uri)
    info = src.wait_migration(120)
    assert info["status"] == "completed", info
    ram = info["ram"]
    # Non-zero pages went over the multifd channels, and were counted there.
    assert ram["multifd-bytes"] > 32 << 20, ram
    assert ram["transferred"] >= ram["multifd-bytes"]
    got = dst.wait_migration(30)
    assert got["status"] == "completed" and got["x-ram"]["multifd-bytes"] > 32 << 20, got
    dst.wait_status("running", 30)
    result = replay_matches(dst, tmp_path)
    assert result["ram_equal"] and result["vcpu_equal"], result
