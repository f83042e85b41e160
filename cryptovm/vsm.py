"""The virtual security module: keys, accounts, records, audit, attestation.

:class:`CryptoVm` owns a state directory and the TPM the storage key is sealed to.
Callers act through a :class:`VsmSession` bound to one authenticated account (PSK,
client certificate, or :meth:`CryptoVm.local_root` for the host's administrator).
Every session method checks the account's privileges and the key's usage flags,
runs, and appends one audit entry - allowed or denied - before it returns.

Results are JSON-able dicts (bytes stay bytes; the wire codec encodes them), so the
same methods serve in-process callers, the server and the admin functions.

Durability: a key version, account change or record is durable on disk before the
audit entry is appended, and the audit entry is durable before the caller gets the
answer (fsync per call here; the server group-commits, see server.py).
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation.credential import CredentialChallenge
from attestation.errors import EvidenceFormatError, VerificationError
from attestation.evidence import Evidence
from attestation.files import atomic_write
from attestation.tpm_types import PcrSelection
from attestation.verifier import ClockHistory
from cryptovm import operations as ops
from cryptovm import tlsca, wrapping
from cryptovm.accounts import ROOT, Account, AccountBook
from cryptovm.audit import AuditLog, AuditReport, verify_audit_log
from cryptovm.encoding import canonical_json, check_name
from cryptovm.errors import (
    AccessDenied,
    AlreadyExists,
    AuthenticationFailed,
    BadRequest,
    KeyUsageError,
    NotFound,
    ReleaseDenied,
)
from cryptovm.keyattest import MAX_NONCE, KeyAttestation, key_attestation_data
from cryptovm.keystore import (
    KeyAttributes,
    KeyStore,
    KeyVersion,
    StateCipher,
    generate_secret,
    load_secret,
    make_version,
    secret_bytes,
)
from cryptovm.network import STATE_NAME as NETWORK_STATE
from cryptovm.network import NetworkRegistry, parse_join
from cryptovm.release import (
    NonceBook,
    ReleasePolicy,
    check_requester,
    decode_evidence,
    release_context,
)
from cryptovm.sealing import (
    STORAGE_KEY_SIZE,
    Sealer,
    SealerFactory,
    TpmAccess,
    TpmSealer,
    connect_tpm,
    format_pcr_selection,
    parse_pcr_selection,
)
from cryptovm.state import MAX_RECORD, StateDir
from cryptovm.tlsissuer import (
    DEFAULT_VALIDITY_S,
    TLS_CA_KEY,
    IssuingCa,
    ca_certificate,
    certificate_info,
    load_csr,
    node_certificate,
)

if TYPE_CHECKING:  # tpm2-pytss: absent in a Debian 12 guest (see cryptovm/rawtpm.py)
    from attestation.tpm import TpmClient

R = TypeVar("R")
DEFAULT_PCRS = "sha256:0-9"
NODE_ACCOUNT_PREFIX = "node."
TLS_ISSUER = "tls-issuer"
SERVICE_ACCOUNT = "-"
RESERVED_ACCOUNTS = (NODE_ACCOUNT_PREFIX, TLS_ISSUER)
NODE_PRIVILEGES = ("tls:enroll", f"key:{TLS_CA_KEY}:public", f"key:{TLS_CA_KEY}:attest")
"""What an attested node may do from the start: enroll for a TLS certificate for its own
name, read the TLS CA's public key, and have that key attested."""
MAX_RANDOM = 65536
RecipientPolicy = Callable[[bytes, Evidence | None], object]
"""Decides whether a key may be exported to a recipient: called with the recipient's
SPKI DER and its evidence; raises (VerificationError or AccessDenied) to refuse."""


def deny_all_recipients(recipient_spki: bytes, evidence: Evidence | None) -> None:
    raise AccessDenied("recipient_policy", "this CryptoVM has no recipient policy: exports "
                       "are disabled")


def import_context(algorithm: str, usage: Sequence[str], exportable: bool) -> bytes:
    """Envelope context of an imported key: binds the attributes the tenant intended."""
    return b"cryptovm-import/v1\x00" + canonical_json(
        {"algorithm": algorithm, "usage": sorted(set(usage)), "exportable": exportable})


def export_context(meta: dict[str, Any]) -> bytes:
    return b"cryptovm-export/v1\x00" + canonical_json(meta)


def key_info(kv: KeyVersion) -> dict[str, Any]:
    info = kv.meta()
    info["public_key"] = None if isinstance(kv.secret, bytes) else kv.public
    return info


def _sealer(tcti: str, selection: PcrSelection, options: dict[str, Any]) -> Sealer:
    factory: SealerFactory | None = options.get("sealer_factory")
    if factory is not None:
        return factory(selection)
    return TpmSealer(tcti, selection, tpm_access=options.get("tpm_access"))


