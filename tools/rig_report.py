"""The rig's report: from a results directory (summary.json and runs/*.jsonl)
an HTML page and a Markdown page with the same table, and two plots: the
bytes remaining over time, one line per migration, and each migration's
downtime and total time. `livemig rig report DIR` rebuilds it."""

from __future__ import annotations

import html
import json
import os

PLOTS_MISSING = 'plots skipped: matplotlib is not installed (pip install "livemig[plots]")'
MiB = 1 << 20
# (result key, column title); results use QEMU's query-migrate names where QEMU has the figure.
COLUMNS = (("run", "run"), ("migration", "migration"), ("status", "status"), ("converged", "converged"),
           ("mbps", "rate (Mbit/s)"), ("total-time", "total time (ms)"), ("downtime", "downtime (ms)"),
           ("expected-downtime", "expected downtime (ms)"), ("dirty-sync-count", "passes"),
           ("x-stalled", "stalled"), ("peak-cpu-throttle-percentage", "peak cpu throttle (%)"),
           ("verified", "verified"), ("error-desc", "error"))
# Shown when a run has post-copy migrations (tools/rig_postcopy.py); fault latency in ms.
POSTCOPY_COLUMNS = (("postcopy-requests", "post-copy requests"), ("x-fault-p50", "fault p50 (ms)"),
                    ("x-fault-p99", "fault p99 (ms)"), ("postcopy-blocktime", "blocktime (ms)"),
                    ("x-recoveries", "recoveries"))


def columns(results: list[dict]) -> tuple[tuple[str, str], ...]:
    if any("postcopy-requests" in r for r in results):
        return COLUMNS[:-2] + POSTCOPY_COLUMNS + COLUMNS[-2:]
    return COLUMNS


def label(r: dict) -> str:
    return f"{r['guest']} {r['from']}→{r['to']}"


def cell(r: dict, key: str) -> str:
    """A table cell: never Python's None; yes/no for flags; whole numbers for rates."""
    value = label(r) if key == "migration" else r.get(key)
    if key == "x-stalled":
        value = bool(value)  # the verdict's figures are in summary.json
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}" if key.startswith("x-fault-") else f"{value:.0f}"
    return str(value)


def load(out_dir: str) -> tuple[list[dict], dict[str, list[tuple[float, int, int]]]]:
    """The results, and per migration (by its label and run) the remaining bytes and the
    cpu-throttle-percentage over time.
    A guest's queries belong to the next result recorded for it in the same run: a guest
    that goes A->C and back gives two lines, not one."""
    with open(os.path.join(out_dir, "summary.json")) as f:
        results = json.load(f)
    series: dict[str, list[tuple[float, int, int]]] = {}
    runs_dir = os.path.join(out_dir, "runs")
    for name in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
        pending: dict[str, list[tuple[float, int, int]]] = {}
        with open(os.path.join(runs_dir, name)) as f:
            for line in f:
                e = json.loads(line)
                if e.get("kind") == "query" and "remaining" in (e["info"].get("ram") or {}):
                    pending.setdefault(e["guest"], []).append(
                        (e["t"], e["info"]["ram"]["remaining"], e["info"].get("cpu-throttle-percentage", 0)))
                elif e.get("kind") == "result":
                    points = pending.pop(e["guest"], [])
                    if points:
                        series[f"{e['run']} {label(e)}"] = points
    return results, series


