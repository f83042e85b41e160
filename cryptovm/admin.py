"""CLI-facing functions: key and account management and one-shot operations.

Each function opens the CryptoVM state directory locally (unsealing the storage key
with the TPM - which is what makes the caller root), acts as root, closes, and
returns a JSON-able dict: byte strings become base64, except PSKs (hex, as TLS-SE
and OpenSSL's ``-psk`` print them) and PEM text (a string). While a server holds the
state directory these functions fail with a clear StorageError: use the wire
protocol (:class:`~cryptovm.client.CryptoVmClient`) instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from attestation.encoding import b64encode
from cryptovm import server
from cryptovm.audit import verify_audit_log
from cryptovm.keyattest import KeyAttestation
from cryptovm.vsm import DEFAULT_PCRS, CryptoVm, VsmSession


def jsonable(value: Any, key: str = "") -> Any:
    """bytes -> base64 (PSKs -> hex, PEM -> text), recursively."""
    if isinstance(value, bytes):
        if key in ("psk", "root_psk"):
            return value.hex()
        if value.startswith(b"-----BEGIN"):
            return value.decode("ascii")
        return b64encode(value)
    if isinstance(value, dict):
        return {k: jsonable(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, key) for v in value]
    return value


@contextmanager
def _root(state_dir: Path, tcti: str) -> Iterator[VsmSession]:
    with CryptoVm.open(Path(state_dir), tcti) as vm:
        yield vm.local_root()


def run(state_dir: Path, tcti: str, op: str, **args: Any) -> dict[str, Any]:
    """Any session operation, as root, e.g. ``run(d, t, "account_grant", name=..., ...)``."""
    with _root(state_dir, tcti) as root:
        method = getattr(root, op, None)
        if method is None or op.startswith("_"):
            raise ValueError(f"unknown CryptoVM operation {op!r}")
        result: dict[str, Any] = jsonable(method(**args))
        return result


# --- state --------------------------------------------------------------------------------


def init(state_dir: Path, tcti: str, pcrs: str = DEFAULT_PCRS) -> dict[str, Any]:
    """Create a CryptoVM: seal a new storage key to the TPM's current PCRs."""
    vm, root_psk = CryptoVm.initialize(Path(state_dir), tcti, pcrs=pcrs)
    with vm:
        result: dict[str, Any] = jsonable({
            "state_dir": str(vm.state.path),
            "pcr_selection": vm.state.read_manifest()["pcr_selection"],
            "root_psk": root_psk, "ca_certificate": vm.ca.pem})
        return result


def status(state_dir: Path, tcti: str) -> dict[str, Any]:
    with CryptoVm.open(Path(state_dir), tcti) as vm:
        report = vm.verify_audit()
        return {"state_dir": str(vm.state.path),
                "pcr_selection": vm.state.read_manifest()["pcr_selection"],
                "keys": len(vm.keys.ids()), "accounts": vm.accounts.names(),
                "release_policies": sorted(vm.release_policies),
                "audit": report.to_dict()}


def verify_audit(state_dir: Path, tcti: str | None = None) -> dict[str, Any]:
    """Verify the audit chain; with the TPM (``tcti``) the MACs are checked too."""
    if tcti is None:
        return verify_audit_log(Path(state_dir) / "audit.log").to_dict()
    with CryptoVm.open(Path(state_dir), tcti) as vm:
        return vm.verify_audit().to_dict()


# --- accounts -----------------------------------------------------------------------------


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


# --- keys ---------------------------------------------------------------------------------


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
    with _root(state_dir, tcti) as root:
        doc = root.attest(key_id, nonce)["attestation"]
        KeyAttestation.from_dict(doc)  # round-trip check of what is handed out
        return dict(doc)


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
