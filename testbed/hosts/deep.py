"""Deep attestation (docs/hosts.md): VM EK -> host intermediate CA -> lab CA.

* :func:`certify_host_intermediate`: the host agent makes an ECC P-256 signing key in the
  host TPM (fixedTPM, fixedParent, sensitiveDataOrigin; persistent there, never
  exported) and the host's activated AK certifies it (TPM2_Certify over a fresh nonce);
  the host is attested now, in the same operation; only if both hold does the lab CA's
  root sign an X.509 CA certificate for that key (pathLen 0), kept in
  ``WORKDIR/hosts/intermediates/HOST.pem``.
* :func:`issue_vtpm_ek_certificate`: the one function that issues a vTPM's EK
  certificate on a host. The TBSCertificate is built here (``cryptography``), its SHA-256
  signed by the host TPM over SSH (TPM2_Sign), the certificate assembled with
  ``asn1crypto`` and checked against the intermediate before it is handed out. The lab
  records which host the vTPM's node runs on (``WORKDIR/hosts/vtpms.json``).
* :func:`ek_ca_bundle`: the EK trust anchors plus the intermediates of the hosts whose
  latest attestation is good (an untrusted host's vTPMs do not register); the same
  intermediates are the path links of every cluster registration
  (:func:`trusted_intermediates`, registered with
  :func:`testbed.cluster.verification.register_ek_links`).
* :func:`host_attestation_check`: the verifier's ``host_attestation`` check of a node on
  a host (registered with :func:`testbed.cluster.verification.register_host_check`): the
  host's latest attestation must be good, or the node is not trusted.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID, ObjectIdentifier
from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2B_AUTH,
    TPM2B_NV_PUBLIC,
    TPMA_NV,
    TPMS_NV_PUBLIC,
    TSS2_Exception,
)

from attestation.encoding import b64decode, b64encode
from attestation.endorsement import TCG_KP_EK_CERTIFICATE
from attestation.errors import EvidenceFormatError, TpmError, VerificationError
from attestation.evidence import KeyCertification
from attestation.files import atomic_write, private_dir, read_bounded
from attestation.report import CheckResult
from attestation.tpm import EK_CERT_INDICES, TpmClient
from attestation.tpm_types import Alg, EccCurve, ObjectAttributes, parse_public, parse_signature
from attestation.verifier import QuoteVerifier
from testbed.cluster.agent import AgentClient
from testbed.cluster.verification import register_ek_links, register_host_check
from testbed.core.clock import utc_now
from testbed.core.errors import ArgumentError, SwtpmError
from testbed.core.files import locked, read_json, write_json
from testbed.core.paths import HOST_VTPM_BINDINGS, NAME_PATTERN, ClusterPaths
from testbed.hosts.attest import HostVerdict, attest_host, load_host_registry, read_verdicts
from testbed.hosts.layout import HostsError, LabPaths, LabState, host_index
from testbed.hosts.remote import SshSession, agent_client
from testbed.tpm.localca import LocalCA, find_tool

__all__ = [
    "HostIntermediate",
    "build_ek_certificate",
    "certify_host_intermediate",
    "ek_ca_bundle",
    "host_agent",
    "host_attestation_check",
    "intermediate_name",
    "issue_vtpm_ek_certificate",
    "load_intermediate",
    "manufacture_uncertified_vtpm",
    "move_vtpm",
    "trusted_intermediates",
    "vtpm_hosts",
    "write_ek_certificate",
]

INTERMEDIATE_VALIDITY = datetime.timedelta(days=30)
EK_VALIDITY = datetime.timedelta(days=365)
CLOCK_SKEW = datetime.timedelta(minutes=5)
MAX_CERT_BYTES = 64 * 1024
SETUP_TIMEOUT_S = 60.0
NV_CHUNK = 512  # below every TPM's MAX_NV_BUFFER_SIZE
# TCG EK Credential Profile: the TPM's identity in the EK certificate's directoryName SAN.
TPM_ATTRIBUTES = {"tpm-manufacturer": ObjectIdentifier("2.23.133.2.1"),
                  "tpm-model": ObjectIdentifier("2.23.133.2.2"),
                  "tpm-version": ObjectIdentifier("2.23.133.2.3")}
DEFAULT_IDENTITY = {"tpm-manufacturer": "id:00001014", "tpm-model": "swtpm",
                    "tpm-version": "id:20191023"}  # what swtpm_setup reports for swtpm
EkKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class HostIntermediate:
    """A host's intermediate CA: its certificate (signed by the lab CA's root), and the
    host attestation that allowed it."""

    host: str
    certificate: x509.Certificate
    path: Path
    verdict: HostVerdict | None = None

    def to_dict(self) -> dict[str, Any]:
        cert = self.certificate
        return {"host": self.host, "path": str(self.path),
                "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(), "serial": format(cert.serial_number, "x"),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "attestation": None if self.verdict is None else self.verdict.to_dict()}


def _intermediates_dir(lab: LabPaths) -> Path:
    return lab.root / "intermediates"


def _bindings_path(lab: LabPaths) -> Path:
    return lab.workdir / HOST_VTPM_BINDINGS


# --- reaching a host -------------------------------------------------------------------


@contextlib.contextmanager
def host_agent(lab: LabPaths, host: str) -> Iterator[AgentClient]:
    """The host agent of ``host`` over one SSH session, closed afterwards."""
    host_index(host)
    state = LabState.load(lab)
    if state is None or host not in state.hosts:
        raise HostsError(f"no host {host!r} in the lab at {lab.root}: `testbed hosts up` "
                         "makes it")
    session = SshSession(state.hosts[host].address, lab)
    try:
        yield agent_client(session, host)
    finally:
        session.close()


# --- the host intermediate CA ----------------------------------------------------------


def certify_host_intermediate(lab: LabPaths, host: str, agent: AgentClient, *,
                              rotate: bool = False) -> HostIntermediate:
    """A certificate for ``host``'s intermediate CA: its key in the host TPM (made there
    on first use, or anew with ``rotate``) certified by its AK, the host attested now;
    then (only then) the lab CA signs. Without ``rotate`` the key stays, so the vTPM EK
    certificates it issued before still chain to the new certificate."""
    nonce = os.urandom(32)
    answer = agent.call({"op": "intermediate_key", "nonce": b64encode(nonce),
                         "rotate": rotate})
    key_public = _check_certified_key(lab, host, answer, nonce)
    verdict = attest_host(lab, host, agent)  # after the key exists: the host is good now
    if not verdict.trusted:
        raise VerificationError("host_attestation", f"host {host} failed attestation "
                                f"(check {verdict.failed_check!r}: {verdict.message}): the "
                                "lab CA does not certify its intermediate")
    cert = _sign_intermediate(LocalCA(lab.ca_dir), host, key_public)
    path = _intermediates_dir(lab) / f"{host}.pem"
    private_dir(path.parent)
    atomic_write(path, cert.public_bytes(serialization.Encoding.PEM))
    return HostIntermediate(host, cert, path, verdict)


def _check_certified_key(lab: LabPaths, host: str, answer: dict[str, Any],
                         nonce: bytes) -> ec.EllipticCurvePublicKey:
    """The key the host's registered AK certified over ``nonce``, or VerificationError."""
    try:
        certification = KeyCertification(
            attest=b64decode(answer.get("attest"), "attest", limit=4096),
            signature=b64decode(answer.get("signature"), "signature", limit=4096),
            key_public=b64decode(answer.get("key_public"), "key_public", limit=4096))
        ak_public = b64decode(answer.get("ak_public"), "ak_public", limit=4096)
    except (ValueError, EvidenceFormatError) as exc:
        raise VerificationError("structure", f"host {host}: the intermediate key answer is "
                                f"malformed: {exc}") from None
    with locked(lab.attest_lock):
        registry = load_host_registry(lab)
    if host not in registry.nodes():
        raise HostsError(f"host {host} is not registered (`testbed hosts up` registers it)")
    report = QuoteVerifier(ak_trust=registry.for_node(host)).verify_certification(
        certification, ak_public, nonce)
    report.raise_for_failure()
    key = parse_public(certification.key_public)
    usable = ObjectAttributes.SIGN_ENCRYPT | ObjectAttributes.FIXED_TPM
    if key.type != Alg.ECC or key.ecc_curve != EccCurve.NIST_P256 \
            or key.attributes & usable != usable \
            or key.attributes & (ObjectAttributes.DECRYPT | ObjectAttributes.RESTRICTED):
        raise VerificationError("key_attributes", f"host {host}: the intermediate key is not "
                                "an unrestricted ECC P-256 signing key that stays in the TPM")
    public = key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


