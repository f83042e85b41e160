"""The CryptoVM inside a guest: the guest agent's ``cryptovm`` role extension.

Runs in the guest with Debian 12's python3 and the project's ``cryptovm`` (and what
it imports) copied into the image; no tpm2-pytss (Debian has none usable): the
CryptoVM's TPM commands go raw to ``/dev/tpmrm0`` (:mod:`cryptovm.rawtpm`), each
use on its own resource-manager connection, so they never see the agent's objects.

The store is sealed to this VM's vTPM PCRs like any CryptoVM store. Where it lives: on
the **store disk** when ``cvm_start`` names one (the virtio disk with that serial, which
the host hot-plugs before; :mod:`cryptovm.storedisk`: LUKS2 + dm-crypt, its passphrase
sealed to the same PCRs in the volume's LUKS2 token, ext4 mounted at
:data:`STORE_MOUNT`), so the keys survive a reboot of the VM; otherwise in the guest's
RAM (the root file system is the initramfs), gone when the VM stops. The CVM1 server
listens on the guest's NIC; its only opening is the host's loopback forward of
:data:`CVM1_PORT` (testbed/roles/cryptovm.py).

Ops added to the agent::

    {"op": "cvm_start", "pcrs": "sha256:0-9", "store_disk": "store" (optional)}
        -> {"started": bool, "root_psk": hex (first start of the store only), "ca_pem",
            "port", "pcr_selection", "keys", "state", "store_disk": {...} (with a disk)}
    {"op": "cvm_status"} -> {"running", "keys", "port", "pcr_selection", "state"}
    {"op": "cvm_stop"} -> {"stopped": bool}: server stopped, store closed, disk unmounted
        and its mapping closed (before a reboot: the host's ``reboot_vm`` asks for it)

Stream op (keyless TLS, docs/cryptovm.md): ``{"op": "cvm_attested"}`` answers
``{"session": hex}``, then the connection is one Trusted Passages channel (the guest's
``tp_extension`` configuration: this VM quotes, the peer is validated against the AK
registry and its policy) on which the attested peer node acts as ``node.<name>`` and
speaks CVM1 frames (``tls_enroll``, ``attest``), as on a sim CryptoVM node.

Revocation (docs/runtime.md): the extension listens to the agent's ledger of the
verifier's decisions. A revoked node's VSM account ``node.NAME`` is disabled (no release,
no enrollment, no login by any means) and its client certificates removed, as on the sim
side; a CryptoVM started later applies the decisions received before it started.
Reinstatement enables the account again.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attestation.agent_wire import refuse_request
from attestation.revocation import DecisionLedger, Reinstate, RevocationEvent
from attestation.tpm_raw import Tpm
from cryptovm.attested import refuse_stream, serve_stream
from cryptovm.errors import AccessDenied, AuthenticationFailed, CryptoVmError
from cryptovm.rawtpm import RawTpm
from cryptovm.sealing import parse_pcr_selection
from cryptovm.server import ServerThread
from cryptovm.storedisk import StoreDisk
from cryptovm.vsm import CryptoVm, node_account

__all__ = ["CVM1_PORT", "GuestCryptoVm", "install"]

CVM1_PORT = 9302
GUEST_IP = "10.0.2.15"  # the one NIC (images/init); the host forwards to it
STATE_DIR = Path("/run/cryptovm/state")
STORE_MOUNT = Path("/run/cryptovm/store")  # the store disk's file system (0700)
SYS_BLOCK = Path("/sys/block")
DISK_WAIT_S = 60.0  # a hot-plugged disk takes a while to appear in a TCG guest
_SERIAL = re.compile(r"[a-z0-9][a-z0-9_-]{0,19}")
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
        self._disk: StoreDisk | None = None
        self._lock = threading.Lock()

    def start(self, request: dict[str, Any]) -> dict[str, Any]:
        pcrs = request.get("pcrs", "sha256:0-9")
        if not isinstance(pcrs, str) or len(pcrs) > 64:
            raise ValueError("pcrs: a PCR selection such as sha256:0-9")
        serial = request.get("store_disk")
        if serial is not None and (not isinstance(serial, str) or not _SERIAL.fullmatch(serial)):
            raise ValueError("store_disk: the store disk's name (its serial), e.g. store")
        with self._lock:
            if self._vm is not None:
                return {**self._describe(self._vm), "started": False}
            state_dir = self._open_disk(serial, pcrs) if serial else self._state_dir
            try:
                root_psk = self._open_or_create(state_dir, pcrs)
            except BaseException:
                self._close_disk()
                raise
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

    def stop(self, _request: dict[str, Any]) -> dict[str, Any]:
        """Stop serving and close the store (and its disk): before the VM reboots."""
        with self._lock:
            running = self._vm is not None
            if self._server is not None:
                self._server.stop()
                self._server = None
            if self._vm is not None:
                self._vm.close()
                self._vm = None
            self._close_disk()
        return {"stopped": running}

    def status(self, _request: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            if self._vm is None:
                return {"running": False}
            return self._describe(self._vm)

    def attested(self, _request: dict[str, Any], conn: Any, agent: Any,
                 send_frame: SendFrame) -> None:
        """``cvm_attested``: serve one attested node over a Trusted Passages channel."""
        tp = getattr(agent, "trusted_passages", None)
        with self._lock:
            vm = self._vm
        if vm is None or tp is None:
            refuse_request(conn, "cvm_attested: the CryptoVM is not started (cvm_start) or "
                                 "Trusted Passages is missing", send_frame)
            return
        tp.serve_channel(conn, lambda channel: _serve_node(vm, channel))
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

    def _open_disk(self, serial: str, pcrs: str) -> Path:
        """Unseal and mount the store disk (formatting it when blank); the state dir on it.
        A VM in another measured state gets a SealedStorageError naming the PCRs."""
        disk = StoreDisk(_disk_by_serial(serial), STORE_MOUNT)
        try:
            disk.open(self._raw.sealer(parse_pcr_selection(pcrs)))
        except CryptoVmError as exc:
            raise CryptoVmError(f"the CryptoVM's store disk {serial!r} cannot be opened: "
                                f"{exc}") from None
        self._disk = disk
        return disk.state_dir

    def _close_disk(self) -> None:
        if self._disk is not None:
            self._disk.close()
            self._disk = None

    def _open_or_create(self, state_dir: Path, pcrs: str) -> bytes | None:
        options: dict[str, Any] = {**self._raw.options(), "event_log": self._event_log()}
        if (state_dir / "cryptovm.json").exists():  # the manifest, written last
            self._vm = CryptoVm.open(state_dir, self._raw.name, **options)
            return None
        state_dir.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._vm, root_psk = CryptoVm.initialize(state_dir, self._raw.name, pcrs=pcrs,
                                                 **options)
        self._vm.local_root().tls_ca_setup()  # keyless TLS: the CA key generated inside
        return root_psk

    def _describe(self, vm: CryptoVm) -> dict[str, Any]:
        return {"running": True, "port": self._port, "ca_pem": vm.ca.pem.decode(),
                "pcr_selection": vm.state.read_manifest()["pcr_selection"],
                "keys": len(vm.keys.ids()),
                "state": ("store disk (LUKS2, dm-crypt, passphrase sealed to the vTPM PCRs)"
                          if self._disk is not None else "RAM (no store disk)")}


def _disk_by_serial(serial: str, sys_block: Path = SYS_BLOCK,
                    wait: float = DISK_WAIT_S) -> Path:
    """The block device of the virtio disk with ``serial`` (the host hot-plugs it just
    before ``cvm_start``: wait for the guest kernel to probe it)."""
    deadline = time.monotonic() + wait
    while True:
        for entry in sorted(sys_block.glob("vd*")):
            try:
                found = (entry / "serial").read_text().strip()
            except OSError:
                continue
            if found == serial:
                return Path("/dev") / entry.name
        if time.monotonic() > deadline:
            raise ValueError(f"store_disk: no disk with serial {serial!r} in this guest "
                             "(the host hot-plugs it before cvm_start)")
        time.sleep(0.5)


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


def _serve_node(vm: CryptoVm, channel: Any) -> dict[str, Any]:
    """CVM1 frames from the attested peer as ``node.<name>`` (what roles/cryptovm.py does
    for a sim CryptoVM node)."""
    peer = channel.peer

    def recv() -> bytes:
        try:
            return bytes(channel.recv(timeout=IDLE_TIMEOUT_S))
        except Exception:  # the channel's end, its timeout or a broken record: stop
            return b""

    if not peer.node_verified:
        refuse_stream(recv, channel.send, AccessDenied("ak_trust", "the peer's AK is not "
                                                       "registered for its node"))
        return {"role": "cryptovm", "peer": peer.node, "refused": "ak_trust"}
    try:
        session = vm.attested_session(peer.node)
    except AuthenticationFailed as exc:
        vm.audit.sync()
        refuse_stream(recv, channel.send, exc)
        return {"role": "cryptovm", "peer": peer.node, "refused": str(exc)}
    answered = serve_stream(vm, session, recv, channel.send)
    return {"role": "cryptovm", "peer": peer.node, "answered": answered}


def install(agent: Any, send_frame: SendFrame) -> GuestCryptoVm:
    """Add the CryptoVM ops to the guest agent: its TPM, its event log (securityfs)."""
    service = GuestCryptoVm(agent._event_log, agent.tpm, revocations=agent.revocations)
    agent.handlers.update({"cvm_start": service.start, "cvm_status": service.status,
                           "cvm_stop": service.stop})
    agent.stream_handlers["cvm_attested"] = \
        lambda request, conn: service.attested(request, conn, agent, send_frame)
    agent.revocation_listeners["cryptovm"] = service
    return service
