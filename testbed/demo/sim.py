"""The demo (the README's first command), on the default `sim` backend:

1. bring up the shipped cluster: every node its own process with its own swtpm,
   measured boot, EK certificate validated, AK activated by the registrar;
2. keyless TLS: the server and client got their TLS certificates from the cluster's
   CryptoVM (a CA key generated inside the VSM, never leaving it) after the CryptoVM
   verified their attestation; their service channels trust only that CA;
3. open attested channels both ways (client -> server, server -> client) between
   the node processes, and summarize what each side verified and which certificates
   each end used;
4. run the attack lab: every scenario against plain mTLS and Trusted Passages;
5. tear everything down (no process left, demo state removed).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from attestation.errors import TestbedError
from testbed.attacks.lab import Lab
from testbed.attacks.report import print_table
from testbed.attacks.scenarios import SCENARIOS, ScenarioResult, genuine, run
from testbed.cluster import lifecycle
from testbed.cluster.results import UpResult
from testbed.core.paths import ClusterPaths
from testbed.core.progress import Progress
from testbed.roles.trusted_passages import connect_peer
from testbed.sim.backend import SimBackend
from testbed.spec.cluster_spec import default_spec_path, load_cluster_spec

CHANNELS = (("client", "server"), ("server", "client"))
# Certificate details that differ on every run although the result does not: kept out of
# the JSON report (so a report changes only when a result does), printed in the text one.
VOLATILE = frozenset({"serial", "not_before", "not_after", "spki_sha256", "sha256",
                      "peer_tls_key_sha256"})


def run_demo(workdir: Path, json_output: bool = False, *, keep: bool = False) -> int:
    started = time.monotonic()
    root = workdir / "demo"  # its own work dir: the user's clusters are never touched
    spec = load_cluster_spec(default_spec_path())
    backend = SimBackend(ClusterPaths(root, spec.name))
    backend.down(purge=True)  # a demo cluster left by an earlier `--keep`
    shutil.rmtree(root, ignore_errors=True)
    progress = Progress(total=2 + len(CHANNELS) + (not keep), quiet=json_output)
    summary: dict[str, Any] = {"cluster": spec.name, "nodes": [n.name for n in spec.nodes]}
    try:
        with progress.step(f"bringing up cluster {spec.name!r} ({len(spec.nodes)} node "
                           "processes, each with its own swtpm; registered and attested)"):
            result = lifecycle.up(backend, spec, Progress(quiet=True))
        summary["up_ok"] = result.ok and not result.rejected
        summary["channels"] = [_channel(backend, a, b, progress) for a, b in CHANNELS]
        if any(n.role == "cryptovm" for n in spec.nodes):
            summary["keyless_tls"] = _keyless(result, summary["channels"])
        with progress.step(f"attack lab: {len(SCENARIOS)} scenarios, plain mTLS vs "
                           "Trusted Passages"):
            results, baseline = _attack_lab()
        summary["attacks"] = [r.to_dict() for r in results]
    finally:
        if not keep:
            with progress.step("tearing down (no process may be left)"):
                torn = backend.down(purge=True)
            shutil.rmtree(root, ignore_errors=True)
            summary["teardown_clean"] = torn.ok
    summary.setdefault("teardown_clean", keep)
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["ok"] = bool(summary["up_ok"] and all(c["established"] for c in summary["channels"])
                         and all(r.as_expected for r in results) and summary["teardown_clean"]
                         and summary.get("keyless_tls", {"ok": True})["ok"])
    if json_output:
        print(json.dumps(_stable(summary), indent=2))
    else:
        _print(summary, results, baseline)
    return 0 if summary["ok"] else 1


def _channel(backend: SimBackend, source: str, peer: str, progress: Progress
             ) -> dict[str, Any]:
    with progress.step(f"attested channel {source} -> {peer}"):
        try:
            answer = connect_peer(backend.agent(source), peer, f"hello from {source}")
        except TestbedError as exc:  # reported in the summary, the demo goes on
            return {"from": source, "to": peer, "established": False, "error": str(exc)}
    return {"from": source, "to": peer, "established": True, **answer}


def _keyless(result: UpResult, channels: list[dict[str, Any]]) -> dict[str, Any]:
    """Which certificate each end used, and that each is the VSM-issued one.

    A channel's evidence names the key the peer's quote bound (SHA-256 of the SPKI of
    the certificate TLS verified): it must be the key of the certificate the peer got
    at enrollment, and the trust anchor the VSM's CA only.
    """
    nodes = {n.name: n.enrollment.to_dict() for n in result.nodes if n.enrollment is not None}
    certificates = {name: e.get("certificate") for name, e in nodes.items() if e.get("ok")}
    ca = next((e["ca"] for e in nodes.values() if e.get("ok") and e.get("ca")), None)
    ends = []
    for c in channels:
        tls = c.get("evidence", {}).get("tls", {})
        peer = certificates.get(c["to"]) or {}
        ends.append({"from": c["from"], "to": c["to"],
                     "client_certificate": _cert_id(tls.get("own_certificate")),
                     "server_certificate": _cert_id(peer),
                     "issuer": tls.get("peer_certificate_issuer"),
                     "server_key_is_enrolled_key":
                         bool(peer) and tls.get("peer_tls_key_sha256") == peer.get("spki_sha256"),
                     "keyless": bool(tls.get("keyless"))})
    ok = (bool(nodes) and len(certificates) == len(nodes) and ca is not None
          and ca.get("key_attestation") == "verified" and ca.get("non_exportable") is True
          and all(e["keyless"] and e["server_key_is_enrolled_key"] for e in ends))
    return {"ok": ok, "ca": ca, "enrollment": nodes, "channels": ends}


def _cert_id(certificate: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("subject", "issuer", "serial")
    return {k: certificate.get(k) for k in keys} if certificate else dict.fromkeys(keys)


def _stable(value: Any) -> Any:
    """The report without :data:`VOLATILE` keys, at any depth."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _attack_lab() -> tuple[list[ScenarioResult], str]:
    with Lab() as lab:
        ok, detail = genuine(lab)
        return run(lab, list(SCENARIOS)), ("ESTABLISHED: " if ok else "FAILED: ") + detail


