"""The hash-chained audit log: what the verifier catches and how a crash is survived."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attestation.errors import VerificationError
from cryptovm.audit import (
    AuditLog,
    canonical_entry,
    entry_hash,
    entry_mac,
    read_entries,
    verify_audit_log,
)
from cryptovm.encoding import canonical_json

KEY = os.urandom(32)


def _log(tmp_path: Path, n: int = 6) -> Path:
    log = AuditLog(tmp_path / "audit.log", KEY)
    for i in range(n):
        log.append("alice", "sign", "ok" if i % 2 else "denied", key=f"k{i}", version=1,
                   check=None if i % 2 else "privilege")
    log.close()
    return tmp_path / "audit.log"


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_a_clean_log_verifies_with_and_without_the_mac_key(tmp_path: Path) -> None:
    path = _log(tmp_path)
    assert verify_audit_log(path).ok
    report = verify_audit_log(path, KEY)
    assert report.ok and report.entries == 6
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_an_edited_entry_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[2] = lines[2].replace(b'"denied"', b'"ok"')
    path.write_bytes(b"".join(lines))
    report = verify_audit_log(path, KEY)
    assert (report.ok, report.check, report.failed_line) == (False, "hash", 3)
    with pytest.raises(VerificationError, match="hash"):
        report.raise_for_failure()


def test_an_entry_removed_from_the_middle_is_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    report = verify_audit_log(path, KEY)
    assert (report.check, report.failed_line) == ("sequence", 3)


def test_reordered_entries_are_detected(tmp_path: Path) -> None:
    path = _log(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))
    assert verify_audit_log(path, KEY).check == "sequence"


def test_a_rechained_forgery_passes_the_hashes_but_not_the_mac(tmp_path: Path) -> None:
    path = _log(tmp_path)
    entries = read_entries(path)
    entries[1]["outcome"] = "ok"
    prev = entries[0]["hash"]
    for entry in entries[1:]:  # the attacker recomputes every hash, but has no MAC key
        entry["prev"] = prev
        entry["hash"] = prev = entry_hash(entry)
        entry["mac"] = entry_mac(os.urandom(32), entry["hash"])
    path.write_bytes(b"".join(json.dumps(e).encode() + b"\n" for e in entries))
    assert verify_audit_log(path).ok  # consistent chain ...
    assert verify_audit_log(path, KEY).check == "mac"  # ... but forged


def test_entries_cut_off_the_end_are_detected_against_the_known_head(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", KEY)
    for _ in range(4):
        log.append("root", "generate", "ok")
    head = log.head
    log.close()
    path = tmp_path / "audit.log"
    path.write_bytes(b"".join(_lines(path)[:3]))
    assert verify_audit_log(path, KEY).ok  # a prefix of a chain is a chain
    report = verify_audit_log(path, KEY, expected_head=head)
    assert report.check == "truncated"


def test_a_torn_last_line_is_reported_then_recovered_on_reopen(tmp_path: Path) -> None:
    path = _log(tmp_path, 3)
    with open(path, "ab") as f:
        f.write(b'{"account":"alice","op":"si')  # the crash hit mid-write
    assert verify_audit_log(path, KEY).check == "torn_tail"
    log = AuditLog(path, KEY)
    log.append("alice", "sign", "ok")
    log.close()
    report = verify_audit_log(path, KEY)
    assert report.ok and report.entries == 5
    assert read_entries(path)[3]["op"] == "audit.recovered"


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = _log(tmp_path, 2)
    log = AuditLog(path, KEY)
    assert log.append("bob", "verify", "ok") == 3
    log.close()
    assert verify_audit_log(path, KEY).entries == 3


def test_fields_are_clipped_to_one_line(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", KEY)
    log.append("x" * 1000, "op\ninjected", "ok", detail="d" * 5000)
    log.close()
    (entry,) = read_entries(tmp_path / "audit.log")
    assert len(entry["account"]) <= 200 and "\n" not in entry["op"]
    assert verify_audit_log(tmp_path / "audit.log", KEY).ok


_field = st.one_of(st.none(), st.text(max_size=30), st.integers(0, 2**40),
                   st.floats(0, 2e9, allow_nan=False))


@given(st.dictionaries(st.sampled_from(["account", "check", "detail", "key", "op", "outcome",
                                        "prev", "seq", "target", "ts", "version"]), _field))
def test_the_fast_entry_encoder_is_canonical_json(fields: dict[str, object]) -> None:
    ordered = sorted(fields.items())
    expected = canonical_json({k: v for k, v in ordered if v is not None})
    assert canonical_entry(ordered) == expected  # type: ignore[arg-type]
