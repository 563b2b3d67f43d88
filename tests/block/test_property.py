"""Property test: random operation sequences against a bytearray model, judged by qemu-img."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.block import create_image, open_image

from .conftest import check_image, compare_raw, needs_qemu

SIZE = 3 << 20

_op = st.one_of(
    st.tuples(st.just("write"), st.integers(0, SIZE - 1), st.integers(1, 200_000),
              st.integers(0, 255)),
    st.tuples(st.just("zero"), st.integers(0, SIZE - 1), st.integers(1, 300_000)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("cycle")),  # inactivate + activate: drop and re-read all metadata
)


@needs_qemu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, min_size=1, max_size=30), small_cache=st.booleans(),
       backing=st.booleans(), cluster=st.sampled_from([512, 4096, 65536]))
def test_random_sequences_match_model(ops, small_cache, backing, cluster):
    tmp = Path(tempfile.mkdtemp(prefix="livemig-prop-"))
    try:
        img = tmp / "p.qcow2"
        model = bytearray(SIZE)
        if backing:
            base = tmp / "base.raw"
            model[:] = bytes(range(256)) * (SIZE // 256)
            base.write_bytes(bytes(model[:SIZE - 100_000]))  # shorter than the overlay
            model[SIZE - 100_000:] = bytes(100_000)
            create_image(img, SIZE, cluster_size=cluster, backing="base.raw")
        else:
            create_image(img, SIZE, cluster_size=cluster)
        opts = {"l2_cache_size": 2 * cluster, "refcount_cache_size": 2 * cluster} \
            if small_cache else {}
        d = open_image(img, **opts)
        for op in ops:
            if op[0] == "write":
                _, off, ln, pat = op
                ln = min(ln, SIZE - off)
                d.write(off, bytes([pat]) * ln)
                model[off:off + ln] = bytes([pat]) * ln
            elif op[0] == "zero":
                _, off, ln = op
                ln = min(ln, SIZE - off)
                d.write_zeroes(off, ln)
                model[off:off + ln] = bytes(ln)
            elif op[0] == "flush":
                d.flush()
            elif op[0] == "reopen":
                d.close()
                d = open_image(img, **opts)
            else:
                d.inactivate()
                d.activate()
        assert d.read(0, SIZE) == model
        d.close()
        check_image(img)
        (tmp / "model.raw").write_bytes(bytes(model))
        compare_raw(img, tmp / "model.raw")
    finally:
        shutil.rmtree(tmp)
