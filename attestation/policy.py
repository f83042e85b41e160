"""Reference policy: what a known-good node's PCRs and boot events look like.

A policy is a small YAML file meant to be read and edited by hand
(``docs/policy.md`` has the full description)::

    # Trusted Passages reference policy
    version: 1                 # required, must be 1
    name: "known-good-sim"     # required, one printable line
    description: "..."         # optional
    bank: sha256               # optional (default sha256): sha1 sha256 sha384 sha512 sm3_256
    pcrs:                      # optional: exact expected PCR values
      0: "3d45..."             # PCR index 0..23 -> quoted hex of the bank's digest size
    events:                    # optional: expected events, in log order within each PCR
      - pcr: 4
        type: EV_EFI_BOOT_SERVICES_APPLICATION   # EV_* name, EV_UNKNOWN_0x..., or integer
        digest: "ab12..."
        label: "kernel"        # optional free text used in explanations
    unlogged_pcrs: [16]        # optional: quoted PCRs the event log need not explain

At least one of ``pcrs`` and ``events`` must be non-empty. Digests may carry a
``0x`` prefix and any case (so ``tpm2_pcrread`` output can be pasted) but must
be quoted: unquoted YAML turns ``0x3d45...`` or all-digit strings into numbers.
Unknown keys, duplicate keys, out-of-range PCRs and wrong digest lengths are
errors that name the offending field (``pcrs.4: expected 64 hex characters``).

Evaluation fails closed:

* a PCR named by the policy (in ``pcrs`` or ``events``) but not quoted is a mismatch;
* an ``events`` section with no event log, or with a log lacking the bank, is a mismatch;
* expected events of a PCR are only compared once the log's replay of that PCR
  equals the quoted value (otherwise the log is not evidence of anything);
* for each PCR in ``events`` the log's events (EV_NO_ACTION excluded) must be
  exactly the listed ones, in order. PCRs not listed in ``events`` are not
  compared event by event.

``evaluate_policy`` takes the quoted PCR values of the policy's bank.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from attestation.encoding import describe_value, require_int
from attestation.errors import EventLogError, FileInputError, PolicyError
from attestation.eventlog import (
    ALGORITHMS,
    Event,
    EventLog,
    compare_with_pcrs,
    event_type_name,
    event_type_value,
    initial_pcr_value,
    replay,
    short_hex,
)
from attestation.files import read_bounded
from attestation.strict_yaml import load_yaml

__all__ = [
    "MAX_POLICY_BYTES",
    "POLICY_VERSION",
    "EventCountMismatch",
    "EventLogUnusable",
    "EventMismatch",
    "ExpectedEvent",
    "LogReplayMismatch",
    "PcrNotQuoted",
    "PcrValueMismatch",
    "PolicyMismatch",
    "ReferencePolicy",
    "dump_policy",
    "evaluate_policy",
    "load_policy",
    "policy_from_evidence",
]

POLICY_VERSION = 1
MAX_POLICY_BYTES = 128 * 1024
"""A full-event policy of a real machine is 10-70 KiB. Pure-Python PyYAML parses
hostile token soup at only ~75 KiB/s, so this bounds a load to about 2 s. (The
libyaml CSafeLoader would be faster but segfaults on deep nesting.)"""
MAX_EXPECTED_EVENTS = 65536
MAX_PCR = 23
MAX_TEXT_CHARS = 200
MAX_DESCRIPTION_CHARS = 2000
_U32_MAX = 0xFFFFFFFF

_TOP_LEVEL_KEYS = ("version", "name", "description", "bank", "pcrs", "events", "unlogged_pcrs")
_EVENT_KEYS = ("pcr", "type", "digest", "label")


# --- data model ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedEvent:
    """One event the log must contain, at this position among its PCR's events."""

    pcr: int
    event_type: int
    digest: bytes
    label: str = ""

    @property
    def type_name(self) -> str:
        return event_type_name(self.event_type)

    def name(self) -> str:
        """How messages refer to it: its label, else type and digest."""
        return self.label or f"{self.type_name} {short_hex(self.digest)}"


