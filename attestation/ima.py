"""Runtime integrity: the ``ima-ng`` measurement log of PCR 10 and a runtime policy.

The log is Linux IMA's ASCII format (``ascii_runtime_measurements``), one entry a line::

    10 <template hash, hex> ima-ng sha256:<file digest, hex> <path>

The template data is IMA's binary ``ima-ng`` encoding of the two fields ``d-ng`` and
``n-ng``, each a little-endian u32 length and its bytes: ``d-ng`` is ``b"sha256:\\0"``
followed by the file digest, ``n-ng`` the path in UTF-8 with a trailing NUL. The template
hash is SHA-256 of that template data, and it is what PCR 10's sha256 bank is extended
with (``PCR10 := SHA-256(PCR10 || template hash)``), as kernels since 5.8 do for every
bank but SHA-1. The path is the rest of the line: it may hold spaces, never a newline.

The verifier reads the log incrementally: :func:`parse_log` parses from a byte offset,
only whole lines, at most :data:`MAX_CHUNK` bytes at a time, and :func:`replay` continues
from the PCR value the last good quote proved. The runtime policy (YAML, the strict
loader) allows digests per path, and excludes paths by glob; :func:`check_entries` names
the first offending entry.

The log format is standard library only (the guest agent runs it with Debian's python3);
only :func:`load_runtime_policy` needs PyYAML, imported when called.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from attestation.errors import EvidenceFormatError, PolicyError, VerificationError

__all__ = [
    "AGGREGATE_PCRS",
    "BOOT_AGGREGATE",
    "IMA_PCR",
    "MAX_CHUNK",
    "ImaEntry",
    "LogChunk",
    "RuntimePolicy",
    "boot_aggregate",
    "check_boot_aggregate",
    "check_entries",
    "dump_runtime_policy",
    "load_runtime_policy",
    "make_entry",
    "parse_log",
    "replay",
    "template_data",
]

IMA_PCR = 10
TEMPLATE = "ima-ng"
# Debian's kernels default to ima-sig: ima-ng plus a signature field, empty unless files
# are signed. Its boot_aggregate starts every VM's log, so it is read (empty signature only).
SIG_TEMPLATE = "ima-sig"
ALGORITHM = "sha256"
BOOT_AGGREGATE = "boot_aggregate"  # the first entry: the kernel's digest of PCRs 0-9
AGGREGATE_PCRS = tuple(range(10))  # Linux 5.8+: PCRs 0-9 in every non-SHA-1 aggregate
MAX_CHUNK = 256 * 1024  # bytes parsed per call: a log is read in bounded steps
MAX_LINE = 4096 + 160  # PATH_MAX plus the fixed fields
MAX_POLICY_BYTES = 1 << 20
MAX_POLICY_ENTRIES = 10000
_HEX64 = re.compile(r"[0-9a-f]{64}")
_POLICY_FORMAT = "testbed-runtime-policy"


@dataclass(frozen=True)
class ImaEntry:
    """One measurement: ``offset`` is where its line starts in the log."""

    pcr: int
    template_hash: bytes
    digest: bytes  # the file's SHA-256
    path: str
    offset: int = 0
    template: str = TEMPLATE

    def line(self) -> bytes:
        return (f"{self.pcr} {self.template_hash.hex()} {self.template} {ALGORITHM}:"
                f"{self.digest.hex()} {self.path}\n").encode()

    def describe(self) -> str:
        return f"{self.path} (sha256:{self.digest.hex()}, log offset {self.offset})"

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "digest": f"sha256:{self.digest.hex()}",
                "offset": self.offset, "template_hash": self.template_hash.hex()}


def template_data(digest: bytes, path: str, template: str = TEMPLATE) -> bytes:
    """IMA's binary ima-ng template data: the d-ng and n-ng fields, each length-prefixed
    (ima-sig: and an empty sig field)."""
    d_ng = f"{ALGORITHM}:".encode() + b"\0" + digest
    n_ng = path.encode() + b"\0"
    data = struct.pack("<I", len(d_ng)) + d_ng + struct.pack("<I", len(n_ng)) + n_ng
    return data + struct.pack("<I", 0) if template == SIG_TEMPLATE else data


def make_entry(digest: bytes, path: str, offset: int = 0, template: str = TEMPLATE) -> ImaEntry:
    """The entry IMA records for a file with SHA-256 ``digest`` at ``path``."""
    _check_path(path, EvidenceFormatError)
    if len(digest) != 32:
        raise EvidenceFormatError("an ima-ng sha256 digest is 32 bytes")
    if template not in (TEMPLATE, SIG_TEMPLATE):
        raise EvidenceFormatError(f"only {TEMPLATE} and {SIG_TEMPLATE} entries are accepted")
    return ImaEntry(IMA_PCR, hashlib.sha256(template_data(digest, path, template)).digest(),
                    digest, path, offset, template)


@dataclass(frozen=True)
class LogChunk:
    """The whole lines parsed from ``start``; ``end`` is where the next read begins."""

    entries: tuple[ImaEntry, ...]
    start: int
    end: int


def parse_log(data: bytes, offset: int = 0) -> LogChunk:
    """Parse the whole lines of ``data`` (the log's bytes from byte ``offset`` on).

    At most :data:`MAX_CHUNK` bytes are taken; a trailing partial line is left for the
    next call (``end`` stops before it). Every line is checked in full: fields, hex,
    and that its template hash is the one its digest and path give.
    """
    if offset < 0:
        raise EvidenceFormatError("a log offset is not negative")
    window = data[:MAX_CHUNK]
    cut = window.rfind(b"\n") + 1  # 0 when not even one whole line arrived
    if cut == 0 and len(data) > MAX_LINE:
        raise EvidenceFormatError(f"ima log at offset {offset}: a line longer than "
                                  f"{MAX_LINE} bytes")
    entries, position = [], 0
    for raw in window[:cut].splitlines(keepends=True):
        entries.append(_parse_line(raw[:-1], offset + position))
        position += len(raw)
    return LogChunk(tuple(entries), offset, offset + cut)


def _parse_line(raw: bytes, offset: int) -> ImaEntry:
    where = f"ima log at offset {offset}"
    if len(raw) > MAX_LINE:
        raise EvidenceFormatError(f"{where}: a line longer than {MAX_LINE} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise EvidenceFormatError(f"{where}: not UTF-8") from None
    fields = text.split(" ", 4)
    if len(fields) != 5:
        raise EvidenceFormatError(f"{where}: expected 'PCR HASH ima-ng sha256:DIGEST PATH'")
    pcr, template_hash, template, digest, path = fields
    if pcr != str(IMA_PCR) or template not in (TEMPLATE, SIG_TEMPLATE):
        raise EvidenceFormatError(f"{where}: only PCR {IMA_PCR} {TEMPLATE} (or {SIG_TEMPLATE} "
                                  f"without signature) entries are accepted, not {pcr[:8]!r} "
                                  f"{template[:16]!r}")
    if not _HEX64.fullmatch(template_hash) or not digest.startswith(f"{ALGORITHM}:") \
            or not _HEX64.fullmatch(digest[len(ALGORITHM) + 1:]):
        raise EvidenceFormatError(f"{where}: the template hash and digest are 64 lowercase "
                                  "hex digits (sha256:...)")
    entry = make_entry(bytes.fromhex(digest[len(ALGORITHM) + 1:]), path, offset, template)
    if entry.template_hash.hex() != template_hash:
        raise EvidenceFormatError(f"{where}: the template hash is not that of its digest and "
                                  f"path {path[:80]!r}")
    return entry


def _check_path(path: str, error: type[EvidenceFormatError] | type[PolicyError]) -> None:
    if not path or len(path.encode()) > 4096 or any(c in path for c in "\n\r\0"):
        raise error(f"a measured path is 1-4096 bytes without newline or NUL: {path[:80]!r}")


def replay(start: bytes, entries: Iterable[ImaEntry]) -> list[bytes]:
    """PCR 10 after each entry, extending from ``start`` (what an earlier quote proved)."""
    values, value = [], start
    for entry in entries:
        value = hashlib.sha256(value + entry.template_hash).digest()
        values.append(value)
    return values


# --- the runtime policy ------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimePolicy:
    """Which files a node may execute: digests allowed per path; excluded path globs."""

    name: str
    allow: Mapping[str, frozenset[bytes]] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()

    def judge(self, entry: ImaEntry) -> str | None:
        """Why ``entry`` breaks the policy, or None."""
        if entry.path == BOOT_AGGREGATE or self.excluded(entry.path):
            return None
        allowed = self.allow.get(entry.path)
        if allowed is None:
            return f"{entry.path!r} is not in runtime policy {self.name!r}"
        if entry.digest not in allowed:
            return (f"{entry.path!r} has digest sha256:{entry.digest.hex()}, not one "
                    f"runtime policy {self.name!r} allows")
        return None

    def excluded(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, pattern) for pattern in self.exclude)


def check_entries(policy: RuntimePolicy, entries: Sequence[ImaEntry]) -> None:
    """Raise the ``runtime`` VerificationError naming the first offending entry."""
    for entry in entries:
        why = policy.judge(entry)
        if why is not None:
            raise VerificationError("runtime", f"executed {entry.describe()}: {why}",
                                    {"entry": entry.to_dict(), "policy": policy.name})


def boot_aggregate(pcrs: Mapping[int, bytes]) -> bytes:
    """IMA's boot_aggregate for a TPM 2.0 sha256 bank, as the kernel computes it: SHA-256
    over the values of PCRs 0-9, in order."""
    return hashlib.sha256(b"".join(pcrs[i] for i in AGGREGATE_PCRS)).digest()


def check_boot_aggregate(entries: Sequence[ImaEntry], quoted: Mapping[int, bytes]) -> None:
    """Raise the ``runtime`` VerificationError unless every ``boot_aggregate`` entry is
    the log's first line and its digest is the aggregate of the quoted PCRs 0-9 (a
    policy allows the entry by name: this is what makes the name safe to allow). Fails
    closed when the quote does not cover PCRs 0-9."""
    for entry in entries:
        if entry.path != BOOT_AGGREGATE:
            continue
        data = {"entry": entry.to_dict()}
        missing = [i for i in AGGREGATE_PCRS if i not in quoted]
        if missing:
            raise VerificationError(
                "runtime", f"the log's {BOOT_AGGREGATE} entry cannot be checked: the quote "
                f"does not cover PCRs {', '.join(map(str, missing))} (quote PCRs 0-9)",
                {**data, "missing_pcrs": missing})
        if entry.offset != 0:
            raise VerificationError(
                "runtime", f"a {BOOT_AGGREGATE} entry at log offset {entry.offset}: the "
                "kernel writes it only as the log's first line", data)
        expected = boot_aggregate(quoted)
        if entry.digest != expected:
            raise VerificationError(
                "runtime", f"the log's {BOOT_AGGREGATE} sha256:{entry.digest.hex()} does "
                f"not match the quoted PCRs 0-9 (their aggregate is sha256:{expected.hex()})",
                {**data, "expected": f"sha256:{expected.hex()}"})


def load_runtime_policy(text: str | bytes, what: str = "runtime policy") -> RuntimePolicy:
    """Parse a runtime policy document (strict YAML); PolicyError on anything off."""
    if len(text) > MAX_POLICY_BYTES:
        raise PolicyError(f"{what}: larger than {MAX_POLICY_BYTES} bytes")
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise PolicyError(f"{what}: not UTF-8") from None
    # lazy: PyYAML only for policies; the log format stays standard library (guest agent)
    from attestation.strict_yaml import load_yaml

    doc = load_yaml(text, what, PolicyError)
    if not isinstance(doc, dict) or doc.get("format") != _POLICY_FORMAT \
            or doc.get("version") != 1 or set(doc) - {"format", "version", "name", "allow",
                                                       "exclude"}:
        raise PolicyError(f"{what}: expected format: {_POLICY_FORMAT}, version: 1, name, "
                          "allow: {PATH: [sha256:HEX, ...]}, exclude: [GLOB, ...]")
    name, allow, exclude = doc.get("name"), doc.get("allow") or {}, doc.get("exclude") or []
    if not isinstance(name, str) or not name or len(name) > 128:
        raise PolicyError(f"{what}: name is a text of 1-128 characters")
    if not isinstance(allow, dict) or not isinstance(exclude, list) \
            or len(allow) + len(exclude) > MAX_POLICY_ENTRIES:
        raise PolicyError(f"{what}: allow is a mapping and exclude a list, at most "
                          f"{MAX_POLICY_ENTRIES} entries together")
    return RuntimePolicy(name, {_policy_path(p, what): _digests(d, p, what)
                                for p, d in allow.items()},
                         tuple(_glob(g, what) for g in exclude))


def _policy_path(path: object, what: str) -> str:
    if not isinstance(path, str):
        raise PolicyError(f"{what}: allow: a path is text, not {type(path).__name__}")
    _check_path(path, PolicyError)
    return path


def _digests(value: object, path: object, what: str) -> frozenset[bytes]:
    items = value if isinstance(value, list) else [value]
    digests = set()
    for item in items:
        if not isinstance(item, str) or not item.startswith("sha256:") \
                or not _HEX64.fullmatch(item[7:]):
            raise PolicyError(f"{what}: allow: {str(path)[:80]!r}: digests are "
                              "sha256:<64 lowercase hex digits>")
        digests.add(bytes.fromhex(item[7:]))
    if not digests:
        raise PolicyError(f"{what}: allow: {str(path)[:80]!r} lists no digest")
    return frozenset(digests)


def _glob(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 4096:
        raise PolicyError(f"{what}: exclude: a glob is a text of 1-4096 characters")
    return value


def dump_runtime_policy(policy: RuntimePolicy) -> str:
    """The policy as the YAML :func:`load_runtime_policy` reads (paths JSON-quoted: valid
    YAML, exact for any path)."""
    lines = [f"format: {_POLICY_FORMAT}", "version: 1", f"name: {json.dumps(policy.name)}",
             "allow:"]
    lines += [f"  {json.dumps(path)}: [{', '.join(sorted(f'sha256:{d.hex()}' for d in ds))}]"
              for path, ds in sorted(policy.allow.items())]
    lines.append("exclude:")
    lines += [f"  - {json.dumps(glob)}" for glob in policy.exclude]
    if not policy.allow:
        lines[3] = "allow: {}"
    if not policy.exclude:
        lines[-1] = "exclude: []"
    return "\n".join(lines) + "\n"
