"""TCG PC Client crypto-agile event logs: parse, replay, compare, write.

The format is the one OVMF/SeaBIOS hand to Linux, exposed at
``/sys/kernel/security/tpm0/binary_bios_measurements`` (TCG PC Client Platform
Firmware Profile, "crypto agile" log). All integers are little-endian.

* The first record is a legacy ``TCG_PCR_EVENT`` (pcrIndex u32, eventType u32
  = EV_NO_ACTION, 20 zero bytes, eventSize u32, event) whose data is the
  ``Spec ID Event03`` header. It declares which hash algorithms (banks) every
  later record carries and how long each digest is.
* Every later record is a ``TCG_PCR_EVENT2``: pcrIndex u32, eventType u32,
  digest count u32, ``count`` x (algorithmId u16, digest), eventSize u32, event.

Event numbers follow ``tpm2_eventlog``: the Spec ID header is event 0, so
``Event.number`` of the first ``TCG_PCR_EVENT2`` is 1. That lets a human match
our messages ("event #12") with ``tpm2_eventlog`` output.

The parser treats its input as hostile: every read is bounds-checked, sizes and
counts are capped, and every problem is an :class:`EventLogError` naming the
byte offset and the field. Parsing is a single linear pass.

This module does no I/O: callers read the log bytes themselves.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from attestation.cache import BoundedCache
from attestation.errors import EventLogError

__all__ = [
    "ALGORITHMS",
    "DRTM_PCRS",
    "EVENT_TYPES",
    "EV_NO_ACTION",
    "MAX_EVENTS",
    "MAX_LOG_BYTES",
    "MAX_PCR_INDEX",
    "STARTUP_LOCALITY_SIGNATURE",
    "Event",
    "EventDivergence",
    "EventLog",
    "EventLogBuilder",
    "PcrMismatch",
    "SpecIdEvent",
    "compare_with_pcrs",
    "diff_event_logs",
    "digest_size",
    "event_type_name",
    "event_type_value",
    "initial_pcr_value",
    "parse_event_log",
    "replay",
    "reset_values",
    "short_hex",
]

# --- limits (hostile input) -------------------------------------------------

MAX_LOG_BYTES = 16 * 1024 * 1024
"""Real firmware logs are tens of KiB; anything above this is refused."""
MAX_EVENTS = 65536
MAX_ALGORITHMS = 16
"""A TPM has a handful of PCR banks; the header may not declare more than this."""
MAX_DIGEST_BYTES = 64
"""Largest digest a TPM 2.0 knows (TPMU_HA / SHA-512)."""
MAX_PCR_INDEX = 31
"""Same bound as tpm2-tools (TPM2_MAX_PCRS - 1); PC Client TPMs have 0..23."""
MAX_DESCRIPTION_CHARS = 120

# --- constants --------------------------------------------------------------

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"
_LEGACY_DIGEST_BYTES = 20
_HCRTM_LOCALITY = 4  # TPM 2.0 Part 1 s34.3: an H-CRTM sequence leaves PCR0 = 0...04

# name -> (TPM_ALG_ID, digest size, hashlib name)
ALGORITHMS: Mapping[str, tuple[int, int, str]] = {
    "sha1": (0x0004, 20, "sha1"),
    "sha256": (0x000B, 32, "sha256"),
    "sha384": (0x000C, 48, "sha384"),
    "sha512": (0x000D, 64, "sha512"),
    "sm3_256": (0x0012, 32, "sm3"),
}
_ALG_NAME_BY_ID: Mapping[int, str] = {alg_id: name for name, (alg_id, _, _) in ALGORITHMS.items()}

EVENT_TYPES: Mapping[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000002: "EV_UNUSED",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000000: "EV_EFI_EVENT_BASE",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}
_EVENT_TYPE_BY_NAME: Mapping[str, int] = {name: value for value, name in EVENT_TYPES.items()}

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_EFI_HCRTM_EVENT = 0x80000010
_UNKNOWN_PREFIX = "EV_UNKNOWN_0x"
_HEX = frozenset("0123456789abcdefABCDEF")


def event_type_name(event_type: int) -> str:
    """``EV_*`` name of an event type; ``EV_UNKNOWN_0x...`` if not in the spec."""
    return EVENT_TYPES.get(event_type, f"{_UNKNOWN_PREFIX}{event_type:08X}")


def event_type_value(name: str) -> int | None:
    """Inverse of :func:`event_type_name` (also for ``EV_UNKNOWN_0x...``); None if invalid."""
    if name in _EVENT_TYPE_BY_NAME:
        return _EVENT_TYPE_BY_NAME[name]
    digits = name.removeprefix(_UNKNOWN_PREFIX)
    # Hex digits only: int(..., 16) would also take "+1", " 1" and "1_0".
    if digits == name or not 1 <= len(digits) <= 8 or not all(c in _HEX for c in digits):
        return None
    return int(digits, 16)


def digest_size(bank: str) -> int:
    """Digest size in bytes of a known bank name; raises KeyError otherwise."""
    return ALGORITHMS[bank][1]


def short_hex(value: bytes | None, chars: int = 16) -> str:
    """Abbreviated hex for messages; the full value is always in the data."""
    if value is None:
        return "(none)"
    text = value.hex()
    return text if len(text) <= chars else text[:chars] + "…"


def _alg_name(alg_id: int) -> str:
    # Algorithms we do not know can still be parsed (the header gives the size)
    # but never replayed; they get a stable synthetic name.
    return _ALG_NAME_BY_ID.get(alg_id, f"alg_0x{alg_id:04x}")


# --- data model ---------------------------------------------------------------


@dataclass(frozen=True)
class SpecIdEvent:
    """The ``Spec ID Event03`` header (TCG_EfiSpecIDEvent)."""

    platform_class: int
    spec_version_minor: int
    spec_version_major: int
    spec_errata: int
    uintn_size: int
    algorithms: tuple[tuple[int, int], ...]
    """(algorithmId, digestSize) in header order."""
    vendor_info: bytes = b""

    @property
    def banks(self) -> tuple[str, ...]:
        """Bank names in header order (``alg_0x....`` for unknown algorithms)."""
        return tuple(_alg_name(alg_id) for alg_id, _ in self.algorithms)


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2 record. ``number`` counts the Spec ID header as 0."""

    number: int
    pcr: int
    event_type: int
    digests: dict[str, bytes] = field(hash=False)
    data: bytes

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    @property
    def description(self) -> str:
        """A short human hint of what was measured; empty if nothing useful.

        Best effort over untrusted bytes: it never raises.
        """
        try:
            text = _describe(self.event_type, self.data)
        except (ValueError, IndexError, struct.error, UnicodeError):
            return ""
        return _clip(text)

    def summary(self) -> str:
        """``#12 EV_IPL (kernel cmdline)``: how messages name this event."""
        desc = self.description
        suffix = f" ({desc})" if desc else ""
        return f"#{self.number} {self.type_name}{suffix}"