def _print(summary: dict[str, Any], results: list[ScenarioResult], baseline: str) -> None:
    print(f"\nCluster {summary['cluster']!r}: nodes {', '.join(summary['nodes'])}; EK "
          "certificates validated against the project-local CA, AKs activated by credential "
          "activation.")
    print("\nAttested channels (each side quoted its TPM for this TLS session and verified "
          "the other):")
    for c in summary["channels"]:
        if not c["established"]:
            print(f"  {c['from']} -> {c['to']}: FAILED: {c['error']}")
            continue
        e = c["evidence"]
        pcrs = ",".join(map(str, e["pcrs"]))
        print(f"  {c['from']} -> {c['to']}: ESTABLISHED")
        print(f"    who:     {e['node']!r} (AK registered to it: {e['node_verified']})")
        print(f"    PCRs:    {e['pcr_bank']} {pcrs}, event log of {e['event_log_events']} events "
              "replayed")
        print(f"    policy:  {e['policy']} (predicted from the node's boot chain)")
        print(f"    binding: {e['binding']}")
        print(f"    checks:  {len(e['checks'])} passed ({', '.join(e['checks'])})")
        if "tls" in e:
            print(f"    TLS:     {c['from']} presented certificate "
                  f"{e['tls']['own_certificate']['serial'][:12]}…; trusted: {e['tls']['trust']}")
        print(f"    reply:   {c['reply']}")
    if "keyless_tls" in summary:
        _print_keyless(summary["keyless_tls"])
    print("\nAttack lab: each attack against plain mutual TLS (CA-valid certificates) and "
          "Trusted Passages")
    print_table(results, baseline)
    verdict = "everything as expected" if summary["ok"] else "NOT as expected"
    teardown = "no process left" if summary["teardown_clean"] else "PROCESSES LEFT BEHIND"
    print(f"demo finished in {summary['seconds']} s ({teardown}): {verdict}")


def _print_keyless(keyless: dict[str, Any]) -> None:
    ca = keyless["ca"] or {}
    print("\nKeyless TLS: each node's TLS key was generated in the node; the CryptoVM certified "
          "it only after verifying the node's attestation.")
    if ca:
        print(f"  CA:      {ca['issuer']!r}: VSM key {ca['key_id']!r} ({ca['algorithm']}, "
              f"{'/'.join(ca['usage'])}), origin {ca['origin']}, non-exportable - its bytes "
              f"never left the VSM (key attestation by node {ca['attested_by']!r}: "
              f"{ca['key_attestation']}, {len(ca['checks'])} checks)")
    for name, enrollment in keyless["enrollment"].items():
        if not enrollment.get("ok"):
            print(f"  {name}: NOT enrolled: {enrollment.get('error')}")
            continue
        cert = enrollment["certificate"]
        print(f"  {name}: certificate {cert['serial'][:12]}… CN {cert['subject']!r}, issued by "
              f"{cert['issuer']!r}, valid until {cert['not_after']}")
    for end in keyless["channels"]:
        same = "yes" if end["server_key_is_enrolled_key"] else "NO"
        print(f"  {end['from']} -> {end['to']}: {end['from']} used "
              f"{(end['client_certificate']['serial'] or '-')[:12]}…, {end['to']} used "
              f"{(end['server_certificate']['serial'] or '-')[:12]}… (attested TLS key is the "
              f"enrolled one: {same})")
