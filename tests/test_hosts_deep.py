"""Deep attestation (docs/hosts.md): a host intermediate CA whose key lives in the host
TPM, certified by the lab CA only after the host attested; a vTPM's EK certificate issued
by it over SSH; the chain VM EK -> host intermediate -> lab CA and the host's latest
attestation checked by the VM's verifier; a rogue vTPM refused.

One lab for the module on its own bridge and subnet: host1 good, host2 with a tampered
QEMU. The vTPM is a real swtpm manufactured here (EK made by swtpm_setup, its certificate
issued by host1's intermediate and written into its NV like swtpm_setup would).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.encoding import b64encode
from attestation.endorsement import validate_ek
from attestation.errors import EndorsementError, VerificationError
from attestation.evidence import Evidence
from attestation.files import atomic_write, private_dir
from attestation.policy import dump_policy, policy_from_evidence
from attestation.registrar import AkRegistry, Registrar, register
from attestation.report import CheckResult, VerificationReport
from attestation.tpm import LocalAttester, TpmClient
from attestation.tpm_types import PcrSelection, marshal_public_key, parse_public
from testbed.cluster import verification
from testbed.cluster.agent import AgentError
from testbed.cluster.state import save_registry
from testbed.cluster.verification import ek_ca_bundle, verify_evidence
from testbed.core.paths import HOST_VTPM_BINDINGS, ClusterPaths
from testbed.hosts import deep, lifecycle
from testbed.hosts.agent import HostAttester, handle
from testbed.hosts.attest import attest_host, write_host_policy
from testbed.hosts.layout import LabPaths
from testbed.hosts.measured import HOST_BOOT, predicted_host_policy, resolve_stack
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm
from tests.sim_lab import run_cli

BRIDGE, SUBNET = "tbk3", "10.213.3.0/24"
SELECTION = PcrSelection("sha256", (0, 1, 2, 3))
SIM_CLUSTER = "trusted-passages-lab"  # the default spec's


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabPaths]:
    workdir = tmp_path_factory.mktemp("deep")
    try:
        results = lifecycle.up(workdir, 2, bridge=BRIDGE, subnet=SUBNET,
                               tamper_qemu=["host2"])
        assert [r.verdict.trusted for r in results if r.verdict] == [True, False]
        yield LabPaths(workdir)
    finally:
        lifecycle.down(workdir)


@pytest.fixture(scope="module")
def intermediate(lab: LabPaths) -> deep.HostIntermediate:
    with deep.host_agent(lab, "host1") as agent:
        return deep.certify_host_intermediate(lab, "host1", agent)


def _quote(client: TpmClient) -> tuple[bytes, Evidence]:
    nonce = os.urandom(32)
    ak = client.attestation_key("ecc")
    try:
        result = client.quote(ak, SELECTION, nonce)
    finally:
        client.flush(ak)
    return nonce, Evidence(result.attest, result.signature, ak.public, "sha256", result.pcrs)


def test_the_lab_ca_certifies_a_tpm_resident_key_after_the_host_attested(
        lab: LabPaths, intermediate: deep.HostIntermediate) -> None:
    cert = intermediate.certificate
    root = LocalCA(lab.ca_dir).ca_bundle()[0]
    cert.verify_directly_issued_by(root)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert intermediate.verdict is not None and intermediate.verdict.trusted
    assert stat.S_IMODE(intermediate.path.stat().st_mode) == 0o600
    assert deep.load_intermediate(lab, "host1") is not None
    # Certified again, the key stays (EK certificates it issued still chain); rotated, not.
    with deep.host_agent(lab, "host1") as agent:
        again = deep.certify_host_intermediate(lab, "host1", agent)
        assert again.certificate.public_key() == cert.public_key()
        assert again.certificate.serial_number != cert.serial_number
    # The certified key is the one host1's TPM signs with, over SSH.
    digest = hashlib.sha256(b"to be signed").digest()
    with deep.host_agent(lab, "host1") as agent:
        answer = agent.call({"op": "intermediate_sign", "digest": b64encode(digest)})
        with pytest.raises(AgentError, match="32 bytes"):
            agent.call({"op": "intermediate_sign", "digest": b64encode(b"x" * 5)})
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(deep._ecdsa_signature("host1", answer), digest,
               ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def test_a_tampered_host_gets_no_intermediate(lab: LabPaths) -> None:
    with deep.host_agent(lab, "host2") as agent, \
            pytest.raises(VerificationError, match="policy") as refused:
        deep.certify_host_intermediate(lab, "host2", agent)
    assert refused.value.check == "host_attestation"
    assert deep.load_intermediate(lab, "host2") is None
    with pytest.raises(VerificationError, match="host2 is not trusted"):
        deep.issue_vtpm_ek_certificate(lab, "host2", ec.generate_private_key(
            ec.SECP256R1()).public_key(), node="vm-x")


def test_vm_ek_chains_through_the_host_and_the_vm_falls_with_its_host(
        lab: LabPaths, intermediate: deep.HostIntermediate, tmp_path: Path) -> None:
    ca = LocalCA(lab.ca_dir)
    state = deep.manufacture_uncertified_vtpm(tmp_path / "vtpm", ca)
    with Swtpm(state) as tpm, TpmClient(tpm.tcti) as client:
        ek = client.endorsement_key("rsa")
        assert ek.certificate is None
        ek_key = parse_public(ek.public).public_key()
        started = time.monotonic()
        der = deep.issue_vtpm_ek_certificate(lab, "host1", ek_key, node="vm1")
        issued_in = time.monotonic() - started
        deep.write_ek_certificate(client, der)
        _openssl_verifies(tmp_path, der, ca, intermediate)
        validated = validate_ek(der, parse_public(ek.public), deep.ek_ca_bundle(lab))
        current = deep.load_intermediate(lab, "host1")
        assert current is not None
        assert validated.chain[1:] == (current.certificate, ca.ca_bundle()[0])

        # Registration: the chain VM EK -> host1 intermediate -> lab CA, and only that.
        with pytest.raises(EndorsementError, match="does not chain"):
            register(LocalAttester(client), "vm1", Registrar(ca.ca_bundle()), AkRegistry())
        paths = ClusterPaths(lab.workdir, "deep")
        # What `testbed up` registers with: the work dir's EK CA and the hosts' links.
        ak = register(LocalAttester(client), "vm1", Registrar(ek_ca_bundle(paths, ca)),
                      AkRegistry())
        assert ak is not None
        private_dir(paths.root)
        registry = AkRegistry()
        registry.add("vm1", ak)
        save_registry(paths, registry)

        nonce, evidence = _quote(client)
        policy = policy_from_evidence(evidence.pcrs, None, name="vm1-good")
        report = verify_evidence(paths, "vm1", evidence, nonce, policy)
        assert report.ok, report.to_dict()
        layer = report.check("host_attestation")
        assert layer.passed and layer.data["host"] == "host1"
        assert layer.data["host_verdict"]["trusted"]

        # host1 no longer satisfies its policy (as after an unapproved QEMU update).
        _host_policy_expects_another_qemu(lab, "host1")
        try:
            with deep.host_agent(lab, "host1") as agent:
                assert not attest_host(lab, "host1", agent).trusted
            nonce, evidence = _quote(client)
            report = verify_evidence(paths, "vm1", evidence, nonce, policy)
            assert not report.ok and report.failure is not None
            assert report.failure.name == "host_attestation"
            assert "host host1" in report.failure.detail and "'policy'" in report.failure.detail
            with pytest.raises(VerificationError, match="host1 is not trusted"):
                deep.issue_vtpm_ek_certificate(lab, "host1", ek_key, node="vm2")
            with pytest.raises(EndorsementError):  # its intermediate no longer links
                register(LocalAttester(client), "vm1", Registrar(ek_ca_bundle(paths, ca)),
                         AkRegistry())
        finally:
            write_host_policy(lab, "host1")
            with deep.host_agent(lab, "host1") as agent:
                assert attest_host(lab, "host1", agent).trusted
    assert issued_in < 10


def _openssl_verifies(tmp_path: Path, der: bytes, ca: LocalCA,
                      intermediate: deep.HostIntermediate) -> None:
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "ek.pem").write_bytes(pem)
    root = ca.ca_bundle()[0].public_bytes(serialization.Encoding.PEM)
    (tmp_path / "root.pem").write_bytes(root)
    out = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"),
                          "-untrusted", str(intermediate.path), str(tmp_path / "ek.pem")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def _host_policy_expects_another_qemu(lab: LabPaths, host: str) -> None:
    stack = [c if c.name != "qemu-system-x86_64" else dataclasses.replace(c, path="/bin/true")
             for c in resolve_stack()]
    policy = predicted_host_policy(host, HOST_BOOT, stack)
    atomic_write(lab.policy(host), dump_policy(policy).encode())


def test_a_self_made_intermediate_is_refused(lab: LabPaths,
                                             intermediate: deep.HostIntermediate) -> None:
    """rogue-vtpm without the attack lab: same names as host1's intermediate, another key."""
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    rogue = (x509.CertificateBuilder().subject_name(intermediate.certificate.subject)
             .issuer_name(intermediate.certificate.issuer).public_key(rogue_key.public_key())
             .serial_number(1).not_valid_before(now).not_valid_after(now + deep.EK_VALIDITY)
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .sign(rogue_key, hashes.SHA256()))
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = deep.build_ek_certificate(rogue, ek, deep.DEFAULT_IDENTITY,
                                    lambda tbs: rogue_key.sign(tbs, ec.ECDSA(hashes.SHA256())))
    with pytest.raises(EndorsementError, match="does not chain"):
        validate_ek(der, parse_public(marshal_public_key(ek)), deep.ek_ca_bundle(lab))


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from(["signature", "other"]),
                       st.one_of(st.text(max_size=40), st.binary(max_size=80).map(b64encode),
                                 st.integers(), st.none())))
