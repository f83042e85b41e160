"""TPM-backed evidence: :class:`TpmIssuer` quotes the node's PCRs with its AK, bound
to the session (:func:`~trusted_passages.interfaces.binding_digest`);
:class:`TpmValidator` checks such a quote with the project's QuoteVerifier.

The one module of the package that imports the verifier side of ``attestation``
(verifier, registrar, policy): the core knows only :mod:`trusted_passages.interfaces`.
tpm2-pytss is needed only by whoever builds the TpmClient a TpmIssuer is given.

Batching (opt-in, ``TpmIssuer(batch_window=...)``): a :class:`Batcher` gathers the
bindings that arrive within the window, the TPM quotes their Merkle root once, and
each session gets that quote plus its inclusion path (:mod:`trusted_passages.batch`).
The validator accepts both forms; for a batched one it recomputes the root from the
session's own binding and names a mismatch ``batch_inclusion``.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, runtime_checkable

from attestation.errors import TestbedError, TpmError, VerificationError
from attestation.evidence import Evidence
from attestation.policy import ReferencePolicy
from attestation.registrar import AkTrust
from attestation.report import CheckResult, VerificationReport
from attestation.tpm_types import ClockInfo, PcrSelection, PublicArea, parse_public_cached
from attestation.verifier import ClockHistory, QuoteVerifier
from trusted_passages.batch import MAX_BATCH, BatchProof, MerkleTree, batch_qualifying_data
from trusted_passages.envelope import Envelope, check_node_name, decode_envelope
from trusted_passages.interfaces import (
    BindingContext,
    PeerEvidence,
    binding_digest,
    require_context,
)

if TYPE_CHECKING:  # tpm2-pytss is not in Debian 12 guests, which use the rest of the package
    from attestation.tpm import KeyAlgorithm, QuoteResult, TpmClient, TpmKey

__all__ = ["Batcher", "TpmIssuer", "TpmValidator", "verify_batched"]

T = TypeVar("T")
DEFAULT_MAX_BATCH = 256


@dataclass
class _Batch(Generic[T]):
    leaves: list[bytes] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    tree: MerkleTree | None = None
    result: T | None = None
    error: str | None = None


class Batcher(Generic[T]):
    """Signs the Merkle root of the leaves that gather within ``window`` seconds, once.

    The first submitter of a batch leads it: it waits until the window has passed or
    ``max_batch`` leaves have arrived, closes the batch (later arrivals open the next
    one, which gathers while this one is being signed), builds the tree and calls
    ``sign(batch_qualifying_data(root))``. Everyone gets the one result and a proof.

    ``eager`` (the default) is group commit: a leader stops waiting once no other
    batch is being signed and the TPM has been idle for ``linger`` seconds (those
    just served come back with their next session within it), so a TPM idle at low
    load quotes almost at once and a busy one gathers everything that arrives while
    it works; the window bounds the wait. ``eager=False`` always waits the window.
    """

    def __init__(self, sign: Callable[[bytes], T], window: float,
                 max_batch: int = DEFAULT_MAX_BATCH, *, eager: bool = True,
                 linger: float = 0.005) -> None:
        if not window >= 0 or not linger >= 0 or not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"the batch window and linger must be >= 0 s and max_batch "
                             f"1..{MAX_BATCH}")
        self._sign = sign
        self.window = window
        self.max_batch = max_batch
        self.eager = eager
        self.linger = min(linger, window)
        self._cond = threading.Condition()
        self._open: _Batch[T] | None = None
        self._signing = 0  # batches closed and not yet signed
        self._idle_since = 0.0  # monotonic time the last signing ended

    def submit(self, leaf: bytes) -> tuple[T, BatchProof]:
        with self._cond:
            batch, leader = self._open, self._open is None
            if batch is None:
                batch = self._open = _Batch()
            index = len(batch.leaves)
            batch.leaves.append(leaf)
            if len(batch.leaves) >= self.max_batch:
                self._close(batch)
        if leader:
            self._lead(batch)
        else:
            batch.done.wait()
        if batch.error is not None:
            raise TpmError(f"batched quote failed: {batch.error}")
        assert batch.tree is not None and batch.result is not None
        return batch.result, batch.tree.proof(index)

    def _close(self, batch: _Batch[T]) -> None:
        """Under the condition's lock: later arrivals go to a new batch."""
        if self._open is batch:
            self._open = None
            self._signing += 1
            self._cond.notify_all()

    def _lead(self, batch: _Batch[T]) -> None:
        start = time.monotonic()
        with self._cond:
            while self._open is batch:
                wake = self._wake_time(start)
                now = time.monotonic()
                if now >= wake:
                    break
                self._cond.wait(wake - now)
            self._close(batch)
        try:
            batch.tree = MerkleTree(batch.leaves)
            batch.result = self._sign(batch_qualifying_data(batch.tree.root))
        except TestbedError as exc:
            batch.error = str(exc)
        finally:
            batch.done.set()  # never leave a waiter hanging, whatever happened
            with self._cond:
                self._signing -= 1
                self._idle_since = time.monotonic()
                self._cond.notify_all()  # an eager leader may go soon

    def _wake_time(self, start: float) -> float:
        """When a leader that began waiting at ``start`` closes its batch (under the lock)."""
        deadline = start + self.window
        if not self.eager or self._signing:
            return deadline
        return min(deadline, max(start, self._idle_since) + self.linger)