def _sign_intermediate(ca: LocalCA, host: str, key: ec.EllipticCurvePublicKey
                       ) -> x509.Certificate:
    """The lab CA root's certificate for a host's TPM-resident intermediate key."""
    root, root_key = ca.root_signer()
    now = datetime.datetime.now(datetime.UTC)
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (x509.CertificateBuilder()
               .subject_name(intermediate_name(host)).issuer_name(root.subject)
               .public_key(key).serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW)
               .not_valid_after(now + INTERMEDIATE_VALIDITY)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, False,
                                            False, False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                   ski), critical=False))
    return builder.sign(root_key, hashes.SHA256())


def intermediate_name(host: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "trusted-hypervisor-testbed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"host intermediate CA {host}")])


def load_intermediate(lab: LabPaths, host: str) -> HostIntermediate | None:
    """The host's intermediate certificate, if the lab CA certified one."""
    host_index(host)  # a host name, never a path
    path = _intermediates_dir(lab) / f"{host}.pem"
    data = read_bounded(path, MAX_CERT_BYTES, what=f"{host} intermediate", missing_ok=True)
    if data is None:
        return None
    try:
        return HostIntermediate(host, x509.load_pem_x509_certificate(data), path)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise HostsError(f"{path} is not a PEM certificate ({exc}): certify the host's "
                         "intermediate again") from None


# --- VM EK certificates ----------------------------------------------------------------


def issue_vtpm_ek_certificate(lab: LabPaths, host: str, ek_public: EkKey, *, node: str,
                              identity: Sequence[tuple[str, str]] = (),
                              agent: AgentClient | None = None) -> bytes:
    """The DER EK certificate of a vTPM made on ``host`` for ``node``, issued by the host's
    intermediate CA (its key signs in the host TPM, over SSH).

    ``identity``: the TPM's (``tpm-manufacturer``, ``tpm-model``, ``tpm-version``) as
    swtpm_setup asks; ``agent``: the host agent to use (else one SSH session for this).
    Refused unless the host's latest attestation is good; a host without a current
    intermediate gets one first (:func:`certify_host_intermediate`, a fresh attestation).
    """
    if not NAME_PATTERN.fullmatch(node):
        raise ArgumentError(f"invalid node name {node!r}: 1-32 of a-z, 0-9, '_' and '-'")
    intermediate = _usable_intermediate(lab, host, agent)

    def sign_in_host_tpm(tbs: bytes) -> bytes:
        request = {"op": "intermediate_sign", "digest": b64encode(hashlib.sha256(tbs).digest())}
        if agent is not None:
            return _ecdsa_signature(host, agent.call(request))
        with host_agent(lab, host) as own:
            return _ecdsa_signature(host, own.call(request))

    der = build_ek_certificate(intermediate.certificate, ek_public,
                               dict(identity) or DEFAULT_IDENTITY, sign_in_host_tpm)
    cert = x509.load_der_x509_certificate(der)
    try:  # a host whose TPM signs with another key is caught before the cert goes out
        cert.verify_directly_issued_by(intermediate.certificate)
    except (InvalidSignature, ValueError, TypeError):
        raise VerificationError("intermediate_signature", f"host {host}: the EK certificate's "
                                "signature does not verify with the host's intermediate "
                                "certificate: its TPM holds another key") from None
    _bind(lab, node, host, der)
    return der


def _usable_intermediate(lab: LabPaths, host: str,
                         agent: AgentClient | None) -> HostIntermediate:
    """The host's intermediate, certified now when it has none or it expired (which
    attests the host); refused when the host's latest attestation is not good."""
    verdict = read_verdicts(lab).get(host)
    if verdict is None or not verdict.trusted:
        why = "never attested" if verdict is None else \
            f"check {verdict.failed_check!r} failed: {verdict.message}"
        raise VerificationError("host_attestation", f"host {host} is not trusted ({why}): "
                                "no vTPM EK certificate is issued on it")
    intermediate = load_intermediate(lab, host)
    now = datetime.datetime.now(datetime.UTC)
    if intermediate is not None and intermediate.certificate.not_valid_after_utc > now:
        return intermediate
    if agent is not None:
        return certify_host_intermediate(lab, host, agent)
    with host_agent(lab, host) as own:
        return certify_host_intermediate(lab, host, own)


def build_ek_certificate(issuer: x509.Certificate, ek: EkKey, identity: Mapping[str, str],
                         sign: Callable[[bytes], bytes]) -> bytes:
    """An EK certificate (DER) for ``ek`` from ``issuer``: the TBSCertificate built here,
    ``sign(tbs)`` the issuer key's DER ECDSA-with-SHA-256 signature over it."""
    tbs = _ek_tbs(issuer, ek, identity)
    return _assemble(tbs, sign(tbs))


def _ek_tbs(issuer: x509.Certificate, ek: EkKey, identity: Mapping[str, str]) -> bytes:
    """The TBSCertificate of an EK certificate (TCG EK Credential Profile shape: empty
    subject, critical directoryName SAN with the TPM's identity, tcg-kp-EKCertificate)."""
    unknown = set(identity) - set(TPM_ATTRIBUTES)
    if unknown or not all(isinstance(v, str) and 0 < len(v) <= 64 for v in identity.values()):
        raise HostsError(f"TPM identity must be {', '.join(TPM_ATTRIBUTES)} (1-64 characters "
                         f"each), not {sorted(identity)}")
    tpm = x509.Name([x509.NameAttribute(TPM_ATTRIBUTES[k], v) for k, v in identity.items()])
    usage = {"key_encipherment": isinstance(ek, rsa.RSAPublicKey),
             "key_agreement": isinstance(ek, ec.EllipticCurvePublicKey)}
    now = datetime.datetime.now(datetime.UTC)
    issuer_key = issuer.public_key()
    if not isinstance(issuer_key, ec.EllipticCurvePublicKey):
        raise HostsError("a host intermediate CA has an ECC P-256 key")
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([])).issuer_name(issuer.subject)
               .public_key(ek).serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + EK_VALIDITY)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, usage["key_encipherment"], False,
                                            usage["key_agreement"], False, False, False,
                                            False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([TCG_KP_EK_CERTIFICATE]), critical=False)
               .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm)]),
                              critical=True)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key),
                              critical=False))
    # The TBS names its signature algorithm (ecdsa-with-SHA256, the host key's) but not
    # the key: a throwaway P-256 key gives exactly the bytes the host TPM is to sign.
    return builder.sign(ec.generate_private_key(ec.SECP256R1()),
                        hashes.SHA256()).tbs_certificate_bytes