@dataclass(frozen=True)
class EventLog:
    """A parsed log. ``startup_locality`` is 0 unless a StartupLocality event says otherwise."""

    spec_id: SpecIdEvent
    events: tuple[Event, ...]
    startup_locality: int

    @property
    def banks(self) -> tuple[str, ...]:
        return self.spec_id.banks

    def events_for(self, pcr: int, *, include_no_action: bool = False) -> tuple[Event, ...]:
        """The events of one PCR in log order (EV_NO_ACTION left out unless asked)."""
        return tuple(
            ev
            for ev in self.events
            if ev.pcr == pcr and (include_no_action or ev.event_type != EV_NO_ACTION)
        )


# --- parsing --------------------------------------------------------------------


class _Reader:
    """Bounds-checked little-endian cursor over ``data[offset:end]``.

    Offsets in errors are absolute positions in the whole log.
    """

    __slots__ = ("_data", "_end", "offset")

    def __init__(self, data: bytes, offset: int = 0, end: int | None = None) -> None:
        self._data = data
        self.offset = offset
        self._end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self._end - self.offset

    def take(self, size: int, what: str) -> bytes:
        if size > self.remaining:
            raise EventLogError(
                f"truncated log at byte offset {self.offset}: {what} needs {size} bytes "
                f"but only {self.remaining} remain"
            )
        chunk = self._data[self.offset : self.offset + size]
        self.offset += size
        return chunk

    def sub(self, size: int, what: str) -> _Reader:
        """A reader over the next ``size`` bytes, which this reader skips."""
        start = self.offset
        self.take(size, what)
        return _Reader(self._data, start, start + size)

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")


def _fail(offset: int, message: str) -> EventLogError:
    return EventLogError(f"byte offset {offset}: {message}")


CACHED_LOG_BYTES = 1 << 16  # larger logs are parsed each time: the cache holds <= 64 MiB
CACHED_LOGS = 1024


def parse_event_log_cached(data: bytes) -> EventLog:
    """:func:`parse_event_log`, memoized by the exact bytes (a bounded LRU of logs up to
    :data:`CACHED_LOG_BYTES`): a verifier sees each node's unchanged boot log at every
    attestation. Safe because an EventLog is immutable and fully determined by its bytes;
    a log that changed in any byte is parsed anew, and errors are never cached."""
    if not isinstance(data, bytes) or len(data) > CACHED_LOG_BYTES:
        return parse_event_log(data)
    return PARSED_LOGS.get_or_compute(data, lambda: parse_event_log(data))


