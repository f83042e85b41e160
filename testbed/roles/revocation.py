"""Signed revocation decisions and how a node receives them (docs/runtime.md).

The verifier signs each decision with its Ed25519 key (``clusters/C/verifier/``, the
private key 0600 in a 0700 directory): a :class:`RevocationEvent` when a node failed its
attestation, a :class:`Reinstate` when the operator decided to trust it again. Both carry
one increasing ``sequence``. A node's agent hands the signed bytes to its
:class:`RevocationGate`, which verifies the signature with the verifier's public key
(pinned at the first decision the node accepts, kept in the node's state), ignores a
decision whose sequence is not above the last one it applied (a replay), and keeps the
set of revoked nodes in ``state/revocations.json`` so a restarted node still refuses them.
Role services that act on it (Trusted Passages closes channels, the CryptoVM stops
serving) implement :class:`RevocationAware`.

A VM's guest keeps its ledger in RAM, for one boot. So the verifier keeps the latest
signed decision about each node (:func:`record_decision`, ``decisions.json`` beside its
key) and :func:`provision_vm`, run whenever a VM's agent comes up, hands it the
revocations still in force, in sequence order: a rebooted VM refuses the same peers as
before. The guest verifies each one as it would a fresh decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from attestation.encoding import b64decode, require_int
from attestation.errors import TestbedError
from attestation.files import atomic_write, private_dir, read_bounded
from attestation.revocation import (  # the decisions and their verification, one definition
    ACTIONS,
    MAX_DECISION,
    MAX_KEY_PEM,
    Decision,
    DecisionLedger,
    Reinstate,
    RevocationEvent,
    decision_args,
    decode_decision,
    encode_decision,
)
from testbed.cluster.agent import AgentClient
from testbed.core.errors import StateError
from testbed.core.files import locked, read_json, write_json
from testbed.core.paths import ClusterPaths

__all__ = [
    "ACTIONS",
    "MAX_DECISION",
    "Decision",
    "Reinstate",
    "RevocationAware",
    "RevocationEvent",
    "RevocationGate",
    "decision_args",
    "decode_decision",
    "encode_decision",
    "provision_vm",
    "public_key_pem",
    "record_decision",
    "revocations_in_force",
    "signing_key",
    "verifier_key_dir",
]

PUBLIC_KEY = "revocation-key.pub"
PRIVATE_KEY = "revocation-key.pem"
DECISIONS = "decisions.json"  # the latest signed decision about each node
MAX_KEY_BYTES = 4096


def verifier_key_dir(paths: ClusterPaths) -> Path:
    """Where the verifier's signing key (0600) and its public key (0644) live."""
    return paths.root / "verifier"