class CryptoVm:
    """One CryptoVM: an unsealed state directory. Use :meth:`initialize` or :meth:`open`."""

    def __init__(self, state: StateDir, tcti: str, cipher: StateCipher,
                 selection: PcrSelection, *, event_log: bytes | None = None,
                 recipient_policy: RecipientPolicy = deny_all_recipients,
                 audit_sync_each: bool = True, nonce_ttl: float = 60.0,
                 tpm_access: TpmAccess | None = None,
                 sealer_factory: SealerFactory | None = None) -> None:
        self.state = state
        self.tcti = tcti
        self._tpm_access = tpm_access or connect_tpm(tcti)
        self.sealer_factory = sealer_factory
        self.selection = selection
        self.event_log = event_log
        self.recipient_policy = recipient_policy
        self._cipher = cipher
        self._config_lock = threading.RLock()
        self._tpm_lock = threading.Lock()
        self._identity: dict[str, Any] | None = None
        config = state.read_config(cipher)
        self.accounts = AccountBook.from_doc(config["accounts"])
        self.ca = tlsca.CertificateAuthority.load(config["ca"]["cert"].encode(),
                                                  bytes.fromhex(config["ca"]["key"]))
        self.release_policies = {d["name"]: ReleasePolicy.from_doc(d)
                                 for d in config["release_policies"]}
        self.tls_ca = IssuingCa.from_doc(config.get("tls_ca"))
        self.keys = KeyStore(state.keys, cipher)
        self.keys.load()
        self.network = NetworkRegistry(state.path / NETWORK_STATE, cipher)
        self.audit = AuditLog(state.audit, cipher.audit_key, sync_each=audit_sync_each)
        self.nonces = NonceBook(nonce_ttl)
        self.clock_history = ClockHistory()

    def __repr__(self) -> str:
        return f"CryptoVm({str(self.state.path)!r}, {len(self.keys.ids())} keys)"

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    def initialize(cls, state_dir: Path, tcti: str, *, pcrs: str = DEFAULT_PCRS,
                   **options: Any) -> tuple[CryptoVm, bytes]:
        """Create a new CryptoVM; returns it and the root account's PSK (shown once).

        ``options`` go to the constructor; ``tpm_access`` (see :data:`TpmAccess`) is also
        what sealing uses, unless ``sealer_factory`` (see :data:`SealerFactory`) makes the
        sealer. Without tpm2-pytss (a Debian 12 guest), pass both from the raw backend:
        ``**RawTpm.open("/dev/tpmrm0").options()`` (cryptovm/rawtpm.py)."""
        state = StateDir(state_dir)
        state.lock()
        try:
            if state.initialized():
                raise AlreadyExists(f"{state.path} already holds a CryptoVM")
            state.prepare()
            selection = parse_pcr_selection(pcrs)
            storage_key = os.urandom(STORAGE_KEY_SIZE)
            sealer = _sealer(tcti, selection, options)
            state.write_sealed(sealer.seal(storage_key))
            cipher = StateCipher(storage_key)
            book, root_psk = AccountBook.with_root()
            ca = tlsca.make_ca(os.urandom(4).hex())
            atomic_write(state.ca_pem, ca.pem)
            state.write_config(cipher, _config_doc(book, ca, {}, None))
            state.write_manifest(format_pcr_selection(selection))  # last: marks init complete
            vm = cls(state, tcti, cipher, selection, **options)
        except BaseException:
            state.unlock()
            raise
        vm.audit.append(ROOT, "init", "ok", detail=f"sealed to {format_pcr_selection(selection)}")
        vm.audit.sync()
        return vm, root_psk

    @classmethod
    def open(cls, state_dir: Path, tcti: str, **options: Any) -> CryptoVm:
        """Unseal the storage key with the TPM and load every key into memory."""
        state = StateDir(state_dir)
        state.lock()
        try:
            state.read_manifest()
            state.prepare()
            blob = state.read_sealed()
            sealer = _sealer(tcti, blob.selection, options)
            cipher = StateCipher(sealer.unseal(blob))
            vm = cls(state, tcti, cipher, blob.selection, **options)
        except BaseException:
            state.unlock()
            raise
        vm.audit.append("cryptovm", "open", "ok",
                        detail=f"{sum(len(vm.keys.versions(k)) for k in vm.keys.ids())} "
                        "key versions loaded")
        vm.audit.sync()
        return vm

    def close(self) -> None:
        self.audit.close()
        self.state.unlock()

    def __enter__(self) -> CryptoVm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- authentication -------------------------------------------------------------------

    def login(self, account: str, psk: bytes) -> VsmSession:
        """In-process PSK login (constant-time comparison)."""
        try:
            found = self.accounts.get(account)
        except NotFound:
            found = None
        ok = hmac.compare_digest(found.psk if found else bytes(32), psk) and found is not None
        return self._logged_in(account, ok, found, "psk")

    def authenticate(self, account: str, challenge: bytes, client_nonce: bytes,
                     proof: bytes) -> VsmSession:
        """The wire protocol's PSK challenge-response (see wire.py)."""
        try:
            found = self.accounts.authenticate_psk(account, challenge, client_nonce, proof)
        except AuthenticationFailed as exc:
            self._audit_failure(account, "auth", exc, target="psk")
            raise
        return self._logged_in(account, True, found, "psk")

    def authenticate_certificate(self, cert_der: bytes) -> VsmSession:
        fingerprint = tlsca.fingerprint(cert_der)
        try:
            account = self.accounts.by_certificate(fingerprint)
        except AuthenticationFailed as exc:
            self._audit_failure("-", "auth", exc, target=f"cert:{fingerprint[:16]}")
            raise
        return self._logged_in(account.name, True, account, "certificate")

    def local_root(self) -> VsmSession:
        """The host administrator (who holds the TPM and the state directory) as root."""
        return VsmSession(self, ROOT)

    def _logged_in(self, name: str, ok: bool, account: Account | None, via: str) -> VsmSession:
        if not ok or account is None:
            exc = AuthenticationFailed(f"unknown account or wrong PSK for {name[:64]!r}")
            self._audit_failure(name, "auth", exc, target=via)
            raise exc
        if not account.enabled:
            exc = AuthenticationFailed(f"account {name!r} is disabled")
            self._audit_failure(name, "auth", exc, target=via)
            raise exc
        self.audit.append(name, "auth", "ok", target=via)
        return VsmSession(self, name)

    # --- shared internals -----------------------------------------------------------------

    def _audit_failure(self, account: str, op: str, exc: BaseException, *,
                       key: str | None = None, version: int | None = None,
                       target: str | None = None) -> None:
        outcome, check = ("denied", exc.check) if isinstance(exc, AccessDenied) else ("error",
                                                                                        None)
        detail = f"{type(exc).__name__}: {exc}"
        if op == "auth":  # the peer has no account (yet): rate-limited, see audit.py
            self.audit.append_unauthenticated(account, op, outcome, check=check,
                                              detail=detail, target=target)
            return
        self.audit.append(account, op, outcome, key=key, version=version, check=check,
                          detail=detail, target=target)

    def save_config(self, book: AccountBook | None = None,
                    policies: dict[str, ReleasePolicy] | None = None,
                    tls_ca: IssuingCa | None = None) -> None:
        """Persist (durably) and then publish new accounts, release policies, TLS CA."""
        with self._config_lock:
            book = book if book is not None else self.accounts
            policies = policies if policies is not None else self.release_policies
            tls_ca = tls_ca if tls_ca is not None else self.tls_ca
            self.state.write_config(self._cipher, _config_doc(book, self.ca, policies, tls_ca))
            self.accounts, self.release_policies, self.tls_ca = book, policies, tls_ca

    # --- attested testbed nodes -----------------------------------------------------------

    def attested_session(self, node: str, via: str = "trusted-passages") -> VsmSession:
        """The session of a testbed node whose attestation the caller has verified.

        The node acts as the guest account ``node.<name>``, created here on its first
        attested contact with :data:`NODE_PRIVILEGES` (root may grant, revoke or disable
        it like any account); its PSK is random and never shown, so the account is
        reachable only through attestation.
        """
        name = node_account(node)
        with self._config_lock:
            if name not in self.accounts.names():
                book = self.accounts.copy()
                book.create(name, NODE_PRIVILEGES)
                self.save_config(book=book)
                self.audit.append("cryptovm", "account_create", "ok", target=name,
                                  detail=f"attested testbed node {node}: "
                                         f"{' '.join(NODE_PRIVILEGES)}")
        account = self.accounts.get(name)
        session = self._logged_in(name, True, account, f"attested:{via}")
        return VsmSession(self, session.account, attested_node=node)

    def audit_attestation_failure(self, node: str | None, check: str, reason: str) -> None:
        """Record a refused attested channel (the peer never got a session)."""
        account = SERVICE_ACCOUNT
        if node:
            try:
                account = node_account(node)
            except BadRequest:  # the claim is the peer's, and not even a valid name
                reason = f"claimed node {node[:64]!r}: {reason}"
        self._audit_failure(account, "auth", AccessDenied(check, reason),
                            target="attested:trusted-passages")

    @contextmanager
    def tpm(self) -> Iterator[TpmClient]:
        """One TPM use at a time (swtpm serves one client), through the TPM access.

        The AK is persistent: there is nothing to flush after using it, and its ESYS
        handle is left open on purpose - ESYS hands out one object per TPM handle, so
        closing it would also close the handle a shared connection's owner holds (a
        testbed node's own AK). A short-lived connection frees it when it closes."""
        with self._tpm_lock, self._tpm_access() as client:
            yield client

    def quote(self, qualifying_data: bytes) -> Evidence:
        with self.tpm() as client:
            ak = client.attestation_key("ecc")
            q = client.quote(ak, self.selection, qualifying_data)
        return Evidence(attest=q.attest, signature=q.signature, ak_public=ak.public,
                        pcr_bank=self.selection.bank, pcrs=q.pcrs, event_log=self.event_log)

    def identity(self) -> dict[str, Any]:
        """The TPM identity a registrar needs to activate this CryptoVM's AK."""
        if self._identity is None:
            with self.tpm() as client:
                ak = client.attestation_key("ecc")
                ek = client.endorsement_key("rsa")
            self._identity = {"ak_public": ak.public, "ek_public": ek.public,
                              "ek_certificate": ek.certificate, "ek_algorithm": "rsa",
                              "pcr_selection": format_pcr_selection(self.selection)}
        return dict(self._identity)

    def verify_audit(self) -> AuditReport:
        self.audit.sync()
        return verify_audit_log(self.audit.path, self._cipher.audit_key, self.audit.head)

    @property
    def audit_key(self) -> bytes:
        return self._cipher.audit_key

    @property
    def cipher(self) -> StateCipher:
        return self._cipher