PARSED_LOGS: BoundedCache[bytes, EventLog] = BoundedCache(CACHED_LOGS)


def parse_event_log(data: bytes) -> EventLog:
    """Parse a crypto-agile TCG event log; raises :class:`EventLogError` on any defect."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EventLogError(f"event log must be bytes, not {type(data).__name__}")
    data = bytes(data)
    if len(data) > MAX_LOG_BYTES:
        raise EventLogError(f"event log is {len(data)} bytes; the limit is {MAX_LOG_BYTES}")
    if not data:
        raise EventLogError("event log is empty")
    reader = _Reader(data)
    spec_id = _parse_header(reader)
    sizes = _digest_sizes(spec_id)
    events: list[Event] = []
    while reader.remaining:
        if len(events) >= MAX_EVENTS:
            raise _fail(reader.offset, f"more than {MAX_EVENTS} events")
        events.append(_parse_event2(reader, len(events) + 1, sizes))
    return EventLog(spec_id, tuple(events), _startup_locality(events))


def _parse_header(reader: _Reader) -> SpecIdEvent:
    start = reader.offset
    pcr = reader.uint(4, "Spec ID header pcrIndex")
    event_type = reader.uint(4, "Spec ID header eventType")
    digest = reader.take(_LEGACY_DIGEST_BYTES, "Spec ID header digest")
    size = reader.uint(4, "Spec ID header eventSize")
    if event_type != EV_NO_ACTION:
        raise _fail(
            start,
            f"first event is {event_type_name(event_type)}, not EV_NO_ACTION: not a "
            "crypto-agile (TPM 2.0) log; SHA-1-only TPM 1.2 logs are not supported",
        )
    if pcr != 0 or digest != bytes(_LEGACY_DIGEST_BYTES):
        raise _fail(start, "Spec ID header must be in PCR 0 with an all-zero digest")
    body = reader.sub(size, "Spec ID header event data")
    return _parse_spec_id(body)


def _parse_spec_id(body: _Reader) -> SpecIdEvent:
    start = body.offset
    if body.take(len(SPEC_ID_SIGNATURE), "Spec ID signature") != SPEC_ID_SIGNATURE:
        raise _fail(start, "Spec ID header signature is not 'Spec ID Event03'")
    platform_class = body.uint(4, "Spec ID platformClass")
    minor = body.uint(1, "Spec ID specVersionMinor")
    major = body.uint(1, "Spec ID specVersionMajor")
    errata = body.uint(1, "Spec ID specErrata")
    uintn = body.uint(1, "Spec ID uintnSize")
    algorithms = _parse_algorithms(body)
    vendor_size = body.uint(1, "Spec ID vendorInfoSize")
    vendor = body.take(vendor_size, "Spec ID vendorInfo")
    if body.remaining:
        raise _fail(body.offset, f"{body.remaining} unexpected bytes after Spec ID vendorInfo")
    return SpecIdEvent(platform_class, minor, major, errata, uintn, algorithms, vendor)


def _parse_algorithms(body: _Reader) -> tuple[tuple[int, int], ...]:
    count_at = body.offset
    count = body.uint(4, "Spec ID numberOfAlgorithms")
    if not 1 <= count <= MAX_ALGORITHMS:
        raise _fail(count_at, f"numberOfAlgorithms is {count}; expected 1..{MAX_ALGORITHMS}")
    algorithms: list[tuple[int, int]] = []
    for index in range(count):
        at = body.offset
        alg_id = body.uint(2, f"Spec ID algorithm {index} algorithmId")
        size = body.uint(2, f"Spec ID algorithm {index} digestSize")
        _check_algorithm(at, alg_id, size, algorithms)
        algorithms.append((alg_id, size))
    return tuple(algorithms)


def _check_algorithm(at: int, alg_id: int, size: int, seen: list[tuple[int, int]]) -> None:
    if any(alg_id == other for other, _ in seen):
        raise _fail(at, f"algorithm 0x{alg_id:04x} declared twice in the Spec ID header")
    name = _ALG_NAME_BY_ID.get(alg_id)
    # A wrong size for a known hash would make replay silently wrong: refuse it.
    if name is not None and size != ALGORITHMS[name][1]:
        raise _fail(at, f"{name} declared with digestSize {size}, must be {ALGORITHMS[name][1]}")
    if not 1 <= size <= MAX_DIGEST_BYTES:
        raise _fail(at, f"algorithm 0x{alg_id:04x} digestSize {size} is not 1..{MAX_DIGEST_BYTES}")


def _digest_sizes(spec_id: SpecIdEvent) -> dict[int, int]:
    return dict(spec_id.algorithms)


def _parse_event2(reader: _Reader, number: int, sizes: Mapping[int, int]) -> Event:
    # Field labels are constants and the event number is added only when an error
    # is raised: formatting them eagerly cost more than parsing the event itself.
    try:
        at = reader.offset
        pcr = reader.uint(4, "pcrIndex")
        if pcr > MAX_PCR_INDEX:
            raise _fail(at, f"pcrIndex {pcr} is above {MAX_PCR_INDEX}")
        event_type = reader.uint(4, "eventType")
        digests = _parse_digests(reader, sizes)
        size = reader.uint(4, "eventSize")
        data = reader.take(size, "event data")
    except EventLogError as exc:
        raise EventLogError(f"event #{number}: {exc}") from None
    return Event(number, pcr, event_type, digests, data)


def _parse_digests(reader: _Reader, sizes: Mapping[int, int]) -> dict[str, bytes]:
    at = reader.offset
    count = reader.uint(4, "digest count")
    if count != len(sizes):
        raise _fail(at, f"carries {count} digests but the Spec ID header declares {len(sizes)}")
    digests: dict[str, bytes] = {}
    for _ in range(count):
        alg_at = reader.offset
        alg_id = reader.uint(2, "digest algorithmId")
        size = sizes.get(alg_id)
        if size is None:
            raise _fail(alg_at, f"uses algorithm 0x{alg_id:04x}, not in the Spec ID header")
        name = _alg_name(alg_id)
        if name in digests:
            raise _fail(alg_at, f"carries two {name} digests")
        digests[name] = reader.take(size, f"{name} digest")
    return digests


def _startup_locality(events: Iterable[Event]) -> int:
    found: list[Event] = [
        ev
        for ev in events
        if ev.event_type == EV_NO_ACTION
        and ev.pcr == 0
        and ev.data.startswith(STARTUP_LOCALITY_SIGNATURE)
    ]
    if not found:
        return 0
    if len(found) > 1:
        raise EventLogError(
            f"events #{found[0].number} and #{found[1].number} both set the StartupLocality"
        )
    event = found[0]
    if len(event.data) != len(STARTUP_LOCALITY_SIGNATURE) + 1:
        raise EventLogError(f"event #{event.number}: StartupLocality data must be 17 bytes")
    locality = event.data[-1]
    if locality > _HCRTM_LOCALITY:
        raise EventLogError(f"event #{event.number}: StartupLocality {locality} is not 0..4")
    return locality


# --- descriptions (best effort, never trusted) -----------------------------------------

_TEXT_TYPES = frozenset(
    {
        0x00000001,  # EV_POST_CODE (when not a blob)
        0x00000005,  # EV_ACTION
        0x00000008,  # EV_S_CRTM_VERSION (often UTF-16)
        0x0000000D,  # EV_IPL (grub/shim strings, kernel command lines)
        0x00000012,  # EV_OMIT_BOOT_DEVICE_EVENTS
        0x80000007,  # EV_EFI_ACTION
        0x80000010,  # EV_EFI_HCRTM_EVENT
    }
)
_VARIABLE_TYPES = frozenset({0x80000001, 0x80000002, 0x8000000C, 0x800000E0})
_IMAGE_TYPES = frozenset({0x80000003, 0x80000004, 0x80000005})
_BLOB_TYPES = frozenset({0x00000007, 0x80000008})
_UEFI_VARIABLE_HEADER = struct.Struct("<16sQQ")
_IMAGE_LOAD_HEADER = struct.Struct("<QQQQ")
_BLOB = struct.Struct("<QQ")
_MAX_DEVICE_PATH_NODES = 64


def _clip(text: str) -> str:
    # One printable line, whatever the firmware put in: descriptions end up
    # in messages and in hand-edited policy files.
    text = " ".join(text.split())
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    if len(text) <= MAX_DESCRIPTION_CHARS:
        return text
    return text[: MAX_DESCRIPTION_CHARS - 1] + "…"


def _printable(text: str) -> str:
    text = text.rstrip("\x00")
    cleaned = text.replace("\n", " ").replace("\t", " ").replace("\r", " ")
    return text if text and cleaned.isprintable() else ""


def _as_text(data: bytes) -> str:
    """UTF-8 if printable, else UTF-16LE if printable (sd-boot, S-CRTM version)."""
    try:
        text = _printable(data.decode("utf-8"))
    except UnicodeDecodeError:
        text = ""
    if text or len(data) % 2:
        return text
    try:
        return _printable(data.decode("utf-16-le"))
    except UnicodeDecodeError:
        return ""


def _describe(event_type: int, data: bytes) -> str:
    if event_type == EV_NO_ACTION:
        return _describe_no_action(data)
    if event_type == EV_SEPARATOR:
        return _describe_separator(data)
    if event_type in _VARIABLE_TYPES:
        return _variable_name(data)
    if event_type in _IMAGE_TYPES:
        return _image_path(data)
    if event_type in _BLOB_TYPES or (event_type == 0x00000001 and len(data) == _BLOB.size):
        return _describe_blob(data)
    if event_type == 0x8000000A:  # EV_EFI_PLATFORM_FIRMWARE_BLOB2: u8 size + description
        return _as_text(data[1 : 1 + data[0]]) if data else ""
    if event_type == 0x00000006:  # EV_EVENT_TAG
        return _describe_tagged(data)
    if event_type in _TEXT_TYPES:
        return _as_text(data)
    return ""


def _describe_tagged(data: bytes) -> str:
    """TCG_PCClientTaggedEvent (id u32, size u32, data), e.g. the Linux EFI stub's
    initrd and command-line events; plain text if it is not one."""
    if len(data) >= 8 and int.from_bytes(data[4:8], "little") == len(data) - 8:
        return _as_text(data[8:])
    return _as_text(data)


def _describe_no_action(data: bytes) -> str:
    if data.startswith(STARTUP_LOCALITY_SIGNATURE) and len(data) > len(STARTUP_LOCALITY_SIGNATURE):
        return f"StartupLocality {data[len(STARTUP_LOCALITY_SIGNATURE)]}"
    return _as_text(data[:16].split(b"\x00", 1)[0])


def _describe_separator(data: bytes) -> str:
    if data == b"\xff\xff\xff\xff":
        return "separator (firmware error)"
    return "separator"


def _describe_blob(data: bytes) -> str:
    if len(data) != _BLOB.size:
        return ""
    base, length = _BLOB.unpack(data)
    return f"blob at 0x{base:x}, 0x{length:x} bytes"


def _variable_name(data: bytes) -> str:
    """UnicodeName of a UEFI_VARIABLE_DATA (GUID, name length, data length, name, data)."""
    if len(data) < _UEFI_VARIABLE_HEADER.size:
        return ""
    _guid, name_chars, _data_len = _UEFI_VARIABLE_HEADER.unpack_from(data)
    start = _UEFI_VARIABLE_HEADER.size
    raw = data[start : start + 2 * name_chars]
    if len(raw) != 2 * name_chars:
        return ""
    return _printable(raw.decode("utf-16-le"))


def _image_path(data: bytes) -> str:
    """File path from UEFI_IMAGE_LOAD_EVENT's device path (media/file-path nodes)."""
    if len(data) < _IMAGE_LOAD_HEADER.size:
        return ""
    *_, path_len = _IMAGE_LOAD_HEADER.unpack_from(data)
    path = data[_IMAGE_LOAD_HEADER.size : _IMAGE_LOAD_HEADER.size + path_len]
    return "".join(_file_path_nodes(path))


