"""Quote file sets on disk, in tpm2-tools' formats.

``testbed quote -o DIR`` writes, and ``testbed verify-quote DIR`` reads:

- ``quote.msg``  TPMS_ATTEST          (``tpm2_quote -m``)
- ``quote.sig``  TPMT_SIGNATURE       (``tpm2_quote -s``)
- ``quote.pcrs`` serialized PCRs      (``tpm2_quote -o``, ``-F serialized``)
- ``ak.pem``     AK public key (PEM)  (``tpm2_checkquote -u``)
- ``ak.pub``     AK TPM2B_PUBLIC      (``tpm2_readpublic -o``; lets a verifier check the
  AK's attributes). Before this version it held a bare TPMT_PUBLIC; both are read.
- ``evidence.json`` the full evidence bundle, event log included (docs/evidence.md)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from attestation.errors import EvidenceFormatError
from attestation.evidence import MAX_EVIDENCE_BYTES, Evidence
from attestation.files import atomic_write, read_bounded
from attestation.tools_format import read_pcrs, write_pcrs
from attestation.tpm_types import (
    PcrSelection,
    parse_attest,
    parse_public,
    parse_tpm2b_public,
    tpm2b,
    tpmt_public_from_pem,
)
from testbed.core.errors import ArgumentError

MAX_FILE = 1 << 20
EVIDENCE_FILE = "evidence.json"
QUOTE_FILE_NAMES = ("quote.msg", "quote.sig", "quote.pcrs", "ak.pem", "ak.pub", EVIDENCE_FILE)
PUBLIC_MODE = 0o644  # public evidence, keys and certificates: for other tools and users


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


def read_evidence(path: Path) -> Evidence:
    """An evidence bundle (``evidence.json``), bounded and strictly decoded."""
    try:
        return Evidence.from_json(read_bounded(path, MAX_EVIDENCE_BYTES, what="evidence"))
    except EvidenceFormatError as exc:
        raise EvidenceFormatError(f"{path}: {exc}") from None


# --- outputs: only what was asked for, never silently over an earlier result ------------


def check_output_file(path: Path, *, force: bool, option: str = "-o") -> None:
    """Refuse, before any work is done, an output file that cannot or should not be written."""
    parent = path.parent
    if not parent.is_dir():
        raise ArgumentError(f"{option} {path}: directory {parent} does not exist; create it "
                            "first or choose another path")
    if path.is_dir():
        raise ArgumentError(f"{option} {path} is a directory; give a file name")
    if path.exists() and not force:
        raise ArgumentError(f"{option} {path} already exists; pass --force to overwrite it")


def check_quote_directory(directory: Path, *, force: bool) -> None:
    """``quote -o DIR``: DIR may exist (its quote files are not replaced without --force)
    or be created, but only inside an existing directory."""
    if directory.exists() and not directory.is_dir():
        raise ArgumentError(f"-o {directory} is not a directory; give a directory for the "
                            "quote files")
    if not directory.exists() and not directory.parent.is_dir():
        raise ArgumentError(f"-o {directory}: directory {directory.parent} does not exist; "
                            "create it first or choose another path")
    existing = [name for name in QUOTE_FILE_NAMES if (directory / name).exists()]
    if existing and not force:
        raise ArgumentError(f"-o {directory} already holds {', '.join(existing)} (an earlier "
                            "quote); pass --force to overwrite, or choose another directory")


def write_quote_files(directory: Path, evidence: Evidence) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)  # `quote` checked the parent; `attest -o` may nest
    selection = PcrSelection(evidence.pcr_bank, tuple(sorted(evidence.pcrs)))
    key = parse_public(evidence.ak_public).public_key()
    pem = key.public_bytes(serialization.Encoding.PEM,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    outputs = {
        "quote.msg": evidence.attest,
        "quote.sig": evidence.signature,
        "quote.pcrs": write_pcrs(selection, evidence.pcrs),
        "ak.pem": pem,
        "ak.pub": tpm2b(evidence.ak_public),  # TPM2B_PUBLIC, as tpm2_readpublic -o writes
        EVIDENCE_FILE: evidence.to_json(),
    }
    written = []
    for name, data in outputs.items():
        atomic_write(directory / name, data, mode=PUBLIC_MODE)
        written.append(directory / name)
    return written


# --- inputs -------------------------------------------------------------------------------


def load_ak(path: Path) -> tuple[bytes, bool]:
    """An AK as TPMT_PUBLIC bytes, and whether it was a bare PEM key.

    Accepts PEM (tpm2_checkquote), TPM2B_PUBLIC (tpm2_readpublic -o, our ``ak.pub``) or
    TPMT_PUBLIC (our ``ak.pub`` before TPM2B_PUBLIC).
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


def evidence_from_files(files: QuoteFiles) -> tuple[Evidence, bool]:
    """Assemble an Evidence from a tpm2-tools file set; also says if the AK was bare PEM."""
    attest = read_quote_file(files.message)
    parse_attest(attest)  # fail early with the file's own error
    selection, pcrs = read_pcrs(read_quote_file(files.pcrs))
    ak_public, bare = load_ak(files.ak)
    evidence = Evidence(attest=attest, signature=read_quote_file(files.signature),
                        ak_public=ak_public, pcr_bank=selection.bank, pcrs=pcrs)
    return evidence, bare
