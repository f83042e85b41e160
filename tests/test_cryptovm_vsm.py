"""The VSM in-process on real swtpm instances: every operation, usage flags, TLS-SE style
accounts and privileges, key attestation, wrapped export and import, attestation-gated
release - and the audit entry each of them leaves, allowed or denied.

One module-scoped lab: the CryptoVM on its own TPM (provisioned, so its AK is its
own), measured-booted; a requester node "web1" on a template TPM, measured-booted,
its AK activated against its EK certificate; and "web3", a registered node on its
own TPM that booted ``init=/bin/sh``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from attestation.errors import EvidenceFormatError, VerificationError
from attestation.eventlog import parse_event_log
from attestation.evidence import Evidence
from attestation.policy import dump_policy, policy_from_evidence
from attestation.registrar import AkRegistry, Registrar
from attestation.tpm import TpmClient
from attestation.tpm_types import parse_public
from attestation.verifier import QuoteVerifier
from cryptovm.audit import read_entries
from cryptovm.errors import (
    AccessDenied,
    AuthenticationFailed,
    BadRequest,
    CryptoOperationFailed,
    KeyUsageError,
    NotFound,
    ReleaseDenied,
)
from cryptovm.keyattest import KeyAttestation, verify_key_attestation
from cryptovm.release import recipient_binding
from cryptovm.vsm import CryptoVm, VsmSession, export_context, import_context
from cryptovm.wrapping import open_envelope, spki_der, unwrap, wrap
from testbed.spec.cluster_spec import BootSpec
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm, provision
from tests.attestation_helpers import activate
from tests.test_cryptovm_support import (
    GOOD_BOOT,
    REQUESTER_BOOT,
    Requester,
    boot,
    start_tpm,
)

OAEP = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
TAMPERED_BOOT = replace(REQUESTER_BOOT, cmdline="console=ttyS0 role=web init=/bin/sh")


@dataclass
class Lab:
    vm: CryptoVm
    root: VsmSession
    root_psk: bytes
    web1: Requester
    tampered: Requester
    registry: AkRegistry
    cvm_verifier: QuoteVerifier


def _requester(tpm: Swtpm, chain: BootSpec, registrar: Registrar) -> Requester:
    log = boot(tpm, chain)
    client = TpmClient(tpm.tcti)
    ak = client.attestation_key("ecc")
    activate(client, registrar, ak)
    return Requester(tpm, client, ak, log)


def _activate_cryptovm(vm: CryptoVm, registrar: Registrar) -> bytes:
    """The registrar activates the CryptoVM's AK through the VSM's own operations."""
    identity = vm.local_root().identity()
    challenge = registrar.challenge(identity["ek_certificate"], identity["ek_public"],
                                    identity["ak_public"])
    secret = vm.local_root().activate_credential(challenge.credential_blob,
                                                 challenge.encrypted_secret)["secret"]
    registrar.complete(parse_public(identity["ak_public"]).name, secret)
    return bytes(identity["ak_public"])


@pytest.fixture(scope="module")
def lab(swtpm_ca: LocalCA, swtpm_template: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    base = tmp_path_factory.mktemp("cryptovm-lab")
    provision(base / "cvm-tpm", swtpm_ca)
    cvm_tpm = Swtpm(base / "cvm-tpm").start()
    registrar = Registrar(swtpm_ca.ca_bundle())
    requesters: list[Requester] = []
    try:
        cvm_log = boot(cvm_tpm, GOOD_BOOT)
        vm, psk = CryptoVm.initialize(base / "state", cvm_tpm.tcti, event_log=cvm_log)
        web1 = _requester(start_tpm(swtpm_template, base / "web1"), REQUESTER_BOOT, registrar)
        requesters.append(web1)
        provision(base / "web3", swtpm_ca)  # a TPM of its own: its own AK and clock
        tampered = _requester(Swtpm(base / "web3").start(), TAMPERED_BOOT, registrar)
        requesters.append(tampered)
        cvm_ak = _activate_cryptovm(vm, registrar)
        registry = AkRegistry({"web1": parse_public(web1.ak.public),
                               "web3": parse_public(tampered.ak.public)})
        registry.add("web2", parse_public(web1.client.attestation_key("rsa").public))
        known_good = web1.evidence(os.urandom(32))
        reference = policy_from_evidence(known_good.pcrs, parse_event_log(web1.log),
                                         name="web-known-good")
        vm.local_root().release_policy_set("web", dump_policy(reference), registry.to_json())
        cvm_quote = vm.quote(os.urandom(32))
        cvm_policy = policy_from_evidence(cvm_quote.pcrs, parse_event_log(cvm_log),
                                          name="cryptovm-known-good")
        cvm_registry = AkRegistry({"cryptovm": parse_public(cvm_ak)}).for_node("cryptovm")
        yield Lab(vm, vm.login("root", psk), psk, web1, tampered, registry,
                  QuoteVerifier(ak_trust=cvm_registry, policy=cvm_policy))
        vm.close()
    finally:
        for requester in requesters:
            requester.close()
            requester.tpm.stop()
        cvm_tpm.stop()


def _guest(lab: Lab, name: str, privileges: list[str]) -> VsmSession:
    psk = lab.root.account_create(name, privileges)["psk"]
    return lab.vm.login(name, psk)


def _last(lab: Lab, op: str) -> dict[str, Any]:
    lab.vm.audit.sync()
    return [e for e in read_entries(lab.vm.audit.path) if e["op"] == op][-1]


# --- operations ---------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm,sign_alg", [
    ("ec-p256", None), ("ec-p384", "ecdsa-sha384"), ("ed25519", None),
    ("rsa-2048", "rsa-pss-sha256"), ("rsa-2048", "rsa-pkcs1v15-sha256")])
def test_sign_and_verify_with_every_algorithm(lab: Lab, algorithm: str,
                                              sign_alg: str | None) -> None:
    key = lab.root.generate(algorithm, ["sign"])
    signed = lab.root.sign(key["key_id"], b"message", algorithm=sign_alg)
    public = serialization.load_der_public_key(key["public_key"])
    if isinstance(public, ec.EllipticCurvePublicKey):
        digest = hashes.SHA384() if algorithm == "ec-p384" else hashes.SHA256()
        public.verify(signed["signature"], b"message", ec.ECDSA(digest))
    elif isinstance(public, rsa.RSAPublicKey):
        pad: padding.AsymmetricPadding = (padding.PKCS1v15() if "pkcs1" in str(sign_alg)
                                          else padding.PSS(padding.MGF1(hashes.SHA256()),
                                                           padding.PSS.DIGEST_LENGTH))
        public.verify(signed["signature"], b"message", pad, hashes.SHA256())
    else:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signed["signature"], b"message")
    assert lab.root.verify(key["key_id"], b"message", signed["signature"],
                           algorithm=sign_alg)["valid"]
    assert not lab.root.verify(key["key_id"], b"other", signed["signature"],
                               algorithm=sign_alg)["valid"]


def test_prehashed_ecdsa(lab: Lab) -> None:
    key = lab.root.generate("ec-p256", ["sign"])
    digest = hashlib.sha256(b"big document").digest()
    signature = lab.root.sign(key["key_id"], digest, prehashed=True)["signature"]
    public = serialization.load_der_public_key(key["public_key"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_rsa_decrypt_oaep_pkcs1_and_the_tls_premaster_secret(lab: Lab) -> None:
    key = lab.root.generate("rsa-2048", ["decrypt"])
    public = serialization.load_der_public_key(key["public_key"])
    assert isinstance(public, rsa.RSAPublicKey)
    kid = key["key_id"]
    assert lab.root.decrypt(kid, public.encrypt(b"oaep", OAEP))["plaintext"] == b"oaep"
    premaster = b"\x03\x03" + os.urandom(46)
    ciphertext = public.encrypt(premaster, padding.PKCS1v15())
    assert lab.root.decrypt(kid, ciphertext, padding="pkcs1v15")["plaintext"] == premaster
    assert lab.root.decrypt(kid, ciphertext, padding="pkcs1v15-tls")["plaintext"] == premaster
    # A forged ciphertext yields 48 random bytes, not an error: no padding oracle.
    forged = lab.root.decrypt(kid, os.urandom(256), padding="pkcs1v15-tls")["plaintext"]
    assert len(forged) == 48
    with pytest.raises(CryptoOperationFailed):
        lab.root.decrypt(kid, os.urandom(256))


def test_aes_gcm_with_rotation_decrypts_old_ciphertexts(lab: Lab) -> None:
    kid = lab.root.generate("aes-256", ["encrypt"])["key_id"]
    old = lab.root.encrypt(kid, b"v1 secret", aad=b"ctx")
    assert lab.root.rotate(kid)["version"] == 2
    new = lab.root.encrypt(kid, b"v2 secret")
    assert (old["version"], new["version"]) == (1, 2)
    assert lab.root.decrypt(kid, old["ciphertext"], aad=b"ctx")["plaintext"] == b"v1 secret"
    assert lab.root.decrypt(kid, new["ciphertext"])["plaintext"] == b"v2 secret"
    with pytest.raises(CryptoOperationFailed, match="authentication failed"):
        lab.root.decrypt(kid, old["ciphertext"], aad=b"other")


def test_rotation_makes_a_new_primary_and_old_signatures_still_verify(lab: Lab) -> None:
    kid = lab.root.generate("ec-p256", ["sign"])["key_id"]
    first = lab.root.sign(kid, b"m")
    lab.root.rotate(kid)
    second = lab.root.sign(kid, b"m")
    assert (first["version"], second["version"]) == (1, 2)
    assert lab.root.verify(kid, b"m", first["signature"]) == {"valid": True, "version": 1}
    assert lab.root.public_key(kid, 1)["public_key"] != lab.root.public_key(kid)["public_key"]
    assert lab.root.describe(kid)["versions"] == [1, 2]


def test_ecdh_derive(lab: Lab) -> None:
    key = lab.root.generate("ec-p256", ["derive"])
    peer = ec.generate_private_key(ec.SECP256R1())
    shared = lab.root.derive(key["key_id"], spki_der(peer.public_key()))["shared_secret"]
    vsm_public = serialization.load_der_public_key(key["public_key"])
    assert isinstance(vsm_public, ec.EllipticCurvePublicKey)
    assert shared == peer.exchange(ec.ECDH(), vsm_public)
    with pytest.raises(BadRequest, match="ECC secp256r1"):
        lab.root.derive(key["key_id"], spki_der(ec.generate_private_key(
            ec.SECP384R1()).public_key()))


def test_delete_and_random(lab: Lab) -> None:
    kid = lab.root.generate("ed25519", ["sign"])["key_id"]
    assert lab.root.delete(kid)["versions_deleted"] == 1
    with pytest.raises(NotFound):
        lab.root.sign(kid, b"x")
    assert len(lab.root.random(64)["random"]) == 64
    with pytest.raises(BadRequest):
        lab.root.random(10**9)


# --- usage flags --------------------------------------------------------------------------


def test_usage_flags_are_enforced_and_audited(lab: Lab) -> None:
    sign_only = lab.root.generate("rsa-2048", ["sign"])["key_id"]
    decrypt_only = lab.root.generate("rsa-2048", ["decrypt"])["key_id"]
    with pytest.raises(KeyUsageError, match="only be used for sign"):
        lab.root.decrypt(sign_only, os.urandom(256))
    assert _last(lab, "decrypt")["check"] == "usage"
    with pytest.raises(KeyUsageError, match="only be used for decrypt"):
        lab.root.sign(decrypt_only, b"x")
    entry = _last(lab, "sign")
    assert (entry["outcome"], entry["check"], entry["key"]) == ("denied", "usage", decrypt_only)
    with pytest.raises(KeyUsageError) as info:
        lab.root.export(sign_only, spki_der(ec.generate_private_key(
            ec.SECP256R1()).public_key()), scheme="ecdh-es-a256gcm")
    assert info.value.check == "exportable"
    with pytest.raises(BadRequest, match="not possible"):
        lab.root.generate("ed25519", ["decrypt"])


# --- accounts and privileges --------------------------------------------------------------


def test_guest_privileges_and_ownership(lab: Lab) -> None:
    alice = _guest(lab, "alice", ["keys:generate"])
    bob = _guest(lab, "bob", [])
    kid = alice.generate("ec-p256", ["sign"])["key_id"]
    alice.sign(kid, b"owner may")  # the creator owns the key
    with pytest.raises(AccessDenied) as info:
        bob.sign(kid, b"x")
    assert info.value.check == "privilege"
    entry = _last(lab, "sign")
    assert (entry["account"], entry["outcome"], entry["check"]) == ("bob", "denied", "privilege")
    with pytest.raises(AccessDenied):  # same answer for a key that does not exist
        bob.sign("no-such-key", b"x")
    lab.root.account_grant("bob", [f"key:{kid}:use"])
    assert bob.verify(kid, b"owner may", bob.sign(kid, b"owner may")["signature"])["valid"]
    with pytest.raises(AccessDenied):  # use does not include delete
        bob.delete(kid)
    lab.root.account_revoke("bob", [f"key:{kid}:use"])
    with pytest.raises(AccessDenied):  # revocation is immediate
        bob.sign(kid, b"x")
    with pytest.raises(AccessDenied, match="only root"):
        alice.account_create("mallory", ["keys:generate"])


def test_wildcard_privileges(lab: Lab) -> None:
    signer = _guest(lab, "signer", ["key:*:sign"])
    kid = lab.root.generate("ec-p256", ["sign", "derive"])["key_id"]
    signer.sign(kid, b"x")
    with pytest.raises(AccessDenied):
        signer.derive(kid, spki_der(ec.generate_private_key(ec.SECP256R1()).public_key()))


def test_authentication_failures_are_audited(lab: Lab) -> None:
    _guest(lab, "carol", [])
    with pytest.raises(AuthenticationFailed):
        lab.vm.login("carol", os.urandom(32))
    entry = _last(lab, "auth")
    assert (entry["account"], entry["outcome"], entry["check"]) == ("carol", "denied",
                                                                     "authentication")
    with pytest.raises(AuthenticationFailed):
        lab.vm.login("nobody", os.urandom(32))
    psk = lab.root.account_set_psk("carol")["psk"]
    carol = lab.vm.login("carol", psk)
    lab.root.account_enable("carol", False)
    with pytest.raises(AuthenticationFailed, match="disabled"):
        carol.whoami()  # an open session loses its rights at once
    with pytest.raises(AuthenticationFailed, match="disabled"):
        lab.vm.login("carol", psk)


def test_records_as_in_tls_se(lab: Lab) -> None:
    writer = _guest(lab, "writer", ["records:write", "records:read"])
    reader = _guest(lab, "reader", ["record:r0:read"])
    writer.record_write("r0", b"1234")
    writer.record_write("r1", b"5678")
    assert reader.record_read("r0")["data"] == b"1234"
    assert reader.record_list()["records"] == ["r0"]
    with pytest.raises(AccessDenied):
        reader.record_read("r1")
    with pytest.raises(AccessDenied):
        reader.record_write("r0", b"x")
    with pytest.raises(NotFound):
        writer.record_read("r9")


def test_audit_never_contains_secrets_and_the_chain_verifies(lab: Lab) -> None:
    psk = lab.root.account_create("dave", [])["psk"]
    lab.root.record_write("secret-record", b"very secret record data")
    kid = lab.root.generate("aes-256", ["encrypt"])["key_id"]
    lab.root.encrypt(kid, b"plaintext that must not be logged")
    lab.vm.audit.sync()
    log = lab.vm.audit.path.read_bytes()
    for secret in (psk, psk.hex().encode(), lab.root_psk.hex().encode(),
                   b"very secret record data", b"plaintext that must not be logged"):
        assert secret not in log
    assert lab.root.audit_verify()["ok"]


# --- key attestation, export and import ---------------------------------------------------


def test_key_attestation_verifies_and_commits_to_the_attributes(lab: Lab) -> None:
    kid = lab.root.generate("ec-p256", ["sign"])["key_id"]
    nonce = os.urandom(32)
    doc = lab.root.attest(kid, nonce)["attestation"]
    attestation = KeyAttestation.from_json(KeyAttestation.from_dict(doc).to_json())
    report = verify_key_attestation(attestation, nonce, lab.cvm_verifier, expected_key_id=kid)
    assert report.ok, report.to_dict()
    lied = KeyAttestation(attestation.evidence, {**attestation.attributes, "usage": ["decrypt"]},
                          attestation.public)
    report = verify_key_attestation(lied, nonce, lab.cvm_verifier)
    assert report.failure is not None and report.failure.name == "qualifying_data"
    exportable = lab.root.generate("ec-p256", ["sign"], exportable=True)["key_id"]
    doc = lab.root.attest(exportable, nonce)["attestation"]
    report = verify_key_attestation(KeyAttestation.from_dict(doc), nonce, lab.cvm_verifier)
    assert report.failure is not None and report.failure.name == "exportable"


@pytest.mark.parametrize("public, message", [(None, "must be a base64 string"),
                                             ("%%", "is not valid base64")])
def test_a_key_attestation_with_a_bad_public_key_is_a_format_error(public: object,
                                                                   message: str) -> None:
    doc = {"format": "cryptovm-key-attestation", "attributes": {}, "public": public}
    with pytest.raises(EvidenceFormatError, match=f"key attestation public key {message}"):
        KeyAttestation.from_dict(doc)


def test_export_only_wrapped_and_only_to_an_accepted_recipient(lab: Lab) -> None:
    kid = lab.root.generate("ec-p256", ["sign"], exportable=True)["key_id"]
    recipient = ec.generate_private_key(ec.SECP256R1())
    spki = spki_der(recipient.public_key())
    with pytest.raises(AccessDenied) as info:  # no recipient policy configured
        lab.root.export(kid, spki, scheme="ecdh-es-a256gcm")
    assert info.value.check == "recipient_policy"

    def attested_recipient(recipient_spki: bytes, evidence: Evidence | None) -> None:
        if evidence is None:
            raise VerificationError("evidence", "the recipient presented no evidence")
        QuoteVerifier(ak_trust=lab.registry.for_node("web1")).verify(
            evidence, hashlib.sha256(recipient_spki).digest()).raise_for_failure()

    lab.vm.recipient_policy = attested_recipient
    try:
        with pytest.raises(AccessDenied, match="no evidence"):
            lab.root.export(kid, spki, scheme="ecdh-es-a256gcm")
        evidence = lab.web1.evidence(hashlib.sha256(spki).digest())
        result = lab.root.export(kid, spki, scheme="ecdh-es-a256gcm",
                                 evidence=evidence.to_json())
        rsa_recipient = rsa.generate_private_key(65537, 2048)
        rsa_spki = spki_der(rsa_recipient.public_key())
        rsa_result = lab.root.export(kid, rsa_spki, scheme="rsa-oaep-aes-kw",
                                     evidence=lab.web1.evidence(
                                         hashlib.sha256(rsa_spki).digest()))
    finally:
        lab.vm.recipient_policy = CryptoVm.__init__.__kwdefaults__["recipient_policy"]
    material = open_envelope(recipient, result["wrapped"], export_context(result["attributes"]))
    exported = serialization.load_der_private_key(material, None)
    assert spki_der(exported.public_key()) == lab.root.public_key(kid)["public_key"]  # type: ignore[arg-type]
    assert unwrap(rsa_recipient, rsa_result["wrapped"], "rsa-oaep-aes-kw") == material


def test_tenant_imports_a_key_wrapped_to_an_attested_vsm_key(lab: Lab) -> None:
    """Seed 004 provisioning: verify the CryptoVM, then hand it a key only it can open."""
    tenant = _guest(lab, "tenant", ["keys:generate", "keys:import"])
    import_key = tenant.generate("ec-p256", ["unwrap"])
    nonce = os.urandom(32)
    attestation = KeyAttestation.from_dict(tenant.attest(import_key["key_id"],
                                                         nonce)["attestation"])
    verify_key_attestation(attestation, nonce, lab.cvm_verifier).raise_for_failure()
    vsm_public = serialization.load_der_public_key(attestation.public)
    assert isinstance(vsm_public, ec.EllipticCurvePublicKey)
    tls_key = ec.generate_private_key(ec.SECP256R1())
    material = tls_key.private_bytes(serialization.Encoding.DER,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    wrapped = wrap(vsm_public, material, "ecdh-es-a256gcm",
                   import_context("ec-p256", ["sign"], False))
    with pytest.raises(CryptoOperationFailed):  # a relay that upgrades the attributes fails
        tenant.import_wrapped(import_key["key_id"], wrapped, scheme="ecdh-es-a256gcm",
                              algorithm="ec-p256", usage=["sign"], exportable=True)
    imported = tenant.import_wrapped(import_key["key_id"], wrapped, scheme="ecdh-es-a256gcm",
                                     algorithm="ec-p256", usage=["sign"])
    assert imported["origin"] == "imported" and imported["owner"] == "tenant"
    signature = tenant.sign(imported["key_id"], b"served by the VSM")["signature"]
    tls_key.public_key().verify(signature, b"served by the VSM", ec.ECDSA(hashes.SHA256()))


# --- attestation-gated release ------------------------------------------------------------


@pytest.fixture(scope="module")
def gated(lab: Lab) -> tuple[str, rsa.RSAPublicKey, VsmSession]:
    key = lab.root.generate("rsa-2048", ["decrypt"], release_policy="web", release_node="web1")
    public = serialization.load_der_public_key(key["public_key"])
    assert isinstance(public, rsa.RSAPublicKey)
    web = _guest(lab, "web", [f"key:{key['key_id']}:release"])
    return key["key_id"], public, web


def _release(lab: Lab, gated: tuple[str, rsa.RSAPublicKey, VsmSession],
             requester: Requester | None = None, **overrides: Any
             ) -> tuple[dict[str, Any], ec.EllipticCurvePrivateKey]:
    kid, public, web = gated
    nonce = overrides.pop("nonce", None) or web.issue_nonce()["nonce"]
    recipient = ec.generate_private_key(ec.SECP256R1())
    spki = spki_der(recipient.public_key())
    bound = overrides.pop("bound_spki", spki)
    evidence = (requester or lab.web1).evidence(recipient_binding(nonce, bound))
    args = {"ciphertext": public.encrypt(b"the TLS key", OAEP), "evidence": evidence.to_json(),
            "nonce": nonce, "recipient_public_key": spki, **overrides}
    return overrides.get("session", web).release_decrypt(kid, **{
        k: v for k, v in args.items() if k != "session"}), recipient


def test_release_to_an_attested_requester(lab: Lab, gated: Any) -> None:
    result, recipient = _release(lab, gated)
    assert open_envelope(recipient, result["envelope"], result["context"]) == b"the TLS key"
    entry = _last(lab, "release")
    assert (entry["account"], entry["outcome"], entry["key"]) == ("web", "ok", gated[0])


def test_release_keys_refuse_plain_decrypt(lab: Lab, gated: Any) -> None:
    kid, public, _ = gated
    with pytest.raises(KeyUsageError) as info:
        lab.root.decrypt(kid, public.encrypt(b"x", OAEP))
    assert info.value.check == "release_policy"


@pytest.mark.parametrize("case,check", [
    ("nonce_reused", "nonce"), ("nonce_unknown", "nonce"), ("nonce_other_account", "nonce"),
    ("tampered_boot", "policy"), ("recipient_not_bound", "recipient_binding"),
    ("wrong_node", "ak_trust"), ("bad_evidence", "evidence")])
def test_release_denials_name_the_failed_check_and_are_audited(
        lab: Lab, gated: Any, case: str, check: str) -> None:
    kid, _, web = gated
    overrides: dict[str, Any] = {}
    requester = None
    if case == "nonce_reused":
        overrides["nonce"] = web.issue_nonce()["nonce"]
        _release(lab, gated, nonce=overrides["nonce"])
    elif case == "nonce_unknown":
        overrides["nonce"] = os.urandom(32)
    elif case == "nonce_other_account":
        overrides["nonce"] = lab.root.issue_nonce()["nonce"]
    elif case == "tampered_boot":  # a registered node (web3), booted init=/bin/sh
        requester = lab.tampered
        unpinned = lab.root.generate("rsa-2048", ["decrypt"], release_policy="web")
        lab.root.account_grant("web", [f"key:{unpinned['key_id']}:release"])
        gated = (unpinned["key_id"], serialization.load_der_public_key(unpinned["public_key"]),
                 web)
        kid = unpinned["key_id"]
    elif case == "recipient_not_bound":
        overrides["bound_spki"] = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    elif case == "bad_evidence":
        overrides["evidence"] = b"{not evidence"
    if case == "wrong_node":
        other = lab.root.generate("rsa-2048", ["decrypt"], release_policy="web",
                                  release_node="web2")
        lab.root.account_grant("web", [f"key:{other['key_id']}:release"])
        public = serialization.load_der_public_key(other["public_key"])
        gated = (other["key_id"], public, web)
        kid = other["key_id"]
    with pytest.raises(ReleaseDenied) as info:
        _release(lab, gated, requester, **overrides)
    assert info.value.check == check, info.value
    entry = _last(lab, "release")
    assert (entry["outcome"], entry["check"], entry["key"]) == ("denied", check, kid)


def test_release_needs_the_release_privilege_and_a_policy(lab: Lab, gated: Any) -> None:
    outsider = _guest(lab, "outsider", [])
    with pytest.raises(AccessDenied) as info:
        _release(lab, gated, session=outsider, nonce=outsider.issue_nonce()["nonce"])
    assert info.value.check == "privilege"
    plain = lab.root.generate("rsa-2048", ["decrypt"])
    public = serialization.load_der_public_key(plain["public_key"])
    with pytest.raises(ReleaseDenied) as denied:
        _release(lab, (plain["key_id"], public, lab.root))
    assert denied.value.check == "release_policy"


def test_expired_nonce_is_refused(lab: Lab, gated: Any) -> None:
    ttl = lab.vm.nonces._ttl
    lab.vm.nonces._ttl = -1.0
    try:
        nonce = gated[2].issue_nonce()["nonce"]
    finally:
        lab.vm.nonces._ttl = ttl
    with pytest.raises(ReleaseDenied, match="expired"):
        _release(lab, gated, nonce=nonce)


def test_out_of_range_rsa_ciphertexts_are_project_errors_or_random(lab: Lab) -> None:
    """All-0xff is above every modulus: OpenSSL refuses it before any padding check."""
    kid = lab.root.generate("rsa-2048", ["decrypt"])["key_id"]
    too_big = b"\xff" * 256
    assert len(lab.root.decrypt(kid, too_big, padding="pkcs1v15-tls")["plaintext"]) == 48
    with pytest.raises(CryptoOperationFailed):
        lab.root.decrypt(kid, too_big, padding="pkcs1v15")