@dataclass(frozen=True)
class ReferencePolicy:
    """A validated reference policy (construction validates; errors are PolicyError)."""

    name: str
    bank: str = "sha256"
    pcrs: dict[int, bytes] = field(default_factory=dict, hash=False)
    events: tuple[ExpectedEvent, ...] = ()
    description: str = ""
    version: int = POLICY_VERSION
    unlogged_pcrs: tuple[int, ...] = ()
    """Quoted PCRs the event log need not explain (the verifier's ``event_log`` check
    otherwise requires the log to reproduce every quoted PCR)."""

    def __post_init__(self) -> None:
        if (not isinstance(self.pcrs, Mapping) or not isinstance(self.events, Sequence)
                or not isinstance(self.unlogged_pcrs, Sequence)):
            raise PolicyError("policy: pcrs must be a mapping, events and unlogged_pcrs "
                              "sequences")
        _validate_policy(self)
        # Sorted copies: stable dumps, equality by value, no aliasing of the caller's data.
        object.__setattr__(self, "pcrs", dict(sorted(self.pcrs.items())))
        object.__setattr__(self, "events", tuple(self.events))
        object.__setattr__(self, "unlogged_pcrs", tuple(sorted(self.unlogged_pcrs)))

    def event_pcrs(self) -> list[int]:
        """PCRs whose events the policy lists, sorted."""
        return sorted({ev.pcr for ev in self.events})

    def expected_events(self, pcr: int) -> list[ExpectedEvent]:
        return [ev for ev in self.events if ev.pcr == pcr]


def _validate_policy(policy: ReferencePolicy) -> None:
    require_int(policy.version, "version", PolicyError, exactly=POLICY_VERSION)
    _check_text(policy.name, "name", MAX_TEXT_CHARS, required=True)
    _check_text(policy.description, "description", MAX_DESCRIPTION_CHARS)
    if policy.bank not in ALGORITHMS:
        raise PolicyError(f"bank: {policy.bank!r} is not one of {', '.join(ALGORITHMS)}")
    size = ALGORITHMS[policy.bank][1]
    for pcr, value in policy.pcrs.items():
        _check_pcr_index(pcr, f"pcrs.{pcr}")
        if not isinstance(value, bytes) or len(value) != size:
            raise PolicyError(f"pcrs.{pcr}: expected a {size}-byte {policy.bank} value")
    if len(policy.events) > MAX_EXPECTED_EVENTS:
        raise PolicyError(f"events: more than {MAX_EXPECTED_EVENTS} entries")
    for index, event in enumerate(policy.events):
        _validate_expected_event(event, f"events[{index}]", size)
    _validate_unlogged(policy)
    if not policy.pcrs and not policy.events:
        raise PolicyError("policy: neither pcrs nor events is given, so it would check nothing")


def _validate_expected_event(event: ExpectedEvent, path: str, size: int) -> None:
    if not isinstance(event, ExpectedEvent):
        raise PolicyError(f"{path}: expected an ExpectedEvent")
    _check_pcr_index(event.pcr, f"{path}.pcr")
    require_int(event.event_type, f"{path}.type", PolicyError, minimum=0, maximum=_U32_MAX,
                noun="event type")
    if not isinstance(event.digest, bytes) or len(event.digest) != size:
        raise PolicyError(f"{path}.digest: expected {size} bytes")
    _check_text(event.label, f"{path}.label", MAX_TEXT_CHARS)


