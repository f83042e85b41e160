"""The key store: keys generated in the CryptoVM, persisted only encrypted.

Storage format (``docs/cryptovm.md`` has the full argument):

* ``keys/<key id>/v00000001.key`` - one file per key version, written once with
  :func:`~attestation.files.atomic_write` (temp file, fsync, rename, fsync dir) and
  never modified. A version exists entirely or not at all after any crash.
* each file is a JSON envelope ``{format, version, kind, id, meta, nonce,
  ciphertext}``: AES-256-GCM of the key material (PKCS#8 DER or the raw AES key)
  under a key derived from the sealed storage key, with the canonical JSON of
  ``{format, version, kind, id, meta}`` as AAD: key id, version and attributes are
  authenticated, and a file moved to another key's path fails to open.
* deleting a key renames its directory to ``keys/.deleted-<id>-<random>`` (atomic),
  then removes it; leftovers are removed on the next start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, overload

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, FileInputError
from attestation.files import (
    atomic_write,
    fsync_dir,
    private_dir,
    read_bounded,
    remove_stale_temps,
)
from cryptovm.encoding import canonical_json, check_name
from cryptovm.errors import BadRequest, NotFound, StorageError

Algorithm = Literal["ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519", "aes-256"]
Usage = Literal["sign", "decrypt", "derive", "encrypt", "unwrap"]
Origin = Literal["generated", "imported"]
PrivateKey = (ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey)
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

ALGORITHMS: tuple[Algorithm, ...] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519",
                                     "aes-256")
ALLOWED_USAGE: dict[str, frozenset[str]] = {
    "ec-p256": frozenset({"sign", "derive", "unwrap"}),
    "ec-p384": frozenset({"sign", "derive"}),
    "rsa-2048": frozenset({"sign", "decrypt", "unwrap"}),
    "rsa-3072": frozenset({"sign", "decrypt", "unwrap"}),
    "ed25519": frozenset({"sign"}),
    "aes-256": frozenset({"encrypt"}),
}
_CURVES: dict[str, ec.EllipticCurve] = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1()}
RECORD_FORMAT = "cryptovm-record"
RECORD_VERSION = 1
MAX_STATE_FILE = 1 << 20
_STATE_FILE_KIND = "CryptoVM state file"


@overload
def read_state_file(path: Path, *, missing_ok: Literal[False] = ...) -> bytes: ...
@overload
def read_state_file(path: Path, *, missing_ok: Literal[True]) -> bytes | None: ...
def read_state_file(path: Path, *, missing_ok: bool = False) -> bytes | None:
    """A CryptoVM state file, bounded; an unreadable one is a :class:`StorageError`."""
    try:
        # read_bounded's overloads want a literal missing_ok: one call for each.
        if missing_ok:
            return read_bounded(path, MAX_STATE_FILE, what=_STATE_FILE_KIND, missing_ok=True)
        return read_bounded(path, MAX_STATE_FILE, what=_STATE_FILE_KIND)
    except FileInputError as exc:
        raise StorageError(str(exc)) from None
SYMMETRIC_COMMITMENT = b"cryptovm-symmetric-key-commitment/v1\x00"


# --- the state cipher ------------------------------------------------------------------


class StateCipher:
    """AES-256-GCM for every secret the state directory holds.

    Keys are derived from the unsealed storage key with HKDF-SHA256 (one label per
    purpose); the storage key itself is not kept.
    """

    def __init__(self, storage_key: bytes) -> None:
        self._aead = AESGCM(derive_key(storage_key, b"cryptovm/v1/state-encryption"))
        self.audit_key = derive_key(storage_key, b"cryptovm/v1/audit-mac")

    def __repr__(self) -> str:
        return "StateCipher(<keys hidden>)"

    def seal(self, kind: str, ident: Mapping[str, Any], meta: Mapping[str, Any],
             plaintext: bytes) -> bytes:
        header = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "kind": kind,
                  "id": dict(ident), "meta": dict(meta)}
        nonce = os.urandom(12)
        ciphertext = self._aead.encrypt(nonce, plaintext, canonical_json(header))
        return canonical_json({**header, "nonce": b64encode(nonce),
                               "ciphertext": b64encode(ciphertext)})

    def open(self, data: bytes, kind: str, ident: Mapping[str, Any], where: str
             ) -> tuple[dict[str, Any], bytes]:
        """Decrypt a state file; ``ident`` must be the identity its path implies."""
        try:
            doc = json.loads(data)
            header = {k: doc[k] for k in ("format", "version", "kind", "id", "meta")}
            nonce = b64decode(doc["nonce"], "nonce")
            ciphertext = b64decode(doc["ciphertext"], "ciphertext")
        except (ValueError, KeyError, TypeError, EvidenceFormatError) as exc:
            raise StorageError(f"{where}: not a CryptoVM state record ({exc})") from None
        if (header["format"], header["version"], header["kind"]) != (RECORD_FORMAT,
                                                                     RECORD_VERSION, kind):
            raise StorageError(f"{where}: not a version-{RECORD_VERSION} {kind} record")
        if header["id"] != dict(ident):
            raise StorageError(f"{where}: holds {header['id']}, not {dict(ident)} "
                               "(file moved or swapped)")
        try:
            plaintext = self._aead.decrypt(nonce, ciphertext, canonical_json(header))
        except InvalidTag:
            raise StorageError(f"{where}: authentication failed (tampered, or written under "
                               "another CryptoVM's storage key)") from None
        if not isinstance(header["meta"], dict):
            raise StorageError(f"{where}: meta is not an object")
        return header["meta"], plaintext


def derive_key(secret: bytes, label: bytes, length: int = 32) -> bytes:
    return HKDF(hashes.SHA256(), length, salt=None, info=label).derive(secret)


# --- keys ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyAttributes:
    """What a key is and may do; the same for all of its versions."""

    key_id: str
    algorithm: Algorithm
    usage: tuple[str, ...]
    exportable: bool
    owner: str
    release_policy: str | None = None
    release_node: str | None = None

    def __post_init__(self) -> None:
        check_name(self.key_id, "key id")
        if self.algorithm not in ALGORITHMS:
            raise BadRequest(f"algorithm {self.algorithm!r} is not one of {list(ALGORITHMS)}")
        usage = tuple(sorted(set(self.usage)))
        if not usage:
            raise BadRequest("a key needs at least one usage")
        bad = set(usage) - ALLOWED_USAGE[self.algorithm]
        if bad:
            raise BadRequest(f"usage {sorted(bad)} is not possible for {self.algorithm} keys "
                             f"(allowed: {sorted(ALLOWED_USAGE[self.algorithm])})")
        if self.release_policy is not None and "decrypt" not in usage:
            raise BadRequest("a release policy needs a key with the decrypt usage")
        object.__setattr__(self, "usage", usage)

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "algorithm": self.algorithm, "usage": list(self.usage),
                "exportable": self.exportable, "owner": self.owner,
                "release_policy": self.release_policy, "release_node": self.release_node}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> KeyAttributes:
        return cls(key_id=doc["key_id"], algorithm=doc["algorithm"], usage=tuple(doc["usage"]),
                   exportable=bool(doc["exportable"]), owner=doc["owner"],
                   release_policy=doc.get("release_policy"),
                   release_node=doc.get("release_node"))


@dataclass(frozen=True)
class KeyVersion:
    """One version of a key, decrypted in memory. Never printed with its secret."""

    attributes: KeyAttributes
    version: int
    origin: Origin
    created: int
    secret: PrivateKey | bytes = field(repr=False, compare=False)
    public: bytes = field(repr=False)  # SPKI DER; for AES a commitment (see key_public_bytes)
    aead: AESGCM | None = field(default=None, repr=False, compare=False)

    @property
    def key_id(self) -> str:
        return self.attributes.key_id

    def meta(self) -> dict[str, Any]:
        return {**self.attributes.to_dict(), "version": self.version, "origin": self.origin,
                "created": self.created}

    def private_key(self) -> PrivateKey:
        if isinstance(self.secret, bytes):
            raise BadRequest(f"key {self.key_id!r} is symmetric ({self.attributes.algorithm})")
        return self.secret

    def public_key(self) -> PublicKey:
        return self.private_key().public_key()


def generate_secret(algorithm: Algorithm) -> PrivateKey | bytes:
    if algorithm in _CURVES:
        return ec.generate_private_key(_CURVES[algorithm])
    if algorithm.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(algorithm[4:]))
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return os.urandom(32)


def secret_bytes(secret: PrivateKey | bytes) -> bytes:
    """The key material as stored (encrypted) and exported (wrapped): PKCS#8 DER or raw."""
    if isinstance(secret, bytes):
        return secret
    return secret.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())