def plot(out_dir: str, results: list[dict], series: dict) -> list[tuple[str, str]]:
    """remaining.png and times.png; returns (file, title) of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Under it, when any migration was throttled, the throttle on the same time axis.
    throttled = {name: points for name, points in series.items() if any(p[2] for p in points)}
    fig, axes = plt.subplots(2 if throttled else 1, 1, figsize=(9, 8 if throttled else 5), sharex=True,
                             squeeze=False, height_ratios=[2, 1] if throttled else None)
    ax = axes[0][0]
    for name, points in series.items():
        t0 = points[0][0]
        ax.plot([p[0] - t0 for p in points], [p[1] / MiB for p in points], marker=".", label=name)
        if name in throttled:
            axes[1][0].step([p[0] - t0 for p in points], [p[2] for p in points], where="post", label=name)
    if throttled:
        axes[1][0].set_ylabel("cpu-throttle-percentage")
        axes[1][0].set_title("auto-converge's CPU throttle")
        axes[1][0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[-1][0].set_xlabel("time since the migration started (s)")
    ax.set_ylabel("RAM remaining (MiB)")
    ax.set_title("RAM still to send, one line per migration")
    legend = ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    # The page says what the figure holds, read back from it: its lines and legend entries.
    remaining = (f"RAM remaining over time: {len(ax.get_lines())} lines, legend: "
                 + "; ".join(t.get_text() for t in legend.get_texts()))
    if throttled:
        remaining += f"; below, the CPU throttle of {len(throttled)} throttled migrations"
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "remaining.png"), dpi=90)
    plt.close(fig)

    names = [f"{r['run']} {label(r)}" for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.45 * max(1, len(results))), sharey=True)
    for ax, key, title in ((axes[0], "downtime", "downtime (ms)"), (axes[1], "total-time", "total time (ms)")):
        values = [r.get(key) or 0 for r in results]
        bars = ax.barh(names, values, color=["tab:blue" if r.get("converged") else "tab:red" for r in results])
        ax.bar_label(bars, labels=[cell(r, key) for r in results], padding=3, fontsize="small")
        ax.set_xlabel(title)
        ax.set_title(f"{title.split(' (')[0]} per migration (red: not converged)")
        ax.margins(x=0.2)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "times.png"), dpi=90)
    plt.close(fig)
    return [("remaining.png", remaining), ("times.png", f"downtime and total time of {len(results)} migrations")]


def markdown(results: list[dict], images: list[tuple[str, str]], note: str) -> str:
    lines = ["# livemig rig report", ""]
    lines += [f"![{title}]({name})\n" for name, title in images] or [f"{note}\n"]
    cols = columns(results)
    lines += ["| " + " | ".join(t for _, t in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, k) for k, _ in cols) + " |" for r in results]
    return "\n".join(lines) + "\n"


def page(results: list[dict], images: list[tuple[str, str]], note: str) -> str:
    e = html.escape
    cols = columns(results)
    head = "".join(f"<th>{e(t)}</th>" for _, t in cols)
    rows = "".join("<tr>" + "".join(f"<td>{e(cell(r, k))}</td>" for k, _ in cols) + "</tr>\n"
                   for r in results)
    figures = "".join(f'<figure><img src="{e(n)}" alt="{e(t)}"><figcaption>{e(t)}</figcaption></figure>\n'
                      for n, t in images) or f"<p>{e(note)}</p>\n"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<title>livemig rig report</title><style>body{font-family:sans-serif;margin:1em}"
            "table{border-collapse:collapse}td,th{border:1px solid #999;padding:2px 6px}"
            "img{max-width:100%}</style></head><body>\n<h1>livemig rig report</h1>\n"
            f"{figures}<table><thead><tr>{head}</tr></thead><tbody>\n{rows}</tbody></table>\n"
            "</body></html>\n")


def plots_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ValueError:  # a module set to None in sys.modules: as good as missing
        return False


def report(out_dir: str) -> str:
    """Write report.html and report.md into out_dir (with plots when matplotlib is
    installed; PLOTS_MISSING on the page otherwise); returns the HTML page's path."""
    results, series = load(out_dir)
    images = plot(out_dir, results, series) if plots_available() else []
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(results, images, PLOTS_MISSING))
    path = os.path.join(out_dir, "report.html")
    with open(path, "w") as f:
        f.write(page(results, images, PLOTS_MISSING))
    return path
