"""A sample of the fuzzing that scripts/fuzz runs at scale (tests/fuzz.py)."""

from tests.conftest import guest_args
from tests.fuzz import fuzz_floods, fuzz_qmp, fuzz_streams


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
