"""AK trust: a registrar that activates AKs against validated EKs (Keylime-style).

1. The attester sends its EK certificate, EK public area and AK public area.
2. :meth:`Registrar.challenge` validates the EK certificate chain, checks that the
   AK is a restricted, fixedTPM signing key, and runs MakeCredential for the AK's
   Name against the EK.
3. The attester's TPM runs ActivateCredential and returns the secret.
4. :meth:`Registrar.complete` compares it in constant time: the AK is now trusted
   as living in the TPM whose EK certificate was validated.

:class:`PinnedAk` is the other trust source: a caller who already trusts a key
(e.g. ``testbed verify-quote --ak ak.pem``).

:func:`register` is the whole exchange with one attester (anything that can show its
identity and activate a credential: a node's agent, or a TPM client in-process), written
once for every caller.
"""

from __future__ import annotations

import binascii
import hmac
import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation.credential import CredentialChallenge, make_credential
from attestation.encoding import b64decode, b64encode
from attestation.endorsement import ValidatedEk, validate_ek
from attestation.errors import EvidenceFormatError, VerificationError
from attestation.tpm_types import ObjectAttributes, PublicArea, parse_public

AK_REQUIRED = (ObjectAttributes.RESTRICTED | ObjectAttributes.SIGN_ENCRYPT
               | ObjectAttributes.FIXED_TPM | ObjectAttributes.FIXED_PARENT
               | ObjectAttributes.SENSITIVE_DATA_ORIGIN)
MAX_PENDING = 1024


def check_ak_attributes(ak: PublicArea) -> str:
    """An AK must be a restricted signing key that never leaves its TPM.

    Restricted keys only sign TPM-generated structures (TPM_GENERATED magic), so a
    non-restricted key could sign a forged TPMS_ATTEST with TPM2_Sign.
    """
    missing = AK_REQUIRED & ~ak.attributes
    if missing or ak.attributes & ObjectAttributes.DECRYPT:
        raise VerificationError(
            "ak_attributes",
            f"AK attributes {ak.attributes!r} are not those of an attestation key "
            f"(missing {missing!r}; decrypt must be clear)")
    return "restricted, sign, fixedTPM, fixedParent, sensitiveDataOrigin"


class AkTrust(Protocol):
    """Decides whether an AK public area is trusted; returns why, or raises."""

    def trust(self, ak: PublicArea) -> str: ...


@dataclass(frozen=True)
class ActivatedAk:
    ak: PublicArea
    ek: ValidatedEk


class PinnedAk:
    """Trusts exactly the given public key(s), as supplied by the caller."""

    def __init__(self, keys: Sequence[rsa.RSAPublicKey | ec.EllipticCurvePublicKey],
                 label: str = "pinned AK", *, bare_key: bool = False) -> None:
        self._spki = {_spki(k) for k in keys}
        self._label = label
        # A bare key (PEM) carries no TPM object attributes: the caller vouches that
        # it is a restricted AK, exactly as with tpm2_checkquote.
        self.bare_key = bare_key

    @classmethod
    def from_pem(cls, pem: bytes, label: str) -> PinnedAk:
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise VerificationError("ak_trust", f"{label} is not a PEM public key: {exc}") from None
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise VerificationError("ak_trust", f"{label} is neither an RSA nor an EC key")
        return cls([key], label, bare_key=True)

    def trust(self, ak: PublicArea) -> str:
        if _spki(ak.public_key()) not in self._spki:
            raise VerificationError("ak_trust", f"the quote's AK is not the {self._label}")
        return f"AK matches the {self._label} (trust decided by the caller)"


