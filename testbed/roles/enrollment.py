"""Keyless TLS, the client side: a server or client node gets its TLS certificate from
the cluster's CryptoVM for a key generated in the node (docs/cryptovm.md).

Over an attested channel (the node's cluster-CA bootstrap identity; the CryptoVM node
must pass *this* node's validation too): ``tls_enroll`` with a CSR, and ``attest`` of the
CA key for a fresh nonce. Nothing is used unless the certificate is for this key and
name, chains to the CA, and the CA key's attestation verifies (generated inside the VSM,
non-exportable, the CryptoVM node in its measured state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from attestation.errors import TestbedError
from attestation.verifier import QuoteVerifier
from cryptovm.attested import StreamClient
from cryptovm.keyattest import KeyAttestation, verify_key_attestation
from cryptovm.tlsissuer import certificate_info, spki_der
from testbed.cluster.state import load_node_policy, load_registry, load_spec
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.roles.base import NodeContext
from testbed.roles.cryptovm import published_service
from testbed.roles.trust import HOST, PROFILE
from trusted_passages import ChannelConfig, connect
from trusted_passages.pki import PrivateKey, generate_key

__all__ = ["Enrollment", "cryptovm_node", "enroll", "verify_ca_key"]


@dataclass(frozen=True)
class Enrollment:
    """A VSM-issued certificate for a key generated in this node, and its verified CA."""

    cryptovm: str
    certificate: x509.Certificate
    private_key: PrivateKey = field(repr=False)
    ca_certificate: x509.Certificate
    ca: dict[str, Any]  # the CA key's attestation summary

    @property
    def info(self) -> dict[str, Any]:
        return certificate_info(self.certificate)


def cryptovm_node(paths: ClusterPaths) -> str:
    names = [n.name for n in load_spec(paths).nodes if n.role == "cryptovm"]
    if not names:
        raise StateError(f"cluster {paths.name!r} has no cryptovm node to enroll with: add a "
                         "node with role: cryptovm to the spec")
    return names[0]


def enroll(ctx: NodeContext, bootstrap: ChannelConfig, validity: int) -> Enrollment:
    """Get a TLS certificate for a fresh key of this node from the cluster's CryptoVM."""
    cvm = cryptovm_node(ctx.cluster_paths)
    port = published_service(ctx.cluster_paths, cvm).tp_port
    if port is None:
        raise StateError(f"CryptoVM node {cvm!r} has no listener for attested nodes")
    key = generate_key(PROFILE)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ctx.name)]))
           .sign(key, hashes.SHA256()))
    nonce = os.urandom(32)
    try:
        with connect(HOST, port, bootstrap.with_expected_peer(cvm)) as channel:
            vsm = StreamClient(channel.recv, channel.send)
            issued = vsm.call("tls_enroll", csr=csr.public_bytes(serialization.Encoding.DER),
                              validity=validity)
            attested = vsm.call("attest", key_id=issued["ca_key_id"], nonce=nonce)
    except TestbedError as exc:
        raise StateError(f"enrollment of {ctx.name} with CryptoVM node {cvm!r} failed: "
                         f"{exc}") from None
    certificate = x509.load_pem_x509_certificate(issued["certificate"])
    ca_certificate = x509.load_pem_x509_certificate(issued["ca_certificate"])
    _check_issued(ctx.name, certificate, ca_certificate, key)
    ca = verify_ca_key(ctx.cluster_paths, cvm, attested["attestation"], nonce, ca_certificate,
                       issued["ca_key_id"])
    return Enrollment(cvm, certificate, key, ca_certificate, ca)


def _check_issued(node: str, certificate: x509.Certificate, ca: x509.Certificate,
                  key: PrivateKey) -> None:
    try:
        certificate.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise StateError("the CryptoVM returned a certificate its CA did not sign") from None
    own = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    if spki_der(certificate) != own or certificate_info(certificate)["subject"] != node:
        raise StateError(f"the CryptoVM returned a certificate for another key or name than "
                         f"{node}'s")


def verify_ca_key(paths: ClusterPaths, cvm: str, document: object, nonce: bytes,
                  ca_certificate: x509.Certificate, key_id: str) -> dict[str, Any]:
    """Check the CryptoVM's key attestation of its CA key; a summary, or StateError."""
    attestation = KeyAttestation.from_dict(document)
    verifier = QuoteVerifier(ak_trust=load_registry(paths).for_node(cvm),
                             policy=load_node_policy(paths, cvm))
    report = verify_key_attestation(attestation, nonce, verifier, expected_key_id=key_id)
    if not report.ok or attestation.public != spki_der(ca_certificate):
        failure = report.failure
        why = (f"{failure.name}: {failure.detail}" if failure is not None
               else "it attests another key than the CA certificate's")
        raise StateError(f"the key attestation of CryptoVM {cvm!r}'s TLS CA key failed "
                         f"({why}): its certificates are not used")
    attributes = attestation.attributes
    return {"issuer": certificate_info(ca_certificate)["subject"], "key_id": key_id,
            "algorithm": attributes.get("algorithm"), "usage": attributes.get("usage"),
            "origin": attributes.get("origin"), "non_exportable": True,
            "attested_by": cvm, "key_attestation": "verified",
            "checks": [c.name for c in report.checks if c.passed]}