def test_a_hostile_signature_answer_is_one_clear_error(answer: dict[str, object]) -> None:
    with pytest.raises(VerificationError) as refused:
        deep._ecdsa_signature("hostX", answer)
    assert refused.value.check == "intermediate_signature"


def test_testbed_attest_shows_the_host_layer(lab: LabPaths,
                                             intermediate: deep.HostIntermediate) -> None:
    """`testbed attest NODE` (text and --json) for a node recorded on host1: the quote's
    checks and host1's verdict; exit 1 once host1 fails. (A sim node: its own EK is the
    project CA's; the record is what placement makes when it issues a vTPM on host1.)"""
    workdir = lab.workdir
    rc, out, err = run_cli(workdir, "up", "--json")
    try:
        assert rc == 0, out + err
        deep.issue_vtpm_ek_certificate(lab, "host1", ec.generate_private_key(
            ec.SECP256R1()).public_key(), node="server")
        rc, out, err = run_cli(workdir, "attest", "server", "--cluster", SIM_CLUSTER, "--json")
        assert rc == 0, out + err
        layer = next(c for c in json.loads(out)["checks"] if c["check"] == "host_attestation")
        assert layer["state"] == "passed" and layer["host"] == "host1"
        assert layer["host_verdict"]["verdict"] == "trusted"
        rc, out, _ = run_cli(workdir, "attest", "server", "--cluster", SIM_CLUSTER)
        assert rc == 0 and "host_attestation" in out and "host host1 trusted" in out
        bindings = lab.root / "vtpms.json"  # damaged: fails closed, saying why
        saved = bindings.read_bytes()
        bindings.write_bytes(b'{"server": 1}')
        rc, out, _ = run_cli(workdir, "attest", "server", "--cluster", SIM_CLUSTER, "--json")
        bindings.write_bytes(saved)
        assert rc == 1 and "vtpms.json is damaged" in out
        _host_policy_expects_another_qemu(lab, "host1")
        try:
            with deep.host_agent(lab, "host1") as agent:
                attest_host(lab, "host1", agent)
            rc, out, _ = run_cli(workdir, "attest", "server", "--cluster", SIM_CLUSTER, "--json")
            assert rc == 1 and json.loads(out)["failed_check"] == "host_attestation"
        finally:
            write_host_policy(lab, "host1")
            with deep.host_agent(lab, "host1") as agent:
                assert attest_host(lab, "host1", agent).trusted
    finally:
        assert run_cli(workdir, "down", "--cluster", SIM_CLUSTER)[0] == 0


