"""The ``server`` and ``client`` roles: Trusted Passages between the nodes of a cluster.

Node side (inside a sim node process), the service:

- generates its TLS key in memory (never written anywhere: the RA-TLS model of
  docs/protocol.md) and has the cluster's TLS CA certify it;
- listens for attested channels on loopback and publishes its port in ``run/tp.json``;
- quotes through the node's TPM for every channel, and validates peers against the
  cluster's AK registry and each peer's policy (:mod:`testbed.roles.trust`);
- answers ``connect`` (open an attested channel to another node and report what it
  verified), ``open`` (the same, but the channel stays open), ``enroll`` (keyless
  TLS: a fresh key certified by the cluster's CryptoVM, :mod:`testbed.roles.enrollment`;
  from then on the service uses that certificate and trusts only the VSM's CA) and
  ``info``;
- tracks every open channel by its peer node: when the verifier revokes a node
  (:mod:`testbed.roles.revocation`) it closes every channel to or from it, and its
  validator refuses that node until it is reinstated.

Host side: :func:`connect_peer` and :func:`request_enrollment` send those requests over
a node's agent. On qemu VMs the role starts nothing at ``up``: the host provisions
Trusted Passages inside the guests per channel (:mod:`testbed.qemu.relay`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from attestation.errors import TestbedError
from attestation.files import atomic_write
from cryptovm.tlsissuer import DEFAULT_VALIDITY_S, certificate_info
from testbed.cluster.agent import AgentClient
from testbed.cluster.results import EnrollmentOutcome, ServiceEndpoint, ServiceInfo
from testbed.core.errors import StateError
from testbed.core.files import read_json
from testbed.core.paths import ClusterPaths
from testbed.roles.base import InfoRequest, NodeContext, RoleRequest, decode_request
from testbed.roles.enrollment import enroll
from testbed.roles.revocation import Reinstate, RevocationEvent
from testbed.roles.trust import HOST, PROFILE, ClusterValidator, NodeIssuer, cluster_tls_ca
from trusted_passages import AttestedChannel, ChannelConfig, Server, connect, serve
from trusted_passages import ProtocolError as ChannelError
from trusted_passages.pki import generate_key, issue_certificate
from trusted_passages.summary import summarize

__all__ = [
    "ConnectRequest",
    "EnrollRequest",
    "OpenRequest",
    "TrustedPassagesService",
    "connect_peer",
    "peer_port",
    "request_enrollment",
    "start_node_service",
]

MAX_MESSAGE = 4096
PORT_FILE = "tp.json"
IDLE_S = 30.0  # a held channel with no request for this long is closed
POLL_S = 0.2  # how often a served channel's thread notices it was closed under it


# --- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectRequest:
    """Open an attested channel to ``peer``, send ``message``, report what was verified."""

    action: ClassVar[str] = "connect"
    peer: str
    message: str | None = None  # None: "hello from <node>"

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        peer, message = args.get("peer"), args.get("message")
        if not isinstance(peer, str) or not isinstance(message, str | None) \
                or len(message or "") > MAX_MESSAGE or set(args) - {"peer", "message"}:
            raise StateError(f"connect takes args {{peer: NODE, message: text of at most "
                             f"{MAX_MESSAGE} characters (optional)}}")
        return cls(peer, message)

    def to_args(self) -> dict[str, Any]:
        return {"peer": self.peer, "message": self.message}


@dataclass(frozen=True)
class EnrollRequest:
    """Keyless TLS: get a certificate for a fresh key from the cluster's CryptoVM."""

    action: ClassVar[str] = "enroll"
    validity: int = DEFAULT_VALIDITY_S

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        validity = args.get("validity", DEFAULT_VALIDITY_S)
        if not isinstance(validity, int) or isinstance(validity, bool) or validity <= 0 \
                or set(args) - {"validity"}:
            raise StateError("enroll takes args {validity: seconds} (optional)")
        return cls(validity)

    def to_args(self) -> dict[str, Any]:
        return {"validity": self.validity}


@dataclass(frozen=True)
class OpenRequest:
    """Open an attested channel to ``peer``, exchange one message, and keep it open."""

    action: ClassVar[str] = "open"
    peer: str

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> Self:
        peer = args.get("peer")
        if not isinstance(peer, str) or set(args) != {"peer"}:
            raise StateError("open takes args {peer: NODE}")
        return cls(peer)

    def to_args(self) -> dict[str, Any]:
        return {"peer": self.peer}


REQUESTS: tuple[type[RoleRequest], ...] = (ConnectRequest, EnrollRequest, InfoRequest,
                                           OpenRequest)


# --- the node service ----------------------------------------------------------------------


