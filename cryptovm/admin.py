"""CLI-facing CryptoVM access, the same whether the CryptoVM is here or running elsewhere.

A :class:`VsmTarget` is anything with ``call(op, **args) -> dict`` that takes the wire
operations (:data:`cryptovm.wire.OPS`, same names and arguments) as root:

* :func:`open_local` opens a state directory in this process (unsealing the storage key
  with the TPM - which is what makes the caller root), for as long as the ``with`` lasts;
* a :class:`~cryptovm.client.CryptoVmClient` logged in as ``root`` reaches a running
  CryptoVM (a cluster node's) over CVM1.

While a server holds a state directory, :func:`open_local` fails with a clear
StorageError: use the wire protocol instead. The functions below the targets (``summary``,
``key_attestation``, ...) work on either. Results are the session's dicts (bytes stay
bytes); :func:`jsonable` makes them JSON: byte strings become base64, except PSKs (hex, as
TLS-SE and OpenSSL's ``-psk`` print them) and PEM text (a string); ``readable=True`` (what
the ``testbed vsm`` command prints) also turns public keys into PEM and times into ISO 8601
UTC. The one-shot functions taking ``(state_dir, tcti, ...)`` open, act, close and return
that JSON (``readable=False``: the library's format since the first version).
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from attestation.encoding import b64encode
from cryptovm import server
from cryptovm.audit import verify_audit_log
from cryptovm.errors import BadRequest
from cryptovm.keyattest import KeyAttestation
from cryptovm.sealing import format_pcr_selection, parse_pcr_selection
from cryptovm.vsm import DEFAULT_PCRS, CryptoVm
from cryptovm.wire import OPS

# --- targets ------------------------------------------------------------------------------


class VsmTarget(Protocol):
    """A CryptoVM as root: ``call("sign", key_id=..., data=...)`` -> the session's result."""

    def call(self, op: str, **args: Any) -> dict[str, Any]: ...


class LocalVsm:
    """A CryptoVM opened in this process, acting as its root account."""

    def __init__(self, vm: CryptoVm) -> None:
        self.vm = vm
        self._root = vm.local_root()

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """The wire operation ``op`` (None arguments left out, as on the wire)."""
        method = getattr(self._root, op, None) if op in OPS and op != "auth" else None
        if method is None:
            raise ValueError(f"unknown CryptoVM operation {op!r}")
        result: dict[str, Any] = method(**{k: v for k, v in args.items() if v is not None})
        return result

    def where(self) -> dict[str, Any]:
        return {"state_dir": str(self.vm.state.path),
                "pcr_selection": self.vm.state.read_manifest()["pcr_selection"]}


@contextmanager
def open_local(state_dir: Path, tcti: str) -> Iterator[LocalVsm]:
    with CryptoVm.open(Path(state_dir), tcti) as vm:
        yield LocalVsm(vm)


# --- what the command prints -----------------------------------------------------------------

_PSK_KEYS = ("psk", "root_psk")
_PUBLIC_KEY_KEYS = ("public_key",)  # SPKI DER in the session's results
_TIME_KEYS = ("created",)  # seconds since the epoch in the session's results


def jsonable(value: Any, key: str = "", *, readable: bool = False) -> Any:
    """bytes -> base64 (PSKs -> hex, PEM -> text), recursively; ``readable``: public
    keys (SPKI DER) -> PEM, times -> ISO 8601 UTC."""
    if isinstance(value, bytes):
        if key in _PSK_KEYS:
            return value.hex()
        if value.startswith(b"-----BEGIN"):
            return value.decode("ascii")
        if readable and key in _PUBLIC_KEY_KEYS:
            return public_key_pem(value)
        return b64encode(value)
    if readable and key in _TIME_KEYS and type(value) is int:
        return iso_time(value)
    if isinstance(value, dict):
        return {k: jsonable(v, k, readable=readable) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, key, readable=readable) for v in value]
    return value


