"""Runtime integrity: the ima-ng parser, the runtime policy, and incremental replay of a
real swtpm's PCR 10 (attestation/ima.py, testbed/tpm/runtime.py; docs/runtime.md)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.errors import EvidenceFormatError, PolicyError, VerificationError
from attestation.ima import (
    BOOT_AGGREGATE,
    MAX_CHUNK,
    RuntimePolicy,
    boot_aggregate,
    check_boot_aggregate,
    check_entries,
    dump_runtime_policy,
    load_runtime_policy,
    make_entry,
    parse_log,
    replay,
    template_data,
)
from attestation.tpm import TpmClient
from attestation.tpm_types import parse_public
from testbed.cluster import lifecycle
from testbed.cluster.runtime import RuntimeState
from testbed.cluster.state import load_registry
from testbed.core.paths import ClusterPaths
from testbed.tpm.runtime import BASELINE, RuntimeLog, default_policy, file_digest
from testbed.tpm.swtpm import Swtpm

DIGEST = hashlib.sha256(b"/usr/bin/true").digest()
paths = st.text(st.characters(blacklist_characters="\n\r\0", blacklist_categories=("Cs",)),
                min_size=1, max_size=200)


def test_entry_line_is_the_kernel_format() -> None:
    entry = make_entry(DIGEST, "/usr/bin/true")
    data = template_data(DIGEST, "/usr/bin/true")
    # d-ng: u32 len, "sha256:\0", digest; n-ng: u32 len, path, NUL.
    assert data[:4] == (8 + 32).to_bytes(4, "little") and data[4:12] == b"sha256:\0"
    assert data[44:48] == (14).to_bytes(4, "little") and data.endswith(b"/usr/bin/true\0")
    assert entry.template_hash == hashlib.sha256(data).digest()
    assert entry.line() == (f"10 {entry.template_hash.hex()} ima-ng sha256:{DIGEST.hex()} "
                            "/usr/bin/true\n").encode()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=32, max_size=32), paths), max_size=8))
def test_parse_round_trips_and_replays(items: list[tuple[bytes, str]]) -> None:
    entries, offset = [], 0
    for digest, path in items:
        entries.append(make_entry(digest, path, offset))
        offset += len(entries[-1].line())
    log = b"".join(e.line() for e in entries)
    chunk = parse_log(log)
    assert list(chunk.entries) == entries and chunk.end == len(log)
    # Incremental: from any entry boundary, the rest parses and replays to the same value.
    full = replay(bytes(32), entries)
    for i, entry in enumerate(entries):
        tail = parse_log(log[entry.offset:], entry.offset)
        start = full[i - 1] if i else bytes(32)
        assert replay(start, tail.entries)[-1:] == full[-1:]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=1 << 40))
def test_parser_answers_garbage_with_one_error(data: bytes, offset: int) -> None:
    try:
        chunk = parse_log(data, offset)
    except EvidenceFormatError:
        return
    assert chunk.start == offset and chunk.end <= offset + len(data)


def test_partial_line_waits_and_oversized_inputs_are_bounded() -> None:
    line = make_entry(DIGEST, "/bin/sh").line()
    assert parse_log(line + line[:20]).end == len(line)  # the partial line is left for later
    assert len(parse_log(line * 2000).entries) < MAX_CHUNK // len(line) + 1
    with pytest.raises(EvidenceFormatError, match="longer than"):
        parse_log(b"10 " + b"a" * 10000)
    bad_hash = line.replace(line[3:7], b"ffff")
    with pytest.raises(EvidenceFormatError, match="template hash"):
        parse_log(bad_hash)
    with pytest.raises(EvidenceFormatError, match="only PCR 10"):
        parse_log(line.replace(b"10 ", b"11 ", 1))


def test_runtime_policy_names_the_offending_entry() -> None:
    policy = default_policy("sim")
    baseline = [make_entry(file_digest(c), p) for p, c in BASELINE]
    check_entries(policy, baseline)
    check_entries(policy, [make_entry(DIGEST, "/var/log/syslog")])  # excluded by glob
    with pytest.raises(VerificationError) as caught:
        check_entries(policy, [*baseline, make_entry(DIGEST, "/tmp/evil", 999)])
    assert caught.value.check == "runtime" and "/tmp/evil" in caught.value.reason
    assert caught.value.data["entry"]["offset"] == 999
    changed = make_entry(DIGEST, BASELINE[0][0])
    with pytest.raises(VerificationError, match="not one runtime policy"):
        check_entries(policy, [changed])


def test_runtime_policy_yaml_round_trips_and_is_strict() -> None:
    policy = RuntimePolicy("p", {"/a b": frozenset({DIGEST}), '/q"uote': frozenset({DIGEST})},
                           ("/var/*",))
    assert load_runtime_policy(dump_runtime_policy(policy)) == policy
    assert load_runtime_policy(dump_runtime_policy(RuntimePolicy("e"))) == RuntimePolicy("e")
    base = "format: testbed-runtime-policy\nversion: 1\nname: p\n"
    for bad in ("format: other\nversion: 1\nname: p\n",
                base + "allow: {/a: [md5:00]}\n",
                base + "allow: {/a: []}\n",
                base + "extra: 1\n",
                base + "allow: {/a: sha256:" + "0" * 64 + "}\nallow: {}\n",
                "- [unclosed"):
        with pytest.raises(PolicyError):
            load_runtime_policy(bad)


def test_incremental_replay_matches_a_real_swtpm(swtpm: Swtpm, tmp_path: Path) -> None:
    client = TpmClient(swtpm.tcti)
    try:
        log = RuntimeLog(tmp_path / "runtime.log")
        first = [log.measure(client, p, c) for p, c in BASELINE]
        quoted_first = client.read_pcrs("sha256", [10])[10]
        size_first = log.size
        later = log.measure(client, "/tmp/evil", b"payload")
        quoted_later = client.read_pcrs("sha256", [10])[10]
    finally:
        client.close()
    whole = parse_log(log.read(0))
    assert list(whole.entries) == [*first, later]
    assert replay(bytes(32), whole.entries[:3])[-1] == quoted_first
    # Only what is new since the first "quote": from its offset and its PCR value.
    new = parse_log(log.read(size_first), size_first)
    assert [e.path for e in new.entries] == ["/tmp/evil"]
    assert replay(quoted_first, new.entries)[-1] == quoted_later
    with pytest.raises(EvidenceFormatError, match="outside the log"):
        log.read(log.size + 1)


# --- boot_aggregate: recomputed from the quoted PCRs 0-9 (H7) -------------------------------

pcr_values = st.lists(st.binary(min_size=32, max_size=32), min_size=10, max_size=10)


@settings(max_examples=50, deadline=None)
@given(pcr_values, st.integers(min_value=0, max_value=9), st.binary(min_size=32, max_size=32))
def test_boot_aggregate_binds_every_pcr_0_to_9(values: list[bytes], moved: int,
                                                other: bytes) -> None:
    quoted = dict(enumerate(values))
    aggregate = boot_aggregate(quoted)
    assert aggregate == hashlib.sha256(b"".join(values)).digest()  # the kernel's formula
    entry = make_entry(aggregate, BOOT_AGGREGATE)
    check_boot_aggregate([entry], {**quoted, 10: bytes(32)})
    if other != values[moved]:
        with pytest.raises(VerificationError, match="does not match the quoted PCRs 0-9"):
            check_boot_aggregate([entry], {**quoted, moved: other})
    del quoted[moved]
    with pytest.raises(VerificationError, match=f"does not cover PCRs {moved} "):
        check_boot_aggregate([entry], quoted)
    check_boot_aggregate([make_entry(DIGEST, "/usr/bin/true")], quoted)  # nothing to check


def test_boot_aggregate_only_as_the_first_line() -> None:
    quoted = {i: bytes([i]) * 32 for i in range(11)}
    late = make_entry(boot_aggregate(quoted), BOOT_AGGREGATE, offset=162)
    with pytest.raises(VerificationError, match="only as the log's first line") as caught:
        check_boot_aggregate([late], quoted)
    assert caught.value.check == "runtime" and caught.value.data["entry"]["offset"] == 162


# --- a node registered anew is judged from its log's start -----------------------------------

def test_a_node_registered_with_a_new_ak_forgets_its_old_runtime_state(
        swtpm: Swtpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A VM brought up again gets a new vTPM whose reset and restart counts may equal the
    old one's: the offset its predecessor's last good quote proved must not be kept."""
    client = TpmClient(swtpm.tcti)
    try:
        ak_public = client.attestation_key().public
    finally:
        client.close()
    paths = ClusterPaths(tmp_path, "lab")
    paths.root.mkdir(parents=True)
    RuntimeState((0, 0), 1051, bytes(32)).save(paths, "vm1")
    monkeypatch.setattr(lifecycle, "register", lambda *_args: parse_public(ak_public))
    run = lifecycle._Run(backend=SimpleNamespace(paths=paths), policies={},  # type: ignore[arg-type]
                         registrar=None)  # type: ignore[arg-type]
    lifecycle._register(run, "vm1", None)  # type: ignore[arg-type]
    assert RuntimeState.load(paths, "vm1") is None
    assert load_registry(paths).nodes() == ["vm1"]