def _file_path_nodes(path: bytes) -> list[str]:
    parts: list[str] = []
    offset = 0
    for _ in range(_MAX_DEVICE_PATH_NODES):  # bounded walk over untrusted nodes
        if offset + 4 > len(path):
            break
        node_type, sub_type, length = struct.unpack_from("<BBH", path, offset)
        if node_type == 0x7F or length < 4:  # end of path, or malformed
            break
        if (node_type, sub_type) == (4, 4):  # MEDIA_DEVICE_PATH / MEDIA_FILEPATH_DP
            node = path[offset + 4 : offset + length]
            parts.append(node.decode("utf-16-le", errors="replace").rstrip("\x00"))
        offset += length
    return parts


# --- replay and comparison --------------------------------------------------------------


def _check_bank(log: EventLog, bank: str) -> str:
    """The hashlib name for ``bank``; EventLogError if it cannot be replayed."""
    if bank not in log.banks:
        raise EventLogError(f"the event log has no {bank} digests (banks: {', '.join(log.banks)})")
    if bank not in ALGORITHMS:
        raise EventLogError(f"cannot replay unknown algorithm {bank}")
    hash_name = ALGORITHMS[bank][2]
    try:
        hashlib.new(hash_name)
    except ValueError as exc:
        raise EventLogError(f"this Python has no {hash_name} implementation") from exc
    return hash_name


