"""TPMS_CLOCK_INFO.safe: a quote whose TPM clock may have gone backwards fails the clock
check (real swtpm: an unorderly stop clears the flag), and the platform's power-on step
(testbed.tpm.boot.restore_clock_safety) makes it safe again."""

from __future__ import annotations

import os
import struct

import pytest

from attestation.registrar import PinnedAk
from attestation.tpm import TpmClient
from attestation.tpm_types import parse_attest, parse_public
from attestation.verifier import ClockHistory, QuoteVerifier
from testbed.tpm.boot import restore_clock_safety
from tests.attestation_helpers import quote_evidence

UNSAFE = "clock safe flag is 0: the TPM clock may have gone backwards (TPMS_CLOCK_INFO.safe)"


def _quote(tcti: str, history: ClockHistory) -> tuple[bool, str, bool]:
    with TpmClient(tcti) as client:
        ak = client.attestation_key("ecc")
        nonce = os.urandom(32)
        evidence = quote_evidence(client, ak, nonce)
        trust = PinnedAk([parse_public(ak.public).public_key()])
    report = QuoteVerifier(ak_trust=trust, clock_history=history).verify(evidence, nonce)
    safe = parse_attest(evidence.attest).clock_info.safe
    return report.ok, report.check("clock").detail, safe


def test_fresh_swtpm_quotes_are_clock_safe(swtpm) -> None:
    ok, detail, safe = _quote(swtpm.tcti, ClockHistory())
    assert ok and safe, detail


def test_unorderly_restart_makes_quotes_unsafe_until_the_clock_is_restored(swtpm) -> None:
    history = ClockHistory()
    assert _quote(swtpm.tcti, history)[0]
    swtpm.stop()  # no TPM2_Shutdown: a crash, a killed VM
    swtpm.start()
    ok, detail, safe = _quote(swtpm.tcti, history)
    assert not ok and not safe
    assert detail == UNSAFE
    with TpmClient(swtpm.tcti) as client:
        assert restore_clock_safety(client)
        assert not restore_clock_safety(client)  # already safe: nothing to do
    ok, detail, safe = _quote(swtpm.tcti, history)
    assert ok and safe, detail
    assert "reboot detected" in detail


def test_an_unsafe_clock_fails_even_without_history(swtpm) -> None:
    swtpm.stop()
    swtpm.start()
    with TpmClient(swtpm.tcti) as client:
        ak = client.attestation_key("ecc")
        nonce = os.urandom(32)
        evidence = quote_evidence(client, ak, nonce)
    report = QuoteVerifier(ak_trust=PinnedAk([parse_public(ak.public).public_key()])).verify(
        evidence, nonce)
    failure = report.failure
    assert failure is not None and failure.name == "clock"


@pytest.mark.parametrize("safe", [0, 1])
def test_safe_byte_decodes(safe: int) -> None:
    attest = (struct.pack(">IH", 0xFF544347, 0x8018) + b"\x00\x00\x00\x00"
              + struct.pack(">QIIBQ", 5, 1, 0, safe, 0) + b"\x00\x00\x00\x00" + b"\x00\x00")
    assert parse_attest(attest).clock_info.safe is bool(safe)