def _spki(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


class Registrar:
    """Holds AKs activated against validated EKs. Thread-safe."""

    def __init__(self, ca_bundle: Sequence[x509.Certificate]) -> None:
        self._ca_bundle = list(ca_bundle)
        self._pending: dict[bytes, tuple[bytes, ActivatedAk]] = {}
        self._trusted: dict[bytes, ActivatedAk] = {}
        self._lock = threading.Lock()

    def challenge(self, ek_certificate: bytes, ek_public: bytes,
                  ak_public: bytes) -> CredentialChallenge:
        """Validate the EK and AK and return a MakeCredential challenge for the AK."""
        ek = validate_ek(ek_certificate, parse_public(ek_public), self._ca_bundle)
        ak = parse_public(ak_public)
        check_ak_attributes(ak)
        secret = os.urandom(32)
        with self._lock:
            if len(self._pending) >= MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))  # oldest first
            self._pending[ak.name] = (secret, ActivatedAk(ak, ek))
        return make_credential(ek.public, ak.name, secret)

    def complete(self, ak_name: bytes, secret: bytes) -> ActivatedAk:
        """Accept the secret the TPM released; one attempt per challenge."""
        with self._lock:
            pending = self._pending.pop(ak_name, None)
        if pending is None:
            raise VerificationError("credential_activation", "no pending challenge for this AK")
        expected, record = pending
        if not hmac.compare_digest(expected, secret):
            raise VerificationError("credential_activation",
                                    "the TPM returned the wrong secret: AK and EK are not "
                                    "in the same TPM")
        with self._lock:
            self._trusted[ak_name] = record
        return record

    def trust(self, ak: PublicArea) -> str:
        with self._lock:
            record = self._trusted.get(ak.name)
        if record is None:
            raise VerificationError("ak_trust", f"AK {ak.name.hex()[:16]}… was never activated "
                                    "against a validated EK")
        return f"AK activated against EK certificate sha256:{record.ek.fingerprint[:16]}…"


class AkRegistry:
    """Which node each activated AK belongs to: node name -> AK public area.

    Trusting an AK is not enough against a cuckoo (evidence relayed from another
    genuine, registered TPM): the verifier must also know *whose* AK it is. A
    registry answers both, and :meth:`for_node` pins the expected node.
    Persisted as JSON by the registrar's owner (e.g. the testbed's work directory).
    """

    def __init__(self, records: dict[str, PublicArea] | None = None,
                 expected_node: str | None = None) -> None:
        self._records = dict(records or {})
        self._expected = expected_node

    def add(self, node: str, ak: PublicArea) -> None:
        self._records[node] = ak

    def nodes(self) -> list[str]:
        return sorted(self._records)

    def for_node(self, node: str) -> AkRegistry:
        """The same registry, trusting only ``node``'s AK."""
        return AkRegistry(self._records, expected_node=node)

    def node_of(self, ak: PublicArea) -> str | None:
        return next((n for n, r in self._records.items()
                     if hmac.compare_digest(r.name, ak.name)), None)

    def trust(self, ak: PublicArea) -> str:
        node = self.node_of(ak)
        if node is None:
            raise VerificationError("ak_trust", "the AK is not registered: it was never "
                                    "activated against a validated EK")
        if self._expected is not None and node != self._expected:
            raise VerificationError("ak_trust", f"the AK belongs to node {node!r}, not to "
                                    f"{self._expected!r}: the evidence comes from another "
                                    "machine's TPM")
        return f"AK registered to node {node!r} (activated against its validated EK)"

    def to_json(self) -> str:
        return json.dumps({n: b64encode(r.raw) for n, r in sorted(self._records.items())},
                          indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> AkRegistry:
        try:
            doc = json.loads(text)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            return cls({str(n): parse_public(b64decode(v, f"AK of {n}"))
                        for n, v in doc.items()})
        except RecursionError:
            raise EvidenceFormatError("AK registry is not valid: JSON nested too deeply") from None
        except (ValueError, TypeError, binascii.Error, EvidenceFormatError) as exc:
            raise EvidenceFormatError(f"AK registry is not valid: {exc}") from None


@dataclass(frozen=True)
class AttesterIdentity:
    """What an attester shows the registrar: its EK certificate and the two public areas."""

    ek_certificate: bytes
    ek_public: bytes
    ak_public: bytes


class Attester(Protocol):
    """The attester's side of registration: a node agent, or a TPM client in-process."""

    def identity(self) -> AttesterIdentity: ...

    def activate(self, challenge: CredentialChallenge) -> bytes: ...


def register(attester: Attester, node: str, registrar: Registrar,
             registry: AkRegistry) -> PublicArea | None:
    """Activate ``attester``'s AK against its validated EK, for ``node``.

    Returns the activated AK, for the caller to add to its registry; None when
    ``registry`` already holds this very AK for ``node`` (AKs are persistent: a node
    that comes back keeps its registration). Otherwise the EK certificate is validated,
    MakeCredential is run for the AK's Name, and only the TPM holding that EK can
    return the secret, proving the AK lives beside it.
    """
    identity = attester.identity()
    ak = parse_public(identity.ak_public)
    if registry.node_of(ak) == node:
        return None
    challenge = registrar.challenge(identity.ek_certificate, identity.ek_public,
                                    identity.ak_public)
    return registrar.complete(ak.name, attester.activate(challenge)).ak
