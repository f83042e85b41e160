"""Cluster specs, the digest-based measured boot and the predicted policy (no node processes).

The one test needing a TPM uses the plugin's ``swtpm`` fixture to check that
the prediction equals what a real TPM ends up with.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from attestation.eventlog import parse_event_log
from attestation.policy import EventMismatch, evaluate_policy, policy_from_evidence
from attestation.tpm import TpmClient
from testbed.sim.backend import node_policy
from testbed.spec.cluster_spec import (
    MAX_NODES,
    MAX_SPEC_BYTES,
    ROLE_NAMES,
    Artifact,
    BootOverride,
    BootSpec,
    ClusterSpec,
    ClusterSpecError,
    default_spec_path,
    dump_cluster_spec,
    load_cluster_spec,
    parse_cluster_spec,
    parse_tamper,
)
from testbed.tpm.boot import SIM_PCRS, measure_boot, predict_boot, predicted_policy
from testbed.tpm.swtpm import Swtpm

CHAIN = BootSpec.from_content(firmware="OVMF test volume", kernel="vmlinuz-test",
                              initrd="initrd-test", cmdline="console=ttyS0 ro quiet")


def example_document() -> dict[str, Any]:
    doc = yaml.safe_load(default_spec_path().read_text())
    assert isinstance(doc, dict)
    return doc


def parse_doc(doc: object, base: Path = Path("/")) -> ClusterSpec:
    return parse_cluster_spec(yaml.safe_dump(doc), base)


class RecordingClient:
    """Stands in for TpmClient where only PCR extends matter."""

    def __init__(self) -> None:
        self.extends: list[tuple[int, dict[str, bytes]]] = []

    def extend_pcr(self, index: int, digests: dict[str, bytes]) -> None:
        self.extends.append((index, dict(digests)))


# --- the shipped example and round trips ------------------------------------------------------


def test_default_spec_is_the_four_node_lab() -> None:
    spec = load_cluster_spec(default_spec_path())
    assert spec.backend == "sim"
    assert [(n.name, n.role) for n in spec.nodes] == [
        ("verifier", "verifier"), ("server", "server"), ("client", "client"),
        ("cryptovm", "cryptovm")]
    assert all(n.tampered is None and n.policy is None for n in spec.nodes)


def test_dump_reads_back_to_an_equal_spec(tmp_path: Path) -> None:
    spec = load_cluster_spec(default_spec_path())
    spec = spec.with_tamper("client", BootOverride(cmdline="console=ttyS0 init=/bin/sh"))
    assert parse_cluster_spec(dump_cluster_spec(spec), tmp_path) == spec


def test_relative_paths_resolve_against_the_spec_directory(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "vmlinuz").write_bytes(b"kernel bytes")
    doc = example_document()
    doc["nodes"][0]["boot"]["kernel"] = {"file": "images/vmlinuz"}
    doc["nodes"][0]["policy"] = "policies/verifier.yaml"
    spec_path = tmp_path / "lab.yaml"
    spec_path.write_text(yaml.safe_dump(doc))
    node = load_cluster_spec(spec_path).nodes[0]
    assert node.boot.kernel.value == str(tmp_path / "images" / "vmlinuz")
    assert node.policy == tmp_path / "policies" / "verifier.yaml"
    assert node.boot.kernel.measure() == (hashlib.sha256(b"kernel bytes").digest(), 12)


def test_unreadable_artifact_files_name_the_field(tmp_path: Path) -> None:
    missing = Artifact("file", str(tmp_path / "nope"), "nodes[1].boot.kernel")
    with pytest.raises(ClusterSpecError,
                       match=r"^nodes\[1\]\.boot\.kernel\.file: .* does not exist"):
        missing.measure()
    with pytest.raises(ClusterSpecError, match="not a regular file"):
        Artifact("file", "/dev/zero", "nodes[0].boot.initrd").measure()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # nobody writes: reading it would block forever
    with pytest.raises(ClusterSpecError, match=r"is not a regular file \(a FIFO\)"):
        Artifact("file", str(fifo), "nodes[0].boot.initrd").measure()


# --- strict loading: every error names its field -------------------------------------------------


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: object) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


BAD_FIELDS = [
    (("colour",), "blue", r"^spec\.'colour': unknown key"),
    (("version",), 2, r"^version: must be the integer 1, got the integer 2$"),
    (("version",), True, r"^version: must be the integer 1, got a boolean true$"),
    (("version",), 1.0, r"^version: must be the integer 1, got a float 1.0$"),
    (("version",), "1", r"^version: must be the integer 1, got a string '1'$"),
    (("name",), "Has Spaces", r"^name: 'Has Spaces' is not a valid name"),
    (("backend",), "vmware", r"^backend: 'vmware' is not one of"),
    (("nodes",), [], r"^nodes: expected a non-empty list"),
    (("nodes", 1, "role"), "attacker", r"^nodes\[1\]\.role: 'attacker' is not one of"),
    (("nodes", 1, "name"), "verifier", r"^nodes\[1\]\.name: 'verifier' is used by two nodes"),
    (("nodes", 0, "ram"), 4096, r"^nodes\[0\]\.'ram': unknown key"),
    (("nodes", 2, "boot", "kernel"), "vmlinuz", r"^nodes\[2\]\.boot\.kernel: .*bare string"),
    (("nodes", 2, "boot", "kernel"), {"content": "a", "sha256": "00" * 32},
     r"^nodes\[2\]\.boot\.kernel: give exactly one of"),
    (("nodes", 2, "boot", "initrd"), {"sha256": "xyz"}, r"^nodes\[2\]\.boot\.initrd\.sha256"),
    (("nodes", 2, "boot", "initrd"), {"sha512": "00"}, r"^nodes\[2\]\.boot\.initrd\.'sha512'"),
    (("nodes", 0, "boot", "cmdline"), "ro\ninit=/bin/sh",
     r"^nodes\[0\]\.boot\.cmdline: must be printable text on a single line"),
    (("nodes", 0, "boot", "cmdline"), 42, r"^nodes\[0\]\.boot\.cmdline: expected a string"),
    (("nodes", 0, "tampered"), {}, r"^nodes\[0\]\.tampered: empty"),
    (("nodes", 0, "tampered"), {"kernel": {"file": ""}}, r"^nodes\[0\]\.tampered\.kernel\.file"),
    (("nodes", 0, "network"), "LAB 0", r"^nodes\[0\]\.network"),
    (("nodes", 0, "policy"), 7, r"^nodes\[0\]\.policy: expected a string"),
]


@pytest.mark.parametrize(("path", "value", "message"), BAD_FIELDS)
def test_bad_fields_are_rejected_by_path(path: tuple[Any, ...], value: object,
                                         message: str) -> None:
    with pytest.raises(ClusterSpecError, match=message):
        parse_doc(_set(example_document(), path, value))


def test_missing_boot_fields_are_named() -> None:
    doc = example_document()
    del doc["nodes"][1]["boot"]["initrd"]
    with pytest.raises(ClusterSpecError, match=r"^nodes\[1\]\.boot\.initrd: missing"):
        parse_doc(doc)
    del doc["nodes"][1]["boot"]
    with pytest.raises(ClusterSpecError, match=r"^nodes\[1\]\.boot: missing"):
        parse_doc(doc)


@pytest.mark.parametrize(("text", "message"), [
    ("", "the document is empty"),
    ("- a\n- b\n", "expected a mapping, got a list"),
    ("version: 1\nversion: 1\n", "duplicate key"),
    ("a: &x {v: 1}\nb: {<<: *x}\n", "merge keys"),
    ("version: [", "not valid YAML"),
    ("x: !!python/object:os.system {}\n", "not valid YAML"),
    ("date: 2024-02-30\n", "invalid YAML value"),
])
def test_hostile_yaml_is_refused(text: str, message: str) -> None:
    with pytest.raises(ClusterSpecError, match=message):
        parse_cluster_spec(text, Path("/"))


def test_anchors_and_aliases_share_a_boot_block() -> None:
    text = """