def load_secret(algorithm: Algorithm, material: bytes) -> PrivateKey | bytes:
    """Parse key material and check that it is a key of ``algorithm``."""
    if algorithm == "aes-256":
        if len(material) != 32:
            raise BadRequest(f"an aes-256 key is 32 bytes, not {len(material)}")
        return bytes(material)
    try:
        key = serialization.load_der_private_key(material, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BadRequest(f"key material is not a PKCS#8 DER private key ({type(exc).__name__})"
                         ) from None
    if _algorithm_of(key) != algorithm:
        raise BadRequest(f"key material is a {_algorithm_of(key)} key, not {algorithm}")
    return key  # type: ignore[return-value]  # _algorithm_of narrowed it to a known type


def _algorithm_of(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name,
                                                                   f"ec-{key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    return type(key).__name__


def key_public_bytes(secret: PrivateKey | bytes) -> bytes:
    """SPKI DER of an asymmetric key; for a symmetric key a one-way commitment to it."""
    if isinstance(secret, bytes):
        return hashlib.sha256(SYMMETRIC_COMMITMENT + secret).digest()
    return secret.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)


def make_version(attributes: KeyAttributes, version: int, origin: Origin,
                 secret: PrivateKey | bytes, created: int | None = None) -> KeyVersion:
    return KeyVersion(attributes, version, origin, int(time.time()) if created is None else created,
                      secret, key_public_bytes(secret),
                      AESGCM(secret) if isinstance(secret, bytes) else None)


# --- the store -------------------------------------------------------------------------


class KeyStore:
    """Key versions on disk (encrypted) and in memory (decrypted, cached objects).

    Readers take no lock: each key's version list is replaced, never mutated. Writers
    hold ``self.lock``; a write returns only once it is durable.
    """

    def __init__(self, directory: Path, cipher: StateCipher) -> None:
        self.directory = private_dir(directory)
        self._cipher = cipher
        self._keys: dict[str, tuple[KeyVersion, ...]] = {}
        self.lock = threading.RLock()

    def __repr__(self) -> str:
        return f"KeyStore({str(self.directory)!r}, {len(self._keys)} keys)"

    def load(self) -> int:
        """Read every key version; drop crash leftovers (temp files, deleted keys)."""
        for leftover in self.directory.glob(".deleted-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        remove_stale_temps(self.directory)
        keys: dict[str, list[KeyVersion]] = {}
        for key_dir in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            remove_stale_temps(key_dir)
            for path in sorted(key_dir.glob("v*.key")):
                kv = self._read(key_dir.name, path)
                keys.setdefault(kv.key_id, []).append(kv)
        self._keys = {k: tuple(sorted(v, key=lambda kv: kv.version)) for k, v in keys.items()}
        return sum(len(v) for v in self._keys.values())

    def _read(self, key_id: str, path: Path) -> KeyVersion:
        try:
            version = int(path.stem[1:])
        except ValueError:
            raise StorageError(f"{path}: not a key version file name") from None
        meta, material = self._cipher.open(read_state_file(path), "key",
                                           {"key_id": key_id, "version": version}, str(path))
        try:
            attributes = KeyAttributes.from_dict(meta)
            return make_version(attributes, version, meta["origin"],
                                load_secret(attributes.algorithm, material), meta["created"])
        except (KeyError, TypeError, BadRequest) as exc:
            raise StorageError(f"{path}: bad key metadata ({exc})") from None

    def ids(self) -> list[str]:
        return sorted(self._keys)

    def versions(self, key_id: str) -> tuple[KeyVersion, ...]:
        try:
            return self._keys[key_id]
        except KeyError:
            raise NotFound(f"no key {key_id!r}") from None

    def get(self, key_id: str, version: int | None = None) -> KeyVersion:
        """The primary (newest) version, or a given one."""
        versions = self.versions(key_id)
        if version is None:
            return versions[-1]
        for kv in versions:
            if kv.version == version:
                return kv
        raise NotFound(f"key {key_id!r} has no version {version}")

    def exists(self, key_id: str) -> bool:
        return key_id in self._keys

    def put(self, kv: KeyVersion, material: bytes) -> None:
        """Persist a new version durably, then publish it in memory."""
        with self.lock:
            current = self._keys.get(kv.key_id, ())
            if any(v.version == kv.version for v in current):
                raise StorageError(f"key {kv.key_id!r} version {kv.version} already exists")
            key_dir = self.directory / kv.key_id
            if not key_dir.exists():
                private_dir(key_dir)
                fsync_dir(self.directory)
            blob = self._cipher.seal("key", {"key_id": kv.key_id, "version": kv.version},
                                     kv.meta(), material)
            atomic_write(key_dir / f"v{kv.version:08d}.key", blob)
            self._keys[kv.key_id] = (*current, kv)

    def delete(self, key_id: str) -> int:
        """Remove every version of a key, durably (one atomic rename)."""
        with self.lock:
            versions = self.versions(key_id)
            grave = self.directory / f".deleted-{key_id}-{os.urandom(4).hex()}"
            os.rename(self.directory / key_id, grave)
            fsync_dir(self.directory)
            del self._keys[key_id]
            shutil.rmtree(grave, ignore_errors=True)
            return len(versions)
