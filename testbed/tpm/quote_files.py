"""Quote file sets on disk, in tpm2-tools' formats.

``testbed quote -o DIR`` writes, and ``testbed verify-quote DIR`` reads:

- ``quote.msg``  TPMS_ATTEST          (``tpm2_quote -m``)
- ``quote.sig``  TPMT_SIGNATURE       (``tpm2_quote -s``)
- ``quote.pcrs`` serialized PCRs      (``tpm2_quote -o``, ``-F serialized``)
- ``ak.pem``     AK public key (PEM)  (``tpm2_checkquote -u``)
- ``ak.pub``     AK TPMT_PUBLIC       (lets the verifier check the AK's attributes)
- ``evidence.json`` the full evidence bundle (docs/evidence.md)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from attestation.errors import EvidenceFormatError
from attestation.evidence import Evidence
from attestation.files import atomic_write, read_bounded
from attestation.tools_format import read_pcrs, write_pcrs
from attestation.tpm_types import (
    PcrSelection,
    parse_attest,
    parse_public,
    parse_tpm2b_public,
    tpmt_public_from_pem,
)

MAX_FILE = 1 << 20


@dataclass(frozen=True)
class QuoteFiles:
    message: Path
    signature: Path
    pcrs: Path
    ak: Path

    @classmethod
    def in_directory(cls, directory: Path) -> QuoteFiles:
        ak = directory / "ak.pub" if (directory / "ak.pub").exists() else directory / "ak.pem"
        return cls(directory / "quote.msg", directory / "quote.sig", directory / "quote.pcrs", ak)


def read_quote_file(path: Path) -> bytes:
    """One input file of a quote (message, signature, PCRs, AK, event log), bounded."""
    return read_bounded(path, MAX_FILE, what="quote file")


def write_quote_files(directory: Path, evidence: Evidence) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    selection = PcrSelection(evidence.pcr_bank, tuple(sorted(evidence.pcrs)))
    key = parse_public(evidence.ak_public).public_key()
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    outputs = {
        "quote.msg": evidence.attest,
        "quote.sig": evidence.signature,
        "quote.pcrs": write_pcrs(selection, evidence.pcrs),
        "ak.pem": pem,
        "ak.pub": evidence.ak_public,
        "evidence.json": evidence.to_json(),
    }
    written = []
    for name, data in outputs.items():
        atomic_write(directory / name, data, mode=0o644)  # public evidence, for other tools
        written.append(directory / name)
    return written


def load_ak(path: Path) -> tuple[bytes, bool]:
    """An AK as TPMT_PUBLIC bytes, and whether it was a bare PEM key.

    Accepts PEM (tpm2_checkquote), TPM2B_PUBLIC (tpm2_readpublic -o) or TPMT_PUBLIC.
    """
    data = read_quote_file(path)
    if data.lstrip().startswith(b"-----BEGIN"):
        return tpmt_public_from_pem(data, str(path)), True
    try:
        area = parse_tpm2b_public(data)
    except EvidenceFormatError:
        try:
            area = parse_public(data)
        except EvidenceFormatError as exc:
            raise EvidenceFormatError(f"{path}: not a PEM key, TPM2B_PUBLIC or TPMT_PUBLIC "
                                      f"({exc})") from None
    try:
        area.public_key()  # a key no library could use fails here, naming the file
    except EvidenceFormatError as exc:
        raise EvidenceFormatError(f"{path}: {exc}") from None
    return area.raw, False


def evidence_from_files(files: QuoteFiles, event_log: Path | None) -> tuple[Evidence, bool]:
    """Assemble an Evidence from a tpm2-tools file set; also says if the AK was bare PEM."""
    attest = read_quote_file(files.message)
    parse_attest(attest)  # fail early with the file's own error
    selection, pcrs = read_pcrs(read_quote_file(files.pcrs))
    ak_public, bare = load_ak(files.ak)
    evidence = Evidence(
        attest=attest, signature=read_quote_file(files.signature), ak_public=ak_public,
        pcr_bank=selection.bank, pcrs=pcrs,
        event_log=read_quote_file(event_log) if event_log else None,
    )
    return evidence, bare
