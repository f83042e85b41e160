"""`testbed demo --backend qemu`: attested TLS between real VMs with real OVMF event logs.

1. bring up the shipped three-VM cluster (testbed/examples/qemu-cluster.yaml): boot in
   parallel, EK certificates checked, AKs activated, each VM attested against the
   policy predicted from the guest image;
2. every guest generates its TLS key inside, the cluster's TLS CA certifies it, and
   the guest receives the AK registry and every node's predicted policy;
3. attested channels both ways between the server and client VMs: TLS 1.3 and the
   attestation exchange run inside the guests (Debian's python3-openssl), each
   quoting its own vTPM and validating the other against the other's predicted
   policy and the real OVMF event log; the host only relays the records;
4. the CryptoVM VM: its service runs inside the VM, its store sealed to the VM's vTPM;
   the demo generates a key in it, signs, and verifies the key attestation (a quote by
   the VM's AK over the key) on the host against the VM's predicted policy;
5. tear down: no domain, QEMU, swtpm or daemon of the demo left.

With ``--spec SPEC`` (:func:`run_spec_demo`) the cluster is the spec's, in the user's
work directory, and may place its VMs on the lab's hosts (docs/hosts.md): the same steps
across the hosts (the channel records relayed by the lab over each VM's SSH relay, the
CryptoVM reached through SSH). A cluster of that spec that is already up is used as it
is (each VM attested afresh instead of brought up) and left up; one that was partly up
(a node with a VM) is brought up and left up; one the demo brought up from nothing is
taken down (its state kept, as `testbed down`) unless ``--keep``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from attestation.errors import TestbedError
from attestation.verifier import QuoteVerifier
from cryptovm.keyattest import KeyAttestation, verify_key_attestation
from testbed.cluster import lifecycle
from testbed.cluster.state import load_node_policy, load_registry, load_spec
from testbed.core.errors import ArgumentError
from testbed.core.paths import ClusterPaths
from testbed.core.progress import Progress
from testbed.qemu.backend import QemuBackend
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.qemu.relay import ChannelOutcome, configure_guest, relay_channel
from testbed.roles.cryptovm import cryptovm_endpoint
from testbed.roles.trust import cluster_tls_ca
from testbed.spec.cluster_spec import ClusterSpec, default_spec_path, load_cluster_spec

__all__ = ["TP_ROLES", "configure_cluster_guests", "run_qemu_demo", "run_spec_demo"]

EXAMPLE = "qemu-cluster.yaml"
TP_ROLES = ("server", "client")
CHANNELS = (("client", "server"), ("server", "client"))


def configure_cluster_guests(backend: QemuBackend, nodes: list[str]) -> dict[str, str]:
    """Give ``nodes``' guests a certified TLS key and the cluster's trust anchors.

    Returns each node's certificate serial (hex). The policies sent are the ones
    ``up`` predicted and wrote; the registry is the one ``up`` wrote after activating
    every AK.
    """
    paths = backend.paths
    ca = cluster_tls_ca(paths)
    registry = load_registry(paths).to_json()
    policies = {n.name: paths.policy(n.name).read_text() for n in load_spec(paths).nodes
                if paths.policy(n.name).is_file()}
    serials = {}
    for node in nodes:
        agent = backend.agent(node)
        certificate = configure_guest(agent, node, ca, registry_json=registry,
                                      policies=policies, pcrs=QUOTED_PCRS)
        serials[node] = format(certificate.serial_number, "x")
    return serials


def guest_channel(backend: QemuBackend, client: str, server: str, message: str
                  ) -> ChannelOutcome:
    return relay_channel(backend.agent(client), backend.agent(server), client_node=client,
                         server_node=server, message=message)


def run_qemu_demo(workdir: Path, json_output: bool = False, *, keep: bool = False,
                  spec_path: Path | None = None) -> int:
    if spec_path is not None:
        return run_spec_demo(workdir, spec_path, json_output, keep=keep)
    started = time.monotonic()
    root = workdir / "demo-qemu"  # its own work dir: the user's clusters are never touched
    spec = load_cluster_spec(default_spec_path().parent / EXAMPLE)
    paths = ClusterPaths(root, spec.name)
    backend = QemuBackend(paths)
    _searchable_by_qemu(workdir, root)
    progress = Progress(total=4 + len(CHANNELS), quiet=json_output)
    summary: dict[str, Any] = {"backend": "qemu", "cluster": spec.name,
                               "nodes": [n.name for n in spec.nodes]}
    try:
        _bring_up(backend, spec, summary, progress)
        _demo_steps(backend, spec, summary, progress)
    finally:
        if not keep:
            with progress.step("tearing down (no domain, QEMU or swtpm may be left)"):
                torn = backend.down(purge=True)
            summary["teardown_clean"] = not torn.leftovers
            if not torn.leftovers:
                shutil.rmtree(root, ignore_errors=True)
    return _report(summary, started, json_output, keep, cryptovm=True)


def run_spec_demo(workdir: Path, spec_path: Path, json_output: bool = False, *,
                  keep: bool = False) -> int:
    """The demo on ``spec_path``'s cluster in ``workdir`` (placement-aware), which must
    have a server and a client node; a cryptovm node adds the CryptoVM step."""
    started = time.monotonic()
    spec = load_cluster_spec(spec_path, "qemu")
    roles = {n.role for n in spec.nodes}
    if not set(TP_ROLES) <= roles:
        raise ArgumentError(f"{spec_path}: the demo needs a node of role server and one of "
                            f"role client (it has {', '.join(sorted(roles))})")
    paths = ClusterPaths(workdir, spec.name)
    backend = QemuBackend(paths)
    _searchable_by_qemu(workdir)
    reused = _running_as_spec(backend, spec)
    # A cluster of the spec that was there, even partly, is the user's: left up after.
    leave_up = keep or reused or any(paths.node(n).vm.is_file() for n in paths.node_names())
    cryptovms = sum(n.role == "cryptovm" for n in spec.nodes)
    progress = Progress(total=2 + len(CHANNELS) + cryptovms + (not leave_up),
                        quiet=json_output)
    summary: dict[str, Any] = {"backend": "qemu", "cluster": spec.name,
                               "nodes": [n.name for n in spec.nodes],
                               "hosts": {n.name: n.host for n in spec.nodes},
                               "reused": reused}
    try:
        if reused:
            with progress.step(f"cluster {spec.name} is up: each VM attested afresh "
                               "(used as it is, left up)"):
                summary["up"] = _attest_all(backend, spec)
            summary["up_ok"] = summary["up"]["ok"]
        else:
            _bring_up(backend, spec, summary, progress)
        _demo_steps(backend, spec, summary, progress)
    finally:
        if not leave_up:
            with progress.step("tearing down (no domain, QEMU or swtpm may be left, here "
                               "or on the hosts)"):
                torn = backend.down(purge=False)
            summary["teardown_clean"] = not torn.leftovers
        backend.close()
    return _report(summary, started, json_output, leave_up, cryptovm=bool(cryptovms))


def _bring_up(backend: QemuBackend, spec: ClusterSpec, summary: dict[str, Any],
              progress: Progress) -> None:
    placed = sorted({n.host for n in spec.nodes if n.host})
    here = " and here" if any(n.host is None for n in spec.nodes) else ""
    where = f" (on {', '.join(placed)}{here})" if placed else ""
    with progress.step(f"bringing up {len(spec.nodes)} VMs in parallel{where} (OVMF "
                       "measured boot, vTPM, AK activation, attestation against predicted "
                       "policies)"):
        try:
            result = lifecycle.up(backend, spec, Progress(quiet=True))
        finally:
            backend.close()
    summary["up"] = result.to_dict()
    summary["up_ok"] = result.ok and not result.rejected


def _demo_steps(backend: QemuBackend, spec: ClusterSpec, summary: dict[str, Any],
                progress: Progress) -> None:
    """TLS keys certified, attested channels both ways, the CryptoVM (if any)."""
    by_role = {n.role: n.name for n in reversed(spec.nodes)}  # the first node of each role
    tp_nodes = [n.name for n in spec.nodes if n.role in TP_ROLES]
    with progress.step("TLS keys generated inside the guests, certified by the cluster "
                       "CA; trust anchors delivered"):
        summary["certificates"] = configure_cluster_guests(backend, tp_nodes)
    summary["channels"] = []
    for client_role, server_role in CHANNELS:
        client, server = by_role[client_role], by_role[server_role]
        with progress.step(f"attested channel {client} -> {server} (inside the VMs)"):
            summary["channels"].append(_channel(backend, client, server))
    cryptovms = [n.name for n in spec.nodes if n.role == "cryptovm"]
    for node in cryptovms:
        with progress.step(f"CryptoVM in VM {node}: a key generated inside, used, and "
                           "attested by the VM's vTPM"):
            summary["cryptovm"] = _cryptovm(backend.paths, node)


def _running_as_spec(backend: QemuBackend, spec: ClusterSpec) -> bool:
    """Whether ``spec``'s cluster is up as the spec says: the same nodes (each on its
    host), every VM running with its agent answering."""
    paths = backend.paths
    if not paths.spec.is_file():
        return False
    try:
        current = load_spec(paths)
        rows = {s.name: s for s in backend.status()}
    except TestbedError:
        return False
    finally:
        backend.close()
    same = {(n.name, n.role, n.host) for n in current.nodes} == \
        {(n.name, n.role, n.host) for n in spec.nodes}
    return same and all(n.name in rows and rows[n.name].state == "running"
                        and rows[n.name].agent == "answering" for n in spec.nodes)


def _attest_all(backend: QemuBackend, spec: ClusterSpec) -> dict[str, Any]:
    """A fresh attestation of each running VM, in the shape of ``up``'s nodes."""
    nodes = []
    for node in spec.nodes:
        try:
            result = lifecycle.attest(backend, node.name)
            record = result.record()
            nodes.append({"name": node.name, "role": node.role, "host": node.host,
                          "action": "kept", "attested": record.ok,
                          "detail": record.detail})
        except TestbedError as exc:
            nodes.append({"name": node.name, "role": node.role, "host": node.host,
                          "action": "kept", "attested": False, "detail": str(exc)})
    backend.close()
    ok = all(n["attested"] for n in nodes)
    return {"ok": ok, "backend": "qemu", "cluster": spec.name,
            "directory": str(backend.paths.root), "all_attested": ok, "rejected": [],
            "nodes": nodes}