def _validate_unlogged(policy: ReferencePolicy) -> None:
    seen: set[int] = set()
    for index, pcr in enumerate(policy.unlogged_pcrs):
        _check_pcr_index(pcr, f"unlogged_pcrs[{index}]")
        if pcr in seen:
            raise PolicyError(f"unlogged_pcrs[{index}]: PCR {pcr} is listed twice")
        seen.add(pcr)
    # Expected events of a PCR are only compared when the log replays to it, so a PCR
    # cannot be both explained event by event and exempt from the log.
    both = sorted(seen & set(policy.event_pcrs()))
    if both:
        raise PolicyError(f"unlogged_pcrs: PCR {both[0]} also has expected events")


def _check_pcr_index(pcr: object, path: str) -> int:
    return require_int(pcr, path, PolicyError, minimum=0, maximum=MAX_PCR, noun="PCR index")


def _check_text(value: object, path: str, limit: int, *, required: bool = False) -> None:
    if not isinstance(value, str):
        raise PolicyError(f"{path}: expected a string")
    if required and not value.strip():
        raise PolicyError(f"{path}: must not be empty")
    if len(value) > limit:
        raise PolicyError(f"{path}: longer than {limit} characters")
    # One printable line: it is echoed in messages and re-dumped as YAML.
    if not value.isprintable():
        raise PolicyError(f"{path}: must be a single line of printable characters")


# --- loading --------------------------------------------------------------------------


def load_policy(source: str | bytes | os.PathLike[str]) -> ReferencePolicy:
    """Load and validate a policy.

    ``source`` is YAML text (``str`` or UTF-8 ``bytes``) or a path
    (``pathlib.Path`` / ``os.PathLike``: a plain ``str`` is always text).
    Raises :class:`PolicyError` naming the offending field.
    """
    text = _read_source(source)
    return _policy_from_document(load_yaml(text, "policy", PolicyError))


def _read_source(source: str | bytes | os.PathLike[str]) -> str:
    if isinstance(source, os.PathLike):
        source = _read_file(Path(source))
    if isinstance(source, bytes):
        if len(source) > MAX_POLICY_BYTES:
            raise PolicyError(f"policy: larger than {MAX_POLICY_BYTES} bytes")
        try:
            return source.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PolicyError(
                f"policy: not valid UTF-8 ({exc.reason} at byte {exc.start})"
            ) from exc
    if not isinstance(source, str):
        raise PolicyError(f"policy: expected text, bytes or a path, not {type(source).__name__}")
    if len(source) > MAX_POLICY_BYTES:
        raise PolicyError(f"policy: larger than {MAX_POLICY_BYTES} characters")
    return source


def _read_file(path: Path) -> bytes:
    try:
        return read_bounded(path, MAX_POLICY_BYTES, what="policy file")
    except FileInputError as exc:
        raise PolicyError(str(exc)) from None


def _policy_from_document(document: object) -> ReferencePolicy:
    if document is None:
        raise PolicyError("policy: the document is empty")
    if not isinstance(document, dict):
        raise PolicyError(
            f"policy: expected a mapping at the top level, got {_kind(document)} "
            "(to load a file, pass a pathlib.Path)"
        )
    for key in document:
        if key not in _TOP_LEVEL_KEYS:
            allowed = ", ".join(_TOP_LEVEL_KEYS)
            raise PolicyError(f"{_show(key)}: unknown key (allowed: {allowed})")
    _check_version(document.get("version"))
    name = _text_field(document, "name", MAX_TEXT_CHARS, required=True)
    description = _text_field(document, "description", MAX_DESCRIPTION_CHARS)
    bank = _bank_field(document.get("bank", "sha256"))
    size = ALGORITHMS[bank][1]
    pcrs = _pcrs_field(document.get("pcrs"), size)
    events = _events_field(document.get("events"), size)
    unlogged = _unlogged_field(document.get("unlogged_pcrs"))
    return ReferencePolicy(name, bank, pcrs, events, description, unlogged_pcrs=unlogged)


def _show(value: object) -> str:
    """A key or value as it may appear in an error: short, one line."""
    text = value if isinstance(value, str) else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 40 else text[:39] + "…"