def _pcr0_locality(log: EventLog) -> int:
    # An H-CRTM sequence resets PCR0 to ...04 before its first extend,
    # whatever a StartupLocality event says (tpm2-tools >= 5.6 agrees).
    first = next((ev for ev in log.events_for(0)), None)
    if first is not None and first.event_type == EV_EFI_HCRTM_EVENT:
        return _HCRTM_LOCALITY
    return log.startup_locality


def initial_pcr_value(log: EventLog, pcr: int, bank: str = "sha256") -> bytes:
    """The value ``pcr`` has before the log's first extend (its reset value)."""
    locality = _pcr0_locality(log) if pcr == 0 else 0
    return bytes(digest_size(bank) - 1) + bytes([locality])


def replay(log: EventLog, bank: str = "sha256") -> dict[int, bytes]:
    """PCR values the log's events produce in ``bank``: {pcr: value}, sorted by PCR.

    Every PCR named by an event (even only by EV_NO_ACTION events) is returned.
    PCRs start at zero, except PCR 0 whose last byte is the startup locality.
    EV_NO_ACTION events are never extended.
    """
    hash_name = _check_bank(log, bank)
    values: dict[int, bytes] = {}
    for event in log.events:
        value = values.get(event.pcr)
        if value is None:
            value = initial_pcr_value(log, event.pcr, bank)
        if event.event_type != EV_NO_ACTION:
            value = hashlib.new(hash_name, value + event.digests[bank]).digest()
        values[event.pcr] = value
    return dict(sorted(values.items()))


