"""Trusted Passages: mutual TLS whose both ends prove, by TPM attestation bound to
the session, that they run measured, policy-conforming software.

After Song, Lee and Raj, "Trusted Passages" (2011). TLS is OpenSSL (pyOpenSSL,
memory BIOs); the protocol core is sans-IO (:mod:`trusted_passages.protocol`);
:mod:`~trusted_passages.blocking` and :mod:`~trusted_passages.aio` move its
bytes. See docs/protocol.md.
"""

from __future__ import annotations

from trusted_passages.aio import AsyncAttestedChannel, open_channel, start_server
from trusted_passages.attester import (
    BindingContext,
    FakeIssuer,
    FakeValidator,
    Issuer,
    PeerEvidence,
    TpmIssuer,
    TpmValidator,
    Validator,
    binding_digest,
)
from trusted_passages.blocking import AttestedChannel, Server, connect, serve
from trusted_passages.config import ChannelConfig
from trusted_passages.errors import AttestationRejected, ProtocolError
from trusted_passages.protocol import TrustedPassagesConnection

__all__ = [
    "AsyncAttestedChannel",
    "AttestationRejected",
    "AttestedChannel",
    "BindingContext",
    "ChannelConfig",
    "FakeIssuer",
    "FakeValidator",
    "Issuer",
    "PeerEvidence",
    "ProtocolError",
    "Server",
    "TpmIssuer",
    "TpmValidator",
    "TrustedPassagesConnection",
    "Validator",
    "binding_digest",
    "connect",
    "open_channel",
    "serve",
    "start_server",
]
