"""Shared helpers for the CryptoVM tests (this module holds no tests).

Real swtpm instances (template copies from the testbed pytest plugin's session
template), a simulated measured boot to give each CryptoVM a measured state, servers
in a child process (in a thread: cryptovm.server.ServerThread), and a scanner for key
material on disk.
"""

from __future__ import annotations

import base64
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from attestation.evidence import Evidence
from attestation.tpm import TpmClient, TpmKey
from attestation.tpm_types import PcrSelection
from testbed.spec.cluster_spec import BootSpec
from testbed.tpm.boot import measure_boot
from testbed.tpm.swtpm import Swtpm, clone_state

GOOD_BOOT = BootSpec.from_content(firmware="OVMF volume (cryptovm test)", kernel="vmlinuz-cryptovm",
                      initrd="initrd-cryptovm", cmdline="console=ttyS0 role=cryptovm")
OTHER_BOOT = replace(GOOD_BOOT, cmdline="console=ttyS0 role=cryptovm init=/bin/sh")
REQUESTER_BOOT = BootSpec.from_content(firmware="OVMF volume (web node)", kernel="vmlinuz-web",
                           initrd="initrd-web", cmdline="console=ttyS0 role=web")
REQUESTER_SELECTION = PcrSelection("sha256", (0, 1, 2, 3, 4, 5, 6, 7, 9))
_libc = ctypes.CDLL(None, use_errno=True)


def start_tpm(template: Path, directory: Path) -> Swtpm:
    clone_state(template, directory)
    return Swtpm(directory).start()


def boot(tpm: Swtpm, chain: BootSpec = GOOD_BOOT) -> bytes:
    """Measured boot into the TPM; returns the event log."""
    with TpmClient(tpm.tcti) as client:
        return measure_boot(client, chain)


# --- requester side of attestation-gated release -------------------------------------------


@dataclass
class Requester:
    tpm: Swtpm
    client: TpmClient
    ak: TpmKey
    log: bytes

    def evidence(self, qualifying_data: bytes) -> Evidence:
        q = self.client.quote(self.ak, REQUESTER_SELECTION, qualifying_data)
        return Evidence(attest=q.attest, signature=q.signature, ak_public=self.ak.public,
                        pcr_bank="sha256", pcrs=q.pcrs, event_log=self.log)

    def close(self) -> None:
        self.client.flush(self.ak)
        self.client.close()


# --- servers ---------------------------------------------------------------------------------


def _die_with_parent() -> None:
    _libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


class ServerProcess:
    """``python -m cryptovm.server`` in a child process (killed with the test process)."""

    def __init__(self, state: Path, tcti: str, *extra: str) -> None:
        self.state, self.tcti, self.extra = state, tcti, extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 20.0) -> ServerProcess:
        port_file = self.state.parent / f"port-{os.getpid()}-{time.monotonic_ns()}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cryptovm.server", "--state", str(self.state),
             "--tcti", self.tcti, "--port-file", str(port_file), *self.extra],
            preexec_fn=_die_with_parent, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}"
                                   if self.proc.stderr else "server exited")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        port_file.unlink()
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


# --- key material on disk ----------------------------------------------------------------------


def secret_forms(secret: object) -> dict[str, bytes]:
    """Every representation of a private key a careless store might write."""
    if isinstance(secret, bytes):
        forms = {"raw": secret}
    else:
        assert isinstance(secret, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                          | ed25519.Ed25519PrivateKey)
        forms = {
            "pkcs8 der": secret.private_bytes(serialization.Encoding.DER,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()),
            "pkcs8 pem": secret.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()),
        }
        forms |= _scalars(secret)
    for name, value in list(forms.items()):
        if name.endswith("der") or name in ("raw", "scalar", "d", "p", "q"):
            forms[f"{name} hex"] = value.hex().encode()
            forms[f"{name} base64"] = base64.b64encode(value)
    return forms


def _scalars(secret: object) -> dict[str, bytes]:
    if isinstance(secret, ec.EllipticCurvePrivateKey):
        size = (secret.curve.key_size + 7) // 8
        return {"scalar": secret.private_numbers().private_value.to_bytes(size, "big")}
    if isinstance(secret, rsa.RSAPrivateKey):
        n = secret.private_numbers()
        size = secret.key_size // 8
        return {"d": n.d.to_bytes(size, "big").lstrip(b"\0"),
                "p": n.p.to_bytes(size // 2, "big"), "q": n.q.to_bytes(size // 2, "big")}
    if isinstance(secret, ed25519.Ed25519PrivateKey):
        return {"raw": secret.private_bytes(serialization.Encoding.Raw,
                                            serialization.PrivateFormat.Raw,
                                            serialization.NoEncryption())}
    return {}


def scan(directory: Path, needles: dict[str, bytes]) -> list[str]:
    """Which needles occur in which files under ``directory``."""
    found = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.relative_to(directory)}: {name}" for name, needle in needles.items()
                  if needle in data]
    return found