DRTM_PCRS = range(17, 23)
"""PCRs 17-22 start at all ones and are reset to zero only by a dynamic launch (PC
Client Platform TPM Profile): a quoted DRTM PCR without events may be either."""


def reset_values(log: EventLog, pcr: int, bank: str = "sha256") -> tuple[bytes, ...]:
    """The values ``pcr`` may hold when the log has no extend for it."""
    values: tuple[bytes, ...] = (initial_pcr_value(log, pcr, bank),)
    if pcr in DRTM_PCRS:
        values += (b"\xff" * digest_size(bank),)
    return values


@dataclass(frozen=True)
class PcrMismatch:
    """A quoted PCR whose value the log does not reproduce."""

    pcr: int
    expected_from_log: bytes
    quoted: bytes
    last_event_number: int | None
    """Number of the last event extended into this PCR (None: the log extends nothing
    into it, so ``expected_from_log`` is its reset value)."""
    bank: str = "sha256"

    def to_dict(self) -> dict[str, Any]:
        """For JSON output: every field, digests in full hex."""
        return {"pcr": self.pcr, "bank": self.bank,
                "expected_from_log": self.expected_from_log.hex(),
                "quoted": self.quoted.hex(), "last_event_number": self.last_event_number}

    def describe(self) -> str:
        # Full hex: whoever reads this compares it with tpm2_pcrread or a replay tool.
        if self.last_event_number is None:
            return (
                f"PCR {self.pcr} ({self.bank}): the event log extends nothing into it, so it "
                f"would hold its reset value {self.expected_from_log.hex()}, but the quote "
                f"says {self.quoted.hex()}"
            )
        return (
            f"PCR {self.pcr} ({self.bank}): the event log replays to "
            f"{self.expected_from_log.hex()} (last event #{self.last_event_number}) but the "
            f"quote says {self.quoted.hex()}"
        )


def compare_with_pcrs(
    log: EventLog,
    quoted: Mapping[int, bytes],
    bank: str = "sha256",
    *,
    unlogged: Iterable[int] = (),
) -> list[PcrMismatch]:
    """Every quoted PCR whose value the log does not reproduce, in PCR order.

    The log must explain each quoted PCR: one it extends must replay to the quoted
    value, one it never extends must still hold a reset value (see
    :func:`reset_values`). PCRs in ``unlogged`` (a policy's explicit exemption) are
    not compared.
    """
    replayed = replay(log, bank)
    exempt = frozenset(unlogged)
    mismatches: list[PcrMismatch] = []
    for pcr in sorted(quoted.keys() - exempt):
        events = log.events_for(pcr)
        if events:
            if replayed[pcr] != quoted[pcr]:
                mismatches.append(
                    PcrMismatch(pcr, replayed[pcr], quoted[pcr], events[-1].number, bank))
        elif quoted[pcr] not in reset_values(log, pcr, bank):
            mismatches.append(PcrMismatch(pcr, initial_pcr_value(log, pcr, bank), quoted[pcr],
                                          None, bank))
    return mismatches


DivergenceKind = Literal["digest", "missing", "extra", "startup_locality"]


