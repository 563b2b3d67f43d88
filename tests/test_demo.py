"""The README's demo, run as a user runs it, must migrate and verify."""

import json
import subprocess
import sys

from tests.conftest import TAG


def run_demo(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-P", "-m", "livemig.cli.main", "demo", "--json", *args], capture_output=True,
                         text=True, timeout=240, env={"LIVEMIG_TEST_TAG": TAG, **__import__("os").environ})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_demo_verifies():
    result = run_demo()
    assert result["status"] == "completed"
    v = result["verify"]
    assert v["ram-equal"] and v["vcpu-equal"]
    assert v["steps-source"] > 0 and v["steps-destination"] > 0
    assert v["steps-total"] == v["steps-source"] + v["steps-destination"]
    # QEMU's query-migrate names, as `livemig migrate --json` prints them
    assert result["ram"]["dirty-sync-count"] >= 2 and result["downtime"] >= 0 and result["x-guest-downtime"] >= 0
    assert result["total-time"] >= result["setup-time"] >= 0
    for key in ("transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "dirty-sync-count",
                "dirty-pages-rate", "mbps", "pages-per-second", "precopy-bytes", "downtime-bytes"):
        assert key in result["ram"], key


def test_demo_with_disk_keeps_images(tmp_path):
    result = run_demo("--disk", "--keep", str(tmp_path), "--ram", "64M")
    v = result["verify"]
    assert v["ram-equal"] and v["vcpu-equal"] and v["disk-equal"] and v["disk-check-clean"]
    assert (tmp_path / "disk.qcow2").exists() and v["replay-image"] == str(tmp_path / "replay.qcow2")
