"""Batched quotes: the Merkle tree (hypothesis), the Batcher, batched channels on real
swtpm behind the TPM latency proxy, and substituted quotes and paths caught by the
``batch_inclusion`` check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.errors import EvidenceFormatError, TpmError, VerificationError
from attestation.ima import IMA_PCR
from attestation.registrar import AkRegistry, Registrar
from attestation.tpm import TpmClient
from attestation.tpm_types import PcrSelection, parse_public
from attestation.verifier import ClockHistory
from testbed.cluster.agent import AgentClient, UnixTransport
from testbed.cluster.results import AttestResult
from testbed.cluster.runtime import quoting_pcr10
from testbed.cluster.state import load_node_policy
from testbed.cluster.verification import attest_node, verify_evidence
from testbed.core.paths import ClusterPaths
from testbed.sim.backend import SimBackend
from testbed.spec.cluster_spec import (
    ClusterSpecError,
    default_spec_path,
    dump_cluster_spec,
    duration_text,
    parse_cluster_spec,
    parse_duration,
)
from testbed.tpm.boot import SIM_PCRS
from testbed.tpm.latency import LatencyModel, TpmLatencyProxy
from testbed.tpm.localca import LocalCA
from testbed.tpm.pytest_plugin import SwtpmFactory
from tests.attestation_helpers import activate
from tests.sim_lab import run_cli
from trusted_passages import (
    BindingContext,
    ChannelConfig,
    FakeIssuer,
    TpmIssuer,
    TpmValidator,
    connect,
    serve,
)
from trusted_passages.batch import (
    MAX_BATCH,
    BatchProof,
    MerkleTree,
    batch_qualifying_data,
    leaf_hash,
    node_hash,
    root_from_path,
)
from trusted_passages.envelope import decode_envelope
from trusted_passages.pki import generate_key, issue_certificate, make_ca
from trusted_passages.tpm import Batcher

SELECTION = PcrSelection("sha256", (0, 1, 2, 3, 4, 5, 6, 7))
WINDOW = 0.2  # generous: CI machines spread the arrivals of concurrent handshakes
LATENCY_MS = 20
LOCALHOST = "127.0.0.1"

digests = st.binary(min_size=32, max_size=32)
leaf_lists = st.lists(digests, min_size=1, max_size=70)


# --- the Merkle tree ---------------------------------------------------------------------


def test_small_trees_match_rfc6962() -> None:
    a, b, c = (bytes([i]) * 32 for i in range(3))
    assert MerkleTree([a]).root == leaf_hash(a)
    assert MerkleTree([a, b]).root == node_hash(leaf_hash(a), leaf_hash(b))
    assert MerkleTree([a, b, c]).root == node_hash(node_hash(leaf_hash(a), leaf_hash(b)),
                                                   leaf_hash(c))
    assert MerkleTree([a, b, c]).path(2) == (node_hash(leaf_hash(a), leaf_hash(b)),)


@given(leaf_lists, st.data())
def test_every_path_leads_to_the_root(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    proof = tree.proof(index)
    assert proof.root(leaves[index]) == tree.root
    assert len(proof.path) <= (len(leaves) - 1).bit_length()
    assert BatchProof.from_dict(json.loads(json.dumps(proof.to_dict()))) == proof


@given(leaf_lists, digests, st.data())
def test_a_leaf_not_in_the_batch_never_reaches_the_root(leaves: list[bytes], outsider: bytes,
                                                        data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    if outsider != leaves[index]:
        assert tree.proof(index).root(outsider) != tree.root


@given(st.lists(digests, min_size=2, max_size=40, unique=True), st.data())
def test_a_path_for_another_leaf_fails(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    mine = data.draw(st.integers(0, len(leaves) - 1))
    other = data.draw(st.integers(0, len(leaves) - 1).filter(lambda i: i != mine))
    proof = tree.proof(other)
    assert proof.root(leaves[mine]) != tree.root  # the other leaf's path, my leaf
    with_my_index = BatchProof(mine, proof.size, proof.path)
    with contextlib.suppress(ValueError):  # a path of the wrong length is refused outright
        assert with_my_index.root(leaves[mine]) != tree.root


@given(leaf_lists, st.data())
def test_paths_cannot_be_stretched_or_cut(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    index = data.draw(st.integers(0, len(leaves) - 1))
    path = tree.path(index)
    with pytest.raises(ValueError, match="path is"):
        root_from_path(leaves[index], index, len(leaves), (*path, b"\0" * 32))
    if path:
        with pytest.raises(ValueError, match="path is"):
            root_from_path(leaves[index], index, len(leaves), path[:-1])


@settings(max_examples=200)
@given(st.one_of(st.none(), st.integers(), st.text(max_size=5), st.lists(st.integers()),
                 st.dictionaries(st.sampled_from(["index", "size", "path", "root"]),
                                 st.one_of(st.integers(-2, MAX_BATCH + 2), st.booleans(),
                                           st.lists(st.text(max_size=70), max_size=20)))))
def test_hostile_batch_objects_are_format_errors(doc: Any) -> None:
    try:
        proof = BatchProof.from_dict(doc)
    except EvidenceFormatError:
        return
    assert 0 <= proof.index < proof.size <= MAX_BATCH


def test_the_batch_domain_separates_batched_from_unbatched_qualifying_data() -> None:
    root = MerkleTree([b"\1" * 32]).root
    assert batch_qualifying_data(root) != root
    assert batch_qualifying_data(root) == hashlib.sha256(b"trusted-passages/batch/v1\0"
                                                         + root).digest()


# --- the Batcher ---------------------------------------------------------------------------


def test_batcher_signs_once_per_window() -> None:
    signed: list[bytes] = []

    def sign(qualifying: bytes) -> bytes:
        signed.append(qualifying)
        time.sleep(0.02)
        return qualifying

    batcher: Batcher[bytes] = Batcher(sign, window=0.2, max_batch=64, eager=False)
    leaves = [os.urandom(32) for _ in range(12)]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(batcher.submit, leaves))
    assert len(signed) == 1
    for leaf, (quoted, proof) in zip(leaves, results, strict=True):
        assert quoted == batch_qualifying_data(proof.root(leaf))


def test_eager_batcher_quotes_at_once_when_idle_and_gathers_while_busy() -> None:
    signed: list[float] = []

    def sign(qualifying: bytes) -> bytes:
        signed.append(time.monotonic())
        time.sleep(0.1)
        return qualifying

    batcher: Batcher[bytes] = Batcher(sign, window=10.0)
    started = time.monotonic()
    batcher.submit(os.urandom(32))  # idle: no wait for the window
    assert time.monotonic() - started < 1
    signed.clear()
    leaves = [os.urandom(32) for _ in range(10)]
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(batcher.submit, leaves))
    assert time.monotonic() - started < 5  # never the 10 s window
    assert len(signed) <= 3  # the first alone at most, the rest gathered while it signed
    for leaf, (quoted, proof) in zip(leaves, results, strict=True):
        assert quoted == batch_qualifying_data(proof.root(leaf))


def test_batcher_closes_a_full_batch_without_waiting() -> None:
    batcher: Batcher[bytes] = Batcher(lambda q: q, window=30.0, max_batch=4, eager=False)
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(batcher.submit, [os.urandom(32) for _ in range(4)]))
    assert time.monotonic() - started < 5
    assert {proof.size for _, proof in results} == {4}


def test_batcher_failure_reaches_every_waiter() -> None:
    def sign(qualifying: bytes) -> bytes:
        raise TpmError("the TPM is gone")

    batcher: Batcher[bytes] = Batcher(sign, window=0.05)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.submit, os.urandom(32)) for _ in range(3)]
        for future in futures:
            with pytest.raises(TpmError, match="batched quote failed: the TPM is gone"):
                future.result(timeout=5)


# --- batched channels on real swtpm behind the latency model -------------------------------


@dataclass
class Node:
    client: TpmClient
    proxy: TpmLatencyProxy
    issuer: TpmIssuer


@dataclass
class Lab:
    registry: AkRegistry
    server: Node
    client: Node

    def config(self, node: Node, name: str) -> ChannelConfig:
        key = generate_key("tp13")
        return ChannelConfig(issue_certificate(CA, name, key), key, [CA.certificate],
                             node.issuer, TpmValidator(self.registry, None, ClockHistory()),
                             timeout=10)


CA = make_ca("batch-lab-ca")


def _node(name: str, factory: SwtpmFactory, registrar: Registrar, registry: AkRegistry,
          directory: Path, unique: bool) -> Node:
    tpm = factory(unique=unique)
    proxy = TpmLatencyProxy(tpm, directory / f"{name}.sock", LatencyModel.quote_ms(LATENCY_MS))
    client = TpmClient(proxy.tcti)
    ak = client.attestation_key("ecc")
    activate(client, registrar, ak)
    registry.add(name, parse_public(ak.public))
    client.flush(ak)
    return Node(client, proxy, TpmIssuer(client, name, SELECTION, batch_window=WINDOW,
                                         eager=False))


@pytest.fixture(scope="module")
def lab(swtpm_ca: LocalCA, swtpm_template: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    directory = tmp_path_factory.mktemp("batch")
    factory = SwtpmFactory(swtpm_ca, swtpm_template, directory / "tpms")
    registrar, registry = Registrar(swtpm_ca.ca_bundle()), AkRegistry()
    nodes: list[Node] = []
    try:
        nodes.append(_node("server", factory, registrar, registry, directory, True))
        nodes.append(_node("client", factory, registrar, registry, directory, False))
        yield Lab(registry, *nodes)
    finally:
        for node in nodes:
            node.issuer.close()
            node.client.close()
            node.proxy.close()
        factory.stop_all()


def test_the_latency_proxy_delays_quotes(lab: Lab) -> None:
    issuer = TpmIssuer(lab.server.client, "server", SELECTION).bound(
        BindingContext("tp13", "server"))
    before = lab.server.proxy.signed
    started = time.monotonic()
    issuer.issue(b"\1" * 32, b"\2" * 32)
    assert time.monotonic() - started >= LATENCY_MS / 1000
    assert lab.server.proxy.signed == before + 1


def test_concurrent_channels_share_quotes(lab: Lab) -> None:
    clients = 8
    seen: list[str] = []

    def handler(channel: Any) -> None:
        seen.append(channel.peer.node)
        channel.send(channel.recv())

    def one(_: int) -> bytes:
        config = lab.config(lab.client, "client").with_expected_peer("server")
        with connect(*server.address, config) as channel:
            assert channel.peer.report.check("qualifying_data").passed
            channel.send(b"ping")
            return channel.recv()

    before = lab.server.proxy.signed, lab.client.proxy.signed
    with serve(LOCALHOST, 0, lab.config(lab.server, "server"), handler) as server, \
            ThreadPoolExecutor(clients) as pool:
        assert list(pool.map(one, range(clients))) == [b"ping"] * clients
    server_quotes = lab.server.proxy.signed - before[0]
    client_quotes = lab.client.proxy.signed - before[1]
    assert seen == ["client"] * clients
    assert server_quotes < clients and client_quotes < clients, (server_quotes, client_quotes)


def _issue_batch(lab: Lab, nonces: list[bytes]) -> list[bytes]:
    issuer = lab.client.issuer.bound(BindingContext("tp13", "client"))
    with ThreadPoolExecutor(len(nonces)) as pool:
        return list(pool.map(lambda n: issuer.issue(USER_DATA, n), nonces))


USER_DATA = hashlib.sha256(b"client spki").digest()


def _with_batch(envelope: bytes, batch: dict[str, Any]) -> bytes:
    doc = json.loads(envelope)
    doc["batch"] = batch
    return json.dumps(doc).encode()


def test_substituted_quotes_and_paths_fail_batch_inclusion(lab: Lab) -> None:
    validator = TpmValidator(lab.registry, None, ClockHistory())
    nonces = [os.urandom(32) for _ in range(3)]
    first = _issue_batch(lab, nonces)
    proofs = [decode_envelope(e).batch for e in first]
    assert all(p is not None and p.size == 3 for p in proofs)
    for envelope, nonce in zip(first, nonces, strict=True):
        assert validator.validate(envelope, nonce).report.ok  # one quote, three sessions
    other = _issue_batch(lab, [os.urandom(32) for _ in range(2)])

    attacks = {
        "another session's quote and path": (first[1], nonces[0]),
        "another leaf's path": (_with_batch(first[0], json.loads(first[1])["batch"]), nonces[0]),
        "another batch's quote and path": (other[0], nonces[0]),
        "a malformed path": (_with_batch(first[0], {"index": 0, "size": 3, "path": []}),
                             nonces[0]),
    }
    for what, (envelope, nonce) in attacks.items():
        with pytest.raises(VerificationError) as caught:
            validator.validate(envelope, nonce)
        assert caught.value.check == "batch_inclusion", what


def test_batched_evidence_replayed_for_its_own_session_is_refused(lab: Lab) -> None:
    validator = TpmValidator(lab.registry, None, ClockHistory())
    nonce = os.urandom(32)
    envelope = _issue_batch(lab, [nonce])[0]
    validator.validate(envelope, nonce)
    with pytest.raises(VerificationError, match="replay") as caught:
        validator.validate(envelope, nonce)
    assert caught.value.check == "clock"


def test_a_closed_proxy_is_a_tpm_error(lab: Lab, swtpm_ca: LocalCA, swtpm_template: Path,
                                       tmp_path: Path) -> None:
    factory = SwtpmFactory(swtpm_ca, swtpm_template, tmp_path / "tpms")
    try:
        proxy = TpmLatencyProxy(factory(), tmp_path / "p.sock", LatencyModel())
        client = TpmClient(proxy.tcti)
        proxy.close()
        with pytest.raises(TpmError):
            client.random(8)
        client.close()
    finally:
        factory.stop_all()


def test_the_proxy_drops_a_hostile_client_and_keeps_serving(lab: Lab) -> None:
    for garbage in (b"\x80\x01\xff\xff\xff\xff\x00\x00\x01\x44",  # size 4 GiB
                    b"\x80\x01\x00\x00\x00\x02\x00\x00\x01\x44",  # size below the header
                    b"\x80\x01\x00\x00"):  # truncated, then EOF
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(lab.server.proxy.listen))
            try:  # the proxy may close as soon as it has read enough to refuse
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                reply = sock.recv(16)
            except (BrokenPipeError, ConnectionResetError):
                reply = b""
            assert reply == b""  # closed, no reply
    assert len(lab.server.client.random(8)) == 8  # the TPM's own connection is untouched
    with pytest.raises(ValueError):
        LatencyModel(signing=-1)


def test_channel_config_batch_window_opts_in(lab: Lab) -> None:
    plain = TpmIssuer(lab.server.client, "server", SELECTION)
    key = generate_key("tp13")
    config = ChannelConfig(issue_certificate(CA, "server", key), key, [CA.certificate], plain,
                           TpmValidator(lab.registry), batch_window=0.1)
    assert isinstance(config.issuer, TpmIssuer) and config.issuer.batching
    assert not plain.batching  # the node's own issuer is untouched
    assert config.with_expected_peer("client").issuer is config.issuer  # one batcher
    with pytest.raises(ValueError, match="batch_window needs an issuer that can batch"):
        ChannelConfig(config.certificate, key, [CA.certificate], FakeIssuer(b"k" * 32, "server"),
                      config.validator, batch_window=0.1)


# --- a sim cluster: `up --tpm-latency` and a node whose quotes are batched ------------------

CLUSTER = "blab"
NODE_LATENCY_MS = 100
HANDSHAKES = 6


@dataclass
class SimLab:
    workdir: Path
    paths: ClusterPaths

    def agent(self, node: str) -> AgentClient:
        return AgentClient(UnixTransport(self.paths.node(node).socket), node=node, timeout=30)

    def tpm_quotes(self, node: str) -> int:
        count = self.agent(node).status()["tpm_quotes"]
        assert isinstance(count, int)
        return count

    def attest(self, node: str) -> AttestResult:
        return attest_node(self.paths, node, self.agent(node),
                           load_node_policy(self.paths, node), SIM_PCRS.indices)


def _sim_spec(directory: Path) -> Path:
    doc = yaml.safe_load(default_spec_path().read_text())
    template = doc["nodes"][0]
    doc["name"] = CLUSTER
    doc["nodes"] = [dict(template, name="server", role="server", batch_window="500ms"),
                    dict(template, name="client", role="client")]
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimLab]:
    top = tmp_path_factory.mktemp("blab")
    workdir = top / "w"
    rc, out, err = run_cli(workdir, "up", str(_sim_spec(top)), "--tpm-latency",
                           f"{NODE_LATENCY_MS}ms", "--json")
    paths = ClusterPaths(workdir, CLUSTER)
    try:
        assert rc == 0, out + err
        yield SimLab(workdir, paths)
    finally:
        assert SimBackend(paths).down(purge=False).ok


def test_durations_parse_with_a_unit_and_a_bound() -> None:
    assert parse_duration("200ms", "x", 10) == pytest.approx(0.2)
    assert parse_duration("0.2s", "x", 10) == pytest.approx(0.2)
    for bad in ("200", "-1ms", "1e3ms", "11s", " 2s", "2 s", 200, None, "ms"):
        with pytest.raises(ClusterSpecError):
            parse_duration(bad, "x", 10)


@given(st.integers(min_value=0, max_value=10_000_000))
def test_durations_print_as_they_parse(micros: int) -> None:
    assert parse_duration(duration_text(micros / 1e6), "x", 10) == pytest.approx(micros / 1e6)


def test_a_spec_keeps_its_timing_through_a_dump() -> None:
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["nodes"][0].update(tpm_latency="1565.432ms", batch_window="0.25s")
    spec = parse_cluster_spec(yaml.safe_dump(doc), Path("/"))
    again = parse_cluster_spec(dump_cluster_spec(spec), Path("/"))
    assert (again.nodes[0].tpm_latency, again.nodes[0].batch_window) == (1.565432, 0.25)
    assert again.nodes[1].tpm_latency == 0 and again.nodes[1].batch_window is None


def test_bad_tpm_latency_is_a_bad_value(tmp_path: Path) -> None:
    for value in ("20s", "fast", "200"):
        rc, _, err = run_cli(tmp_path, "up", "--tpm-latency", value)
        assert rc == 3 and "--tpm-latency" in err, err
    assert not (tmp_path / "clusters").exists()  # refused before anything started


def test_a_node_behind_the_latency_model_quotes_slowly_and_attests(sim: SimLab) -> None:
    rc, out, err = run_cli(sim.workdir, "status", "--json")
    assert rc == 0, err
    nodes = {n["name"]: n for n in json.loads(out)["nodes"]}
    assert {name: n["tpm_latency_ms"] for name, n in nodes.items()} == \
        {"server": NODE_LATENCY_MS, "client": NODE_LATENCY_MS}
    assert {name: n["batch_window_ms"] for name, n in nodes.items()} == \
        {"server": 500, "client": None}
    rc, out, _ = run_cli(sim.workdir, "status")
    assert rc == 0 and f"tpm latency {NODE_LATENCY_MS} ms" in out and "batch window 500 ms" in out
    started = time.monotonic()
    sim.agent("client").quote(os.urandom(32), SIM_PCRS.indices)
    assert time.monotonic() - started >= NODE_LATENCY_MS / 1000
    result = sim.attest("client")
    assert result.report.ok, result.report.failure


def test_a_verifier_challenge_shares_one_quote_with_concurrent_handshakes(sim: SimLab) -> None:
    before = sim.tpm_quotes("server")
    client = sim.agent("client")
    with ThreadPoolExecutor(HANDSHAKES + 1) as pool:
        channels = [pool.submit(client.role, "connect", {"peer": "server"})
                    for _ in range(HANDSHAKES)]
        verdict = pool.submit(sim.attest, "server")
        answers = [c.result(timeout=60) for c in channels]
        result = verdict.result(timeout=60)
    assert result.report.ok, result.report.failure
    assert result.report.check("batch_inclusion").passed
    for answer in answers:  # the client verified the server's batched quote (with PCR 10)
        assert answer["reply"].startswith("server heard") and \
            IMA_PCR in answer["evidence"]["pcrs"], answer
    assert sim.tpm_quotes("server") - before == 1  # N handshakes + the challenge: one quote
    rc, out, err = run_cli(sim.workdir, "evidence", "replay", "--json")
    assert rc == 0 and json.loads(out)["ok"], out + err  # batched entries re-verify offline


def test_a_path_for_another_leaf_or_a_quote_of_another_batch_fails_by_name(
        sim: SimLab) -> None:
    server, nonces = sim.agent("server"), [os.urandom(32) for _ in range(3)]
    pcrs = sorted({*SIM_PCRS.indices, IMA_PCR})
    with ThreadPoolExecutor(2) as pool:  # two challenges within one window
        first, second = pool.map(lambda n: server.quote_batched(n, pcrs), nonces[:2])
    later = server.quote_batched(nonces[2], pcrs)  # the next batch
    assert first[0] == second[0] and first[1] is not None and second[1] is not None
    policy = quoting_pcr10(load_node_policy(sim.paths, "server"))
    for evidence, proof in ((first[0], second[1]), (later[0], first[1])):
        report = verify_evidence(sim.paths, "server", evidence, nonces[0], policy, proof)
        assert report.failure is not None and report.failure.name == "batch_inclusion"
    assert verify_evidence(sim.paths, "server", first[0], nonces[0], policy, first[1]).ok
    ignored = verify_evidence(sim.paths, "server", later[0], nonces[2], policy)  # no path
    assert ignored.failure is not None and ignored.failure.name == "qualifying_data"