def test_issuance_certifies_a_missing_intermediate_and_rotation_changes_the_key(
        lab: LabPaths, intermediate: deep.HostIntermediate) -> None:
    """Last in the module: it replaces host1's intermediate."""
    ek = ec.generate_private_key(ec.SECP256R1()).public_key()
    intermediate.path.unlink()
    der = deep.issue_vtpm_ek_certificate(lab, "host1", ek, node="vm3")
    current = deep.load_intermediate(lab, "host1")
    assert current is not None  # certified on demand, after a fresh host attestation
    x509.load_der_x509_certificate(der).verify_directly_issued_by(current.certificate)
    with deep.host_agent(lab, "host1") as agent:
        rotated = deep.certify_host_intermediate(lab, "host1", agent, rotate=True)
    assert rotated.certificate.public_key() != current.certificate.public_key()
    with pytest.raises(EndorsementError, match="does not chain"):
        validate_ek(der, parse_public(marshal_public_key(ek)), deep.ek_ca_bundle(lab))


@settings(max_examples=40, deadline=None)
@given(st.fixed_dictionaries({"op": st.sampled_from(["intermediate_key", "intermediate_sign"])},
                             optional={"nonce": st.one_of(st.binary(max_size=80).map(b64encode),
                                                          st.integers(), st.text(max_size=8)),
                                       "digest": st.binary(max_size=80).map(b64encode),
                                       "rotate": st.one_of(st.booleans(), st.text(max_size=4),
                                                           st.none()),
                                       "x": st.integers()}))
