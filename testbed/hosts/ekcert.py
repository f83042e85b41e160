"""EK certificates for vTPMs manufactured on a host: the one place that issues them.

``swtpm_setup`` runs on the host (over SSH) and asks its ``create_certs_tool``
(:mod:`testbed.hosts.vtpm_tool`) for the EK certificate; the tool hands the request
(the EK's public modulus and the TPM's identity, nothing secret) to the lab, which
issues the certificate here and hands it back. The CA's keys never leave the lab.

For now the issuer is the project CA (``WORKDIR/ca``), as for VMs on the local libvirt;
deep attestation replaces :func:`issue_vtpm_ek_certificate` with a per-host
intermediate CA (issue #12): keep every caller going through it.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from testbed.hosts.layout import HostsError
from testbed.tpm.localca import LocalCA, find_tool

__all__ = ["MAX_REQUEST_BYTES", "EkRequest", "issue_vtpm_ek_certificate", "parse_ek_request"]

MAX_REQUEST_BYTES = 4096
ISSUE_TIMEOUT_S = 30.0
_MODULUS = re.compile(r"[0-9a-f]{256,1024}")  # RSA 1024..4096 bits, lowercase hex
_IDENTITY = {  # swtpm_setup's TPM identity options -> what each value may be
    "tpm-spec-family": re.compile(r"[0-9.]{1,8}"),
    "tpm-spec-level": re.compile(r"[0-9]{1,4}"),
    "tpm-spec-revision": re.compile(r"[0-9]{1,6}"),
    "tpm-manufacturer": re.compile(r"id:[0-9A-Fa-f]{8}"),
    "tpm-model": re.compile(r"[A-Za-z0-9_-]{1,32}"),
    "tpm-version": re.compile(r"id:[0-9A-Fa-f]{8}"),
}


class EkRequestError(HostsError):
    """A host asked for an EK certificate with a request the lab does not accept."""


@dataclass(frozen=True)
class EkRequest:
    """What a host's swtpm_setup asks to be certified: an RSA EK and the TPM's identity."""

    modulus_hex: str
    identity: tuple[tuple[str, str], ...]

    def to_json(self) -> bytes:
        return json.dumps({"type": "ek", "ek": self.modulus_hex,
                           "identity": dict(self.identity)}).encode()


def parse_ek_request(data: bytes, host: str) -> EkRequest:
    """The request a host sent, checked field by field (a hostile host may send anything)."""
    if len(data) > MAX_REQUEST_BYTES:
        raise EkRequestError(f"{host}: EK certificate request larger than "
                             f"{MAX_REQUEST_BYTES} bytes: refused")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EkRequestError(f"{host}: EK certificate request is not JSON: refused") from None
    if not isinstance(doc, dict) or doc.get("type") != "ek" \
            or not isinstance(doc.get("identity"), dict) or set(doc) != {"type", "ek", "identity"}:
        raise EkRequestError(f"{host}: EK certificate request is not an RSA EK request "
                             "(type, ek, identity): refused")
    modulus, identity = doc["ek"], doc["identity"]
    if not isinstance(modulus, str) or not _MODULUS.fullmatch(modulus):
        raise EkRequestError(f"{host}: EK certificate request: the EK modulus is not "
                             "256-1024 lowercase hex digits: refused")
    if set(identity) != set(_IDENTITY) or not all(
            isinstance(v, str) and _IDENTITY[k].fullmatch(v) for k, v in identity.items()):
        raise EkRequestError(f"{host}: EK certificate request: the TPM identity must be "
                             f"exactly {', '.join(_IDENTITY)} with valid values: refused")
    return EkRequest(modulus, tuple((k, identity[k]) for k in _IDENTITY))


def issue_vtpm_ek_certificate(ca: LocalCA, request: EkRequest, *, host: str) -> bytes:
    """The DER EK certificate for a vTPM made on ``host``, from the project CA."""
    with tempfile.TemporaryDirectory(prefix="vtpm-ek-") as out, ca.lock():
        cmd = [find_tool("swtpm_localca"), "--type", "ek", "--ek", request.modulus_hex,
               "--dir", out, *(a for k, v in request.identity for a in (f"--{k}", v)),
               "--tpm2", "--configfile", str(ca.ca_config_path),
               "--optsfile", str(ca.options_path)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=ISSUE_TIMEOUT_S,
                                 check=False)
        except subprocess.TimeoutExpired:
            raise HostsError(f"{host}: issuing the vTPM's EK certificate timed out") from None
        cert = Path(out) / "ek.cert"
        if res.returncode != 0 or not cert.is_file():
            tail = (res.stdout + res.stderr).strip()[-300:]
            raise HostsError(f"{host}: issuing the vTPM's EK certificate failed: {tail}")
        ca.tighten_permissions()
        return cert.read_bytes()
