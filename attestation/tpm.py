"""The attester side: every TPM command this project sends, through tpm2-pytss.

A :class:`TpmClient` talks to one TPM over a TCTI (``swtpm:host=...,port=...``,
``device:/dev/tpmrm0``, ``mssim:...``). swtpm has no resource manager, so every
transient object created here is flushed before the method returns, except keys
handed to the caller (who owns them and must call :meth:`TpmClient.flush`).

Why the AK lives in the endorsement hierarchy: TPM2_Quote obfuscates
resetCount/restartCount for keys outside the endorsement and platform
hierarchies, which would make the verifier's reboot/rollback check meaningless.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HT,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPM2_SU,
)
from tpm2_pytss.types import (
    TPM2B_DATA,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPML_DIGEST,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_TK_HASHCHECK,
    TPMU_HA,
)

from attestation.credential import CredentialChallenge
from attestation.errors import TpmError
from attestation.registrar import AttesterIdentity
from attestation.tpm_raw import strip_nv_padding

# The result types (X as X: re-exported) live in tpm_types, shared with cryptovm/rawtpm.py.
from attestation.tpm_types import EndorsementKey as EndorsementKey
from attestation.tpm_types import KeyAlgorithm as KeyAlgorithm
from attestation.tpm_types import (
    PcrSelection,
    PublicArea,
    QuoteInfo,
    parse_attest,
    parse_public,
    tpm2b,
)
from attestation.tpm_types import QuoteResult as QuoteResult
from attestation.tpm_types import TpmKey as TpmKey

EK_HANDLES: dict[KeyAlgorithm, int] = {"rsa": 0x81010001, "ecc": 0x81010016}
# TCG EK Credential Profile NV indices: low-range RSA 2048, ECC P-256, high-range ECC P-384.
EK_CERT_INDICES: dict[KeyAlgorithm, tuple[int, ...]] = {
    "rsa": (0x01C00002,),
    "ecc": (0x01C00016, 0x01C0000A),
}
PLATFORM_CERT_INDEX = 0x01C08000
AK_HANDLES: dict[KeyAlgorithm, int] = {"ecc": 0x81010002, "rsa": 0x81010003}
PCRS_PER_READ = 8  # TPM2_PCR_Read returns at most 8 digests per call

# noDA: these keys have an empty authValue, so dictionary-attack protection guards
# nothing -- and without it every unorderly TPM restart (a VM killed, swtpm
# stopped) raises the failure counter until the TPM locks the AK out.
AK_ATTRIBUTES = (
    TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
)
SIGNING_KEY_ATTRIBUTES = (
    TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA
)
_HIERARCHIES = {"owner": ESYS_TR.OWNER, "endorsement": ESYS_TR.ENDORSEMENT}
AK_TEMPLATES: dict[KeyAlgorithm, str] = {
    "ecc": "ecc256:ecdsa-sha256:null",
    "rsa": "rsa2048:rsassa-sha256:null",
}


def parse_tcti(tcti: str) -> tuple[str, str]:
    """Split ``name:conf`` (tpm2-tools' TPM2TOOLS_TCTI syntax)."""
    name, _, conf = tcti.partition(":")
    if not name:
        raise TpmError(f"invalid TCTI {tcti!r}: expected NAME[:CONF], e.g. swtpm:port=2321")
    return name, conf


@contextmanager
def _tpm_errors(action: str) -> Iterator[None]:
    try:
        yield
    except TSS2_Exception as exc:
        raise TpmError(f"{action} failed: {exc}") from None


def _public_bytes(public: TPM2B_PUBLIC) -> bytes:
    return bytes(public.marshal())[2:]  # drop the TPM2B size prefix


class TpmClient:
    """One connection to one TPM. Not thread-safe; use one client per thread."""

    def __init__(self, tcti: str) -> None:
        name, conf = parse_tcti(tcti)
        self.tcti = tcti
        with _tpm_errors(f"connecting to TPM via {tcti}"):
            self._tcti = TCTILdr(name, conf)
            self._esapi = ESAPI(self._tcti)
        # Per selection, at most SELECTIONS_KEPT each (a requester chooses the selection):
        # the PCR values last read, and a quote's fixed arguments, built once because
        # building them is most of a quote's Python time, on every handshake's path.
        self._last_pcrs: dict[PcrSelection, dict[int, bytes]] = {}
        self._quote_selections: dict[PcrSelection, Any] = {}
        self._null_scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)

    def close(self) -> None:
        self._esapi.close()
        self._tcti.close()

    @property
    def esapi(self) -> Any:
        """The underlying ``tpm2_pytss.ESAPI`` (read-only), for commands this class does
        not wrap (e.g. the CryptoVM's sealing). Whoever uses it flushes what it creates."""
        return self._esapi

    def __enter__(self) -> TpmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- housekeeping ---------------------------------------------------------------

    def flush(self, key: TpmKey) -> None:
        """Unload a transient key (persistent keys are only released from ESYS)."""
        with _tpm_errors("flushing key"):
            if key.persistent:
                self._esapi.tr_close(key.handle)
            else:
                self._esapi.flush_context(key.handle)

    def transient_handles(self) -> list[int]:
        with _tpm_errors("listing transient handles"):
            _, data = self._esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
        return [int(h) for h in data.data.handles]

    def shutdown(self) -> None:
        """TPM2_Shutdown(CLEAR), what an OS sends before a reboot: an orderly shutdown."""
        with _tpm_errors("TPM2_Shutdown"):
            self._esapi.shutdown(TPM2_SU.CLEAR)

    def random(self, size: int) -> bytes:
        with _tpm_errors("TPM2_GetRandom"):
            return bytes(self._esapi.get_random(size))

    # --- endorsement ----------------------------------------------------------------

    def read_nv(self, index: int, max_size: int = 8192) -> bytes:
        """Read a whole NV index (certificates are larger than one NV_Read chunk)."""
        with _tpm_errors(f"reading NV index 0x{index:08x}"):
            handle = self._esapi.tr_from_tpmpublic(index)
            try:
                nv_public, _ = self._esapi.nv_read_public(handle)
                size = min(int(nv_public.nvPublic.dataSize), max_size)
                data = b""
                while len(data) < size:
                    chunk = self._esapi.nv_read(handle, min(1024, size - len(data)), len(data),
                                                auth_handle=handle)
                    data += bytes(chunk)
            finally:
                self._esapi.tr_close(handle)
        return data

    def _nv_exists(self, index: int) -> bool:
        with _tpm_errors("listing NV indices"):
            _, data = self._esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.NV_INDEX << 24, 256)
        return index in {int(h) for h in data.data.handles}

    def endorsement_key(self, algorithm: KeyAlgorithm = "rsa") -> EndorsementKey:
        """The EK persisted by the manufacturer (swtpm_setup) and its NV certificate."""
        key = self._persistent(EK_HANDLES[algorithm], "EK")
        try:
            public = key.public
        finally:
            self.flush(key)
        cert = None
        for index in EK_CERT_INDICES[algorithm]:
            if self._nv_exists(index):
                cert = strip_nv_padding(self.read_nv(index))
                break
        return EndorsementKey(algorithm, public, cert)

    def platform_certificate(self) -> bytes | None:
        if not self._nv_exists(PLATFORM_CERT_INDEX):
            return None
        return strip_nv_padding(self.read_nv(PLATFORM_CERT_INDEX))

    def _persistent(self, handle: int, what: str) -> TpmKey:
        try:
            esys = self._esapi.tr_from_tpmpublic(handle)
            public, _, _ = self._esapi.read_public(esys)
        except TSS2_Exception as exc:
            raise TpmError(
                f"no {what} at persistent handle 0x{handle:08x} ({exc}); "
                "was the TPM provisioned (swtpm_setup --create-ek-cert)?"
            ) from None
        return TpmKey(esys, _public_bytes(public), persistent=True)

    # --- attestation key -----------------------------------------------------------

    def attestation_key(self, algorithm: KeyAlgorithm = "ecc") -> TpmKey:
        """The AK at its persistent handle, created and persisted on first use."""
        handle = AK_HANDLES[algorithm]
        with _tpm_errors("listing persistent handles"):
            _, data = self._esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HT.PERSISTENT << 24, 64)
        if handle in {int(h) for h in data.data.handles}:
            return self._persistent(handle, "AK")
        template = TPM2B_PUBLIC.parse(AK_TEMPLATES[algorithm], objectAttributes=AK_ATTRIBUTES)
        with _tpm_errors("creating the AK"):
            transient, _, _, _, _ = self._esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT
            )
            try:
                persistent = self._esapi.evict_control(ESYS_TR.OWNER, transient, handle)
            finally:
                self._esapi.flush_context(transient)
            self._esapi.tr_close(persistent)
        return self._persistent(handle, "AK")

    def activate_credential(self, ak: TpmKey, algorithm: KeyAlgorithm,
                            challenge: CredentialChallenge) -> bytes:
        """TPM2_ActivateCredential with the EK, which needs PolicySecret(TPM_RH_ENDORSEMENT)."""
        ek = self._persistent(EK_HANDLES[algorithm], "EK")
        name_alg = TPM2_ALG(int.from_bytes(ek.public[2:4]))
        try:
            with _tpm_errors("TPM2_ActivateCredential"):
                session = self._esapi.start_auth_session(
                    ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                    TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), name_alg,
                )
                try:
                    self._satisfy_ek_policy(session, parse_public(ek.public))
                    secret = self._esapi.activate_credential(
                        ak.handle, ek.handle,
                        TPM2B_ID_OBJECT.unmarshal(tpm2b(challenge.credential_blob))[0],
                        TPM2B_ENCRYPTED_SECRET.unmarshal(tpm2b(challenge.encrypted_secret))[0],
                        session1=ESYS_TR.PASSWORD, session2=session,
                    )
                finally:
                    self._esapi.flush_context(session)
        finally:
            self.flush(ek)
        return bytes(secret)

    def _satisfy_ek_policy(self, session: Any, ek: PublicArea) -> None:
        """PolicySecret(TPM_RH_ENDORSEMENT), plus PolicyOR for high-range EK templates."""
        self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
        branches = ek_policy_or_branches(ek)
        if branches is not None:
            self._esapi.policy_or(session, TPML_DIGEST(list(branches)))

    # --- PCRs and quotes -------------------------------------------------------------

    def read_pcrs(self, bank: str, indices: Iterable[int]) -> dict[int, bytes]:
        wanted = sorted(set(indices))
        values: dict[int, bytes] = {}
        for start in range(0, len(wanted), PCRS_PER_READ):
            chunk = wanted[start : start + PCRS_PER_READ]
            spec = f"{bank}:{','.join(map(str, chunk))}"
            with _tpm_errors("TPM2_PCR_Read"):
                _, selection, digests = self._esapi.pcr_read(TPML_PCR_SELECTION.parse(spec))
            got = _selected(selection)
            values.update(zip(got, (bytes(d) for d in digests), strict=True))
        return values

    def extend_pcr(self, index: int, digests: dict[str, bytes]) -> None:
        """TPM2_PCR_Extend of one event's digests (one per bank) into ``index``."""
        values = TPML_DIGEST_VALUES([
            TPMT_HA(hashAlg=TPM2_ALG.parse(bank), digest=TPMU_HA(**{bank: digest}))
            for bank, digest in digests.items()
        ])
        with _tpm_errors(f"TPM2_PCR_Extend of PCR {index}"):
            self._esapi.pcr_extend(ESYS_TR.parse(f"pcr{index}"), values)

    def reset_pcr(self, index: int) -> None:
        """TPM2_PCR_Reset: only the debug/application PCRs (16, 23) allow it at locality 0."""
        with _tpm_errors(f"TPM2_PCR_Reset of PCR {index}"):
            self._esapi.pcr_reset(ESYS_TR.parse(f"pcr{index}"))

    def quote(self, ak: TpmKey, selection: PcrSelection, qualifying_data: bytes,
              attempts: int = 3) -> QuoteResult:
        """Quote, and report the PCR values the quote's pcrDigest covers.

        The values are re-read only when the signed digest no longer matches the
        ones this client saw last for this selection (reading 9+ PCRs costs two
        TPM round trips, more than the quote); so they are always exactly what
        was signed. Retries if a PCR changed between quote and read.
        """
        if len(qualifying_data) > 64:
            raise TpmError("qualifying data is limited to 64 bytes by the TPM")
        pcr_selection = self._quote_selections.get(selection)
        if pcr_selection is None:
            spec = f"{selection.bank}:{','.join(map(str, selection.indices))}"
            pcr_selection = TPML_PCR_SELECTION.parse(spec)
            _keep(self._quote_selections, selection, pcr_selection)
        for _ in range(attempts):
            with _tpm_errors("TPM2_Quote"):
                attest, signature = self._esapi.quote(
                    ak.handle, pcr_selection, TPM2B_DATA(qualifying_data), self._null_scheme)
            attest_bytes = bytes(attest.marshal())[2:]
            pcrs = self._last_pcrs.get(selection)
            if pcrs is None or not _pcr_digest_matches(attest_bytes, selection, pcrs):
                pcrs = self.read_pcrs(selection.bank, selection.indices)
                if not _pcr_digest_matches(attest_bytes, selection, pcrs):
                    continue  # a PCR changed between the quote and the read
                _keep(self._last_pcrs, selection, pcrs)
            return QuoteResult(attest_bytes, bytes(signature.marshal()), selection, dict(pcrs))
        raise TpmError(f"PCRs kept changing during {attempts} quote attempts")

    # --- TPM-resident keys -----------------------------------------------------------

    def create_signing_key(self, algorithm: KeyAlgorithm = "ecc", *,
                           hierarchy: str = "owner") -> TpmKey:
        """A fresh non-restricted signing key generated in the TPM (fixedTPM).

        A primary key with a random ``unique`` field: generated by the TPM, never
        exportable, and distinct from every other key on each call. ``hierarchy``:
        "owner", or "endorsement" (the AK's, for keys the AK certifies as its own).
        """
        template = TPM2B_PUBLIC.parse(
            AK_TEMPLATES[algorithm].replace(":null", ""), objectAttributes=SIGNING_KEY_ATTRIBUTES
        )
        if algorithm == "ecc":
            template.publicArea.unique.ecc.x = os.urandom(32)
        else:
            template.publicArea.unique.rsa = os.urandom(256)
        with _tpm_errors("creating a signing key"):
            handle, public, _, _, _ = self._esapi.create_primary(
                TPM2B_SENSITIVE_CREATE(), template, _HIERARCHIES[hierarchy]
            )
        return TpmKey(handle, _public_bytes(public), persistent=False)

    def certify(self, key: TpmKey, ak: TpmKey, qualifying_data: bytes) -> tuple[bytes, bytes]:
        """TPM2_Certify of ``key`` by ``ak``: (TPMS_ATTEST, TPMT_SIGNATURE)."""
        with _tpm_errors("TPM2_Certify"):
            attest, signature = self._esapi.certify(
                key.handle, ak.handle, TPM2B_DATA(qualifying_data),
                TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD,
            )
        return bytes(attest.marshal())[2:], bytes(signature.marshal())

    def sign_digest(self, key: TpmKey, digest: bytes) -> bytes:
        """TPM2_Sign of a digest with a non-restricted key: a TPMT_SIGNATURE."""
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        with _tpm_errors("TPM2_Sign"):
            signature = self._esapi.sign(key.handle, digest, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                                         ticket)
        return bytes(signature.marshal())