@dataclass(frozen=True)
class EventDivergence:
    """The first point where ``actual`` stops following ``reference``.

    ``kind`` is ``digest`` (an event differs in digest or type), ``missing``
    (``actual`` lacks an event the reference has), ``extra`` (``actual`` has
    one more) or ``startup_locality`` (PCR 0 starts from a different value;
    the two "digests" are then the initial PCR 0 values). ``position`` is
    1-based within the PCR's events (EV_NO_ACTION excluded), 0 for a
    startup-locality divergence.
    """

    kind: DivergenceKind
    pcr: int
    position: int
    event_number: int | None
    reference_event_number: int | None
    actual_type: str | None
    reference_type: str | None
    actual_digest: bytes | None
    reference_digest: bytes | None
    actual_description: str = ""
    reference_description: str = ""

    def describe(self) -> str:
        if self.kind == "startup_locality":
            return (
                f"PCR 0 starts from a different startup locality: expected initial value "
                f"{short_hex(self.reference_digest)} got {short_hex(self.actual_digest)}"
            )
        if self.kind == "missing":
            return (
                f"PCR {self.pcr}: the log ends after {self.position - 1} events; expected "
                f"event #{self.reference_event_number} {self.reference_type}"
                f"{_paren(self.reference_description)} {short_hex(self.reference_digest)} next"
            )
        if self.kind == "extra":
            return (
                f"PCR {self.pcr} has an unexpected extra event #{self.event_number} "
                f"{self.actual_type}{_paren(self.actual_description)} "
                f"{short_hex(self.actual_digest)} after the reference's {self.position - 1}"
            )
        return self._describe_digest()

    def _describe_digest(self) -> str:
        head = (
            f"PCR {self.pcr} diverges at event #{self.event_number} {self.actual_type}"
            f"{_paren(self.actual_description or self.reference_description)}"
        )
        if self.actual_type != self.reference_type:
            return (
                f"{head}: expected {self.reference_type} {short_hex(self.reference_digest)} "
                f"got {self.actual_type} {short_hex(self.actual_digest)}"
            )
        return (
            f"{head}: expected {short_hex(self.reference_digest)} "
            f"got {short_hex(self.actual_digest)}"
        )


def _paren(text: str) -> str:
    return f" ({text})" if text else ""


def diff_event_logs(
    reference: EventLog, actual: EventLog, bank: str = "sha256"
) -> EventDivergence | None:
    """The earliest divergence (in ``actual``'s log order) of ``actual`` from ``reference``.

    Each PCR's events (EV_NO_ACTION excluded) are walked side by side; an
    event differs if its type or its ``bank`` digest differs. None if the
    logs would produce the same PCRs the same way.
    """
    _check_bank(reference, bank)
    _check_bank(actual, bank)
    found: list[EventDivergence] = []
    if _pcr0_locality(reference) != _pcr0_locality(actual):
        found.append(_locality_divergence(reference, actual, bank))
    pcrs = {ev.pcr for ev in reference.events} | {ev.pcr for ev in actual.events}
    for pcr in sorted(pcrs):
        divergence = _diff_pcr(pcr, reference.events_for(pcr), actual.events_for(pcr), bank)
        if divergence is not None:
            found.append(divergence)
    return min(found, key=_divergence_order, default=None)


def _divergence_order(div: EventDivergence) -> tuple[int, int]:
    if div.kind == "startup_locality":
        return (0, div.pcr)
    number = div.event_number if div.event_number is not None else div.reference_event_number
    return (number if number is not None else 0, div.pcr)


def _locality_divergence(reference: EventLog, actual: EventLog, bank: str) -> EventDivergence:
    ref_init = initial_pcr_value(reference, 0, bank)
    act_init = initial_pcr_value(actual, 0, bank)
    return EventDivergence(
        kind="startup_locality",
        pcr=0,
        position=0,
        event_number=None,
        reference_event_number=None,
        actual_type="StartupLocality",
        reference_type="StartupLocality",
        actual_digest=act_init,
        reference_digest=ref_init,
    )


def _diff_pcr(
    pcr: int, ref: Sequence[Event], act: Sequence[Event], bank: str
) -> EventDivergence | None:
    for index, (r, a) in enumerate(zip(ref, act, strict=False)):
        if r.event_type != a.event_type or r.digests[bank] != a.digests[bank]:
            return _divergence("digest", pcr, index + 1, r, a, bank)
    if len(ref) > len(act):
        return _divergence("missing", pcr, len(act) + 1, ref[len(act)], None, bank)
    if len(act) > len(ref):
        return _divergence("extra", pcr, len(ref) + 1, None, act[len(ref)], bank)
    return None


def _divergence(
    kind: DivergenceKind,
    pcr: int,
    position: int,
    ref: Event | None,
    act: Event | None,
    bank: str,
) -> EventDivergence:
    return EventDivergence(
        kind=kind,
        pcr=pcr,
        position=position,
        event_number=act.number if act else None,
        reference_event_number=ref.number if ref else None,
        actual_type=act.type_name if act else None,
        reference_type=ref.type_name if ref else None,
        actual_digest=act.digests[bank] if act else None,
        reference_digest=ref.digests[bank] if ref else None,
        actual_description=act.description if act else "",
        reference_description=ref.description if ref else "",
    )


