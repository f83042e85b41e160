"""Revocation figures for guest agents (not a test; docs/runtime.md, "Revocation in a VM").

Two guest agents run as in the VM image (``guest_agent.py`` with its Trusted Passages
extension, under Debian's /usr/bin/python3) on the host, each with its own swtpm, as in
tests/test_qemu_guest_tp.py; the host relays their channel. No VM is booted: the figures
are the guest code's own cost, without QEMU's network forwarding or TCG.

Per round: the client guest holds an attested channel to the server guest; the server
guest receives a signed revocation of the client; we wait until the relay sees both
ends closed; the client is reinstated. Reported, p50 and p99 over the rounds:
- status round trip: one agent request and its answer (the baseline: the transport);
- `role revoked` call: verify the decision, apply it, close the channel (the answer);
- channel closed: from sending the decision to both guests' ends closed.

Run: .venv/bin/python bench/bench_vm_revocation.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.policy import dump_policy
from attestation.registrar import AkRegistry, Registrar
from attestation.revocation import (
    Decision,
    Reinstate,
    RevocationEvent,
    decision_args,
    encode_decision,
)
from testbed.qemu.relay import configure_guest, hold_channel
from testbed.tpm.boot import SIM_PCRS, predicted_policy
from testbed.tpm.localca import LocalCA
from testbed.tpm.pytest_plugin import SwtpmFactory
from testbed.tpm.swtpm import provision
from tests.test_qemu_guest_tp import GOOD, GuestProcess, _register, _start_guest
from trusted_passages.pki import make_ca


def signed(key: Ed25519PrivateKey, decision: Decision) -> dict[str, str]:
    return decision_args(decision, key.sign(encode_decision(decision)))


def one_round(guests: dict[str, GuestProcess], key: Ed25519PrivateKey, sequence: int
              ) -> dict[str, float]:
    server, client = guests["server"], guests["client"]
    started = time.perf_counter()
    server.agent.status()
    status = time.perf_counter() - started
    held = hold_channel(client.agent, server.agent, server_node="server", message="hold")
    while server.agent.call({"op": "tp_open"})["open"] != {"client": 1}:
        time.sleep(0.01)
    event = RevocationEvent("client", "runtime", "bench", "t", sequence)
    started = time.perf_counter()
    server.agent.role("revoked", signed(key, event))
    called = time.perf_counter() - started
    held.wait_closed(10)
    closed = time.perf_counter() - started
    held.close()
    server.agent.role("reinstated", signed(key, Reinstate("client", "bench", "t",
                                                           sequence + 1)))
    return {"status round trip": status, "role revoked call": called, "channel closed": closed}


def start(directory: Path) -> tuple[dict[str, GuestProcess], SwtpmFactory]:
    ca = LocalCA.ensure(directory / "ca")
    template = directory / "template"
    provision(template, ca)
    factory = SwtpmFactory(ca, template, directory / "tpms")
    guests = {name: _start_guest(name, factory(unique=True), GOOD, directory)
              for name in ("server", "client")}
    registry, registrar = AkRegistry(), Registrar(ca.ca_bundle())
    for guest in guests.values():
        _register(guest, registrar, registry)
    tls = make_ca("bench TLS CA")
    policies = {name: dump_policy(predicted_policy(name, GOOD)) for name in guests}
    for name, guest in guests.items():
        configure_guest(guest.agent, name, tls, registry_json=registry.to_json(),
                        policies=policies, pcrs=list(SIM_PCRS.indices))
    return guests, factory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory(prefix="bench-vm-revocation-") as tmp:
        guests, factory = start(Path(tmp))
        try:
            for guest in guests.values():
                guest.agent.call({"op": "revocation_key", "public_key": pem.decode()})
            rounds = [one_round(guests, key, 2 * i + 1) for i in range(args.rounds)]
        finally:
            for guest in guests.values():
                guest.process.kill()
                guest.process.wait(10)
            factory.stop_all()
    print(f"{args.rounds} rounds, load {os.getloadavg()[0]:.1f} (1 min); times in ms")
    for measure in rounds[0]:
        values = sorted(r[measure] * 1000 for r in rounds)
        p99 = values[min(len(values) - 1, round(0.99 * (len(values) - 1)))]
        print(f"| {measure} | {statistics.median(values):.1f} | {p99:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
