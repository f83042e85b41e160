"""Tests for attestation.policy: loading, dumping, creation from evidence, evaluation."""

from __future__ import annotations

import contextlib
import hashlib
import re
import struct
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.errors import PolicyError
from attestation.eventlog import EventLog, EventLogBuilder, replay
from attestation.policy import (
    MAX_POLICY_BYTES,
    EventCountMismatch,
    EventLogUnusable,
    EventMismatch,
    ExpectedEvent,
    LogReplayMismatch,
    PcrNotQuoted,
    PcrValueMismatch,
    PolicyMismatch,
    ReferencePolicy,
    dump_policy,
    evaluate_policy,
    load_policy,
    policy_from_evidence,
)

EV_SEPARATOR = 0x4
EV_IPL = 0xD
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_ACTION = 0x80000007

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # cases: profile
LABELS = {(4, 3): "kernel", (9, 1): "kernel file", (9, 2): "command line"}


def boot_log(
    kernel: bytes = b"kernel v1",
    cmdline: bytes | None = b"console=ttyS0",
    secure_boot: bytes = b"\x01",
    banks: tuple[str, ...] = ("sha256",),
) -> EventLog:
    """A small measured boot: PCR 0, 4 (boot app, kernel), 7 (SecureBoot), 9 (grub)."""
    b = EventLogBuilder(banks, startup_locality=0)
    b.add(0, 0x8, "1.0\0".encode("utf-16-le"))
    name = "SecureBoot".encode("utf-16-le")
    variable = bytes(16) + struct.pack("<QQ", 10, len(secure_boot)) + name + secure_boot
    b.add(7, EV_EFI_VARIABLE_DRIVER_CONFIG, variable)
    b.add(4, EV_EFI_ACTION, b"Calling EFI Application from Boot Option")
    for pcr in (0, 4, 7):
        b.add(pcr, EV_SEPARATOR, bytes(4))
    b.add(4, EV_EFI_BOOT_SERVICES_APPLICATION, b"\x00" * 32, digest_data=kernel)
    b.add(9, EV_IPL, b"/boot/vmlinuz\0", digest_data=kernel)
    if cmdline is not None:
        b.add(9, EV_IPL, b"grub_cmd: linux /boot/vmlinuz " + cmdline + b"\0")
    return b.build()


def known_good() -> tuple[ReferencePolicy, dict[int, bytes], EventLog]:
    log = boot_log()
    pcrs = replay(log)
    return policy_from_evidence(pcrs, log, name="known-good-sim", labels=LABELS), pcrs, log


def describe_all(mismatches: list[PolicyMismatch]) -> list[str]:
    return [m.describe() for m in mismatches]


# --- creation, dump and load ------------------------------------------------------------------


def test_policy_from_evidence_round_trips_and_accepts_its_evidence() -> None:
    policy, pcrs, log = known_good()
    assert policy.pcrs == pcrs
    assert [(e.pcr, e.label) for e in policy.events if e.pcr in (4, 9)] == [
        (4, "Calling EFI Application from Boot Option"),
        (4, "separator"),
        (4, "kernel"),
        (9, "kernel file"),
        (9, "command line"),
    ]
    text = dump_policy(policy)
    assert text.startswith("# Trusted Passages reference policy")
    assert load_policy(text) == policy
    assert dump_policy(load_policy(text)) == text  # stable
    assert evaluate_policy(policy, pcrs, log) == []
    assert evaluate_policy(load_policy(text), pcrs, log) == []


def test_load_from_path_and_bytes(tmp_path: Path) -> None:
    policy, _, _ = known_good()
    path = tmp_path / "policy.yaml"
    path.write_text(dump_policy(policy), encoding="utf-8")
    assert load_policy(path) == policy
    assert load_policy(path.read_bytes()) == policy
    with pytest.raises(PolicyError, match=r"policy file .*missing\.yaml does not exist"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match=r"pass a pathlib\.Path"):
        load_policy(str(path))


def test_policy_without_log_has_only_pcrs() -> None:
    policy = policy_from_evidence({7: b"\x11" * 48}, None, name="pcr7", bank="sha384")
    assert policy.events == ()
    assert load_policy(dump_policy(policy)) == policy
    assert "events:" not in dump_policy(policy)