# --- writer ------------------------------------------------------------------------------

_U32_MAX = 0xFFFFFFFF


class EventLogBuilder:
    """Synthesises a crypto-agile log (simulated measured boot, tests).

    ``add`` returns the :class:`Event` so that a caller can extend a real TPM
    with exactly the digests the log records. Misuse is a programming error
    and raises ValueError.
    """

    def __init__(
        self, banks: Sequence[str] = ("sha256",), startup_locality: int | None = 0
    ) -> None:
        banks = tuple(banks)
        if not banks or len(set(banks)) != len(banks):
            raise ValueError("banks must be a non-empty list without duplicates")
        unknown = [bank for bank in banks if bank not in ALGORITHMS]
        if unknown:
            raise ValueError(f"unknown banks {unknown}; known: {sorted(ALGORITHMS)}")
        if startup_locality is not None and not 0 <= startup_locality <= _HCRTM_LOCALITY:
            raise ValueError("startup_locality must be None or 0..4")
        self._banks = banks
        self._events: list[Event] = []
        self._encoded: tuple[int, bytes] = (-1, b"")  # to_bytes() for how many events
        if startup_locality is not None:
            self.add_no_action(STARTUP_LOCALITY_SIGNATURE + bytes([startup_locality]))

    @property
    def banks(self) -> tuple[str, ...]:
        return self._banks

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(self._events)

    def add(
        self, pcr: int, event_type: int, data: bytes, digest_data: bytes | None = None
    ) -> Event:
        """Log an event whose digests are H(digest_data or data) in every bank."""
        payload = data if digest_data is None else digest_data
        digests = {bank: hashlib.new(ALGORITHMS[bank][2], payload).digest() for bank in self._banks}
        return self.add_digests(pcr, event_type, data, digests)

    def add_digests(
        self, pcr: int, event_type: int, data: bytes, digests: Mapping[str, bytes]
    ) -> Event:
        """Log an event with caller-supplied digests (one per bank, of the right size)."""
        if not 0 <= pcr <= MAX_PCR_INDEX:
            raise ValueError(f"pcr must be 0..{MAX_PCR_INDEX}")
        if not 0 <= event_type <= _U32_MAX or len(data) > _U32_MAX:
            raise ValueError("event_type and len(data) must fit in 32 bits")
        if set(digests) != set(self._banks):
            raise ValueError(f"digests must be given for exactly {list(self._banks)}")
        for bank in self._banks:
            if len(digests[bank]) != digest_size(bank):
                raise ValueError(f"{bank} digest must be {digest_size(bank)} bytes")
        ordered = {bank: bytes(digests[bank]) for bank in self._banks}
        event = Event(len(self._events) + 1, pcr, event_type, ordered, bytes(data))
        self._events.append(event)
        return event

    def add_no_action(self, data: bytes) -> Event:
        """Log an EV_NO_ACTION event in PCR 0 (all-zero digests, never extended)."""
        zeros = {bank: bytes(digest_size(bank)) for bank in self._banks}
        return self.add_digests(0, EV_NO_ACTION, data, zeros)

    def spec_id_bytes(self) -> bytes:
        """The TCG_EfiSpecIDEvent: client platform, spec 2.0 errata 0, UINTN = UINT64."""
        algorithms = b"".join(
            struct.pack("<HH", ALGORITHMS[bank][0], digest_size(bank)) for bank in self._banks
        )
        header = struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(self._banks))
        return SPEC_ID_SIGNATURE + header + algorithms + b"\x00"  # vendorInfoSize 0

    def to_bytes(self) -> bytes:
        """The log's bytes; encoded again only once events were added (an issuer reads
        the log at every quote, and events are only ever appended)."""
        count, encoded = self._encoded
        if count == len(self._events):
            return encoded
        events = self._events[:]  # a snapshot: an event appended meanwhile is encoded next time
        spec_id = self.spec_id_bytes()
        legacy = struct.pack("<II", 0, EV_NO_ACTION) + bytes(_LEGACY_DIGEST_BYTES)
        parts = [legacy, struct.pack("<I", len(spec_id)), spec_id]
        parts.extend(_encode_event2(event) for event in events)
        self._encoded = (len(events), b"".join(parts))
        return self._encoded[1]

    def build(self) -> EventLog:
        """The log as :func:`parse_event_log` sees it."""
        return parse_event_log(self.to_bytes())


def _encode_event2(event: Event) -> bytes:
    parts = [struct.pack("<III", event.pcr, event.event_type, len(event.digests))]
    for bank, digest in event.digests.items():
        parts.append(struct.pack("<H", ALGORITHMS[bank][0]) + digest)
    parts.append(struct.pack("<I", len(event.data)) + event.data)
    return b"".join(parts)
