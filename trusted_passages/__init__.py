"""Trusted Passages: mutual TLS whose both ends prove, by TPM attestation bound to
the session, that they run measured, policy-conforming software.

After Song, Lee and Raj, "Trusted Passages" (2011). TLS is OpenSSL (pyOpenSSL,
memory BIOs); the protocol core is sans-IO (:mod:`trusted_passages.protocol`);
:mod:`~trusted_passages.blocking` and :mod:`~trusted_passages.aio` move its
bytes. See docs/protocol.md.

What the package holds:

* the interfaces (:mod:`~trusted_passages.interfaces`): the Issuer and Validator
  protocols, BindingContext, PeerEvidence, binding_digest, spki_digest;
* the core: :mod:`~trusted_passages.protocol` (the connection state machine),
  :mod:`~trusted_passages.envelope`, :mod:`~trusted_passages.frames`,
  :mod:`~trusted_passages.records`, :mod:`~trusted_passages.events`,
  :mod:`~trusted_passages.errors`;
* around it: :mod:`~trusted_passages.config`, :mod:`~trusted_passages.blocking`,
  :mod:`~trusted_passages.aio`, :mod:`~trusted_passages.openssl_compat`,
  :mod:`~trusted_passages.pki` (test and demo certificates),
  :mod:`~trusted_passages.summary`;
* implementations of the interfaces: :mod:`~trusted_passages.tpm` (TpmIssuer,
  TpmValidator) and :mod:`~trusted_passages.fakes` (FakeIssuer, FakeValidator).

What each part may import: every module here may import ``attestation``'s plain
values and codecs (errors, evidence, report, tpm_types, eventlog, encoding). Only
:mod:`~trusted_passages.tpm` may import the verifier side - ``attestation.verifier``,
``attestation.registrar``, ``attestation.policy`` - and no module but this package
face imports :mod:`~trusted_passages.tpm`: the core and its adapters depend on the
interfaces alone, so they run, and are tested, with any Issuer and Validator.
Nothing here imports ``cryptovm`` or ``testbed``.
"""

from __future__ import annotations

from trusted_passages.aio import AsyncAttestedChannel, open_channel, start_server
from trusted_passages.blocking import AttestedChannel, Server, connect, serve
from trusted_passages.config import ChannelConfig
from trusted_passages.errors import AttestationRejected, ProtocolError
from trusted_passages.fakes import FakeIssuer, FakeValidator
from trusted_passages.interfaces import (
    BindingContext,
    Issuer,
    PeerEvidence,
    Validator,
    binding_digest,
    spki_digest,
)
from trusted_passages.protocol import TrustedPassagesConnection
from trusted_passages.tpm import TpmIssuer, TpmValidator

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
    "spki_digest",
    "start_server",
]
