"""The TCTP demo's machines: each with its own swtpm, simulated measured boot, an AK
activated against its EK and registered, and a TLS certificate.

``service-a`` boots the known-good server chain; ``service-b`` runs the same service
after booting another kernel (tampered); ``proxy`` is the TRESOR client proxy's machine.
Reference policies are taken from the known-good machines themselves.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from cryptography import x509

from attestation.eventlog import parse_event_log
from attestation.policy import ReferencePolicy, policy_from_evidence
from attestation.registrar import AkRegistry, Registrar, register
from attestation.tpm import LocalAttester, TpmClient
from attestation.tpm_types import PcrSelection
from testbed.spec.cluster_spec import BootSpec
from testbed.tpm.boot import measure_boot
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm, provision
from trusted_passages import ChannelConfig, TpmIssuer, TpmValidator
from trusted_passages.pki import CertificateAuthority, PrivateKey, generate_key, issue_certificate
from trusted_passages.pki import make_ca as make_tls_ca

GOOD_BOOT: Final = BootSpec.from_content(firmware="OVMF firmware volume (tctp demo)",
                                         kernel="vmlinuz-6.1.0-tctp-server",
                                         initrd="initrd.img-6.1.0-tctp-server",
                                         cmdline="console=ttyS0 ro quiet")
TAMPERED_BOOT: Final = BootSpec.from_content(firmware="OVMF firmware volume (tctp demo)",
                                             kernel="vmlinuz-6.1.0-patched-by-provider",
                                             initrd="initrd.img-6.1.0-tctp-server",
                                             cmdline="console=ttyS0 ro quiet")
SELECTION: Final = PcrSelection("sha256", (0, 1, 2, 3, 4, 5, 6, 7, 9))
SERVER_POLICY: Final = "tctp-server-known-good"
PROXY_POLICY: Final = "tctp-proxy-known-good"
PLAN: Final = {"service-a": GOOD_BOOT, "service-b": TAMPERED_BOOT, "proxy": GOOD_BOOT}


@dataclass
class Machine:
    name: str
    swtpm: Swtpm
    client: TpmClient
    event_log: bytes = field(repr=False)
    key: PrivateKey = field(repr=False)
    certificate: x509.Certificate
    issuer: TpmIssuer


class World:
    """Starts the machines; ``close()`` stops every swtpm and removes the state."""

    def __init__(self, root: Path | None = None) -> None:
        self._tmp = None if root else tempfile.mkdtemp(prefix="tctp-demo-")
        self.root = root or Path(self._tmp or ".")
        self.tls_ca: CertificateAuthority = make_tls_ca("TCTP demo CA")
        self.registry = AkRegistry()
        self.machines: dict[str, Machine] = {}
        self.policies: dict[str, ReferencePolicy] = {}

    def start(self) -> World:
        ek_ca = LocalCA.ensure(self.root / "ek-ca")
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(lambda name: provision(self.root / name, ek_ca), PLAN))
        registrar = Registrar(ek_ca.ca_bundle())
        for name, chain in PLAN.items():
            self.machines[name] = self._boot(name, chain, registrar)
        self.policies[SERVER_POLICY] = self._policy("service-a", SERVER_POLICY)
        self.policies[PROXY_POLICY] = self._policy("proxy", PROXY_POLICY)
        return self

    def _boot(self, name: str, chain: BootSpec, registrar: Registrar) -> Machine:
        swtpm = Swtpm(self.root / name).start()
        client = TpmClient(swtpm.tcti)
        log = measure_boot(client, chain)
        key = generate_key("tp13")
        machine = Machine(name, swtpm, client, log, key,
                          issue_certificate(self.tls_ca, name, key),
                          TpmIssuer(client, name, SELECTION, event_log=lambda: log))
        ak = register(LocalAttester(client), name, registrar, self.registry)
        if ak is not None:
            self.registry.add(name, ak)
        return machine

    def _policy(self, name: str, policy_name: str) -> ReferencePolicy:
        machine = self.machines[name]
        pcrs = machine.client.read_pcrs(SELECTION.bank, SELECTION.indices)
        return policy_from_evidence(pcrs, parse_event_log(machine.event_log), name=policy_name)

    def config(self, name: str, *, peer: str, peer_policy: str) -> ChannelConfig:
        """``name``'s channel config, expecting ``peer`` under ``peer_policy``."""
        machine = self.machines[name]
        validator = TpmValidator(self.registry.for_node(peer), self.policies[peer_policy])
        return ChannelConfig(machine.certificate, machine.key, [self.tls_ca.certificate],
                             machine.issuer, validator, expected_peer=peer, timeout=10.0)

    def close(self) -> None:
        for machine in self.machines.values():
            with contextlib.suppress(Exception):
                machine.issuer.close()
                machine.client.close()
            machine.swtpm.stop()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> World:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