@dataclass
class TrustedPassagesService:
    """A node's attested-channel listener plus its ``connect`` and ``enroll`` actions.

    ``config`` is what service channels use; ``bootstrap`` the cluster-CA identity the
    node started with (after enrollment: for enrolling again, nothing else). ``tls``
    describes the service channels' certificate and trust anchor.
    """

    ctx: NodeContext
    config: ChannelConfig
    server: Server
    bootstrap: ChannelConfig
    tls: dict[str, Any]
    connections: int = 0
    _switch: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Every open channel by its peer node (served and held ones): a revocation closes them.
    _open: dict[str, set[AttestedChannel]] = field(default_factory=dict, repr=False)
    _closed: set[int] = field(default_factory=set, repr=False)  # ids closed by a revocation
    _channels_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def port(self) -> int:
        return self.server.address[1]

    def describe(self) -> ServiceInfo:
        return ServiceInfo("trusted-passages",
                           (ServiceEndpoint("trusted-passages", HOST, self.port),),
                           {"channels": self.connections,
                            "open_channels": sum(self.open_channels().values())},
                           {"profile": PROFILE, "certificate_from": str(self.tls["trust"])})

    def stop(self) -> None:
        with self._switch:
            self.server.close(timeout=2)
        with contextlib.suppress(FileNotFoundError):
            (self.ctx.run_dir / PORT_FILE).unlink()

    def call(self, action: str, args: Mapping[str, Any]) -> dict[str, Any]:
        request = decode_request(REQUESTS, action, args, "Trusted Passages service")
        if isinstance(request, ConnectRequest):
            return self._connect(request)
        if isinstance(request, EnrollRequest):
            return self._enroll(request)
        if isinstance(request, OpenRequest):
            return self._open_held(request)
        return {"node": self.ctx.name, "port": self.port, "profile": PROFILE, "tls": self.tls,
                "open": self.open_channels()}

    # --- open channels and revocation ---------------------------------------------------

    def open_channels(self) -> dict[str, int]:
        with self._channels_lock:
            return {peer: len(channels) for peer, channels in self._open.items() if channels}

    def _track(self, peer: str, channel: AttestedChannel) -> None:
        with self._channels_lock:
            self._open.setdefault(peer, set()).add(channel)

    def _untrack(self, peer: str, channel: AttestedChannel) -> None:
        with self._channels_lock:
            self._open.get(peer, set()).discard(channel)
            self._closed.discard(id(channel))

    def revoked(self, event: RevocationEvent) -> dict[str, Any]:
        """Close every channel to or from the revoked node (new ones: the validator
        refuses it from now on)."""
        with self._channels_lock:
            channels = list(self._open.pop(event.node, set()))
            self._closed.update(id(c) for c in channels)
        for channel in channels:
            with contextlib.suppress(ChannelError, OSError):  # the peer may be gone
                channel.close()
        return {"closed_channels": len(channels)}

    def reinstated(self, decision: Reinstate) -> dict[str, Any]:
        return {"accepts": decision.node}

    def _open_held(self, request: OpenRequest) -> dict[str, Any]:
        port = peer_port(self.ctx.cluster_paths, request.peer)
        with self._switch:
            config = self.config
        channel = connect(HOST, port, config.with_expected_peer(request.peer))
        try:
            channel.send(f"hello from {self.ctx.name}".encode())
            reply = channel.recv().decode(errors="replace")
        except BaseException:
            channel.close()
            raise
        self._track(request.peer, channel)
        return {"peer": request.peer, "reply": reply, "open": self.open_channels()}

    def _enroll(self, request: EnrollRequest) -> dict[str, Any]:
        enrolled = enroll(self.ctx, self.bootstrap, request.validity)
        config = ChannelConfig(certificate=enrolled.certificate,
                               private_key=enrolled.private_key,
                               ca_certificates=[enrolled.ca_certificate],
                               issuer=NodeIssuer(self.ctx),
                               validator=ClusterValidator(self.ctx.cluster_paths,
                                                          self.ctx.revocations),
                               profile=PROFILE, timeout=10.0)
        tls = {"trust": f"VSM CA {enrolled.ca['issuer']!r}", "keyless": True,
               "certificate": enrolled.info, "ca": enrolled.ca}
        self._listen(config, tls)
        return {"node": self.ctx.name, "enrolled": True, "cryptovm": enrolled.cryptovm,
                "port": self.port, **tls}

    def _listen(self, config: ChannelConfig, tls: dict[str, Any]) -> None:
        """Serve with ``config`` from now on: a new listener, published in tp.json, then
        the old one closed (peers read the port per connection, so none is refused)."""
        with self._switch:
            old = self.server
            self.server = serve(HOST, 0, config, self._handle)
            self.config, self.tls = config, tls
            _publish_port(self.ctx, self.port)
        old.close(timeout=2)

    def _connect(self, request: ConnectRequest) -> dict[str, Any]:
        port = peer_port(self.ctx.cluster_paths, request.peer)
        message = request.message or f"hello from {self.ctx.name}"
        with self._switch:  # a consistent pair while an enrollment switches them
            config, tls = self.config, self.tls
        with connect(HOST, port, config.with_expected_peer(request.peer)) as channel:
            channel.send(message.encode())
            reply = channel.recv().decode(errors="replace")
            evidence = summarize(channel.peer)
        # OpenSSL verified the peer's chain against this config's only trust anchor.
        evidence["tls"] = {"own_certificate": tls["certificate"], "trust": tls["trust"],
                           "peer_certificate_issuer": tls["certificate"]["issuer"],
                           "peer_tls_key_sha256": channel.peer.user_data.hex(),
                           "keyless": tls["keyless"], "ca": tls.get("ca")}
        return {"peer": request.peer, "sent": message, "reply": reply,
                "evidence": evidence}

    def _handle(self, channel: AttestedChannel) -> None:
        """Answer each message until the peer closes, idles out, or is revoked."""
        self.connections += 1
        peer = channel.peer.node
        self._track(peer, channel)
        try:
            while data := self._next_message(channel):
                request = data.decode(errors="replace")[:MAX_MESSAGE]
                channel.send(f"{self.ctx.name} heard {request!r} from attested node "
                             f"{peer!r}".encode())
        finally:
            self._untrack(peer, channel)

    def _next_message(self, channel: AttestedChannel) -> bytes:
        """The next message; b"" at the channel's end, after IDLE_S, or once a
        revocation closed it (noticed within POLL_S)."""
        deadline = time.monotonic() + IDLE_S
        while time.monotonic() < deadline:
            with self._channels_lock:
                if id(channel) in self._closed:
                    return b""
            try:
                return channel.recv(timeout=POLL_S)
            except ChannelError as exc:
                # blocking.py's wording for "no data yet": poll again; else it is over.
                if not str(exc).startswith("timeout waiting"):
                    return b""
        return b""


