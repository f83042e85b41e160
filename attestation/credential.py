"""TPM2_MakeCredential in pure Python (TPM 2.0 Part 1, 24 "Credential Protection").

The verifier seals a random secret to (EK, AK Name); only the TPM holding that
EK's private key can recover it with TPM2_ActivateCredential, and it releases it
only for an object whose Name matches, i.e. the AK really is loaded in that TPM.
Runs where there is no TPM: only ``cryptography`` and hashlib.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

try:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # cryptography < 43: Debian 12's python3-cryptography in guests
    from cryptography.hazmat.primitives.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from attestation.errors import EvidenceFormatError
from attestation.tpm_types import Alg, PublicArea, tpm2b

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def _label(text: str) -> bytes:
    return text.encode() + b"\x00"  # the spec's labels are NUL-terminated


def kdfa(hash_name: str, key: bytes, label: str, context_u: bytes, context_v: bytes,
         bits: int) -> bytes:
    """SP 800-108 counter-mode KDF with HMAC, as TPM 2.0 Part 1 11.4.10.2 defines it."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        block = (struct.pack(">I", counter) + _label(label) + context_u + context_v
                 + struct.pack(">I", bits))
        out += hmac.new(key, block, hash_name).digest()
    return out[: (bits + 7) // 8]


def kdfe(hash_name: str, z: bytes, label: str, party_u: bytes, party_v: bytes,
         bits: int) -> bytes:
    """SP 800-56A concatenation KDF, as TPM 2.0 Part 1 11.4.10.3 defines it."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hashlib.new(
            hash_name, struct.pack(">I", counter) + z + _label(label) + party_u + party_v
        ).digest()
    return out[: (bits + 7) // 8]


@dataclass(frozen=True)
class CredentialChallenge:
    """TPM2_MakeCredential's output: the two buffers ActivateCredential takes.

    ``credential_blob`` is the body of a TPM2B_ID_OBJECT and ``encrypted_secret``
    the body of a TPM2B_ENCRYPTED_SECRET (both without their size prefix).
    """

    credential_blob: bytes
    encrypted_secret: bytes


def _seed_for(ek: PublicArea) -> tuple[bytes, bytes]:
    """A fresh seed and its encryption to the EK (``Secret`` in the spec)."""
    digest_bits = hashlib.new(ek.name_hash).digest_size * 8
    key = ek.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        seed = os.urandom(digest_bits // 8)
        algorithm = _HASHES[ek.name_hash]()
        try:
            encrypted = key.encrypt(seed, padding.OAEP(padding.MGF1(algorithm), algorithm,
                                                       _label("IDENTITY")))
        except ValueError:  # e.g. a 1024-bit EK with a sha512 nameAlg: OAEP has no room
            raise EvidenceFormatError(f"EK of {key.key_size} bits cannot carry an OAEP-"
                                      f"{ek.name_hash} seed") from None
        return seed, encrypted
    ephemeral = ec.generate_private_key(key.curve)
    z = ephemeral.exchange(ec.ECDH(), key)
    size = (key.curve.key_size + 7) // 8
    eph_x = ephemeral.public_key().public_numbers().x.to_bytes(size)
    eph_y = ephemeral.public_key().public_numbers().y.to_bytes(size)
    ek_x = key.public_numbers().x.to_bytes(size)
    seed = kdfe(ek.name_hash, z, "IDENTITY", eph_x, ek_x, digest_bits)
    return seed, tpm2b(eph_x) + tpm2b(eph_y)


def make_credential(ek: PublicArea, object_name: bytes, secret: bytes) -> CredentialChallenge:
    """Protect ``secret`` so that only ``ek``'s TPM can release it, for ``object_name``."""
    if not ek.attributes & ek.attributes.DECRYPT or not ek.attributes & ek.attributes.RESTRICTED:
        raise EvidenceFormatError("EK public area is not a restricted decryption key")
    if ek.symmetric[0] != Alg.AES or ek.symmetric[2] != Alg.CFB:
        raise EvidenceFormatError("EK public area has no AES-CFB symmetric parameters")
    if ek.symmetric[1] not in (128, 192, 256):
        raise EvidenceFormatError(f"EK public area asks for AES-{ek.symmetric[1]}, "
                                  "not AES-128, -192 or -256")
    if len(secret) > hashlib.new(ek.name_hash).digest_size:
        raise EvidenceFormatError("credential secret is longer than the EK's name digest")
    seed, encrypted_secret = _seed_for(ek)
    sym_key = kdfa(ek.name_hash, seed, "STORAGE", object_name, b"", ek.symmetric[1])
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(tpm2b(secret)) + encryptor.finalize()
    digest_bits = hashlib.new(ek.name_hash).digest_size * 8
    hmac_key = kdfa(ek.name_hash, seed, "INTEGRITY", b"", b"", digest_bits)
    outer_hmac = hmac.new(hmac_key, enc_identity + object_name, ek.name_hash).digest()
    return CredentialChallenge(tpm2b(outer_hmac) + enc_identity, encrypted_secret)
