"""`testbed vsm`: CryptoVM key and account management from the command line (real swtpm)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path


def vsm(tcti: str, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed.cli.main", "--workdir", str(workdir),
                           "vsm", "-T", tcti, "--json", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ})


def test_vsm_keys_accounts_and_audit(swtpm, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    init = vsm(swtpm.tcti, wd, "init")
    assert init.returncode == 0, init.stderr
    psk_file = Path(json.loads(init.stdout)["root_psk_file"])
    assert stat.S_IMODE(psk_file.stat().st_mode) == 0o600
    assert psk_file.read_text().strip() not in init.stdout  # the PSK goes to the file only
    assert vsm(swtpm.tcti, wd, "key", "generate", "ec-p256", "--id", "k1").returncode == 0
    data = tmp_path / "data"
    data.write_bytes(b"to be signed")
    signed = json.loads(vsm(swtpm.tcti, wd, "key", "sign", "k1", "--data", str(data)).stdout)
    ok = vsm(swtpm.tcti, wd, "key", "verify", "k1", "--data", str(data),
             "--signature", signed["signature"])
    assert ok.returncode == 0 and json.loads(ok.stdout)["valid"]
    data.write_bytes(b"tampered")
    bad = vsm(swtpm.tcti, wd, "key", "verify", "k1", "--data", str(data),
              "--signature", signed["signature"])
    assert bad.returncode == 1
    created = vsm(swtpm.tcti, wd, "account", "create", "alice", "--privilege", "key:k1:sign")
    assert created.returncode == 0, created.stderr
    listed = json.loads(vsm(swtpm.tcti, wd, "account", "list").stdout)
    assert "alice" in json.dumps(listed)
    audit = vsm(swtpm.tcti, wd, "audit")
    assert audit.returncode == 0 and json.loads(audit.stdout)["ok"]


def test_vsm_errors_are_clear(swtpm, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    assert vsm(swtpm.tcti, wd, "init").returncode == 0
    r = vsm(swtpm.tcti, wd, "key", "public", "nope")
    assert r.returncode != 0 and "Traceback" not in r.stderr and "nope" in r.stderr
