"""TLS Sign over Trusted Passages (after draft-hajjeh-tls-sign): the formats, sans-IO.

Non-repudiation with proof of origin, negotiated per channel: the signer signs each
application message with a key that lives in its TPM, and the receiver keeps a *proof*
that a third party can check offline (``testbed sign verify``). docs/tls-sign.md.

What is here: the negotiation messages and their frames, the signing-session digests
the TPM binds, CMS SignedData built and read with asn1crypto (``openssl cms -verify``
reads it), the proof bundle, the audit log, and the two-party exchange
(:class:`SignSender`, :class:`SignReceiver`) over anything with ``send``/``recv``
(an AttestedChannel, a MuxChannel). The TPM side (:mod:`trusted_passages.tpm_signing`)
implements :class:`Signer` and :class:`KeyChecker`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any, Final, Protocol

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import EvidenceFormatError, VerificationError
from trusted_passages.errors import ProtocolError
from trusted_passages.interfaces import PeerEvidence

MAGIC: Final = b"TSv1"
HEADER: Final = struct.Struct(">4sBI")
MAX_MESSAGE: Final = 1 << 20  # a signed message's data, and any negotiation payload
MAX_FRAME: Final = 2 * MAX_MESSAGE  # CMS and base64 overhead on top
DOMAIN: Final = b"tls-sign/v1\x00"
NONCE_BYTES: Final = 32
PROOF_FORMAT: Final = "trusted-passages-tls-sign-proof"
PROOF_VERSION: Final = 1
MAX_PROOF_BYTES: Final = 8 * MAX_MESSAGE
# Signed CMS attribute carrying session id and sequence number. Private arc under
# 2.25 (ITU-T X.667, a UUID as OID): needs no registration.
SESSION_ATTRIBUTE: Final = "2.25.229144999884000870031046272979861277677"
MODE: Final = "proof-of-origin"


class SignFrame(IntEnum):
    OFFER = 1
    ACCEPT = 2
    REFUSE = 3
    KEY = 4
    SIGNED = 5


_FRAMES: Final = frozenset(t.value for t in SignFrame)


# --- digests the TPM binds ---------------------------------------------------------------


def session_id(receiver_nonce: bytes, signer_nonce: bytes) -> bytes:
    """The signing session: both sides' fresh nonces (fixed sizes: unambiguous)."""
    if len(receiver_nonce) != NONCE_BYTES or len(signer_nonce) != NONCE_BYTES:
        raise EvidenceFormatError("signing nonces are 32 bytes each")
    return hashlib.sha256(DOMAIN + b"session\x00" + receiver_nonce + signer_nonce).digest()


def certify_digest(session: bytes) -> bytes:
    """Qualifying data of TPM2_Certify of the signing key."""
    return hashlib.sha256(DOMAIN + b"certify\x00" + session).digest()


def quote_digest(session: bytes, key_name: bytes) -> bytes:
    """Qualifying data of the quote that says which platform state holds the key."""
    return hashlib.sha256(DOMAIN + b"quote\x00" + session + key_name).digest()


# --- frames ------------------------------------------------------------------------------


def encode_frame(kind: SignFrame, payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"TLS Sign {kind.name} of {len(payload)} bytes")
    return HEADER.pack(MAGIC, kind, len(payload)) + payload


