"""Scenario 9, multifd: a stopped incompressible guest over tcp without
multifd and with 1, 2 and 4 channels, run by run against the raw tcp
baseline of the same round (throughput ratio, CPU per GiB on each side);
then zlib and zstd (and none) over 2 channels on half-zero and text-like
RAM: bytes on the wire and throughput."""

from __future__ import annotations

from .baseline import baseline
from .migrate import Guest, Run, migrate
from .scenarios import Bench, cpu_ms, median
from .targets import GiB, MiB, gb_per_s, mbps

CHANNELS = (0, 1, 2, 4)  # 0: the multifd capability off, one stream
COMPRESS_RAM = 256 * MiB
COMPRESS_FILLS = ("half", "text")
COMPRESS_METHODS = ("none", "zlib", "zstd")
COMPRESS_CHANNELS = 2


def settings(channels: int, compression: str = "none") -> dict | None:
    return {"multifd-channels": channels, "multifd-compression": compression} if channels else None


def rate(ram: int, runs: list[Run]) -> float:
    """Mbit/s over the median total time."""
    return mbps(ram / median([r.info["total-time"] for r in runs]) * 1000)


def channels_rows(bench: Bench, ram: int, counts: tuple[int, ...] = CHANNELS) -> list[dict]:
    base: list[float] = []
    runs: dict[int, list[Run]] = {c: [] for c in counts}
    for i in range(bench.repeat):
        base.append(baseline("tcp", ram, bench.workdir))
        bench.log(f"  baseline tcp run {i + 1}: {ram / base[-1] / 1e9:.2f} GB/s")
        for c in counts:
            run = migrate(Guest(ram, "random"), "tcp", bench.workdir, {"max-bandwidth": 0}, bench.tag(),
                          multifd=settings(c))
            runs[c].append(run)
            bench.log(f"  multifd {c} channels run {i + 1}: {ram / run.info['total-time'] * 1e3 / 1e9:.2f} GB/s "
                      f"({run.info['total-time']} ms)")
    base_mbps = mbps(ram / median(base))
    gib = ram / GiB
    return [{"channels": c, "ram": ram, "total-time": median([r.info["total-time"] for r in rs]),
             "mbps": rate(ram, rs), "baseline-mbps": base_mbps, "ratio": rate(ram, rs) / base_mbps,
             "multifd-bytes": rs[0].info["ram"].get("multifd-bytes", 0),
             "cpu-src-per-gib": cpu_ms(rs, "src/", gib), "cpu-dst-per-gib": cpu_ms(rs, "dst/", gib)}
            for c, rs in runs.items()]


def compression_rows(bench: Bench, size: int = COMPRESS_RAM, fills: tuple[str, ...] = COMPRESS_FILLS,
                     methods: tuple[str, ...] = COMPRESS_METHODS) -> list[dict]:
    rows = []
    gib = size / GiB
    for fill in fills:
        for method in methods:
            rs = [migrate(Guest(size, fill), "tcp", bench.workdir, {"max-bandwidth": 0}, bench.tag(),
                          multifd=settings(COMPRESS_CHANNELS, method)) for _ in range(bench.repeat)]
            ram = rs[0].info["ram"]
            row = {"fill": fill, "compression": method, "channels": COMPRESS_CHANNELS, "ram": size,
                   "transferred": ram["transferred"], "multifd-bytes": ram.get("multifd-bytes", 0),
                   "wire-share": ram["transferred"] / size, "mbps": rate(size, rs),
                   "cpu-src-per-gib": cpu_ms(rs, "src/", gib), "cpu-dst-per-gib": cpu_ms(rs, "dst/", gib)}
            rows.append(row)
            bench.log(f"  {fill:<4} {method:<4}: {row['transferred'] / MiB:.0f} MiB on the wire "
                      f"({row['wire-share']:.0%}), {gb_per_s(row['mbps']):.2f} GB/s")
    return rows


def multifd_bench(bench: Bench, ram: int) -> dict:
    return {"channels": channels_rows(bench, ram), "compression": compression_rows(bench)}


def multifd_summary(result: dict) -> list[str]:
    """summary.md's tables."""
    lines = ["| stopped guest, tcp | throughput | / raw tcp | CPU src per GiB | CPU dst per GiB |",
             "|---|---|---|---|---|"]
    for r in result["channels"]:
        name = f"{r['channels']} multifd channels" if r["channels"] else "no multifd"
        lines.append(f"| {r['ram'] // MiB} MiB, {name} | {gb_per_s(r['mbps']):.2f} GB/s | {r['ratio']:.2f}x"
                     f" | {r['cpu-src-per-gib'] / 1000:.2f} s | {r['cpu-dst-per-gib'] / 1000:.2f} s |")
    lines += ["", "| RAM, 2 channels | compression | on the wire | throughput | CPU src per GiB "
              "| CPU dst per GiB |", "|---|---|---|---|---|---|"]
    for r in result["compression"]:
        lines.append(f"| {r['ram'] // MiB} MiB {r['fill']} | {r['compression']} | {r['transferred'] / MiB:.0f} MiB"
                     f" ({r['wire-share']:.0%}) | {gb_per_s(r['mbps']):.2f} GB/s"
                     f" | {r['cpu-src-per-gib'] / 1000:.2f} s | {r['cpu-dst-per-gib'] / 1000:.2f} s |")
    return [*lines, ""]
