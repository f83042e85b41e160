"""The attack lab: every scenario must succeed against plain mutual TLS (or the
scenario is wrong) and be caught by Trusted Passages, by the right check.
Real swtpm per machine, real TLS over loopback sockets."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from testbed.attacks.lab import Lab
from testbed.attacks.plain import PlainProxy, PlainServer, exchange
from testbed.attacks.scenarios import SCENARIOS, genuine

EXPECTED_CHECK = {
    "toctou": ("ak_trust", "client"),
    "mitm": ("qualifying_data", "server"),
    "impersonation": ("ak_trust", "server"),
    "replay": ("qualifying_data", "server"),
    "cuckoo": ("ak_trust", "client"),
    "tampered-boot": ("policy", "client"),
    "key-copy": ("ak_trust", "client"),
    "third-party": ("policy", "server"),
    "proxy-reads-body": ("tctp_record", "server"),
    "halec-hijack": ("tctp_record", "server"),
    "sign-forgery": ("cms_signer", "third party"),
    "batch-substitution": ("batch_inclusion", "server"),
    "runtime-tamper": ("runtime", "verifier"),
    "stolen-disk": ("ak_trust", "cryptovm"),
    "unattested-host": ("policy", "cryptovm"),
    "disk-swap": ("ak_trust", "cryptovm"),
    "tampered-host": ("policy", "verifier"),
    "rogue-vtpm": ("ek_certificate", "verifier"),
    "migrate-to-tampered-host": ("policy", "verifier"),
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


def test_sign_forgery_names_the_check_for_each_forgery(lab: Lab) -> None:
    detail = SCENARIOS["sign-forgery"](lab).trusted_passages.detail
    assert "re-signed: cms_signer; altered: cms_signature (genuine proof: ok)" in detail


def test_runtime_tamper_names_the_unlisted_binary(lab: Lab) -> None:
    result = SCENARIOS["runtime-tamper"](lab)
    assert "/usr/local/bin/cryptominer" in result.trusted_passages.detail
    assert "closed its channel" in result.trusted_passages.detail


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
    assert r.returncode == 3 and "--all" in r.stderr


def test_the_plain_proxy_relays_every_exchange_under_concurrency(lab: Lab) -> None:
    """The MITM relay once copied each direction on its own thread over the same OpenSSL
    connection, and about one exchange in sixty stalled; now one thread relays both."""
    front_key, front_cert = lab.certificate_for("server")
    back_key, back_cert = lab.certificate_for("client")
    front = lab.tp_config("evil", peer="client", certificate=front_cert, key=front_key)
    back = lab.tp_config("evil", peer="server", certificate=back_cert, key=back_key)
    victim = lab.tp_config("client", peer="server").ssl_context("client")
    real = lab.tp_config("server", peer="client").ssl_context("server")
    with PlainServer(real, lambda request: request[::-1]) as target, \
            PlainProxy(front.ssl_context("server"), back.ssl_context("client"),
                       ("127.0.0.1", target.port)) as relay, \
            ThreadPoolExecutor(8) as pool:
        messages = [f"secret {n}".encode() for n in range(48)]
        replies = list(pool.map(lambda m: exchange("127.0.0.1", relay.port, victim, m),
                                messages))
    assert replies == [m[::-1] for m in messages]
    assert all(any(m in seen for seen in relay.seen) for m in messages)


def test_batch_substitution_names_both_substitutions(lab: Lab) -> None:
    detail = SCENARIOS["batch-substitution"](lab).trusted_passages.detail
    assert "another session's quote and path: " in detail
    assert "another leaf's path: " in detail and "leaf 0 of 2" in detail
