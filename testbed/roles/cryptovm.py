"""The ``cryptovm`` role: a CryptoVM (virtual security module) on a node of the cluster.

**Node side** (inside a sim node process). On the node's first start the CryptoVM is
created in ``nodes/NODE/state/cryptovm/`` (beside the swtpm state, so ``testbed down``
keeps it and ``--purge`` removes it), its storage key sealed to the node's
measured-boot PCRs; the root account's PSK is written once, 0600, to
``nodes/NODE/state/cryptovm-root.psk``, and a TLS-issuing CA is created inside the VSM
(a non-exportable sign-only key). Later starts unseal the store through the node's TPM,
which only works in the measured state it was sealed in: a node booted tampered fails
to start, naming the PCRs that differ. All TPM use goes through the node's only
connection, under its TPM lock. Two listeners on 127.0.0.1:

* the CVM1 wire protocol (:mod:`cryptovm.server`: TLS 1.3, PSK or client-certificate
  accounts), what an operator or a tenant uses with the root PSK;
* a Trusted Passages listener for testbed nodes: the peer is authenticated by its
  attestation (the cluster's AK registry and its policy), acts as the VSM account
  ``node.<name>`` and speaks CVM1 frames over the channel (:mod:`cryptovm.attested`).
  Every request is privilege-checked and audited; a refused channel is audited as a
  denied ``auth`` naming the failed check. A node the verifier revoked
  (:mod:`testbed.roles.revocation`) is refused (check ``revocation``), its account
  ``node.<name>`` disabled and listed in ``run/cryptovm-revoked.json`` until reinstated.

**VM side** (a qemu VM, after it was attested): the CryptoVM runs *inside* the guest
(:mod:`testbed.qemu.guest.cryptovm_extension`), sealed to the VM's own vTPM PCRs 0-9. The host asks
the guest agent to start it, keeps the root PSK it returns on first start (the same file
as a sim node's) and publishes the CVM1 endpoint, the VM's forwarded port.

Either way the node's ``run/cryptovm.json`` (:class:`PublishedCryptoVm`) says where its
CVM1 endpoint is; :func:`cryptovm_endpoint` reaches it as root. A VM placed on a lab host
(docs/hosts.md) has its forwarded port on *that host's* loopback (``lab_host``): its
endpoint's client dials a one-connection listener on the lab's loopback that the hosts
room relays over SSH (:func:`register_host_forward`; this layer cannot import it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Self

from attestation.errors import EvidenceFormatError, TestbedError
from attestation.files import atomic_write, private_dir
from cryptovm.attested import refuse_stream, serve_stream
from cryptovm.client import CryptoVmClient
from cryptovm.disks import disk_key_id, ensure_disk_key
from cryptovm.errors import AccessDenied, AuthenticationFailed, SealedStorageError
from cryptovm.sealing import TpmSealer, format_pcr_selection
from cryptovm.server import ServerThread
from cryptovm.vsm import CryptoVm, node_account
from testbed.cluster.agent import AgentClient
from testbed.cluster.results import ServiceEndpoint, ServiceInfo
from testbed.cluster.state import load_spec
from testbed.core.errors import StateError
from testbed.core.files import read_json
from testbed.core.paths import ClusterPaths
from testbed.roles.base import InfoRequest, NodeContext, RoleRequest, decode_request
from testbed.roles.revocation import Reinstate, RevocationEvent, RevocationGate
from testbed.roles.trust import HOST, PROFILE, ClusterValidator, NodeIssuer, cluster_tls_ca
from testbed.svd.volumes import DiskFiles, attach_sealed, detach, mount_filesystem
from testbed.tpm.boot import SIM_PCRS
from trusted_passages import (
    AttestationRejected,
    AttestedChannel,
    ChannelConfig,
    PeerEvidence,
    Server,
    serve,
)
from trusted_passages import ProtocolError as ChannelError
from trusted_passages.envelope import decode_envelope
from trusted_passages.pki import generate_key, issue_certificate

__all__ = [
    "GUEST_PORTS",
    "VM_PCRS",
    "CryptoVmEndpoint",
    "CryptoVmService",
    "PublishedCryptoVm",
    "cryptovm_endpoint",
    "grant_guest_disks",
    "open_store",
    "psk_path",
    "publish_on_host",
    "published_service",
    "register_host_forward",
    "start_node_service",
    "start_vm_service",
    "state_dir",
    "store_disk",
]

STATE_NAME = "cryptovm"
PSK_NAME = "cryptovm-root.psk"
INFO_NAME = "cryptovm.json"
REVOKED_NAME = "cryptovm-revoked.json"  # the revocation list it publishes (run/)
IDLE_TIMEOUT_S = 30.0
log = logging.getLogger("testbed.roles.cryptovm")
VM_PCRS = "sha256:0-9"  # what OVMF measured: firmware, kernel, initrd, command line
GUEST_PORTS = {"cvm1": 9302}
"""The guest services a VM of this role forwards to the host (name -> guest port)."""


def state_dir(node_state: Path) -> Path:
    return node_state / STATE_NAME


def psk_path(node_state: Path) -> Path:
    return node_state / PSK_NAME


# --- where a node's CryptoVM is reached ----------------------------------------------------


@dataclass(frozen=True)
class PublishedCryptoVm:
    """A running CryptoVM's endpoints, as its node publishes them in ``run/cryptovm.json``."""

    node: str
    host: str
    wire_port: int  # CVM1 (a qemu VM's: its forwarded port)
    ca_pem: str  # the CVM1 server's CA certificate
    pcr_selection: str  # what the store is sealed to
    in_vm: bool
    tp_port: int | None = None  # the attested listener for nodes (sim nodes)
    lab_host: str | None = None  # a placed VM's host: wire_port is on that host's loopback

    def save(self, paths: ClusterPaths) -> None:
        run = private_dir(paths.node(self.node).run)
        atomic_write(run / INFO_NAME, (json.dumps(asdict(self), indent=1) + "\n").encode())

    @classmethod
    def load(cls, paths: ClusterPaths, node: str) -> Self:
        path = paths.node(node).run / INFO_NAME
        doc = None
        with contextlib.suppress(StateError):
            doc = read_json(path)
        if not isinstance(doc, dict):
            raise StateError(f"node {node!r} runs no CryptoVM service: is the cluster up? "
                             "(`testbed status`; `testbed up` starts it)")
        try:
            published = cls(**doc)
        except TypeError:
            raise StateError(f"{path} is damaged: `testbed down` and `testbed up` the "
                             "node") from None
        if (not isinstance(published.wire_port, int) or not isinstance(published.ca_pem, str)
                or "-----BEGIN CERTIFICATE-----" not in published.ca_pem
                or not isinstance(published.lab_host, str | None)):
            raise StateError(f"{path} is damaged: `testbed down` and `testbed up` the node")
        return published


