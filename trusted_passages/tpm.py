"""TPM-backed evidence: :class:`TpmIssuer` quotes the node's PCRs with its AK, bound
to the session (:func:`~trusted_passages.interfaces.binding_digest`);
:class:`TpmValidator` checks such a quote with the project's QuoteVerifier.

The one module of the package that imports the verifier side of ``attestation``
(verifier, registrar, policy): the core knows only :mod:`trusted_passages.interfaces`.
tpm2-pytss is needed only by whoever builds the TpmClient a TpmIssuer is given.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from attestation.errors import VerificationError
from attestation.evidence import Evidence
from attestation.policy import ReferencePolicy
from attestation.registrar import AkTrust
from attestation.tpm_types import PcrSelection, PublicArea, parse_public
from attestation.verifier import ClockHistory, QuoteVerifier
from trusted_passages.envelope import Envelope, check_node_name, decode_envelope
from trusted_passages.interfaces import (
    BindingContext,
    PeerEvidence,
    binding_digest,
    require_context,
)

if TYPE_CHECKING:  # tpm2-pytss is not in Debian 12 guests, which use the rest of the package
    from attestation.tpm import KeyAlgorithm, QuoteResult, TpmClient, TpmKey

__all__ = ["TpmIssuer", "TpmValidator"]


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
    """

    def __init__(self, client: TpmClient, node: str, selection: PcrSelection,
                 event_log: Callable[[], bytes | None] | bytes | None = None,
                 ak_algorithm: KeyAlgorithm = "ecc", *,
                 context: BindingContext | None = None) -> None:
        self.node = check_node_name(node)
        self.selection = selection
        self.context = context
        self._event_log = event_log if callable(event_log) else (lambda: event_log)
        self._tpm = _TpmAccess(client, ak_algorithm)

    @property
    def tpm_lock(self) -> threading.Lock:
        """Hold this while extending PCRs and appending to the event log at runtime."""
        return self._tpm.lock

    def bound(self, context: BindingContext) -> TpmIssuer:
        twin = copy.copy(self)  # shares the TPM access and its lock
        twin.context = context
        return twin

    def issue(self, user_data: bytes, nonce: bytes) -> bytes:
        ctx = require_context(self.context, "TpmIssuer")
        qualifying = binding_digest(ctx.profile, ctx.role, nonce, user_data)
        quote, ak_public, log = self._tpm.quote(self.selection, qualifying, self._event_log)
        evidence = Evidence(attest=quote.attest, signature=quote.signature, ak_public=ak_public,
                            pcr_bank=self.selection.bank, pcrs=quote.pcrs, event_log=log)
        return Envelope(self.node, ctx.role, ctx.profile, user_data,
                        evidence.to_dict()).to_json()

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
        self._policy = policy
        self._verifier = QuoteVerifier(ak_trust=ak_trust, policy=policy,
                                       clock_history=clock_history)

    def validate(self, evidence: bytes, nonce: bytes) -> PeerEvidence:
        envelope = decode_envelope(evidence)
        bundle = Evidence.from_dict(envelope.evidence)
        expected = binding_digest(envelope.profile, envelope.role, nonce, envelope.user_data)
        report = self._verifier.verify(bundle, expected)
        report.raise_for_failure()
        node, verified = self._node(envelope, bundle)
        return PeerEvidence(node=node, role=envelope.role, profile=envelope.profile,
                            user_data=envelope.user_data, report=report, evidence=bundle,
                            policy_name=None if self._policy is None else self._policy.name,
                            node_verified=verified)

    def _node(self, envelope: Envelope, bundle: Evidence) -> tuple[str, bool]:
        if not isinstance(self._ak_trust, _NodeDirectory):
            return envelope.node, False
        registered = self._ak_trust.node_of(parse_public(bundle.ak_public))
        if registered is None:
            return envelope.node, False
        if registered != envelope.node:
            raise VerificationError("ak_trust", f"the evidence claims node {envelope.node!r} "
                                    f"but its AK is registered to {registered!r}")
        return registered, True
