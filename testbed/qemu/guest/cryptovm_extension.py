"""The CryptoVM inside a guest: the guest agent's ``cryptovm`` role extension.

Runs in the guest with Debian 12's python3 and the project's ``cryptovm`` (and what
it imports) copied into the image; no tpm2-pytss (Debian has none usable): the
CryptoVM's TPM commands go raw to ``/dev/tpmrm0`` (:mod:`cryptovm.rawtpm`), each
use on its own resource-manager connection, so they never see the agent's objects.

The store lives in the guest's RAM (the root file system is the initramfs; the image
has no disk): it is sealed to this VM's vTPM PCRs like any CryptoVM store, and it is
gone when the VM stops. The CVM1 server listens on the guest's NIC; its only opening
is the host's loopback forward of :data:`CVM1_PORT` (testbed/roles/cryptovm.py).

Ops added to the agent::

    {"op": "cvm_start", "pcrs": "sha256:0-9"}
        -> {"started": bool, "root_psk": hex (first start only), "ca_pem", "port",
            "pcr_selection", "keys"}
    {"op": "cvm_status"} -> {"running", "keys", "port", "pcr_selection"}

Revocation (docs/runtime.md): the extension listens to the agent's ledger of the
verifier's decisions. A revoked node's VSM account ``node.NAME`` is disabled (no release,
no enrollment, no login by any means) and its client certificates removed, as on the sim
side; a CryptoVM started later applies the decisions received before it started.
Reinstatement enables the account again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attestation.revocation import DecisionLedger, Reinstate, RevocationEvent
from attestation.tpm_raw import Tpm
from cryptovm.rawtpm import RawTpm
from cryptovm.server import ServerThread
from cryptovm.vsm import CryptoVm, node_account

__all__ = ["CVM1_PORT", "GuestCryptoVm", "install"]

CVM1_PORT = 9302
GUEST_IP = "10.0.2.15"  # the one NIC (images/init); the host forwards to it
STATE_DIR = Path("/run/cryptovm/state")
IDLE_TIMEOUT_S = 60.0
START_TIMEOUT_S = 30.0


class GuestCryptoVm:
    """At most one CryptoVM per guest, started on the host's request."""

    def __init__(self, event_log: Callable[[], bytes | None], tpm: Tpm, *,
                 state_dir: Path = STATE_DIR, host: str = GUEST_IP,
                 port: int = CVM1_PORT, revocations: DecisionLedger | None = None) -> None:
        # The agent's /dev/tpmrm0 connection and its lock, shared (RawTpm flushes what
        # it creates, so the agent never sees the CryptoVM's transient objects).
        self._event_log, self._state_dir, self._raw = event_log, state_dir, RawTpm(tpm)
        self._host, self._port = host, port
        self._revocations = revocations
        self._vm: CryptoVm | None = None
        self._server: ServerThread | None = None
        self._lock = threading.Lock()

    def start(self, request: dict[str, Any]) -> dict[str, Any]:
        pcrs = request.get("pcrs", "sha256:0-9")
        if not isinstance(pcrs, str) or len(pcrs) > 64:
            raise ValueError("pcrs: a PCR selection such as sha256:0-9")
        with self._lock:
            if self._vm is not None:
                return {**self._describe(self._vm), "started": False}
            root_psk = self._open_or_create(pcrs)
            assert self._vm is not None
            for node in list(self._revocations.revoked if self._revocations else ()):
                _set_account(self._vm, node, enabled=False)  # decided before this start
            server = ServerThread(self._vm, self._host, self._port, IDLE_TIMEOUT_S,
                                  start_timeout=START_TIMEOUT_S)
            server.start()  # a ServerError is answered in words by the agent
            self._server = server
            answer = {**self._describe(self._vm), "started": True}
        if root_psk is not None:
            answer["root_psk"] = root_psk.hex()
        return answer

    def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._vm is None:
                return {"running": False}
            return self._describe(self._vm)

    def revoked(self, event: RevocationEvent) -> dict[str, Any]:
        """Stop serving the node: its account disabled, its client certificates removed."""
        with self._lock:
            vm = self._vm
            disabled = vm is not None and _set_account(vm, event.node, enabled=False)
        return {"account_disabled": disabled, "running": vm is not None}

    def reinstated(self, decision: Reinstate) -> dict[str, Any]:
        with self._lock:
            vm = self._vm
            enabled = vm is not None and _set_account(vm, decision.node, enabled=True)
        return {"account_enabled": enabled}

    def _open_or_create(self, pcrs: str) -> bytes | None:
        options: dict[str, Any] = {**self._raw.options(), "event_log": self._event_log()}
        if (self._state_dir / "cryptovm.json").exists():  # the manifest, written last
            self._vm = CryptoVm.open(self._state_dir, self._raw.name, **options)
            return None
        self._state_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._vm, root_psk = CryptoVm.initialize(self._state_dir, self._raw.name, pcrs=pcrs,
                                                 **options)
        return root_psk

    def _describe(self, vm: CryptoVm) -> dict[str, Any]:
        return {"running": True, "port": self._port, "ca_pem": vm.ca.pem.decode(),
                "pcr_selection": vm.state.read_manifest()["pcr_selection"],
                "keys": len(vm.keys.ids()), "state": "RAM (the guest has no disk)"}


def _set_account(vm: CryptoVm, node: str, *, enabled: bool) -> bool:
    """Enable or disable ``node``'s account (audited, in the sealed config); False when
    the node never had one (nothing to refuse through: its account cannot be made by
    anyone but an attested contact)."""
    name = node_account(node)
    if name not in vm.accounts.names():
        return False
    root = vm.local_root()
    root.account_enable(name, enabled)
    if not enabled:
        root.account_revoke_certificates(name)
    vm.audit.sync()
    return True


SendFrame = Callable[..., None]


def install(agent: Any, send_frame: SendFrame) -> GuestCryptoVm:
    """Add the CryptoVM ops to the guest agent: its TPM, its event log (securityfs)."""
    service = GuestCryptoVm(agent._event_log, agent.tpm, revocations=agent.revocations)
    agent.handlers.update({"cvm_start": service.start, "cvm_status": service.status})
    agent.revocation_listeners["cryptovm"] = service
    return service
