import numpy as np
import pytest

from livemig.machine.ram import fill_ram
from livemig.machine.workload import Workload, WorkloadSpec, replay
from livemig.protocol.units import parse_size


def test_parse_size():
    assert parse_size("64M") == 64 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("4096") == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_spec_parse_and_errors():
    assert str(WorkloadSpec.parse("memtouch:rate=1M,wss=8M")) == "memtouch:rate=1048576,wss=8388608"
    for bad in ("bogus", "memtouch:rate=1M,foo=2", "stream", "idle:rate=1"):
        with pytest.raises(ValueError):
            WorkloadSpec.parse(bad)


@pytest.mark.parametrize("spec", ["memtouch:rate=1M,wss=256K", "stream:rate=1M", "idle"])
def test_batching_does_not_change_the_result(spec):
    """A step's effect depends on seed and step number only, not on how steps are grouped."""
    pages_a = np.zeros((256, 4096), np.uint8)
    pages_b = np.zeros((256, 4096), np.uint8)
    wa = Workload(WorkloadSpec.parse(spec), 5, 0, 1, 256)
    wb = Workload(WorkloadSpec.parse(spec), 5, 0, 1, 256)
    wa.run(pages_a, 1000)
    for n in (1, 7, 300, 692):
        wb.run(pages_b, n)
    assert np.array_equal(pages_a, pages_b)
    assert wa.registers == wb.registers
    if spec != "idle":
        assert pages_a.any()


def test_vcpus_write_disjoint_slices():
    pages = np.zeros((64, 4096), np.uint8)
    w0 = Workload(WorkloadSpec.parse("stream:rate=1M"), 1, 0, 2, 64)
    w1 = Workload(WorkloadSpec.parse("stream:rate=1M"), 1, 1, 2, 64)
    assert set(w0.run(pages, 100)).isdisjoint(set(w1.run(pages, 100)))


def test_registers_round_trip_and_mismatch():
    w = Workload(WorkloadSpec.parse("memtouch:rate=1M,wss=64K"), 3, 0, 1, 16)
    w.run(np.zeros((16, 4096), np.uint8), 50)
    other = Workload(WorkloadSpec.parse("memtouch:rate=1M,wss=64K"), 3, 0, 1, 16)
    other.load_registers(w.registers)
    assert other.registers == w.registers
    wrong = Workload(WorkloadSpec.parse("memtouch:rate=1M,wss=64K"), 4, 0, 1, 16)
    with pytest.raises(ValueError):
        wrong.load_registers(w.registers)


def test_replay_equals_stepwise_run():
    a = np.zeros(1 << 20, np.uint8)
    fill_ram(a, "half", 9)
    assert a.reshape(-1, 4096)[1::2].sum() == 0 and a.reshape(-1, 4096)[0].any()
    b = a.copy()
    spec = WorkloadSpec.parse("memtouch:rate=1M,wss=512K")
    regs = replay(a.reshape(-1, 4096), spec, 9, 2, [100, 40])
    ws = [Workload(spec, 9, i, 2, 256) for i in range(2)]
    for _ in range(20):
        ws[0].run(b.reshape(-1, 4096), 5)
        ws[1].run(b.reshape(-1, 4096), 2)
    assert np.array_equal(a, b)
    assert regs == [w.registers for w in ws]


def test_memtouch_bytes_rewrites_a_window_and_replays():
    spec = WorkloadSpec.parse("memtouch:rate=1M,wss=64K,bytes=64")
    assert spec.bytes == 64 and str(spec) == "memtouch:rate=1048576,wss=65536,bytes=64"
    assert WorkloadSpec.parse(str(spec)) == spec
    assert str(WorkloadSpec.parse("memtouch:rate=1M,bytes=4096")) == "memtouch:rate=1048576,wss=0"
    for bad in ("memtouch:rate=1M,bytes=0", "memtouch:rate=1M,bytes=8K", "stream:rate=1M,bytes=64"):
        with pytest.raises(ValueError):
            WorkloadSpec.parse(bad)
    base = np.arange(16 * 4096, dtype=np.uint32).astype(np.uint8).reshape(16, 4096)
    a, b = base.copy(), base.copy()
    wa, wb = Workload(spec, 2, 0, 1, 16), Workload(spec, 2, 0, 1, 16)
    touched = wa.run(a, 500)  # 500 steps over 16 pages: many visits per page in one batch
    for n in (1, 3, 100, 396):
        wb.run(b, n)
    assert np.array_equal(a, b) and wa.registers == wb.registers
    changed = (a != base).sum(axis=1)
    assert set(np.flatnonzero(changed)) <= set(touched.tolist())
    # each step changes at most 64 bytes: a page keeps most of its old content
    one = base.copy()
    Workload(spec, 2, 0, 1, 16).run(one, 1)
    assert 0 < (one != base).sum() <= 64
    # replay gives the same
    c = base.copy()
    assert replay(c, spec, 2, 1, [500]) == [wa.registers]
    assert np.array_equal(a, c)


def test_memtouch_full_page_default_is_unchanged():
    """bytes=4096 (the default) writes exactly what memtouch always wrote."""
    a = np.zeros((16, 4096), np.uint8)
    w = Workload(WorkloadSpec.parse("memtouch:rate=1M,wss=64K"), 4, 0, 1, 16)
    idx = w.run(a, 1)
    page = a[idx[0]].view(np.uint64)
    assert (page ^ np.arange(512, dtype=np.uint64)).min() == (page ^ np.arange(512, dtype=np.uint64)).max()
