"""How the testbed's role services trust each other: the cluster's TLS CA (the provider's
CA of the Trusted Passages paper), quoting through a node's TPM for a channel, and
validating any registered node of the cluster against *its* policy.

Shared by the Trusted Passages role, the CryptoVM role and the client side of enrollment.
"""

from __future__ import annotations

from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import VerificationError
from attestation.files import atomic_write, private_dir
from testbed.cluster.runtime import quoting_pcr10
from testbed.cluster.state import load_node_policy, load_registry, load_spec
from testbed.core.errors import StateError
from testbed.core.files import locked
from testbed.core.paths import ClusterPaths
from testbed.roles.base import NodeContext
from testbed.roles.revocation import RevocationGate
from testbed.tpm.boot import SIM_PCRS
from trusted_passages import BindingContext, Issuer, PeerEvidence, TpmValidator, binding_digest
from trusted_passages.envelope import Envelope, decode_envelope
from trusted_passages.pki import CertificateAuthority, make_ca

__all__ = ["HOST", "PROFILE", "ClusterValidator", "NodeIssuer", "cluster_tls_ca"]

HOST = "127.0.0.1"
PROFILE: Final = "tp13"


def cluster_tls_ca(paths: ClusterPaths) -> CertificateAuthority:
    """The cluster's TLS CA, created once (under a lock) in the cluster directory.

    Its key is a secret of the lab operator: 0600 in a 0700 directory. Nodes only use
    it to certify their own fresh keys.
    """
    directory = private_dir(paths.tls_ca_dir)
    cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
    with locked(directory / ".lock"):
        if not cert_path.exists():
            ca = make_ca(f"{paths.name} cluster TLS CA")
            atomic_write(key_path, ca.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            atomic_write(cert_path, ca.certificate.public_bytes(serialization.Encoding.PEM),
                         mode=0o644)
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateError(f"{key_path} is not an EC private key")
    return CertificateAuthority(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)


class NodeIssuer:
    """Quotes through the node's TPM (its lock, its AK) for one connection's binding."""

    def __init__(self, ctx: NodeContext, context: BindingContext | None = None) -> None:
        self._ctx = ctx
        self._context = context

    def bound(self, context: BindingContext) -> Issuer:
        return NodeIssuer(self._ctx, context)

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        if self._context is None:
            raise StateError("NodeIssuer used without a binding context")
        qualifying = binding_digest(self._context.profile, self._context.role, nonce, user_data)
        proof = None
        if self._ctx.batched_quote is None:
            evidence = self._ctx.quote(qualifying, SIM_PCRS)
        else:  # one quote with the verifier's challenges and other sessions of the window
            evidence, proof = self._ctx.batched_quote(qualifying)
        return Envelope(self._ctx.name, self._context.role, self._context.profile, user_data,
                        evidence.to_dict(), proof).to_json()


class ClusterValidator:
    """Validates any registered node of the cluster against *that* node's policy.

    The envelope's node claim only selects which registry entry and policy apply;
    ``AkRegistry.for_node`` then insists the AK really is that node's. Registry and
    policy are re-read per validation: ``testbed up`` registers nodes after they start.
    Given the node's revocation gate, a node the verifier revoked is refused first.
    """

    def __init__(self, paths: ClusterPaths, revocations: RevocationGate | None = None) -> None:
        self._paths = paths
        self._revocations = revocations

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        claimed = decode_envelope(evidence).node
        if claimed not in {n.name for n in load_spec(self._paths).nodes}:
            raise VerificationError("ak_trust", f"{claimed!r} is not a node of this cluster")
        if self._revocations is not None and self._revocations.is_revoked(claimed):
            raise VerificationError("revocation", f"node {claimed!r} is revoked by the "
                                    "verifier (until an operator reinstates it)")
        registry = load_registry(self._paths).for_node(claimed)
        # PCR 10 is the ima-ng log's, judged by the verifier's runtime check: a batched
        # quote, shared with the verifier's challenge, covers it too.
        policy = quoting_pcr10(load_node_policy(self._paths, claimed))
        return TpmValidator(registry, policy).validate(evidence, nonce)
