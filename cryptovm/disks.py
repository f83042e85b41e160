"""Disk keys of the Secure Virtual Device: CryptoVM keys released by attestation.

A disk's LUKS passphrase (32 random bytes, as 64 hex characters) is stored only
*wrapped*: RSA-OAEP-SHA256 under a CryptoVM key (``rsa-2048``, usage ``decrypt``, not
exportable, generated inside the CryptoVM) whose release policy is the disk owner's
reference policy and AK registry, pinned to the owner node (``release_node``). The
passphrase comes back only through the existing attestation-gated ``release_decrypt``
(:mod:`cryptovm.release`): fresh one-shot nonce, the owner node's quote binding nonce
and recipient key, the owner's policy satisfied; sealed to the requester's ephemeral
key.

The binding (a sidecar ``<image>.svd.json``, public) ties the image to its key: node,
disk name, key id, the wrapped passphrase and the LUKS header's UUID (checked before
any key is asked for, so an image swapped under another disk's binding is refused
without a request). Whoever calls these functions (hypervisor or node) only needs a
``call(op, **args)`` to the CryptoVM and a ``quote(qualifying_data)`` of the node.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, FileInputError
from attestation.evidence import Evidence
from attestation.files import atomic_write, read_bounded
from cryptovm.encoding import check_name
from cryptovm.errors import BadRequest, NotFound, SealedStorageError
from cryptovm.release import recipient_binding
from cryptovm.sealing import SealedBlob
from cryptovm.wrapping import open_envelope, spki_der

__all__ = [
    "BINDING_SUFFIX",
    "LUKS_HEADER_SIZE",
    "SEALED_SUFFIX",
    "DiskBinding",
    "DiskBindingError",
    "NewDisk",
    "SealedDisk",
    "disk_key_id",
    "ensure_disk_key",
    "luks_uuid",
    "new_passphrase",
    "release_disk_key",
    "release_policy_name",
]

Call = Callable[..., dict[str, Any]]
"""``call(op, **args)`` to a CryptoVM: a CVM1 client, a StreamClient, a session adapter."""
Quote = Callable[[bytes], Evidence]
"""The disk owner's quote over its policy's PCRs with the given qualifying data."""
Mode = Literal["host", "guest"]

BINDING_FORMAT = "testbed-svd-disk"
BINDING_VERSION = 1
BINDING_SUFFIX = ".svd.json"
SEALED_SUFFIX = ".sealed.json"
SEALED_DISK_FORMAT = "testbed-svd-sealed-disk"
MAX_BINDING = 16 << 10
PASSPHRASE_SIZE = 32
LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_HEADER_SIZE = 592  # the LUKS1 phdr: magic, version, cipher, ..., uuid, 8 key slots
_UUID = slice(168, 208)
_PAYLOAD_OFFSET = slice(104, 108)  # in 512-byte sectors, after the key material
SECTOR = 512
_OAEP = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)


class DiskBindingError(EvidenceFormatError):
    """A disk binding or LUKS header that is malformed, truncated or of another disk."""


def disk_key_id(node: str, disk: str) -> str:
    return check_name(f"svd-{node}-{disk}", "disk key id")


def release_policy_name(node: str) -> str:
    return check_name(f"svd-{node}", "release policy name")


def luks_uuid(image: Path) -> str:
    """The UUID in the LUKS1 header of a complete image; a DiskBindingError for a
    truncated, corrupt or non-LUKS image (before any key is asked for)."""
    try:
        with open(image, "rb") as f:
            header = f.read(LUKS_HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise DiskBindingError(f"disk image {image} is unreadable: {exc.strerror}") from None
    if len(header) < LUKS_HEADER_SIZE:
        raise DiskBindingError(f"disk image {image} is truncated: {len(header)} bytes, "
                               "not even a LUKS header")
    if not header.startswith(LUKS_MAGIC) or header[6:8] != b"\x00\x01":
        raise DiskBindingError(f"disk image {image} has no LUKS1 header (corrupt, or not "
                               "an encrypted disk)")
    payload = int.from_bytes(header[_PAYLOAD_OFFSET], "big") * SECTOR
    if size <= payload:
        raise DiskBindingError(f"disk image {image} is truncated: {size} bytes, but its "
                               f"encrypted data starts at byte {payload}")
    uuid = header[_UUID].rstrip(b"\x00")
    try:
        return uuid.decode("ascii")
    except UnicodeDecodeError:
        raise DiskBindingError(f"disk image {image}: its LUKS UUID is not text") from None


@dataclass(frozen=True)
class DiskBinding:
    """What ties an image to its CryptoVM key (public: the passphrase is wrapped)."""

    node: str
    disk: str
    key_id: str
    cryptovm: str
    size: int
    mode: Mode
    luks_uuid: str
    wrapped_key: bytes = field(repr=False)

    def to_doc(self) -> dict[str, Any]:
        return {"format": BINDING_FORMAT, "version": BINDING_VERSION,
                **asdict(self), "wrapped_key": b64encode(self.wrapped_key)}

    def save(self, path: Path) -> None:
        atomic_write(path, (json.dumps(self.to_doc(), indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> DiskBinding:
        try:
            doc = json.loads(read_bounded(path, MAX_BINDING, what="disk binding"))
        except FileInputError as exc:
            raise DiskBindingError(str(exc)) from None
        except ValueError:
            raise DiskBindingError(f"{path}: not JSON") from None
        return cls.from_doc(doc, str(path))

    @classmethod
    def from_doc(cls, doc: object, where: str) -> DiskBinding:
        if not isinstance(doc, dict) or (doc.get("format"), doc.get("version")) != (
                BINDING_FORMAT, BINDING_VERSION):
            raise DiskBindingError(f"{where}: not a version-{BINDING_VERSION} disk binding")
        try:
            binding = cls(node=doc["node"], disk=doc["disk"], key_id=doc["key_id"],
                          cryptovm=doc["cryptovm"], size=doc["size"], mode=doc["mode"],
                          luks_uuid=doc["luks_uuid"],
                          wrapped_key=b64decode(doc["wrapped_key"], "wrapped_key"))
        except (KeyError, EvidenceFormatError) as exc:
            raise DiskBindingError(f"{where}: incomplete disk binding ({exc})") from None
        binding.check(where)
        return binding

    def check(self, where: str) -> None:
        texts = (self.node, self.disk, self.key_id, self.cryptovm, self.luks_uuid)
        if not all(isinstance(t, str) and 0 < len(t) <= 64 for t in texts):
            raise DiskBindingError(f"{where}: names must be 1-64 characters")
        try:
            expected = disk_key_id(self.node, self.disk)
        except BadRequest:
            raise DiskBindingError(f"{where}: node or disk name is not a name") from None
        if self.key_id != expected:
            raise DiskBindingError(f"{where}: key id {self.key_id!r} is not the key of disk "
                                   f"{self.disk!r} of node {self.node!r}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size <= 0:
            raise DiskBindingError(f"{where}: size must be a positive integer")
        if self.mode not in ("host", "guest") or not 0 < len(self.wrapped_key) <= 1024:
            raise DiskBindingError(f"{where}: bad mode or wrapped key")

    def check_image(self, image: Path) -> None:
        """The image must be the one this binding was made for (its LUKS UUID)."""
        found = luks_uuid(image)
        if found != self.luks_uuid:
            raise DiskBindingError(f"disk image {image} is not disk {self.disk!r} of node "
                                   f"{self.node!r}: its LUKS UUID {found} is not the bound "
                                   f"{self.luks_uuid} (an image swapped in?)")


@dataclass(frozen=True)
class SealedDisk:
    """The CryptoVM's own store disk: its passphrase sealed to the CryptoVM's TPM PCRs
    (:mod:`cryptovm.sealing`), since no other key holder is below the CryptoVM. Kept
    beside the image as ``<disk>.sealed.json``; the sealed blob opens only on that TPM
    in the measured state it was sealed in."""

    node: str
    disk: str
    size: int
    luks_uuid: str
    sealed: SealedBlob = field(repr=False)

    def save(self, path: Path) -> None:
        doc = {"format": SEALED_DISK_FORMAT, "version": BINDING_VERSION, "node": self.node,
               "disk": self.disk, "size": self.size, "luks_uuid": self.luks_uuid,
               "sealed": json.loads(self.sealed.to_json())}
        atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())

    @classmethod
    def load(cls, path: Path) -> SealedDisk:
        try:
            doc = json.loads(read_bounded(path, MAX_BINDING, what="sealed disk key"))
            if (doc["format"], doc["version"]) != (SEALED_DISK_FORMAT, BINDING_VERSION):
                raise ValueError("not a version-1 sealed disk key")
            sealed = cls(doc["node"], doc["disk"], doc["size"], doc["luks_uuid"],
                         SealedBlob.from_json(json.dumps(doc["sealed"]).encode()))
        except FileInputError as exc:
            raise DiskBindingError(str(exc)) from None
        except (ValueError, KeyError, TypeError, SealedStorageError) as exc:
            raise DiskBindingError(f"{path}: unusable sealed disk key ({exc})") from None
        if not all(isinstance(v, str) for v in (sealed.node, sealed.disk, sealed.luks_uuid)):
            raise DiskBindingError(f"{path}: unusable sealed disk key (names)")
        return sealed

    def check_image(self, image: Path) -> None:
        if luks_uuid(image) != self.luks_uuid:
            raise DiskBindingError(f"disk image {image} is not the store disk sealed in "
                                   "this CryptoVM's TPM (another LUKS UUID)")


@dataclass(frozen=True)
class NewDisk:
    """A fresh passphrase and its wrapped form; the passphrase is used once, to format,
    by the party that will unlock the disk (hypervisor in host mode, node in guest mode)."""

    wrapped_key: bytes = field(repr=False)
    passphrase: bytes = field(repr=False)


def ensure_disk_key(call: Call, node: str, disk: str, reference_policy: str,
                    registry_json: str) -> bytes:
    """As root: the owner's release policy and the disk's key (created on first use);
    returns the key's public key (SPKI DER). The key never leaves the CryptoVM."""
    key_id = disk_key_id(node, disk)
    try:
        return bytes(call("public_key", key_id=key_id)["public_key"])
    except NotFound:
        pass
    policy = release_policy_name(node)
    call("release_policy_set", name=policy, reference_policy=reference_policy,
         ak_registry=registry_json)
    answer = call("generate", algorithm="rsa-2048", usage=["decrypt"], key_id=key_id,
                  exportable=False, release_policy=policy, release_node=node)
    return bytes(answer["public_key"])


