"""The VM network: a lab bridge per cluster, WireGuard between attested VMs, a capture.

Each qemu VM has a second NIC (:mod:`testbed.qemu.domain`) on the cluster's own Linux
bridge, ``tblab<tag>``, which has no address on the host: an isolated layer-2 segment,
the "lab network" that VMs reach each other on. What crosses it between guests is
WireGuard (the guests' kernel module), keyed like this once the VMs attested
(:func:`provision`):

1. ``net_init``: the guest brings its lab NIC up (its own MAC and address), creates
   ``wg0`` and a private key that never leaves it, and answers its public key with a
   quote of its vTPM over ``sha256(KEY_BINDING || fresh nonce || public key)``, verified
   like the VM's attestation (defence in depth: a VM whose key quote fails is not asked
   to join);
2. ``net_sync`` (round 1, one member after another): the guest opens an attested
   channel (Trusted Passages) to the **CryptoVM VM**, the host splicing its TLS records
   (:func:`testbed.qemu.relay.relay_to_cryptovm`); over it the guest registers its own
   key, WireGuard address and lab endpoint as its account ``node.<name>`` and gets back
   the members the CryptoVM holds (:mod:`cryptovm.network`), which it makes its peer
   table;
3. round 2: every member whose round-1 list lacked a later member syncs again, so each
   ends with all the others. The host chooses no peer at any point: it has no op to set
   them.

A cluster without an attested CryptoVM VM gets no VM network (nobody to release the
keys). The CryptoVM VM itself is not a member: it serves the membership, and speaks to
the other VMs only over the channels the host relays. :func:`remove_member` (a revoked
node: :class:`testbed.roles.revocation.RevocationEvent`; the CryptoVM guest disabled its
account) has every remaining member sync again: the CryptoVM no longer lists it. The
members, as the host saw them join, are kept in ``clusters/NAME/network.json``.

:class:`Capture` records the frames crossing the bridge (AF_PACKET, root) to show what
an observer of the lab network sees (docs/svd.md, "The VM network").
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from attestation.encoding import b64decode
from attestation.errors import TestbedError
from attestation.evidence import Evidence
from attestation.files import atomic_write
from cryptovm.network import WG_NET  # inside WireGuard: the addresses the CryptoVM admits
from testbed.cluster.agent import AgentClient
from testbed.cluster.state import load_node_policy
from testbed.cluster.verification import verify_evidence
from testbed.core.errors import StateError
from testbed.core.files import read_json
from testbed.core.paths import ClusterPaths
from testbed.qemu.guest.net_extension import WG_PORT, key_binding_nonce
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.qemu.relay import relay_to_cryptovm
from testbed.roles.revocation import RevocationEvent

__all__ = [
    "LAB_NET",
    "NO_CRYPTOVM",
    "WG_NET",
    "Capture",
    "CaptureStats",
    "Member",
    "NetworkError",
    "Provisioned",
    "SegmentPort",
    "bridge_name",
    "cryptovm_sync",
    "ensure_bridge",
    "load_members",
    "provision",
    "remove_bridge",
    "remove_member",
    "segment_port",
    "segment_prefix",
]

LAB_NET = ipaddress.IPv4Network("10.77.0.0/24")  # the lab segment (plain)
MAX_MEMBERS = 200
STATE_FILE = "network.json"
ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 263, 1, 1
CAPTURE_LIMIT = 64 << 20  # bytes a capture inspects at most (the rest is counted only)
CAPTURE_BUFFER = 64 << 20  # the capture socket's receive buffer: frames queue, not drop
SO_RCVBUFFORCE = 33  # linux: SO_RCVBUF beyond rmem_max, for root
_COMMAND_TIMEOUT_S = 10.0


class NetworkError(StateError):
    """The lab bridge or a VM's network could not be set up, or a key quote failed."""


# --- the lab bridge ---------------------------------------------------------------------


def bridge_name(paths: ClusterPaths) -> str:
    """``tblab`` and 8 hex digits of the work directory and cluster (at most 15 chars)."""
    tag = hashlib.sha256(f"{paths.workdir}\0{paths.name}".encode()).hexdigest()[:8]
    return f"tblab{tag}"


@dataclass(frozen=True)
class SegmentPort:
    """A lab host's part of the cluster's VM segment (docs/hosts.md): a VXLAN with its own
    VNI between ``lab_device`` (a port of the lab's bridge) and ``host_device`` (the
    uplink of the bridge of the same name in the host's namespace)."""

    lab_device: str
    host_device: str
    vni: int