def verify_batched(verifier: QuoteVerifier, evidence: Evidence, leaf: bytes,
                   proof: BatchProof) -> VerificationReport:
    """Verify a batch's quote for the party whose own value is ``leaf`` (a verifier's
    nonce): every check of ``verifier`` against the root ``leaf``'s path leads to, and
    ``batch_inclusion`` in place of ``qualifying_data`` (a path for another leaf, or a
    quote from another batch, fails it by name)."""
    try:
        root = proof.root(leaf)
    except ValueError as exc:
        return VerificationReport((CheckResult("batch_inclusion", "failed",
                                               f"the inclusion path is malformed: {exc}"),))
    report = verifier.verify(evidence, batch_qualifying_data(root))
    checks: list[CheckResult] = []
    for check in report.checks:
        if check.name != "qualifying_data":
            checks.append(check)
        elif check.failed:
            checks.append(CheckResult("batch_inclusion", "failed", (
                f"the nonce (leaf {proof.index} of {proof.size}) does not lead to the root "
                "the quote covers (a path for another leaf, or a quote from another batch)")))
        else:
            checks += [check, CheckResult("batch_inclusion", "passed", (
                f"the nonce is leaf {proof.index} of a batch of {proof.size}; its path leads "
                "to the quoted root"))]
    return VerificationReport(tuple(checks))


class _TpmAccess:
    """One TpmClient shared by every bound copy of a TpmIssuer, serialized by one lock.

    swtpm serves a single command stream and TpmClient is not thread-safe, while
    a server issues evidence from many connection threads at once.
    """

    def __init__(self, client: TpmClient, algorithm: KeyAlgorithm) -> None:
        self.client = client
        self.algorithm = algorithm
        self.lock = threading.Lock()
        self._ak: TpmKey | None = None

    def quote(self, selection: PcrSelection, qualifying_data: bytes,
              event_log: Callable[[], bytes | None]) -> tuple[QuoteResult, bytes, bytes | None]:
        with self.lock:
            if self._ak is None:
                self._ak = self.client.attestation_key(self.algorithm)
            result = self.client.quote(self._ak, selection, qualifying_data)
            # Read the log under the same lock, so a measurer extending PCRs under
            # TpmIssuer.tpm_lock can never land between the quote and its log.
            return result, self._ak.public, event_log()

    def close(self) -> None:
        with self.lock:
            if self._ak is not None:
                self.client.flush(self._ak)  # persistent AK: only the ESYS handle is closed
                self._ak = None


class TpmIssuer:
    """Quotes the node's PCRs with its AK, binding the session (see binding_digest).

    ``event_log`` is the node's event log: bytes, or a callable read at every
    quote (runtime events appended after boot), or None. The AK is the TPM's
    persistent one (created on first use); nothing persistent is ever flushed.

    ``batch_window`` (seconds) turns batching on: bindings arriving within the
    window share one quote over their Merkle root (at most ``max_batch`` each;
    ``eager``: see :class:`Batcher`).
    """

    def __init__(self, client: TpmClient, node: str, selection: PcrSelection,
                 event_log: Callable[[], bytes | None] | bytes | None = None,
                 ak_algorithm: KeyAlgorithm = "ecc", *,
                 context: BindingContext | None = None, batch_window: float | None = None,
                 max_batch: int = DEFAULT_MAX_BATCH, eager: bool = True) -> None:
        self.node = check_node_name(node)
        self.selection = selection
        self.context = context
        self._event_log = event_log if callable(event_log) else (lambda: event_log)
        self._tpm = _TpmAccess(client, ak_algorithm)
        self._batcher: Batcher[tuple[QuoteResult, bytes, bytes | None]] | None = None
        if batch_window is not None:
            self._batcher = Batcher(self._quote, batch_window, max_batch, eager=eager)

    @property
    def tpm_lock(self) -> threading.Lock:
        """Hold this while extending PCRs and appending to the event log at runtime."""
        return self._tpm.lock

    def bound(self, context: BindingContext) -> TpmIssuer:
        twin = copy.copy(self)  # shares the TPM access and its lock
        twin.context = context
        return twin

    @property
    def batching(self) -> bool:
        return self._batcher is not None

    def batched(self, window: float, max_batch: int = DEFAULT_MAX_BATCH, *,
                eager: bool = True) -> TpmIssuer:
        """A twin sharing this issuer's TPM access (and lock) that batches within
        ``window`` seconds (``ChannelConfig(batch_window=...)`` calls this). An issuer
        batching with the same settings returns itself, so copies of a config share
        their batches."""
        current = self._batcher
        if current is not None and (current.window, current.max_batch, current.eager) == \
                (window, max_batch, eager):
            return self
        twin = copy.copy(self)
        twin._batcher = Batcher(twin._quote, window, max_batch, eager=eager)
        return twin

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        ctx = require_context(self.context, "TpmIssuer")
        binding = binding_digest(ctx.profile, ctx.role, nonce, user_data)
        proof: BatchProof | None = None
        if self._batcher is None:
            quote, ak_public, log = self._quote(binding)
        else:
            (quote, ak_public, log), proof = self._batcher.submit(binding)
        evidence = Evidence(attest=quote.attest, signature=quote.signature, ak_public=ak_public,
                            pcr_bank=self.selection.bank, pcrs=quote.pcrs, event_log=log)
        return Envelope(self.node, ctx.role, ctx.profile, user_data,
                        evidence.to_dict(), proof).to_json()

    def _quote(self, qualifying: bytes) -> tuple[QuoteResult, bytes, bytes | None]:
        return self._tpm.quote(self.selection, qualifying, self._event_log)

    def close(self) -> None:
        """Release the AK's ESYS handle (the TpmClient stays the caller's)."""
        self._tpm.close()


