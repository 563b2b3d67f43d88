"""Benchmark our qcow2 driver against `qemu-img bench` with the same requests.

    python -m livemig.tools.bench.qcow2 [--count N] [--repeat R] [--dir DIR] [--json]

(`livemig bench --only qcow2` runs it too, as scenario 6.)

Workloads, each COUNT requests of 64 KiB at a 64 KiB step from offset 0:
  alloc      writes to a fresh image: every request allocates a cluster
  overwrite  the same writes again: clusters exist, data is written in place
  read       reads of the written image
qemu-img runs `qemu-img bench [-w] -c COUNT -s 65536 -S 65536 -f qcow2` (its
defaults: 64 requests in flight, writeback cache); we issue the same requests
one by one through Image.write/read.  Neither side's timing includes the final
flush/close.  Each figure is the median of --repeat runs; ratio = ours / qemu-img
throughput (> 1 means we are faster).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time

from livemig.block import create_image, open_image

REQ = 65536


def _ours(path: str, count: int) -> dict[str, float]:
    create_image(path, count * REQ, cluster_size=65536)
    buf = os.urandom(REQ)
    out = {}
    with open_image(path) as img:
        t0 = time.perf_counter()
        for i in range(count):
            img.write(i * REQ, buf)
        t1 = time.perf_counter()
        img.flush()
        t2 = time.perf_counter()
        for i in range(count):
            img.write(i * REQ, buf)
        t3 = time.perf_counter()
        for i in range(count):
            img.read(i * REQ, REQ)
        t4 = time.perf_counter()
    out["alloc"] = t1 - t0
    out["flush"] = t2 - t1
    out["overwrite"] = t3 - t2
    out["read"] = t4 - t3
    os.unlink(path)
    return out


def _qemu_run(path: str, count: int, write: bool) -> float:
    args = ["qemu-img", "bench", *(["-w"] if write else []), "-c", str(count),
            "-s", str(REQ), "-S", str(REQ), "-f", "qcow2", path]
    r = subprocess.run(args, capture_output=True, text=True, check=True)
    m = re.search(r"Run completed in ([0-9.]+) seconds", r.stdout)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {r.stdout}")
    return float(m.group(1))


def _qemu(path: str, count: int) -> dict[str, float]:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(count * REQ)],
                   check=True)
    out = {"alloc": _qemu_run(path, count, True), "overwrite": _qemu_run(path, count, True),
           "read": _qemu_run(path, count, False)}
    os.unlink(path)
    return out


def run(count: int, repeat: int, directory: str | None) -> dict:
    if shutil.which("qemu-img") is None:
        raise SystemExit("qemu-img not found (Debian package qemu-utils): it is the baseline")
    tmp = tempfile.mkdtemp(prefix="livemig-bench-", dir=directory)
    ours: dict[str, list[float]] = {}
    qemu: dict[str, list[float]] = {}
    try:
        for _ in range(repeat):  # interleaved, so machine noise hits both sides alike
            for k, v in _ours(os.path.join(tmp, "ours.qcow2"), count).items():
                ours.setdefault(k, []).append(v)
            for k, v in _qemu(os.path.join(tmp, "qemu.qcow2"), count).items():
                qemu.setdefault(k, []).append(v)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = count * REQ
    results = []
    for w in ("alloc", "overwrite", "read"):
        to, tq = statistics.median(ours[w]), statistics.median(qemu[w])
        results.append({
            "workload": w,
            "ours-time": round(to * 1000, 1), "qemu-time": round(tq * 1000, 1),  # ms
            "ours-ops-per-s": round(count / to), "qemu-ops-per-s": round(count / tq),
            "ours-mbps": round(size / to * 8 / 1e6, 1), "qemu-mbps": round(size / tq * 8 / 1e6, 1),
            "ratio": round(tq / to, 2),
        })
    return {"count": count, "request-bytes": REQ, "cluster-bytes": 65536, "repeat": repeat,
            "ours-flush-time": round(statistics.median(ours["flush"]) * 1000, 1),
            "results": results}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m livemig.tools.bench.qcow2",
                                 description="qcow2 driver vs qemu-img bench (64 KiB requests)")
    ap.add_argument("--count", type=int, default=4096, help="requests per workload")
    ap.add_argument("--repeat", type=int, default=3, help="runs per side; medians reported")
    ap.add_argument("--dir", default=None, help="directory for the scratch images")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    a = ap.parse_args(argv)
    res = run(a.count, a.repeat, a.dir)
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"qcow2, 64 KiB clusters, {a.count} x 64 KiB requests, median of {a.repeat} runs")
    print(f"{'workload':<10} {'ours ops/s':>11} {'qemu ops/s':>11} {'ours GB/s':>10} "
          f"{'qemu GB/s':>10} {'ratio':>6}")
    for r in res["results"]:
        print(f"{r['workload']:<10} {r['ours-ops-per-s']:>11} {r['qemu-ops-per-s']:>11} "
              f"{r['ours-mbps'] / 8000:>10.2f} {r['qemu-mbps'] / 8000:>10.2f} {r['ratio']:>6}")
    print(f"(ours: final flush after the allocating pass took {res['ours-flush-time']} ms, "
          "not included)")


if __name__ == "__main__":
    main()