def published_service(paths: ClusterPaths, node: str) -> PublishedCryptoVm:
    return PublishedCryptoVm.load(paths, node)


def publish_on_host(paths: ClusterPaths, node: str, lab_host: str) -> ServiceInfo | None:
    """Record that ``node``'s CryptoVM runs in a VM placed on ``lab_host`` (its forwarded
    port is on that host's loopback); what ``status`` shows of it, None if it runs none."""
    try:
        published = PublishedCryptoVm.load(paths, node)
    except StateError:
        return None
    replace(published, lab_host=lab_host).save(paths)
    return ServiceInfo("cryptovm", (ServiceEndpoint("cvm1", f"{lab_host}:127.0.0.1",
                                                    published.wire_port),), {},
                       {"runs_in": "vm", "sealed_to": published.pcr_selection,
                        "reached": "through SSH to its host"})


HostForward = Callable[[Path, str, int], tuple[str, int]]
"""(work directory, lab host, port on that host's loopback) -> an address on the lab's
loopback that accepts one connection and relays it there."""
_HOST_FORWARDS: list[HostForward] = []


def register_host_forward(forward: HostForward) -> None:
    """The hosts room's relay to a placed VM's port (idempotent; the last one counts)."""
    if forward not in _HOST_FORWARDS:
        _HOST_FORWARDS.append(forward)