version: 1
name: lab
nodes:
  - name: a
    boot: &lab
      firmware: {content: fw}
      kernel: {content: k}
      initrd: {content: i}
      cmdline: ro
  - {name: b, boot: *lab, role: server}
"""
    spec = parse_cluster_spec(text, Path("/"))
    assert spec.nodes[0].boot == spec.nodes[1].boot
    assert [n.role for n in spec.nodes] == ["generic", "server"]


def test_alias_bomb_costs_nothing() -> None:
    """9**12 leaves by reference: refused quickly, and the message stays short."""
    levels = ["&a0 [" + ", ".join(["lol"] * 9) + "]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 13)]
    text = f"version: 1\nname: x\nbackend: [{', '.join(levels)}]\n"
    started = time.monotonic()
    with pytest.raises(ClusterSpecError, match=r"^backend: ") as info:
        parse_cluster_spec(text, Path("/"))
    assert time.monotonic() - started < 1.0 and len(str(info.value)) < 300


def test_size_and_node_count_are_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_SPEC_BYTES + 1))
    with pytest.raises(ClusterSpecError, match="larger than"):
        load_cluster_spec(big)
    doc = example_document()
    node = doc["nodes"][0]
    doc["nodes"] = [dict(node, name=f"n{i}") for i in range(MAX_NODES + 1)]
    with pytest.raises(ClusterSpecError, match=f"more than {MAX_NODES} nodes"):
        parse_doc(doc)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\n")
    with pytest.raises(ClusterSpecError, match="not UTF-8"):
        load_cluster_spec(binary)


# --- fuzzing: hostile specs produce only ClusterSpecError ---

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                     st.text(max_size=30), st.sampled_from(["predicted", "sim", *ROLE_NAMES]))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(
        ["content", "file", "sha256", "cmdline", "kernel", "name", "role", "boot"])),
        inner, max_size=4)), max_leaves=12)


@given(st.text(max_size=400))
def test_fuzz_arbitrary_text(text: str) -> None:
    with contextlib.suppress(ClusterSpecError):
        parse_cluster_spec(text, Path("/"))


@given(_values)
def test_fuzz_arbitrary_documents(document: object) -> None:
    with contextlib.suppress(ClusterSpecError):
        parse_doc(document)


_PATHS = [("version",), ("name",), ("backend",), ("nodes",), ("nodes", 0),
          ("nodes", 0, "name"), ("nodes", 1, "role"), ("nodes", 1, "boot"),
          ("nodes", 1, "boot", "firmware"), ("nodes", 2, "boot", "kernel", "content"),
          ("nodes", 2, "boot", "cmdline"), ("nodes", 2, "tampered"), ("nodes", 0, "policy"),
          ("nodes", 0, "network"), ("nodes", 1, "boot", "firmware_version")]


@given(st.lists(st.tuples(st.sampled_from(_PATHS), _values), min_size=1, max_size=3))
def test_fuzz_mutated_example(mutations: list[tuple[tuple[Any, ...], object]]) -> None:
    doc: Any = example_document()
    for path, value in mutations:
        try:
            doc = _set(doc, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed the parent
    try:
        spec = parse_doc(doc)
    except ClusterSpecError:
        return
    assert parse_cluster_spec(dump_cluster_spec(spec), Path("/")) == spec


@given(st.text(max_size=80))
def test_fuzz_tamper_syntax(text: str) -> None:
    with contextlib.suppress(ClusterSpecError):
        parse_tamper(text, Path("/"))


# --- --tamper -----------------------------------------------------------------------------------


def test_tamper_syntax() -> None:
    node, override = parse_tamper("client=cmdline:console=ttyS0 init=/bin/sh")
    assert (node, override) == ("client", BootOverride(cmdline="console=ttyS0 init=/bin/sh"))
    _, override = parse_tamper("server=kernel:evil kernel")
    assert override.kernel == Artifact("content", "evil kernel")
    _, override = parse_tamper(f"server=initrd:sha256={'AB' * 32}")
    assert override.initrd == Artifact("sha256", "ab" * 32)
    for bad, message in [("client", "expected NODE=FIELD:VALUE"),
                         ("client=ram:4G", "field 'ram' is not one of"),
                         ("Bad Node=cmdline:x", "not a valid name"),
                         ("client=cmdline:a\tb", "printable")]:
        with pytest.raises(ClusterSpecError, match=message):
            parse_tamper(bad)


def test_tamper_merges_with_the_spec_and_names_unknown_nodes() -> None:
    spec = load_cluster_spec(default_spec_path())
    spec = spec.with_tamper("client", BootOverride(cmdline="ro init=/bin/sh"))
    spec = spec.with_tamper("client", BootOverride(kernel=Artifact("content", "evil")))
    client = spec.node("client")
    assert client.tampered is not None and client.tampered.fields() == ("kernel", "cmdline")
    assert client.effective_boot.cmdline == "ro init=/bin/sh"
    assert client.boot.cmdline == "console=ttyS0 ro quiet"  # the honest chain is kept
    with pytest.raises(ClusterSpecError, match="no node named 'ghost'"):
        spec.with_tamper("ghost", BootOverride(cmdline="x"))


# --- digest-based measured boot and the predicted policy ---


def _by_digest(boot: BootSpec) -> BootSpec:
    """The same boot with every artifact given by its SHA-256 alone."""
    def digest(artifact: Artifact) -> Artifact:
        return Artifact("sha256", artifact.measure()[0].hex())
    return BootSpec(digest(boot.firmware), digest(boot.kernel), digest(boot.initrd),
                    boot.cmdline, boot.firmware_version)


def test_the_prediction_is_the_log_the_measured_boot_writes() -> None:
    """Prediction and measurement are one code path: same events, data and extends."""
    client = RecordingClient()
    log = measure_boot(client, CHAIN)  # type: ignore[arg-type]
    assert predict_boot(CHAIN)[0] == log
    assert [pcr for pcr, _ in client.extends] == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 4, 9, 9]


def test_digest_only_artifacts_measure_like_their_bytes() -> None:
    by_bytes = CHAIN
    by_digest = _by_digest(CHAIN)
    # Sizes only appear in event data; the PCRs and the policy's digests are the same.
    assert predict_boot(by_digest)[1] == predict_boot(by_bytes)[1]
    a, b = predicted_policy("n", by_digest), predicted_policy("n", by_bytes)
    assert (a.pcrs, a.events) == (b.pcrs, b.events)


def test_predicted_policy_covers_the_quoted_pcrs_with_labelled_events() -> None:
    spec = load_cluster_spec(default_spec_path())
    policy = node_policy(spec.node("server"))
    assert policy.name == "server-predicted"
    assert sorted(policy.pcrs) == list(SIM_PCRS.indices)
    labels = [e.label for e in policy.events if e.pcr in (4, 9)]
    assert labels == ["separator", "kernel", "kernel command line", "initrd"]


def test_tampered_boot_fails_the_predicted_policy_at_the_diverging_event() -> None:
    honest = CHAIN
    tampered = replace(CHAIN, cmdline=CHAIN.cmdline + " init=/bin/sh")
    log_bytes, pcrs = predict_boot(tampered)
    mismatches = evaluate_policy(predicted_policy("client", honest), pcrs,
                                 parse_event_log(log_bytes))
    events = [m for m in mismatches if isinstance(m, EventMismatch)]
    assert [(m.pcr, m.label) for m in events] == [(9, "kernel command line")]
    assert "PCR 9: event 1 (kernel command line" in events[0].describe()


def test_prediction_equals_a_real_tpm(swtpm: Swtpm) -> None:
    boot = BootSpec(Artifact("sha256", hashlib.sha256(b"fw").hexdigest()),
                    Artifact("content", "kernel"), Artifact("content", "initrd"), "ro")
    with TpmClient(swtpm.tcti) as client:
        log = measure_boot(client, boot)
        real = client.read_pcrs("sha256", SIM_PCRS.indices)
    log_bytes, predicted = predict_boot(boot)
    assert predicted == real and log_bytes == log
    from_tpm = policy_from_evidence(real, parse_event_log(log), name="x")
    predicted_pol = predicted_policy("x", boot)
    assert from_tpm.pcrs == predicted_pol.pcrs
    assert [(e.pcr, e.event_type, e.digest) for e in from_tpm.events] == [
        (e.pcr, e.event_type, e.digest) for e in predicted_pol.events]
