"""The bench's results.json speaks as `migrate --json` and the rig do: QEMU's
names where QEMU has the figure, kebab-case for the rest, times in ms, rates
in Mbit/s (`mbps`); its tables print no None. Real (small) runs, not the
whole bench."""

from __future__ import annotations

import json
import re

from livemig.tools.bench.converge import one
from livemig.tools.bench.report import summary
from livemig.tools.bench.scenarios import Bench
from livemig.tools.bench.targets import MiB, targets

KEY = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
NAMED_BY_ACTOR = {"private", "cpu-per-actor"}  # their keys are actor names (src/ram_sender)
RATE_WORDS = ("throughput", "bytes-per-s", "mib-per-s", "gbps", "per-s")


def bad_keys(value, path: str = "") -> list[str]:
    out = []
    if isinstance(value, dict):
        for k, v in value.items():
            where = f"{path}.{k}"
            if not KEY.match(k) or k.endswith(("-ms", "-seconds")) or \
                    (any(w in k for w in RATE_WORDS) and not k.endswith("ops-per-s")):
                out.append(where)
            if k not in NAMED_BY_ACTOR:
                out += bad_keys(v, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += bad_keys(v, f"{path}[{i}]")
    return out


def test_results_use_one_convention(tmp_path):
    logs: list[str] = []
    bench = Bench(str(tmp_path), 1, logs.append)
    try:
        bench.stopped(64 * MiB, ("tcp",), ("random",))
        bench.results["converge"] = [one(0.5, "none", bench.tag())]
    finally:
        bench.close()
    results = json.loads(open(bench.save()).read())
    assert not bad_keys(results), bad_keys(results)
    stopped = results["stopped"][0]
    # The same names, units and figures as the query-migrate it came from.
    assert {"total-time", "downtime", "transferred", "mbps"} <= set(stopped)
    assert abs(stopped["mbps"] - 64 * MiB * 8 / stopped["total-time"] / 1000) < 1, stopped
    assert results["baseline"]["tcp"]["mbps"] > stopped["mbps"] * 0.1
    conv = results["converge"][0]
    assert conv["status"] == "completed" and conv["downtime"] <= conv["downtime-limit"] * 1.2 + 10, conv
    assert {"dirty-sync-count", "peak-cpu-throttle-percentage", "max-bandwidth"} <= set(conv)
    table = summary(results)
    assert "None" not in table and "GB/s" in table and " s / " in table, table
    assert [t["target"] for t in targets(results)][:1] == ["incompressible tcp / baseline"]