# TCG EK Credential Profile 2.3, table 17: PolicyC (PolicyAuthorizeNV branch) per hash.
_EK_POLICY_C = {
    "sha384": bytes.fromhex(
        "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5"
        "b4947c2d73e63005eed2dc2b3593d165"
    ),
}
TPM_CC_POLICY_SECRET = 0x151
TPM_CC_POLICY_OR = 0x171


class LocalAttester:
    """A TPM reached in-process, as the attester side of registration
    (:class:`~attestation.registrar.Attester`): its EK certificate, its persistent AK."""

    def __init__(self, client: TpmClient, *, ek_algorithm: KeyAlgorithm = "rsa",
                 ak_algorithm: KeyAlgorithm = "ecc") -> None:
        self._client = client
        self._ek_algorithm: KeyAlgorithm = ek_algorithm
        self._ak_algorithm: KeyAlgorithm = ak_algorithm

    def identity(self) -> AttesterIdentity:
        ek = self._client.endorsement_key(self._ek_algorithm)
        if ek.certificate is None:
            raise TpmError(f"the TPM has no {self._ek_algorithm.upper()} EK certificate; "
                           "was it provisioned (swtpm_setup --create-ek-cert)?")
        ak = self._client.attestation_key(self._ak_algorithm)
        self._client.flush(ak)
        return AttesterIdentity(ek.certificate, ek.public, ak.public)

    def activate(self, challenge: CredentialChallenge) -> bytes:
        ak = self._client.attestation_key(self._ak_algorithm)
        try:
            return self._client.activate_credential(ak, self._ek_algorithm, challenge)
        finally:
            self._client.flush(ak)


