"""The rig's report as a person reads it: a real `livemig rig` run on loopback
(one guest going A->B and back, twice per run), its HTML page opened in a
headless Chromium and screenshotted, every image loaded and non-empty, one
line per migration with a legend entry each, no Python None anywhere; and
without matplotlib, one line saying what to install."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import TAG

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
ENV = {**os.environ, "LIVEMIG_TEST_TAG": TAG, "COLUMNS": "80"}
# Loads each image of the report and writes down its size once it has loaded.
PROBE = """<!DOCTYPE html><html><body><div id="out"></div><script>
const out = document.getElementById("out");
for (const src of %s) {
  const img = new Image();
  img.onload = () => { out.insertAdjacentHTML("beforeend", `<p class="ok">${src} ${img.naturalWidth}x${img.naturalHeight}</p>`); };
  img.onerror = () => { out.insertAdjacentHTML("beforeend", `<p class="bad">${src}</p>`); };
  img.src = src;
}
</script></body></html>"""


def livemig(*args: str, python: tuple[str, ...] = ("-P", "-m", "livemig.cli.main"), timeout: float = 300):
    return subprocess.run([sys.executable, *python, *args], capture_output=True, text=True, timeout=timeout,
                          env=ENV, stdin=subprocess.DEVNULL)


def chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                           "--no-first-run", "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rig") / "out"
    p = livemig("rig", os.path.join(EXAMPLES, "matrix-loopback.toml"), "--loopback", "--out", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    assert lines[-1] == f"report: {out / 'report.html'}", lines
    assert all(len(ln) <= 80 for ln in lines[:-1]), lines
    assert len([ln for ln in lines if ": completed (downtime " in ln and ", verified" in ln]) == 8, lines
    return out


def test_report_pages_have_no_none(results_dir):
    results = json.loads((results_dir / "summary.json").read_text())
    assert len(results) == 8
    for r in results:
        assert None not in r.values(), r
        assert {"total-time", "downtime", "dirty-sync-count", "mbps"} <= set(r), r
    for page in ("report.md", "report.html"):
        text = (results_dir / page).read_text()
        assert "None" not in text and "nan" not in text.lower(), page
        assert text.count("g A→B") >= 4 and text.count("g B→A") >= 4, page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test installs it)")
def test_report_in_chromium(results_dir, tmp_path):
    page = (results_dir / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)" alt="([^"]*)"', page)
    assert [src for src, _ in images] == ["remaining.png", "times.png"], images
    for src, _ in images:
        data = (results_dir / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, src

    # One line per migration, a legend entry for each, read back from the figure.
    results = json.loads((results_dir / "summary.json").read_text())
    alt = html.unescape(images[0][1])
    lines, legend = re.fullmatch(r"RAM remaining over time: (\d+) lines, legend: (.*)", alt).groups()
    want = [f"{r['run']} {r['guest']} {r['from']}→{r['to']}" for r in results]
    assert int(lines) == len(results) and legend.split("; ") == want, alt

    shot = tmp_path / "report.png"
    p = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", f"file://{results_dir}/report.html")
    assert shot.exists() and shot.stat().st_size > 20000, p.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.std() > 0.05, "the screenshot is blank"

    probe = results_dir / "probe.html"
    probe.write_text(PROBE % json.dumps([src for src, _ in images]))
    p = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", f"file://{probe}")
    loaded = re.findall(r'<p class="ok">(\S+) (\d+)x(\d+)</p>', p.stdout)
    assert sorted(src for src, _, _ in loaded) == ["remaining.png", "times.png"], p.stdout[-2000:]
    assert all(int(w) > 300 and int(h) > 200 for _, w, h in loaded), loaded


def test_report_without_matplotlib(results_dir):
    """`livemig rig report` where matplotlib cannot be imported: pages without plots and one line."""
    block = ("import sys; sys.modules['matplotlib'] = None; from livemig.cli.main import main; "
             "main(prog_name='livemig')")
    p = livemig("rig", "report", str(results_dir), python=("-P", "-c", block))
    assert p.returncode == 0, p.stderr
    assert p.stderr == 'plots skipped: matplotlib is not installed (pip install "livemig[plots]")\n'
    assert "plots skipped" in (results_dir / "report.html").read_text()
    p = livemig("rig", "report", str(results_dir))  # and back, with plots
    assert p.returncode == 0 and p.stderr == "" and "<img" in (results_dir / "report.html").read_text()


def test_rig_errors_in_one_line(tmp_path):
    p = livemig("rig", "/tmp/nope.toml")
    assert p.returncode == 1 and p.stderr == "Error: /tmp/nope.toml: No such file or directory\n", p.stderr
    p = livemig("rig", "report", str(tmp_path))
    assert p.returncode == 1 and p.stderr == f"Error: {tmp_path}: not a rig results directory (no summary.json)\n"