def _kind(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), f"a {type(value).__name__}")


def _check_version(version: object) -> None:
    if version is None:
        raise PolicyError("version: missing (must be 1)")
    require_int(version, "version", PolicyError, exactly=POLICY_VERSION)


def _text_field(
    document: Mapping[object, object],
    key: str,
    limit: int,
    *,
    parent: str = "",
    required: bool = False,
) -> str:
    value = document.get(key)
    path = f"{parent}.{key}" if parent else key
    if value is None:
        if required:
            raise PolicyError(f"{path}: missing")
        return ""
    _check_text(value, path, limit, required=required)
    assert isinstance(value, str)  # narrowed by _check_text
    return value


def _bank_field(bank: object) -> str:
    if not isinstance(bank, str) or bank not in ALGORITHMS:
        raise PolicyError(f"bank: {_show(bank)} is not one of {', '.join(ALGORITHMS)}")
    return bank


def _pcrs_field(value: object, size: int) -> dict[int, bytes]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PolicyError(f"pcrs: expected a mapping of PCR index to hex value, got {_kind(value)}")
    pcrs: dict[int, bytes] = {}
    for key, digest in value.items():
        path = f"pcrs.{_show(key)}"
        pcr = _pcr_key(key, path)
        if pcr in pcrs:  # e.g. both 4 and "4"
            raise PolicyError(f"{path}: PCR {pcr} is given twice")
        pcrs[pcr] = _hex_digest(digest, path, size)
    return pcrs


def _pcr_key(key: object, path: str) -> int:
    # Accept "4" as well as 4: quoting keys is a common hand-editing habit.
    if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 2:
        key = int(key)
    return _check_pcr_index(key, path)


def _hex_digest(value: object, path: str, size: int) -> bytes:
    if isinstance(value, int | float):
        raise PolicyError(
            f"{path}: expected a quoted hex string of {2 * size} characters, got a number "
            "(YAML reads unquoted 0x... or all-digit values as numbers: add quotes)"
        )
    if not isinstance(value, str):
        raise PolicyError(f"{path}: expected a quoted hex string, got {_kind(value)}")
    text = value.strip()
    text = text[2:] if text[:2] in ("0x", "0X") else text
    if len(text) != 2 * size or not all(ch in "0123456789abcdefABCDEF" for ch in text):
        raise PolicyError(f"{path}: expected {2 * size} hex characters")
    return bytes.fromhex(text)