class FrameReader:
    """Incremental, bounded reader of TLS Sign frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> tuple[SignFrame, bytes] | None:
        head = bytes(self._buffer[:len(MAGIC)])
        if head != MAGIC[:len(head)]:
            raise ProtocolError(f"TLS Sign: bytes {head!r} are not a {MAGIC.decode()} frame")
        if len(self._buffer) < HEADER.size:
            return None
        _, kind, length = HEADER.unpack_from(self._buffer)
        if kind not in _FRAMES:
            raise ProtocolError(f"TLS Sign: unknown frame type {kind}")
        if length > MAX_FRAME:
            raise ProtocolError(f"TLS Sign: a frame of {length} bytes exceeds {MAX_FRAME}")
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size:end])
        del self._buffer[:end]
        return SignFrame(kind), payload


def _json(payload: bytes, keys: frozenset[str]) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EvidenceFormatError(f"TLS Sign message is not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != keys:
        raise EvidenceFormatError(f"TLS Sign message must hold exactly {sorted(keys)}")
    return doc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object, what: str, limit: int = MAX_PROOF_BYTES) -> bytes:
    if not isinstance(text, str) or len(text) > limit * 4 // 3 + 4:
        raise EvidenceFormatError(f"{what}: expected base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise EvidenceFormatError(f"{what}: invalid base64") from None


def unhex(text: object, what: str, size: int) -> bytes:
    if not isinstance(text, str) or len(text) != 2 * size:
        raise EvidenceFormatError(f"{what}: expected {2 * size} hex digits")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise EvidenceFormatError(f"{what}: not hex") from None


# --- the signing key's credentials ---------------------------------------------------------


@dataclass(frozen=True)
class KeyCredentials:
    """What the signer shows once per signing session (the KEY message).

    ``certificate``: X.509 of the TPM key, self-signed by it (CMS names its signer by
    certificate; trust does not come from it but from the certification below).
    ``certification``: TPM2_Certify attest, signature and the key's TPMT_PUBLIC.
    ``evidence``: a quote by the same AK over certify/quote digests of this session,
    as an attestation.evidence.Evidence dict (PCRs, event log).
    """

    node: str
    certificate: bytes
    certify_attest: bytes
    certify_signature: bytes
    key_public: bytes
    evidence: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"node": self.node, "certificate": b64(self.certificate),
                "certify_attest": b64(self.certify_attest),
                "certify_signature": b64(self.certify_signature),
                "key_public": b64(self.key_public), "evidence": self.evidence}

    @classmethod
    def from_dict(cls, doc: object) -> KeyCredentials:
        if not isinstance(doc, dict) or set(doc) != _CREDENTIAL_KEYS:
            raise EvidenceFormatError(f"key credentials must hold {sorted(_CREDENTIAL_KEYS)}")
        if not isinstance(doc["node"], str) or not isinstance(doc["evidence"], dict):
            raise EvidenceFormatError("key credentials: node is text, evidence an object")
        return cls(doc["node"][:253], unb64(doc["certificate"], "certificate"),
                   unb64(doc["certify_attest"], "certify_attest"),
                   unb64(doc["certify_signature"], "certify_signature"),
                   unb64(doc["key_public"], "key_public"), doc["evidence"])


_CREDENTIAL_KEYS: Final = frozenset({"node", "certificate", "certify_attest",
                                     "certify_signature", "key_public", "evidence"})


class Signer(Protocol):
    """A TPM-resident signing key (TpmSigner): credentials once, then signatures."""

    def credentials(self, session: bytes) -> KeyCredentials: ...

    def sign(self, message: bytes) -> bytes:
        """An ECDSA-SHA256 signature (DER) of ``message``, made inside the TPM."""
        ...


class KeyChecker(Protocol):
    """The receiver's judgement of a signer's credentials (TpmKeyChecker)."""

    def check(self, credentials: KeyCredentials, session: bytes, peer: PeerEvidence) -> None:
        """Raise VerificationError naming the check unless the key is fit."""
        ...


# --- CMS SignedData (asn1crypto) ---------------------------------------------------------


def self_signed_certificate(public_key: ec.EllipticCurvePublicKey, node: str,
                            sign: Callable[[bytes], bytes], serial: int) -> bytes:
    """A certificate for ``public_key`` signed by it (the TPM signs the TBS bytes)."""
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    name = asn1_x509.Name.build({"common_name": node})
    now = datetime.now(UTC).replace(microsecond=0)
    tbs = asn1_x509.TbsCertificate({
        "version": "v3", "serial_number": serial,
        "signature": {"algorithm": "sha256_ecdsa"},
        "issuer": name, "subject": name,
        "validity": {"not_before": asn1_x509.Time({"utc_time": now}),
                     "not_after": asn1_x509.Time({"general_time": now.replace(
                         year=now.year + 1)})},
        "subject_public_key_info": asn1_x509.PublicKeyInfo.load(spki),
        "extensions": [
            {"extn_id": "key_usage", "critical": True,
             "extn_value": asn1_x509.KeyUsage({"digital_signature", "non_repudiation"})},
            {"extn_id": "basic_constraints", "critical": True,
             "extn_value": {"ca": False}},
        ],
    })
    signature = sign(tbs.dump())
    certificate = asn1_x509.Certificate({"tbs_certificate": tbs,
                                         "signature_algorithm": {"algorithm": "sha256_ecdsa"},
                                         "signature_value": signature})
    return bytes(certificate.dump())


def session_attribute(session: bytes, sequence: int) -> bytes:
    return session + struct.pack(">Q", sequence)


def build_signed_data(data: bytes, certificate: bytes, sign: Callable[[bytes], bytes],
                      session: bytes, sequence: int, when: datetime) -> bytes:
    """CMS SignedData (DER): ``data`` encapsulated, signed attributes over it."""
    cert = asn1_x509.Certificate.load(certificate)
    # DER orders a SET OF by encoding; verifiers (OpenSSL) re-encode before checking.
    attributes = cms.CMSAttributes(sorted((cms.CMSAttribute(a) for a in (
        {"type": "content_type", "values": ["data"]},
        {"type": "message_digest", "values": [hashlib.sha256(data).digest()]},
        {"type": "signing_time", "values": [cms.Time({"utc_time": when})]},
        {"type": SESSION_ATTRIBUTE,
         "values": [core.OctetString(session_attribute(session, sequence))]},
    )), key=lambda attribute: attribute.dump()))
    signer = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": {
            "issuer": cert.issuer, "serial_number": cert.serial_number}}),
        "digest_algorithm": {"algorithm": "sha256"},
        "signed_attrs": attributes,
        "signature_algorithm": {"algorithm": "sha256_ecdsa"},
        "signature": sign(attributes.dump()),
    })
    signed = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256"})],
        "encap_content_info": {"content_type": "data", "content": data},
        "certificates": [cert],
        "signer_infos": [signer],
    })
    info = cms.ContentInfo({"content_type": "signed_data", "content": signed})
    return bytes(info.dump())


@dataclass(frozen=True)
class SignedMessage:
    """A CMS SignedData read and checked against a key; what it says."""

    data: bytes = field(repr=False)
    session: bytes
    sequence: int
    signing_time: datetime
    certificate: bytes = field(repr=False)
    digest: bytes = field(repr=False)  # the signed messageDigest attribute


def read_signed_data(der: bytes) -> tuple[SignedMessage, bytes, bytes]:
    """Decode (no check yet): the message, the signed attributes' DER, the signature."""
    try:
        info = cms.ContentInfo.load(der, strict=True)
        if info["content_type"].native != "signed_data":
            raise EvidenceFormatError("CMS content is not SignedData")
        signed = info["content"]
        signers, certs = signed["signer_infos"], signed["certificates"]
        if len(signers) != 1 or len(certs) != 1:
            raise EvidenceFormatError("CMS: exactly one signer and one certificate expected")
        signer = signers[0]
        if signer["digest_algorithm"]["algorithm"].native != "sha256" or \
                signer["signature_algorithm"]["algorithm"].native != "sha256_ecdsa":
            raise EvidenceFormatError("CMS: only ECDSA with SHA-256 is accepted")
        data = signed["encap_content_info"]["content"].native
        attributes = {a["type"].dotted: a["values"] for a in signer["signed_attrs"]}
        digest = attributes[cms.CMSAttributeType.unmap("message_digest")][0].native
        when = attributes[cms.CMSAttributeType.unmap("signing_time")][0].native
        bound = attributes[SESSION_ATTRIBUTE][0].parsed
        if not isinstance(bound, core.OctetString) or len(bound.native) != 40:
            raise EvidenceFormatError("CMS: the session attribute is 40 bytes")
        if not isinstance(data, bytes) or len(data) > MAX_MESSAGE:
            raise EvidenceFormatError("CMS: encapsulated data missing or too large")
        if not isinstance(digest, bytes):
            raise EvidenceFormatError("CMS: the message digest attribute is not an octet string")
        session, (sequence,) = bound.native[:32], struct.unpack(">Q", bound.native[32:])
        message = SignedMessage(data, session, sequence, when, certs[0].chosen.dump(), digest)
        # Signed over as a SET OF (tag 0x31), carried with the implicit [0] tag.
        signed_attrs = b"\x31" + signer["signed_attrs"].dump()[1:]
        return message, signed_attrs, signer["signature"].native
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise EvidenceFormatError(f"CMS SignedData: {exc}") from None


