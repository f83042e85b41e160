"""The `cryptovm` role in a sim cluster: real node processes, real swtpms, real sockets.

One module-scoped cluster - a server, a client, a `rogue` client booted with a tampered
kernel command line, and a cryptovm node - carries the flow (tests run in file order):
the CryptoVM comes up and the honest nodes enroll for VSM-issued certificates while the
rogue is refused; the wire port answers the root PSK; peers validate the VSM chain;
enrollment is audited both ways; a restart keeps every key; then, after `down`, nothing
under the work dir holds the CA key's bytes, and a tampered cryptovm cannot open its store.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from attestation.tpm import TpmClient
from cryptovm.audit import read_entries, verify_audit_log
from cryptovm.client import CryptoVmClient
from cryptovm.errors import AccessDenied, AuthenticationFailed, KeyUsageError
from cryptovm.vsm import CryptoVm
from testbed.cluster.agent import AgentClient, AgentError, UnixTransport
from testbed.cluster.state import load_spec
from testbed.core.errors import StateError
from testbed.core.paths import ClusterPaths
from testbed.core.processes import process_argv
from testbed.roles.cryptovm import PublishedCryptoVm, psk_path, state_dir
from testbed.sim.processes import cluster_processes
from testbed.spec.cluster_spec import default_spec_path
from testbed.tpm.boot import measure_boot
from testbed.tpm.swtpm import Swtpm
from tests.sim_lab import run_cli

CLUSTER = "cvm-lab"
TAMPERED_CMDLINE = "console=ttyS0 ro quiet init=/bin/sh"
HOST = "127.0.0.1"


@dataclass
class Lab:
    workdir: Path
    spec: Path
    paths: ClusterPaths
    up: dict[str, Any]

    def agent(self, node: str) -> AgentClient:
        return AgentClient(UnixTransport(self.paths.node(node).socket), node=node)

    def info(self) -> dict[str, Any]:
        return self.agent("cryptovm").role("info")

    @property
    def cvm_state(self) -> Path:
        return state_dir(self.paths.node("cryptovm").state)

    def root(self) -> CryptoVmClient:
        psk = bytes.fromhex(psk_path(self.paths.node("cryptovm").state).read_text().strip())
        return CryptoVmClient(HOST, self.info()["wire_port"], account="root", psk=psk,
                              ca_pem=(self.cvm_state / "ca.pem").read_bytes())

    def audit(self) -> list[dict[str, Any]]:
        return read_entries(self.cvm_state / "audit.log")


def lab_spec(directory: Path) -> Path:
    doc = yaml.safe_load(default_spec_path().read_text())
    by_name = {n["name"]: n for n in doc["nodes"]}
    rogue = dict(by_name["client"], name="rogue", tampered={"cmdline": TAMPERED_CMDLINE})
    doc["name"] = CLUSTER
    doc["nodes"] = [by_name["server"], by_name["client"], rogue, by_name["cryptovm"]]
    path = directory / "cvm-lab.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    workdir = tmp_path_factory.mktemp("cvm")
    spec = lab_spec(workdir)
    rc, out, err = run_cli(workdir, "up", str(spec), "--json")
    paths = ClusterPaths(workdir, CLUSTER)
    try:
        assert rc == 1, f"up failed: {out}\n{err}"  # 1: the rogue node is rejected
        assert json.loads(out)["rejected"] == ["rogue"], out
        yield Lab(workdir, spec, paths, json.loads(out))
    finally:
        run_cli(workdir, "down", "--cluster", CLUSTER)
        assert cluster_processes(paths) == []


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the flow --------------------------------------------------------------------------------


def test_cryptovm_node_comes_up_and_honest_nodes_enroll(lab: Lab) -> None:
    nodes = {n["name"]: n for n in lab.up["nodes"]}
    assert {n["action"] for n in nodes.values()} == {"started"}
    assert nodes["cryptovm"]["enrollment"] is None
    info = lab.info()
    ca = x509.load_pem_x509_certificate(info["tls_ca_certificate"].encode())
    issuer = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    for node in ("server", "client"):
        enrollment = nodes[node]["enrollment"]
        assert enrollment["ok"], enrollment
        assert enrollment["certificate"]["subject"] == node
        assert enrollment["certificate"]["issuer"] == issuer
        assert enrollment["ca"]["non_exportable"] and enrollment["ca"]["key_id"] == "tls-ca"
    # The tampered node runs (rejected by its attestation) and the CryptoVM, which checks
    # for itself, gave it no certificate: policy, PCR 9.
    rogue = nodes["rogue"]["enrollment"]
    assert not rogue["ok"] and "policy" in rogue["error"] and "PCR 9" in rogue["error"]
    rc, out, _ = run_cli(lab.workdir, "status", "--json", "--cluster", CLUSTER)
    service = {n["name"]: n["service"] for n in json.loads(out)["nodes"]}
    cvm1 = service["cryptovm"]["endpoints"][0]
    assert rc == 0 and (cvm1["protocol"], cvm1["host"]) == ("cvm1", "127.0.0.1")
    assert service["cryptovm"]["facts"]["tls_ca_key"] == "tls-ca"
    assert "VSM CA" in service["server"]["facts"]["certificate_from"]
    assert "cluster CA" in service["rogue"]["facts"]["certificate_from"]
    psk_file = psk_path(lab.paths.node("cryptovm").state)
    assert mode(psk_file) == 0o600 and len(bytes.fromhex(psk_file.read_text().strip())) == 32
    assert mode(lab.paths.node("cryptovm").run / "cryptovm.json") == 0o600
    assert mode(lab.cvm_state) == 0o700


def test_the_wire_port_answers_the_root_psk(lab: Lab) -> None:
    with lab.root() as root:
        assert root.call("whoami")["name"] == "root"
        keys = {k["key_id"]: k for k in root.call("list_keys")["keys"]}
        assert keys["tls-ca"]["exportable"] is False and keys["tls-ca"]["usage"] == ["sign"]
        assert keys["tls-ca"]["origin"] == "generated"
        recipient = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        with pytest.raises(KeyUsageError, match="not exportable"):
            root.call("export", key_id="tls-ca", recipient_public_key=recipient,
                      scheme="ecdh-es-a256gcm")
        accounts = {a["name"] for a in root.call("account_list")["accounts"]}
        assert {"root", "tls-issuer", "node.server", "node.client"} <= accounts
        assert "node.rogue" not in accounts  # never got past attestation
    with pytest.raises(AuthenticationFailed):
        CryptoVmClient(HOST, lab.info()["wire_port"], account="root", psk=os.urandom(32),
                       ca_pem=(lab.cvm_state / "ca.pem").read_bytes())


def test_a_psk_session_cannot_enroll_and_reserved_names_stay_reserved(lab: Lab) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "server")]))
           .sign(key, hashes.SHA256()))
    with lab.root() as root:
        with pytest.raises(AccessDenied) as denied:
            root.call("tls_enroll", csr=csr.public_bytes(serialization.Encoding.DER))
        assert denied.value.check == "attestation"
        with pytest.raises(Exception, match="reserved"):
            root.call("account_create", name="node.server2")
    last = [e for e in lab.audit() if e["op"] == "tls_enroll"][-1]
    assert last["account"] == "root" and last["outcome"] == "denied"
    assert last["check"] == "attestation"


def _server_certificate(port: int, ca_pem: bytes, name: str) -> x509.Certificate:
    """A plain TLS 1.3 client: the handshake completes only if the chain verifies."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem.decode())
    with socket.create_connection((HOST, port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_peer_channels_use_and_validate_the_vsm_chain(lab: Lab) -> None:
    answer = lab.agent("client").role("connect", {"peer": "server"})
    tls = answer["evidence"]["tls"]
    assert tls["keyless"] and tls["trust"].startswith("VSM CA")
    assert tls["ca"]["key_attestation"] == "verified" and tls["ca"]["non_exportable"]
    server = lab.agent("server").role("info")
    assert tls["peer_tls_key_sha256"] == server["tls"]["certificate"]["spki_sha256"]
    ca_pem = lab.info()["tls_ca_certificate"].encode()
    port = json.loads((lab.paths.node("server").run / "tp.json").read_text())["port"]
    certificate = _server_certificate(port, ca_pem, "server")
    assert format(certificate.serial_number, "x") == server["tls"]["certificate"]["serial"]
    # The service channel no longer presents anything the cluster CA vouches for.
    cluster_ca = (lab.paths.root / "tls-ca" / "ca.pem").read_bytes()
    with pytest.raises(ssl.SSLCertVerificationError):
        _server_certificate(port, cluster_ca, "server")
    # ... and does not accept the rogue, whose certificate is only the cluster CA's.
    with pytest.raises(AgentError, match="tls"):
        lab.agent("rogue").role("connect", {"peer": "server"})


def test_enrollment_is_audited_both_ways(lab: Lab) -> None:
    entries = lab.audit()
    issued = [e for e in entries if e["op"] == "tls_enroll" and e["outcome"] == "ok"]
    assert {e["account"] for e in issued} == {"node.server", "node.client"}
    signed = [e for e in entries if e["op"] == "sign" and e["key"] == "tls-ca"]
    assert {e["account"] for e in signed} == {"tls-issuer"}  # the CA certificate + 2 issued
    assert len(signed) == 1 + len(issued)
    rogue = [e for e in entries if e["account"] == "node.rogue"]
    assert rogue and all(e["outcome"] == "denied" for e in rogue)
    assert rogue[-1]["check"] == "policy" and "PCR 9" in rogue[-1]["detail"]
    assert not any(e["account"] == "node.rogue" and e["op"] == "tls_enroll" for e in entries)


def test_enrollment_by_an_unregistered_node_is_denied_and_audited(lab: Lab) -> None:
    registry = lab.paths.registry.read_text()
    doc = json.loads(registry)
    del doc["client"]
    lab.paths.registry.write_text(json.dumps(doc))
    try:
        with pytest.raises(AgentError, match="ak_trust"):
            lab.agent("client").role("enroll")
    finally:
        lab.paths.registry.write_text(registry)
    last = lab.audit()[-1]
    assert (last["account"], last["op"], last["outcome"], last["check"]) == (
        "node.client", "auth", "denied", "ak_trust")
    assert lab.agent("client").role("enroll")["enrolled"]  # registered again: issued again


def test_root_can_stop_a_nodes_enrollment(lab: Lab) -> None:
    with lab.root() as root:
        root.call("account_enable", name="node.client", enabled=False)
        try:
            with pytest.raises(AgentError, match="is disabled"):
                lab.agent("client").role("enroll")
        finally:
            root.call("account_enable", name="node.client", enabled=True)
    last = lab.audit()[-2]  # then root's account_enable
    assert (last["account"], last["op"], last["outcome"]) == ("node.client", "auth", "denied")


def test_a_restart_keeps_every_key_and_the_ca(lab: Lab) -> None:
    with lab.root() as root:
        root.call("generate", algorithm="ec-p256", usage=["sign"], key_id="tenant")
        signature = root.sign("tenant", b"before the restart")
        publics = {k: root.public_key(k) for k in ("tenant", "tls-ca")}
    before = lab.info()
    pid = json.loads(lab.paths.node("cryptovm").info.read_text())["pid"]
    lab.agent("cryptovm").shutdown()
    deadline = time.monotonic() + 10  # gone, or `up` would find it still "running"
    while process_argv(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    rc, out, err = run_cli(lab.workdir, "up", str(lab.spec), "--json")
    assert rc == 1, out + err  # the rogue is still rejected; everything else is up
    actions = {n["name"]: n["action"] for n in json.loads(out)["nodes"]}
    assert actions["cryptovm"] == "started" and actions["server"] == "kept"
    after = lab.info()
    assert after["wire_port"] != before["wire_port"] or after["tp_port"] != before["tp_port"]
    assert after["tls_ca_certificate"] == before["tls_ca_certificate"]
    with lab.root() as root:  # the same root PSK: the state was unsealed, not recreated
        assert {k: root.public_key(k) for k in publics} == publics
        assert root.verify("tenant", b"before the restart", signature)
        assert root.call("audit_verify")["ok"]
    assert lab.agent("client").role("connect", {"peer": "server"})["evidence"]["tls"]["keyless"]


def test_down_then_no_ca_private_key_bytes_anywhere_under_the_work_dir(lab: Lab) -> None:
    rc, out, err = run_cli(lab.workdir, "down", "--cluster", CLUSTER)
    assert rc == 0, out + err
    # Positive control: the scan finds the cluster CA's key, which is plaintext on disk.
    cluster_key_file = lab.paths.root / "tls-ca" / "ca-key.pem"
    cluster_key = serialization.load_pem_private_key(cluster_key_file.read_bytes(), None)
    assert isinstance(cluster_key, ec.EllipticCurvePrivateKey)
    assert all(n in cluster_key_file.read_bytes() for n in (
        _encodings(cluster_key)["pem line 1"], _encodings(cluster_key)["pem line 2"]))
    needles = _encodings(_ca_private_key(lab))
    for path in lab.workdir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found = [name for name, needle in needles.items() if needle in data]
            assert not found, f"{path} holds the CA key ({found})"
    assert verify_audit_log(lab.cvm_state / "audit.log").ok


def _ca_private_key(lab: Lab) -> ec.EllipticCurvePrivateKey:
    """Unseal the stopped node's store the only way there is: its TPM, re-booted the same."""
    node = lab.paths.node("cryptovm")
    spec = load_spec(lab.paths).node("cryptovm")
    tpm = Swtpm(node.state, run_dir=lab.workdir / "offline-swtpm").start()
    try:
        with TpmClient(tpm.tcti) as client:
            measure_boot(client, spec.effective_boot)
        with CryptoVm.open(lab.cvm_state, tpm.tcti) as vm:
            key = vm.keys.get("tls-ca").private_key()
    finally:
        tpm.stop()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _encodings(key: ec.EllipticCurvePrivateKey) -> dict[str, bytes]:
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    lines = pem.splitlines()  # BEGIN, then 64-character lines; the first two hold the scalar
    return {"scalar": scalar, "scalar hex": scalar.hex().encode(),
            "scalar base64": base64.b64encode(scalar)[:40], "der": der,
            "der hex": der.hex().encode(), "der base64": base64.b64encode(der),
            "pem line 1": lines[1], "pem line 2": lines[2]}


def test_a_cryptovm_booted_tampered_cannot_open_its_store(lab: Lab) -> None:
    rc, out, _ = run_cli(lab.workdir, "up", str(lab.spec), "--json", "--tamper",
                         f"cryptovm=cmdline:{TAMPERED_CMDLINE}")
    assert rc == 4
    cryptovm = {n["name"]: n for n in json.loads(out)["nodes"]}["cryptovm"]
    assert cryptovm["action"] == "failed"
    assert "cannot open its CryptoVM store" in cryptovm["error"]
    assert "PCRs differ: [9]" in cryptovm["error"], cryptovm["error"]
    # Without the CryptoVM nobody enrolls; the error says why.
    server = {n["name"]: n for n in json.loads(out)["nodes"]}["server"]
    assert server["enrollment"] is not None and not server["enrollment"]["ok"]


@given(st.one_of(st.binary(max_size=200), st.dictionaries(
    st.sampled_from(["node", "host", "wire_port", "ca_pem", "pcr_selection", "in_vm", "tp_port",
                     "extra"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)), max_size=8)
    .map(lambda d: json.dumps(d).encode())))
def test_a_damaged_cryptovm_json_is_one_clear_error(tmp_path_factory: pytest.TempPathFactory,
                                                    data: bytes) -> None:
    paths = ClusterPaths(tmp_path_factory.mktemp("w"), "lab")
    paths.node("cvm").run.mkdir(parents=True)
    (paths.node("cvm").run / "cryptovm.json").write_bytes(data)
    try:
        published = PublishedCryptoVm.load(paths, "cvm")
    except StateError as exc:
        assert "cvm" in str(exc)
    else:
        assert isinstance(published.wire_port, int) and isinstance(published.ca_pem, str)
