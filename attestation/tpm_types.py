"""Pure-Python decoding of the TPM 2.0 structures a verifier needs.

The verifier runs where there is no TPM and no libtss2 (a relying party, a CI
job), and it parses attacker-controlled bytes, so this is a small bounds-checked
big-endian reader rather than a binding to the C marshalling library. Every
failure is an :class:`EvidenceFormatError` naming the field and byte offset.

Covered: TPMS_ATTEST (quote and certify), TPMT_SIGNATURE, TPMT_PUBLIC (RSA and
ECC), TPML_PCR_SELECTION, and object Names.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from functools import cached_property, lru_cache
from typing import Any, Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation.errors import EvidenceFormatError

TPM_GENERATED_VALUE = 0xFF544347
MAX_STRUCTURE_SIZE = 4096  # TPM2B_ATTEST/TPMT_PUBLIC are far smaller on real TPMs


class Alg(IntEnum):
    """TPM_ALG_ID values used here."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CFB = 0x0043


class StructureTag(IntEnum):
    """TPM_ST values of TPMS_ATTEST.type."""

    ATTEST_NV = 0x8014
    ATTEST_COMMAND_AUDIT = 0x8015
    ATTEST_SESSION_AUDIT = 0x8016
    ATTEST_CERTIFY = 0x8017
    ATTEST_QUOTE = 0x8018
    ATTEST_TIME = 0x8019
    ATTEST_CREATION = 0x801A
    ATTEST_NV_DIGEST = 0x801C


class ObjectAttributes(IntFlag):
    """TPMA_OBJECT bits."""

    FIXED_TPM = 0x00000002
    ST_CLEAR = 0x00000004
    FIXED_PARENT = 0x00000010
    SENSITIVE_DATA_ORIGIN = 0x00000020
    USER_WITH_AUTH = 0x00000040
    ADMIN_WITH_POLICY = 0x00000080
    NO_DA = 0x00000400
    ENCRYPTED_DUPLICATION = 0x00000800
    RESTRICTED = 0x00010000
    DECRYPT = 0x00020000
    SIGN_ENCRYPT = 0x00040000


class EccCurve(IntEnum):
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005


HASH_BY_ALG: dict[int, str] = {
    Alg.SHA1: "sha1",
    Alg.SHA256: "sha256",
    Alg.SHA384: "sha384",
    Alg.SHA512: "sha512",
}
ALG_BY_HASH: dict[str, int] = {name: alg for alg, name in HASH_BY_ALG.items()}
DIGEST_SIZE: dict[str, int] = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
CURVES: dict[int, ec.EllipticCurve] = {
    EccCurve.NIST_P256: ec.SECP256R1(),
    EccCurve.NIST_P384: ec.SECP384R1(),
    EccCurve.NIST_P521: ec.SECP521R1(),
}
ECC_SIGNATURE_ALGS = frozenset({Alg.ECDSA, Alg.ECDAA, Alg.SM2, Alg.ECSCHNORR})
RSA_SIGNATURE_ALGS = frozenset({Alg.RSASSA, Alg.RSAPSS})


def hash_name(alg: int, field: str = "hashAlg") -> str:
    """The hashlib name of a TPM hash algorithm, or a format error."""
    try:
        return HASH_BY_ALG[alg]
    except KeyError:
        raise EvidenceFormatError(f"{field}: unsupported hash algorithm 0x{alg:04x}") from None


_U16, _U32, _U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


