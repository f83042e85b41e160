"""The cryptographic operations on one key version (no authorization here; see vsm.py).

Algorithms:

* sign/verify: ``ecdsa-sha256|384|512`` (DER signatures; default by curve),
  ``rsa-pss-sha256|384|512`` (default for RSA; salt length = digest length),
  ``rsa-pkcs1v15-sha256|384|512``, ``ed25519``; ``prehashed`` signs a digest.
* decrypt (RSA): ``oaep-sha256`` (default), ``oaep-sha1``, ``pkcs1v15`` and
  ``pkcs1v15-tls``: the classic TLS RSA key exchange. OpenSSL's implicit rejection
  makes a bad PKCS#1 v1.5 padding decrypt to a deterministic pseudo-random message
  instead of an error, and ``pkcs1v15-tls`` returns 48 random bytes whenever the
  result is not 48 bytes long (RFC 5246 7.4.7.1): no padding oracle over the wire.
  Checking the pre-master's version bytes stays with the TLS server, as in RFC 5246.
* encrypt/decrypt (AES-256): AES-256-GCM, output ``"CVG1" || u32 version || nonce(12)
  || ct+tag``; the version tells decrypt which key version to use.
* derive: raw ECDH shared secret with a peer's SPKI public key (same curve).
"""

from __future__ import annotations

import os
import struct
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils

from cryptovm.errors import BadRequest, CryptoOperationFailed
from cryptovm.keystore import KeyVersion

AES_MAGIC = b"CVG1"
TLS_PREMASTER_SIZE = 48
_HASHES: dict[str, hashes.HashAlgorithm] = {"sha256": hashes.SHA256(), "sha384": hashes.SHA384(),
                                            "sha512": hashes.SHA512(),
                                            # OAEP-SHA1 only: the common legacy OAEP variant
                                            "sha1": hashes.SHA1()}  # noqa: S303
_ECDSA = {name: ec.ECDSA(h) for name, h in _HASHES.items() if name != "sha1"}
_ECDSA_PRE = {name: ec.ECDSA(utils.Prehashed(h)) for name, h in _HASHES.items() if name != "sha1"}
_DEFAULT_SIGN = {"ec-p256": "ecdsa-sha256", "ec-p384": "ecdsa-sha384", "rsa-2048": "rsa-pss-sha256",
                 "rsa-3072": "rsa-pss-sha256", "ed25519": "ed25519"}
SIGN_ALGORITHMS = ("ecdsa-sha256", "ecdsa-sha384", "ecdsa-sha512", "rsa-pss-sha256",
                   "rsa-pss-sha384", "rsa-pss-sha512", "rsa-pkcs1v15-sha256",
                   "rsa-pkcs1v15-sha384", "rsa-pkcs1v15-sha512", "ed25519")
DECRYPT_PADDINGS = ("oaep-sha256", "oaep-sha1", "pkcs1v15", "pkcs1v15-tls")


def _split(algorithm: str) -> tuple[str, str]:
    family, _, digest = algorithm.rpartition("-")
    if algorithm not in SIGN_ALGORITHMS:
        raise BadRequest(f"signature algorithm {algorithm!r} is not one of {list(SIGN_ALGORITHMS)}")
    return family, digest


def _rsa_padding(family: str, digest: str) -> padding.AsymmetricPadding:
    if family == "rsa-pss":
        return padding.PSS(padding.MGF1(_HASHES[digest]), padding.PSS.DIGEST_LENGTH)
    return padding.PKCS1v15()


def sign(kv: KeyVersion, data: bytes, algorithm: str | None = None,
         prehashed: bool = False) -> tuple[bytes, str]:
    """Sign ``data`` (or its digest, if ``prehashed``); returns (signature, algorithm)."""
    key = kv.secret
    algorithm = algorithm or _DEFAULT_SIGN.get(kv.attributes.algorithm, "")
    if isinstance(key, ec.EllipticCurvePrivateKey):
        family, digest = _split(algorithm)
        if family != "ecdsa":
            raise BadRequest(f"{algorithm} does not fit an ECC key")
        return key.sign(data, (_ECDSA_PRE if prehashed else _ECDSA)[digest]), algorithm
    if isinstance(key, rsa.RSAPrivateKey):
        family, digest = _split(algorithm)
        if not family.startswith("rsa-"):
            raise BadRequest(f"{algorithm} does not fit an RSA key")
        h: hashes.HashAlgorithm | utils.Prehashed = (
            utils.Prehashed(_HASHES[digest]) if prehashed else _HASHES[digest])
        return key.sign(data, _rsa_padding(family, digest), h), algorithm
    if isinstance(key, ed25519.Ed25519PrivateKey):
        if algorithm != "ed25519" or prehashed:
            raise BadRequest("Ed25519 keys sign whole messages with algorithm ed25519")
        return key.sign(data), algorithm
    raise BadRequest(f"{kv.attributes.algorithm} keys do not sign")


