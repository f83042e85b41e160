"""The README's first command: `testbed demo` on the sim backend, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


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
    r = subprocess.run([sys.executable, "-m", "testbed.cli.main", "--workdir", str(workdir), "demo",
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
    assert len(out["attacks"]) == 12 and all(a["as_expected"] for a in out["attacks"])
    _check_keyless_tls(out)
    assert not _our_processes(str(workdir)), "the demo left processes behind"
    assert not (workdir / "demo").exists()


def _check_keyless_tls(out: dict[str, Any]) -> None:
    """Both channel ends used certificates the CryptoVM's non-exportable CA key issued."""
    assert out["nodes"] == ["verifier", "server", "client", "cryptovm"]
    keyless = out["keyless_tls"]
    assert keyless["ok"]
    ca = keyless["ca"]
    assert ca["key_attestation"] == "verified" and ca["non_exportable"] is True
    assert ca["origin"] == "generated" and ca["usage"] == ["sign"]
    assert ca["attested_by"] == "cryptovm"
    assert {"policy", "qualifying_data", "exportable", "origin"} <= set(ca["checks"])
    for node in ("server", "client"):
        enrollment = keyless["enrollment"][node]
        assert enrollment["ok"], enrollment
        certificate = enrollment["certificate"]
        assert certificate["subject"] == node and certificate["issuer"] == ca["issuer"]
        assert certificate["validity_s"] <= 3600 + 300  # 1 h, backdated 5 min for clock skew
        assert "serial" not in certificate  # volatile: the report changes only with results
    for end, channel in zip(keyless["channels"], out["channels"], strict=True):
        assert end["keyless"] and end["server_key_is_enrolled_key"]
        assert end["client_certificate"] == {"subject": end["from"], "issuer": ca["issuer"]}
        assert end["server_certificate"] == {"subject": end["to"], "issuer": ca["issuer"]}
        tls = channel["evidence"]["tls"]
        assert tls["trust"] == f"VSM CA {ca['issuer']!r}"
        assert tls["peer_certificate_issuer"] == ca["issuer"]
        assert tls["ca"]["non_exportable"] is True
