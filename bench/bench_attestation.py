"""Attestation figures, measured side by side in one run (not a test).

1. Quote verifications per second on one core (the full QuoteVerifier: parsing, AK
   trust, signature, nonce, PCR digest, clock history, event log replay, policy),
   against raw ECDSA P-256 verifications via `cryptography` on the same core.
   Goal: at least 0.5x.
2. Quote latency against swtpm (p50/p99), ECC P-256 and RSA-2048 AKs.

Run: .venv/bin/python bench/bench_attestation.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attestation.eventlog import parse_event_log
from attestation.evidence import Evidence
from attestation.policy import policy_from_evidence
from attestation.registrar import AkRegistry
from attestation.tpm import KeyAlgorithm, TpmClient
from attestation.tpm_types import PcrSelection, parse_public
from attestation.verifier import ClockHistory, QuoteVerifier
from testbed.attacks.lab import GOOD_BOOT
from testbed.tpm.boot import measure_boot
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm, provision

SELECTION = PcrSelection("sha256", (0, 1, 2, 3, 4, 5, 6, 7, 9))


def rate(fn: Callable[[], object], seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(50):
            fn()
        count += 50
    return count / (time.perf_counter() - start)


def raw_ecdsa(seconds: float) -> float:
    key = ec.generate_private_key(ec.SECP256R1())
    message = os.urandom(120)
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
    public = key.public_key()
    return rate(lambda: public.verify(signature, message, ec.ECDSA(hashes.SHA256())), seconds)


def quote_verification(client: TpmClient, seconds: float) -> tuple[float, float, float]:
    log = measure_boot(client, GOOD_BOOT)
    ak = client.attestation_key("ecc")
    nonce = os.urandom(32)
    q = client.quote(ak, SELECTION, nonce)
    evidence = Evidence(attest=q.attest, signature=q.signature, ak_public=ak.public,
                        pcr_bank="sha256", pcrs=q.pcrs, event_log=log)
    policy = policy_from_evidence(q.pcrs, parse_event_log(log), name="bench")
    registry = AkRegistry({"bench": parse_public(ak.public)}).for_node("bench")
    client.flush(ak)
    bare = dataclasses.replace(evidence, event_log=None)
    plain = QuoteVerifier(ak_trust=registry)
    full = QuoteVerifier(ak_trust=registry, policy=policy)
    assert plain.verify(bare, nonce).ok and full.verify(evidence, nonce).ok

    def with_history() -> None:
        # A fresh history each time: the same quote would otherwise be a replay.
        QuoteVerifier(ak_trust=registry, policy=policy,
                      clock_history=ClockHistory()).verify(evidence, nonce)

    return (rate(lambda: plain.verify(bare, nonce), seconds),
            rate(lambda: plain.verify(evidence, nonce), seconds),
            rate(with_history, seconds))


def quote_latency(client: TpmClient, algorithm: KeyAlgorithm, n: int) -> tuple[float, float]:
    ak = client.attestation_key(algorithm)
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        client.quote(ak, SELECTION, os.urandom(32))
        samples.append((time.perf_counter() - start) * 1000)
    client.flush(ak)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--quotes", type=int, default=300)
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the goal says
    with tempfile.TemporaryDirectory() as tmp:
        ca = LocalCA.ensure(Path(tmp) / "ca")
        provision(Path(tmp) / "tpm", ca)
        with Swtpm(Path(tmp) / "tpm") as tpm, TpmClient(tpm.tcti) as client:
            ecdsa = raw_ecdsa(args.seconds)
            plain, logged, full = quote_verification(client, args.seconds)
            ecc = quote_latency(client, "ecc", args.quotes)
            rsa = quote_latency(client, "rsa", args.quotes)
    print("verification on one core (PCRs 0-7,9; 14-event log; policy with events)")
    print(f"  raw ECDSA P-256 verify (cryptography)   {ecdsa:9.0f} /s   baseline")
    print(f"  quote verify (all quote checks)         {plain:9.0f} /s   {plain / ecdsa:.2f}x"
          "   (goal >= 0.5x)")
    print(f"  + event log replay (14 events)          {logged:9.0f} /s   {logged / ecdsa:.2f}x")
    print(f"  + reference policy + clock history      {full:9.0f} /s   {full / ecdsa:.2f}x")
    print(f"quote latency against swtpm over its unix socket ({args.quotes} quotes each, "
          "incl. PCR read)")
    print(f"  ECC P-256 AK   p50 {ecc[0]:.2f} ms   p99 {ecc[1]:.2f} ms")
    print(f"  RSA-2048 AK    p50 {rsa[0]:.2f} ms   p99 {rsa[1]:.2f} ms")


if __name__ == "__main__":
    main()