def _ecdsa_signature(host: str, answer: dict[str, Any]) -> bytes:
    """The DER ECDSA-Sig-Value of the host TPM's TPMT_SIGNATURE."""
    try:
        sig = parse_signature(b64decode(answer.get("signature"), "signature", limit=512))
    except (ValueError, EvidenceFormatError) as exc:
        raise VerificationError("intermediate_signature", f"host {host}: the signature is "
                                f"malformed: {exc}") from None
    if sig.sig_alg != Alg.ECDSA or sig.hash_alg != Alg.SHA256:
        raise VerificationError("intermediate_signature", f"host {host}: the signature is not "
                                "ECDSA with SHA-256")
    return encode_dss_signature(int.from_bytes(sig.r, "big"), int.from_bytes(sig.s, "big"))


def _assemble(tbs: bytes, signature: bytes) -> bytes:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }."""
    return bytes(asn1_x509.Certificate({
        "tbs_certificate": asn1_x509.TbsCertificate.load(tbs),
        "signature_algorithm": {"algorithm": "sha256_ecdsa"},
        "signature_value": signature,
    }).dump())


def _bind(lab: LabPaths, node: str, host: str, der: bytes) -> None:
    """Record that ``node``'s vTPM was made on ``host``: its verifier checks that host."""
    with locked(lab.attest_lock):
        doc = _load_bindings(lab)
        doc[node] = {"host": host, "ek_certificate_sha256": hashlib.sha256(der).hexdigest(),
                     "issued": utc_now()}
        write_json(_bindings_path(lab), doc)


