"""The TPM command family (tpm, ek, quote, verify-quote, policy, eventlog) against the
CLI contract: exit codes, one-line errors that say what to do, arguments checked before
the TPM is contacted, outputs only where asked, JSON that carries full values.

One managed swtpm (``testbed tpm start`` in a temporary work directory) serves the
module; every command runs as ``python -m testbed``, as a user runs it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given
from hypothesis import strategies as st

from attestation.eventlog import EventLogBuilder
from attestation.evidence import Evidence
from attestation.policy import load_policy
from attestation.tpm import TpmClient
from testbed.cli.main import build_parser
from testbed.cli.tpm import parse_pcr_list
from testbed.core.errors import ArgumentError

NONEXISTENT = "/nonexistent-testbed-dir"
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def run_testbed(*args: str, workdir: Path, cwd: Path | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "testbed", "--workdir", str(workdir), *args],
                          capture_output=True, text=True, timeout=60, cwd=cwd,
                          env={k: v for k, v in os.environ.items() if k != "TESTBED_TCTI"})


def assert_fails(r: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """Exit ``code`` with one line on stderr naming ``words``, and no traceback."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    for word in words:
        assert word in r.stderr, (word, r.stderr)


def assert_no_truncation(text: str) -> None:
    assert "…" not in text and "..." not in text, text


