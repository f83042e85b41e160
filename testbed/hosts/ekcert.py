"""EK certificate requests from a host's ``swtpm_setup``, as the lab accepts them.

``swtpm_setup`` runs on the host (over SSH) and asks its ``create_certs_tool``
(:mod:`testbed.hosts.vtpm_tool`) for the EK certificate; the tool hands the request
(the EK's public modulus and the TPM's identity, nothing secret) to the lab, which
checks it here (:func:`parse_ek_request`: a hostile host may send anything) and has
the host's intermediate CA issue the certificate
(:func:`testbed.hosts.deep.issue_vtpm_ek_certificate`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from testbed.hosts.layout import HostsError

__all__ = ["MAX_REQUEST_BYTES", "EkRequest", "EkRequestError", "parse_ek_request"]

MAX_REQUEST_BYTES = 4096
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
