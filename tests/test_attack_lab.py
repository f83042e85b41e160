"""The attack lab: every scenario must succeed against plain mutual TLS (or the
scenario is wrong) and be caught by Trusted Passages, by the right check.
Real swtpm per machine, real TLS over loopback sockets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from testbed.attacks.lab import Lab
from testbed.attacks.scenarios import SCENARIOS, genuine

EXPECTED_CHECK = {
    "toctou": ("ak_trust", "client"),
    "mitm": ("qualifying_data", "client"),
    "impersonation": ("ak_trust", "server"),
    "replay": ("qualifying_data", "server"),
    "cuckoo": ("ak_trust", "client"),
    "tampered-boot": ("policy", "client"),
    "key-copy": ("ak_trust", "client"),
    "third-party": ("policy", "server"),
}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


def test_genuine_parties_establish_an_attested_channel(lab: Lab) -> None:
    ok, detail = genuine(lab)
    assert ok, detail
    assert "server-known-good" in detail


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_attack_succeeds_on_plain_mtls_and_is_caught(lab: Lab, name: str) -> None:
    result = SCENARIOS[name](lab)
    assert result.plain.attack_succeeded, f"{name} is not an attack on plain mTLS: {result.plain}"
    assert not result.trusted_passages.attack_succeeded, result.trusted_passages
    check, side = EXPECTED_CHECK[name]
    assert (result.trusted_passages.caught_by, result.trusted_passages.caught_at) == (check, side)
    # The genuine channel still works after the scenario (nothing left broken).
    assert genuine(lab)[0]


def test_tampered_boot_names_the_kernel_event(lab: Lab) -> None:
    detail = SCENARIOS["tampered-boot"](lab).trusted_passages.detail
    assert "PCR 4" in detail and "event" in detail


def test_third_party_names_the_runtime_claim(lab: Lab) -> None:
    detail = SCENARIOS["third-party"](lab).trusted_passages.detail
    assert "PCR 23" in detail and "antivirus" in detail


def test_cli_attack_json_and_exit_code() -> None:
    r = subprocess.run([sys.executable, "-m", "testbed.cli.main", "attack", "mitm", "replay",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout[-3000:]
    out = json.loads(r.stdout)
    assert out["ok"] and [x["attack"] for x in out["results"]] == ["mitm", "replay"]
    assert out["genuine_channel"].startswith("ESTABLISHED")


def test_cli_attack_unknown_scenario_says_what_to_do() -> None:
    r = subprocess.run([sys.executable, "-m", "testbed.cli.main", "attack", "nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 4 and "--all" in r.stderr
