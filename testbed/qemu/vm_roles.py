"""Role services of qemu VMs, started by the host after a VM was registered and attested.

``cryptovm``: the CryptoVM service runs *inside* the VM (testbed/qemu/guest_cryptovm.py),
its storage key sealed to the VM's own vTPM PCRs 0-9 (the measured OVMF boot), its TPM
commands raw on /dev/tpmrm0 (cryptovm/rawtpm.py: Debian 12 has no usable tpm2-pytss).
The host asks the guest agent to start it (``cvm_start``), keeps the root PSK it returns
on first start (0600, the same file as a sim cryptovm node's) and records the CVM1
endpoint, the forwarded port from vm.json, in the node's run dir.

``server`` and ``client`` need nothing at ``up``: Trusted Passages is provisioned per
demo or channel (testbed/qemu/tp_relay.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from testbed.errors import StateError
from testbed.qemu.backend import GuestAgentClient
from testbed.sim import ClusterPaths, _private_dir, write_atomic

__all__ = ["CRYPTOVM_PCRS", "CryptoVmEndpoint", "cryptovm_endpoint", "start_role_service"]

CRYPTOVM_PCRS = "sha256:0-9"  # what OVMF measured: firmware, kernel, initrd, command line
PSK_NAME = "cryptovm-root.psk"  # as a sim cryptovm node's (testbed/cryptovm_role.py)
INFO_NAME = "cryptovm.json"


@dataclass(frozen=True)
class CryptoVmEndpoint:
    """How the host reaches a VM's CryptoVM: CVM1 on a forwarded loopback port."""

    node: str
    host: str
    port: int
    ca_pem: bytes
    psk: bytes

    def client(self, **options: Any) -> Any:
        from cryptovm.client import CryptoVmClient

        return CryptoVmClient(self.host, self.port, ca_pem=self.ca_pem, account="root",
                              psk=self.psk, **options)


def start_role_service(paths: ClusterPaths, node: str, role: str, agent: GuestAgentClient,
                       service_ports: dict[str, int]) -> str | None:
    """Start ``role``'s service in the VM; returns what ``status`` shows, None if none."""
    if role != "cryptovm":
        return None
    port = service_ports.get("cvm1")
    if port is None:
        raise StateError(f"node {node}: its VM has no CryptoVM port forward; "
                         "`testbed down` then `testbed up --backend qemu` to recreate it")
    answer = agent.call({"op": "cvm_start", "pcrs": CRYPTOVM_PCRS})
    node_paths = paths.node(node)
    psk = answer.get("root_psk")
    if isinstance(psk, str):  # first start of this VM's CryptoVM: shown once, kept 0600
        _private_dir(node_paths.state)
        write_atomic(node_paths.state / PSK_NAME, psk + "\n")
    _private_dir(node_paths.run)
    write_atomic(node_paths.run / INFO_NAME, json.dumps({
        "host": "127.0.0.1", "port": port, "ca_pem": answer.get("ca_pem"),
        "pcr_selection": answer.get("pcr_selection"), "in_vm": True}) + "\n")
    return f"CryptoVM in the VM (CVM1 on 127.0.0.1:{port}, sealed to {CRYPTOVM_PCRS})"


def cryptovm_endpoint(paths: ClusterPaths, node: str) -> CryptoVmEndpoint:
    """The CVM1 endpoint and root PSK of a running qemu cryptovm node."""
    node_paths = paths.node(node)
    try:
        info = json.loads((node_paths.run / INFO_NAME).read_text())
        psk = bytes.fromhex((node_paths.state / PSK_NAME).read_text().strip())
    except (OSError, ValueError) as exc:
        raise StateError(f"node {node} runs no CryptoVM the host knows of ({exc}); "
                         "is it a cryptovm node of a qemu cluster that is up?") from None
    return CryptoVmEndpoint(node, str(info["host"]), int(info["port"]),
                            str(info["ca_pem"]).encode(), psk)
