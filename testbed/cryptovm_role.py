"""The `cryptovm` role: a CryptoVM (virtual security module) inside a sim node process.

On the node's first start the CryptoVM is created in ``nodes/NODE/state/cryptovm/``
(beside the swtpm state, so ``testbed down`` keeps it and ``--purge`` removes it), its
storage key sealed to the node's measured-boot PCRs (:data:`testbed.sim.SIM_PCRS`); the
root account's PSK is written once, 0600, to ``nodes/NODE/state/cryptovm-root.psk``, and
a TLS-issuing CA is created inside the VSM (a non-exportable sign-only key). Later
starts unseal the store through the node's TPM - which only works in the measured state
it was sealed in: a node booted tampered fails to start, naming the PCRs that differ.

All TPM use goes through the node's only connection, under its TPM lock.

Two listeners, both on 127.0.0.1 with ephemeral ports recorded in ``run/cryptovm.json``:

* the CVM1 wire protocol (:mod:`cryptovm.server`: TLS 1.3, PSK or client-certificate
  accounts) - what an operator or a tenant uses with the root PSK;
* a Trusted Passages listener for testbed nodes: the peer is authenticated by its
  attestation (verified against the cluster's AK registry and its predicted policy),
  acts as the VSM account ``node.<name>`` and speaks CVM1 frames over the channel
  (:mod:`cryptovm.attested`). Every request is privilege-checked and audited; a
  refused channel is audited as a denied ``auth`` naming the failed check.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from attestation.errors import EvidenceFormatError, TestbedError
from attestation.tpm import TpmClient
from attestation.verifier import QuoteVerifier
from cryptovm.attested import StreamClient, refuse_stream, serve_stream
from cryptovm.errors import AuthenticationFailed, SealedStorageError
from cryptovm.fileio import atomic_write
from cryptovm.keyattest import KeyAttestation, verify_key_attestation
from cryptovm.sealing import format_pcr_selection
from cryptovm.server import CryptoVmServer
from cryptovm.tlsissuer import certificate_info, spki_der
from cryptovm.vsm import CryptoVm
from testbed.errors import StateError
from testbed.roles import NodeContext
from testbed.sim import SIM_PCRS, ClusterPaths, load_registry, node_policy, write_atomic
from testbed.tp_role import HOST, PROFILE, ClusterValidator, NodeIssuer, cluster_tls_ca
from trusted_passages import (
    AttestationRejected,
    AttestedChannel,
    ChannelConfig,
    PeerEvidence,
    Server,
    connect,
    serve,
)
from trusted_passages import ProtocolError as ChannelError
from trusted_passages.envelope import decode_envelope
from trusted_passages.pki import PrivateKey, generate_key, issue_certificate

STATE_NAME = "cryptovm"
PSK_NAME = "cryptovm-root.psk"
INFO_NAME = "cryptovm.json"
IDLE_TIMEOUT_S = 30.0


def state_dir(node_state: Path) -> Path:
    return node_state / STATE_NAME


def psk_path(node_state: Path) -> Path:
    return node_state / PSK_NAME


# --- the store -------------------------------------------------------------------------------


@contextmanager
def node_tpm(ctx: NodeContext) -> Iterator[TpmClient]:
    """The node's TPM connection, lent under its lock (swtpm serves one connection)."""
    with ctx.tpm_lock:
        if ctx.stopping.is_set():
            raise StateError(f"node {ctx.name} is shutting down")
        yield ctx.tpm


def open_store(ctx: NodeContext) -> CryptoVm:
    """Create the CryptoVM on the first start, unseal it on later ones."""
    options: dict[str, Any] = {"tpm_access": lambda: node_tpm(ctx), "event_log": ctx.event_log,
                               "audit_sync_each": False}
    path = state_dir(ctx.state_dir)
    if not (path / "cryptovm.json").exists():  # the manifest, written last by initialize
        vm, root_psk = CryptoVm.initialize(path, ctx.tcti, pcrs=format_pcr_selection(SIM_PCRS),
                                           **options)
        # The only copy an operator gets; the PSK never goes to a log.
        atomic_write(psk_path(ctx.state_dir), (root_psk.hex() + "\n").encode())
    else:
        try:
            vm = CryptoVm.open(path, ctx.tcti, **options)
        except SealedStorageError as exc:
            raise SealedStorageError(
                f"node {ctx.name} cannot open its CryptoVM store: {exc}. It unseals only in "
                "the measured state it was created in: boot the node's original chain "
                "(`testbed down`, then `testbed up` without --tamper), or start over with "
                "`testbed down --purge`") from None
    try:
        if vm.tls_ca is None:  # first start (or a start interrupted before this step)
            vm.local_root().tls_ca_setup(common_name=f"{ctx.cluster.name} CryptoVM TLS CA")
        vm.audit.sync()
    except BaseException:
        vm.close()
        raise
    return vm