class Reader:
    """A bounds-checked cursor over big-endian TPM wire bytes."""

    def __init__(self, data: bytes, what: str) -> None:
        if len(data) > MAX_STRUCTURE_SIZE * 16:
            raise EvidenceFormatError(f"{what}: {len(data)} bytes is too large")
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    def _short(self, n: int, field: str) -> EvidenceFormatError:
        return EvidenceFormatError(
            f"{self._what}: truncated at byte {self._pos} reading {field} "
            f"({n} bytes wanted, {len(self._data) - self._pos} left)"
        )

    def take(self, n: int, field: str) -> bytes:
        end = self._pos + n
        if n < 0 or end > len(self._data):
            raise self._short(n, field)
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    # The fixed-size readers avoid take()'s slice: they run a dozen times per quote.
    def u8(self, field: str) -> int:
        if self._pos + 1 > len(self._data):
            raise self._short(1, field)
        self._pos += 1
        return self._data[self._pos - 1]

    def u16(self, field: str) -> int:
        if self._pos + 2 > len(self._data):
            raise self._short(2, field)
        value: int = _U16.unpack_from(self._data, self._pos)[0]
        self._pos += 2
        return value

    def u32(self, field: str) -> int:
        if self._pos + 4 > len(self._data):
            raise self._short(4, field)
        value: int = _U32.unpack_from(self._data, self._pos)[0]
        self._pos += 4
        return value

    def u64(self, field: str) -> int:
        if self._pos + 8 > len(self._data):
            raise self._short(8, field)
        value: int = _U64.unpack_from(self._data, self._pos)[0]
        self._pos += 8
        return value

    def tpm2b(self, field: str, max_size: int = 1024) -> bytes:
        size = self.u16(f"{field}.size")
        if size > max_size:
            raise EvidenceFormatError(f"{self._what}: {field} size {size} exceeds {max_size}")
        return self.take(size, field)

    @property
    def offset(self) -> int:
        return self._pos

    def finish(self) -> None:
        """Reject trailing bytes: a structure must be exactly its encoding."""
        if self._pos != len(self._data):
            raise EvidenceFormatError(
                f"{self._what}: {len(self._data) - self._pos} unexpected trailing bytes "
                f"at byte {self._pos}"
            )


def tpm2b(data: bytes) -> bytes:
    """Marshal bytes as a TPM2B (u16 size prefix)."""
    if len(data) > 0xFFFF:
        raise EvidenceFormatError("TPM2B payload larger than 65535 bytes")
    return struct.pack(">H", len(data)) + data


# --- PCR selections -------------------------------------------------------------------

PCR_SELECT_MAX = 4  # 32 PCRs; PC Client TPMs have 24


@dataclass(frozen=True)
class PcrSelection:
    """One bank's selected PCR indices, in ascending order."""

    bank: str
    indices: tuple[int, ...]

    def marshal(self) -> bytes:
        bitmap = bytearray(3 if max(self.indices, default=0) < 24 else PCR_SELECT_MAX)
        for index in self.indices:
            bitmap[index // 8] |= 1 << (index % 8)
        return struct.pack(">HB", ALG_BY_HASH[self.bank], len(bitmap)) + bytes(bitmap)


def read_pcr_selection(reader: Reader) -> tuple[PcrSelection, ...]:
    count = reader.u32("pcrSelect.count")
    if count > 16:
        raise EvidenceFormatError(f"pcrSelect.count {count} exceeds 16 banks")
    selections = []
    for i in range(count):
        bank = hash_name(reader.u16(f"pcrSelect[{i}].hash"), f"pcrSelect[{i}].hash")
        size = reader.u8(f"pcrSelect[{i}].sizeofSelect")
        if size > PCR_SELECT_MAX:
            raise EvidenceFormatError(
                f"pcrSelect[{i}].sizeofSelect {size} exceeds {PCR_SELECT_MAX}")
        bitmap = reader.take(size, f"pcrSelect[{i}].pcrSelect")
        indices = tuple(
            byte * 8 + bit for byte in range(size) for bit in range(8) if bitmap[byte] >> bit & 1
        )
        selections.append(PcrSelection(bank, indices))
    return tuple(selections)


def marshal_pcr_selection(selections: tuple[PcrSelection, ...]) -> bytes:
    return struct.pack(">I", len(selections)) + b"".join(s.marshal() for s in selections)


# --- TPMS_ATTEST ---------------------------------------------------------------------


@dataclass(frozen=True)
class ClockInfo:
    clock: int
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True)
class QuoteInfo:
    pcr_select: tuple[PcrSelection, ...]
    pcr_digest: bytes


@dataclass(frozen=True)
class CertifyInfo:
    name: bytes
    qualified_name: bytes


