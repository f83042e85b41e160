"""The Trusted Passages service of `server` and `client` nodes in a cluster.

Each such node, inside its own process:

- generates its TLS key in memory (it is never written anywhere: the RA-TLS model
  of docs/protocol.md) and has the cluster's TLS CA certify it;
- listens for attested channels on loopback and records its port in ``run/tp.json``;
- quotes through the node's TPM (under the node's TPM lock) for every channel;
- validates peers against the cluster's AK registry (written by ``testbed up``) and
  the peer's policy, predicted from the peer's *untampered* boot chain;
- on request (agent op ``role``, action ``connect``), opens an attested channel to
  another node and reports what it verified;
- on request (action ``enroll``, sent by ``testbed up`` once every node is registered,
  when the cluster has a ``cryptovm`` node): keyless TLS. It generates a fresh TLS key,
  has the CryptoVM certify it over an attested channel (bootstrapped with the cluster-CA
  certificate), checks the CryptoVM's key attestation of its CA key, and from then on
  serves and connects with the VSM-issued certificate, trusting only the VSM's CA. The
  cluster CA stays for the enrollment bootstrap only (testbed/cryptovm_role.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import VerificationError
from cryptovm.tlsissuer import DEFAULT_VALIDITY_S, certificate_info
from testbed.errors import StateError
from testbed.roles import NodeContext
from testbed.sim import SIM_PCRS, ClusterPaths, load_registry, node_policy
from trusted_passages import (
    AttestedChannel,
    BindingContext,
    ChannelConfig,
    Issuer,
    PeerEvidence,
    Server,
    TpmValidator,
    connect,
    serve,
)
from trusted_passages.attester import binding_digest
from trusted_passages.envelope import Envelope, decode_envelope
from trusted_passages.pki import CertificateAuthority, generate_key, issue_certificate, make_ca
from trusted_passages.summary import summarize

HOST = "127.0.0.1"
PROFILE: Final = "tp13"
MAX_MESSAGE = 4096


# --- the cluster's TLS CA (the provider's CA of the paper) --------------------------------


def cluster_tls_ca(paths: ClusterPaths) -> CertificateAuthority:
    """The cluster's TLS CA, created once (under a lock) in the cluster directory.

    Its key is a secret of the lab operator: 0600 in a 0700 directory. Nodes only
    use it to certify their own fresh keys at start.
    """
    directory = paths.root / "tls-ca"
    directory.mkdir(mode=0o700, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cert_path, key_path = directory / "ca.pem", directory / "ca-key.pem"
        if not cert_path.exists():
            ca = make_ca(f"{paths.name} cluster TLS CA")
            _write_private(key_path, ca.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
            cert_path.write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateError(f"{key_path} is not an EC private key")
    return CertificateAuthority(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


# --- issuing and validating through the node ------------------------------------------------


class NodeIssuer:
    """Quotes through the node's TPM (its lock, its AK) for one connection's binding."""

    def __init__(self, ctx: NodeContext, context: BindingContext | None = None) -> None:
        self._ctx = ctx
        self._context = context

    def bound(self, context: BindingContext) -> Issuer:
        return NodeIssuer(self._ctx, context)

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        if self._context is None:
            raise StateError("NodeIssuer used without a binding context")
        qualifying = binding_digest(self._context.profile, self._context.role, nonce, user_data)
        evidence = self._ctx.quote(qualifying, SIM_PCRS)
        return Envelope(self._ctx.name, self._context.role, self._context.profile, user_data,
                        evidence.to_dict()).to_json()


class ClusterValidator:
    """Validates any registered node of the cluster against *that* node's policy.

    The envelope's node claim only selects which registry entry and policy apply;
    ``AkRegistry.for_node`` then insists the AK really is that node's. The registry
    is re-read per validation because ``testbed up`` registers nodes after they start.
    """

    def __init__(self, paths: ClusterPaths) -> None:
        self._paths = paths

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        claimed = decode_envelope(evidence).node
        spec = {n.name: n for n in self._paths.load_spec().nodes}
        if claimed not in spec:
            raise VerificationError("ak_trust", f"{claimed!r} is not a node of this cluster")
        registry = load_registry(self._paths).for_node(claimed)
        return TpmValidator(registry, node_policy(spec[claimed])).validate(evidence, nonce)


# --- the service --------------------------------------------------------------------------


@dataclass
class TrustedPassagesService:
    """A node's attested-channel listener plus the ``connect`` and ``enroll`` actions.

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

    @property
    def port(self) -> int:
        return self.server.address[1]

    def describe(self) -> str:
        return (f"Trusted Passages {PROFILE} on {HOST}:{self.port} ({self.connections} "
                f"channels; certificate from the {self.tls['trust']})")

    def stop(self) -> None:
        with self._switch:
            self.server.close(timeout=2)
        with contextlib.suppress(FileNotFoundError):
            (self.ctx.run_dir / "tp.json").unlink()

    def call(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        if action == "connect":
            return self._connect(args)
        if action == "enroll":
            return self._enroll(args)
        if action == "info":
            return {"node": self.ctx.name, "port": self.port, "profile": PROFILE,
                    "tls": self.tls}
        raise StateError(f"unknown action {action!r}: the Trusted Passages service knows "
                         "connect, enroll, info")

    def _enroll(self, args: dict[str, Any]) -> dict[str, Any]:
        # Imported here: cryptovm_role builds on this module's issuer and validator.
        from testbed.cryptovm_role import enroll

        validity = args.get("validity", DEFAULT_VALIDITY_S)
        if not isinstance(validity, int) or isinstance(validity, bool):
            raise StateError("enroll takes args {validity: seconds} (optional)")
        enrolled = enroll(self.ctx, self.bootstrap, validity)
        config = ChannelConfig(certificate=enrolled.certificate,
                               private_key=enrolled.private_key,
                               ca_certificates=[enrolled.ca_certificate],
                               issuer=NodeIssuer(self.ctx),
                               validator=ClusterValidator(self.ctx.cluster_paths),
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

    def _connect(self, args: dict[str, Any]) -> dict[str, Any]:
        peer = args.get("peer")
        message = args.get("message", f"hello from {self.ctx.name}")
        if not isinstance(peer, str) or not isinstance(message, str) or \
                len(message) > MAX_MESSAGE:
            raise StateError("connect needs args {peer: NODE, message: short text}")
        port = peer_port(self.ctx.cluster_paths, peer)
        with self._switch:  # a consistent pair while an enrollment switches them
            config, tls = self.config, self.tls
        with connect(HOST, port, config.with_expected_peer(peer)) as channel:
            channel.send(message.encode())
            reply = channel.recv().decode(errors="replace")
            evidence = summarize(channel.peer)
        # OpenSSL verified the peer's chain against this config's only trust anchor.
        evidence["tls"] = {"own_certificate": tls["certificate"], "trust": tls["trust"],
                           "peer_certificate_issuer": tls["certificate"]["issuer"],
                           "peer_tls_key_sha256": channel.peer.user_data.hex(),
                           "keyless": tls["keyless"], "ca": tls.get("ca")}
        return {"peer": peer, "sent": message, "reply": reply, "evidence": evidence}

    def _handle(self, channel: AttestedChannel) -> None:
        self.connections += 1
        request = channel.recv().decode(errors="replace")[:MAX_MESSAGE]
        channel.send(f"{self.ctx.name} heard {request!r} from attested node "
                     f"{channel.peer.node!r}".encode())


def peer_port(paths: ClusterPaths, peer: str) -> int:
    path = paths.root / "nodes" / peer / "run" / "tp.json"
    try:
        port = json.loads(path.read_text())["port"]
    except (OSError, ValueError, KeyError):
        raise StateError(f"node {peer!r} runs no Trusted Passages service "
                         "(is it a server or client node, and up?)") from None
    if not isinstance(port, int):
        raise StateError(f"{path}: port is not a number")
    return port


def _publish_port(ctx: NodeContext, port: int) -> None:
    tmp = ctx.run_dir / ".tp.json.tmp"
    tmp.write_text(json.dumps({"port": port, "profile": PROFILE}))
    tmp.replace(ctx.run_dir / "tp.json")


def start_trusted_passages(ctx: NodeContext) -> TrustedPassagesService:
    key = generate_key(PROFILE)
    ca = cluster_tls_ca(ctx.cluster_paths)
    certificate = issue_certificate(ca, ctx.name, key)
    config = ChannelConfig(certificate=certificate, private_key=key,
                           ca_certificates=[ca.certificate], issuer=NodeIssuer(ctx),
                           validator=ClusterValidator(ctx.cluster_paths), profile=PROFILE,
                           timeout=10.0)
    holder: dict[str, TrustedPassagesService] = {}
    server = serve(HOST, 0, config, lambda ch: holder["service"]._handle(ch))
    tls = {"trust": "cluster CA", "keyless": False, "certificate": certificate_info(certificate),
           "ca": None}
    service = TrustedPassagesService(ctx, config, server, config, tls)
    holder["service"] = service
    _publish_port(ctx, service.port)
    return service