def iso_time(seconds: float) -> str:
    """ISO 8601 UTC to the second with ``Z``: the testbed's one output time format."""
    moment = datetime.datetime.fromtimestamp(int(seconds), datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def public_key_pem(spki_der: bytes) -> str:
    """SubjectPublicKeyInfo DER -> PEM (what ``openssl pkey -pubin`` reads)."""
    lines = [b64encode(spki_der[i:i + 48]) for i in range(0, len(spki_der), 48)]
    return "-----BEGIN PUBLIC KEY-----\n" + "\n".join(lines) + "\n-----END PUBLIC KEY-----\n"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(n: int, size: int | None = None) -> bytes:
    return n.to_bytes(size or max(1, (n.bit_length() + 7) // 8), "big")


def public_key_jwk(spki_der: bytes, kid: str | None = None) -> dict[str, str]:
    """SubjectPublicKeyInfo DER -> JSON Web Key (RFC 7517/7518; Ed25519: RFC 8037)."""
    key = serialization.load_der_public_key(spki_der)
    jwk: dict[str, str]
    if isinstance(key, ec.EllipticCurvePublicKey):
        size = (key.curve.key_size + 7) // 8
        numbers = key.public_numbers()
        jwk = {"kty": "EC", "crv": f"P-{key.curve.key_size}",
               "x": _b64url(_uint(numbers.x, size)), "y": _b64url(_uint(numbers.y, size))}
    elif isinstance(key, rsa.RSAPublicKey):
        numbers_rsa = key.public_numbers()
        jwk = {"kty": "RSA", "n": _b64url(_uint(numbers_rsa.n)),
               "e": _b64url(_uint(numbers_rsa.e))}
    elif isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64url(raw)}
    else:
        raise BadRequest(f"no JWK form for a {type(key).__name__}")
    return jwk | ({"kid": kid} if kid else {})


def check_pcrs(spec: str) -> str:
    """A PCR selection for sealing (``sha256:0-7``), normalised; BadRequest if malformed."""
    try:
        return format_pcr_selection(parse_pcr_selection(spec))
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


# --- operations on any target ---------------------------------------------------------------


def summary(target: VsmTarget) -> dict[str, Any]:
    """Keys, accounts, release policies and the audit chain (the session's shapes)."""
    return {"keys": len(target.call("list_keys")["keys"]),
            "accounts": [a["name"] for a in target.call("account_list")["accounts"]],
            "release_policies": sorted(p["name"] for p in
                                       target.call("release_policy_list")["policies"]),
            "audit": target.call("audit_verify")}


def key_attestation(target: VsmTarget, key_id: str, nonce: bytes) -> dict[str, Any]:
    """Key attestation document (``KeyAttestation.from_dict`` reads it back)."""
    doc = target.call("attest", key_id=key_id, nonce=nonce)["attestation"]
    KeyAttestation.from_dict(doc)  # round-trip check of what is handed out
    return dict(doc)


# --- one-shot functions: open the state directory, act as root, close ---------------------


def run(state_dir: Path, tcti: str, op: str, **args: Any) -> dict[str, Any]:
    """Any wire operation, as root, e.g. ``run(d, t, "account_grant", name=..., ...)``."""
    with open_local(state_dir, tcti) as vsm:
        result: dict[str, Any] = jsonable(vsm.call(op, **args))
        return result


def init(state_dir: Path, tcti: str, pcrs: str = DEFAULT_PCRS) -> dict[str, Any]:
    """Create a CryptoVM: seal a new storage key to the TPM's current PCRs."""
    vm, root_psk = CryptoVm.initialize(Path(state_dir), tcti, pcrs=check_pcrs(pcrs))
    with vm:
        result: dict[str, Any] = jsonable({
            "state_dir": str(vm.state.path),
            "pcr_selection": vm.state.read_manifest()["pcr_selection"],
            "root_psk": root_psk, "ca_certificate": vm.ca.pem})
        return result


def status(state_dir: Path, tcti: str) -> dict[str, Any]:
    with open_local(state_dir, tcti) as vsm:
        result: dict[str, Any] = vsm.where() | summary(vsm)
        return result


def verify_audit(state_dir: Path, tcti: str | None = None) -> dict[str, Any]:
    """Verify the audit chain; with the TPM (``tcti``) the MACs are checked too."""
    if tcti is None:
        return verify_audit_log(Path(state_dir) / "audit.log").to_dict()
    with CryptoVm.open(Path(state_dir), tcti) as vm:
        return vm.verify_audit().to_dict()


def account_create(state_dir: Path, tcti: str, name: str,
                   privileges: Sequence[str] = ()) -> dict[str, Any]:
    return run(state_dir, tcti, "account_create", name=name, privileges=list(privileges))


def account_list(state_dir: Path, tcti: str) -> dict[str, Any]:
    return run(state_dir, tcti, "account_list")


def account_grant(state_dir: Path, tcti: str, name: str,
                  privileges: Sequence[str]) -> dict[str, Any]:
    return run(state_dir, tcti, "account_grant", name=name, privileges=list(privileges))


def account_revoke(state_dir: Path, tcti: str, name: str,
                   privileges: Sequence[str]) -> dict[str, Any]:
    return run(state_dir, tcti, "account_revoke", name=name, privileges=list(privileges))


def account_delete(state_dir: Path, tcti: str, name: str) -> dict[str, Any]:
    return run(state_dir, tcti, "account_delete", name=name)


def account_issue_certificate(state_dir: Path, tcti: str, name: str) -> dict[str, Any]:
    return run(state_dir, tcti, "account_issue_certificate", name=name)


def key_generate(state_dir: Path, tcti: str, algorithm: str, usage: Sequence[str], *,
                 exportable: bool = False, key_id: str | None = None) -> dict[str, Any]:
    return run(state_dir, tcti, "generate", algorithm=algorithm, usage=list(usage),
               exportable=exportable, key_id=key_id)


def key_list(state_dir: Path, tcti: str) -> dict[str, Any]:
    return run(state_dir, tcti, "list_keys")


def key_public(state_dir: Path, tcti: str, key_id: str) -> dict[str, Any]:
    return run(state_dir, tcti, "public_key", key_id=key_id)


def key_sign(state_dir: Path, tcti: str, key_id: str, data: bytes,
             algorithm: str | None = None) -> dict[str, Any]:
    return run(state_dir, tcti, "sign", key_id=key_id, data=data, algorithm=algorithm)


def key_verify(state_dir: Path, tcti: str, key_id: str, data: bytes,
               signature: bytes) -> dict[str, Any]:
    return run(state_dir, tcti, "verify", key_id=key_id, data=data, signature=signature)


def key_rotate(state_dir: Path, tcti: str, key_id: str) -> dict[str, Any]:
    return run(state_dir, tcti, "rotate", key_id=key_id)


def key_delete(state_dir: Path, tcti: str, key_id: str) -> dict[str, Any]:
    return run(state_dir, tcti, "delete", key_id=key_id)


def key_attest(state_dir: Path, tcti: str, key_id: str, nonce: bytes) -> dict[str, Any]:
    """Key attestation document (``KeyAttestation.from_dict`` reads it back)."""
    with open_local(state_dir, tcti) as vsm:
        return key_attestation(vsm, key_id, nonce)


def release_policy_set(state_dir: Path, tcti: str, name: str, reference_policy_yaml: str,
                       ak_registry_json: str) -> dict[str, Any]:
    return run(state_dir, tcti, "release_policy_set", name=name,
               reference_policy=reference_policy_yaml, ak_registry=ak_registry_json)


def serve(state_dir: Path, tcti: str, host: str = "127.0.0.1", port: int = 0,
          port_file: Path | None = None, audit_sync: str = "state") -> int:
    """Run the server in the foreground until SIGTERM/SIGINT (returns the exit code)."""
    argv = ["--state", str(state_dir), "--tcti", tcti, "--host", host, "--port", str(port),
            "--audit-sync", audit_sync]
    if port_file is not None:
        argv += ["--port-file", str(port_file)]
    return server.main(argv)
