"""The results as Markdown tables and PNG plots."""

from __future__ import annotations

import os

from .multifd import multifd_summary
from .targets import DOWNTIME_LIMITS, RUNNING_BANDWIDTH, MiB, gb_per_s


def ms(value) -> str:
    return "-" if value is None else f"{value} ms"


def summary(results: dict) -> str:
    """The figures as Markdown tables (printed, and saved as summary.md)."""
    lines = []
    base = results.get("baseline", {})
    if base:
        lines += ["| transport | raw socket baseline |", "|---|---|"]
        lines += [f"| {t} | {gb_per_s(b['mbps']):.2f} GB/s |" for t, b in base.items()]
        lines.append("")
    if results.get("stopped"):
        lines += ["| stopped guest | transport | total time | throughput | ratio to baseline | CPU src / dst |",
                  "|---|---|---|---|---|---|"]
        for r in results["stopped"]:
            lines.append(f"| {r['ram'] // MiB} MiB {r['fill']} | {r['transport']} | {r['total-time']:.0f} ms"
                         f" | {gb_per_s(r['mbps']):.2f} GB/s | {r['ratio']:.2f}x"
                         f" | {r['cpu-src'] / 1000:.2f} s / {r['cpu-dst'] / 1000:.2f} s |")
        lines.append("")
    if results.get("tls"):
        t = results["tls"]
        session = t["session"] or {}
        lines += ["| stopped guest, tcp | throughput | CPU src per GiB | CPU dst per GiB |",
                  "|---|---|---|---|",
                  f"| {t['ram'] // MiB} MiB plaintext | {gb_per_s(t['plaintext-mbps']):.2f} GB/s"
                  f" | {t['cpu-src-per-gib']['plaintext'] / 1000:.2f} s"
                  f" | {t['cpu-dst-per-gib']['plaintext'] / 1000:.2f} s |",
                  f"| {t['ram'] // MiB} MiB TLS ({session.get('version')} {session.get('cipher')})"
                  f" | {gb_per_s(t['tls-mbps']):.2f} GB/s ({t['ratio']:.2f}x)"
                  f" | {t['cpu-src-per-gib']['tls'] / 1000:.2f} s | {t['cpu-dst-per-gib']['tls'] / 1000:.2f} s |", ""]
    if results.get("running"):
        lines += ["| dirty rate | downtime limit | passes | total time | downtime | guest downtime "
                  "| expected downtime |", "|---|---|---|---|---|---|---|"]
        for r in results["running"]:
            lines.append(f"| {int(r['dirty-share'] * 100)} % of {r['max-bandwidth'] // MiB} MiB/s "
                         f"| {r['downtime-limit']} ms | {r['dirty-sync-count']} | {r['total-time']} ms "
                         f"| {r['downtime']} ms | {r['x-guest-downtime']} ms | {r['x-expected-downtime']} ms |")
        lines.append("")
    if results.get("scaling"):
        lines += ["| RAM | time per GiB | throughput | CPU src per GiB | CPU dst per GiB "
                  "| largest private (actor) |", "|---|---|---|---|---|---|"]
        for r in results["scaling"]:
            worst = max(r["private"], key=r["private"].get)
            lines.append(f"| {r['ram'] // MiB} MiB | {r['time-per-gib'] / 1000:.2f} s | {gb_per_s(r['mbps']):.2f} GB/s"
                         f" | {r['cpu-src-per-gib'] / 1000:.2f} s | {r['cpu-dst-per-gib'] / 1000:.2f} s"
                         f" | {r['private'][worst] / MiB:.0f} MiB ({worst}) |")
        lines.append("")
        actors = sorted({k for r in results["scaling"] for k in r["private"]})
        lines += ["| private memory | " + " | ".join(f"{r['ram'] // MiB} MiB" for r in results["scaling"]) + " |",
                  "|---|" + "---|" * len(results["scaling"])]
        for a in actors:
            lines.append(f"| {a} | " + " | ".join(f"{r['private'].get(a, 0) / MiB:.0f} MiB"
                                                  for r in results["scaling"]) + " |")
        lines.append("")
    q = results.get("qcow2")
    if q and "results" in q:
        lines += ["| qcow2 (64 KiB requests) | livemig | qemu-img bench | ratio |", "|---|---|---|---|"]
        for r in q["results"]:
            lines.append(f"| {r['workload']} | {gb_per_s(r['ours-mbps']):.2f} GB/s | {gb_per_s(r['qemu-mbps']):.2f} GB/s "
                         f"| {r['ratio']}x |")
        lines.append("")
    if results.get("multifd"):
        lines += multifd_summary(results["multifd"])
    if results.get("converge"):
        lines += ["| dirty rate | brake | outcome | total time | downtime (limit) | passes | peak throttle "
                  "| lost work |", "|---|---|---|---|---|---|---|---|"]
        for r in results["converge"]:
            lines.append(f"| {r['dirty-share']}x {r['max-bandwidth'] // MiB} MiB/s | {r['mode']} | {r['status']} "
                         f"| {r['total-time']} ms | {r['downtime'] if r['downtime'] is not None else '-'} ms "
                         f"({r['downtime-limit']}) | {r['dirty-sync-count']} | {r['peak-cpu-throttle-percentage']} % "
                         f"| {r['lost-work'] * 100:.0f} % |")
        lines.append("")
    if results.get("postcopy"):
        lines += ["| link | dirty rate | mode | outcome | total time | downtime (expected) | fault p50 / p99 "
                  "| blocktime (per vCPU) | verified |", "|---|---|---|---|---|---|---|---|---|"]
        for r in results["postcopy"]:
            expected = f" ({r['expected_downtime_ms']} ms)" if r["expected_downtime_ms"] is not None else ""
            fault = f"{r['fault_p50_ms']} / {r['fault_p99_ms']} ms" if r["fault_p50_ms"] is not None else "-"
            outcome = r["status"] + (f" at {r['timeout_s']:.0f} s" if r["status"] == "cancelled" else "")
            block = f"{r['blocktime_ms']} ms ({r['vcpu_blocktime_ms']})" if r["blocktime_ms"] is not None else "-"
            lines.append(f"| {r['link']} | {r['share']}x {r['bandwidth'] / 1e6:.0f} MB/s | {r['mode']} "
                         f"| {outcome} | {ms(r['total_ms'])} | {ms(r['downtime_ms'])}{expected} "
                         f"| {fault} | {block} | {r['verified']} |")
        lines.append("")
    if results.get("xbzrle"):
        lines += ["| memtouch bytes | XBZRLE | wire bytes in all | after the first pass | per page re-sent "
                  "| per page once cached | cache misses | ratio after the first pass |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in results["xbzrle"]:
            for r in (row["off"], row["on"]):
                cache = r["xbzrle-cache"] or {}
                ratio = f"{row['dirty-phase-ratio']:.1f}x" if r["xbzrle"] else ""
                lines.append(f"| {r['bytes-per-touch']} | {'on' if r['xbzrle'] else 'off'} "
                             f"| {r['transferred'] / MiB:.1f} MiB | {r['dirty-phase-bytes'] / MiB:.2f} MiB in "
                             f"{r['dirty-phase-time']} ms | {r['wire-bytes-per-resent-page']:.0f} B "
                             f"| {r['wire-bytes-per-warm-page']:.0f} B | {cache.get('cache-miss', '-')} | {ratio} |")
        lines.append("")
    if results.get("targets"):
        lines += ["| target | value | wanted | met |", "|---|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['value']} | {t['wanted']} | {'yes' if t['met'] else 'NO'} |")
        lines.append("")
    return "\n".join(lines)


def plots(results: dict, out: str) -> list[str]:
    """PNG plots: remaining bytes over time per running-guest scenario, and
    throughput and CPU per GiB against RAM size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if results.get("running"):
        fig, axes = plt.subplots(1, len(DOWNTIME_LIMITS), figsize=(11, 4), sharey=True)
        for ax, limit in zip(axes, DOWNTIME_LIMITS, strict=True):
            for r in results["running"]:
                if r["downtime-limit"] != limit:
                    continue
                t = [s[0] / 1000 for s in r["samples"]]
                rem = [s[1] / MiB for s in r["samples"]]
                ax.plot(t, rem, drawstyle="steps-post",
                        label=f"{int(r['dirty-share'] * 100)} % dirty: {r['dirty-sync-count']} passes, "
                              f"downtime {r['downtime']} ms")
            ax.set_title(f"downtime limit {limit} ms, {RUNNING_BANDWIDTH // MiB} MiB/s")
            ax.set_xlabel("seconds since migrate")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0].set_ylabel("remaining dirty MiB")
        fig.tight_layout()
        path = os.path.join(out, "remaining.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    if results.get("scaling"):
        rows = results["scaling"]
        sizes = [r["ram"] / MiB for r in rows]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        a1.plot(sizes, [gb_per_s(r["mbps"]) for r in rows], "o-", label="livemig (tcp)")
        if "tcp" in results.get("baseline", {}):
            a1.axhline(gb_per_s(results["baseline"]["tcp"]["mbps"]), ls="--", color="gray",
                       label="raw tcp baseline")
        a1.set_xscale("log", base=2)
        a1.set_xlabel("guest RAM (MiB)")
        a1.set_ylabel("GB/s")
        a1.set_ylim(bottom=0)
        a1.set_title("throughput, stopped incompressible guest")
        a1.legend()
        a2.plot(sizes, [r["cpu-src-per-gib"] / 1000 for r in rows], "o-", label="source")
        a2.plot(sizes, [r["cpu-dst-per-gib"] / 1000 for r in rows], "o-", label="destination")
        a2.plot(sizes, [r["time-per-gib"] / 1000 for r in rows], "o--", label="wall time")
        a2.set_xscale("log", base=2)
        a2.set_xlabel("guest RAM (MiB)")
        a2.set_ylabel("seconds per GiB")
        a2.set_ylim(bottom=0)
        a2.set_title("CPU and time per GiB")
        a2.legend()
        for ax in (a1, a2):
            ax.set_xticks(sizes, [f"{int(s)}" for s in sizes])
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out, "scaling.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    if results.get("converge"):
        rows = results["converge"]
        shares = sorted({r["dirty-share"] for r in rows})
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            mine = {r["dirty-share"]: r for r in rows if r["mode"] == mode}
            xs = [j + i * width for j in range(len(shares))]
            a1.bar(xs, [mine[s]["lost-work"] * 100 for s in shares], width, label=mode)
            a2.bar(xs, [mine[s]["downtime"] or 0 if mine[s]["completed"] else 0 for s in shares], width,
                   label=mode, hatch=None)
            for x, s in zip(xs, shares, strict=True):
                if not mine[s]["completed"]:
                    a2.text(x, 5, "not\ndone", ha="center", fontsize=7)
        for ax in (a1, a2):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shares))], [f"{s}x" for s in shares])
            ax.set_xlabel("dirty rate / bandwidth")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=8)
        a1.set_ylabel("guest's lost work (%)")
        a1.set_title("work the guest lost to the brakes")
        a2.axhline(rows[0]["downtime-limit"] * 1.2, ls="--", color="gray")
        a2.set_ylabel("downtime (ms)")
        a2.set_title("downtime (dashed: limit + 20 %)")
        fig.tight_layout()
        path = os.path.join(out, "converge.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
