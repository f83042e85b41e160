"""The attack lab's world: Alice the provider, Bob's server, his customer, and Alice's VMs.

Every node has its own uniquely provisioned swtpm (its own EK), a simulated
measured boot, an AK activated against its EK by the verifier's registrar, and a
TLS certificate from the provider's CA. Alice controls that CA, so *every*
node, hers included, holds CA-valid certificates: exactly the setting in which
plain mutual TLS cannot tell a secure VM from an insecure one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from cryptography import x509

from attestation.eventlog import EventLogBuilder, parse_event_log
from attestation.policy import ReferencePolicy, policy_from_evidence
from attestation.registrar import AkRegistry, Registrar, register
from attestation.tpm import LocalAttester, TpmClient
from attestation.tpm_types import PcrSelection
from attestation.verifier import ClockHistory
from testbed.spec.cluster_spec import Artifact, BootSpec
from testbed.tpm.boot import measure_boot
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm, provision
from trusted_passages import ChannelConfig, Issuer, TpmIssuer, TpmValidator
from trusted_passages.pki import CertificateAuthority, PrivateKey, generate_key, issue_certificate
from trusted_passages.pki import make_ca as make_tls_ca

GOOD_BOOT = BootSpec.from_content(firmware="OVMF firmware volume (lab)",
                                  kernel="vmlinuz-6.1.0-hypersafe",
                                  initrd="initrd.img-6.1.0-hypersafe",
                                  cmdline="console=ttyS0 ro quiet")
INSECURE_BOOT = replace(GOOD_BOOT, kernel=Artifact("content", "vmlinuz-6.1.0-stock-no-hypersafe"))
RUNTIME_PCR = 23  # resettable application PCR: the customer's runtime claims
AV_CURRENT = b"antivirus signatures: 2026.11.21 (up to date)"
AV_STALE = b"antivirus signatures: 2025.03.02 (stale)"
SERVER_PCRS = PcrSelection("sha256", (0, 1, 2, 3, 4, 5, 6, 7, 9))
CLIENT_PCRS = PcrSelection("sha256", (0, 1, 2, 3, 4, 5, 6, 7, 9, RUNTIME_PCR))
EV_EVENT_TAG = 0x6


@dataclass
class LabNode:
    """One machine: its TPM, boot log, TLS identity and Trusted Passages issuer."""

    name: str
    swtpm: Swtpm
    client: TpmClient
    log: EventLogBuilder
    selection: PcrSelection
    key: PrivateKey = field(repr=False)
    certificate: x509.Certificate
    issuer: TpmIssuer

    def event_log(self) -> bytes:
        return self.log.to_bytes()

    def reboot(self, chain: BootSpec) -> None:
        """Restart the TPM (PCRs reset) and measure ``chain``: same TPM, same AK, new state."""
        self.issuer.close()
        self.client.shutdown()
        self.client.close()
        self.swtpm.stop()
        self.swtpm.start()
        self.client = TpmClient(self.swtpm.tcti)
        self.log = _rebuild(measure_boot(self.client, chain))
        self.issuer = TpmIssuer(self.client, self.name, self.selection,
                                event_log=self.event_log)

    def measure_runtime(self, claim: bytes) -> None:
        """Reset the runtime PCR and measure ``claim`` into it (and into the log)."""
        with self.issuer.tpm_lock:
            self.client.reset_pcr(RUNTIME_PCR)
            self.log = _without_pcr(self.log, RUNTIME_PCR)
            event = self.log.add(RUNTIME_PCR, EV_EVENT_TAG, claim)
            self.client.extend_pcr(RUNTIME_PCR, event.digests)


def _without_pcr(log: EventLogBuilder, pcr: int) -> EventLogBuilder:
    fresh = EventLogBuilder(banks=log.banks, startup_locality=0)
    for event in log.events:
        if event.pcr != pcr and event.event_type != 0x3:  # EV_NO_ACTION is re-added
            fresh.add_digests(event.pcr, event.event_type, event.data, event.digests)
    return fresh


class Lab:
    """Creates the nodes; ``close()`` stops every swtpm and removes all state."""

    def __init__(self, root: Path | None = None) -> None:
        self._tmp = None if root else tempfile.mkdtemp(prefix="attack-lab-")
        self.root = root or Path(self._tmp or ".")
        self.ek_ca = LocalCA.ensure(self.root / "ek-ca")
        self.provider_ca: CertificateAuthority = make_tls_ca("Alice Cloud Provider CA")
        self.registrar = Registrar(self.ek_ca.ca_bundle())
        self.registry = AkRegistry()
        self.nodes: dict[str, LabNode] = {}
        self._lock = threading.Lock()
        self.policies: dict[str, ReferencePolicy] = {}
        self.clock = ClockHistory()
        self.closers: list[Callable[[], None]] = []  # worlds built on the lab (attacks.svd)

    def start(self) -> Lab:
        plan = {"server": (GOOD_BOOT, SERVER_PCRS, None), "client": (GOOD_BOOT, CLIENT_PCRS,
                                                                    AV_CURRENT),
                "insecure": (INSECURE_BOOT, SERVER_PCRS, None),
                "evil": (INSECURE_BOOT, CLIENT_PCRS, AV_CURRENT),
                "bystander": (GOOD_BOOT, SERVER_PCRS, None)}
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda n: self._provision(n), plan))
        for name, (chain, selection, claim) in plan.items():
            self._boot(name, chain, selection, claim)
        self.policies["server"] = self._policy_from("server")
        self.policies["client"] = self._policy_from("client")
        return self

    def _provision(self, name: str) -> None:
        provision(self.root / name, self.ek_ca)

    def _boot(self, name: str, chain: BootSpec, selection: PcrSelection,
              claim: bytes | None) -> None:
        swtpm = Swtpm(self.root / name).start()
        client = TpmClient(swtpm.tcti)
        log = _rebuild(measure_boot(client, chain))
        key = generate_key("tp13")
        cert = issue_certificate(self.provider_ca, name, key)
        node = LabNode(name, swtpm, client, log, selection, key, cert,
                       TpmIssuer(client, name, selection))
        node.issuer = TpmIssuer(client, name, selection, event_log=node.event_log)
        if claim is not None:
            node.measure_runtime(claim)
        self._register(node)
        self.nodes[name] = node

    def _register(self, node: LabNode) -> None:
        ak = register(LocalAttester(node.client), node.name, self.registrar, self.registry)
        if ak is not None:
            self.registry.add(node.name, ak)

    def _policy_from(self, name: str) -> ReferencePolicy:
        """The reference policy, created from the known-good node itself."""
        node = self.nodes[name]
        pcrs = node.client.read_pcrs(node.selection.bank, node.selection.indices)
        return policy_from_evidence(pcrs, parse_event_log(node.event_log()),
                                    name=f"{name}-known-good")

    # --- configurations --------------------------------------------------------------

    def tp_config(self, name: str, *, peer: str, certificate: x509.Certificate | None = None,
                  key: PrivateKey | None = None, issuer: Issuer | None = None,
                  ) -> ChannelConfig:
        """``name``'s Trusted Passages config expecting ``peer`` under its policy."""
        node = self.nodes[name]
        validator = TpmValidator(self.registry.for_node(peer), self.policies.get(peer),
                                 clock_history=None)
        return ChannelConfig(certificate=certificate or node.certificate,
                             private_key=key or node.key,
                             ca_certificates=[self.provider_ca.certificate],
                             issuer=issuer or node.issuer, validator=validator,
                             expected_peer=peer, timeout=5.0)

    def certificate_for(self, common_name: str) -> tuple[PrivateKey, x509.Certificate]:
        """Alice issues herself a CA-valid certificate for any name."""
        key = generate_key("tp13")
        return key, issue_certificate(self.provider_ca, common_name, key)

    def close(self) -> None:
        for closer in reversed(self.closers):
            with contextlib.suppress(Exception):
                closer()
        self.closers.clear()
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.issuer.close()
                node.client.close()
            node.swtpm.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rebuild(log_bytes: bytes) -> EventLogBuilder:
    """An EventLogBuilder holding the events of ``log_bytes`` (to append runtime events)."""
    parsed = parse_event_log(log_bytes)
    builder = EventLogBuilder(banks=tuple(parsed.banks), startup_locality=parsed.startup_locality)
    for event in parsed.events:
        if event.event_type != 0x3:
            builder.add_digests(event.pcr, event.event_type, event.data, event.digests)
    return builder


def random_secret() -> bytes:
    return b"account-number:" + os.urandom(8).hex().encode()