class Lab:
    """The module's managed TPM and its work directory."""

    def __init__(self, workdir: Path, tcti: str) -> None:
        self.workdir = workdir
        self.tcti = tcti

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_testbed(*args, workdir=self.workdir, cwd=cwd)

    def ok(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        r = self.run(*args, cwd=cwd)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        return r

    def json(self, *args: str) -> object:
        r = self.ok(*args, "--json")
        assert_no_truncation(r.stdout)
        return json.loads(r.stdout)

    def extend_pcr23(self, event: bytes) -> bytes:
        """Reset PCR 23, log and extend one event; the log's bytes."""
        log = EventLogBuilder()
        log.add(23, 0x0D, event)
        with TpmClient(self.tcti) as client:
            client.reset_pcr(23)
            client.extend_pcr(23, log.events[-1].digests)
        return log.to_bytes()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("cli-tpm") / "wd"
    r = run_testbed("tpm", "start", "--json", workdir=workdir)
    assert r.returncode == 0, r.stderr
    started = json.loads(r.stdout)
    try:
        yield Lab(workdir, started["tcti"])
    finally:
        run_testbed("tpm", "stop", "--all", workdir=workdir)


# --- 1. bad arguments: exit 3 naming the value, before any TPM is contacted ---------------

BAD_ARGUMENTS = [
    (["quote", "-l", "sha999:0-7"], ["sha999", "sha256"]),
    (["quote", "-l", "sha256"], ["BANK:PCRS"]),
    (["quote", "-l", "sha256:0-99"], ["0-99", "0-23"]),
    (["quote", "-l", "sha256:7-3"], ["7-3"]),
    (["quote", "-l", "sha256:0-4294967296"], ["0-23"]),
    (["quote", "-q", "zz"], ["'zz'", "hexadecimal"]),
    (["quote", "-q", ""], ["empty"]),
    (["quote", "-q", "00" * 65], ["65 bytes"]),
    (["quote", "-o", f"{NONEXISTENT}/q"], [NONEXISTENT, "does not exist"]),
    (["quote", "--event-log", f"{NONEXISTENT}/log"], [f"{NONEXISTENT}/log"]),
    (["verify-quote", ".", "-q", "xyz"], ["'xyz'"]),
    (["policy", "create", "--name", "x", "-o", f"{NONEXISTENT}/x.yaml"],
     [f"{NONEXISTENT}/x.yaml", "does not exist"]),
    (["policy", "create", "--name", "x", "-l", "sha1:0-99", "-o", "p.yaml"], ["0-99"]),
    (["policy", "create", "--name", "two\nlines", "-o", "p.yaml"], ["name"]),
    (["ek", "-o", f"{NONEXISTENT}/ek.pem"], [NONEXISTENT]),
    (["eventlog", "-g", "md5", "log.bin"], ["md5"]),
]


@pytest.mark.parametrize(("argv", "words"), BAD_ARGUMENTS,
                         ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_exits_3_even_when_no_tpm_runs(tmp_path: Path, argv: list[str],
                                                      words: list[str]) -> None:
    r = run_testbed(*argv, workdir=tmp_path / "no-tpm-here", cwd=tmp_path)
    assert_fails(r, 3, *words)
    assert not (tmp_path / "no-tpm-here").exists()  # a failed command creates nothing


@pytest.mark.parametrize("where", ["evidence.json", "."])
def test_a_fifo_for_evidence_is_refused_at_once(tmp_path: Path, where: str) -> None:
    os.mkfifo(tmp_path / "evidence.json")  # no writer: reading it would block forever
    target = tmp_path / where
    for argv in (["verify-quote", str(target), "-q", "00"],
                 ["policy", "create", "--from", str(target), "--name", "x", "-o",
                  str(tmp_path / "p.yaml")]):
        assert_fails(run_testbed(*argv, workdir=tmp_path / "wd"), 3, "not a regular file")


@given(st.text(max_size=40))
def test_pcr_selection_parses_or_says_why(spec: str) -> None:
    try:
        selection = parse_pcr_list(spec)
    except ArgumentError as exc:
        assert repr(spec) in str(exc)
    else:
        assert selection.indices and all(0 <= i <= 23 for i in selection.indices)


def test_a_bank_the_tpm_lacks_exits_3_naming_the_active_ones(lab: Lab, tmp_path: Path) -> None:
    assert_fails(lab.run("quote", "-l", "sha1:0-7", "-o", str(tmp_path / "q")), 3,
                 "sha1", "active: sha256", "-l")
    assert not (tmp_path / "q").exists()
    assert_fails(lab.run("policy", "create", "--name", "x", "-l", "sha384:0",
                         "-o", str(tmp_path / "p.yaml")), 3, "sha384", "active: sha256")


def test_usage_errors_exit_2(lab: Lab) -> None:
    assert_fails(lab.run("tpm", "start", "Bad/Name"), 2, "Bad/Name")
    assert_fails(lab.run("tpm", "stop", "x", "--all"), 2, "--all")
    assert_fails(lab.run("verify-quote", "."), 2, "-q/--nonce")
    assert_fails(lab.run("policy", "create", "--name", "x"), 2, "-o FILE")


# --- 2. outputs only where asked, never over an earlier quote -----------------------------


def test_quote_without_o_prints_the_evidence_and_writes_nothing(lab: Lab, tmp_path: Path
                                                                ) -> None:
    r = lab.ok("quote", "-q", "0a0b", cwd=tmp_path)
    assert list(tmp_path.iterdir()) == []
    evidence = Evidence.from_json(r.stdout.encode())
    assert evidence.pcr_bank == "sha256" and sorted(evidence.pcrs) == list(range(8))
    (tmp_path / "ev.json").write_text(r.stdout)  # `testbed quote > ev.json` verifies as is
    assert "ACCEPTED" in lab.ok("verify-quote", str(tmp_path / "ev.json"), "-q", "0a0b").stdout


def test_quote_refuses_to_overwrite_an_earlier_quote_without_force(lab: Lab, tmp_path: Path
                                                                   ) -> None:
    out = tmp_path / "q"
    lab.ok("quote", "-q", "01", "-o", str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["ak.pem", "ak.pub", "evidence.json", "quote.msg", "quote.pcrs",
                              "quote.sig"]
    assert_fails(lab.run("quote", "-q", "02", "-o", str(out)), 3, "--force", "quote.msg")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    lab.ok("quote", "-q", "02", "-o", str(out), "--force")
    assert lab.ok("verify-quote", str(out), "-q", "02").returncode == 0
    (tmp_path / "file").write_text("x")
    assert_fails(lab.run("quote", "-o", str(tmp_path / "file")), 3, "not a directory")


def test_policy_and_ek_outputs_are_not_overwritten_without_force(lab: Lab, tmp_path: Path
                                                                 ) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("keep me")
    assert_fails(lab.run("policy", "create", "--name", "x", "-o", str(policy)), 3, "--force")
    assert policy.read_text() == "keep me"
    lab.ok("policy", "create", "--name", "x", "-o", str(policy), "--force")
    assert load_policy(policy).name == "x"
    assert_fails(lab.run("ek", "-o", str(policy)), 3, "--force")


# --- 3. evidence.json and its event log; options take effect --------------------------------


def test_verify_quote_reads_evidence_json_with_its_event_log(lab: Lab, tmp_path: Path) -> None:
    log = tmp_path / "log.bin"
    log.write_bytes(lab.extend_pcr23(b"kernel cmdline: ro quiet\x00"))
    out = tmp_path / "q"
    lab.ok("quote", "-l", "sha256:0,23", "-q", "c0de", "--event-log", str(log), "-o", str(out))
    report = lab.json("verify-quote", str(out), "-q", "c0de")
    assert isinstance(report, dict)
    assert report["ok"] and report["source"] == str(out / "evidence.json")
    event_log = next(c for c in report["checks"] if c["check"] == "event_log")
    assert event_log["state"] == "passed" and "replay of" in event_log["detail"]
    # The embedded log is verified: another machine's log given instead is caught.
    other = EventLogBuilder()
    other.add(23, 0x0D, b"kernel cmdline: ro quiet init=/bin/sh\x00")
    (tmp_path / "other.bin").write_bytes(other.to_bytes())
    r = lab.run("verify-quote", str(out), "-q", "c0de", "--event-log", str(tmp_path / "other.bin"),
                "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["failed_check"] == "event_log"
    failed = next(c for c in report["checks"] if c["check"] == "event_log")
    [mismatch] = failed["mismatches"]  # every mismatch as data, digests in full
    assert mismatch["pcr"] == 23 and HEX_DIGEST.match(mismatch["expected_from_log"])
    assert HEX_DIGEST.match(mismatch["quoted"])
    assert mismatch["quoted"] != mismatch["expected_from_log"]


def test_quote_refuses_an_event_log_that_does_not_replay(lab: Lab, tmp_path: Path) -> None:
    lab.extend_pcr23(b"what really booted\x00")
    other = EventLogBuilder()
    other.add(23, 0x0D, b"what the log claims\x00")
    (tmp_path / "log.bin").write_bytes(other.to_bytes())
    r = lab.run("quote", "-l", "sha256:23", "--event-log", str(tmp_path / "log.bin"),
                "-o", str(tmp_path / "q"))
    assert_fails(r, 3, "PCR 23", "does not replay", str(tmp_path / "log.bin"))
    assert not (tmp_path / "q").exists()


def test_policy_create_pins_only_the_pcrs_asked_for(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "q"
    lab.ok("quote", "-q", "03", "-o", str(out))
    lab.ok("policy", "create", "--from", str(out), "-l", "sha256:0-3", "--name", "lab",
           "-o", str(tmp_path / "from-quote.yaml"))
    assert sorted(load_policy(tmp_path / "from-quote.yaml").pcrs) == [0, 1, 2, 3]
    lab.ok("policy", "create", "-l", "sha256:0-3", "--name", "live",
           "-o", str(tmp_path / "live.yaml"))
    assert sorted(load_policy(tmp_path / "live.yaml").pcrs) == [0, 1, 2, 3]
    assert_fails(lab.run("policy", "create", "--from", str(out), "-l", "sha256:9",
                         "--name", "x", "-o", str(tmp_path / "x.yaml")), 3, "PCR 9", "0,1")
    assert_fails(lab.run("policy", "create", "--from", str(out), "-l", "sha1:0",
                         "--name", "x", "-o", str(tmp_path / "x.yaml")), 3, "sha256 bank")


def test_policy_create_from_evidence_takes_its_event_log(lab: Lab, tmp_path: Path) -> None:
    log = tmp_path / "log.bin"
    log.write_bytes(lab.extend_pcr23(b"initrd\x00"))
    out = tmp_path / "q"
    lab.ok("quote", "-l", "sha256:23", "-q", "04", "--event-log", str(log), "-o", str(out))
    created = lab.json("policy", "create", "--from", str(out), "--name", "ev",
                       "-o", str(tmp_path / "p.yaml"))
    assert isinstance(created, dict) and len(created["events"]) == 1
    assert lab.ok("verify-quote", str(out), "-q", "04", "--policy", str(tmp_path / "p.yaml"))


# --- 4. a check with nothing to judge is skipped, and the verdict says so -----------------


def test_verify_quote_without_policy_says_what_was_not_established(lab: Lab, tmp_path: Path
                                                                   ) -> None:
    out = tmp_path / "q"
    lab.ok("quote", "-q", "05", "-o", str(out))
    text = lab.ok("verify-quote", str(out), "-q", "05").stdout
    # No event log either (quote without --event-log): its check is skipped too.
    verdict = "ACCEPTED, but not established: event_log, policy (skipped)"
    assert verdict in text.splitlines()[0]
    assert re.search(r"\[skip\] policy +no reference policy given", text)
    assert re.search(r"\[skip\] event_log +no event log supplied", text)
    report = lab.json("verify-quote", str(out), "-q", "05")
    assert isinstance(report, dict)
    assert report["ok"] is True and report["skipped_checks"] == ["event_log", "policy"]
    assert report["verdict"] == verdict
    assert {c["check"]: c["state"] for c in report["checks"]}["policy"] == "skipped"
    assert all(c["state"] in ("passed", "failed", "skipped") for c in report["checks"])


# --- 5. JSON carries data -------------------------------------------------------------------


def test_every_command_of_the_family_speaks_json(lab: Lab, tmp_path: Path) -> None:
    out, policy, log = tmp_path / "q", tmp_path / "p.yaml", tmp_path / "log.bin"
    log.write_bytes(lab.extend_pcr23(b"json walk\x00"))
    started = lab.json("tpm", "start")
    assert isinstance(started, dict) and started["started"] is False  # already running
    assert [t["name"] for t in lab.json("tpm", "list")] == ["default"]  # type: ignore[union-attr]
    ek = lab.json("ek", "-G", "ecc")
    assert isinstance(ek, dict) and HEX_DIGEST.match(ek["certificate_sha256"])
    assert ISO_UTC.match(ek["not_before"]) and ISO_UTC.match(ek["not_after"])
    x509.load_pem_x509_certificate(ek["certificate_pem"].encode())
    quote = lab.json("quote", "-l", "sha256:0-7,23", "-q", "06", "--event-log", str(log),
                     "-o", str(out))
    assert isinstance(quote, dict) and ISO_UTC.match(quote["quoted_at"])
    assert all(HEX_DIGEST.match(v) for v in quote["pcrs"].values())
    assert len(quote["files"]) == 6 and quote["evidence"]["event_log"]
    created = lab.json("policy", "create", "--from", str(out), "--name", "j", "-o", str(policy))
    assert isinstance(created, dict) and created["created"] == str(policy)
    assert all(HEX_DIGEST.match(e["digest"]) for e in created["events"])
    shown = lab.json("policy", "show", str(policy))
    assert isinstance(shown, dict) and shown["pcrs"] == created["pcrs"]
    verified = lab.json("verify-quote", str(out), "-q", "06", "--policy", str(policy))
    assert isinstance(verified, dict) and verified["verdict"] == "ACCEPTED"
    assert ISO_UTC.match(verified["verified_at"])
    events = lab.json("eventlog", str(log))
    assert isinstance(events, dict) and HEX_DIGEST.match(events["events"][-1]["digest"])


def test_a_rejection_in_json_carries_every_mismatch_in_full(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "q"
    lab.extend_pcr23(b"one\x00")
    lab.ok("policy", "create", "-l", "sha256:0-7,23", "--name", "before",
           "-o", str(tmp_path / "p.yaml"))
    lab.extend_pcr23(b"another\x00")
    lab.ok("quote", "-l", "sha256:0-7,23", "-q", "07", "-o", str(out))
    r = lab.run("verify-quote", str(out), "-q", "07", "--policy", str(tmp_path / "p.yaml"),
                "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    report = json.loads(r.stdout)
    assert report["failed_check"] == "policy"
    mismatches = next(c for c in report["checks"] if c["check"] == "policy")["mismatches"]
    assert [m["pcr"] for m in mismatches] == [23]
    assert "…" not in json.dumps(mismatches)


def test_errors_in_json_are_json_too(tmp_path: Path) -> None:
    r = run_testbed("quote", "-l", "sha1:99", "--json", workdir=tmp_path / "wd")
    assert r.returncode == 3
    assert json.loads(r.stdout)["error"]["exit_code"] == 3


# --- 6. formats users' tools read; one flag name per concept --------------------------------


def test_ak_pub_is_tpm2b_public_for_tpm2_tools(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "q"
    lab.ok("quote", "-q", "00112233", "-o", str(out))
    printed = subprocess.run(["tpm2_print", "-t", "TPM2B_PUBLIC", str(out / "ak.pub")],
                             capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0 and "restricted" in printed.stdout, printed.stderr
    check = subprocess.run(
        ["tpm2_checkquote", "-u", str(out / "ak.pub"), "-m", str(out / "quote.msg"),
         "-s", str(out / "quote.sig"), "-f", str(out / "quote.pcrs"), "-g", "sha256",
         "-q", "00112233"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


def test_verify_quote_still_reads_an_old_tpmt_public_ak(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "q"
    lab.ok("quote", "-q", "08", "-o", str(out))
    evidence = Evidence.from_json((out / "evidence.json").read_bytes())
    (out / "evidence.json").unlink()  # as written before evidence.json was read
    (out / "ak.pub").write_bytes(evidence.ak_public)  # TPMT_PUBLIC, as before
    report = lab.json("verify-quote", str(out), "-q", "08")
    assert isinstance(report, dict) and report["ok"]
    assert report["source"] == str(out / "quote.msg")
    attrs = next(c for c in report["checks"] if c["check"] == "ak_attributes")
    assert attrs["state"] == "passed" and "restricted" in attrs["detail"]


def test_ek_prints_pem_or_writes_it(lab: Lab, tmp_path: Path) -> None:
    r = lab.ok("ek")
    cert = x509.load_pem_x509_certificate(r.stdout.encode())  # stdout is the PEM, only
    assert "valid, chains to" in r.stderr
    lab.ok("ek", "-o", str(tmp_path / "ek.pem"))
    assert x509.load_pem_x509_certificate((tmp_path / "ek.pem").read_bytes()) == cert


def test_ek_without_a_local_ca_says_what_to_do(lab: Lab, tmp_path: Path) -> None:
    r = run_testbed("ek", "-T", lab.tcti, workdir=tmp_path / "elsewhere")
    assert_fails(r, 4, "--ca-bundle", "testbed tpm start")
    assert not (tmp_path / "elsewhere").exists()


def test_one_flag_name_per_concept() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if hasattr(a, "choices") and a.choices)
    flags = {name: {s for action in sub.choices[name]._actions
                    for s in action.option_strings}
             for name in ("quote", "verify-quote", "ek")}
    create = next(a for a in sub.choices["policy"]._actions if hasattr(a, "choices")
                  and a.choices).choices["create"]
    flags["policy create"] = {s for a in create._actions for s in a.option_strings}
    for command, wanted in {"quote": ["-q", "--nonce", "-l", "--pcrs", "-o", "--output", "-T"],
                            "verify-quote": ["-q", "--nonce"],
                            "policy create": ["-l", "--pcrs", "-o", "--output", "-T"],
                            "ek": ["-o", "--output", "-T", "--tcti"]}.items():
        assert set(wanted) <= flags[command], command


def test_old_flag_spellings_still_work(lab: Lab, tmp_path: Path) -> None:
    out = tmp_path / "q"
    lab.ok("quote", "--pcr-list", "sha256:0", "--qualification", "09", "-o", str(out))
    assert lab.ok("verify-quote", str(out), "--qualification", "09").returncode == 0
