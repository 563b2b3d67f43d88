"""The bench's multifd scenario, small: its figures come from real runs, in
results.json's convention, and compression shows on text-like RAM."""

from __future__ import annotations

import json

from livemig.tools.bench.multifd import channels_rows, compression_rows
from livemig.tools.bench.report import summary
from livemig.tools.bench.scenarios import Bench
from livemig.tools.bench.targets import MiB
from tests.test_bench_report import bad_keys


def test_multifd_scenario_small(tmp_path):
    bench = Bench(str(tmp_path), 1, lambda _msg: None)
    try:
        bench.results["multifd"] = {"channels": channels_rows(bench, 32 * MiB, (2,)),
                                    "compression": compression_rows(bench, 32 * MiB, ("text",), ("zstd",))}
    finally:
        bench.close()
    results = json.loads(open(bench.save()).read())
    assert not bad_keys(results), bad_keys(results)
    (two,) = results["multifd"]["channels"]
    assert two["multifd-bytes"] > 32 * MiB, two
    assert 0 < two["ratio"] and two["cpu-src-per-gib"] > 0 and two["cpu-dst-per-gib"] > 0
    (zstd,) = results["multifd"]["compression"]
    assert zstd["wire-share"] < 0.6 and zstd["multifd-bytes"] < zstd["transferred"], zstd
    table = summary(results)
    assert "2 multifd channels" in table and "None" not in table, table
