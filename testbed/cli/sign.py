"""``testbed sign verify``: check a TLS Sign proof offline (docs/tls-sign.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from attestation.files import read_bounded
from attestation.policy import load_policy
from testbed.cli.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.cli.render import emit, print_report
from trusted_passages.signing import MAX_PROOF_BYTES
from trusted_passages.tpm_signing import ProofResult, load_ak_pin, verify_proof


def register_sign_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sign = sub.add_parser("sign", help="TLS Sign proofs: verify one offline")
    ssub = sign.add_subparsers(dest="sign_command", metavar="ACTION", required=True)
    p = ssub.add_parser("verify", help="verify a signed-message proof; name what it "
                        "establishes or the failed check (exit 1)")
    p.add_argument("path", type=Path, metavar="FILE", help="proof (JSON) kept by the receiver")
    p.add_argument("--ak", type=Path, metavar="PEM",
                   help="the signer's AK public key (else: who signed is only the AK named)")
    p.add_argument("--policy", type=Path, metavar="YAML",
                   help="reference policy the signer's platform state must satisfy")
    p.set_defaults(func=cmd_sign_verify)


def cmd_sign_verify(args: argparse.Namespace) -> int:
    data = read_bounded(args.path, MAX_PROOF_BYTES)
    trust = load_ak_pin(read_bounded(args.ak, 1 << 16)) if args.ak else None
    policy = load_policy(args.policy) if args.policy else None
    result = verify_proof(data, trust, policy)
    emit(args, result.to_dict(), lambda: _print(result, args.path))
    return EXIT_OK if result.report.ok else EXIT_REJECTED


def _print(result: ProofResult, path: Path) -> None:
    print_report(result.report, f"signed message {path}")
    if result.report.ok:
        print("establishes:")
        for topic, value in result.facts.items():
            print(f"  {topic}: {_flat(value)}")


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        if "pcrs" in value:
            value = {**value, "pcrs": f"{len(value['pcrs'])} PCRs ({value['pcr_bank']})"}
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)