def test_the_host_agent_answers_hostile_intermediate_requests_with_an_error(
        request: dict[str, object]) -> None:
    # Outside a host there is no host TPM: a well-formed request is an error there too.
    answer = handle(HostAttester(), json.dumps(request).encode())
    assert set(answer) == {"error"} and isinstance(answer["error"], str)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from(["attest", "signature", "key_public", "ak_public"]),
                       st.one_of(st.binary(max_size=120).map(b64encode), st.text(max_size=8),
                                 st.integers(), st.none())))
def test_a_hostile_intermediate_key_answer_is_refused_by_a_named_check(
        lab: LabPaths, answer: dict[str, object]) -> None:
    with pytest.raises(VerificationError) as refused:
        deep._check_certified_key(lab, "host1", answer, os.urandom(32))
    assert refused.value.check in {"structure", "ak_attributes", "ak_trust"}


def test_host_layer_not_loaded_fails_closed(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """vTPMs made on hosts, but no host check registered (an entry point that never
    imported testbed.hosts.deep): the verdict fails `host_attestation`, it does not pass."""
    monkeypatch.setattr(verification, "_HOST_CHECKS", [])
    paths = ClusterPaths(tmp_path, "c")
    good = VerificationReport((CheckResult("signature", "passed", "ok"),))
    assert verification._with_host_layer(good, paths, "vm").ok
    (tmp_path / HOST_VTPM_BINDINGS).parent.mkdir(parents=True)
    (tmp_path / HOST_VTPM_BINDINGS).write_text("{}")
    judged = verification._with_host_layer(good, paths, "vm")
    assert not judged.ok and judged.checks[-1].name == "host_attestation"
