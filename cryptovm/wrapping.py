"""Encryption *to* a public key: the recipient envelope and key wrapping.

Both sides of each format live here, so tenants and requesters use the same code
as the CryptoVM (pure ``cryptography``, no TPM).

**Recipient envelope** ``ecdh-es-a256gcm`` (results of attestation-gated release,
exported keys, imported keys; the AWS KMS ``Recipient`` model)::

    envelope = "CVE1" || epk (65-byte uncompressed P-256 point) || nonce (12) || ct+tag
    Z        = ECDH(ephemeral private key, recipient P-256 public key)
    key      = HKDF-SHA256(Z, salt = none,
                           info = "cryptovm-envelope/v1\\0" || epk || SHA256(recipient SPKI)
                                  || SHA256(context))
    ct       = AES-256-GCM(key, nonce, plaintext, aad = context)

``context`` names what is inside (e.g. the exported key's canonical attributes);
the recipient must present the same context to open the envelope.

**Key wrap** ``rsa-oaep-aes-kw`` (RSA recipients; like AWS ``RSA_AES_KEY_WRAP_SHA_256``)::

    wrapped = "CVW1" || u16 len(ek) || ek || AES-KWP(kek, key material)
    ek      = RSA-OAEP-SHA256(recipient public key, kek)   -- kek: 32 random bytes

Key material is PKCS#8 DER for asymmetric keys and the raw 32 bytes for AES keys.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from cryptovm.errors import BadRequest, CryptoOperationFailed

WrapScheme = Literal["ecdh-es-a256gcm", "rsa-oaep-aes-kw"]
WRAP_SCHEMES: tuple[WrapScheme, ...] = ("ecdh-es-a256gcm", "rsa-oaep-aes-kw")
ENVELOPE_MAGIC = b"CVE1"
WRAP_MAGIC = b"CVW1"
_INFO = b"cryptovm-envelope/v1\x00"
_POINT = 65
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def spki_der(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(der: bytes, what: str = "public key"
                    ) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
    """A recipient's SPKI DER (PEM accepted too): P-256 or RSA >= 2048 only."""
    try:
        key = (serialization.load_pem_public_key(der) if der.startswith(b"-----")
               else serialization.load_der_public_key(der))
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"{what} is not an SPKI public key ({exc})") from None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise BadRequest(f"{what} must be an ECC P-256 or an RSA >= 2048 key")


def _envelope_key(shared: bytes, epk: bytes, recipient_spki: bytes, context: bytes) -> bytes:
    info = (_INFO + epk + hashlib.sha256(recipient_spki).digest()
            + hashlib.sha256(context).digest())
    return HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(shared)


def seal_envelope(recipient: ec.EllipticCurvePublicKey, plaintext: bytes,
                  context: bytes = b"") -> bytes:
    """Encrypt to a P-256 public key (ECDH-ES + HKDF-SHA256 + AES-256-GCM)."""
    if not isinstance(recipient.curve, ec.SECP256R1):
        raise BadRequest("the recipient of an envelope must be an ECC P-256 key")
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    epk = ephemeral.public_key().public_bytes(serialization.Encoding.X962,
                                              serialization.PublicFormat.UncompressedPoint)
    key = _envelope_key(ephemeral.exchange(ec.ECDH(), recipient), epk, spki_der(recipient),
                        context)
    nonce = os.urandom(12)
    return ENVELOPE_MAGIC + epk + nonce + AESGCM(key).encrypt(nonce, plaintext, context)


def open_envelope(private_key: ec.EllipticCurvePrivateKey, envelope: bytes,
                  context: bytes = b"") -> bytes:
    """The recipient's side of :func:`seal_envelope`."""
    if len(envelope) < 4 + _POINT + 12 + 16 or not envelope.startswith(ENVELOPE_MAGIC):
        raise CryptoOperationFailed("not a CVE1 envelope")
    epk, nonce, ct = envelope[4:4 + _POINT], envelope[4 + _POINT:16 + _POINT], envelope[
        16 + _POINT:]
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), epk)
        shared = private_key.exchange(ec.ECDH(), peer)
        key = _envelope_key(shared, epk, spki_der(private_key.public_key()), context)
        return AESGCM(key).decrypt(nonce, ct, context)
    except (ValueError, InvalidTag):
        raise CryptoOperationFailed("the envelope does not open with this key and context "
                                    "(wrong recipient, wrong context or tampered)") from None


def rsa_wrap(recipient: rsa.RSAPublicKey, material: bytes) -> bytes:
    kek = os.urandom(32)
    ek = recipient.encrypt(kek, _OAEP)
    return WRAP_MAGIC + struct.pack(">H", len(ek)) + ek + keywrap.aes_key_wrap_with_padding(
        kek, material)


def rsa_unwrap(private_key: rsa.RSAPrivateKey, wrapped: bytes) -> bytes:
    if len(wrapped) < 6 or not wrapped.startswith(WRAP_MAGIC):
        raise CryptoOperationFailed("not a CVW1 wrapped key")
    (size,) = struct.unpack(">H", wrapped[4:6])
    ek, body = wrapped[6:6 + size], wrapped[6 + size:]
    try:
        kek = private_key.decrypt(ek, _OAEP)
        return keywrap.aes_key_unwrap_with_padding(kek, body)
    except (ValueError, keywrap.InvalidUnwrap):
        raise CryptoOperationFailed("the wrapped key does not unwrap with this key") from None


def wrap(recipient: ec.EllipticCurvePublicKey | rsa.RSAPublicKey, material: bytes,
         scheme: WrapScheme, context: bytes = b"") -> bytes:
    """Wrap key material to a recipient public key with ``scheme``."""
    if scheme == "ecdh-es-a256gcm":
        if not isinstance(recipient, ec.EllipticCurvePublicKey):
            raise BadRequest("ecdh-es-a256gcm needs an ECC P-256 recipient key")
        return seal_envelope(recipient, material, context)
    if scheme == "rsa-oaep-aes-kw":
        if not isinstance(recipient, rsa.RSAPublicKey):
            raise BadRequest("rsa-oaep-aes-kw needs an RSA recipient key")
        return rsa_wrap(recipient, material)
    raise BadRequest(f"wrap scheme {scheme!r} is not one of {list(WRAP_SCHEMES)}")


def unwrap(private_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, wrapped: bytes,
           scheme: WrapScheme, context: bytes = b"") -> bytes:
    if scheme == "ecdh-es-a256gcm" and isinstance(private_key, ec.EllipticCurvePrivateKey):
        return open_envelope(private_key, wrapped, context)
    if scheme == "rsa-oaep-aes-kw" and isinstance(private_key, rsa.RSAPrivateKey):
        return rsa_unwrap(private_key, wrapped)
    raise BadRequest(f"wrap scheme {scheme!r} does not fit a {type(private_key).__name__}")
