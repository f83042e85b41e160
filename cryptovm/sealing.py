"""The storage key, sealed to this CryptoVM's TPM and PCR state.

The storage key (32 random bytes, generated in the CryptoVM process) is the data of
a TPM KEYEDHASH *sealed data object*, created with TPM2_Create under an SRK-like
primary (ECC P-256 storage key in the owner hierarchy, derived afresh from the
owner seed on every use and flushed right after). The object has no usable auth
value (``userWithAuth`` clear): TPM2_Unseal needs a policy session whose digest
equals its ``authPolicy``, which is PolicyPCR over the configured PCR selection::

    authPolicy = SHA256(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION
                        || SHA256(PCR[i0] || PCR[i1] || ...))

computed here in Python from the PCR values read at sealing time and proven right
by unsealing once before the blob is accepted. Both the sealing (TPM2_Create) and
the unsealing (TPM2_Unseal) carry the secret encrypted (AES-128-CFB parameter
encryption of a session salted with the primary), so it never crosses the TCTI
in clear.

Only the public/private pair (TPM2B_PUBLIC, TPM2B_PRIVATE) and the selection are
stored; the PCR values sealed to are stored too, but only to *explain* a failure
(which PCRs differ): the TPM enforces the policy, not this file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, TpmError
from attestation.tpm_types import PcrSelection
from cryptovm.errors import SealedStorageError

# tpm2-pytss is imported where TpmSealer uses it, not here: in a Debian 12 guest there
# is none, and the CryptoVM runs there on raw TPM commands (cryptovm/rawtpm.py).
if TYPE_CHECKING:
    from tpm2_pytss.types import TPM2B_PUBLIC, TPMT_SYM_DEF

    from attestation.tpm import TpmClient

TPM_CC_POLICY_PCR = 0x17F
SEALED_FORMAT = "cryptovm-sealed-storage-key"
SEALED_VERSION = 1
STORAGE_KEY_SIZE = 32
PCRS_PER_READ = 8

# TPMA_OBJECT bits (TPM 2.0 Part 2), as numbers so that the raw backend shares them.
# restricted | decrypt | fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | noDA
PRIMARY_ATTRIBUTES = 0x00030472
# fixedTPM | fixedParent | adminWithPolicy. No userWithAuth: the user role needs the PCR
# policy. adminWithPolicy: so does admin.
SEALED_ATTRIBUTES = 0x00000092

TpmAccess = Callable[[], "AbstractContextManager[TpmClient]"]
"""How the CryptoVM reaches its TPM: a callable returning a context manager that yields a
:class:`~attestation.tpm.TpmClient` for the duration of one use. Default
(:func:`connect_tpm`): a short-lived connection of its own. A testbed node, which holds its
swtpm's only connection, passes one that lends that connection under the node's TPM lock.
Every transient object or session created through it is flushed before the context exits.
The raw backend (:class:`cryptovm.rawtpm.RawTpm`) yields a client with the same subset of
methods the CryptoVM uses (``attestation_key``, ``quote``, ``endorsement_key``, ``flush``,
``activate_credential``)."""


class Sealer(Protocol):
    """Seals the storage key to the TPM and PCR state: :class:`TpmSealer` (tpm2-pytss) or
    :class:`cryptovm.rawtpm.RawSealer` (raw commands), with the same :class:`SealedBlob`."""

    selection: PcrSelection

    def seal(self, secret: bytes) -> SealedBlob: ...

    def unseal(self, blob: SealedBlob) -> bytes: ...

    def read_pcrs(self) -> dict[int, bytes]: ...


SealerFactory = Callable[[PcrSelection], Sealer]
"""Makes the sealer for a PCR selection (CryptoVm's ``sealer_factory`` option)."""


def connect_tpm(tcti: str) -> TpmAccess:
    """The default TPM access: one short-lived connection per use."""
    # lazy: attestation.tpm needs tpm2-pytss, which Debian 12 guests do not have
    from attestation.tpm import TpmClient

    return lambda: TpmClient(tcti)


def not_loadable(exc: Exception) -> SealedStorageError:
    """The error of a TPM2_Load refused: the blob is another TPM's, or damaged."""
    return SealedStorageError(
        f"the sealed storage key does not load on this TPM ({exc}): it was sealed by "
        "another TPM (other owner seed) or the blob is damaged")


def pcrs_differ(blob: SealedBlob, now: dict[int, bytes]) -> SealedStorageError:
    """The error of an unseal refused by the PCR policy, naming the PCRs that differ."""
    differ = [i for i in blob.selection.indices if now.get(i) != blob.sealed_pcrs.get(i)]
    detail = ", ".join(f"PCR {i} sealed to {blob.sealed_pcrs.get(i, b'').hex()[:16]}… "
                       f"is now {now[i].hex()[:16]}…" for i in differ[:4])
    listed = differ or "none visible, the policy still failed"
    return SealedStorageError(
        f"the storage key is sealed to other PCR values: this CryptoVM booted into a "
        f"different state ({format_pcr_selection(blob.selection)}; PCRs differ: "
        f"{listed}{'; ' + detail if detail else ''})")


def parse_pcr_selection(spec: str) -> PcrSelection:
    """``sha256:0-9`` or ``sha256:0,2,4-7`` -> PcrSelection."""
    bank, sep, ranges = spec.partition(":")
    if not sep or bank not in ("sha1", "sha256", "sha384", "sha512"):
        raise ValueError(f"PCR selection {spec!r}: expected BANK:LIST, e.g. sha256:0-9")
    indices: set[int] = set()
    for part in ranges.split(","):
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"PCR selection {spec!r}: {part!r} is not N or N-M") from None
        if not 0 <= first <= last <= 23:
            raise ValueError(f"PCR selection {spec!r}: PCRs must be within 0..23")
        indices.update(range(first, last + 1))
    return PcrSelection(bank, tuple(sorted(indices)))