def segment_prefix(paths: ClusterPaths) -> str:
    return f"tbvx{bridge_name(paths)[5:]}"


def segment_port(paths: ClusterPaths, host: str) -> SegmentPort:
    """``hostN``'s port: VNI = 24 bits of the cluster's tag XOR N (one per host and
    cluster, never 0), the lab's device ``tbvx<tag><N>`` (at most 15 characters)."""
    index = int(host.removeprefix("host"))
    tag = bridge_name(paths)[5:]
    vni = (int(tag[:6], 16) ^ index) or 0xFFFFFF
    return SegmentPort(f"{segment_prefix(paths)}{index}", segment_prefix(paths), vni)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(["ip", *args], capture_output=True, text=True,
                              timeout=_COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetworkError(f"ip {' '.join(args)}: {exc} (iproute2 installed? root?)") from None
    if check and done.returncode != 0:
        raise NetworkError(f"ip {' '.join(args)} failed: {done.stderr.strip()[:200]} "
                           "(the lab bridge needs root: CAP_NET_ADMIN)")
    return done


def ensure_bridge(name: str) -> None:
    """Create the bridge (no address, no IPv6: the host does not take part) and set it up."""
    if not Path(f"/sys/class/net/{name}").exists():
        _ip("link", "add", "name", name, "type", "bridge")
    with contextlib.suppress(OSError):  # the host speaks nothing on the lab segment
        Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6").write_text("1\n")
    _ip("link", "set", "dev", name, "up")


def remove_bridge(name: str) -> bool:
    """Delete the bridge if it exists; whether it did."""
    if not Path(f"/sys/class/net/{name}").exists():
        return False
    _ip("link", "del", "dev", name, check=False)
    return True


# --- members ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """An attested VM on the lab network: its addresses and its WireGuard public key."""

    node: str
    index: int  # 1..MAX_MEMBERS: the host part of both addresses
    public_key: str  # base64, as wg prints it
    attested_at: float = field(default=0.0)

    @property
    def lab_ip(self) -> str:
        return str(LAB_NET.network_address + 1 + self.index)

    @property
    def wg_ip(self) -> str:
        return str(WG_NET.network_address + 1 + self.index)

    @property
    def mac(self) -> str:
        return f"52:54:00:7b:01:{self.index:02x}"

    def peer_entry(self) -> dict[str, str]:
        return {"node": self.node, "public_key": self.public_key,
                "endpoint": f"{self.lab_ip}:{WG_PORT}", "allowed_ip": f"{self.wg_ip}/32"}


NO_CRYPTOVM = "no CryptoVM to release network keys"

Sync = Callable[[str], dict[str, Any]]
"""``sync(node)``: ``node``'s guest's ``net_sync`` result (its peers, as released)."""


def _load_state(paths: ClusterPaths) -> tuple[str | None, list[Member]]:
    doc = read_json(paths.root / STATE_FILE)
    if doc is None:
        return None, []
    try:
        cryptovm = doc.get("cryptovm")
        if cryptovm is not None and not isinstance(cryptovm, str):
            raise TypeError("cryptovm")
        return cryptovm, [Member(**entry) for entry in doc["members"]]
    except (KeyError, TypeError, AttributeError):
        raise StateError(f"{paths.root / STATE_FILE} is damaged; `testbed down` then "
                         "`testbed up` provisions the network again") from None


def load_members(paths: ClusterPaths) -> list[Member]:
    return _load_state(paths)[1]


def _save_members(paths: ClusterPaths, members: Iterable[Member],
                  cryptovm: str | None) -> None:
    doc = {"cryptovm": cryptovm,
           "members": [asdict(m) for m in sorted(members, key=lambda m: m.index)]}
    atomic_write(paths.root / STATE_FILE, (json.dumps(doc, indent=1) + "\n").encode())


def _index(node: str, order: list[str]) -> int:
    if node not in order or len(order) > MAX_MEMBERS:
        raise NetworkError(f"node {node!r} has no place on the lab network")
    return order.index(node) + 1


def join(paths: ClusterPaths, node: str, index: int, agent: AgentClient) -> Member:
    """``net_init`` on ``node``'s guest; its key, once its quote over the key verified."""
    nonce = os.urandom(32)
    probe = Member(node, index, "")
    answer = agent.call({"op": "net_init", "lab_address": f"{probe.lab_ip}/{LAB_NET.prefixlen}",
                         "lab_mac": probe.mac,
                         "wg_address": f"{probe.wg_ip}/{WG_NET.prefixlen}",
                         "nonce": nonce.hex(), "pcrs": list(QUOTED_PCRS)})
    public = b64decode(answer.get("public_key"), "public_key", limit=32)
    if len(public) != 32:
        raise NetworkError(f"node {node!r}: its WireGuard public key is not 32 bytes")
    evidence = Evidence.from_dict(answer.get("evidence"))
    report = verify_evidence(paths, node, evidence, key_binding_nonce(nonce, public),
                             load_node_policy(paths, node))
    if not report.ok:
        failure = report.failure
        why = f"{failure.name}: {failure.detail}" if failure is not None else "rejected"
        raise NetworkError(f"node {node!r}: the quote over its WireGuard key failed ({why}); "
                           "it does not join the lab network")
    return Member(node, index, answer["public_key"], time.time())


def cryptovm_sync(agent: Callable[[str], AgentClient], cryptovm: str) -> Sync:
    """``sync(node)`` through the CryptoVM VM: ``net_sync`` on ``node``'s guest spliced
    to the CryptoVM guest's ``cvm_attested``; a NetworkError with the guest's words
    when the channel or the CryptoVM refused (e.g. a disabled account)."""
    def sync(node: str) -> dict[str, Any]:
        try:
            outcome = relay_to_cryptovm(agent(node), agent(cryptovm),
                                        {"op": "net_sync", "cryptovm": cryptovm},
                                        node_name=node, cryptovm_name=cryptovm)
        except TestbedError as exc:
            raise NetworkError(f"node {node!r}: net_sync with {cryptovm}: {exc}") from None
        view = outcome.client_view
        if not outcome.established or not isinstance(view.get("peers"), list):
            why = view.get("error") or outcome.server_view.get("error") or "no answer"
            raise NetworkError(f"node {node!r}: {cryptovm} released no peers: {why}")
        return view
    return sync


def _summary(view: dict[str, Any]) -> str:
    return f"{len(view.get('peers') or [])} peers, {view.get('removed', 0)} removed"


@dataclass
class Provisioned:
    """What :func:`provision` did: the members, and why the others are not."""

    members: list[Member]
    refused: dict[str, str]  # node -> why it is not on the network
    peers: dict[str, str]  # node -> what its last net_sync answered
    seconds: float
    cryptovm: str | None = None
    syncs: int = 0  # relayed channels to the CryptoVM

    def to_dict(self) -> dict[str, Any]:
        return {"members": [m.node for m in self.members], "refused": self.refused,
                "peers": self.peers, "cryptovm": self.cryptovm, "syncs": self.syncs,
                "seconds": round(self.seconds, 2)}


def provision(paths: ClusterPaths, attested: Mapping[str, bool],
              agent: Callable[[str], AgentClient], order: list[str], *,
              cryptovm: str | None, sync: Sync | None = None) -> Provisioned:
    """Key every attested node (``attested``: node -> whether it passed) and have it join
    through ``cryptovm`` (the attested CryptoVM VM, its guest configured for Trusted
    Passages; None: no VM network). A node not attested is refused."""
    started = time.monotonic()
    refused = {node: "it is not attested (rejected, or not up)" for node, ok in attested.items()
               if not ok}
    candidates = [node for node, ok in attested.items() if ok and node != cryptovm]
    if cryptovm is None:
        refused.update({node: NO_CRYPTOVM for node in candidates})
        _save_members(paths, [], None)
        return Provisioned([], refused, {}, time.monotonic() - started)

    def attempt(node: str) -> Member | str:
        try:
            return join(paths, node, _index(node, order), agent(node))
        except TestbedError as exc:
            return str(exc)

    keyed = []
    if candidates:
        with ThreadPoolExecutor(min(len(candidates), 8), thread_name_prefix="wg-join") as pool:
            for node, outcome in zip(candidates, pool.map(attempt, candidates), strict=True):
                if isinstance(outcome, Member):
                    keyed.append(outcome)
                else:
                    refused[node] = outcome
    members, peers, syncs = _sync_rounds(keyed, sync or cryptovm_sync(agent, cryptovm),
                                         refused)
    _save_members(paths, members, cryptovm)
    return Provisioned(members, refused, peers, time.monotonic() - started, cryptovm, syncs)


def _sync_rounds(keyed: list[Member], sync: Sync, refused: dict[str, str]
                 ) -> tuple[list[Member], dict[str, str], int]:
    """Round 1: each joins (in turn) and takes the list so far; round 2: those whose list
    lacks a member that joined after them sync again. One at a time: the CryptoVM guest
    quotes for every channel, and a TCG guest gains nothing from two at once."""
    views: dict[str, dict[str, Any]] = {}
    syncs = 0
    for member in keyed:
        syncs += 1
        try:
            views[member.node] = sync(member.node)
        except TestbedError as exc:
            refused[member.node] = str(exc)
    members = [m for m in keyed if m.node in views]
    for member in members:
        others = {m.node for m in members if m.node != member.node}
        if set(views[member.node]["peers"]) != others:
            syncs += 1
            try:
                views[member.node] = sync(member.node)
            except TestbedError as exc:
                views[member.node] = {"error": str(exc)}
    peers = {node: (f"error: {view['error']}" if "error" in view else _summary(view))
             for node, view in views.items()}
    return members, peers, syncs


def remove_member(paths: ClusterPaths, event: RevocationEvent,
                  agent: Callable[[str], AgentClient], sync: Sync | None = None
                  ) -> dict[str, str]:
    """The verifier revoked ``event.node`` (the CryptoVM guest disabled its account): it
    leaves the host's list, and every other member syncs again from the CryptoVM, which
    no longer releases it; what each answered, by node."""
    cryptovm, members = _load_state(paths)
    members = [m for m in members if m.node != event.node]
    _save_members(paths, members, cryptovm)
    if cryptovm is None:
        return {}
    sync = sync or cryptovm_sync(agent, cryptovm)
    answered = {}
    for member in members:
        try:
            answered[member.node] = _summary(sync(member.node))
        except TestbedError as exc:
            answered[member.node] = f"error: {exc}"
    return answered


# --- the capture -----------------------------------------------------------------------


@dataclass
class CaptureStats:
    """What crossed the bridge while a :class:`Capture` ran."""

    frames: int = 0
    bytes: int = 0
    wireguard_frames: int = 0  # UDP to or from the WireGuard port
    marker_frames: int = 0  # frames that carry the marker in plain text

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Capture:
    """Every frame on ``interface`` (AF_PACKET, ETH_P_ALL) while the context is open,
    searched for ``marker``; frames are counted, not kept. The interface is put in
    promiscuous mode for the socket's life (as tcpdump does): a bridge passes the frames
    it forwards between two of its ports up to its own device only then."""

    def __init__(self, interface: str, marker: bytes, limit: int = CAPTURE_LIMIT) -> None:
        self.interface, self.marker, self.limit = interface, marker, limit
        self.stats = CaptureStats()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Capture:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        except OSError as exc:
            raise NetworkError(f"cannot capture: {exc} (AF_PACKET needs root)") from None
        try:
            sock.bind((self.interface, 0))
            membership = struct.pack("iHH8s", socket.if_nametoindex(self.interface),
                                     PACKET_MR_PROMISC, 0, b"")
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, membership)
        except OSError as exc:
            sock.close()
            raise NetworkError(f"cannot capture on {self.interface}: {exc}") from None
        with contextlib.suppress(OSError):  # root: room for bursts (a migration stream)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, CAPTURE_BUFFER)
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True, name="capture")
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        time.sleep(0.3)  # frames still in flight through the bridge
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                frame = self._sock.recv(1 << 16)
            except TimeoutError:
                continue
            except OSError:
                return
            self._count(frame)

    def _count(self, frame: bytes) -> None:
        stats = self.stats
        stats.frames += 1
        stats.bytes += len(frame)
        if stats.bytes > self.limit:
            return
        if _is_wireguard(frame):
            stats.wireguard_frames += 1
        if self.marker in frame:
            stats.marker_frames += 1


def _is_wireguard(frame: bytes) -> bool:
    """An Ethernet/IPv4/UDP frame to or from :data:`WG_PORT`."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return False
    offset = 14 + (frame[14] & 0x0F) * 4
    ports = frame[offset : offset + 4]
    return len(ports) == 4 and WG_PORT in (int.from_bytes(ports[:2], "big"),
                                           int.from_bytes(ports[2:], "big"))