def verify(kv: KeyVersion, data: bytes, signature: bytes, algorithm: str | None = None,
           prehashed: bool = False) -> bool:
    key = kv.public_key()
    algorithm = algorithm or _DEFAULT_SIGN.get(kv.attributes.algorithm, "")
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            family, digest = _split(algorithm)
            key.verify(signature, data, (_ECDSA_PRE if prehashed else _ECDSA)[digest])
        elif isinstance(key, rsa.RSAPublicKey):
            family, digest = _split(algorithm)
            h: hashes.HashAlgorithm | utils.Prehashed = (
                utils.Prehashed(_HASHES[digest]) if prehashed else _HASHES[digest])
            key.verify(signature, data, _rsa_padding(family, digest), h)
        else:
            key.verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def rsa_decrypt(kv: KeyVersion, ciphertext: bytes, pad: str | None = None) -> bytes:
    key = kv.secret
    if not isinstance(key, rsa.RSAPrivateKey):
        raise BadRequest(f"{kv.attributes.algorithm} keys do not decrypt with a padding")
    pad = pad or "oaep-sha256"
    if pad not in DECRYPT_PADDINGS:
        raise BadRequest(f"padding {pad!r} is not one of {list(DECRYPT_PADDINGS)}")
    if pad.startswith("oaep-"):
        h = _HASHES[pad[5:]]
        try:
            return key.decrypt(ciphertext, padding.OAEP(padding.MGF1(h), h, None))
        except ValueError:
            raise CryptoOperationFailed("RSA-OAEP decryption failed") from None
    if len(ciphertext) != key.key_size // 8:
        raise CryptoOperationFailed(f"ciphertext must be {key.key_size // 8} bytes")
    try:
        plaintext = key.decrypt(ciphertext, padding.PKCS1v15())  # implicit rejection
    except ValueError:
        # Only a ciphertext not below the modulus gets here: a public property of the
        # input, so answering it differently reveals nothing about the key.
        if pad == "pkcs1v15-tls":
            return os.urandom(TLS_PREMASTER_SIZE)
        raise CryptoOperationFailed("RSA ciphertext is out of range for this key") from None
    if pad == "pkcs1v15-tls" and len(plaintext) != TLS_PREMASTER_SIZE:
        return os.urandom(TLS_PREMASTER_SIZE)
    return plaintext


def aes_encrypt(kv: KeyVersion, plaintext: bytes, aad: bytes = b"") -> bytes:
    assert kv.aead is not None
    nonce = os.urandom(12)
    return AES_MAGIC + struct.pack(">I", kv.version) + nonce + kv.aead.encrypt(nonce, plaintext,
                                                                                aad)


def aes_ciphertext_version(ciphertext: bytes) -> int:
    if len(ciphertext) < 4 + 4 + 12 + 16 or not ciphertext.startswith(AES_MAGIC):
        raise CryptoOperationFailed("not a CVG1 AES-GCM ciphertext")
    return int(struct.unpack(">I", ciphertext[4:8])[0])


def aes_decrypt(kv: KeyVersion, ciphertext: bytes, aad: bytes = b"") -> bytes:
    assert kv.aead is not None
    try:
        return kv.aead.decrypt(ciphertext[8:20], ciphertext[20:], aad)
    except InvalidTag:
        raise CryptoOperationFailed("AES-GCM authentication failed (wrong key, wrong aad or "
                                    "tampered ciphertext)") from None


def derive(kv: KeyVersion, peer_public_key: bytes) -> bytes:
    key = kv.secret
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise BadRequest(f"{kv.attributes.algorithm} keys do not derive")
    try:
        peer = serialization.load_der_public_key(peer_public_key)
    except (ValueError, TypeError):
        raise BadRequest("peer_public_key is not a DER SPKI public key") from None
    if not isinstance(peer, ec.EllipticCurvePublicKey) or peer.curve.name != key.curve.name:
        raise BadRequest(f"peer_public_key must be an ECC {key.curve.name} key")
    return key.exchange(ec.ECDH(), peer)


def describe_signature_defaults() -> dict[str, Any]:
    return dict(_DEFAULT_SIGN)
