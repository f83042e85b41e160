"""Trusted Passages errors, rooted in the project's hierarchy (attestation.errors).

``ProtocolError`` is misuse of a channel or a transport failure outside the
attestation exchange (sending before the channel is established, a peer that
vanished after it was). ``AttestationRejected`` is a channel that was refused:
by a named verification check, by the peer, by a timeout or by a framing
violation. It is a :class:`VerificationError`, so ``exc.check`` names the cause.
"""

from __future__ import annotations

from attestation.errors import TestbedError, VerificationError


class ProtocolError(TestbedError):
    """The channel was used wrongly, or its transport failed outside the exchange."""


class AttestationRejected(VerificationError):
    """The attested channel was refused; ``check`` says why, ``by_peer`` says who refused.

    ``by_peer`` is True when the peer sent an ERROR frame (it rejected us), False
    when this side rejected the peer or detected the failure itself.
    """

    def __init__(self, check: str, reason: str, *, by_peer: bool = False) -> None:
        super().__init__(check, reason)
        self.by_peer = by_peer

    def __str__(self) -> str:
        who = "the peer rejected us" if self.by_peer else "rejected"
        return f"{who}: {self.check}: {self.reason}"
