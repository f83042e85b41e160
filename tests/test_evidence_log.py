"""The durable evidence log: appends real swtpm quotes with their verdicts, replays them
offline, and catches a removed, altered, reordered or cut-off entry, an altered policy
copy and a forged head.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation.encoding import b64encode
from attestation.evidence import Evidence
from attestation.evidence_log import (
    MAX_LINE,
    EvidenceLog,
    EvidenceLogError,
    LoggedRuntime,
    RuntimeSlice,
    line_hash,
    replay,
)
from attestation.files import private_dir
from attestation.ima import IMA_PCR, make_entry
from attestation.policy import ReferencePolicy, policy_from_evidence
from attestation.registrar import AkRegistry, PinnedAk
from attestation.report import CheckResult, VerificationReport
from attestation.tpm import TpmClient
from attestation.tpm_types import PcrSelection, parse_public
from attestation.verifier import ClockHistory, QuoteVerifier
from testbed.cli import main as cli
from testbed.cluster.state import save_registry
from testbed.cluster.verification import evidence_dir, verify_evidence
from testbed.core.paths import ClusterPaths
from testbed.tpm.runtime import BASELINE, RuntimeLog, default_policy, file_digest
from testbed.tpm.swtpm import Swtpm, clone_state

SELECTION = PcrSelection("sha256", (0, 1, 2, 3, 7))
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Quote:
    nonce: bytes
    evidence: Evidence


@dataclass(frozen=True)
class Material:
    quotes: tuple[Quote, ...]
    good: ReferencePolicy
    bad: ReferencePolicy  # expects another PCR 7: verdicts recorded as rejected


@pytest.fixture(scope="module")
def material(swtpm_template: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Material]:
    state = tmp_path_factory.mktemp("evlog") / "state"
    clone_state(swtpm_template, state)
    with Swtpm(state) as tpm, TpmClient(tpm.tcti) as client:
        ak = client.attestation_key("ecc")
        quotes = []
        for _ in range(6):
            nonce = os.urandom(32)
            result = client.quote(ak, SELECTION, nonce)
            quotes.append(Quote(nonce, Evidence(result.attest, result.signature, ak.public,
                                                "sha256", result.pcrs)))
        client.flush(ak)
    pcrs = quotes[0].evidence.pcrs
    good = policy_from_evidence(pcrs, None, name="good")
    bad = policy_from_evidence({**pcrs, 7: b"\x07" * 32}, None, name="bad")
    yield Material(tuple(quotes), good, bad)


def stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")  # the testbed's time format


def _verify(quote: Quote, policy: ReferencePolicy, history: ClockHistory
            ) -> VerificationReport:
    trust = PinnedAk([parse_public(quote.evidence.ak_public).public_key()])
    return QuoteVerifier(ak_trust=trust, policy=policy, clock_history=history).verify(
        quote.evidence, quote.nonce)


def fill(directory: Path, material: Material, *, checkpoint_every: int = 2) -> EvidenceLog:
    """Log every quote as a verifier would: the fourth one against the bad policy."""
    log = EvidenceLog(directory, checkpoint_every=checkpoint_every)
    history = ClockHistory()
    for i, quote in enumerate(material.quotes):
        policy = material.bad if i == 3 else material.good
        report = _verify(quote, policy, history)
        assert report.ok == (i != 3)
        assert log.append("node-0", quote.nonce, quote.evidence, policy, report,
                          stamp(T0 + timedelta(minutes=i))) == i + 1
    return log


def lines(log: EvidenceLog) -> list[bytes]:
    return log.path.read_bytes().splitlines()


def write_lines(log: EvidenceLog, content: list[bytes]) -> None:
    log.path.write_bytes(b"".join(line + b"\n" for line in content))


def test_append_and_replay_clean(material: Material, tmp_path: Path) -> None:
    log = fill(tmp_path / "ev", material)
    result = replay(log.directory)
    assert result.ok, result.problems
    assert [e.seq for e in result.entries] == [1, 2, 3, 4, 5, 6]
    assert [e.recorded_ok for e in result.entries] == [True, True, True, False, True, True]
    assert result.entries[3].replayed is not None
    assert result.entries[3].replayed.failure is not None
    assert result.entries[3].replayed.failure.name == "policy"
    assert result.heads == 3 + 1  # checkpoints after entries 2, 4, 6 and head.json
    assert len(lines(log)) == 9
    assert stat.S_IMODE(log.directory.stat().st_mode) == 0o700
    for name in ("log.jsonl", "head.json", "head-key.pem"):
        assert stat.S_IMODE((log.directory / name).stat().st_mode) == 0o600, name
    assert len(list((log.directory / "policies").iterdir())) == 2  # good and bad, once each


def test_removed_entry_is_detected(material: Material, tmp_path: Path) -> None:
    log = fill(tmp_path / "ev", material, checkpoint_every=100)
    content = lines(log)
    write_lines(log, content[:2] + content[3:])  # entry 3 gone
    result = replay(log.directory)
    assert not result.ok
    assert any("chain breaks" in p for p in result.problems)
    assert any("entries 3..3 are missing" in p for p in result.problems)


def test_altered_entry_is_detected(material: Material, tmp_path: Path) -> None:
    log = fill(tmp_path / "ev", material, checkpoint_every=100)
    content = lines(log)
    doc = json.loads(content[3])
    assert doc["verdict"]["ok"] is False
    doc["verdict"]["ok"] = True  # the rejected entry rewritten as accepted
    content[3] = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    write_lines(log, content)
    problems = replay(log.directory).problems
    assert any("line 5: the chain breaks" in p for p in problems)
    assert any("entry 4 (node-0) was recorded accepted but re-verifies rejected" in p
               for p in problems)


def test_a_rewritten_chain_fails_the_signed_heads(material: Material, tmp_path: Path) -> None:
    """Without the head key, re-hashing the whole chain after an edit does not help."""
    log = fill(tmp_path / "ev", material)
    prev = "0" * 64
    rewritten = []
    for line in lines(log):
        doc = json.loads(line)
        if doc.get("node") == "node-0":
            doc["node"] = "node-9"
        doc["prev"] = prev
        line = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        prev = line_hash(line)
        rewritten.append(line)
    write_lines(log, rewritten)
    problems = replay(log.directory).problems
    assert not any("chain breaks" in p for p in problems)
    assert any("signed head names entry" in p for p in problems)


def test_cut_off_tail_is_detected(material: Material, tmp_path: Path) -> None:
    log = fill(tmp_path / "ev", material, checkpoint_every=100)
    write_lines(log, lines(log)[:-1])
    problems = replay(log.directory).problems
    assert problems == [f"head.json: the signed head names entry 6 "
                        f"{json.loads((log.directory / 'head.json').read_text())['head'][:16]}"
                        f", the log has entry 5 {line_hash(lines(log)[-1])[:16]}"]


def test_head_signatures(material: Material, tmp_path: Path) -> None:
    log = fill(tmp_path / "ev", material)
    other = Ed25519PrivateKey.generate()
    assert not replay(log.directory, public_key=other.public_key()).ok
    head_path = log.directory / "head.json"
    head = json.loads(head_path.read_text())
    head["signature"] = b64encode(other.sign(b"anything"))
    head_path.write_text(json.dumps(head))
    assert replay(log.directory).problems == ["head.json: the head signature does not verify"]
    head_path.unlink()
    assert replay(log.directory).problems == ["head.json is missing: the log's tail is unsigned"]


def test_altered_policy_copy_is_detected(material: Material, tmp_path: Path) -> None:
    log = fill(tmp_path / "ev", material)
    for path in (log.directory / "policies").iterdir():
        path.write_text(path.read_text().replace("good", "gold"))
    result = replay(log.directory)
    assert any("is missing or altered" in p for p in result.problems)


def test_since_skips_reverification_but_checks_the_chain(material: Material,
                                                         tmp_path: Path) -> None:
    log = fill(tmp_path / "ev", material)
    result = replay(log.directory, since=T0 + timedelta(minutes=4))
    assert result.ok
    assert [e.replayed is not None for e in result.entries] == [False] * 4 + [True] * 2


def test_a_torn_last_line_is_cut_off_on_append(material: Material, tmp_path: Path) -> None:
    log = fill(tmp_path / "ev", material, checkpoint_every=100)
    with log.path.open("ab") as handle:
        handle.write(b'{"kind":"entry","seq":7,"pr')  # a crash mid-write
    quote = material.quotes[0]
    report = VerificationReport(())
    assert log.append("node-0", quote.nonce, quote.evidence, material.good, report,
                      stamp(T0)) == 7
    assert all(line.startswith(b"{") and line.endswith(b"}") for line in lines(log))


@pytest.mark.parametrize("garbage", [b"not json\n", b"[1]\n", b"x" * (MAX_LINE + 10) + b"\n",
                                     b'{"kind":"entry","seq":1,"prev":"' + b"0" * 64 + b'"}\n'])
def test_hostile_logs_are_one_error(material: Material, tmp_path: Path,
                                    garbage: bytes) -> None:
    log = fill(tmp_path / "ev", material)
    log.path.write_bytes(garbage)
    with pytest.raises(EvidenceLogError):
        replay(log.directory)


def test_an_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(EvidenceLogError, match="head key"):
        replay(tmp_path)


def test_cli_replay_exit_codes(material: Material, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    paths = ClusterPaths(tmp_path / "work", "lab")
    private_dir(paths.root)
    registry = AkRegistry()
    registry.add("node-0", parse_public(material.quotes[0].evidence.ak_public))
    save_registry(paths, registry)
    log = fill(evidence_dir(paths), material, checkpoint_every=100)
    argv = ["evidence", "replay", "--workdir", str(paths.workdir), "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["ok"], out["replayed"], out["heads_verified"]) == (True, 6, 1)
    assert cli.main([*argv, "--since", "2026-12-01T12:05:00"]) == 0
    assert json.loads(capsys.readouterr().out)["replayed"] == 1
    write_lines(log, lines(log)[:2] + lines(log)[3:])
    assert cli.main(argv) == 1
    assert json.loads(capsys.readouterr().out)["problems"]
    log.path.write_bytes(b"garbage\n")
    assert cli.main(argv) == 3
    with pytest.raises(SystemExit) as usage:
        cli.main([*argv, "--since", "yesterday"])
    assert usage.value.code == 2


def test_cluster_verifications_are_logged(material: Material, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """testbed.cluster.verification.verify_evidence appends every verdict, then replays."""
    paths = ClusterPaths(tmp_path / "work", "lab")
    private_dir(paths.root)
    registry = AkRegistry()
    registry.add("node-0", parse_public(material.quotes[0].evidence.ak_public))
    save_registry(paths, registry)
    verdicts = [verify_evidence(paths, "node-0", q.evidence, q.nonce, policy).ok
                for q, policy in zip(material.quotes[:3], (material.good, material.bad,
                                                           material.good), strict=True)]
    assert verdicts == [True, False, True]
    result = replay(evidence_dir(paths), trust_for=lambda node, _: registry.for_node(node))
    assert result.ok and [e.recorded_ok for e in result.entries] == verdicts
    assert cli.main(["evidence", "replay", "--workdir", str(paths.workdir)]) == 0
    assert "INTACT" in capsys.readouterr().out


def test_appends_after_lines_longer_than_the_first_read(material: Material,
                                                        tmp_path: Path) -> None:
    log = EvidenceLog(tmp_path / "ev", checkpoint_every=100)
    quote = material.quotes[0]
    bulky = Evidence(quote.evidence.attest, quote.evidence.signature, quote.evidence.ak_public,
                     "sha256", quote.evidence.pcrs, event_log=os.urandom(300_000))
    rejected = VerificationReport(())
    for i in range(3):  # ~400 KiB lines: the tail is read in growing windows
        assert log.append("node-0", quote.nonce, bulky, material.good, rejected,
                          stamp(T0 + timedelta(minutes=i))) == i + 1
    result = replay(log.directory)
    assert result.ok, result.problems
    assert [e.seq for e in result.entries] == [1, 2, 3] and result.heads == 1


# --- the runtime check's verdict, logged and re-judged -------------------------------------

RUNTIME_SELECTION = PcrSelection("sha256", (0, 7, IMA_PCR))


@dataclass(frozen=True)
class RuntimeQuote:
    quote: Quote
    window: RuntimeSlice
    ok: bool


@pytest.fixture(scope="module")
def runtime_quotes(swtpm_template: Path, tmp_path_factory: pytest.TempPathFactory
                   ) -> list[RuntimeQuote]:
    """Two quotes of a real PCR 10: after the baseline (allowed), then after an unlisted
    binary ran (refused by the baseline's runtime policy)."""
    top = tmp_path_factory.mktemp("evlog-runtime")
    clone_state(swtpm_template, top / "state")
    runtime_log, made, start, pcr = RuntimeLog(top / "runtime.log"), [], 0, bytes(32)
    with Swtpm(top / "state") as tpm, TpmClient(tpm.tcti) as client:
        ak = client.attestation_key("ecc")
        for executed, ok in ((BASELINE, True), ((("/usr/bin/miner", b"x"),), False)):
            for path, content in executed:
                runtime_log.measure(client, path, content)
            nonce = os.urandom(32)
            result = client.quote(ak, RUNTIME_SELECTION, nonce)
            evidence = Evidence(result.attest, result.signature, ak.public, "sha256",
                                result.pcrs)
            data = runtime_log.read(start)
            made.append(RuntimeQuote(Quote(nonce, evidence),
                                     RuntimeSlice(start, start + len(data), pcr, data), ok))
            start, pcr = start + len(data), result.pcrs[IMA_PCR]
        client.flush(ak)
    return made


def fill_runtime(directory: Path, quotes: list[RuntimeQuote]) -> EvidenceLog:
    log, history = EvidenceLog(directory), ClockHistory()
    for i, made in enumerate(quotes):
        boot = policy_from_evidence(made.quote.evidence.pcrs, None, name=f"boot-{i}")
        report = _verify(made.quote, boot, history)
        assert report.ok
        runtime = default_policy("baseline")
        check = CheckResult("runtime", "passed" if made.ok else "failed", "as judged live")
        log.append("node-0", made.quote.nonce, made.quote.evidence, boot,
                   VerificationReport((*report.checks, check)), stamp(T0 + timedelta(minutes=i)),
                   runtime=LoggedRuntime(runtime, made.window, made.ok))
    return log


def test_runtime_verdicts_are_logged_and_rejudged_offline(
        runtime_quotes: list[RuntimeQuote], tmp_path: Path) -> None:
    log = fill_runtime(tmp_path / "ev", runtime_quotes)
    entries = [json.loads(line) for line in lines(log)]
    assert [e["runtime"]["verdict"] for e in entries] == ["passed", "failed"]
    assert entries[1]["runtime"]["start"] == entries[0]["runtime"]["end"] > 0
    result = replay(log.directory)
    assert result.ok, result.problems
    judged = [e.replayed.check("runtime") for e in result.entries if e.replayed]
    assert [c.state for c in judged] == ["passed", "failed"]
    assert "/usr/bin/miner" in judged[1].detail  # the runtime policy of the time names it
    assert len(list((log.directory / "policies").glob("runtime-*.yaml"))) == 1


@pytest.mark.parametrize("alteration", ["slice", "slice-and-digest", "policy"])
def test_an_altered_runtime_record_is_detected_by_name(
        runtime_quotes: list[RuntimeQuote], tmp_path: Path, alteration: str) -> None:
    log = fill_runtime(tmp_path / "ev", runtime_quotes)
    if alteration == "policy":
        for path in (log.directory / "policies").glob("runtime-*.yaml"):
            path.write_text(path.read_text().replace("baseline", "lenient"))
    else:
        content = lines(log)
        doc = json.loads(content[1])
        honest = base64.b64decode(doc["runtime"]["slice"])
        forged = honest.replace(b"/usr/bin/miner", b"/usr/bin/gzip")  # hide the binary
        if alteration == "slice-and-digest":  # a well-formed line, digest and offsets
            forged = make_entry(file_digest(b"gzip"), "/usr/bin/gzip").line()
            doc["runtime"].update(sha256=hashlib.sha256(forged).hexdigest(),
                                  end=doc["runtime"]["start"] + len(forged))
        doc["runtime"]["slice"] = b64encode(forged)
        content[1] = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        write_lines(log, content)
    result = replay(log.directory)
    assert not result.ok
    named = [p for p in result.problems if "entry 2: runtime: " in p and "altered" in p]
    assert named, result.problems
    if alteration == "slice-and-digest":
        assert "does not replay to the quoted PCR 10" in named[0]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["policy", "start", "end", "from_pcr", "sha256", "slice",
                              "verdict", None]), value=json_values)
def test_hostile_runtime_records_are_a_problem_or_one_error(
        runtime_quotes: list[RuntimeQuote], tmp_path: Path, field: str | None,
        value: object) -> None:
    directory = tmp_path / f"ev-{os.urandom(4).hex()}"
    log = fill_runtime(directory, runtime_quotes)
    content = lines(log)
    doc = json.loads(content[0])
    if field is None:
        doc["runtime"] = value
    else:
        doc["runtime"][field] = value
    content[0] = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    write_lines(log, content)
    try:
        result = replay(directory)
    except EvidenceLogError:
        return
    assert not result.ok  # the altered line breaks the chain, at least