def new_passphrase(public_key: bytes) -> NewDisk:
    """A fresh passphrase, wrapped (RSA-OAEP-SHA256) under the disk key's public key."""
    try:
        public = serialization.load_der_public_key(public_key)
    except (ValueError, TypeError):
        raise DiskBindingError("the disk key's public key is not a DER SPKI") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise DiskBindingError("the disk key is not an RSA key")
    # Hex text: QEMU's LUKS driver wants a UTF-8 passphrase; 256 bits of entropy either way.
    passphrase = os.urandom(PASSPHRASE_SIZE).hex().encode()
    return NewDisk(public.encrypt(passphrase, _OAEP), passphrase)


def release_disk_key(call: Call, binding: DiskBinding, quote: Quote) -> bytes:
    """The passphrase, through attestation-gated release: the CryptoVM checks the quote
    against the owner's policy and registered AK, and seals the result to a key made
    here for this one request. Refusals are ``ReleaseDenied`` naming the check."""
    recipient = ec.generate_private_key(ec.SECP256R1())
    spki = spki_der(recipient.public_key())
    nonce = call("issue_nonce")["nonce"]
    evidence = quote(recipient_binding(nonce, spki))
    answer = call("release_decrypt", key_id=binding.key_id, ciphertext=binding.wrapped_key,
                  evidence=evidence.to_json(), nonce=nonce, recipient_public_key=spki,
                  padding="oaep-sha256")
    return open_envelope(recipient, answer["envelope"], answer["context"])
