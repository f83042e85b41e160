"""The VM network: a lab bridge per cluster, WireGuard between attested VMs, a capture.

Each qemu VM has a second NIC (:mod:`testbed.qemu.domain`) on the cluster's own Linux
bridge, ``tblab<tag>``, which has no address on the host: an isolated layer-2 segment,
the "lab network" that VMs reach each other on. What crosses it between guests is
WireGuard (the guests' kernel module) once the verifier side has done this, per VM,
*after* the VM was attested (:func:`provision`):

1. ``net_init``: the guest brings its lab NIC up (its own MAC and address), creates
   ``wg0`` and a private key that never leaves it, and answers its public key with a
   quote of its vTPM over ``sha256(KEY_BINDING || fresh nonce || public key)``;
2. that quote is verified like the VM's attestation (its registered AK, its policy,
   recorded in the evidence log): the key is the key of a VM in an attested state;
3. ``net_peers``: every member gets exactly the other members (public key, lab
   endpoint, the one wg address it may speak for). A VM that failed attestation (or
   whose key quote fails) is not a member: it gets no peers and nobody has it as one.

:func:`remove_member` (a revoked node: :class:`testbed.roles.revocation.RevocationEvent`)
gives every remaining member the list without it, which removes it from their kernels'
peer tables. The members are kept in ``clusters/NAME/network.json``.

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
from testbed.cluster.agent import AgentClient
from testbed.cluster.state import load_node_policy
from testbed.cluster.verification import verify_evidence
from testbed.core.errors import StateError
from testbed.core.files import read_json
from testbed.core.paths import ClusterPaths
from testbed.qemu.guest.net_extension import WG_PORT, key_binding_nonce
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.roles.revocation import RevocationEvent

__all__ = [
    "LAB_NET",
    "WG_NET",
    "Capture",
    "CaptureStats",
    "Member",
    "NetworkError",
    "SegmentPort",
    "bridge_name",
    "ensure_bridge",
    "load_members",
    "provision",
    "remove_bridge",
    "remove_member",
    "segment_port",
    "segment_prefix",
]

LAB_NET = ipaddress.IPv4Network("10.77.0.0/24")  # the lab segment (plain)
WG_NET = ipaddress.IPv4Network("10.78.0.0/24")  # inside WireGuard
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


def load_members(paths: ClusterPaths) -> list[Member]:
    doc = read_json(paths.root / STATE_FILE)
    if doc is None:
        return []
    try:
        return [Member(**entry) for entry in doc["members"]]
    except (KeyError, TypeError):
        raise StateError(f"{paths.root / STATE_FILE} is damaged; `testbed down` then "
                         "`testbed up` provisions the network again") from None


def _save_members(paths: ClusterPaths, members: Iterable[Member]) -> None:
    doc = {"members": [asdict(m) for m in sorted(members, key=lambda m: m.index)]}
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


def distribute(members: list[Member], agents: Mapping[str, AgentClient]) -> dict[str, str]:
    """Give every member exactly the others as peers; what each answered, by node."""
    def push(member: Member) -> str:
        peers = [m.peer_entry() for m in members if m.node != member.node]
        try:
            answer = agents[member.node].call({"op": "net_peers", "peers": peers})
        except TestbedError as exc:
            return f"error: {exc}"
        return f"{len(answer.get('peers') or [])} peers, {answer.get('removed', 0)} removed"

    if not members:
        return {}
    with ThreadPoolExecutor(min(len(members), 8), thread_name_prefix="wg-peers") as pool:
        return dict(zip([m.node for m in members], pool.map(push, members), strict=True))


@dataclass
class Provisioned:
    """What :func:`provision` did: the members, and why the others are not."""

    members: list[Member]
    refused: dict[str, str]  # node -> why it is not on the network
    peers: dict[str, str]  # node -> what net_peers answered
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"members": [m.node for m in self.members], "refused": self.refused,
                "peers": self.peers, "seconds": round(self.seconds, 2)}


def provision(paths: ClusterPaths, attested: Mapping[str, bool],
              agent: Callable[[str], AgentClient], order: list[str]) -> Provisioned:
    """Join every attested node (``attested``: node -> whether it passed), then give
    every member its peers. A node not attested is refused and dropped from the peers."""
    started = time.monotonic()
    refused = {node: "it is not attested (rejected, or not up)" for node, ok in attested.items()
               if not ok}
    candidates = [node for node, ok in attested.items() if ok]

    def attempt(node: str) -> Member | str:
        try:
            return join(paths, node, _index(node, order), agent(node))
        except TestbedError as exc:
            return str(exc)

    members = []
    if candidates:
        with ThreadPoolExecutor(min(len(candidates), 8), thread_name_prefix="wg-join") as pool:
            for node, outcome in zip(candidates, pool.map(attempt, candidates), strict=True):
                if isinstance(outcome, Member):
                    members.append(outcome)
                else:
                    refused[node] = outcome
    _save_members(paths, members)
    peers = distribute(members, {m.node: agent(m.node) for m in members})
    return Provisioned(members, refused, peers, time.monotonic() - started)


def remove_member(paths: ClusterPaths, event: RevocationEvent,
                  agent: Callable[[str], AgentClient]) -> dict[str, str]:
    """The verifier revoked ``event.node``: every other member's peers without it."""
    members = [m for m in load_members(paths) if m.node != event.node]
    _save_members(paths, members)
    return distribute(members, {m.node: agent(m.node) for m in members})


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