def _unlogged_field(value: object) -> tuple[int, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError("unlogged_pcrs: expected a list of PCR indices, "
                          f"got {describe_value(value)}")
    if len(value) > MAX_PCR + 1:
        raise PolicyError(f"unlogged_pcrs: more than {MAX_PCR + 1} entries")
    return tuple(_check_pcr_index(pcr, f"unlogged_pcrs[{index}]")
                 for index, pcr in enumerate(value))


def _events_field(value: object, size: int) -> tuple[ExpectedEvent, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise PolicyError(f"events: expected a list, got {_kind(value)}")
    if len(value) > MAX_EXPECTED_EVENTS:
        raise PolicyError(f"events: more than {MAX_EXPECTED_EVENTS} entries")
    return tuple(_event_entry(item, f"events[{index}]", size) for index, item in enumerate(value))


def _event_entry(item: object, path: str, size: int) -> ExpectedEvent:
    if not isinstance(item, dict):
        raise PolicyError(f"{path}: expected a mapping with pcr, type, digest, got {_kind(item)}")
    for key in item:
        if key not in _EVENT_KEYS:
            allowed = ", ".join(_EVENT_KEYS)
            raise PolicyError(f"{path}.{_show(key)}: unknown key (allowed: {allowed})")
    for key in ("pcr", "type", "digest"):
        if key not in item:
            raise PolicyError(f"{path}.{key}: missing")
    pcr = _check_pcr_index(item["pcr"], f"{path}.pcr")
    event_type = _event_type(item["type"], f"{path}.type")
    digest = _hex_digest(item["digest"], f"{path}.digest", size)
    label = _text_field(item, "label", MAX_TEXT_CHARS, parent=path)
    return ExpectedEvent(pcr, event_type, digest, label)


def _event_type(value: object, path: str) -> int:
    if not isinstance(value, str):
        return require_int(value, path, PolicyError, minimum=0, maximum=_U32_MAX,
                           noun="event type")
    number = event_type_value(value.strip())
    if number is not None:
        return number
    raise PolicyError(
        f"{path}: {_show(value)} is not an event type (use an EV_* name such as "
        "EV_EFI_BOOT_SERVICES_APPLICATION, EV_UNKNOWN_0x0000ABCD, or a 32-bit integer)"
    )


# --- dumping ----------------------------------------------------------------------------


def _quoted(text: str) -> str:
    # PyYAML's own emitter: single-quoted when it can (no escapes for a human to
    # puzzle over), double-quoted otherwise; whatever it writes, it reads back.
    return yaml.safe_dump(text, default_style="'", allow_unicode=True, width=10**6).rstrip("\n")


def dump_policy(policy: ReferencePolicy) -> str:
    """Stable, commented YAML that :func:`load_policy` reads back to an equal policy."""
    lines = [
        "# Trusted Passages reference policy (format: docs/policy.md).",
        f"# Digests are hex in the {policy.bank} bank; keep them quoted.",
        f"version: {policy.version}",
        f"name: {_quoted(policy.name)}",
    ]
    if policy.description:
        lines.append(f"description: {_quoted(policy.description)}")
    lines.append(f"bank: {policy.bank}")
    if policy.pcrs:
        lines += ["", "# Exact PCR values the quote must contain.", "pcrs:"]
        lines += [f'  {pcr}: "{value.hex()}"' for pcr, value in policy.pcrs.items()]
    if policy.unlogged_pcrs:
        lines += ["", "# Quoted PCRs the event log need not explain.",
                  f"unlogged_pcrs: [{', '.join(map(str, policy.unlogged_pcrs))}]"]
    if policy.events:
        lines += [
            "",
            "# Expected events, in log order within each PCR (EV_NO_ACTION not listed).",
            "# For each PCR listed here the log must contain exactly these events.",
            "events:",
        ]
        lines += _dump_events(policy.events)
    return "\n".join(lines) + "\n"


def _dump_events(events: Sequence[ExpectedEvent]) -> list[str]:
    lines: list[str] = []
    previous: int | None = None
    for event in events:
        if event.pcr != previous:
            lines.append(f"  # PCR {event.pcr}")
            previous = event.pcr
        lines += [
            f"  - pcr: {event.pcr}",
            f"    type: {event.type_name}",
            f'    digest: "{event.digest.hex()}"',
        ]
        if event.label:
            lines.append(f"    label: {_quoted(event.label)}")
    return lines


# --- creation from a known-good node ---------------------------------------------------


def policy_from_evidence(
    pcrs: Mapping[int, bytes],
    log: EventLog | None,
    *,
    name: str,
    bank: str = "sha256",
    labels: Mapping[tuple[int, int], str] | None = None,
    description: str = "",
    unlogged_pcrs: Sequence[int] = (),
) -> ReferencePolicy:
    """A policy that accepts exactly this node's evidence.

    ``pcrs`` are the node's quoted values in ``bank``; all become expected
    values. With a log, the events of every quoted PCR become expected
    events; the log must first replay to the quoted values (a policy made
    from inconsistent evidence would only ever fail). ``labels`` names
    events by (pcr, position), position counting from 1 within the PCR's
    events (EV_NO_ACTION excluded); unlabelled events get their description.
    ``unlogged_pcrs`` are quoted PCRs the log need not explain: they get no expected
    events and are carried into the policy.
    """
    expected_pcrs = dict(pcrs)
    events: tuple[ExpectedEvent, ...] = ()
    if log is not None:
        _check_consistent(expected_pcrs, log, bank, unlogged_pcrs)
        logged = {pcr: value for pcr, value in expected_pcrs.items() if pcr not in unlogged_pcrs}
        events = _events_from_log(logged, log, bank, labels or {})
    return ReferencePolicy(name, bank, expected_pcrs, events, description,
                           unlogged_pcrs=tuple(unlogged_pcrs))


def _check_consistent(pcrs: Mapping[int, bytes], log: EventLog, bank: str,
                      unlogged: Sequence[int]) -> None:
    if bank not in ALGORITHMS:
        raise PolicyError(f"bank: {bank!r} is not one of {', '.join(ALGORITHMS)}")
    try:
        mismatches = compare_with_pcrs(log, pcrs, bank, unlogged=unlogged)
    except EventLogError as exc:
        raise PolicyError(f"cannot use the event log: {exc}") from exc
    if mismatches:
        raise PolicyError(
            "refusing to create a policy from inconsistent evidence: " + mismatches[0].describe()
        )


def _events_from_log(
    pcrs: Mapping[int, bytes],
    log: EventLog,
    bank: str,
    labels: Mapping[tuple[int, int], str],
) -> tuple[ExpectedEvent, ...]:
    expected: list[ExpectedEvent] = []
    for pcr in sorted(pcrs):
        for position, event in enumerate(log.events_for(pcr), start=1):
            label = labels.get((pcr, position), event.description)
            expected.append(ExpectedEvent(pcr, event.event_type, event.digests[bank], label))
    return tuple(expected)


# --- evaluation -------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyMismatch:
    """One way the evidence differs from the policy. ``describe()`` says it in words."""

    kind: ClassVar[str] = "mismatch"
    pcr: int | None

    def to_dict(self) -> dict[str, Any]:
        """Every field, digests in full hex: what JSON output carries."""
        return {"kind": self.kind, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)}}

    def describe(self) -> str:
        raise NotImplementedError


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class PcrValueMismatch(PolicyMismatch):
    kind: ClassVar[str] = "pcr_value"
    actual: bytes
    expected: bytes

    def describe(self) -> str:
        return (
            f"PCR {self.pcr} is {short_hex(self.actual)} but the policy expects "
            f"{short_hex(self.expected)}"
        )