@dataclass(frozen=True)
class CryptoVmEndpoint:
    """How the host reaches a node's CryptoVM as root: CVM1 on loopback, the root PSK.

    For a VM placed on a lab host (``lab_host``), ``port`` is on that host's loopback and
    each client goes through a relay of its own (:data:`HostForward`)."""

    node: str
    host: str
    port: int
    ca_pem: bytes
    psk: bytes = field(repr=False)
    lab_host: str | None = None
    workdir: Path | None = None

    def client(self, **options: Any) -> CryptoVmClient:
        address, port = self.host, self.port
        if self.lab_host is not None:
            if not _HOST_FORWARDS or self.workdir is None:
                raise StateError(f"node {self.node}'s CryptoVM runs on {self.lab_host}, and "
                                 "the hosts room (which reaches it) is not loaded")
            address, port = _HOST_FORWARDS[-1](self.workdir, self.lab_host, self.port)
        return CryptoVmClient(address, port, ca_pem=self.ca_pem, account="root",
                              psk=self.psk, **options)

    def describe(self) -> str:
        where = f"{self.host}:{self.port}"
        return f"{where} on {self.lab_host} (through SSH)" if self.lab_host else where


def cryptovm_endpoint(paths: ClusterPaths, node: str) -> CryptoVmEndpoint:
    """The CVM1 endpoint and root PSK of a running cryptovm node (sim or qemu)."""
    published = published_service(paths, node)
    try:
        psk = bytes.fromhex(psk_path(paths.node(node).state).read_text().strip())
    except (OSError, ValueError) as exc:
        raise StateError(f"node {node}: its root PSK is unreadable ({exc}); was the CryptoVM "
                         "created by this work directory?") from None
    return CryptoVmEndpoint(node, published.host, published.wire_port,
                            published.ca_pem.encode(), psk, published.lab_host, paths.workdir)


# --- node side: the store and its listeners -------------------------------------------------


def store_disk(ctx: NodeContext) -> DiskFiles | None:
    """The node's store disk (docs/svd.md), if its spec gives it one."""
    if not ctx.spec.disks:
        return None
    return DiskFiles(ctx.name, ctx.spec.disks[0].name, ctx.state_dir, ctx.run_dir)


def _open_store_disk(ctx: NodeContext, files: DiskFiles) -> Path:
    """Unlock the store disk with its passphrase sealed to this node's measured-boot PCRs
    (nothing below the CryptoVM could release it), and mount its file system."""
    sealer = TpmSealer(ctx.tcti, SIM_PCRS, tpm_access=ctx.tpm_session)
    try:
        new = attach_sealed(files, ctx.spec.disks[0], sealer)
    except SealedStorageError as exc:
        raise SealedStorageError(
            f"node {ctx.name} cannot unlock its store disk: {exc}. Its key is sealed to the "
            "measured state the disk was created in: boot the node's original chain, or "
            "start over with `testbed down --purge`") from None
    try:
        return mount_filesystem(files, new=new)
    except BaseException:
        detach(files)
        if new:  # no file system yet: the next start formats the disk again
            for path in (files.image, files.sealed):
                path.unlink(missing_ok=True)
        raise


def open_store(ctx: NodeContext) -> CryptoVm:
    """Create the CryptoVM on the first start, unseal it on later ones; on its store
    disk when the node has one."""
    files = store_disk(ctx)
    base = _open_store_disk(ctx, files) if files is not None else ctx.state_dir
    try:
        return _open_store(ctx, state_dir(base))
    except BaseException:
        if files is not None:
            detach(files)
        raise


def _open_store(ctx: NodeContext, path: Path) -> CryptoVm:
    options: dict[str, Any] = {"tpm_access": ctx.tpm_session, "event_log": ctx.event_log,
                               "audit_sync_each": False}
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


class AuditingValidator:
    """The cluster validator, remembering (per connection thread) which node the
    evidence claimed, so that a refused channel is audited under that node's name."""

    def __init__(self, paths: ClusterPaths, revocations: RevocationGate | None = None) -> None:
        self._inner = ClusterValidator(paths, revocations)
        self._claims = threading.local()

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        self._claims.node = None
        with contextlib.suppress(EvidenceFormatError):
            self._claims.node = decode_envelope(evidence).node
        return self._inner.validate(evidence, nonce)

    def claimed(self) -> str | None:
        node = getattr(self._claims, "node", None)
        return node if isinstance(node, str) else None


# --- guest-side disks (docs/svd.md) ----------------------------------------------------