def test_creation_refuses_inconsistent_evidence() -> None:
    log = boot_log()
    pcrs = replay(log)
    pcrs[4] = b"\x00" * 32
    with pytest.raises(PolicyError, match="inconsistent evidence: PCR 4"):
        policy_from_evidence(pcrs, log, name="x")
    with pytest.raises(PolicyError, match="no sha1 digests"):
        policy_from_evidence(replay(log), log, name="x", bank="sha1")
    with pytest.raises(PolicyError, match="check nothing"):
        policy_from_evidence({}, log, name="x")


HAND_EDITED = """\
# Trusted Passages reference policy -- edited by hand on 2024-05-01.
# PCR 7 pasted from `tpm2_pcrread sha256:7` (0x prefix, upper case).

version: 1
name: lab node 3   # plain scalars are fine for names
description: >-
  Secure Boot on, our own kernel.
bank: sha256
pcrs:
  "7": "0X{pcr7}"     # quoted keys are accepted too
events:
  - {{pcr: 9, type: EV_IPL, digest: "{kfile}", label: kernel file}}
  - pcr: 9
    type: 13          # numeric types are allowed
    digest: '{cmd}'
    # no label: messages then fall back to the type and digest
"""


def test_hand_edited_policy_with_comments_loads() -> None:
    log = boot_log()
    pcrs = replay(log)
    pcr9 = log.events_for(9)
    text = HAND_EDITED.format(
        pcr7=pcrs[7].hex().upper(),
        kfile=pcr9[0].digests["sha256"].hex(),
        cmd=pcr9[1].digests["sha256"].hex(),
    )
    policy = load_policy(text)
    assert policy.name == "lab node 3"
    assert policy.description == "Secure Boot on, our own kernel."
    assert policy.pcrs == {7: pcrs[7]}
    assert [e.event_type for e in policy.events] == [EV_IPL, EV_IPL]
    assert policy.events[1].label == ""
    assert evaluate_policy(policy, pcrs, log) == []
    assert load_policy(dump_policy(policy)) == policy


# --- validation ---------------------------------------------------------------------------------

SHA = "ab" * 32


