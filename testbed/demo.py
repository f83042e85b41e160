"""The attestation demo: one fresh swtpm, end to end, with a readable result.

1. Provision a fresh swtpm against the project-local CA; validate its EK certificate.
2. Create an AK and activate it against the EK (MakeCredential/ActivateCredential).
3. Simulated measured boot: firmware, kernel, initrd, command line -> PCRs + event log.
4. Quote with a fresh nonce; create a reference policy from this known-good node.
5. Verify a second quote against the policy: accepted.
6. Attacks: a replayed quote, and a reboot into another kernel command line: rejected,
   with the failing check named.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from attestation.endorsement import validate_ek
from attestation.eventlog import parse_event_log
from attestation.evidence import Evidence
from attestation.policy import policy_from_evidence
from attestation.registrar import Registrar
from attestation.report import VerificationReport
from attestation.tpm import TpmClient, TpmKey
from attestation.tpm_types import PcrSelection, parse_public
from attestation.verifier import ClockHistory, QuoteVerifier
from testbed.localca import LocalCA
from testbed.measured_boot import BootChain, measure_boot
from testbed.progress import Progress
from testbed.swtpm import Swtpm, provision

SELECTION = PcrSelection("sha256", (0, 1, 2, 3, 4, 5, 6, 7, 9))
GOOD_BOOT = BootChain(firmware=b"OVMF firmware volume (demo)", kernel=b"vmlinuz-6.1.0-demo",
                      initrd=b"initrd.img-6.1.0-demo", cmdline="console=ttyS0 quiet ro")
TAMPERED_BOOT = BootChain(firmware=GOOD_BOOT.firmware, kernel=GOOD_BOOT.kernel,
                          initrd=GOOD_BOOT.initrd, cmdline="console=ttyS0 quiet ro init=/bin/sh")


def _quote(client: TpmClient, ak: TpmKey, nonce: bytes, log: bytes) -> Evidence:
    q = client.quote(ak, SELECTION, nonce)
    return Evidence(attest=q.attest, signature=q.signature, ak_public=ak.public,
                    pcr_bank="sha256", pcrs=q.pcrs, event_log=log)


def _line(label: str, report: VerificationReport) -> dict[str, Any]:
    failure = report.failure
    return {"step": label, "accepted": report.ok,
            "failed_check": failure.name if failure else None,
            "detail": failure.detail if failure else "all checks passed"}


def _boot_and_quote(tpm: Swtpm, registrar: Registrar, chain: BootChain,
                    nonce: bytes) -> Evidence:
    with TpmClient(tpm.tcti) as client:
        log = measure_boot(client, chain)
        ak = client.attestation_key("ecc")
        try:
            return _quote(client, ak, nonce, log)
        finally:
            client.flush(ak)


def run_demo(workdir: Path, json_output: bool = False) -> int:
    started = time.monotonic()
    progress = Progress(total=6, quiet=json_output)
    run_dir = workdir / "demo"
    shutil.rmtree(run_dir, ignore_errors=True)
    results: list[dict[str, Any]] = []
    with progress.step("provisioning a fresh swtpm against the project-local CA"):
        ca = LocalCA.ensure(workdir / "ca")
        provision(run_dir / "tpm", ca)
    with Swtpm(run_dir / "tpm") as tpm:
        with progress.step("validating the EK certificate and activating the AK"):
            registrar = Registrar(ca.ca_bundle())
            with TpmClient(tpm.tcti) as client:
                ek = client.endorsement_key("rsa")
                assert ek.certificate is not None
                chain = validate_ek(ek.certificate, parse_public(ek.public), ca.ca_bundle())
                ak = client.attestation_key("ecc")
                challenge = registrar.challenge(ek.certificate, ek.public, ak.public)
                secret = client.activate_credential(ak, "rsa", challenge)
                registrar.complete(parse_public(ak.public).name, secret)
                client.flush(ak)
        with progress.step("measured boot (simulated OVMF) and a known-good quote"):
            first_nonce = os.urandom(32)
            golden = _boot_and_quote(tpm, registrar, GOOD_BOOT, first_nonce)
            assert golden.event_log is not None
            policy = policy_from_evidence(golden.pcrs, parse_event_log(golden.event_log),
                                          name="demo-known-good")
        history = ClockHistory()
        verifier = QuoteVerifier(ak_trust=registrar, policy=policy, clock_history=history)
        with progress.step("verifying a fresh quote against the reference policy"):
            with TpmClient(tpm.tcti) as client:
                ak = client.attestation_key("ecc")
                nonce = os.urandom(32)
                fresh = _quote(client, ak, nonce, golden.event_log)
                client.flush(ak)
            good = verifier.verify(fresh, nonce)
            results.append(_line("fresh quote from the known-good boot", good))
        with progress.step("attack: replaying the old quote for a new nonce"):
            replay = verifier.verify(fresh, os.urandom(32))
            results.append(_line("replayed quote", replay))
        with progress.step("attack: reboot with init=/bin/sh on the kernel command line"):
            tpm.stop()
            tpm.start()
            nonce = os.urandom(32)
            tampered = verifier.verify(_boot_and_quote(tpm, registrar, TAMPERED_BOOT, nonce),
                                       nonce)
            results.append(_line("tampered boot (other command line)", tampered))
    shutil.rmtree(run_dir / "tpm", ignore_errors=True)  # the demo TPM is throwaway
    expected = [True, False, False]
    ok = [r["accepted"] for r in results] == expected
    summary = {"ok": ok, "ek_chain": list(chain.chain_subjects), "policy": policy.name,
               "pcrs": list(SELECTION.indices), "results": results,
               "seconds": round(time.monotonic() - started, 2)}
    if json_output:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, good)
    return 0 if ok else 1


def _print_summary(summary: dict[str, Any], good: VerificationReport) -> None:
    print()
    print("EK certificate chain: " + " <- ".join(summary["ek_chain"]))
    print(f"Reference policy {summary['policy']!r} over sha256 PCRs {summary['pcrs']}")
    print("Checks on the fresh quote:")
    for check in good.checks:
        print(f"  [{'ok  ' if check.passed else 'FAIL'}] {check.name:<19} {check.detail}")
    print()
    print(f"{'scenario':<38} {'verdict':<9} caught by")
    for r in summary["results"]:
        verdict = "ACCEPTED" if r["accepted"] else "REJECTED"
        print(f"{r['step']:<38} {verdict:<9} {r['failed_check'] or '-'}")
        if not r["accepted"]:
            print(f"{'':<48} {r['detail'][:150]}")
    outcome = "as expected" if summary["ok"] else "NOT as expected"
    print(f"\ndemo finished in {summary['seconds']} s: {outcome}")