def node_account(node: str) -> str:
    """The VSM account of an attested testbed node."""
    return f"{NODE_ACCOUNT_PREFIX}{check_name(node, 'node name')}"


def _config_doc(book: AccountBook, ca: tlsca.CertificateAuthority,
                policies: dict[str, ReleasePolicy], tls_ca: IssuingCa | None) -> dict[str, Any]:
    return {"accounts": book.to_doc(),
            "ca": {"cert": ca.pem.decode(), "key": ca.key_der().hex()},
            "release_policies": [p.to_doc() for _, p in sorted(policies.items())],
            "tls_ca": tls_ca.to_doc() if tls_ca is not None else None}


def _need_usage(kv: KeyVersion, usage: str) -> None:
    if usage not in kv.attributes.usage:
        raise KeyUsageError("usage", f"key {kv.key_id!r} may only be used for "
                            f"{'/'.join(kv.attributes.usage)}, not {usage}")


def _as_evidence(evidence: Evidence | bytes | None) -> Evidence | None:
    if evidence is None or isinstance(evidence, Evidence):
        return evidence
    try:
        return Evidence.from_json(evidence)
    except EvidenceFormatError as exc:
        raise BadRequest(f"evidence is malformed: {exc}") from None


class VsmSession:
    """The operations of one authenticated account."""

    def __init__(self, vm: CryptoVm, account: str, *, attested_node: str | None = None
                 ) -> None:
        self._vm = vm
        self.account = account
        # Set only by CryptoVm.attested_session: the node name an attestation proved.
        self.attested_node = attested_node

    def __repr__(self) -> str:
        return f"VsmSession(account={self.account!r})"

    # --- guards ---------------------------------------------------------------------------

    def _current(self) -> Account:
        """The account as it is now: deleted or disabled accounts lose their sessions."""
        try:
            account = self._vm.accounts.get(self.account)
        except NotFound:
            raise AuthenticationFailed(f"account {self.account!r} no longer exists") from None
        if not account.enabled:
            raise AuthenticationFailed(f"account {self.account!r} is disabled")
        return account

    def _require(self, privilege: str) -> Account:
        account = self._current()
        if not account.allows(privilege):
            raise AccessDenied("privilege", f"account {account.name!r} lacks {privilege}")
        return account

    def _require_root(self, what: str) -> Account:
        account = self._current()
        if not account.is_root:
            raise AccessDenied("privilege", f"only root may {what}")
        return account

    def _op(self, op: str, action: Callable[[], R], *, key: str | None = None,
            target: str | None = None) -> R:
        """Run a non-key operation; audit its outcome."""
        try:
            result = action()
        except Exception as exc:
            self._vm._audit_failure(self.account, op, exc, key=key, target=target)
            raise
        version = result.get("version") if isinstance(result, dict) else None
        self._vm.audit.append(self.account, op, "ok", key=key, target=target,
                              version=version if isinstance(version, int) else None)
        return result

    def _key_op(self, op: str, key_id: str, version: int | None,
                action: Callable[[KeyVersion], dict[str, Any]]) -> dict[str, Any]:
        """Authorize ``op`` on a key (privilege or ownership), run, audit."""
        try:
            check_name(key_id, "key id")
            kv = self._authorize_key(op, key_id, version)
            result = action(kv)
        except Exception as exc:
            self._vm._audit_failure(self.account, op, exc, key=key_id, version=version)
            raise
        self._vm.audit.append(self.account, op, "ok", key=key_id,
                              version=result.get("version", kv.version))
        return result

    def _authorize_key(self, op: str, key_id: str, version: int | None) -> KeyVersion:
        account = self._current()
        store = self._vm.keys
        if not account.allows(f"key:{key_id}:{op}") and not (
                store.exists(key_id) and store.get(key_id).attributes.owner == account.name):
            # Same answer whether or not the key exists: ids are not probed this way.
            raise AccessDenied("privilege", f"account {account.name!r} lacks key:{key_id}:{op}")
        return store.get(key_id, version)

    # --- basics ---------------------------------------------------------------------------

    def ping(self) -> dict[str, Any]:
        return {"account": self.account}

    def random(self, n: int) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            self._current()
            if not 0 < n <= MAX_RANDOM:
                raise BadRequest(f"n must be within 1..{MAX_RANDOM}")
            return {"random": os.urandom(n)}
        return self._op("random", action)

    def whoami(self) -> dict[str, Any]:
        return self._op("whoami", lambda: self._current().describe())

    # --- key lifecycle --------------------------------------------------------------------

    def generate(self, algorithm: str, usage: Sequence[str], *, exportable: bool = False,
                 key_id: str | None = None, release_policy: str | None = None,
                 release_node: str | None = None) -> dict[str, Any]:
        """Generate a key inside the VSM; returns once it is durable."""
        new_id = key_id or f"k{os.urandom(8).hex()}"

        def action() -> dict[str, Any]:
            account = self._require("keys:generate")
            if release_policy is not None and release_policy not in self._vm.release_policies:
                raise NotFound(f"no release policy {release_policy!r}")
            attributes = KeyAttributes(new_id, algorithm, tuple(usage),  # type: ignore[arg-type]
                                       bool(exportable), account.name, release_policy,
                                       release_node)
            if self._vm.keys.exists(new_id):
                raise AlreadyExists(f"key {new_id!r} exists")
            secret = generate_secret(attributes.algorithm)
            return self._store_new(make_version(attributes, 1, "generated", secret), secret)
        return self._op("generate", action, key=new_id)

    def _store_new(self, kv: KeyVersion, secret: Any) -> dict[str, Any]:
        with self._vm.keys.lock:
            if kv.version == 1 and self._vm.keys.exists(kv.key_id):
                raise AlreadyExists(f"key {kv.key_id!r} exists")
            self._vm.keys.put(kv, secret_bytes(secret))
        return key_info(kv)

    def rotate(self, key_id: str) -> dict[str, Any]:
        """A new version, generated inside, becomes primary; old versions stay usable."""
        def action(kv: KeyVersion) -> dict[str, Any]:
            with self._vm.keys.lock:
                primary = self._vm.keys.get(key_id)
                secret = generate_secret(primary.attributes.algorithm)
                new = make_version(primary.attributes, primary.version + 1, "generated", secret)
                return self._store_new(new, secret)
        return self._key_op("rotate", key_id, None, action)

    def delete(self, key_id: str) -> dict[str, Any]:
        def action(kv: KeyVersion) -> dict[str, Any]:
            return {"key_id": key_id, "versions_deleted": self._vm.keys.delete(key_id),
                    "version": kv.version}
        return self._key_op("delete", key_id, None, action)

    def list_keys(self) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            account = self._current()
            everything = account.allows("keys:list")
            keys = []
            for key_id in self._vm.keys.ids():
                kv = self._vm.keys.get(key_id)
                if everything or kv.attributes.owner == account.name or any(
                        account.allows(f"key:{key_id}:{op}") for op in ("public", "sign",
                                                                        "decrypt", "encrypt")):
                    keys.append(key_info(kv) | {"versions": len(self._vm.keys.versions(key_id))})
            return {"keys": keys}
        return self._op("list_keys", action)

    def describe(self, key_id: str) -> dict[str, Any]:
        def action(kv: KeyVersion) -> dict[str, Any]:
            return key_info(kv) | {"versions": [v.version for v in
                                                self._vm.keys.versions(key_id)]}
        return self._key_op("public", key_id, None, action)

    def public_key(self, key_id: str, version: int | None = None) -> dict[str, Any]:
        def action(kv: KeyVersion) -> dict[str, Any]:
            if isinstance(kv.secret, bytes):
                raise BadRequest(f"key {key_id!r} is symmetric: it has no public key")
            return {"public_key": kv.public, "version": kv.version,
                    "algorithm": kv.attributes.algorithm}
        return self._key_op("public", key_id, version, action)

    # --- cryptographic operations ---------------------------------------------------------

    def sign(self, key_id: str, data: bytes, *, algorithm: str | None = None,
             prehashed: bool = False) -> dict[str, Any]:
        """Sign with the primary version."""
        def action(kv: KeyVersion) -> dict[str, Any]:
            _need_usage(kv, "sign")
            signature, used = ops.sign(kv, data, algorithm, prehashed)
            return {"signature": signature, "algorithm": used, "version": kv.version}
        return self._key_op("sign", key_id, None, action)

    def verify(self, key_id: str, data: bytes, signature: bytes, *,
               algorithm: str | None = None, prehashed: bool = False,
               version: int | None = None) -> dict[str, Any]:
        """Verify with one version, or with any version (newest first)."""
        def action(kv: KeyVersion) -> dict[str, Any]:
            _need_usage(kv, "sign")
            candidates = [kv] if version is not None else reversed(self._vm.keys.versions(key_id))
            for candidate in candidates:
                if ops.verify(candidate, data, signature, algorithm, prehashed):
                    return {"valid": True, "version": candidate.version}
            return {"valid": False, "version": kv.version}
        return self._key_op("verify", key_id, version, action)

    def decrypt(self, key_id: str, ciphertext: bytes, *, padding: str | None = None,
                aad: bytes = b"", version: int | None = None) -> dict[str, Any]:
        """RSA decryption (OAEP, PKCS#1 v1.5, TLS pre-master) or AES-GCM decryption."""
        def action(kv: KeyVersion) -> dict[str, Any]:
            if kv.attributes.release_policy is not None:
                raise KeyUsageError("release_policy", f"key {key_id!r} is released only "
                                    "through attestation-gated release_decrypt")
            return self._decrypt(kv, ciphertext, padding, aad)
        return self._key_op("decrypt", key_id, version, action)

    def _decrypt(self, kv: KeyVersion, ciphertext: bytes, padding: str | None,
                 aad: bytes) -> dict[str, Any]:
        if kv.aead is not None:
            _need_usage(kv, "encrypt")
            kv = self._vm.keys.get(kv.key_id, ops.aes_ciphertext_version(ciphertext))
            return {"plaintext": ops.aes_decrypt(kv, ciphertext, aad), "version": kv.version}
        _need_usage(kv, "decrypt")
        return {"plaintext": ops.rsa_decrypt(kv, ciphertext, padding), "version": kv.version}

    def encrypt(self, key_id: str, plaintext: bytes, *, aad: bytes = b"") -> dict[str, Any]:
        """AES-256-GCM with the primary version (RSA encryption needs no VSM)."""
        def action(kv: KeyVersion) -> dict[str, Any]:
            _need_usage(kv, "encrypt")
            if kv.aead is None:
                raise BadRequest(f"key {key_id!r} is not symmetric: encrypt to its public key")
            return {"ciphertext": ops.aes_encrypt(kv, plaintext, aad), "version": kv.version}
        return self._key_op("encrypt", key_id, None, action)

    def derive(self, key_id: str, peer_public_key: bytes, *,
               version: int | None = None) -> dict[str, Any]:
        def action(kv: KeyVersion) -> dict[str, Any]:
            _need_usage(kv, "derive")
            return {"shared_secret": ops.derive(kv, peer_public_key), "version": kv.version}
        return self._key_op("derive", key_id, version, action)

    # --- export and import ----------------------------------------------------------------

    def export(self, key_id: str, recipient_public_key: bytes, *, scheme: str,
               evidence: Evidence | bytes | None = None,
               version: int | None = None) -> dict[str, Any]:
        """Export a key version wrapped to a recipient the recipient policy accepts."""
        def action(kv: KeyVersion) -> dict[str, Any]:
            if not kv.attributes.exportable:
                raise KeyUsageError("exportable", f"key {key_id!r} is not exportable")
            recipient = wrapping.load_public_key(recipient_public_key, "recipient_public_key")
            try:
                self._vm.recipient_policy(wrapping.spki_der(recipient), _as_evidence(evidence))
            except VerificationError as exc:
                raise AccessDenied("recipient_policy", f"{exc.check}: {exc.reason}") from None
            meta = kv.meta()
            wrapped = wrapping.wrap(recipient, secret_bytes(kv.secret),
                                    _scheme(scheme), export_context(meta))
            return {"wrapped": wrapped, "scheme": scheme, "attributes": meta,
                    "version": kv.version}
        return self._key_op("export", key_id, version, action)

    def import_wrapped(self, wrapping_key_id: str, wrapped: bytes, *, scheme: str,
                       algorithm: str, usage: Sequence[str], exportable: bool = False,
                       key_id: str | None = None) -> dict[str, Any]:
        """Import key material a tenant wrapped to one of this VSM's ``unwrap`` keys."""
        new_id = key_id or f"k{os.urandom(8).hex()}"

        def action() -> dict[str, Any]:
            account = self._require("keys:import")
            check_name(wrapping_key_id, "wrapping key id")
            wrapper = self._vm.keys.get(wrapping_key_id)
            _need_usage(wrapper, "unwrap")
            attributes = KeyAttributes(new_id, algorithm, tuple(usage),  # type: ignore[arg-type]
                                       bool(exportable), account.name)
            private = wrapper.private_key()
            if not isinstance(private, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise BadRequest(f"key {wrapping_key_id!r} cannot unwrap")
            material = wrapping.unwrap(private, wrapped, _scheme(scheme),
                                       import_context(algorithm, usage, bool(exportable)))
            secret = load_secret(attributes.algorithm, material)
            return self._store_new(make_version(attributes, 1, "imported", secret), secret)
        return self._op("import_wrapped", action, key=new_id, target=wrapping_key_id)

    # --- attestation ----------------------------------------------------------------------

    def attest(self, key_id: str, nonce: bytes, *, version: int | None = None) -> dict[str, Any]:
        """A TPM quote of this CryptoVM committing to the key and its attributes."""
        def action(kv: KeyVersion) -> dict[str, Any]:
            if not 0 < len(nonce) <= MAX_NONCE:
                raise BadRequest(f"nonce must be 1..{MAX_NONCE} bytes")
            meta = kv.meta()
            evidence = self._vm.quote(key_attestation_data(nonce, kv.public, meta))
            return {"attestation": KeyAttestation(evidence, meta, kv.public).to_dict(),
                    "version": kv.version}
        return self._key_op("attest", key_id, version, action)

    def identity(self) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            self._current()
            return self._vm.identity()
        return self._op("identity", action)

    def activate_credential(self, credential_blob: bytes,
                            encrypted_secret: bytes) -> dict[str, Any]:
        """TPM2_ActivateCredential for a registrar's challenge to this CryptoVM's AK."""
        def action() -> dict[str, Any]:
            self._current()
            with self._vm.tpm() as client:
                ak = client.attestation_key("ecc")
                secret = client.activate_credential(
                    ak, "rsa", CredentialChallenge(credential_blob, encrypted_secret))
            return {"secret": secret}
        return self._op("activate_credential", action)

    # --- attestation-gated release --------------------------------------------------------

    def issue_nonce(self) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            account = self._current()
            return {"nonce": self._vm.nonces.issue(account.name),
                    "expires_in": self._vm.nonces.ttl}
        return self._op("issue_nonce", action)

    def release_decrypt(self, key_id: str, ciphertext: bytes, evidence: Evidence | bytes,
                        nonce: bytes, recipient_public_key: bytes, *,
                        padding: str | None = None, aad: bytes = b"",
                        version: int | None = None) -> dict[str, Any]:
        """Decrypt for an attested requester; the plaintext is sealed to its key."""
        def action(kv: KeyVersion) -> dict[str, Any]:
            attrs = kv.attributes
            if attrs.release_policy is None:
                raise ReleaseDenied("release_policy", f"key {key_id!r} has no release policy")
            self._vm.nonces.consume(nonce, self.account)
            policy = self._vm.release_policies.get(attrs.release_policy)
            if policy is None:
                raise ReleaseDenied("release_policy",
                                    f"release policy {attrs.release_policy!r} is gone")
            recipient = _recipient_key(recipient_public_key)
            spki = wrapping.spki_der(recipient)
            requester = (evidence if isinstance(evidence, Evidence)
                         else decode_evidence(evidence))
            check_requester(policy, attrs.release_node, requester, nonce, spki,
                            self._vm.clock_history)
            result = self._decrypt(kv, ciphertext, padding, aad)
            context = release_context(key_id)
            return {"envelope": wrapping.seal_envelope(recipient, result["plaintext"], context),
                    "context": context, "version": result["version"]}
        return self._key_op("release", key_id, version, action)

    # --- the lab network (cryptovm/network.py) ----------------------------------------------

    def _attested(self, op: str) -> str:
        """The node this session's attestation proved (enabled now), or AccessDenied."""
        self._current()
        if self.attested_node is None:
            raise AccessDenied("attestation", f"{op} is only for a testbed node over its "
                               "attested (Trusted Passages) channel")
        return self.attested_node

    def net_join(self, public_key: str, wg_address: str, endpoint: str) -> dict[str, Any]:
        """Register this attested node's WireGuard public key, address and endpoint."""
        def action() -> dict[str, Any]:
            node = self._attested("net_join")
            return self._vm.network.join(parse_join(node, public_key, wg_address, endpoint))
        return self._op("net_join", action, target=self.attested_node or self.account)

    def net_peers(self) -> dict[str, Any]:
        """The other members whose node accounts are enabled (a revoked node drops out)."""
        def action() -> dict[str, Any]:
            return self._vm.network.peers(self._attested("net_peers"), self._node_enabled)
        return self._op("net_peers", action, target=self.attested_node or self.account)

    def _node_enabled(self, node: str) -> bool:
        try:
            return self._vm.accounts.get(node_account(node)).enabled
        except (NotFound, BadRequest):
            return False

    # --- data records ---------------------------------------------------------------------

    def record_write(self, name: str, data: bytes) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            self._require(f"record:{check_name(name, 'record name')}:write")
            if len(data) > MAX_RECORD:
                raise BadRequest(f"a record holds at most {MAX_RECORD} bytes")
            self._vm.state.write_record(self._vm.cipher, name, data)
            return {"name": name, "size": len(data)}
        return self._op("record_write", action, target=name)

    def record_read(self, name: str) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            self._require(f"record:{check_name(name, 'record name')}:read")
            return {"name": name, "data": self._vm.state.read_record(self._vm.cipher, name)}
        return self._op("record_read", action, target=name)

    def record_delete(self, name: str) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            self._require(f"record:{check_name(name, 'record name')}:write")
            self._vm.state.delete_record(name)
            return {"name": name}
        return self._op("record_delete", action, target=name)

    def record_list(self) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            account = self._current()
            return {"records": [n for n in self._vm.state.record_names()
                                if account.allows(f"record:{n}:read")]}
        return self._op("record_list", action)

    # --- accounts (root) ------------------------------------------------------------------

    def _accounts_change(self, op: str, target: str,
                         change: Callable[[AccountBook], R]) -> R:
        def action() -> R:
            self._require_root("manage accounts")
            with self._vm._config_lock:
                book = self._vm.accounts.copy()
                result = change(book)
                self._vm.save_config(book=book)
            return result
        return self._op(op, action, target=target)

    def account_create(self, name: str, privileges: Sequence[str] = ()) -> dict[str, Any]:
        """Create a guest account; the answer carries its PSK (the only time it is shown)."""
        def change(book: AccountBook) -> dict[str, Any]:
            if isinstance(name, str) and name.startswith(RESERVED_ACCOUNTS):
                raise BadRequest(f"account names starting with {' or '.join(RESERVED_ACCOUNTS)}"
                                 " are reserved for the CryptoVM's attested nodes and TLS "
                                 "issuer; choose another name")
            return {"name": name, "psk": book.create(name, privileges)}
        return self._accounts_change("account_create", name, change)

    def account_delete(self, name: str) -> dict[str, Any]:
        def change(book: AccountBook) -> dict[str, Any]:
            book.delete(name)
            return {"name": name}
        return self._accounts_change("account_delete", name, change)

    def account_grant(self, name: str, privileges: Sequence[str]) -> dict[str, Any]:
        return self._accounts_change("account_grant", name,
                                     lambda b: b.grant(name, privileges).describe())

    def account_revoke(self, name: str, privileges: Sequence[str]) -> dict[str, Any]:
        return self._accounts_change("account_revoke", name,
                                     lambda b: b.revoke(name, privileges).describe())

    def account_enable(self, name: str, enabled: bool) -> dict[str, Any]:
        return self._accounts_change("account_enable", name,
                                     lambda b: b.set_enabled(name, bool(enabled)).describe())

    def account_set_psk(self, name: str, psk: bytes | None = None) -> dict[str, Any]:
        """Set (TLS-SE style) or rotate an account's PSK."""
        return self._accounts_change("account_set_psk", name, lambda b: {
            "name": name, "psk": b.set_psk(name, psk)})

    def account_list(self) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            self._require_root("list accounts")
            return {"accounts": [self._vm.accounts.get(n).describe()
                                 for n in self._vm.accounts.names()]}
        return self._op("account_list", action)

    def account_issue_certificate(self, name: str) -> dict[str, Any]:
        """A client certificate (and its key, generated here) mapped to the account."""
        def change(book: AccountBook) -> dict[str, Any]:
            book.get(name)
            cert, key = tlsca.issue_client(self._vm.ca, name)
            der = cert.public_bytes(serialization.Encoding.DER)
            book.add_certificate(name, tlsca.fingerprint(der))
            return {"name": name, "fingerprint": tlsca.fingerprint(der),
                    "certificate": cert.public_bytes(serialization.Encoding.PEM),
                    "private_key": tlsca.pem_key(key), "ca_certificate": self._vm.ca.pem}
        return self._accounts_change("account_issue_certificate", name, change)

    def account_revoke_certificates(self, name: str) -> dict[str, Any]:
        return self._accounts_change("account_revoke_certificates", name,
                                     lambda b: b.remove_certificates(name).describe())

    # --- the TLS-issuing CA (keyless TLS for testbed nodes) ---------------------------------

    def tls_ca_setup(self, key_id: str = TLS_CA_KEY,
                     common_name: str | None = None) -> dict[str, Any]:
        """Root: create the TLS CA - a non-exportable sign-only key generated here, the
        ``tls-issuer`` account allowed to sign with it, and the self-signed certificate
        (signed through that account's ``sign``, so the key's bytes never leave)."""
        def action() -> dict[str, Any]:
            self._require_root("set up the TLS CA")
            if self._vm.tls_ca is not None:
                raise AlreadyExists(f"the TLS CA exists (key {self._vm.tls_ca.key_id!r})")
            if not self._vm.keys.exists(key_id):
                self.generate("ec-p256", ["sign"], exportable=False, key_id=key_id)
            self._ensure_issuer(key_id)
            public = serialization.load_der_public_key(self._vm.keys.get(key_id).public)
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise BadRequest(f"key {key_id!r} is not an ECC key")
            cn = common_name or f"CryptoVM TLS CA {os.urandom(4).hex()}"
            cert = ca_certificate(public, cn, self._issuer_signer(key_id))
            ca = IssuingCa(key_id, cert)
            self._vm.save_config(tls_ca=ca)
            return {"key_id": key_id, "certificate": ca.pem} | certificate_info(cert)
        return self._op("tls_ca_setup", action, key=key_id)

    def _ensure_issuer(self, key_id: str) -> None:
        with self._vm._config_lock:
            book = self._vm.accounts.copy()
            if TLS_ISSUER in book.names():
                book.set_privileges(TLS_ISSUER, [f"key:{key_id}:sign"])
            else:  # its PSK is never shown: nobody logs in as the issuer
                book.create(TLS_ISSUER, [f"key:{key_id}:sign"])
            self._vm.save_config(book=book)
        self._vm.audit.append(self.account, "account_create", "ok", target=TLS_ISSUER,
                              detail=f"TLS issuer principal: key:{key_id}:sign")

    def _issuer_signer(self, key_id: str) -> Callable[[bytes], bytes]:
        issuer = VsmSession(self._vm, TLS_ISSUER)
        return lambda data: bytes(issuer.sign(key_id, data, algorithm="ecdsa-sha256")[
            "signature"])

    def tls_ca_certificate(self) -> dict[str, Any]:
        """The TLS CA's certificate and key id (public)."""
        def action() -> dict[str, Any]:
            self._current()
            ca = self._tls_ca()
            return {"key_id": ca.key_id, "certificate": ca.pem} | certificate_info(
                ca.certificate)
        return self._op("tls_ca_certificate", action)

    def _tls_ca(self) -> IssuingCa:
        if self._vm.tls_ca is None:
            raise NotFound("this CryptoVM has no TLS CA (root: tls_ca_setup)")
        return self._vm.tls_ca

    def tls_enroll(self, csr: bytes, validity: int = DEFAULT_VALIDITY_S) -> dict[str, Any]:
        """A short-lived TLS certificate for the key in ``csr``, named after the node
        this session's attestation proved - only on an attested session."""
        def action() -> dict[str, Any]:
            self._require("tls:enroll")
            node = self.attested_node
            if node is None:
                raise AccessDenied("attestation", "TLS certificates are issued only to a "
                                   "testbed node over an attested (Trusted Passages) channel, "
                                   "not to a PSK or certificate session")
            ca = self._tls_ca()
            cert = node_certificate(ca, load_csr(csr), node, int(validity),
                                    self._issuer_signer(ca.key_id))
            return {"certificate": cert.public_bytes(serialization.Encoding.PEM),
                    "ca_certificate": ca.pem, "ca_key_id": ca.key_id} | certificate_info(cert)
        return self._op("tls_enroll", action, target=self.attested_node or self.account)

    # --- release policies (root) ----------------------------------------------------------

    def release_policy_set(self, name: str, reference_policy: str,
                           ak_registry: str) -> dict[str, Any]:
        """Add or replace a release policy (reference policy YAML, AK registry JSON)."""
        def action() -> dict[str, Any]:
            self._require_root("manage release policies")
            policy = ReleasePolicy.parse(name, reference_policy, ak_registry)
            with self._vm._config_lock:
                self._vm.save_config(policies={**self._vm.release_policies, name: policy})
            return policy.describe()
        return self._op("release_policy_set", action, target=name)

    def release_policy_list(self) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            self._current()
            return {"policies": [p.describe() for _, p in
                                 sorted(self._vm.release_policies.items())]}
        return self._op("release_policy_list", action)

    # --- audit ----------------------------------------------------------------------------

    def audit_verify(self) -> dict[str, Any]:
        def action() -> dict[str, Any]:
            self._require("audit:read")
            return self._vm.verify_audit().to_dict()
        return self._op("audit_verify", action)


def _scheme(scheme: str) -> wrapping.WrapScheme:
    if scheme not in wrapping.WRAP_SCHEMES:
        raise BadRequest(f"scheme {scheme!r} is not one of {list(wrapping.WRAP_SCHEMES)}")
    return scheme  # type: ignore[return-value,unused-ignore]  # checked against the Literal


def _recipient_key(der: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = wrapping.load_public_key(der, "recipient_public_key")
    except BadRequest as exc:
        raise ReleaseDenied("recipient_key", str(exc)) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ReleaseDenied("recipient_key", "the recipient key must be ECC P-256 "
                            "(results are sealed with ECDH-ES)")
    return key


__all__ = [
    "DEFAULT_PCRS",
    "CryptoVm",
    "RecipientPolicy",
    "VsmSession",
    "deny_all_recipients",
    "export_context",
    "import_context",
    "key_info",
]
