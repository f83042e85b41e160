"""The lab network's membership: WireGuard keys the CryptoVM releases to attested VMs.

VM-to-VM traffic on the lab network is WireGuard (docs/svd.md, "The VM network"). Each
VM makes its key inside its guest; it hands its *public* key to the CryptoVM itself,
over its attested channel (Trusted Passages: mutual TLS bound to both ends' quotes, the
guest's AK and policy validated by the CryptoVM guest), where it acts as its account
``node.<name>``. So the identity a key is recorded under is the channel's attested
account, never a name from the request, and a node can only (re)register itself.

``net_join(public_key, wg_address, endpoint)`` records the caller's key, its address
inside WireGuard (one of :data:`WG_NET`, held by no other member) and its lab endpoint;
``net_peers()`` answers the other members whose accounts are enabled: a revoked node
(its account disabled, cryptovm_extension.py) drops out of every list, a reinstated one
comes back. The members are kept sealed beside the CryptoVM's configuration
(``network.enc``, the state's AEAD under the TPM-sealed storage key): a CryptoVM that
restarts on its store disk keeps them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from attestation.files import atomic_write
from cryptovm.errors import AlreadyExists, BadRequest, NotFound, StorageError
from cryptovm.keystore import StateCipher, read_state_file

__all__ = ["MAX_MEMBERS", "WG_NET", "NetMember", "NetworkRegistry", "parse_join"]

WG_NET = ipaddress.IPv4Network("10.78.0.0/24")  # addresses inside WireGuard
MAX_MEMBERS = 200
MAX_TEXT = 64  # any argument's length: a key, an address, an endpoint
STATE_NAME = "network.enc"
_KIND = "network"


@dataclass(frozen=True)
class NetMember:
    """One node on the lab network, as it registered itself."""

    node: str
    public_key: str  # base64 of 32 bytes, as wg prints it
    wg_address: str  # one address of WG_NET
    endpoint: str  # IPv4:port on the lab segment
    joined_at: float

    def peer_entry(self) -> dict[str, str]:
        return {"node": self.node, "public_key": self.public_key, "endpoint": self.endpoint,
                "allowed_ip": f"{self.wg_address}/32"}


def _text(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise BadRequest(f"{what}: a string of 1-{MAX_TEXT} characters")
    return value


def _public_key(value: object) -> str:
    try:
        raw = base64.b64decode(_text(value, "public_key"), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise BadRequest("public_key: a WireGuard public key (32 bytes, base64)")
    return base64.b64encode(raw).decode()


def _wg_address(value: object) -> str:
    text = _text(value, "wg_address")
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        raise BadRequest(f"wg_address: {text[:40]!r} is not an IPv4 address") from None
    if address not in WG_NET or address in (WG_NET.network_address,
                                            WG_NET.broadcast_address):
        raise BadRequest(f"wg_address: {address} is not a host address of {WG_NET}")
    return str(address)


def _endpoint(value: object) -> str:
    host, _, port = _text(value, "endpoint").rpartition(":")
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise BadRequest("endpoint: IPv4:PORT, like 10.77.0.2:51820") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest("endpoint: a port 1-65535 after the address")
    return f"{address}:{int(port)}"


def parse_join(node: str, public_key: object, wg_address: object, endpoint: object
               ) -> NetMember:
    """A ``net_join`` request, strictly: BadRequest naming the argument otherwise."""
    return NetMember(node, _public_key(public_key), _wg_address(wg_address),
                     _endpoint(endpoint), time.time())


class NetworkRegistry:
    """The members, in memory and sealed on disk (``path``); one change at a time."""

    def __init__(self, path: Path, cipher: StateCipher) -> None:
        self._path, self._cipher = path, cipher
        self._lock = threading.Lock()
        self._members: dict[str, NetMember] = self._load()

    def __repr__(self) -> str:
        return f"NetworkRegistry({len(self._members)} members)"

    def _load(self) -> dict[str, NetMember]:
        blob = read_state_file(self._path, missing_ok=True)
        if blob is None:
            return {}
        _, plain = self._cipher.open(blob, _KIND, {"name": _KIND}, str(self._path))
        try:
            members = [NetMember(**doc) for doc in json.loads(plain)["members"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{self._path}: not a network membership list ({exc})"
                               ) from None
        return {m.node: m for m in members[:MAX_MEMBERS]}

    def _save(self, members: dict[str, NetMember]) -> None:
        doc = {"members": [asdict(m) for m in members.values()]}
        atomic_write(self._path, self._cipher.seal(_KIND, {"name": _KIND}, {},
                                                   json.dumps(doc).encode()))

    def join(self, member: NetMember) -> dict[str, Any]:
        """Record ``member`` (replacing its own earlier entry); durable before it answers."""
        with self._lock:
            others = {n: m for n, m in self._members.items() if n != member.node}
            for other in others.values():
                if other.wg_address == member.wg_address:
                    raise AlreadyExists(f"wg_address {member.wg_address} is held by node "
                                        f"{other.node!r}")
                if other.public_key == member.public_key:
                    raise AlreadyExists(f"public_key is registered by node {other.node!r}")
            if len(others) >= MAX_MEMBERS:
                raise BadRequest(f"the lab network is full ({MAX_MEMBERS} members)")
            members = {**self._members, member.node: member}
            self._save(members)
            self._members = members
        return {"node": member.node, "wg_address": member.wg_address,
                "members": len(members)}

    def peers(self, node: str, enabled: Callable[[str], bool]) -> dict[str, Any]:
        """The members other than ``node`` that ``enabled`` still admits."""
        with self._lock:
            members = dict(self._members)
        if node not in members:
            raise NotFound(f"node {node!r} is not on the lab network: net_join first")
        return {"peers": [m.peer_entry() for n, m in sorted(members.items())
                          if n != node and enabled(n)]}

    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._members)