@dataclass(frozen=True)
class PcrNotQuoted(PolicyMismatch):
    kind: ClassVar[str] = "pcr_not_quoted"

    def describe(self) -> str:
        return f"PCR {self.pcr} is required by the policy but was not quoted"


@dataclass(frozen=True)
class EventLogUnusable(PolicyMismatch):
    kind: ClassVar[str] = "event_log_unusable"
    reason: str

    def describe(self) -> str:
        return f"the policy lists expected events, but {self.reason}"


@dataclass(frozen=True)
class LogReplayMismatch(PolicyMismatch):
    kind: ClassVar[str] = "log_replay"
    replayed: bytes
    quoted: bytes

    def describe(self) -> str:
        return (
            f"PCR {self.pcr}: the event log replays to {short_hex(self.replayed)} but the quoted "
            f"value is {short_hex(self.quoted)}, so the log cannot be trusted for this PCR "
            "and its events were not compared"
        )


@dataclass(frozen=True)
class EventMismatch(PolicyMismatch):
    kind: ClassVar[str] = "event"
    position: int
    event_number: int
    label: str
    actual_type: int
    expected_type: int
    actual_digest: bytes
    expected_digest: bytes

    def describe(self) -> str:
        where = f"log event #{self.event_number}"
        name = f"{self.label}, {where}" if self.label else where
        head = f"PCR {self.pcr}: event {self.position} ({name})"
        if self.actual_type == self.expected_type:
            return (
                f"{head} has digest {short_hex(self.actual_digest)} but the policy expects "
                f"{short_hex(self.expected_digest)}"
            )
        actual, expected = event_type_name(self.actual_type), event_type_name(self.expected_type)
        if self.actual_digest == self.expected_digest:
            return f"{head} is {actual} but the policy expects {expected}"
        return (
            f"{head} is {actual} {short_hex(self.actual_digest)} but the policy expects "
            f"{expected} {short_hex(self.expected_digest)}"
        )