@dataclass(frozen=True)
class Attest:
    """A decoded TPMS_ATTEST; ``raw`` is exactly the signed bytes."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    attested: QuoteInfo | CertifyInfo | None
    raw: bytes


def parse_attest(data: bytes) -> Attest:
    """Decode a TPMS_ATTEST (the body of TPM2B_ATTEST, as in tpm2_quote's quote.msg)."""
    if len(data) > MAX_STRUCTURE_SIZE:
        raise EvidenceFormatError(f"TPMS_ATTEST: {len(data)} bytes is too large")
    r = Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    tag = r.u16("type")
    signer = r.tpm2b("qualifiedSigner", 68)
    extra = r.tpm2b("extraData", 64)
    clock = ClockInfo(r.u64("clock"), r.u32("resetCount"), r.u32("restartCount"), False)
    safe = r.u8("safe")
    if safe > 1:
        raise EvidenceFormatError(f"TPMS_ATTEST: clockInfo.safe is {safe}, not a TPMI_YES_NO")
    clock = ClockInfo(clock.clock, clock.reset_count, clock.restart_count, bool(safe))
    firmware = r.u64("firmwareVersion")
    attested: QuoteInfo | CertifyInfo | None
    if tag == StructureTag.ATTEST_QUOTE:
        attested = QuoteInfo(read_pcr_selection(r), r.tpm2b("pcrDigest", 64))
    elif tag == StructureTag.ATTEST_CERTIFY:
        attested = CertifyInfo(r.tpm2b("name", 68), r.tpm2b("qualifiedName", 68))
    else:
        # Other attestation types are signed by the same keys; decode the header only so
        # the verifier can say "wrong attestation type" instead of "malformed".
        r.take(len(data) - r.offset, "attested")
        attested = None
    r.finish()
    return Attest(magic, tag, signer, extra, clock, firmware, attested, bytes(data))


# --- TPMT_SIGNATURE ------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """A decoded TPMT_SIGNATURE (RSA: ``rsa_signature``; ECC: ``r`` and ``s``)."""

    sig_alg: int
    hash_alg: int
    rsa_signature: bytes = b""
    r: bytes = b""
    s: bytes = b""

    @property
    def hash_name(self) -> str:
        return hash_name(self.hash_alg, "signature.hash")

    def marshal(self) -> bytes:
        head = struct.pack(">HH", self.sig_alg, self.hash_alg)
        if self.sig_alg in RSA_SIGNATURE_ALGS:
            return head + tpm2b(self.rsa_signature)
        return head + tpm2b(self.r) + tpm2b(self.s)


def parse_signature(data: bytes) -> Signature:
    r = Reader(data, "TPMT_SIGNATURE")
    sig_alg = r.u16("sigAlg")
    if sig_alg in RSA_SIGNATURE_ALGS:
        sig = Signature(sig_alg, r.u16("hash"), rsa_signature=r.tpm2b("sig", 512))
    elif sig_alg in ECC_SIGNATURE_ALGS:
        hash_alg = r.u16("hash")
        sig = Signature(sig_alg, hash_alg, r=r.tpm2b("signatureR", 66), s=r.tpm2b("signatureS", 66))
    else:
        raise EvidenceFormatError(f"TPMT_SIGNATURE: unsupported sigAlg 0x{sig_alg:04x}")
    r.finish()
    return sig


# --- TPMT_PUBLIC ---------------------------------------------------------------------


@dataclass(frozen=True)
class PublicArea:
    """A decoded RSA or ECC TPMT_PUBLIC; ``raw`` is its exact encoding (for the Name)."""

    type: int
    name_alg: int
    attributes: ObjectAttributes
    auth_policy: bytes
    symmetric: tuple[int, int, int]  # (algorithm, keyBits, mode); (NULL, 0, 0) if none
    scheme: int
    scheme_hash: int
    rsa_bits: int
    rsa_exponent: int
    rsa_modulus: bytes
    ecc_curve: int
    ecc_x: bytes
    ecc_y: bytes
    raw: bytes

    @cached_property
    def name(self) -> bytes:
        """The object's Name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        digest = hashlib.new(hash_name(self.name_alg, "nameAlg"), self.raw).digest()
        return struct.pack(">H", self.name_alg) + digest

    @property
    def name_hash(self) -> str:
        return hash_name(self.name_alg, "nameAlg")

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The key as a ``cryptography`` object; a format error if it is not a valid key."""
        return self._public_key

    @cached_property
    def _public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        try:
            if self.type == Alg.RSA:
                exponent = self.rsa_exponent or 65537
                return rsa.RSAPublicNumbers(exponent, int.from_bytes(self.rsa_modulus)).public_key()
            curve = CURVES[self.ecc_curve]
            return ec.EllipticCurvePublicNumbers(
                int.from_bytes(self.ecc_x), int.from_bytes(self.ecc_y), curve
            ).public_key()
        except (ValueError, KeyError) as exc:
            raise EvidenceFormatError(f"TPMT_PUBLIC: not a valid public key ({exc})") from None


def _read_symmetric(r: Reader) -> tuple[int, int, int]:
    alg = r.u16("symmetric.algorithm")
    if alg == Alg.NULL:
        return (alg, 0, 0)
    return (alg, r.u16("symmetric.keyBits"), r.u16("symmetric.mode"))


def _read_scheme(r: Reader, prefix: str) -> tuple[int, int]:
    scheme = r.u16(f"{prefix}.scheme")
    if scheme in (Alg.NULL, Alg.RSAES):
        return (scheme, Alg.NULL)  # RSAES has no hash; NULL has no details
    hash_alg = r.u16(f"{prefix}.hashAlg")
    if scheme == Alg.ECDAA:
        r.u16(f"{prefix}.count")
    return (scheme, hash_alg)


def parse_public(data: bytes) -> PublicArea:
    """Decode a TPMT_PUBLIC (without the TPM2B size prefix)."""
    if len(data) > MAX_STRUCTURE_SIZE:
        raise EvidenceFormatError(f"TPMT_PUBLIC: {len(data)} bytes is too large")
    r = Reader(data, "TPMT_PUBLIC")
    obj_type = r.u16("type")
    name_alg = r.u16("nameAlg")
    hash_name(name_alg, "nameAlg")
    attributes = ObjectAttributes(r.u32("objectAttributes"))
    policy = r.tpm2b("authPolicy", 64)
    symmetric = _read_symmetric(r)
    if obj_type == Alg.RSA:
        scheme, scheme_hash = _read_scheme(r, "rsaScheme")
        bits, exponent = r.u16("keyBits"), r.u32("exponent")
        modulus = r.tpm2b("unique.rsa", 512)
        if bits not in (1024, 2048, 3072, 4096) or len(modulus) * 8 != bits:
            raise EvidenceFormatError(
                f"TPMT_PUBLIC: RSA modulus of {len(modulus)} bytes, keyBits {bits}")
        area = PublicArea(obj_type, name_alg, attributes, policy, symmetric, scheme, scheme_hash,
                          bits, exponent, modulus, 0, b"", b"", bytes(data))
    elif obj_type == Alg.ECC:
        scheme, scheme_hash = _read_scheme(r, "eccScheme")
        curve = r.u16("curveID")
        kdf = r.u16("kdf.scheme")
        if kdf != Alg.NULL:
            r.u16("kdf.hashAlg")
        x, y = r.tpm2b("unique.x", 66), r.tpm2b("unique.y", 66)
        if curve not in CURVES:
            raise EvidenceFormatError(f"TPMT_PUBLIC: unsupported ECC curve 0x{curve:04x}")
        area = PublicArea(obj_type, name_alg, attributes, policy, symmetric, scheme, scheme_hash,
                          0, 0, b"", curve, x, y, bytes(data))
    else:
        raise EvidenceFormatError(f"TPMT_PUBLIC: unsupported object type 0x{obj_type:04x}")
    r.finish()
    return area


@lru_cache(maxsize=4096)
def parse_public_cached(data: bytes) -> PublicArea:
    """:func:`parse_public`, memoized: a verifier sees the same few AKs over and over.

    Safe because PublicArea is immutable and fully determined by its bytes.
    """
    return parse_public(data)


def parse_tpm2b_public(data: bytes) -> PublicArea:
    """Decode a TPM2B_PUBLIC (size-prefixed TPMT_PUBLIC, as tpm2_readpublic writes)."""
    r = Reader(data, "TPM2B_PUBLIC")
    inner = r.tpm2b("publicArea", MAX_STRUCTURE_SIZE)
    r.finish()
    return parse_public(inner)


RSA_KEY_BITS = (1024, 2048, 3072, 4096)
_U32_MAX = 0xFFFFFFFF


def marshal_public_key(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
                       attributes: int = 0) -> bytes:
    """Encode a bare public key as a TPMT_PUBLIC (nameAlg sha256, no scheme).

    For AKs given only as PEM (``tpm2_checkquote -u ak.pem``): the result carries
    whatever ``attributes`` the caller asserts, and nothing the TPM vouched for.
    A key no TPM could hold (odd modulus length, exponent beyond 32 bits, a curve
    without a TPM_ECC_CURVE) is an :class:`EvidenceFormatError` saying what is wrong.
    """
    head = struct.pack(">HHI", Alg.RSA if isinstance(key, rsa.RSAPublicKey) else Alg.ECC,
                       Alg.SHA256, attributes) + tpm2b(b"") + struct.pack(">H", Alg.NULL)
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        _check_tpm_rsa(key.key_size, numbers.e)
        exponent = 0 if numbers.e == 65537 else numbers.e
        return (head + struct.pack(">HHI", Alg.NULL, key.key_size, exponent)
                + tpm2b(numbers.n.to_bytes(key.key_size // 8)))
    curve = next((c for c, v in CURVES.items() if v.name == key.curve.name), None)
    if curve is None:
        raise EvidenceFormatError(
            f"EC curve {key.curve.name} has no TPM curve identifier here "
            f"(supported: {', '.join(v.name for v in CURVES.values())})")
    size = (key.curve.key_size + 7) // 8
    point = key.public_numbers()
    return (head + struct.pack(">HHH", Alg.NULL, curve, Alg.NULL)
            + tpm2b(point.x.to_bytes(size)) + tpm2b(point.y.to_bytes(size)))


def _check_tpm_rsa(bits: int, exponent: int) -> None:
    # TPMT_PUBLIC holds keyBits as a whole number of bytes and the exponent in a u32.
    if bits not in RSA_KEY_BITS:
        raise EvidenceFormatError(
            f"RSA modulus of {bits} bits: a TPM key has {', '.join(map(str, RSA_KEY_BITS))}")
    if exponent > _U32_MAX:
        raise EvidenceFormatError(
            f"RSA public exponent {exponent} does not fit the TPM's 32-bit exponent field")


def tpmt_public_from_pem(pem: bytes, what: str) -> bytes:
    """A PEM public key (``tpm2_checkquote -u ak.pem``) as TPMT_PUBLIC bytes.

    Every way it can be unusable -- not PEM, an algorithm ``cryptography`` or the TPM
    does not know, a key no TPM could hold -- is one EvidenceFormatError naming ``what``.
    """
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise EvidenceFormatError(f"{what}: not a usable PEM public key ({exc})") from None
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise EvidenceFormatError(f"{what}: neither an RSA nor an EC public key")
    try:
        return marshal_public_key(key)
    except EvidenceFormatError as exc:
        raise EvidenceFormatError(f"{what}: {exc}") from None


# --- what a TPM client returns (tpm2-pytss: attestation/tpm.py; raw: cryptovm/rawtpm.py) --

KeyAlgorithm = Literal["ecc", "rsa"]


@dataclass(frozen=True)
class EndorsementKey:
    """An EK's public area (TPMT_PUBLIC bytes) and its certificate from NV (DER)."""

    algorithm: KeyAlgorithm
    public: bytes
    certificate: bytes | None


@dataclass(frozen=True)
class TpmKey:
    """A key loaded in the TPM: its ESYS handle (owned by the client) and public area."""

    handle: Any  # ESYS_TR
    public: bytes  # TPMT_PUBLIC
    persistent: bool


@dataclass(frozen=True)
class QuoteResult:
    """TPM2_Quote's output and the PCR values it covers."""

    attest: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    selection: PcrSelection
    pcrs: dict[int, bytes]
