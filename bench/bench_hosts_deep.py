"""Deep attestation figures on this machine (not a test; docs/hosts.md).

In one run, one host up (on its own scratch bridge), then:
- host intermediate issuance: key made in the host TPM, TPM2_Certify by the AK, a fresh
  host attestation, the lab CA's certificate (one SSH session; p50 over the rounds);
- a vTPM EK certificate issued by the host intermediate (TBS here, TPM2_Sign in the host
  TPM over SSH, assembly, check): warm (the session and its host agent kept, as
  placement does for a VM) and cold (a new SSH connection each);
- the baseline: the same certificate signed by a key in this process (no TPM, no SSH).

Run: .venv/bin/python bench/bench_hosts_deep.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from testbed.hosts import deep, lifecycle
from testbed.hosts.layout import LabPaths
from testbed.hosts.network import scratch_network


def timed(step: Callable[[], object]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def p50(samples: list[float]) -> str:
    return f"p50 {statistics.median(samples) * 1000:.1f} ms (min {min(samples) * 1000:.1f}, " \
           f"max {max(samples) * 1000:.1f}, n={len(samples)})"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    rounds = parser.parse_args().rounds
    print(f"load average at start: {os.getloadavg()}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-deep-"))
    bridge, subnet = scratch_network("tbdb")
    lab = LabPaths(workdir)
    try:
        up = timed(lambda: lifecycle.up(workdir, 1, bridge=bridge, subnet=subnet))
        print(f"one host up, registered and attested: {up:.1f} s")
        ek = rsa.generate_private_key(65537, 2048).public_key()
        with deep.host_agent(lab, "host1") as agent:
            certify = [timed(lambda: deep.certify_host_intermediate(lab, "host1", agent))
                       for _ in range(max(3, rounds // 4))]
            warm = [timed(lambda: deep.issue_vtpm_ek_certificate(
                lab, "host1", ek, node="bench", agent=agent)) for _ in range(rounds)]
        cold = [timed(lambda: deep.issue_vtpm_ek_certificate(lab, "host1", ek, node="bench"))
                for _ in range(max(3, rounds // 4))]
        intermediate = deep.load_intermediate(lab, "host1")
        assert intermediate is not None
        key = ec.generate_private_key(ec.SECP256R1())
        local = [timed(lambda: deep.build_ek_certificate(
            intermediate.certificate, ek, deep.DEFAULT_IDENTITY,
            lambda tbs: key.sign(tbs, ec.ECDSA(hashes.SHA256())))) for _ in range(rounds)]
        print(f"host intermediate (TPM key + certify + fresh host attestation + lab CA): "
              f"{p50(certify)}")
        print(f"vTPM EK certificate over SSH, warm session: {p50(warm)}")
        print(f"vTPM EK certificate over SSH, new SSH connection: {p50(cold)}")
        print(f"baseline, same certificate signed in-process: {p50(local)}")
    finally:
        lifecycle.down(workdir)
    print(f"load average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
