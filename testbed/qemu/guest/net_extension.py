"""The VM network inside a guest: a WireGuard interface whose key is made here.

Runs in the guest with Debian 12's python3 (python3-cryptography 38 for X25519),
``ip`` (iproute2) and ``wg`` (wireguard-tools) from the image, the project's
``cryptovm`` (its CVM1 stream client), and the kernel's wireguard module. The private
key is generated here and handed to the kernel through ``wg``'s stdin: it is never
written to a file and never leaves the guest. The host learns the public key together
with a quote of this guest's vTPM over it (``net_init``: defence in depth, the host
checks it before it asks the guest to join).

Which peers this guest talks to is what the **CryptoVM** releases, not the host
(:mod:`cryptovm.network`): on ``net_sync`` the guest opens an attested channel to the
CryptoVM guest (its ``tp_extension``, cluster-CA identity; the host only splices the
TLS records to the CryptoVM's ``cvm_attested``), registers its own public key, WireGuard
address and lab endpoint as its account ``node.<name>`` (``net_join``), asks for the
other members (``net_peers``: only nodes whose accounts are enabled) and makes the
kernel's peer table exactly that list; a peer missing from it is removed.

Ops added to the agent::

    {"op": "net_init", "lab_address": "10.77.0.2/24", "lab_mac": "52:54:00:..",
     "wg_address": "10.78.0.2/24", "nonce": hex, "pcrs": [int]}
        -> {"public_key": b64, "listen_port": 51820, "evidence": quote dict over
            sha256(KEY_BINDING || nonce || public key)}
    stream {"op": "net_sync", "cryptovm": NODE} -> {"session": hex}; then the channel;
        its result (``tp_result``): {"role": "network", "cryptovm", "peers": [node, ...],
        "removed": N, "refused_revoked": [node, ...], "released": [peer entries as the
        CryptoVM answered]} or {"error": ...} (e.g. this node was revoked: the CryptoVM
        guest's Trusted Passages refuses it, and its account ``node.<name>`` is disabled)
    {"op": "net_status"} -> {"public_key", "peers": [{"public_key", "endpoint",
                             "latest_handshake", "rx_bytes", "tx_bytes"}]}
    {"op": "net_listen", "address": IP, "port": N} -> {"listening": true}: answers one
        connection, then closes
    {"op": "net_send", "address": IP, "port": N, "message": TEXT, "repeat": N}
        -> {"reply": TEXT, "bytes": N, "seconds": float}

Revocation (docs/runtime.md): the extension listens to the agent's ledger of the
verifier's signed decisions. A revoked node's peer entry is removed from the kernel at
once, and a sync never adds a peer for a node the ledger holds revoked, whatever the
CryptoVM answers; a reinstated node comes back with the next ``net_sync``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from attestation.agent_wire import refuse_request
from attestation.revocation import Reinstate, RevocationEvent
from cryptovm.attested import StreamClient

__all__ = ["KEY_BINDING", "GuestNetwork", "install", "key_binding_nonce"]

LAB_DEV = "eth1"  # the second NIC: the cluster's lab segment (testbed/qemu/domain.py)
WG_DEV = "wg0"
WG_PORT = 51820
MAX_PEERS = 200  # as many as the CryptoVM admits members (cryptovm/network.py)
MAX_MESSAGE = 4096
MAX_REPEAT = 1 << 14  # a throughput run: at most 64 MiB of a 4 KiB message
TIMEOUT_S = 30.0  # TCG guests are slow
COMMAND_TIMEOUT_S = 20.0
KEY_BINDING = b"testbed-wg-key-v1\0"
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_NODE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

Runner = Callable[[list[str], bytes | None], str]
Call = Callable[..., dict[str, Any]]
"""``call(op, **args)`` to the CryptoVM over the attested channel (a StreamClient)."""


class Ledger(Protocol):
    def is_revoked(self, node: str | None) -> bool: ...


class GuestAgent(Protocol):
    """What this module uses of guest_agent.Agent."""

    handlers: dict[str, Any]
    stream_handlers: dict[str, Any]
    revocation_listeners: dict[str, Any]
    revocations: Ledger

    def quote(self, request: dict[str, Any]) -> dict[str, Any]: ...


def key_binding_nonce(nonce: bytes, public_key: bytes) -> bytes:
    """The qualifying data of the quote that vouches for a WireGuard public key."""
    return hashlib.sha256(KEY_BINDING + nonce + public_key).digest()


def run_command(argv: list[str], stdin: bytes | None) -> str:
    """Run one of ``ip``/``wg``; its stdout, or ValueError with its stderr."""
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True,
                              timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"{' '.join(argv[:3])}: {exc}") from None
    if done.returncode != 0:
        why = done.stderr.decode(errors="replace").strip()[:300]
        raise ValueError(f"{' '.join(argv[:4])} failed ({done.returncode}): {why}")
    return done.stdout.decode(errors="replace")


class GuestNetwork:
    """The guest's lab NIC, its WireGuard interface and key, and the marker exchange."""

    def __init__(self, agent: GuestAgent, run: Runner = run_command) -> None:
        self._agent = agent
        self._run = run
        self._key: X25519PrivateKey | None = None
        self._addresses: tuple[ipaddress.IPv4Interface, ipaddress.IPv4Interface] | None = None
        self._peer_keys: dict[str, str] = {}  # node -> its public key, as net_peers set them
        self._lock = threading.Lock()

    # --- keys and peers ----------------------------------------------------------------

    def init(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, {"op", "lab_address", "lab_mac", "wg_address", "nonce", "pcrs"})
        lab = _interface(request.get("lab_address"), "lab_address")
        wg = _interface(request.get("wg_address"), "wg_address")
        mac = request.get("lab_mac")
        if not isinstance(mac, str) or not _MAC.fullmatch(mac):
            raise ValueError("lab_mac: a MAC address like 52:54:00:7b:00:02")
        nonce = request.get("nonce")
        if not isinstance(nonce, str) or not 32 <= len(nonce) <= 128:
            raise ValueError("nonce: 16 to 64 bytes as hex")
        try:
            nonce_bytes = bytes.fromhex(nonce)
        except ValueError:
            raise ValueError("nonce: not hexadecimal") from None
        with self._lock:
            if self._key is None:  # one key per boot: re-running init keeps it
                self._key = X25519PrivateKey.generate()
                self._create(mac, lab, wg, self._key)
                self._addresses = (lab, wg)
            public = self._key.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)
        evidence = self._agent.quote({"nonce": key_binding_nonce(nonce_bytes, public).hex(),
                                      "pcrs": request.get("pcrs")})
        return {"public_key": base64.b64encode(public).decode(), "listen_port": WG_PORT,
                "evidence": evidence}

    def _create(self, mac: str, lab: ipaddress.IPv4Interface, wg: ipaddress.IPv4Interface,
                key: X25519PrivateKey) -> None:
        private = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        run = self._run
        run(["ip", "link", "set", "dev", LAB_DEV, "address", mac], None)
        run(["ip", "addr", "replace", str(lab), "dev", LAB_DEV], None)
        run(["ip", "link", "set", "dev", LAB_DEV, "up"], None)
        run(["ip", "link", "add", "dev", WG_DEV, "type", "wireguard"], None)
        # The key goes to the kernel through a pipe (no /dev/stdin: the guest has no udev):
        # no file ever holds it.
        run(["wg", "set", WG_DEV, "listen-port", str(WG_PORT), "private-key",
             "/proc/self/fd/0"], base64.b64encode(private) + b"\n")
        run(["ip", "addr", "replace", str(wg), "dev", WG_DEV], None)
        run(["ip", "link", "set", "dev", WG_DEV, "up"], None)

    def sync(self, request: dict[str, Any], conn: Any, send_frame: Callable[..., None]
             ) -> None:
        """``net_sync``: join and fetch the peers over an attested channel to the CryptoVM."""
        tp = getattr(self._agent, "trusted_passages", None)
        try:
            _only(request, {"op", "cryptovm"})
            cryptovm = request.get("cryptovm")
            if not isinstance(cryptovm, str) or not _NODE.fullmatch(cryptovm):
                raise ValueError("cryptovm: the CryptoVM node's name")
            if tp is None:
                raise ValueError("net_sync needs the Trusted Passages extension")
        except ValueError as exc:
            refuse_request(conn, str(exc), send_frame)
            return
        tp.client_channel(conn, cryptovm, lambda channel: {
            "cryptovm": cryptovm, **self.sync_with(StreamClient(channel.recv, channel.send).call)})

    def sync_with(self, call: Call) -> dict[str, Any]:
        """Register this guest's key with the CryptoVM, then apply the peers it releases."""
        with self._lock:
            if self._key is None or self._addresses is None:
                raise ValueError("net_sync before net_init: there is no WireGuard interface")
            lab, wg = self._addresses
            public = base64.b64encode(self._key.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()
        call("net_join", public_key=public, wg_address=str(wg.ip),
             endpoint=f"{lab.ip}:{WG_PORT}")
        released = call("net_peers").get("peers")
        try:
            peers = _peer_list(released)
        except ValueError as exc:
            raise ValueError(f"the CryptoVM's peer list: {exc}") from None
        # "released": what the CryptoVM answered (public keys and addresses only)
        return {"role": "network", **self.apply(peers), "released": peers}

    def apply(self, given: list[dict[str, str]]) -> dict[str, Any]:
        """Make the kernel's peer table exactly ``given`` (validated by
        :func:`_peer_list`), less the nodes the revocation ledger holds revoked."""
        wanted = [p for p in given if not self._agent.revocations.is_revoked(p["node"])]
        with self._lock:
            if self._key is None:
                raise ValueError("peers before net_init: there is no WireGuard interface")
            current = set(self._run(["wg", "show", WG_DEV, "peers"], None).split())
            keys = {peer["public_key"] for peer in wanted}
            removed = sorted(current - keys)
            for key in removed:
                self._run(["wg", "set", WG_DEV, "peer", key, "remove"], None)
            for peer in wanted:
                self._run(["wg", "set", WG_DEV, "peer", peer["public_key"], "endpoint",
                           peer["endpoint"], "allowed-ips", peer["allowed_ip"],
                           "persistent-keepalive", "off"], None)
            self._peer_keys = {peer["node"]: peer["public_key"] for peer in wanted}
        return {"peers": [peer["node"] for peer in wanted], "removed": len(removed),
                "refused_revoked": sorted({p["node"] for p in given} - {p["node"] for p in wanted})}

    def revoked(self, event: RevocationEvent) -> dict[str, Any]:
        """The verifier revoked ``event.node``: its peer entry leaves the kernel now."""
        with self._lock:
            key = self._peer_keys.pop(event.node, None)
            if key is not None:
                self._run(["wg", "set", WG_DEV, "peer", key, "remove"], None)
        return {"removed_peer": key is not None}

    def reinstated(self, decision: Reinstate) -> dict[str, Any]:
        return {"peer_again": f"{decision.node} with the next net_sync"}

    def status(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, {"op"})
        with self._lock:
            if self._key is None:
                return {"up": False, "peers": []}
            dump = self._run(["wg", "show", WG_DEV, "dump"], None).splitlines()
        own, peers = (dump[0].split("\t") if dump else []), []
        for line in dump[1:MAX_PEERS + 1]:
            fields = line.split("\t")
            if len(fields) >= 7:
                peers.append({"public_key": fields[0], "endpoint": fields[2],
                              "allowed_ips": fields[3], "latest_handshake": _int(fields[4]),
                              "rx_bytes": _int(fields[5]), "tx_bytes": _int(fields[6])})
        return {"up": True, "public_key": own[1] if len(own) > 1 else None, "peers": peers}

    # --- the marker exchange (application traffic between guests) ------------------------

    def listen(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, {"op", "address", "port"})
        address, port = _address(request.get("address")), _port(request.get("port"))
        server = socket.create_server((address, port))
        server.settimeout(TIMEOUT_S)
        threading.Thread(target=_answer_one, args=(server,), daemon=True).start()
        return {"listening": True, "address": address, "port": port}

    def send(self, request: dict[str, Any]) -> dict[str, Any]:
        _only(request, {"op", "address", "port", "message", "repeat"})
        address, port = _address(request.get("address")), _port(request.get("port"))
        message, repeat = request.get("message"), request.get("repeat", 1)
        if not isinstance(message, str) or not 0 < len(message) <= MAX_MESSAGE:
            raise ValueError(f"message: 1 to {MAX_MESSAGE} characters")
        if not isinstance(repeat, int) or isinstance(repeat, bool) or \
                not 0 < repeat <= MAX_REPEAT:
            raise ValueError(f"repeat: 1 to {MAX_REPEAT}")
        data = message.encode()
        started = time.monotonic()
        with socket.create_connection((address, port), timeout=TIMEOUT_S) as conn:
            for _ in range(repeat):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            reply, _ = _read_all(conn, MAX_MESSAGE)
        seconds = time.monotonic() - started
        return {"reply": reply.decode(errors="replace"), "bytes": len(data) * repeat,
                "seconds": round(seconds, 4)}


def _answer_one(server: socket.socket) -> None:
    """One connection: read to its end, answer what arrived (its size and its start)."""
    with server:
        try:
            conn, peer = server.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(TIMEOUT_S)
            try:
                head, total = _read_all(conn, 200)
                text = head.decode(errors="replace")
                conn.sendall(f"heard {total} bytes from {peer[0]}: {text}".encode())
            except OSError:
                return


def _read_all(conn: socket.socket, limit: int) -> tuple[bytes, int]:
    """Until the peer's end of stream: (at most ``limit`` bytes kept, bytes received);
    the rest is counted and dropped, so a large transfer costs no memory."""
    kept, total = bytearray(), 0
    while chunk := conn.recv(1 << 16):
        total += len(chunk)
        if len(kept) < limit:
            kept += chunk[: limit - len(kept)]
    return bytes(kept), total


def _only(request: dict[str, Any], keys: set[str]) -> None:
    extra = set(request) - keys
    if extra:
        raise ValueError(f"{request.get('op')}: unknown keys {sorted(extra)[:4]}")


def _interface(value: object, name: str) -> ipaddress.IPv4Interface:
    if not isinstance(value, str) or "/" not in value:
        raise ValueError(f"{name}: an IPv4 address with a prefix, like 10.77.0.2/24")
    try:
        return ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError(f"{name}: {value[:40]!r} is not an IPv4 address/prefix") from None


def _address(value: object) -> str:
    try:
        return str(ipaddress.IPv4Address(value if isinstance(value, str) else ""))
    except ValueError:
        raise ValueError("address: an IPv4 address") from None


def _port(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
        raise ValueError("port: 1 to 65535")
    return value


def _public_key(value: object) -> str:
    try:
        raw = base64.b64decode(value if isinstance(value, str) else "", validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ValueError("public_key: a WireGuard public key (32 bytes, base64)")
    return base64.b64encode(raw).decode()


def _peer_list(value: object) -> list[dict[str, str]]:
    """A peer list, strictly (what the CryptoVM released is checked too)."""
    if not isinstance(value, list) or len(value) > MAX_PEERS:
        raise ValueError(f"peers: a list of at most {MAX_PEERS} peers")
    peers = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or set(item) != {"node", "public_key", "endpoint",
                                                       "allowed_ip"}:
            raise ValueError(f"peers[{index}]: {{node, public_key, endpoint, allowed_ip}}")
        node, endpoint = item["node"], item["endpoint"]
        if not isinstance(node, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,31}", node):
            raise ValueError(f"peers[{index}].node: a node name")
        host, _, port = endpoint.rpartition(":") if isinstance(endpoint, str) else ("", "", "")
        if not port.isdigit():
            raise ValueError(f"peers[{index}].endpoint: IP:PORT")
        allowed = ipaddress.IPv4Network(_interface(item["allowed_ip"], "allowed_ip").network)
        if allowed.prefixlen != 32:
            raise ValueError(f"peers[{index}].allowed_ip: one address (/32): a peer speaks "
                             "only for itself")
        peers.append({"node": node, "public_key": _public_key(item["public_key"]),
                      "endpoint": f"{_address(host)}:{_port(int(port))}",
                      "allowed_ip": str(allowed)})
    return peers


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def install(agent: GuestAgent, send_frame: Callable[..., None]) -> GuestNetwork:
    """Add the network ops to the guest agent."""
    service = GuestNetwork(agent)
    agent.handlers.update({"net_init": service.init, "net_status": service.status,
                           "net_listen": service.listen, "net_send": service.send})
    # No op sets the peers from the host: only what the CryptoVM releases (net_sync).
    agent.stream_handlers["net_sync"] = \
        lambda request, conn: service.sync(request, conn, send_frame)
    agent.revocation_listeners["network"] = service
    return service
