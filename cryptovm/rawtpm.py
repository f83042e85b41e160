"""The CryptoVM's TPM backend without tpm2-pytss: raw TPM 2.0 commands.

In a Debian 12 QEMU guest there is no usable tpm2-pytss (Debian packages 1.2), so
the CryptoVM reaches its vTPM through ``/dev/tpmrm0`` with the standard library's
raw commands of :mod:`attestation.tpm_raw` (shared with the guest agent), plus the
four this module adds for sealing (TPM2_Create, TPM2_Load, TPM2_PolicyPCR,
TPM2_Unseal). Host-side tests use an swtpm data socket instead (``unix:PATH``, or
``tcp:HOST:PORT`` for an swtpm started with a TCP port).

:class:`RawTpm` is the backend; give it to the CryptoVM with its :meth:`RawTpm.options`::

    raw = RawTpm.open("/dev/tpmrm0")
    vm, psk = CryptoVm.initialize(state_dir, raw.name, **raw.options())
    vm = CryptoVm.open(state_dir, raw.name, **raw.options())

* ``tpm_access`` yields a :class:`RawTpmClient`: the subset of
  :class:`attestation.tpm.TpmClient` the CryptoVM uses (the persistent ECC AK,
  quotes with their PCR values, the RSA EK and its NV certificate, credential
  activation).
* ``sealer_factory`` makes a :class:`RawSealer`: :class:`cryptovm.sealing.TpmSealer`'s
  contract and :class:`~cryptovm.sealing.SealedBlob` format, with the same storage
  primary template and sealed-object template, so a blob sealed by one unseals with
  the other on the same TPM.

What differs from :class:`~cryptovm.sealing.TpmSealer`: no parameter encryption. The
secret crosses ``/dev/tpmrm0`` in clear, inside the guest kernel; TpmSealer salts its
sessions so the secret never crosses the TCTI in clear. Here that would protect the
storage key only on its way from the guest to swtpm, which runs on the host and holds
the TPM state - its seeds, and so every sealed object - in any case: the host is
trusted for the vTPM, and a salted session would add cryptography (ECDH, KDFa,
AES-CFB) to this stdlib-only module for no protection against anyone who is not
already able to unseal.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from attestation.errors import TpmError
from attestation.tpm_raw import (
    AK_HANDLE,
    ALG_NULL,
    ALG_SHA256,
    CC,
    EK_CERT_INDEX,
    EK_HANDLE,
    RH_NULL,
    RH_OWNER,
    SE_POLICY,
    Reader,
    Tpm,
    TpmCommandError,
    open_transport,
    password_session,
    quoted_pcr_digest,
    strip_nv_padding,
    tpm2b,
    u16,
    u32,
)
from attestation.tpm_types import EndorsementKey, PcrSelection, QuoteResult, TpmKey
from cryptovm.sealing import (
    PRIMARY_ATTRIBUTES,
    SEALED_ATTRIBUTES,
    SealedBlob,
    not_loadable,
    pcr_policy_digest,
    pcrs_differ,
    tpml_pcr_selection,
)

if TYPE_CHECKING:
    from attestation.credential import CredentialChallenge

# The commands attestation.tpm_raw does not send (TPM 2.0 Part 2, TPM_CC): added to its
# name -> code table, which Tpm.command looks names up in.
SEALING_COMMANDS = {"Create": 0x153, "Load": 0x157, "Unseal": 0x15E, "PolicyPCR": 0x17F}
for _name, _code in SEALING_COMMANDS.items():
    CC.setdefault(_name, _code)

ALG_KEYEDHASH, ALG_ECC, ALG_AES, ALG_CFB = 0x0008, 0x0023, 0x0006, 0x0043
ECC_NIST_P256 = 0x0003
SESSION_CONTINUE = 0x01
RC_WARN_PCR_CHANGED = 0x928
RC_POLICY_FAIL = 0x01D  # format-one error number
MAX_QUALIFYING_DATA = 64


def storage_primary_template() -> bytes:
    """TPMT_PUBLIC of the SRK-like primary: tpm2-pytss's ``ecc256:aes128cfb`` with
    :data:`~cryptovm.sealing.PRIMARY_ATTRIBUTES`, byte for byte (same key from the seed)."""
    parameters = (u16(ALG_AES) + u16(128) + u16(ALG_CFB)  # symmetric
                  + u16(ALG_NULL) + u16(ECC_NIST_P256) + u16(ALG_NULL))  # scheme, curve, kdf
    return (u16(ALG_ECC) + u16(ALG_SHA256) + u32(PRIMARY_ATTRIBUTES) + tpm2b(b"")
            + parameters + tpm2b(b"") + tpm2b(b""))


def sealed_template(policy: bytes) -> bytes:
    """TPMT_PUBLIC of the sealed data object (KEYEDHASH, scheme NULL, PCR policy)."""
    return (u16(ALG_KEYEDHASH) + u16(ALG_SHA256) + u32(SEALED_ATTRIBUTES) + tpm2b(policy)
            + u16(ALG_NULL) + tpm2b(b""))


@contextmanager
def _errors(action: str) -> Iterator[None]:
    """TPM failures as :class:`TpmError`, as tpm2-pytss failures are in TpmClient."""
    try:
        yield
    except TpmCommandError as exc:
        raise TpmError(f"{action}: {exc}") from None
    except (ValueError, OSError) as exc:
        raise TpmError(f"{action} failed: {exc}") from None


def _run(tpm: Tpm, name: str, handles: bytes, params: bytes, *,
         sessions: tuple[bytes, ...] = (), out_handles: int = 0) -> tuple[list[int], Reader]:
    """One command: (response handles, reader over the response parameters)."""
    _, r = tpm.command(name, handles, params, sessions)
    got = [r.u32() for _ in range(out_handles)]
    if sessions:
        r = Reader(r.take(r.u32()))
    return got, r


def _flush(tpm: Tpm, handle: int) -> None:
    with contextlib.suppress(TpmCommandError, ValueError, OSError):  # gone already
        tpm.flush(handle)


def _read_pcrs(tpm: Tpm, selection: PcrSelection) -> dict[int, bytes]:
    with _errors("TPM2_PCR_Read"):
        values = tpm.pcr_read(selection.bank, selection.indices)
    if sorted(values) != list(selection.indices):
        raise TpmError(f"TPM2_PCR_Read returned {len(values)} of {len(selection.indices)} "
                       f"PCRs ({selection.bank} bank not allocated?)")
    return values


# --- the TpmClient subset ---------------------------------------------------------------


class RawTpmClient:
    """What the CryptoVM asks of a :class:`~attestation.tpm.TpmClient`, in raw commands.

    Only the ECC AK (persistent at 0x81010002, endorsement hierarchy, created on first
    use) and the RSA EK (0x81010001, certificate at NV 0x01C00002) exist here."""

    def __init__(self, tpm: Tpm) -> None:
        self.tpm = tpm

    def attestation_key(self, algorithm: str = "ecc") -> TpmKey:
        if algorithm != "ecc":
            raise TpmError(f"the raw TPM backend has only the ECC AK, not {algorithm!r}")
        with _errors("the AK"):
            return TpmKey(AK_HANDLE, self.tpm.ensure_ak(), persistent=True)

    def endorsement_key(self, algorithm: str = "rsa") -> EndorsementKey:
        if algorithm != "rsa":
            raise TpmError(f"the raw TPM backend has only the RSA EK, not {algorithm!r}")
        with _errors(f"no EK at persistent handle 0x{EK_HANDLE:08x} (was the TPM "
                     "provisioned with swtpm_setup --create-ek-cert?)"):
            public = self.tpm.read_public(EK_HANDLE)
        try:
            certificate: bytes | None = strip_nv_padding(self.tpm.nv_read(EK_CERT_INDEX))
        except TpmCommandError:  # no certificate index: the registrar will refuse
            certificate = None
        return EndorsementKey("rsa", public, certificate)

    def flush(self, key: TpmKey) -> None:
        """Transient keys only; the AK and EK are persistent (nothing to flush)."""
        if not key.persistent:
            _flush(self.tpm, key.handle)

    def read_pcrs(self, bank: str, indices: list[int] | tuple[int, ...]) -> dict[int, bytes]:
        return _read_pcrs(self.tpm, PcrSelection(bank, tuple(sorted(set(indices)))))

    def quote(self, ak: TpmKey, selection: PcrSelection, qualifying_data: bytes,
              attempts: int = 3) -> QuoteResult:
        """Quote with the AK and the PCR values its pcrDigest covers (re-quoted if a PCR
        changed in between)."""
        if ak.handle != AK_HANDLE:
            raise TpmError("the raw TPM backend quotes with the persistent ECC AK only")
        if len(qualifying_data) > MAX_QUALIFYING_DATA:
            raise TpmError("qualifying data is limited to 64 bytes by the TPM")
        for _ in range(attempts):
            with _errors("TPM2_Quote"):
                attest, signature = self.tpm.quote(qualifying_data, selection.bank,
                                                   selection.indices)
            pcrs = _read_pcrs(self.tpm, selection)
            composite = b"".join(pcrs[i] for i in selection.indices)
            if hashlib.sha256(composite).digest() == quoted_pcr_digest(attest):
                return QuoteResult(attest, signature, selection, pcrs)
        raise TpmError(f"PCRs kept changing during {attempts} quote attempts")

    def activate_credential(self, ak: TpmKey, algorithm: str,
                            challenge: CredentialChallenge) -> bytes:
        """ActivateCredential(AK, RSA EK) with PolicySecret(TPM_RH_ENDORSEMENT)."""
        if ak.handle != AK_HANDLE or algorithm != "rsa":
            raise TpmError("the raw TPM backend activates credentials for the persistent "
                           "ECC AK with the RSA EK only")
        with _errors("TPM2_ActivateCredential"):
            return self.tpm.activate_credential(challenge.credential_blob,
                                                challenge.encrypted_secret)


# --- sealing -----------------------------------------------------------------------------


class RawSealer:
    """:class:`cryptovm.sealing.TpmSealer` in raw commands: seal, unseal, read_pcrs.

    Same templates, same :class:`~cryptovm.sealing.SealedBlob`, same
    :class:`~cryptovm.errors.SealedStorageError` naming the differing PCRs. Every
    transient object and session is flushed, also on errors. No parameter encryption
    (see the module's docstring: the host running swtpm is trusted for the vTPM)."""

    def __init__(self, tpm: Tpm, selection: PcrSelection) -> None:
        self.tpm = tpm
        self.selection = selection

    def seal(self, secret: bytes) -> SealedBlob:
        """Seal ``secret`` to the current PCR values; verified by unsealing once."""
        with self.tpm.lock:
            pcrs = _read_pcrs(self.tpm, self.selection)
            policy = pcr_policy_digest(self.selection, pcrs)
            sensitive = tpm2b(tpm2b(b"") + tpm2b(secret))  # TPM2B_SENSITIVE_CREATE
            with self._primary() as primary, _errors("TPM2_Create of the sealed storage key"):
                _, r = _run(self.tpm, "Create", u32(primary),
                            sensitive + tpm2b(sealed_template(policy)) + tpm2b(b"") + u32(0),
                            sessions=(password_session(),))
                private, public = tpm2b(r.tpm2b()), tpm2b(r.tpm2b())
        blob = SealedBlob(public, private, self.selection, policy, pcrs)
        if self.unseal(blob) != secret:
            raise TpmError("the sealed storage key did not unseal to the same bytes")
        return blob

    def unseal(self, blob: SealedBlob) -> bytes:
        """Unseal; :class:`SealedStorageError` names the differing PCRs on policy failure."""
        with (self.tpm.lock, self._primary() as primary, self._loaded(primary, blob) as sealed,
              self._policy_session() as session):
            with _errors("TPM2_PolicyPCR"):
                _run(self.tpm, "PolicyPCR", u32(session),
                     tpm2b(b"") + tpml_pcr_selection(blob.selection))
            auth = u32(session) + tpm2b(os.urandom(32)) + bytes([SESSION_CONTINUE]) + tpm2b(b"")
            try:
                _, r = _run(self.tpm, "Unseal", u32(sealed), b"", sessions=(auth,))
            except TpmCommandError as exc:
                if exc.rc == RC_WARN_PCR_CHANGED or (
                        exc.rc & 0x80 and exc.rc & 0x3F == RC_POLICY_FAIL):
                    raise pcrs_differ(blob, _read_pcrs(self.tpm, blob.selection)) from None
                raise TpmError(f"TPM2_Unseal failed: {exc}") from None
            with _errors("TPM2_Unseal"):
                return r.tpm2b()

    def read_pcrs(self) -> dict[int, bytes]:
        with self.tpm.lock:
            return _read_pcrs(self.tpm, self.selection)

    @contextmanager
    def _primary(self) -> Iterator[int]:
        """The storage primary, derived from the owner seed; flushed after use."""
        params = tpm2b(tpm2b(b"") + tpm2b(b"")) + tpm2b(storage_primary_template()) \
            + tpm2b(b"") + u32(0)
        with _errors("creating the storage primary"):
            (handle,), _ = _run(self.tpm, "CreatePrimary", u32(RH_OWNER), params,
                                sessions=(password_session(),), out_handles=1)
        try:
            yield handle
        finally:
            _flush(self.tpm, handle)

    @contextmanager
    def _loaded(self, primary: int, blob: SealedBlob) -> Iterator[int]:
        try:
            (handle,), _ = _run(self.tpm, "Load", u32(primary), blob.private + blob.public,
                                sessions=(password_session(),), out_handles=1)
        except (TpmCommandError, ValueError) as exc:
            raise not_loadable(exc) from None
        try:
            yield handle
        finally:
            _flush(self.tpm, handle)

    @contextmanager
    def _policy_session(self) -> Iterator[int]:
        """An unsalted, unbound SHA-256 policy session (no parameter encryption)."""
        params = tpm2b(os.urandom(32)) + tpm2b(b"") + bytes([SE_POLICY]) + u16(ALG_NULL) \
            + u16(ALG_SHA256)
        with _errors("TPM2_StartAuthSession"):
            (session,), _ = _run(self.tpm, "StartAuthSession", u32(RH_NULL) + u32(RH_NULL),
                                 params, out_handles=1)
        try:
            yield session
        finally:
            _flush(self.tpm, session)


# --- the backend ---------------------------------------------------------------------------


class RawTpm:
    """The CryptoVM's TPM over raw commands: :meth:`options` for CryptoVm.initialize/open.

    ``tpm`` may be shared (e.g. with the guest agent in the same process): every use
    holds its ``lock``.
    """

    def __init__(self, tpm: Tpm) -> None:
        self.tpm = tpm

    @classmethod
    def open(cls, spec: str = "/dev/tpmrm0") -> RawTpm:
        """``/dev/tpmrm0`` (in a guest), ``unix:PATH`` or ``tcp:HOST:PORT`` (an swtpm data
        channel)."""
        try:
            return cls(Tpm(open_transport(spec)))
        except (OSError, ValueError) as exc:
            raise TpmError(f"opening the TPM at {spec}: {exc}") from None

    @property
    def name(self) -> str:
        """What the CryptoVM records as its ``tcti``: e.g. ``device:/dev/tpmrm0``."""
        return str(self.tpm.transport.name)

    @contextmanager
    def access(self) -> Iterator[RawTpmClient]:
        """The CryptoVM's ``tpm_access``: the TPM for one use, under its lock."""
        with self.tpm.lock:
            yield RawTpmClient(self.tpm)

    def sealer(self, selection: PcrSelection) -> RawSealer:
        """The CryptoVM's ``sealer_factory``."""
        return RawSealer(self.tpm, selection)

    def options(self) -> dict[str, Any]:
        """``tpm_access`` and ``sealer_factory`` for CryptoVm.initialize/open."""
        return {"tpm_access": self.access, "sealer_factory": self.sealer}

    def close(self) -> None:
        self.tpm.transport.close()

    def __enter__(self) -> RawTpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "RawSealer",
    "RawTpm",
    "RawTpmClient",
    "sealed_template",
    "storage_primary_template",
]