def _report(summary: dict[str, Any], started: float, json_output: bool, kept: bool, *,
            cryptovm: bool) -> int:
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["ok"] = bool(summary.get("up_ok") and summary.get("channels")
                         and all(c["established"] for c in summary["channels"])
                         and (not cryptovm or summary.get("cryptovm", {}).get("ok"))
                         and summary.get("teardown_clean", kept))
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        _print(summary)
    return 0 if summary["ok"] else 1


def _cryptovm(paths: ClusterPaths, node: str) -> dict[str, Any]:
    """Use the CryptoVM in the VM as its root, then check its key attestation on the host.

    The attestation is a quote by the VM's registered AK over the key's public key and
    attributes; the host verifies it against the VM's predicted policy: the key was
    generated inside *this* attested VM and cannot be exported.
    """
    message = b"signed inside the CryptoVM VM"
    nonce = os.urandom(32)
    try:
        with cryptovm_endpoint(paths, node).client() as vsm:
            key_id = vsm.generate("ec-p256", ["sign"])["key_id"]
            signature = vsm.sign(key_id, message)
            public = vsm.public_key(key_id)
            document = vsm.call("attest", key_id=key_id, nonce=nonce)["attestation"]
        key = serialization.load_der_public_key(public)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        verifier = QuoteVerifier(ak_trust=load_registry(paths).for_node(node),
                                 policy=load_node_policy(paths, node))
        report = verify_key_attestation(KeyAttestation.from_dict(document), nonce, verifier,
                                        expected_key_id=key_id)
    except Exception as exc:  # reported in the summary, the demo goes on to tear down
        return {"node": node, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    failure = report.failure
    return {"node": node, "ok": report.ok, "key_algorithm": "ec-p256",
            "signature_verified_on_host": True,
            "key_attestation": "verified" if report.ok else
            f"FAILED {failure.name if failure else '?'}: {failure.detail if failure else ''}",
            "checks": [c.name for c in report.checks if c.passed]}


def _searchable_by_qemu(*directories: Path) -> None:
    """QEMU runs as libvirt-qemu and opens files under the demo's dir: let it traverse.

    Search (o+x) only, no listing; the secrets below stay 0600 in 0700 directories.
    """
    for directory in directories:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(directory.stat().st_mode | 0o001)


def _channel(backend: QemuBackend, client: str, server: str) -> dict[str, Any]:
    try:
        outcome = guest_channel(backend, client, server, f"hello from {client}")
    except Exception as exc:  # reported in the summary, the demo goes on to tear down
        return {"from": client, "to": server, "established": False, "error": str(exc)}
    return {"from": client, "to": server, **outcome.to_dict()}


def _print(summary: dict[str, Any]) -> None:
    up = summary.get("up", {})
    print(f"\nCluster {summary['cluster']!r} on QEMU ({up.get('accel', '?')}: "
          f"{up.get('accel_reason', '')}): {len(summary['nodes'])} VMs attested in "
          f"{up.get('seconds_define_to_all_attested', '?')} s")
    for node in up.get("nodes", []):
        verdict = "attested" if node.get("attested") else f"NOT attested ({node.get('detail')})"
        print(f"  {node['name']:<10} {node['role']:<9} boot {node.get('boot_seconds') or 0:5.1f}"
              f" s  {verdict}")
    print("\nAttested channels between VMs (TLS and attestation inside the guests; the host "
          "only relays records):")
    for c in summary.get("channels", []):
        if not c["established"]:
            error = c.get("error") or c.get("client_view", {}).get("error") or \
                c.get("server_view", {}).get("error")
            print(f"  {c['from']} -> {c['to']}: FAILED: {error}")
            continue
        e = c["client_view"]["evidence"]
        print(f"  {c['from']} -> {c['to']}: ESTABLISHED in {c['seconds']} s, "
              f"{c['bytes_relayed']} bytes relayed")
        print(f"    {c['from']} verified {e['node']!r}: PCRs {e['pcr_bank']} "
              f"{','.join(map(str, e['pcrs']))}, real OVMF event log of "
              f"{e['event_log_events']} events, policy {e['policy']}, "
              f"{len(e['checks'])} checks passed")
        print(f"    reply: {c['client_view']['reply']}")
    if "cryptovm" in summary:
        c = summary["cryptovm"]
        if c["ok"]:
            print(f"\nCryptoVM in VM {c['node']!r}: a non-exportable {c['key_algorithm']} key "
                  "generated inside the VM (store sealed to its vTPM PCRs 0-9); a signature "
                  f"verified on the host; key attestation {c['key_attestation']} "
                  f"({len(c['checks'])} checks: the VM's registered AK, its predicted policy, "
                  "origin generated, non-exportable)")
        else:
            print(f"\nCryptoVM in VM {c['node']!r}: FAILED: "
                  f"{c.get('error') or c.get('key_attestation')}")
    if "teardown_clean" in summary:
        print(f"\nTeardown: {'clean' if summary['teardown_clean'] else 'LEFTOVERS'}")
    print(f"\nDemo {'OK' if summary['ok'] else 'FAILED'} in {summary['seconds']} s")