def public_key_pem(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def signing_key(paths: ClusterPaths) -> Ed25519PrivateKey:
    """The verifier's revocation key, created once (under the directory's lock)."""
    directory = private_dir(verifier_key_dir(paths))
    with locked(directory / ".lock"):
        path = directory / PRIVATE_KEY
        if not path.exists():
            key = Ed25519PrivateKey.generate()
            atomic_write(path, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
            atomic_write(directory / PUBLIC_KEY, public_key_pem(key.public_key()).encode(),
                         mode=0o644)
        loaded = serialization.load_pem_private_key(
            read_bounded(path, MAX_KEY_BYTES, what="verifier key"), password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise StateError(f"{path} is not an Ed25519 private key")
    return loaded


def provision_vm(paths: ClusterPaths, node: str, agent: AgentClient) -> None:
    """Give a VM's guest agent the verifier's public key when it starts (a sim node reads
    it from the cluster directory; a guest cannot), then the signed revocations still in
    force (a guest forgets them when it reboots). The guest pins the first key it gets."""
    pem = public_key_pem(signing_key(paths).public_key())
    try:
        agent.call({"op": "revocation_key", "public_key": pem})
    except TestbedError as exc:
        raise StateError(f"node {node}: its guest agent did not take the verifier's key "
                         f"({exc}); `testbed down` then `testbed up --backend qemu` boots "
                         "the current image") from None
    for args in revocations_in_force(paths):
        try:  # "applied", or a replay when the guest had it already: both are fine
            agent.role("revoked", args)
        except TestbedError as exc:
            raise StateError(f"node {node}: its guest agent did not take a revocation still "
                             f"in force ({exc}); it would trust a revoked node") from None


def record_decision(paths: ClusterPaths, decision: Decision, signature: bytes) -> None:
    """Keep ``decision`` (signed) as the latest about its node, unless a later one is
    kept already (under the verifier directory's lock)."""
    directory = private_dir(verifier_key_dir(paths))
    with locked(directory / ".lock"):
        kept = _read_decisions(directory)
        last = kept.get(decision.node)
        if last is None or decision_sequence(last) < decision.sequence:
            kept[decision.node] = decision_args(decision, signature)
            write_json(directory / DECISIONS, kept)


def revocations_in_force(paths: ClusterPaths) -> list[dict[str, Any]]:
    """The signed revocations not superseded by a reinstatement, as role-action args,
    in sequence order (the order a receiver's ledger applies them in)."""
    directory = private_dir(verifier_key_dir(paths))
    with locked(directory / ".lock"):
        kept = _read_decisions(directory)
    in_force = [args for args in kept.values()
                if _decision_of(args, directory).kind == "revoked"]
    return sorted(in_force, key=decision_sequence)


def decision_sequence(args: dict[str, Any]) -> int:
    return _decision_of(args, None).sequence


def _read_decisions(directory: Path) -> dict[str, dict[str, Any]]:
    doc = read_json(directory / DECISIONS) or {}
    if not isinstance(doc, dict) or not all(
            isinstance(args, dict) and set(args) == {"decision", "signature"}
            for args in doc.values()):
        raise _damaged(directory)
    for args in doc.values():
        _decision_of(args, directory)
    return doc


def _decision_of(args: dict[str, Any], directory: Path | None) -> Decision:
    try:
        return decode_decision(b64decode(args["decision"], "decision", limit=MAX_DECISION))
    except (TestbedError, KeyError, TypeError):
        raise _damaged(directory) from None


def _damaged(directory: Path | None) -> StateError:
    where = "the verifier's decisions" if directory is None else str(directory / DECISIONS)
    return StateError(f"{where} is damaged: restore it from a backup (removing it makes "
                      "rebooted VMs forget the revocations in force)")


@runtime_checkable
class RevocationAware(Protocol):
    """A role service that acts when a node is revoked or reinstated."""

    def revoked(self, event: RevocationEvent) -> dict[str, Any]: ...

    def reinstated(self, decision: Reinstate) -> dict[str, Any]: ...


class RevocationGate(DecisionLedger):
    """A sim node's ledger, kept in ``state/revocations.json`` (a restarted node still
    refuses the nodes revoked before); the verifier key is read from the cluster at the
    first decision, then pinned."""

    def __init__(self, state_file: Path, verifier_key_file: Path) -> None:
        self._file = state_file
        self._key_file = verifier_key_file
        doc = read_json(state_file) or {}
        damaged = StateError(f"{state_file} is damaged: remove it (the node then trusts the "
                             "verifier key it next sees)")
        try:
            sequence = require_int(doc.get("sequence", 0), "sequence", StateError)
            pinned = doc.get("verifier_key")
            revoked = dict(doc.get("revoked", {}))
        except (AttributeError, TypeError, ValueError):
            raise damaged from None
        if not isinstance(pinned, str | None) or not all(
                isinstance(event, dict) and {"time", "sequence", "check"} <= set(event)
                for event in revoked.values()):
            raise damaged
        super().__init__(self._read_key, pinned=pinned, sequence=sequence, revoked=revoked)

    def _read_key(self) -> str:
        try:
            return self._key_file.read_text()[:MAX_KEY_PEM]
        except (OSError, UnicodeDecodeError) as exc:
            raise StateError(f"the verifier's public key is unreadable: {exc}") from None

    def _record(self) -> None:
        write_json(self._file, {"sequence": self.sequence, "verifier_key": self.pinned_key,
                                "revoked": self.revoked})
