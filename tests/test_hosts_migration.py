"""Attested, TLS-encrypted live migration between the lab's hosts (docs/hosts.md,
"Migration"): a real run.

One lab for the module (bridge tbm1, 10.213.11.0/24): host1 and host2 trusted, host3
with a tampered QEMU. One small VM (TCG) placed on host1 (vm1) and one on host2 (vm2).
vm1 migrates to host2 over TLS while a capture on the lab bridge looks for a marker the
guest holds in RAM (not seen); it attests afterwards with the same AK, its
``host_attestation`` layer naming host2, nothing of it is left on host1, and a Trusted
Passages channel from vm2 to it establishes. The
control without TLS (back to host1) shows the marker on the wire. vm2 is refused on its
way to host3 (``policy``, PCR 14) while plain libvirt takes it there (the attack lab's
``migrate-to-tampered-host``, on this lab).
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from testbed.attacks.migration import migrate_to_tampered_host_on
from testbed.core.errors import ArgumentError
from testbed.core.paths import ClusterPaths
from testbed.demo.qemu import configure_cluster_guests, guest_channel
from testbed.hosts.deep import host_attestation_check, move_vtpm, vtpm_hosts
from testbed.hosts.layout import HostsError, LabPaths
from testbed.hosts.placement import HostNotTrusted
from testbed.qemu.backend import QemuBackend
from testbed.qemu.guest.agent import Agent
from testbed.qemu.migration import migrate
from tests.vm_lab import CliRunner, cli_json, host_domains, host_libvirt_dir, hosts_lab

BRIDGE, SUBNET = "tbm1", "10.213.11.0/24"
SPEC = """\
version: 1
name: mig
backend: qemu
image: default
nodes:
  - name: vm1
    role: generic
    host: host1
  - name: vm2
    role: generic
    host: host2