def move_vtpm(lab: LabPaths, node: str, host: str) -> None:
    """``node``'s vTPM now runs on ``host`` (a migration): its verifier checks that host
    from now on. The EK certificate stays the one issued where the vTPM was made
    (``made_on``): the EK is the same key, and the certificate says who made it."""
    with locked(lab.attest_lock):
        doc = _load_bindings(lab)
        if node not in doc:
            raise HostsError(f"node {node} has no vTPM made on a host of this lab "
                             f"({_bindings_path(lab)})")
        binding = doc[node]
        binding.setdefault("made_on", binding["host"])
        binding.update(host=host, moved=utc_now())
        write_json(_bindings_path(lab), doc)


def vtpm_hosts(lab: LabPaths) -> dict[str, str]:
    """node -> the host its vTPM was made on."""
    return {str(n): str(b["host"]) for n, b in _load_bindings(lab).items()}


def _load_bindings(lab: LabPaths) -> dict[str, Any]:
    """``vtpms.json``; damaged or unreadable, a HostsError (the check fails, closed)."""
    path = _bindings_path(lab)
    doc = read_json(path)
    if doc is None:
        return {}
    if not isinstance(doc, dict) or not all(
            isinstance(b, dict) and isinstance(b.get("host"), str) for b in doc.values()):
        raise HostsError(f"{path} is damaged: which host each vTPM was made on is unknown, "
                         "so no VM of this lab is trusted; restore it or make the vTPMs anew")
    return doc