def verify_signed_data(der: bytes, key: ec.EllipticCurvePublicKey) -> SignedMessage:
    """The message if its CMS signature verifies with ``key``; VerificationError else."""
    message, signed_attrs, signature = read_signed_data(der)
    if message.digest != hashlib.sha256(message.data).digest():
        raise VerificationError("cms_signature", "the message digest attribute is not "
                                "SHA-256 of the data: the data was altered")
    try:
        key.verify(signature, signed_attrs, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise VerificationError("cms_signature", "the CMS signature does not verify with the "
                                "certified TPM key") from None
    return message


# --- the proof bundle ----------------------------------------------------------------------


@dataclass(frozen=True)
class Proof:
    """What a receiver keeps of one signed message: checkable offline by anyone."""

    cms: bytes
    credentials: KeyCredentials
    receiver_nonce: bytes
    signer_nonce: bytes
    receiver: str  # the node that received it (its own claim)
    received_at: str
    handshake_evidence: dict[str, Any] | None  # the signer's quote from the TLS handshake

    def to_json(self) -> bytes:
        return json.dumps({
            "format": PROOF_FORMAT, "version": PROOF_VERSION, "cms": b64(self.cms),
            "credentials": self.credentials.to_dict(),
            "receiver_nonce": self.receiver_nonce.hex(), "signer_nonce": self.signer_nonce.hex(),
            "receiver": self.receiver, "received_at": self.received_at,
            "handshake_evidence": self.handshake_evidence,
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Proof:
        if len(data) > MAX_PROOF_BYTES:
            raise EvidenceFormatError(f"a proof of {len(data)} bytes exceeds {MAX_PROOF_BYTES}")
        doc = _json(data, _PROOF_KEYS)
        if doc["format"] != PROOF_FORMAT or doc["version"] != PROOF_VERSION:
            raise EvidenceFormatError(f"not a {PROOF_FORMAT} version {PROOF_VERSION}")
        handshake = doc["handshake_evidence"]
        if handshake is not None and not isinstance(handshake, dict):
            raise EvidenceFormatError("handshake_evidence is an object or null")
        for text in ("receiver", "received_at"):
            if not isinstance(doc[text], str) or len(doc[text]) > 253:
                raise EvidenceFormatError(f"{text}: expected short text")
        return cls(unb64(doc["cms"], "cms"), KeyCredentials.from_dict(doc["credentials"]),
                   unhex(doc["receiver_nonce"], "receiver_nonce", NONCE_BYTES),
                   unhex(doc["signer_nonce"], "signer_nonce", NONCE_BYTES),
                   doc["receiver"], doc["received_at"], handshake)

    @property
    def session(self) -> bytes:
        return session_id(self.receiver_nonce, self.signer_nonce)


_PROOF_KEYS: Final = frozenset({"format", "version", "cms", "credentials", "receiver_nonce",
                                "signer_nonce", "receiver", "received_at",
                                "handshake_evidence"})


# --- the audit log --------------------------------------------------------------------------


class AuditLog:
    """Append-only JSON lines of signed messages, 0600; bounded by one rotation.

    When the file would exceed ``max_bytes`` it is renamed to ``<name>.1`` (replacing
    the previous one) and a new file starts: at most twice ``max_bytes`` on disk.
    """

    def __init__(self, path: Path, max_bytes: int = 1 << 20) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def append(self, **entry: Any) -> None:
        line = json.dumps({"time": datetime.now(UTC).isoformat(), **entry},
                          sort_keys=True).encode() + b"\n"
        with self._lock:
            with contextlib.suppress(FileNotFoundError):
                if self.path.stat().st_size + len(line) > self.max_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        with contextlib.suppress(FileNotFoundError):
            return [json.loads(line) for line in self.path.read_bytes().splitlines()]
        return []


# --- the exchange over a channel ----------------------------------------------------------------


class ByteChannel(Protocol):
    """AttestedChannel and MuxChannel: bytes both ways, and the attested peer."""

    @property
    def peer(self) -> PeerEvidence: ...

    def send(self, data: bytes) -> None: ...

    def recv(self, timeout: float | None = None) -> bytes: ...


class _Framed:
    def __init__(self, channel: ByteChannel) -> None:
        self.channel = channel
        self._reader = FrameReader()

    def send(self, kind: SignFrame, payload: bytes) -> None:
        self.channel.send(encode_frame(kind, payload))

    def recv(self, expected: SignFrame) -> bytes:
        while (frame := self._reader.next_frame()) is None:
            data = self.channel.recv()
            if not data:
                raise ProtocolError("TLS Sign: the channel closed")
            self._reader.feed(data)
        kind, payload = frame
        if kind is SignFrame.REFUSE:
            raise VerificationError("sign_refused", payload[:256].decode(errors="replace"))
        if kind is not expected:
            raise ProtocolError(f"TLS Sign: {kind.name} where {expected.name} was expected")
        return payload


def _hex_field(payload: bytes, key: str) -> bytes:
    return unhex(_json(payload, frozenset({key}))[key], key, NONCE_BYTES)


class SignSender:
    """The signer's side: ``SignSender.open(channel, signer)`` negotiates; ``sign_send``."""

    def __init__(self, framed: _Framed, signer: Signer, session: bytes,
                 certificate: bytes, audit: AuditLog | None) -> None:
        self._framed, self._signer, self.session = framed, signer, session
        self._certificate, self._audit = certificate, audit
        self._sequence = 0

    @classmethod
    def open(cls, channel: ByteChannel, signer: Signer,
             audit: AuditLog | None = None) -> SignSender:
        framed = _Framed(channel)
        signer_nonce = os.urandom(NONCE_BYTES)
        framed.send(SignFrame.OFFER, json.dumps({"mode": MODE,
                                                 "signer_nonce": signer_nonce.hex()}).encode())
        receiver_nonce = _hex_field(framed.recv(SignFrame.ACCEPT), "receiver_nonce")
        session = session_id(receiver_nonce, signer_nonce)
        credentials = signer.credentials(session)
        framed.send(SignFrame.KEY, json.dumps(credentials.to_dict()).encode())
        return cls(framed, signer, session, credentials.certificate, audit)

    def sign_send(self, data: bytes) -> None:
        if len(data) > MAX_MESSAGE:
            raise ProtocolError(f"a signed message holds at most {MAX_MESSAGE} bytes")
        self._sequence += 1
        der = build_signed_data(data, self._certificate, self._signer.sign, self.session,
                                self._sequence, datetime.now(UTC).replace(microsecond=0))
        self._framed.send(SignFrame.SIGNED, der)
        if self._audit is not None:
            self._audit.append(direction="sent", session=self.session.hex(),
                               sequence=self._sequence, sha256=hashlib.sha256(data).hexdigest(),
                               size=len(data), peer=self._framed.channel.peer.node)


class SignReceiver:
    """The receiver's side: ``SignReceiver.accept(channel, checker, name)``; ``sign_recv``."""

    def __init__(self, framed: _Framed, credentials: KeyCredentials, key: ec.EllipticCurvePublicKey,
                 nonces: tuple[bytes, bytes], name: str, audit: AuditLog | None) -> None:
        self._framed, self.credentials, self._key = framed, credentials, key
        self._nonces, self._name, self._audit = nonces, name, audit
        self.session = session_id(*nonces)
        self._sequence = 0

    @classmethod
    def accept(cls, channel: ByteChannel, checker: KeyChecker, name: str,
               audit: AuditLog | None = None) -> SignReceiver:
        """Wait for the peer's OFFER, answer it, check its key; VerificationError names
        what was wrong with the key."""
        framed = _Framed(channel)
        offer = _json(framed.recv(SignFrame.OFFER), frozenset({"mode", "signer_nonce"}))
        if offer["mode"] != MODE:
            framed.send(SignFrame.REFUSE, b"only non-repudiation with proof of origin")
            raise VerificationError("sign_mode", f"the peer offered {str(offer['mode'])[:40]!r}")
        signer_nonce = unhex(offer["signer_nonce"], "signer_nonce", NONCE_BYTES)
        receiver_nonce = os.urandom(NONCE_BYTES)
        framed.send(SignFrame.ACCEPT, json.dumps({"receiver_nonce": receiver_nonce.hex()}
                                                 ).encode())
        session = session_id(receiver_nonce, signer_nonce)
        credentials = KeyCredentials.from_dict(
            _json(framed.recv(SignFrame.KEY), _CREDENTIAL_KEYS))
        checker.check(credentials, session, channel.peer)
        key = signer_key(credentials)
        return cls(framed, credentials, key, (receiver_nonce, signer_nonce), name, audit)

    def sign_recv(self) -> tuple[bytes, Proof]:
        """The next signed message and its proof; VerificationError if it does not verify."""
        der = self._framed.recv(SignFrame.SIGNED)
        message = verify_signed_data(der, self._key)
        if message.session != self.session or message.sequence != self._sequence + 1:
            raise VerificationError("cms_session", f"message {message.sequence} of session "
                                    f"{message.session.hex()[:16]}, expected "
                                    f"{self._sequence + 1} of {self.session.hex()[:16]}")
        self._sequence += 1
        peer = self._framed.channel.peer
        handshake = None if peer.evidence is None else peer.evidence.to_dict()
        proof = Proof(der, self.credentials, *self._nonces, self._name,
                      datetime.now(UTC).isoformat(), handshake)
        if self._audit is not None:
            self._audit.append(direction="received", session=self.session.hex(),
                               sequence=message.sequence, size=len(message.data),
                               sha256=hashlib.sha256(message.data).hexdigest(),
                               peer=peer.node, proof_sha256=hashlib.sha256(
                                   proof.to_json()).hexdigest())
        return message.data, proof


def signer_key(credentials: KeyCredentials) -> ec.EllipticCurvePublicKey:
    """The public key of the signer's certificate; must be the certified TPM key's
    (checked by the key checker and by the offline verifier)."""
    try:
        key = x509.load_der_x509_certificate(credentials.certificate).public_key()
    except ValueError as exc:
        raise EvidenceFormatError(f"signer certificate: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise EvidenceFormatError("the signer certificate's key is not an EC key")
    return key
