"""The attestation core against real swtpm instances: endorsement, credential
activation, quotes, key certification and every negative case the verifier must catch."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterator

import pytest

from attestation.endorsement import validate_ek
from attestation.errors import EndorsementError, VerificationError
from attestation.evidence import Evidence
from attestation.registrar import PinnedAk, Registrar
from attestation.tpm import SELECTIONS_KEPT, KeyAlgorithm, TpmClient
from attestation.tpm_types import PcrSelection, parse_attest, parse_public, parse_signature
from attestation.verifier import ClockHistory, QuoteVerifier
from tests.attestation_helpers import PCRS, activate, certification, quote_evidence


@pytest.fixture
def client(swtpm) -> Iterator[TpmClient]:
    with TpmClient(swtpm.tcti) as c:
        yield c


@pytest.fixture
def registrar(swtpm_ca) -> Registrar:
    return Registrar(swtpm_ca.ca_bundle())


# --- endorsement -----------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["rsa", "ecc"])
def test_ek_certificate_chains_to_the_project_ca_and_matches_the_ek(
        client: TpmClient, swtpm_ca, algorithm: KeyAlgorithm) -> None:
    ek = client.endorsement_key(algorithm)
    assert ek.certificate is not None
    validated = validate_ek(ek.certificate, parse_public(ek.public), swtpm_ca.ca_bundle())
    assert len(validated.chain_subjects) == 3  # EK, swtpm-localca, root


def test_ek_certificate_from_an_untrusted_ca_is_rejected(client: TpmClient, tmp_path) -> None:
    from testbed.tpm.localca import LocalCA

    other_ca = LocalCA.ensure(tmp_path / "other-ca")
    ek = client.endorsement_key("rsa")
    assert ek.certificate is not None
    with pytest.raises(EndorsementError, match="does not chain"):
        validate_ek(ek.certificate, parse_public(ek.public), other_ca.ca_bundle())


def test_ek_certificate_for_another_key_is_rejected(client: TpmClient, swtpm_ca) -> None:
    rsa_ek, ecc_ek = client.endorsement_key("rsa"), client.endorsement_key("ecc")
    assert rsa_ek.certificate is not None
    with pytest.raises(EndorsementError, match="does not match"):
        validate_ek(rsa_ek.certificate, parse_public(ecc_ek.public), swtpm_ca.ca_bundle())


# --- credential activation ---------------------------------------------------------------


@pytest.mark.parametrize("ek_alg,ak_alg", [("rsa", "ecc"), ("rsa", "rsa"), ("ecc", "ecc"),
                                           ("ecc", "rsa")])
def test_credential_activation_makes_the_ak_trusted(
        client: TpmClient, registrar: Registrar, nonce: bytes,
        ek_alg: KeyAlgorithm, ak_alg: KeyAlgorithm) -> None:
    ak = client.attestation_key(ak_alg)
    activate(client, registrar, ak, ek_alg)
    report = QuoteVerifier(ak_trust=registrar).verify(quote_evidence(client, ak, nonce), nonce)
    assert report.ok, report.to_dict()
    assert "activated against EK" in report.check("ak_trust").detail


def test_activation_with_a_wrong_secret_fails(client: TpmClient, registrar: Registrar) -> None:
    ak = client.attestation_key("ecc")
    ek = client.endorsement_key("rsa")
    assert ek.certificate is not None
    registrar.challenge(ek.certificate, ek.public, ak.public)
    with pytest.raises(VerificationError) as info:
        registrar.complete(parse_public(ak.public).name, os.urandom(32))
    assert info.value.check == "credential_activation"


def test_cuckoo_ak_of_another_tpm_cannot_activate_against_this_ek(
        client: TpmClient, registrar: Registrar, swtpm_factory) -> None:
    """The AK is in TPM B, the EK certificate is TPM A's: TPM B cannot release the secret."""
    other = swtpm_factory(unique=True)
    with TpmClient(other.tcti) as cuckoo:
        foreign_ak = cuckoo.attestation_key("ecc")
        ek = client.endorsement_key("rsa")
        assert ek.certificate is not None
        challenge = registrar.challenge(ek.certificate, ek.public, foreign_ak.public)
        from attestation.errors import TpmError

        with pytest.raises(TpmError):
            cuckoo.activate_credential(foreign_ak, "rsa", challenge)


def test_cuckoo_quote_from_another_tpm_fails_ak_trust(
        client: TpmClient, registrar: Registrar, swtpm_factory, nonce: bytes) -> None:
    activate(client, registrar, client.attestation_key("ecc"))
    other = swtpm_factory(unique=True)
    with TpmClient(other.tcti) as cuckoo:
        relayed = quote_evidence(cuckoo, cuckoo.attestation_key("ecc"), nonce)
    report = QuoteVerifier(ak_trust=registrar).verify(relayed, nonce)
    assert report.failure is not None and report.failure.name == "ak_trust"