def peer_port(paths: ClusterPaths, peer: str) -> int:
    """The port a node's Trusted Passages service published."""
    path = paths.node(peer).run / PORT_FILE
    info = None
    with contextlib.suppress(StateError):
        info = read_json(path)
    port = info.get("port") if isinstance(info, dict) else None
    if not isinstance(port, int) or isinstance(port, bool):
        raise StateError(f"node {peer!r} runs no Trusted Passages service "
                         "(is it a server or client node, and up?)")
    return port


def _publish_port(ctx: NodeContext, port: int) -> None:
    atomic_write(ctx.run_dir / PORT_FILE, json.dumps({"port": port, "profile": PROFILE}).encode())


def start_node_service(ctx: NodeContext) -> TrustedPassagesService:
    key = generate_key(PROFILE)
    ca = cluster_tls_ca(ctx.cluster_paths)
    certificate = issue_certificate(ca, ctx.name, key)
    config = ChannelConfig(certificate=certificate, private_key=key,
                           ca_certificates=[ca.certificate], issuer=NodeIssuer(ctx),
                           validator=ClusterValidator(ctx.cluster_paths, ctx.revocations),
                           profile=PROFILE, timeout=10.0)
    holder: dict[str, TrustedPassagesService] = {}
    server = serve(HOST, 0, config, lambda ch: holder["service"]._handle(ch))
    tls = {"trust": "cluster CA", "keyless": False, "certificate": certificate_info(certificate),
           "ca": None}
    service = TrustedPassagesService(ctx, config, server, config, tls)
    holder["service"] = service
    _publish_port(ctx, service.port)
    return service


# --- host side -----------------------------------------------------------------------------


def connect_peer(agent: AgentClient, peer: str, message: str) -> dict[str, Any]:
    """Have ``agent``'s node open an attested channel to ``peer``; what both verified."""
    request = ConnectRequest(peer, message)
    return agent.role(request.action, request.to_args())


def request_enrollment(agent: AgentClient) -> EnrollmentOutcome:
    """Have ``agent``'s node enroll with the cluster's CryptoVM (keyless TLS)."""
    request = EnrollRequest()
    try:
        answer = agent.role(request.action, request.to_args())
    except TestbedError as exc:
        return EnrollmentOutcome(False, error=str(exc))
    return EnrollmentOutcome(True, answer.get("certificate"), answer.get("ca"))