# --- the CVM1 wire server, on a thread with its own event loop --------------------------------


class WireThread:
    """:class:`CryptoVmServer` on 127.0.0.1, ephemeral port, in a thread of its own."""

    def __init__(self, vm: CryptoVm) -> None:
        self.server = CryptoVmServer(vm, host=HOST, port=0, idle_timeout=IDLE_TIMEOUT_S)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cryptovm-wire", daemon=True)

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise StateError(f"the CryptoVM wire server did not start: {self._error}")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except Exception as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self.server.close())
            self._loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


# --- the Trusted Passages listener for testbed nodes --------------------------------------


class AuditingValidator:
    """The cluster validator, remembering (per connection thread) which node the
    evidence claimed, so that a refused channel is audited under that node's name."""

    def __init__(self, paths: ClusterPaths) -> None:
        self._inner = ClusterValidator(paths)
        self._claims = threading.local()

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        self._claims.node = None
        with contextlib.suppress(EvidenceFormatError):
            self._claims.node = decode_envelope(evidence).node
        return self._inner.validate(evidence, nonce)

    def claimed(self) -> str | None:
        node = getattr(self._claims, "node", None)
        return node if isinstance(node, str) else None


@dataclass
class CryptoVmService:
    """The running role: the store, the wire server, the attested listener."""

    ctx: NodeContext
    vm: CryptoVm
    wire: WireThread
    validator: AuditingValidator
    tp: Server | None = None
    channels: int = 0
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tp_port(self) -> int:
        return self.tp.address[1] if self.tp is not None else 0

    def describe(self) -> str:
        ca = self.vm.tls_ca
        return (f"CryptoVM: CVM1 on {HOST}:{self.wire.port} (root PSK in "
                f"{psk_path(self.ctx.state_dir)}), Trusted Passages {PROFILE} on "
                f"{HOST}:{self.tp_port} for attested nodes ({self.channels} channels, "
                f"{self.refused} refused); {len(self.vm.keys.ids())} keys, TLS CA key "
                f"{ca.key_id if ca else '-'!r} (non-exportable, sign-only)")

    def info(self) -> dict[str, Any]:
        ca = self.vm.tls_ca
        return {"node": self.ctx.name, "wire_port": self.wire.port, "tp_port": self.tp_port,
                "profile": PROFILE, "state_dir": str(self.vm.state.path),
                "root_psk_file": str(psk_path(self.ctx.state_dir)),
                "ca_certificate_file": str(self.vm.state.ca_pem),
                "tls_ca_key_id": ca.key_id if ca else None,
                "tls_ca_certificate": ca.pem.decode() if ca else None,
                "keys": len(self.vm.keys.ids())}

    def call(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action == "info":
            return self.info()
        raise StateError(f"unknown action {action!r}: the CryptoVM service knows info")

    def stop(self) -> None:
        if self.tp is not None:
            self.tp.close(timeout=2)
        self.wire.stop()
        self.vm.close()
        with contextlib.suppress(FileNotFoundError):
            (self.ctx.run_dir / INFO_NAME).unlink()

    # --- attested channels ------------------------------------------------------------

    def handle(self, channel: AttestedChannel) -> None:
        peer = channel.peer
        if not peer.node_verified:  # ClusterValidator pins the AK; this is a second lock
            self._refuse(peer.node, "ak_trust", "the node's AK is not in the registry")
            return
        with self._lock:
            self.channels += 1
        try:
            session = self.vm.attested_session(peer.node)
        except AuthenticationFailed as exc:  # e.g. root disabled node.<name>; audited
            self.vm.audit.sync()
            refuse_stream(lambda: _recv(channel), channel.send, exc)
            return
        serve_stream(self.vm, session, lambda: _recv(channel), channel.send)

    def refused_channel(self, exc: AttestationRejected) -> None:
        side = " (refused by the node)" if exc.by_peer else ""
        self._refuse(self.validator.claimed(), exc.check, exc.reason + side)

    def _refuse(self, node: str | None, check: str, reason: str) -> None:
        with self._lock:
            self.refused += 1
        self.vm.audit_attestation_failure(node, check, reason)
        self.vm.audit.sync()


def _recv(channel: AttestedChannel) -> bytes:
    """The channel's next bytes; b"" at its end or after the idle timeout."""
    try:
        return channel.recv(timeout=IDLE_TIMEOUT_S)
    except ChannelError:
        return b""


def _tp_config(ctx: NodeContext, vm: CryptoVm, validator: AuditingValidator) -> ChannelConfig:
    """Bootstrap identity (cluster CA), trusting the cluster CA (nodes enrolling) and the
    VSM's TLS CA (nodes already holding a VSM certificate)."""
    key = generate_key(PROFILE)
    ca = cluster_tls_ca(ctx.cluster_paths)
    trusted = [ca.certificate] + ([vm.tls_ca.certificate] if vm.tls_ca else [])
    return ChannelConfig(certificate=issue_certificate(ca, ctx.name, key), private_key=key,
                         ca_certificates=trusted, issuer=NodeIssuer(ctx), validator=validator,
                         profile=PROFILE, timeout=10.0)


def start_cryptovm_service(ctx: NodeContext) -> CryptoVmService:
    vm = open_store(ctx)
    service: CryptoVmService | None = None
    try:
        wire = WireThread(vm)
        validator = AuditingValidator(ctx.cluster_paths)
        service = CryptoVmService(ctx, vm, wire, validator)
        wire.start()
        service.tp = serve(HOST, 0, _tp_config(ctx, vm, validator), service.handle,
                           on_failure=service.refused_channel)
        write_atomic(ctx.run_dir / INFO_NAME, json.dumps(service.info(), indent=1))
    except BaseException:
        if service is not None:
            service.stop()
        else:
            vm.close()
        raise
    return service


def cryptovm_info(paths: ClusterPaths, node: str) -> dict[str, Any]:
    """What a cryptovm node recorded in its run dir (ports, PSK file, CA)."""
    path = paths.node(node).run / INFO_NAME
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        raise StateError(f"node {node!r} runs no CryptoVM service (is it a cryptovm node, "
                         "and up? `testbed status`)") from None
    if not isinstance(info, dict) or not isinstance(info.get("tp_port"), int):
        raise StateError(f"{path} is damaged: `testbed down` and `testbed up` the node")
    return info


# --- enrolling a server or client node (keyless TLS) ----------------------------------------


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
    names = [n.name for n in paths.load_spec().nodes if n.role == "cryptovm"]
    if not names:
        raise StateError(f"cluster {paths.name!r} has no cryptovm node to enroll with: add a "
                         "node with role: cryptovm to the spec")
    return names[0]


def enroll(ctx: NodeContext, bootstrap: ChannelConfig, validity: int) -> Enrollment:
    """Get a TLS certificate for a fresh key of this node from the cluster's CryptoVM.

    Over an attested channel (this node's cluster-CA bootstrap identity; the CryptoVM
    node must pass *this* node's validation too): ``tls_enroll`` with a CSR, and
    ``attest`` of the CA key for a fresh nonce. Nothing is used unless the certificate
    is for this key and name, chains to the CA, and the CA key's attestation verifies
    (generated inside the VSM, non-exportable, the CryptoVM node in its measured state).
    """
    cvm = cryptovm_node(ctx.cluster_paths)
    port = cryptovm_info(ctx.cluster_paths, cvm)["tp_port"]
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
                             policy=node_policy(paths.load_spec().node(cvm)))
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


__all__ = [
    "CryptoVmService",
    "Enrollment",
    "cryptovm_info",
    "cryptovm_node",
    "enroll",
    "node_tpm",
    "open_store",
    "psk_path",
    "start_cryptovm_service",
    "state_dir",
]