def minimal(**overrides: object) -> str:
    document: dict[str, object] = {"version": 1, "name": "p", "pcrs": {0: SHA}}
    document.update(overrides)
    return yaml.safe_dump({k: v for k, v in document.items() if v is not None})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (minimal(version=2), "version: must be the integer 1, got the integer 2"),
        (minimal(version=True), "version: must be the integer 1, got a boolean true"),
        (minimal(version=1.0), "version: must be the integer 1, got a float 1.0"),
        (minimal(version="1"), "version: must be the integer 1, got a string '1'"),
        ("name: p\npcrs: {0: '" + SHA + "'}\n", "version: missing"),
        (minimal(name=""), "name: must not be empty"),
        (minimal(name=None), "name: missing"),
        (minimal(name="two\nlines"), "name: must be a single line"),
        (minimal(name=["x"]), "name: expected a string"),
        (minimal(bank="md5"), "bank: md5 is not one of"),
        (minimal(pcrs={24: SHA}),
         "pcrs.24: PCR index must be an integer 0..23, got the integer 24"),
        (minimal(pcrs={-1: SHA}),
         "pcrs.-1: PCR index must be an integer 0..23, got the integer -1"),
        (minimal(pcrs={True: SHA}),
         "pcrs.True: PCR index must be an integer 0..23, got a boolean true"),
        (minimal(pcrs={4.0: SHA}), "PCR index must be an integer 0..23, got a float 4.0"),
        (minimal(events=[{"pcr": True, "type": "EV_IPL", "digest": SHA}]),
         "events[0].pcr: PCR index must be an integer 0..23, got a boolean true"),
        (minimal(events=[{"pcr": 4, "type": 1.0, "digest": SHA}]),
         "events[0].type: event type must be an integer 0..4294967295, got a float 1.0"),
        (minimal(pcrs={4: "ab" * 20}), "pcrs.4: expected 64 hex characters"),
        (minimal(pcrs={4: "zz" * 32}), "pcrs.4: expected 64 hex characters"),
        (minimal(pcrs={4: 12345}), "pcrs.4: expected a quoted hex string of 64 characters"),
        ("version: 1\nname: p\npcrs:\n  4: 0x" + SHA + "\n", "got a number"),
        (minimal(pcrs={4: None}), "pcrs.4: expected a quoted hex string, got a NoneType"),
        (minimal(pcrs={4: SHA, "4": SHA}), "pcrs.4: PCR 4 is given twice"),
        (minimal(pcrs=[SHA]), "pcrs: expected a mapping"),
        (minimal(pcrs={}), "check nothing"),
        (minimal(pcrs=None), "check nothing"),
        (minimal(extra=1), "extra: unknown key"),
        ("x" * 500 + ": 1\n", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx…: unknown key"),
        (minimal(pcrs={"٤": SHA}), "pcrs.٤: PCR index"),
        (minimal(events={}), "events: expected a list"),
        (minimal(events=["x"]), "events[0]: expected a mapping"),
        (minimal(events=[{"pcr": 4, "type": "EV_IPL"}]), "events[0].digest: missing"),
        (
            minimal(events=[{"pcr": 4, "type": "EV_IPL", "digest": SHA, "colour": 1}]),
            "events[0].colour: unknown key",
        ),
        (
            minimal(events=[{"pcr": 4, "type": "EV_NOPE", "digest": SHA}]),
            "events[0].type: EV_NOPE is not an event type",
        ),
        (
            minimal(events=[{"pcr": 4, "type": 2**32, "digest": SHA}]),
            "events[0].type",
        ),
        (
            minimal(events=[{"pcr": 30, "type": "EV_IPL", "digest": SHA}]),
            "events[0].pcr: PCR index",
        ),
        (
            minimal(events=[{"pcr": 4, "type": "EV_IPL", "digest": SHA[:-2]}]),
            "events[0].digest: expected 64 hex characters",
        ),
        (
            minimal(events=[{"pcr": 4, "type": "EV_IPL", "digest": SHA, "label": "a\tb"}]),
            "events[0].label: must be a single line",
        ),
        ("version: 1\nname: p\npcrs:\n  0: '" + SHA + "'\n  0: '" + SHA + "'\n", "duplicate key"),
        ("version: 1\nversion: 1\n", "duplicate key"),
        ("", "the document is empty"),
        ("- a\n- b\n", "expected a mapping at the top level, got a list"),
        ("just text", "got a string"),
        ("version: [1\n", "not valid YAML"),
        ("version: 1\nname: 2024-02-30\n", "invalid YAML value"),
        ("[" * 1500 + "]" * 1500, "policy:"),
        ("? [a]\n: 1\n", "unhashable"),
        ("x: !!python/object:os.system ls\n", "not valid YAML"),
        ("\x00", "not valid YAML"),
    ],
)
def test_invalid_policies_name_the_field(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        load_policy(text)


def test_input_limits() -> None:
    with pytest.raises(PolicyError, match="larger than"):
        load_policy("#" * (MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(b"#" * (MAX_POLICY_BYTES + 1))
    with pytest.raises(PolicyError, match="not valid UTF-8"):
        load_policy(b"version: 1\nname: \xff\n")
    with pytest.raises(PolicyError, match="expected text, bytes or a path"):
        load_policy(42)  # type: ignore[arg-type]


def test_constructing_an_invalid_policy_raises_policy_error() -> None:
    with pytest.raises(PolicyError, match=r"pcrs\.4"):
        ReferencePolicy("p", "sha256", {4: b"short"})
    with pytest.raises(PolicyError, match=r"events\[0\].digest"):
        ReferencePolicy("p", "sha256", {}, (ExpectedEvent(4, EV_IPL, b"\x00" * 20),))
    with pytest.raises(PolicyError, match="bank"):
        ReferencePolicy("p", "sha3", {4: b"\x00" * 32})
    with pytest.raises(PolicyError, match=r"pcrs\.a: PCR index"):
        ReferencePolicy("p", "sha256", {4: b"\x00" * 32, "a": b"\x00" * 32})  # type: ignore[dict-item]
    listed = ReferencePolicy("p", events=[ExpectedEvent(4, EV_IPL, bytes(32))])  # type: ignore[arg-type]
    assert listed.events == (ExpectedEvent(4, EV_IPL, bytes(32)),)


# --- evaluation: every mismatch kind in words ----------------------------------------------------


def test_pcr_value_mismatch() -> None:
    _, pcrs, _ = known_good()
    quoted = dict(pcrs)
    quoted[7] = b"\x1a\x2b" + bytes(30)
    mismatches = evaluate_policy(ReferencePolicy("p", pcrs={7: pcrs[7]}), quoted, None)
    assert mismatches == [PcrValueMismatch(7, quoted[7], pcrs[7])]
    assert mismatches[0].describe() == (
        f"PCR 7 is 1a2b000000000000… but the policy expects {pcrs[7].hex()[:16]}…"
    )
    assert mismatches[0].kind == "pcr_value"


def test_pcr_not_quoted() -> None:
    policy, pcrs, log = known_good()
    del pcrs[9]
    mismatches = evaluate_policy(policy, pcrs, log)
    assert describe_all(mismatches) == ["PCR 9 is required by the policy but was not quoted"]
    assert isinstance(mismatches[0], PcrNotQuoted)


def test_events_without_a_log() -> None:
    policy, pcrs, _ = known_good()
    mismatches = evaluate_policy(policy, pcrs, None)
    assert describe_all(mismatches) == [
        "the policy lists expected events, but no event log was supplied"
    ]
    assert isinstance(mismatches[0], EventLogUnusable) and mismatches[0].pcr is None


def test_events_with_a_log_lacking_the_bank() -> None:
    policy, pcrs, _ = known_good()
    sha1_log = boot_log(banks=("sha1",))
    (mismatch,) = evaluate_policy(policy, pcrs, sha1_log)
    assert isinstance(mismatch, EventLogUnusable)
    assert "no sha256 digests" in mismatch.describe()


def test_different_kernel_is_explained_per_event() -> None:
    policy, _, _ = known_good()
    log = boot_log(kernel=b"kernel v2")
    mismatches = evaluate_policy(policy, replay(log), log)
    assert [type(m) for m in mismatches] == [
        PcrValueMismatch,
        PcrValueMismatch,
        EventMismatch,
        EventMismatch,
    ]
    kernel = mismatches[2]
    assert isinstance(kernel, EventMismatch)
    assert (kernel.pcr, kernel.position, kernel.event_number) == (4, 3, 8)
    new = hashlib.sha256(b"kernel v2").hexdigest()[:16]
    old = hashlib.sha256(b"kernel v1").hexdigest()[:16]
    assert kernel.describe() == (
        f"PCR 4: event 3 (kernel, log event #8) has digest {new}… but the policy expects {old}…"
    )
    assert mismatches[3].describe().startswith("PCR 9: event 1 (kernel file, log event #9)")


def test_event_type_mismatch() -> None:
    _, pcrs, log = known_good()
    first, second, kernel = log.events_for(4)
    expected = [ExpectedEvent(4, e.event_type, e.digests["sha256"]) for e in (first, second)]
    expected.append(ExpectedEvent(4, EV_IPL, kernel.digests["sha256"], "kernel"))
    policy = ReferencePolicy("p", events=tuple(expected))
    (mismatch,) = evaluate_policy(policy, pcrs, log)
    assert mismatch.describe() == (
        "PCR 4: event 3 (kernel, log event #8) is EV_EFI_BOOT_SERVICES_APPLICATION "
        "but the policy expects EV_IPL"
    )


def test_missing_event_is_named_by_its_label() -> None:
    policy, _, _ = known_good()
    log = boot_log(cmdline=None)
    mismatches = evaluate_policy(policy, replay(log), log)
    assert describe_all(mismatches)[-1] == (
        "PCR 9: the log has 1 event, the policy expects 2 (missing: command line)"
    )
    count = mismatches[-1]
    assert isinstance(count, EventCountMismatch)
    assert (count.actual_count, count.expected_count, count.missing) == (1, 2, ("command line",))


def test_unexpected_event_is_named_from_the_log() -> None:
    log = boot_log(cmdline=None)
    policy = policy_from_evidence(replay(log), log, name="short")
    longer = boot_log()
    mismatches = evaluate_policy(policy, replay(longer), longer)
    assert describe_all(mismatches)[-1] == (
        "PCR 9: the log has 2 events, the policy expects 1 "
        "(unexpected: #10 EV_IPL (grub_cmd: linux /boot/vmlinuz console=ttyS0))"
    )


def test_unlabelled_missing_event_falls_back_to_type_and_digest() -> None:
    _, pcrs, log = known_good()
    extra = ExpectedEvent(7, EV_SEPARATOR, b"\xee" * 32)
    events = tuple(ExpectedEvent(7, e.event_type, e.digests["sha256"]) for e in log.events_for(7))
    policy = ReferencePolicy("p", events=(*events, extra))
    (mismatch,) = evaluate_policy(policy, pcrs, log)
    assert mismatch.describe().endswith("(missing: EV_SEPARATOR eeeeeeeeeeeeeeee…)")


def test_log_that_does_not_match_the_quote_is_not_trusted() -> None:
    policy, _, _ = known_good()
    forged = boot_log()  # the policy's log ...
    quoted = replay(boot_log(kernel=b"evil"))  # ... but another boot's quote
    mismatches = evaluate_policy(
        ReferencePolicy("events only", events=policy.events), quoted, forged
    )
    assert [m.pcr for m in mismatches] == [4, 9]
    assert all(isinstance(m, LogReplayMismatch) for m in mismatches)
    assert (
        mismatches[0]
        .describe()
        .endswith("so the log cannot be trusted for this PCR and its events were not compared")
    )


def test_pcr_absent_from_the_log_must_be_at_reset_value() -> None:
    policy = ReferencePolicy("p", events=(ExpectedEvent(14, EV_IPL, b"\x01" * 32, "MokList"),))
    log = boot_log()
    (mismatch,) = evaluate_policy(policy, {14: bytes(32)}, log)
    assert mismatch.describe() == (
        "PCR 14: the log has 0 events, the policy expects 1 (missing: MokList)"
    )
    (forged,) = evaluate_policy(policy, {14: b"\x05" * 32}, log)
    assert isinstance(forged, LogReplayMismatch)


def test_every_mismatch_describes_itself_in_one_line() -> None:
    policy, _, _ = known_good()
    log = boot_log(kernel=b"v2", cmdline=b"init=/bin/sh", secure_boot=b"\x00")
    quoted = replay(log)
    del quoted[0]
    mismatches = evaluate_policy(policy, quoted, log)
    kinds = {m.kind for m in mismatches}
    assert kinds == {"pcr_not_quoted", "pcr_value", "event"}
    for mismatch in mismatches:
        text = mismatch.describe()
        assert text and "\n" not in text and text.startswith("PCR ")


# --- property-based ---------------------------------------------------------------------------

# str.isprintable() is false exactly for categories C* and Z* other than the space.
LABEL = st.text(
    st.characters(codec="utf-8", exclude_categories=("C", "Z"), include_characters=" "),
    max_size=40,
)
NAME = LABEL.filter(lambda s: s.strip() != "")


@st.composite
def policies(draw: st.DrawFn) -> ReferencePolicy:
    bank = draw(st.sampled_from(["sha1", "sha256", "sha384", "sha512", "sm3_256"]))
    size = {"sha1": 20, "sha384": 48, "sha512": 64}.get(bank, 32)
    digest = st.binary(min_size=size, max_size=size)
    pcrs = draw(st.dictionaries(st.integers(0, 23), digest, max_size=6))
    event = st.builds(ExpectedEvent, st.integers(0, 23), st.integers(0, 2**32 - 1), digest, LABEL)
    events = draw(st.lists(event, min_size=0 if pcrs else 1, max_size=6))
    return ReferencePolicy(draw(NAME), bank, pcrs, tuple(events), draw(LABEL))


@FUZZ
@given(policies())
def test_any_policy_round_trips(policy: ReferencePolicy) -> None:
    text = dump_policy(policy)
    assert load_policy(text) == policy
    assert dump_policy(load_policy(text)) == text


@FUZZ
@given(st.text(max_size=300))
def test_random_text_raises_only_policy_error(text: str) -> None:
    with contextlib.suppress(PolicyError):
        load_policy(text)


YAML_ISH = st.text(
    st.sampled_from(list("version:name bank pcrs events- \n\t{}[]'\"#&*!|>?0123456789abx,%@`")),
    max_size=200,
)


@FUZZ
@given(YAML_ISH)
def test_yaml_ish_text_raises_only_policy_error(text: str) -> None:
    with contextlib.suppress(PolicyError):
        load_policy(text)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=70)
    | st.sampled_from(["sha256", "EV_IPL", "ab" * 32, "0x" + "cd" * 32, "1"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.integers(-2, 30) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
KEYS = st.sampled_from(["version", "name", "bank", "pcrs", "events", "description", "other"])
EVENT_DICT = st.dictionaries(
    st.sampled_from(["pcr", "type", "digest", "label", "x"]), VALUES, max_size=5
)


@FUZZ
@given(
    st.dictionaries(KEYS, VALUES, max_size=6),
    st.lists(EVENT_DICT, max_size=3),
    st.booleans(),
)
def test_random_structures_raise_only_policy_error(
    document: dict[str, object], events: list[dict[str, object]], use_events: bool
) -> None:
    if use_events:
        document["events"] = events
    try:
        policy = load_policy(yaml.safe_dump(document, allow_unicode=True))
    except PolicyError:
        return
    assert load_policy(dump_policy(policy)) == policy
