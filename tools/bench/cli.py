"""`livemig bench`: run the chosen scenarios and write results.json,
summary.md and the plots."""

from __future__ import annotations

import os
import sys

from .converge import converge
from .multifd import multifd_bench
from .postcopy import postcopy
from .report import plots, summary
from .scenarios import Bench
from .targets import GiB
from .xbzrle import xbzrle_bench


def run_bench(out: str = "bench", quick: bool = False, repeat: int | None = None,
              ram: int = GiB, sections: tuple[str, ...] = ()) -> dict:
    """Run the benchmark; returns the results written to OUT/results.json."""
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    bench = Bench(out, repeat or 3, log)
    bench.results["quick"] = quick
    wanted = set(sections) or {"stopped", "zero", "running", "scaling", "qcow2", "tls", "converge", "postcopy",
                                 "xbzrle", "multifd"}
    try:
        if quick:
            log("1+2: baseline and stopped 1 GiB incompressible guest, tcp")
            bench.stopped(ram, ("tcp",), ("random",))
        else:
            if "stopped" in wanted or "zero" in wanted:
                fills = tuple(f for f, s in (("random", "stopped"), ("zero", "zero"), ("half", "zero"))
                              if s in wanted)
                log("1+2+3: baselines and stopped guests (random, zero, half), tcp and unix")
                bench.stopped(ram, ("tcp", "unix"), fills)
            if "running" in wanted:
                log("4: running guests")
                bench.running()
            if "scaling" in wanted:
                log("5: scaling")
                bench.scaling()
            if "qcow2" in wanted:
                log("6: qcow2 against qemu-img")
                bench.qcow2()
            if "tls" in wanted:
                log("7: TLS against plaintext, stopped guest, tcp")
                bench.tls(ram)
            if "converge" in wanted:
                log("8: convergence: dirty rates 0.5x-4x the bandwidth, no brake / auto-converge / dirty-limit")
                bench.results["converge"] = converge(log, bench.tag)
            if "postcopy" in wanted:
                log("9: post-copy against pre-copy, loopback and a 1 Gbit/s rig link: downtime, fault latency, "
                    "blocktime per vCPU")
                bench.results["postcopy"] = postcopy(log)
            if "xbzrle" in wanted:
                log("10: XBZRLE: wire bytes with and without, guests rewriting 64 and 512 bytes of pages")
                bench.results["xbzrle"] = xbzrle_bench(log, bench.tag)
            if "multifd" in wanted:
                log("11: multifd: stopped guest over tcp with 0/1/2/4 channels; zlib and zstd on half-zero and text RAM")
                bench.results["multifd"] = multifd_bench(bench, ram)
    finally:
        bench.close()
    path = bench.save()
    table = summary(bench.results)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    pngs = [] if quick else plots(bench.results, out)
    print(table)
    print(f"results: {path}" + (f"; plots: {', '.join(pngs)}" if pngs else ""))
    if "tls" in bench.results:
        t = bench.results["tls"]
        print(f"TLS throughput ratio (TLS tcp / plaintext tcp, same run): {t['ratio']:.2f} "
              f"({(t['session'] or {}).get('cipher')})")
    for row in bench.results.get("multifd", {}).get("channels", []):
        print(f"multifd {row['channels']} channels (incompressible tcp / raw tcp baseline): {row['ratio']:.2f}")
    for row in bench.results.get("stopped", []):
        if row["fill"] == "random" and row["transport"] == "tcp":
            print(f"throughput ratio (incompressible tcp / raw tcp baseline): {row['ratio']:.2f}")
    return bench.results
