"""A sample of the fuzzing that scripts/fuzz runs at scale (tests/fuzz.py)."""

import pytest

from tests.conftest import guest_args
from tests.fuzz import (
    HOST_KINDS,
    MULTIFD_RAM,
    fuzz_floods,
    fuzz_multifd,
    fuzz_multifd_host,
    fuzz_qmp,
    fuzz_streams,
)


def test_stream_fuzz_sample():
    counts = fuzz_streams(cases=4000, seconds=120, seed=1)
    assert counts["cases"] >= 3000 and counts["refused"] > 0


def test_floods_are_refused_in_bounded_memory():
    """Counts and lengths that add up to more than a guest holds (a block
    list, sections, digests, capabilities, a vmdesc) are refused as they are
    read: the loader's peak memory rises by a few MiB, not with the input."""
    rises = fuzz_floods(limit=64 << 20)
    assert set(rises) == {"mem-size", "sections", "instances", "digests", "live-sections", "capabilities",
                          "vmdesc"}


def test_qmp_fuzz_sample(hosts):
    host = hosts.start("fuzz", *guest_args(ram="16M"))
    counts = fuzz_qmp(host.qmp_addr.removeprefix("unix:"), cases=1500, seconds=120, seed=2)
    assert counts["commands"] > 500 and counts["errors"] > 0
    assert host.alive() and host.cmd("query-status")["status"] in ("running", "paused")


def test_multifd_channel_fuzz_sample():
    """Mutated init packets, packet headers, payloads (none, zlib, zstd) and
    packet orders through the destination's channel code: each loads or is
    refused with MultifdError, nothing else."""
    counts = fuzz_multifd(cases=800, seconds=60, seed=1)
    assert counts["cases"] >= 500 and counts["refused"] > 0 and counts["loaded"] > 0


def multifd_destination(hosts):
    return lambda: hosts.start("mfd", "--machine", "none", "--ram", f"{MULTIFD_RAM >> 20}M", "--incoming", "defer",
                               return_path=False)


def test_multifd_destination_fuzz_sample(hosts):
    """Mutated multifd sources against a live destination: each fails with a
    one-line cause and no guest, or completes; none hangs or bloats it."""
    counts = fuzz_multifd_host(multifd_destination(hosts), cases=8, seconds=120, seed=3, kinds=HOST_KINDS)
    print(counts)
    assert counts["cases"] == 8 and counts["failed"] > 0


@pytest.mark.long
@pytest.mark.timeout(600)
def test_multifd_channel_fuzz_at_scale():
    counts = fuzz_multifd(cases=30000, seconds=400, seed=4)
    print(counts)
    assert counts["cases"] >= 10000


@pytest.mark.long
@pytest.mark.timeout(1200)
def test_multifd_destination_fuzz_at_scale(hosts):
    counts = fuzz_multifd_host(multifd_destination(hosts), cases=150, seconds=900, seed=5)
    print(counts)
    assert counts["cases"] >= 100 and counts["failed"] > 0