def grant_guest_disks(vm: CryptoVm, paths: ClusterPaths, node: str) -> list[str]:
    """Ensure ``node``'s guest-disk keys exist and its account may use them; the key ids."""
    spec = load_spec(paths)
    disks = [d for n in spec.nodes if n.name == node for d in n.disks if d.mode == "guest"]
    if not disks:
        return []
    root = vm.local_root()

    def call(op: str, **args: Any) -> dict[str, Any]:
        result: dict[str, Any] = getattr(root, op)(**args)
        return result

    account = node_account(node)
    reference, registry = paths.policy(node).read_text(), paths.registry.read_text()
    key_ids = []
    for disk in disks:
        ensure_disk_key(call, node, disk.name, reference, registry)
        key_id = disk_key_id(node, disk.name)
        wanted = [f"key:{key_id}:release", f"key:{key_id}:public"]
        held = vm.accounts.get(account).privileges
        if not set(wanted) <= set(held):
            root.account_grant(account, wanted)
        key_ids.append(key_id)
    vm.audit.sync()
    return key_ids


REQUESTS: tuple[type[RoleRequest], ...] = (InfoRequest,)


@dataclass
class CryptoVmService:
    """The running role: the store, the wire server, the attested listener."""

    ctx: NodeContext
    vm: CryptoVm
    wire: ServerThread
    validator: AuditingValidator
    tp: Server | None = None
    channels: int = 0
    refused: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tp_port(self) -> int:
        return self.tp.address[1] if self.tp is not None else 0

    def describe(self) -> ServiceInfo:
        ca = self.vm.tls_ca
        facts = {"profile": PROFILE, "root_psk_file": str(psk_path(self.ctx.state_dir))}
        if ca is not None:
            facts["tls_ca_key"] = ca.key_id  # non-exportable, sign-only
        return ServiceInfo("cryptovm",
                           (ServiceEndpoint("cvm1", HOST, self.wire.port),
                            ServiceEndpoint("trusted-passages", HOST, self.tp_port)),
                           {"channels": self.channels, "refused": self.refused,
                            "keys": len(self.vm.keys.ids())}, facts)

    def published(self) -> PublishedCryptoVm:
        return PublishedCryptoVm(self.ctx.name, HOST, self.wire.port,
                                 self.vm.state.ca_pem.read_text(),
                                 format_pcr_selection(SIM_PCRS), in_vm=False,
                                 tp_port=self.tp_port)

    def info(self) -> dict[str, Any]:
        ca = self.vm.tls_ca
        return {**asdict(self.published()), "profile": PROFILE,
                "state_dir": str(self.vm.state.path),
                "root_psk_file": str(psk_path(self.ctx.state_dir)),
                "ca_certificate_file": str(self.vm.state.ca_pem),
                "tls_ca_key_id": ca.key_id if ca else None,
                "tls_ca_certificate": ca.pem.decode() if ca else None,
                "keys": len(self.vm.keys.ids())}

    def call(self, action: str, args: Mapping[str, Any]) -> dict[str, Any]:
        decode_request(REQUESTS, action, args, "CryptoVM service")
        return self.info()

    def stop(self) -> None:
        if self.tp is not None:
            self.tp.close(timeout=2)
        self.wire.stop()
        self.vm.close()
        files = store_disk(self.ctx)
        if files is not None:  # unmounted, then locked: the key dies with its daemon
            detach(files)
        with contextlib.suppress(FileNotFoundError):
            (self.ctx.run_dir / INFO_NAME).unlink()

    # --- attested channels ------------------------------------------------------------

    def handle(self, channel: AttestedChannel) -> None:
        peer = channel.peer
        if not peer.node_verified:  # ClusterValidator pins the AK; this is a second lock
            self._refuse(peer.node, "ak_trust", "the node's AK is not in the registry")
            return
        if self.ctx.revocations.is_revoked(peer.node):  # the validator refuses it first
            self._refuse(peer.node, "revocation", "the node is revoked by the verifier")
            refuse_stream(lambda: _recv(channel), channel.send,
                          AccessDenied("revocation", f"node {peer.node!r} is revoked"))
            return
        with self._lock:
            self.channels += 1
        try:
            session = self.vm.attested_session(peer.node)
        except AuthenticationFailed as exc:  # e.g. root disabled node.<name>; audited
            self.vm.audit.sync()
            refuse_stream(lambda: _recv(channel), channel.send, exc)
            return
        try:
            grant_guest_disks(self.vm, self.ctx.cluster_paths, peer.node)
        except (TestbedError, OSError) as exc:  # its release is then refused (privilege)
            log.warning("guest disks of %s not prepared: %s", peer.node, exc)
        serve_stream(self.vm, session, lambda: _recv(channel), channel.send)

    # --- revocation -------------------------------------------------------------------

    def revoked(self, event: RevocationEvent) -> dict[str, Any]:
        """Stop serving the node: its account disabled (no release, no enrollment, no
        login by any means), its client certificates removed, and every TLS certificate
        this CA issued to it listed as revoked in ``run/cryptovm-revoked.json``."""
        disabled = self._set_account(event.node, enabled=False)
        self._publish_revoked()
        return {"account_disabled": disabled, "revocation_list": str(self._revoked_path)}

    def reinstated(self, decision: Reinstate) -> dict[str, Any]:
        enabled = self._set_account(decision.node, enabled=True)
        self._publish_revoked()
        return {"account_enabled": enabled}

    def _set_account(self, node: str, *, enabled: bool) -> bool:
        name = node_account(node)
        if name not in self.vm.accounts.names():
            return False  # never contacted: the revocation gate refuses it all the same
        root = self.vm.local_root()
        root.account_enable(name, enabled)
        if not enabled:
            root.account_revoke_certificates(name)
        self.vm.audit.sync()
        return True

    @property
    def _revoked_path(self) -> Path:
        return self.ctx.run_dir / REVOKED_NAME

    def _publish_revoked(self) -> None:
        ca = self.vm.tls_ca
        revoked = [{"node": node, "subject": node, "since": event["time"],
                    "sequence": event["sequence"], "check": event["check"],
                    "certificates": f"every certificate for CN={node} this CA issued "
                                    f"before {event['time']}"}
                   for node, event in sorted(self.ctx.revocations.revoked.items())]
        doc = {"format": "testbed-cryptovm-revocations", "version": 1,
               "issuer": ca.certificate.subject.rfc4514_string() if ca else None,
               "sequence": self.ctx.revocations.sequence, "revoked": revoked}
        atomic_write(self._revoked_path, (json.dumps(doc, indent=1) + "\n").encode(),
                     mode=0o644)

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