def ek_policy_or_branches(ek: PublicArea) -> tuple[bytes, bytes] | None:
    """The PolicyOR branch list of a high-range EK template, or None for low-range EKs.

    Derived, then checked against the EK's own authPolicy, so an unknown template
    fails with a clear error instead of a TPM policy failure.
    """
    h = ek.name_hash
    policy_a = hashlib.new(h, bytes(hashlib.new(h).digest_size)
                           + TPM_CC_POLICY_SECRET.to_bytes(4) + TPM2_RH.ENDORSEMENT.to_bytes(4)
                           ).digest()
    policy_a = hashlib.new(h, policy_a).digest()  # empty policyRef
    if ek.auth_policy == policy_a:
        return None
    policy_c = _EK_POLICY_C.get(h)
    if policy_c is not None:
        zeros = bytes(hashlib.new(h).digest_size)
        combined = hashlib.new(h, zeros + TPM_CC_POLICY_OR.to_bytes(4) + policy_a + policy_c)
        if combined.digest() == ek.auth_policy:
            return (policy_a, policy_c)
    raise TpmError(f"unsupported EK authPolicy {ek.auth_policy.hex()} ({h} EK template)")


def _selected(selection: TPML_PCR_SELECTION) -> list[int]:
    indices = []
    for sel in selection:
        bitmap = bytes(sel.pcrSelect)[: sel.sizeofSelect]
        indices += [i * 8 + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1]
    return indices


SELECTIONS_KEPT = 16  # a node quotes one or two selections; a hostile requester, many
K = TypeVar("K")
V = TypeVar("V")


def _keep(kept: dict[K, V], key: K, value: V) -> None:
    """``kept[key] = value``, the oldest entry dropped past SELECTIONS_KEPT."""
    kept.pop(key, None)
    if len(kept) >= SELECTIONS_KEPT:
        del kept[next(iter(kept))]
    kept[key] = value


def _pcr_digest_matches(attest: bytes, selection: PcrSelection, pcrs: dict[int, bytes]) -> bool:
    info = parse_attest(attest).attested
    if not isinstance(info, QuoteInfo):
        return False
    hash_name = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}[len(info.pcr_digest)]
    composite = b"".join(pcrs[i] for i in selection.indices)
    return hashlib.new(hash_name, composite).digest() == info.pcr_digest