def manufacture_uncertified_vtpm(state: Path, ca: LocalCA) -> Path:
    """A vTPM state with its EKs but no EK certificate yet (``swtpm_setup --createek``):
    what swtpm_setup has made when it asks its certificate tool, for
    :func:`write_ek_certificate` to complete."""
    private_dir(state)
    cmd = [find_tool("swtpm_setup"), "--tpm2", "--tpmstate", str(state), "--createek",
           "--pcr-banks", "sha256", "--config", str(ca.setup_config_path)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S,
                             check=False, umask=0o077)
    except subprocess.TimeoutExpired:
        raise SwtpmError(f"swtpm_setup timed out after {SETUP_TIMEOUT_S:.0f} s") from None
    if res.returncode != 0:
        raise SwtpmError(f"swtpm_setup failed (exit {res.returncode}): "
                         f"{(res.stdout + res.stderr).strip()[-300:]}")
    return state


def write_ek_certificate(client: TpmClient, der: bytes) -> None:
    """Put ``der`` at the TCG RSA EK certificate index of a vTPM manufactured without one
    (``swtpm_setup --createek``), where :meth:`TpmClient.endorsement_key` reads it."""
    public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(
        nvIndex=EK_CERT_INDICES["rsa"][0], nameAlg=TPM2_ALG.SHA256,
        attributes=TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA,
        dataSize=len(der)))
    esapi = client.esapi
    try:
        handle = esapi.nv_define_space(TPM2B_AUTH(), public, auth_handle=ESYS_TR.OWNER)
        try:
            for offset in range(0, len(der), NV_CHUNK):
                esapi.nv_write(handle, der[offset:offset + NV_CHUNK], offset,
                               auth_handle=ESYS_TR.OWNER)
        finally:
            esapi.tr_close(handle)
    except TSS2_Exception as exc:
        raise TpmError(f"writing the EK certificate into the vTPM's NV failed: {exc}") from None