# --- quotes: the negative cases ----------------------------------------------------------


@pytest.fixture
def trusted(client: TpmClient, registrar: Registrar):
    ak = client.attestation_key("ecc")
    activate(client, registrar, ak)
    return ak


def _failed(report) -> str:
    assert not report.ok
    return str(report.failure.name)


def test_wrong_nonce_fails_qualifying_data(client, registrar, trusted, nonce) -> None:
    evidence = quote_evidence(client, trusted, nonce)
    report = QuoteVerifier(ak_trust=registrar).verify(evidence, os.urandom(32))
    assert _failed(report) == "qualifying_data"
    assert "nonce" in report.failure.detail
    assert report.check("policy").detail.startswith("not run")


def test_altered_pcr_value_fails_pcr_digest(client, registrar, trusted, nonce) -> None:
    evidence = quote_evidence(client, trusted, nonce)
    pcrs = dict(evidence.pcrs)
    pcrs[7] = hashlib.sha256(b"something else").digest()
    report = QuoteVerifier(ak_trust=registrar).verify(
        dataclasses.replace(evidence, pcrs=pcrs), nonce)
    assert _failed(report) == "pcr_digest"


def test_dropped_pcr_fails_pcr_selection(client, registrar, trusted, nonce) -> None:
    evidence = quote_evidence(client, trusted, nonce)
    pcrs = {i: v for i, v in evidence.pcrs.items() if i != 4}
    report = QuoteVerifier(ak_trust=registrar).verify(
        dataclasses.replace(evidence, pcrs=pcrs), nonce)
    assert _failed(report) == "pcr_selection"


def test_tampered_attest_fails_signature(client, registrar, trusted, nonce) -> None:
    evidence = quote_evidence(client, trusted, nonce)
    attest = bytearray(evidence.attest)
    attest[-1] ^= 1
    report = QuoteVerifier(ak_trust=registrar).verify(
        dataclasses.replace(evidence, attest=bytes(attest)), nonce)
    assert _failed(report) == "signature"


def test_forged_quote_signed_with_tpm2_sign_by_a_non_restricted_key(
        client, registrar, trusted, nonce) -> None:
    """An attacker builds a TPMS_ATTEST with good-looking PCRs and signs it with
    TPM2_Sign using an ordinary TPM key: rejected, that key cannot be an AK."""
    genuine = quote_evidence(client, trusted, nonce)
    signing_key = client.create_signing_key("ecc")
    try:
        forged_sig = client.sign_digest(signing_key, hashlib.sha256(genuine.attest).digest())
    finally:
        client.flush(signing_key)
    forged = dataclasses.replace(genuine, signature=forged_sig, ak_public=signing_key.public)
    report = QuoteVerifier(ak_trust=registrar).verify(forged, nonce)
    assert _failed(report) == "ak_attributes"
    # Even a verifier pinning that key by mistake refuses a non-restricted "AK".
    pinned = PinnedAk([parse_public(signing_key.public).public_key()])
    assert _failed(QuoteVerifier(ak_trust=pinned).verify(forged, nonce)) == "ak_attributes"


def test_restricted_ak_refuses_to_sign_a_forged_attest(client, trusted) -> None:
    from attestation.errors import TpmError

    with pytest.raises(TpmError):
        client.sign_digest(trusted, hashlib.sha256(b"\xffTCG forged").digest())


def test_replayed_quote_is_detected_by_the_clock_history(client, registrar, trusted, nonce) -> None:
    history = ClockHistory()
    verifier = QuoteVerifier(ak_trust=registrar, clock_history=history)
    evidence = quote_evidence(client, trusted, nonce)
    assert verifier.verify(evidence, nonce).ok
    report = verifier.verify(evidence, nonce)  # same nonce: a verifier that reuses nonces
    assert _failed(report) == "clock"
    assert "replay" in report.failure.detail


def test_rolled_back_counters_are_detected(client, registrar, trusted) -> None:
    history = ClockHistory()
    verifier = QuoteVerifier(ak_trust=registrar, clock_history=history)
    first_nonce, second_nonce = os.urandom(32), os.urandom(32)
    old = quote_evidence(client, trusted, first_nonce)
    new = quote_evidence(client, trusted, second_nonce)
    assert verifier.verify(new, second_nonce).ok
    report = verifier.verify(old, first_nonce)  # an older quote presented later
    assert _failed(report) == "clock"