@runtime_checkable
class _NodeDirectory(Protocol):
    """AK trust that also knows which node an AK belongs to (AkRegistry)."""

    def node_of(self, ak: PublicArea) -> str | None: ...


class TpmValidator:
    """Validates a TpmIssuer envelope: QuoteVerifier against the recomputed binding."""

    def __init__(self, ak_trust: AkTrust, policy: ReferencePolicy | None = None,
                 clock_history: ClockHistory | None = None) -> None:
        self._ak_trust = ak_trust
        # Decided once: a runtime protocol check costs ~15 us, on every handshake's path.
        self._directory = ak_trust if isinstance(ak_trust, _NodeDirectory) else None
        self._policy = policy
        self._clock_history = clock_history
        self._verifier = QuoteVerifier(ak_trust=ak_trust, policy=policy,
                                       clock_history=clock_history)

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        envelope = decode_envelope(evidence)
        bundle = Evidence.from_dict(envelope.evidence)
        binding = binding_digest(envelope.profile, envelope.role, nonce, envelope.user_data)
        if envelope.batch is None:
            report = self._verifier.verify(bundle, binding)
        else:
            report = self._verify_batched(bundle, binding, envelope.batch)
        report.raise_for_failure()
        node, verified = self._node(envelope, bundle)
        return PeerEvidence(node=node, role=envelope.role, profile=envelope.profile,
                            user_data=envelope.user_data, report=report, evidence=bundle,
                            policy_name=None if self._policy is None else self._policy.name,
                            node_verified=verified)

    def _verify_batched(self, bundle: Evidence, binding: bytes,
                        proof: BatchProof) -> VerificationReport:
        """The quote must cover the root that this session's own binding leads to."""
        try:
            root = proof.root(binding)
        except ValueError as exc:
            raise VerificationError("batch_inclusion", f"the inclusion path is malformed: "
                                    f"{exc}") from None
        history = None if self._clock_history is None else \
            _SessionScopedHistory(self._clock_history, binding)
        verifier = QuoteVerifier(ak_trust=self._ak_trust, policy=self._policy,
                                 clock_history=history)
        report = verifier.verify(bundle, batch_qualifying_data(root))
        failure = report.failure
        if failure is not None and failure.name == "qualifying_data":
            raise VerificationError("batch_inclusion", f"this session's binding (leaf "
                                    f"{proof.index} of {proof.size}) does not lead to the root "
                                    "the quote covers (a path or quote from another session "
                                    "or batch)")
        return report

    def _node(self, envelope: Envelope, bundle: Evidence) -> tuple[str, bool]:
        if self._directory is None:
            return envelope.node, False
        registered = self._directory.node_of(parse_public_cached(bundle.ak_public))
        if registered is None:
            return envelope.node, False
        if registered != envelope.node:
            raise VerificationError("ak_trust", f"the evidence claims node {envelope.node!r} "
                                    f"but its AK is registered to {registered!r}")
        return registered, True


class _SessionScopedHistory(ClockHistory):
    """A ClockHistory view where a quote's identity is (quote, session binding).

    Every session of a batch presents the same TPMS_ATTEST; replay detection must
    refuse the same quote for the same session twice, not the batch's second
    member. Clock ordering is the shared history's, unchanged.
    """

    def __init__(self, shared: ClockHistory, binding: bytes) -> None:
        super().__init__()
        self._shared = shared
        self._binding = binding

    def check(self, ak_name: bytes, info: ClockInfo, attest: bytes) -> str:
        return self._shared.check(ak_name, info, attest + self._binding)

    def record(self, ak_name: bytes, info: ClockInfo, attest: bytes) -> None:
        self._shared.record(ak_name, info, attest + self._binding)