@dataclass(frozen=True)
class EventCountMismatch(PolicyMismatch):
    kind: ClassVar[str] = "event_count"
    actual_count: int
    expected_count: int
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()

    def describe(self) -> str:
        text = (
            f"PCR {self.pcr}: the log has {_plural(self.actual_count, 'event')}, "
            f"the policy expects {self.expected_count}"
        )
        if self.missing:
            text += f" (missing: {', '.join(self.missing)})"
        if self.unexpected:
            text += f" (unexpected: {', '.join(self.unexpected)})"
        return text


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def evaluate_policy(
    policy: ReferencePolicy, pcrs: Mapping[int, bytes], log: EventLog | None
) -> list[PolicyMismatch]:
    """Every way ``pcrs`` (quoted, in ``policy.bank``) and ``log`` differ from ``policy``.

    An empty list means the evidence satisfies the policy.
    """
    required = sorted(set(policy.pcrs) | set(policy.event_pcrs()))
    mismatches: list[PolicyMismatch] = [PcrNotQuoted(pcr) for pcr in required if pcr not in pcrs]
    for pcr, expected in policy.pcrs.items():
        if pcr in pcrs and pcrs[pcr] != expected:
            mismatches.append(PcrValueMismatch(pcr, pcrs[pcr], expected))
    if policy.events:
        mismatches += _evaluate_events(policy, pcrs, log)
    return mismatches


def _evaluate_events(
    policy: ReferencePolicy, pcrs: Mapping[int, bytes], log: EventLog | None
) -> list[PolicyMismatch]:
    if log is None:
        return [EventLogUnusable(None, "no event log was supplied")]
    try:
        replayed = replay(log, policy.bank)
    except EventLogError as exc:
        return [EventLogUnusable(None, f"the event log cannot be replayed: {exc}")]
    mismatches: list[PolicyMismatch] = []
    for pcr in policy.event_pcrs():
        if pcr not in pcrs:
            continue  # already reported as not quoted
        # A PCR the log never mentions must still be at its reset value.
        value = replayed.get(pcr, initial_pcr_value(log, pcr, policy.bank))
        if value != pcrs[pcr]:
            mismatches.append(LogReplayMismatch(pcr, value, pcrs[pcr]))
            continue
        actual = log.events_for(pcr)
        mismatches += _compare_events(pcr, policy.expected_events(pcr), actual, policy.bank)
    return mismatches


def _compare_events(
    pcr: int, expected: Sequence[ExpectedEvent], actual: Sequence[Event], bank: str
) -> list[PolicyMismatch]:
    mismatches: list[PolicyMismatch] = []
    for position, (want, got) in enumerate(zip(expected, actual, strict=False), start=1):
        digest = got.digests[bank]
        if want.event_type != got.event_type or want.digest != digest:
            label = want.label or got.description
            mismatches.append(
                EventMismatch(
                    pcr=pcr,
                    position=position,
                    event_number=got.number,
                    label=label,
                    actual_type=got.event_type,
                    expected_type=want.event_type,
                    actual_digest=digest,
                    expected_digest=want.digest,
                )
            )
    if len(expected) != len(actual):
        missing = tuple(ev.name() for ev in expected[len(actual) :])
        unexpected = tuple(ev.summary() for ev in actual[len(expected) :])
        mismatches.append(EventCountMismatch(pcr, len(actual), len(expected), missing, unexpected))
    return mismatches
