"""The package layout's rules: which room may import which, and nothing in the
current directory can shadow livemig's modules."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOMS = ("actors", "protocol", "machine", "block", "cli", "tools")


def imports(room: str) -> dict[str, set[str]]:
    """Every livemig room (or third-party top name) each module of `room` imports."""
    found: dict[str, set[str]] = {}
    for path in (REPO / room).rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for m in mods:
                parts = m.split(".")
                if parts[0] == "livemig" and len(parts) > 1:
                    names.add(parts[1])
                elif parts[0] in ROOMS:
                    names.add(f"bare {parts[0]}")  # the pre-namespace spelling
                else:
                    names.add(parts[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("room,forbidden", [
    ("protocol", {"actors", "cli", "tools"}),
    ("machine", {"actors", "cli", "tools"}),
    ("block", {"actors", "cli", "tools", "protocol", "machine"}),
    ("actors", {"cli", "tools", "click", "rich"}),
])
def test_room_imports(room, forbidden):
    bad = {mod: sorted(names & forbidden) for mod, names in imports(room).items() if names & forbidden}
    assert not bad, f"{room}/ imports what it must not: {bad}"


def test_old_top_level_names_are_gone():
    for room in (*ROOMS, "tests"):
        for mod, names in imports(room).items():
            bare = {n for n in names if n.startswith("bare ")}
            assert not bare, f"{mod} imports a room outside the livemig namespace: {bare}"


def test_demo_runs_beside_folders_named_like_the_rooms(tmp_path):
    """Folders called machine/, protocol/, actors/ and block/ in the current
    directory must not be imported in place of livemig's own."""
    for room in ("machine", "protocol", "actors", "block"):
        (tmp_path / room).mkdir()
        (tmp_path / room / "__init__.py").write_text(f"raise ImportError('the {room}/ folder was imported')\n")
    exe = shutil.which("livemig", path=os.path.dirname(sys.executable))
    assert exe, "the livemig console script is not installed beside this Python"
    out = subprocess.run([exe, "demo", "--json", "--ram", "32M"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["status"] == "completed" and result["verify"]["ram-equal"], result