def format_pcr_selection(selection: PcrSelection) -> str:
    return f"{selection.bank}:{','.join(map(str, selection.indices))}"


def tpml_pcr_selection(selection: PcrSelection) -> bytes:
    """TPML_PCR_SELECTION wire bytes: exactly what the TPM hashes into PolicyPCR."""
    return (1).to_bytes(4, "big") + selection.marshal()


def pcr_policy_digest(selection: PcrSelection, pcrs: dict[int, bytes]) -> bytes:
    """The PolicyPCR policy digest (SHA-256 session) for these PCR values."""
    composite = hashlib.sha256(b"".join(pcrs[i] for i in selection.indices)).digest()
    return hashlib.sha256(bytes(32) + TPM_CC_POLICY_PCR.to_bytes(4, "big")
                          + tpml_pcr_selection(selection) + composite).digest()


@dataclass(frozen=True)
class SealedBlob:
    """What the state directory keeps of the sealed storage key."""

    public: bytes  # TPM2B_PUBLIC
    private: bytes  # TPM2B_PRIVATE
    selection: PcrSelection
    policy_digest: bytes
    sealed_pcrs: dict[int, bytes]  # informational: explains an unseal failure

    def to_json(self) -> bytes:
        return json.dumps({
            "format": SEALED_FORMAT, "version": SEALED_VERSION,
            "public": b64encode(self.public), "private": b64encode(self.private),
            "pcr_selection": format_pcr_selection(self.selection),
            "policy_digest": self.policy_digest.hex(),
            "sealed_pcrs": {str(i): v.hex() for i, v in sorted(self.sealed_pcrs.items())},
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SealedBlob:
        try:
            doc = json.loads(data)
            if doc.get("format") != SEALED_FORMAT or doc.get("version") != SEALED_VERSION:
                raise ValueError("not a sealed storage key of a known version")
            return cls(
                public=b64decode(doc["public"], "public"),
                private=b64decode(doc["private"], "private"),
                selection=parse_pcr_selection(doc["pcr_selection"]),
                policy_digest=bytes.fromhex(doc["policy_digest"]),
                sealed_pcrs={int(i): bytes.fromhex(v) for i, v in doc["sealed_pcrs"].items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError, EvidenceFormatError) as exc:
            raise SealedStorageError(f"the sealed storage key file is damaged: {exc}") from None


def _storage_primary_template() -> TPM2B_PUBLIC:
    from tpm2_pytss.types import TPM2B_PUBLIC, TPMA_OBJECT

    return TPM2B_PUBLIC.parse("ecc256:aes128cfb",
                              objectAttributes=TPMA_OBJECT(PRIMARY_ATTRIBUTES))


def _sealed_template(policy: bytes) -> TPM2B_PUBLIC:
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.types import TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

    area = TPMT_PUBLIC(type=TPM2_ALG.KEYEDHASH, nameAlg=TPM2_ALG.SHA256,
                       objectAttributes=TPMA_OBJECT(SEALED_ATTRIBUTES), authPolicy=policy)
    area.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(publicArea=area)


def _aes128_cfb() -> TPMT_SYM_DEF:
    from tpm2_pytss.constants import TPM2_ALG
    from tpm2_pytss.types import TPMT_SYM_DEF

    sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES)
    sym.keyBits.aes = 128
    sym.mode.aes = TPM2_ALG.CFB
    return sym


class TpmSealer:
    """Seals and unseals the storage key on the TPM at ``tcti``, through tpm2-pytss.

    By default opens one TPM connection per call (swtpm serves one connection at a
    time, and other tools must be able to reach the TPM in between); ``tpm_access``
    replaces that (see :data:`TpmAccess`). Flushes every transient object and session
    it creates, even on errors, before the access context exits.
    """

    def __init__(self, tcti: str, selection: PcrSelection, *,
                 tpm_access: TpmAccess | None = None) -> None:
        self.tcti = tcti
        self.selection = selection
        self._access = tpm_access or connect_tpm(tcti)

    def seal(self, secret: bytes) -> SealedBlob:
        """Seal ``secret`` to the current PCR values; verified by unsealing once."""
        from tpm2_pytss.constants import ESYS_TR, TPM2_SE, TPMA_SESSION
        from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE, TPMS_SENSITIVE_CREATE

        with self._session() as esapi:
            pcrs = _read_pcrs(esapi, self.selection)
            policy = pcr_policy_digest(self.selection, pcrs)
            with _primary(esapi) as primary, _salted(esapi, primary, TPM2_SE.HMAC,
                                                     TPMA_SESSION.DECRYPT) as enc:
                private, public, _, _, _ = _tpm("TPM2_Create of the sealed storage key",
                                                esapi.create, primary,
                                                TPM2B_SENSITIVE_CREATE(
                                                    sensitive=TPMS_SENSITIVE_CREATE(data=secret)),
                                                _sealed_template(policy),
                                                session1=ESYS_TR.PASSWORD, session2=enc)
        blob = SealedBlob(bytes(public.marshal()), bytes(private.marshal()), self.selection,
                          policy, pcrs)
        if self.unseal(blob) != secret:
            raise TpmError("the sealed storage key did not unseal to the same bytes")
        return blob

    def unseal(self, blob: SealedBlob) -> bytes:
        """Unseal; :class:`SealedStorageError` names the differing PCRs on policy failure."""
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.constants import TPM2_RC, TPM2_SE, TPMA_SESSION
        from tpm2_pytss.types import TPML_PCR_SELECTION

        selection = TPML_PCR_SELECTION.unmarshal(tpml_pcr_selection(blob.selection))[0]
        with (self._session() as esapi, _primary(esapi) as primary,
              _loaded(esapi, primary, blob) as sealed,
              _salted(esapi, primary, TPM2_SE.POLICY, TPMA_SESSION.ENCRYPT) as session):
            _tpm("TPM2_PolicyPCR", esapi.policy_pcr, session, b"", selection)
            try:
                return bytes(esapi.unseal(sealed, session1=session))
            except TSS2_Exception as exc:
                if exc.error in (TPM2_RC.POLICY_FAIL, TPM2_RC.PCR_CHANGED):
                    raise pcrs_differ(blob, _read_pcrs(esapi, blob.selection)) from None
                raise TpmError(f"TPM2_Unseal failed: {exc}") from None

    def read_pcrs(self) -> dict[int, bytes]:
        with self._session() as esapi:
            return _read_pcrs(esapi, self.selection)

    @contextmanager
    def _session(self) -> Iterator[Any]:
        with self._access() as client:
            yield client.esapi


def _tpm(action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    from tpm2_pytss import TSS2_Exception

    try:
        return fn(*args, **kwargs)
    except TSS2_Exception as exc:
        raise TpmError(f"{action} failed: {exc}") from None


def _read_pcrs(esapi: Any, selection: PcrSelection) -> dict[int, bytes]:
    from tpm2_pytss.types import TPML_PCR_SELECTION

    values: dict[int, bytes] = {}
    for start in range(0, len(selection.indices), PCRS_PER_READ):
        chunk = PcrSelection(selection.bank, selection.indices[start:start + PCRS_PER_READ])
        tpml = TPML_PCR_SELECTION.unmarshal(tpml_pcr_selection(chunk))[0]
        _, _, digests = _tpm("TPM2_PCR_Read", esapi.pcr_read, tpml)
        got = [bytes(d) for d in digests]
        if len(got) != len(chunk.indices):
            raise TpmError(f"TPM2_PCR_Read returned {len(got)} of {len(chunk.indices)} PCRs "
                           f"({selection.bank} bank not allocated?)")
        values.update(zip(chunk.indices, got, strict=True))
    return values


@contextmanager
def _primary(esapi: Any) -> Iterator[Any]:
    from tpm2_pytss.constants import ESYS_TR
    from tpm2_pytss.types import TPM2B_SENSITIVE_CREATE

    handle, _, _, _, _ = _tpm("creating the storage primary", esapi.create_primary,
                              TPM2B_SENSITIVE_CREATE(), _storage_primary_template(),
                              ESYS_TR.OWNER)
    try:
        yield handle
    finally:
        _flush(esapi, handle)


@contextmanager
def _loaded(esapi: Any, primary: Any, blob: SealedBlob) -> Iterator[Any]:
    from tpm2_pytss import TSS2_Exception
    from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC

    try:
        public = TPM2B_PUBLIC.unmarshal(blob.public)[0]
        private = TPM2B_PRIVATE.unmarshal(blob.private)[0]
        handle = esapi.load(primary, private, public)
    except TSS2_Exception as exc:
        raise not_loadable(exc) from None
    try:
        yield handle
    finally:
        _flush(esapi, handle)


@contextmanager
def _salted(esapi: Any, primary: Any, kind: Any, direction: Any) -> Iterator[Any]:
    """A session salted with the primary, encrypting the secret-carrying parameter."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_SESSION

    session = _tpm("TPM2_StartAuthSession", esapi.start_auth_session, primary, ESYS_TR.NONE,
                   kind, _aes128_cfb(), TPM2_ALG.SHA256)
    try:
        esapi.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | direction)
        yield session
    finally:
        _flush(esapi, session)


def _flush(esapi: Any, handle: Any) -> None:
    from tpm2_pytss import TSS2_Exception

    with contextlib.suppress(TSS2_Exception):  # already gone: nothing left to free
        esapi.flush_context(handle)


__all__ = [
    "STORAGE_KEY_SIZE",
    "TPM_CC_POLICY_PCR",
    "SealedBlob",
    "Sealer",
    "SealerFactory",
    "TpmAccess",
    "TpmSealer",
    "connect_tpm",
    "format_pcr_selection",
    "not_loadable",
    "parse_pcr_selection",
    "pcr_policy_digest",
    "pcrs_differ",
    "tpml_pcr_selection",
]