def test_reboot_is_reported(client, registrar, trusted, swtpm) -> None:
    history = ClockHistory()
    verifier = QuoteVerifier(ak_trust=registrar, clock_history=history)
    n1 = os.urandom(32)
    assert verifier.verify(quote_evidence(client, trusted, n1), n1).ok
    client.shutdown()  # what an OS sends before rebooting: Clock stays safe
    client.close()
    swtpm.stop()
    swtpm.start()
    with TpmClient(swtpm.tcti) as again:
        ak = again.attestation_key("ecc")
        n2 = os.urandom(32)
        report = verifier.verify(quote_evidence(again, ak, n2), n2)
    assert report.ok, report.to_dict()
    assert "reboot detected" in report.check("clock").detail
    client.__init__(swtpm.tcti)  # let the fixture close cleanly


def test_every_check_is_named_in_a_passing_report(client, registrar, trusted, nonce) -> None:
    report = QuoteVerifier(ak_trust=registrar).verify(quote_evidence(client, trusted, nonce), nonce)
    assert [c.name for c in report.checks] == [
        "structure", "ak_attributes", "ak_trust", "signature_algorithm", "signature", "magic",
        "attestation_type", "qualifying_data", "pcr_selection", "pcr_digest", "clock",
        "event_log", "policy"]


def test_evidence_round_trips_through_json(client, trusted, nonce) -> None:
    evidence = quote_evidence(client, trusted, nonce)
    assert Evidence.from_json(evidence.to_json()) == evidence


def test_rsa_ak_quotes_verify(client, registrar, nonce) -> None:
    ak = client.attestation_key("rsa")
    activate(client, registrar, ak)
    evidence = quote_evidence(client, ak, nonce, PcrSelection("sha256", (0, 1, 2, 3)))
    report = QuoteVerifier(ak_trust=registrar).verify(evidence, nonce)
    assert report.ok, report.to_dict()
    assert parse_signature(evidence.signature).sig_alg == 0x0014  # RSASSA


def test_quote_counters_are_not_obfuscated(client, trusted, nonce) -> None:
    """The AK is in the endorsement hierarchy, so resetCount is the real one (small)."""
    attest = parse_attest(quote_evidence(client, trusted, nonce).attest)
    assert attest.clock_info.reset_count < 1000


def test_a_requester_choosing_many_selections_cannot_grow_the_client(client, registrar,
                                                                     trusted, nonce) -> None:
    """A verifier chooses the PCR selection of each quote: what the client keeps per
    selection (the last values read, the quote's prebuilt arguments) stays bounded, and
    every quote still verifies, an evicted selection's included."""
    selections = [PcrSelection("sha256", (0, index)) for index in range(1, 24)]
    for selection in [*selections, selections[0]]:
        evidence = quote_evidence(client, trusted, nonce, selection)
        assert QuoteVerifier(ak_trust=registrar).verify(evidence, nonce).ok
    assert len(client._last_pcrs) <= SELECTIONS_KEPT
    assert len(client._quote_selections) <= SELECTIONS_KEPT


# --- key certification --------------------------------------------------------------------


def test_certified_tpm_key_verifies(client, registrar, trusted, nonce) -> None:
    key = client.create_signing_key("ecc")
    try:
        cert = certification(client, key, trusted, nonce)
    finally:
        client.flush(key)
    report = QuoteVerifier(ak_trust=registrar).verify_certification(cert, trusted.public, nonce)
    assert report.ok, report.to_dict()


def test_certification_of_another_key_fails_certified_name(
        client, registrar, trusted, nonce) -> None:
    key, other = client.create_signing_key("ecc"), client.create_signing_key("ecc")
    try:
        cert = certification(client, key, trusted, nonce)
    finally:
        client.flush(key)
        client.flush(other)
    swapped = dataclasses.replace(cert, key_public=other.public)
    report = QuoteVerifier(ak_trust=registrar).verify_certification(swapped, trusted.public, nonce)
    assert _failed(report) == "certified_name"


def test_quote_presented_as_certification_fails_attestation_type(
        client, registrar, trusted, nonce) -> None:
    from attestation.evidence import KeyCertification

    quote = quote_evidence(client, trusted, nonce)
    fake = KeyCertification(quote.attest, quote.signature, trusted.public)
    report = QuoteVerifier(ak_trust=registrar).verify_certification(fake, trusted.public, nonce)
    assert _failed(report) == "attestation_type"


def test_no_transient_objects_are_left_behind(client, registrar, nonce) -> None:
    ak = client.attestation_key("ecc")
    activate(client, registrar, ak)
    quote_evidence(client, ak, nonce)
    assert client.transient_handles() == []


def test_pcr_selection_above_pcr_7_is_encoded_correctly(client, trusted, registrar, nonce) -> None:
    activate(client, registrar, trusted)
    client.extend_pcr(16, {"sha256": hashlib.sha256(b"event").digest()})
    evidence = quote_evidence(client, trusted, nonce, PcrSelection("sha256", (0, 9, 16, 23)))
    assert QuoteVerifier(ak_trust=registrar).verify(evidence, nonce).ok
    assert PCRS.indices == tuple(range(11))
