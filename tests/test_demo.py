"""The README's first command: `testbed demo` on the sim backend, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def _our_processes(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                found.append(cmdline)
    return found


def test_demo_establishes_channels_both_ways_runs_the_lab_and_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "wd"
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "--workdir", str(workdir), "demo",
                        "--json"], capture_output=True, text=True, timeout=180,
                       env={**os.environ})
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["ok"] and out["up_ok"] and out["teardown_clean"]
    directions = [(c["from"], c["to"]) for c in out["channels"]]
    assert directions == [("client", "server"), ("server", "client")]
    for channel in out["channels"]:
        evidence = channel["evidence"]
        assert channel["established"] and evidence["node"] == channel["to"]
        assert evidence["node_verified"] and evidence["policy"] == f"{channel['to']}-predicted"
        assert "policy" in evidence["checks"] and "qualifying_data" in evidence["checks"]
    assert len(out["attacks"]) == 8 and all(a["as_expected"] for a in out["attacks"])
    assert not _our_processes(str(workdir)), "the demo left processes behind"
    assert not (workdir / "demo").exists()