# --- what verifiers use ----------------------------------------------------------------


def ek_ca_bundle(lab: LabPaths) -> list[x509.Certificate]:
    """The lab CA and the intermediates of the hosts trusted now (roots are the
    self-signed certificates; intermediates are only path links: see validate_ek)."""
    return [*LocalCA(lab.ca_dir).ca_bundle(), *trusted_intermediates(lab.workdir)]


def trusted_intermediates(workdir: Path) -> list[x509.Certificate]:
    """The intermediate CA certificates of the hosts whose latest attestation is good."""
    lab = LabPaths(workdir)
    found = []
    for host, verdict in sorted(read_verdicts(lab).items()):
        intermediate = load_intermediate(lab, host) if verdict.trusted else None
        if intermediate is not None:
            found.append(intermediate.certificate)
    return found


def host_attestation_check(paths: ClusterPaths, node: str) -> CheckResult | None:
    """``host_attestation`` for a node whose vTPM was made on a host: the latest
    attestation of the host it runs on must be good, and so must that of the host that
    made its vTPM (a migrated VM: ``made_on`` in ``vtpms.json``; it held the vTPM's
    seeds), whose intermediate CA its EK certificate chains through. None for a node on
    no host."""
    lab = LabPaths(paths.workdir)
    binding = _load_bindings(lab).get(node)
    if binding is None:
        return None
    host = str(binding["host"])
    made_on = str(binding.get("made_on", host))
    verdicts = read_verdicts(lab)
    verdict = verdicts.get(host)
    layer = {"host": host, "host_verdict": None if verdict is None else verdict.to_dict()}
    if made_on != host:
        maker = verdicts.get(made_on)
        layer.update(made_on=made_on, made_on_verdict=None if maker is None else maker.to_dict())
    for where, role in ((host, "runs on"), (made_on, "had its vTPM made on")):
        failed = _untrusted(verdicts.get(where))
        if failed is not None:
            return CheckResult("host_attestation", "failed", f"node {node} {role} host "
                               f"{where}, whose latest attestation {failed}: the VM is not "
                               "trusted", layer)
    if load_intermediate(lab, made_on) is None:
        return CheckResult("host_attestation", "failed", f"host {made_on} has no "
                           f"intermediate CA: node {node}'s EK certificate no longer chains",
                           layer)
    assert verdict is not None
    moved = f"; its vTPM was made on {made_on}" if made_on != host else ""
    return CheckResult("host_attestation", "passed", f"host {host} trusted (attested "
                       f"{verdict.time}, policy {verdict.policy!r}){moved}", layer)


def _untrusted(verdict: HostVerdict | None) -> str | None:
    """Why a host's latest verdict is not good (None when it is)."""
    if verdict is None:
        return "was never attested"
    if not verdict.trusted:
        return f"failed check {verdict.failed_check!r} ({verdict.message})"
    return None


register_host_check(host_attestation_check)
register_ek_links(trusted_intermediates)
