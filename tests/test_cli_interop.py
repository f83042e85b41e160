"""The `testbed` command end to end, and interoperability with tpm2-tools both ways:
tpm2_checkquote accepts our quotes, our verify-quote accepts tpm2_quote's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attestation.eventlog import EventLogBuilder
from attestation.tpm import TpmClient


def run_testbed(*args: str, workdir: Path | None = None, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "testbed.cli.main"]
    if workdir is not None:
        cmd += ["--workdir", str(workdir)]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def tpm2(tool: str, *args: str, tcti: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "TPM2TOOLS_TCTI": tcti})


def test_tpm2_checkquote_accepts_our_quote(swtpm, tmp_path: Path) -> None:
    out = tmp_path / "q"
    r = run_testbed("quote", "-T", swtpm.tcti, "-l", "sha256:0-7,9,16", "-q", "c0ffee00",
                "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["nonce"] == "c0ffee00"
    check = subprocess.run(
        ["tpm2_checkquote", "-u", str(out / "ak.pem"), "-m", str(out / "quote.msg"),
         "-s", str(out / "quote.sig"), "-f", str(out / "quote.pcrs"), "-g", "sha256",
         "-q", "c0ffee00"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    # ... and tpm2_checkquote rejects it for another nonce: it really checks.
    bad = subprocess.run(
        ["tpm2_checkquote", "-u", str(out / "ak.pem"), "-m", str(out / "quote.msg"),
         "-s", str(out / "quote.sig"), "-f", str(out / "quote.pcrs"), "-g", "sha256",
         "-q", "c0ffee01"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0


def test_tpm2_checkquote_accepts_our_rsa_quote(swtpm, tmp_path: Path) -> None:
    out = tmp_path / "q"
    assert run_testbed("quote", "-T", swtpm.tcti, "-G", "rsa", "-q", "01", "-o", str(out)
                   ).returncode == 0
    check = subprocess.run(
        ["tpm2_checkquote", "-u", str(out / "ak.pem"), "-m", str(out / "quote.msg"),
         "-s", str(out / "quote.sig"), "-f", str(out / "quote.pcrs"), "-g", "sha256",
         "-q", "01"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr


@pytest.fixture
def tools_quote(swtpm, tmp_path: Path) -> Path:
    """A quote made entirely by tpm2-tools (AK under the owner hierarchy, as tutorials do)."""
    t = swtpm.tcti
    d = tmp_path
    steps = [
        ("tpm2_createprimary", "-C", "o", "-g", "sha256", "-G", "ecc", "-c", str(d / "p.ctx")),
        ("tpm2_create", "-C", str(d / "p.ctx"), "-G", "ecc256:ecdsa-sha256:null", "-a",
         "restricted|sign|fixedtpm|fixedparent|sensitivedataorigin|userwithauth",
         "-u", str(d / "ak.tpm2b"), "-r", str(d / "ak.priv")),
        ("tpm2_load", "-C", str(d / "p.ctx"), "-u", str(d / "ak.tpm2b"), "-r",
         str(d / "ak.priv"), "-c", str(d / "ak.ctx")),
        ("tpm2_evictcontrol", "-C", "o", "-c", str(d / "ak.ctx"), "0x81000100"),
        ("tpm2_quote", "-c", "0x81000100", "-l", "sha256:0,1,2,3,7", "-q", "a1b2c3d4",
         "-m", str(d / "quote.msg"), "-s", str(d / "quote.sig"), "-o", str(d / "quote.pcrs"),
         "-g", "sha256"),
        ("tpm2_readpublic", "-c", "0x81000100", "-f", "pem", "-o", str(d / "ak.pem")),
    ]
    for tool, *args in steps:
        swtpm.flush_transients()  # swtpm has no resource manager
        r = tpm2(tool, *args, tcti=t)
        assert r.returncode == 0, f"{tool}: {r.stderr}"
    return d


def test_our_verifier_accepts_tpm2_quote_output(tools_quote: Path) -> None:
    r = run_testbed("verify-quote", str(tools_quote), "-q", "a1b2c3d4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ACCEPTED" in r.stdout
    assert "bare public key" in r.stdout  # honest about what a PEM AK cannot prove


def test_our_verifier_checks_ak_attributes_of_a_tpm2b_public(tools_quote: Path) -> None:
    """With tpm2_create's TPM2B_PUBLIC instead of PEM, the AK's attributes are checked too."""
    r = run_testbed("verify-quote", str(tools_quote), "-u", str(tools_quote / "ak.tpm2b"),
                "-q", "a1b2c3d4", "--json")
    assert r.returncode == 0, r.stdout
    report = json.loads(r.stdout)
    attrs = next(c for c in report["checks"] if c["check"] == "ak_attributes")
    assert attrs["state"] == "passed" and "restricted" in attrs["detail"]


def test_verify_quote_wrong_nonce_exits_1_naming_the_check(tools_quote: Path) -> None:
    r = run_testbed("verify-quote", str(tools_quote), "-q", "a1b2c3d5", "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["failed_check"] == "qualifying_data"


def test_verify_quote_altered_pcr_file_exits_1(tools_quote: Path) -> None:
    pcrs = bytearray((tools_quote / "quote.pcrs").read_bytes())
    pcrs[150] ^= 0xFF  # inside the first digest (its u16 size is at 140)
    (tools_quote / "quote.pcrs").write_bytes(bytes(pcrs))
    r = run_testbed("verify-quote", str(tools_quote), "-q", "a1b2c3d4")
    assert r.returncode == 1
    assert "pcr_digest" in r.stdout


def test_verify_quote_malformed_message_exits_3(tools_quote: Path) -> None:
    (tools_quote / "quote.msg").write_bytes(b"\xffTCG\x80\x18garbage")
    r = run_testbed("verify-quote", str(tools_quote), "-q", "a1b2c3d4")
    assert r.returncode == 3
    assert "Traceback" not in r.stderr
    assert "TPMS_ATTEST" in r.stderr


def test_verify_quote_missing_files_exit_3_with_a_hint(tmp_path: Path) -> None:
    r = run_testbed("verify-quote", str(tmp_path), "-q", "00")
    assert r.returncode == 3
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_policy_create_then_enforce(swtpm, tmp_path: Path) -> None:
    good = tmp_path / "good"
    assert run_testbed("quote", "-T", swtpm.tcti, "-l", "sha256:0-7,16", "-q", "11",
                   "-o", str(good)).returncode == 0
    policy = tmp_path / "policy.yaml"
    r = run_testbed("policy", "create", "--from", str(good), "--name", "lab", "-o", str(policy))
    assert r.returncode == 0, r.stderr
    assert run_testbed("verify-quote", str(good), "-q", "11", "--policy", str(policy)
                   ).returncode == 0
    with TpmClient(swtpm.tcti) as client:
        client.extend_pcr(16, {"sha256": bytes(32)})
    bad = tmp_path / "bad"
    assert run_testbed("quote", "-T", swtpm.tcti, "-l", "sha256:0-7,16", "-q", "22",
                   "-o", str(bad)).returncode == 0
    r = run_testbed("verify-quote", str(bad), "-q", "22", "--policy", str(policy))
    assert r.returncode == 1
    assert "PCR 16" in r.stdout


def test_policy_with_event_log_names_the_diverging_event(swtpm, tmp_path: Path) -> None:
    log = EventLogBuilder()
    log.add(16, 0x0D, b"kernel cmdline: ro quiet\x00")
    (tmp_path / "good.log").write_bytes(log.to_bytes())
    with TpmClient(swtpm.tcti) as client:
        client.extend_pcr(16, log.events[-1].digests)
    good = tmp_path / "good"
    run_testbed("quote", "-T", swtpm.tcti, "-l", "sha256:16", "-q", "33", "-o", str(good))
    policy = tmp_path / "policy.yaml"
    assert run_testbed("policy", "create", "--from", str(good), "--event-log",
                   str(tmp_path / "good.log"), "--name", "ev", "-o", str(policy)
                   ).returncode == 0
    other = EventLogBuilder()
    other.add(16, 0x0D, b"kernel cmdline: ro quiet init=/bin/sh\x00")
    (tmp_path / "bad.log").write_bytes(other.to_bytes())
    r = run_testbed("verify-quote", str(good), "-q", "33", "--policy", str(policy),
                "--event-log", str(tmp_path / "bad.log"))
    assert r.returncode == 1
    assert "event_log" in r.stdout  # the log no longer replays to the quoted PCR 16


def test_malformed_policy_exits_3(swtpm, tmp_path: Path) -> None:
    out = tmp_path / "q"
    run_testbed("quote", "-T", swtpm.tcti, "-q", "44", "-o", str(out))
    (tmp_path / "p.yaml").write_text("version: 1\nname: x\npcrs: {4: nothex}\n")
    r = run_testbed("verify-quote", str(out), "-q", "44", "--policy", str(tmp_path / "p.yaml"))
    assert r.returncode == 3
    assert "pcrs.4" in r.stderr


def test_managed_tpm_lifecycle_and_ek(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    r = run_testbed("tpm", "start", "lab1", "--json", workdir=wd)
    assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["pid"]
    try:
        listed = json.loads(run_testbed("tpm", "list", "--json", workdir=wd).stdout)
        assert listed[0]["name"] == "lab1" and listed[0]["running"]
        ek = run_testbed("ek", "--tpm", "lab1", "-G", "ecc", "--json", workdir=wd)
        assert ek.returncode == 0, ek.stderr
        assert json.loads(ek.stdout)["valid"] is True
        q = run_testbed("quote", "--tpm", "lab1", "-o", str(tmp_path / "q"), workdir=wd)
        assert q.returncode == 0, q.stderr
        again = json.loads(run_testbed("tpm", "start", "lab1", "--json", workdir=wd).stdout)
        assert again["pid"] == pid  # idempotent
    finally:
        assert run_testbed("tpm", "stop", "--all", workdir=wd).returncode == 0
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status"
                                                                 ).read_text().lower()


def test_not_running_managed_tpm_says_what_to_do(tmp_path: Path) -> None:
    r = run_testbed("quote", "--tpm", "nope", workdir=tmp_path / "wd")
    assert r.returncode == 4
    assert "testbed tpm start nope" in r.stderr


def test_eventlog_command_replays(tmp_path: Path) -> None:
    log = EventLogBuilder()
    log.add(4, 0x80000003, b"\x00" * 32, b"kernel")
    (tmp_path / "log.bin").write_bytes(log.to_bytes())
    r = run_testbed("eventlog", str(tmp_path / "log.bin"), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["events"][-1]["type"] == "EV_EFI_BOOT_SERVICES_APPLICATION"
    assert "4" in out["pcrs"]["sha256"]


def test_help_reads_like_a_tool() -> None:
    r = run_testbed("--help")
    assert r.returncode == 0
    for word in ("verify-quote", "exit codes", "TESTBED_TCTI", "tpm2_checkquote"):
        assert word in r.stdout
    assert run_testbed("no-such-command").returncode == 2