def start_node_service(ctx: NodeContext) -> CryptoVmService:
    vm = open_store(ctx)
    service: CryptoVmService | None = None
    try:
        wire = ServerThread(vm, HOST, 0, IDLE_TIMEOUT_S)
        validator = AuditingValidator(ctx.cluster_paths, ctx.revocations)
        service = CryptoVmService(ctx, vm, wire, validator)
        wire.start()
        service.tp = serve(HOST, 0, _tp_config(ctx, vm, validator), service.handle,
                           on_failure=service.refused_channel)
        service.published().save(ctx.cluster_paths)
    except BaseException:
        if service is not None:
            service.stop()
        else:
            vm.close()
        raise
    return service


# --- VM side: the CryptoVM inside a qemu guest -----------------------------------------------


def start_vm_service(paths: ClusterPaths, node: str, agent: AgentClient,
                     service_ports: Mapping[str, int]) -> ServiceInfo:
    """Start the CryptoVM in ``node``'s VM; returns what ``status`` shows."""
    port = service_ports.get("cvm1")
    if port is None:
        raise StateError(f"node {node}: its VM has no CryptoVM port forward; "
                         "`testbed down` then `testbed up --backend qemu` to recreate it")
    # Its store disk (hot-plugged by the backend just before): the guest unseals it with
    # its vTPM; without one, the store lives in the guest's RAM (docs/svd.md).
    disks = load_spec(paths).node(node).disks
    request = {"op": "cvm_start", "pcrs": VM_PCRS,
               **({"store_disk": disks[0].name} if disks else {})}
    answer = agent.call(request)
    psk, ca_pem = answer.get("root_psk"), answer.get("ca_pem")
    if not isinstance(ca_pem, str):
        raise StateError(f"node {node}: the guest's CryptoVM gave no CA certificate")
    node_paths = paths.node(node)
    if isinstance(psk, str):  # first start of this VM's CryptoVM: shown once, kept 0600
        private_dir(node_paths.state)
        atomic_write(psk_path(node_paths.state), (psk + "\n").encode())
    PublishedCryptoVm(node, "127.0.0.1", port, ca_pem,
                      str(answer.get("pcr_selection") or VM_PCRS), in_vm=True).save(paths)
    return ServiceInfo("cryptovm", (ServiceEndpoint("cvm1", "127.0.0.1", port),), {},
                       {"runs_in": "vm", "sealed_to": VM_PCRS,
                        "store": str(answer.get("state") or "RAM")})