"""


_cli = CliRunner(timeout=400)


def _record(workdir: Path, node: str) -> Any:
    return json.loads((workdir / "clusters" / "mig" / "nodes" / node / "vm.json").read_text())


@pytest.fixture(scope="module")
def lab() -> Iterator[Path]:
    started = time.monotonic()
    with hosts_lab(_cli, "migration-", 3, BRIDGE, SUBNET, tamper_qemu="host3",
                   need="the migration tests need root and libvirt (docs/qemu.md)") as workdir:
        spec = workdir / "spec.yaml"
        spec.write_text(SPEC)
        r = _cli(workdir, "up", str(spec), "--json", timeout=600)
        assert r.returncode == 0, r.stderr
        nodes = cli_json(r, stderr_tail=None)["nodes"]
        assert {n["name"]: n["host"] for n in nodes} == {"vm1": "host1", "vm2": "host2"}
        print(f"\nthree hosts and a VM on host1 and host2 up in "
              f"{time.monotonic() - started:.1f} s")
        yield workdir


def test_tls_migration_hides_the_marker_and_the_vm_attests_on_host2(lab: Path) -> None:
    before = _record(lab, "vm1")
    registry = (lab / "clusters" / "mig" / "registry.json").read_bytes()
    r = _cli(lab, "migrate", "vm1", "--to", "host2", "--prove-encryption", "--json")
    assert r.returncode == 0, r.stderr
    result = cli_json(r, stderr_tail=None)
    assert (result["source"], result["destination"], result["tls"]) == ("host1", "host2", True)
    assert result["destination_attestation"]["trusted"] is True
    capture = result["capture"]
    assert capture["held_bytes"] >= 64 * 1024, capture
    # The capture saw the stream: most of the guest pages libvirt says it sent in full
    # (where a marker would be) crossed the bridge while it watched.
    assert capture["bytes"] > 8 << 20 and capture["bytes"] >= result["page_bytes"] * 3 // 4, \
        (capture, result["page_bytes"])
    assert capture["marker_frames"] == 0, capture
    assert result["source_left"] == [] and result["downtime_ms"] is not None, result
    print(f"\nTLS migration: {result['migration_seconds']} s, downtime "
          f"{result['downtime_ms']} ms, {result['seconds']} s in all; captured "
          f"{capture['bytes']} bytes of frames for {result['page_bytes']} bytes of pages")

    domain, uuid = before["domain"], before["uuid"]
    assert domain in host_domains(lab, "host2") and domain not in host_domains(lab, "host1")
    assert _record(lab, "vm1")["host"] == "host2"
    assert vtpm_hosts(LabPaths(lab))["vm1"] == "host2"
    assert (host_libvirt_dir(lab, "host2") / "swtpm" / uuid / "tpm2" / "tpm2-00.permall").is_file()
    assert not (host_libvirt_dir(lab, "host1") / "swtpm" / uuid).exists()
    assert not (host_libvirt_dir(lab, "host1") / "testbed" / "vms" / domain).exists()
    key = LabPaths(lab).host("host2").fs / "etc-libvirt" / "migrate-tls" / "server-key.pem"
    assert key.stat().st_mode & 0o777 == 0o600

    r = _cli(lab, "attest", "vm1", "--json")
    assert r.returncode == 0, r.stderr
    checks = {c["check"]: c for c in cli_json(r, stderr_tail=None)["checks"]}
    assert checks["host_attestation"]["host"] == "host2", checks["host_attestation"]
    assert checks["ak_trust"]["state"] == "passed"
    assert (lab / "clusters" / "mig" / "registry.json").read_bytes() == registry  # same AK


def test_an_attested_channel_to_the_moved_vm_re_establishes(lab: Path) -> None:
    """Trusted Passages between the guests (the qemu demo's path, relayed by the lab over
    each VM's host): vm2 (host2) to vm1, which just came from host1."""
    assert _record(lab, "vm1")["host"] == "host2", "runs after the TLS migration"
    backend = QemuBackend(ClusterPaths(lab, "mig"))
    try:
        configure_cluster_guests(backend, ["vm1", "vm2"])
        outcome = guest_channel(backend, "vm2", "vm1", "after the move")
    finally:
        backend.close()
    assert outcome.established, outcome.to_dict()
    print(f"\nchannel vm2 -> vm1 after the migration: {outcome.seconds:.1f} s")


def test_control_without_tls_shows_the_marker(lab: Path) -> None:
    assert _record(lab, "vm1")["host"] == "host2", "runs after the TLS migration"
    r = _cli(lab, "migrate", "vm1", "--to", "host1", "--no-tls", "--prove-encryption",
             "--json")
    assert r.returncode == 0, r.stderr
    result = cli_json(r, stderr_tail=None)
    assert result["tls"] is False and result["capture"]["marker_frames"] > 0, result
    assert _record(lab, "vm1")["host"] == "host1"


def test_migration_to_the_tampered_host_is_refused(lab: Path) -> None:
    r = _cli(lab, "migrate", "vm2", "--to", "host3")
    assert r.returncode == 1, r.stderr
    assert "host3: policy (" in r.stderr and "PCR 14" in r.stderr, r.stderr
    assert not any(".vm2." in d for d in host_domains(lab, "host3"))
    assert not (host_libvirt_dir(lab, "host3") / "testbed").exists()  # nothing prepared there

    result = migrate_to_tampered_host_on(ClusterPaths(lab, "mig"), "vm2", "host3")
    assert result.as_expected, result
    assert (result.trusted_passages.caught_by, result.trusted_passages.caught_at) == (
        "policy", "verifier")
    assert _record(lab, "vm2")["host"] == "host2"  # back where it was


def test_misuse_is_one_clear_error(lab: Path) -> None:
    """(The CLI's exit codes for these errors: tests/test_cli_contract.py's battery.)"""
    paths = ClusterPaths(lab, "mig")
    with pytest.raises(ArgumentError, match="already runs on host2"):
        migrate(paths, "vm2", "host2")
    with pytest.raises(HostNotTrusted, match="host7: host_up"):
        migrate(paths, "vm2", "host7")
    with pytest.raises(ArgumentError, match="no running VM"):
        migrate(paths, "nosuch", "host1")


def test_hold_marker_is_bounded() -> None:
    """The guest agent's one op for the proof (run on the host: it needs no TPM)."""
    agent = Agent(None, None, "n", "generic")  # type: ignore[arg-type]
    ok = agent.handle(json.dumps({"op": "hold_marker", "marker": "QUJDREVGR0hJSg==",
                                  "copies": 100}).encode())
    assert ok == {"held": 1000}
    for bad in ({"marker": "QUJD", "copies": 1}, {"marker": "QUJDREVGR0hJSg==", "copies": 0},
                {"marker": "QUJDREVGR0hJSg==", "copies": 1 << 30},
                {"marker": "QUJDREVGR0hJSg==", "copies": True}, {"marker": 5, "copies": 1},
                {"marker": "QUJDREVGR0hJSg==", "copies": 1, "extra": 1}):
        answer = agent.handle(json.dumps({"op": "hold_marker", **bad}).encode())
        assert set(answer) == {"error"}, (bad, answer)


def _self_signed(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def test_host_attestation_after_a_move_checks_both_hosts(tmp_path: Path) -> None:
    """A migrated VM's check: the host it runs on, and the one that made its vTPM (whose
    intermediate its EK certificate chains through). No hosts needed: the lab's files."""
    lab = LabPaths(tmp_path)
    (lab.root / "intermediates").mkdir(parents=True)
    (lab.root / "intermediates" / "host1.pem").write_bytes(_self_signed("host1"))
    (lab.root / "vtpms.json").write_text(json.dumps({"vm1": {"host": "host1"}}))
    paths = ClusterPaths(tmp_path, "mig")

    def verdicts(host1: bool, host2: bool) -> None:
        (lab.attestations).write_text(json.dumps({h: {
            "host": h, "trusted": ok, "failed_check": None if ok else "policy",
            "message": "m", "policy": "p", "time": "t"} for h, ok in
            (("host1", host1), ("host2", host2))}))

    verdicts(True, True)
    move_vtpm(lab, "vm1", "host2")
    result = host_attestation_check(paths, "vm1")
    assert result is not None and result.state == "passed", result
    assert (result.data["host"], result.data["made_on"]) == ("host2", "host1")
    verdicts(True, False)
    result = host_attestation_check(paths, "vm1")
    assert result is not None and result.state == "failed" and "runs on host host2" in \
        result.detail, result
    verdicts(False, True)
    result = host_attestation_check(paths, "vm1")
    assert result is not None and result.state == "failed" and \
        "had its vTPM made on host host1" in result.detail, result
    verdicts(True, True)
    (lab.root / "intermediates" / "host1.pem").unlink()
    result = host_attestation_check(paths, "vm1")
    assert result is not None and result.state == "failed" and "host1 has no intermediate" \
        in result.detail, result
    with pytest.raises(HostsError, match="no vTPM made on a host"):
        move_vtpm(lab, "nosuch", "host2")
