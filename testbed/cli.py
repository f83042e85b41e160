"""The ``testbed`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from attestation.errors import (
    EndorsementError,
    EvidenceFormatError,
    PolicyError,
    TestbedError,
    TpmError,
    VerificationError,
)
from testbed import tpm_commands
from testbed.attacks.commands import register_attack_commands
from testbed.cluster_commands import register_cluster_commands
from testbed.errors import StateError
from testbed.exitcodes import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REJECTED,
)
from testbed.qemu.commands import register_image_commands, register_qemu_commands
from testbed.vsm_commands import register_vsm_commands

EPILOG = """\
TPM selection (commands that talk to a TPM):
  -T/--tcti NAME:CONF   any tpm2-tss TCTI, as in tpm2-tools (swtpm:port=2321, device:/dev/tpmrm0)
  $TESTBED_TCTI         used when -T is not given
  --tpm NAME            a managed swtpm under the work directory (default: "default");
                        start one with `testbed tpm start`

exit codes:
  0 success   1 attestation rejected (a named check failed)   2 usage error
  3 malformed input (evidence, policy, files)   4 TPM or environment problem   130 interrupted

examples:
  testbed demo
  testbed up && testbed attest server && testbed down
  testbed attack --all
  testbed tpm start && testbed quote -l sha256:0-7 -q 0011 -o q/
  tpm2_checkquote -u q/ak.pem -m q/quote.msg -s q/quote.sig -f q/quote.pcrs -g sha256 -q 0011
  testbed verify-quote q/ -q 0011 --policy policy.yaml --json
"""


def _add_tpm_selection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TPM selection")
    group.add_argument("-T", "--tcti", help="TCTI to reach the TPM (NAME:CONF)")
    group.add_argument("--tpm", default="default", metavar="NAME",
                       help="managed swtpm to use when no TCTI is given (default: %(default)s)")


def _add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed",
        description="Trusted-hypervisor testbed: swtpm/QEMU measured boot, TPM 2.0 quotes, "
                    "attestation-bound TLS (Trusted Passages) and a CryptoVM.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", metavar="DIR",
                        help="state directory (default: $TESTBED_HOME or ./.testbed)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run the end-to-end demo: cluster up, attested channels, "
                                    "attack lab, down (sim by default, or real VMs)")
    _add_json(p)
    p.add_argument("--backend", choices=("sim", "qemu"), default="sim",
                   help="sim: node processes with swtpm (~15 s); qemu: three VMs under "
                        "libvirt with OVMF measured boot, TLS inside the guests (~1-2 min "
                        "under TCG)")
    p.add_argument("--keep", action="store_true",
                   help="qemu: leave the demo's VMs running (`testbed --workdir DIR/demo-qemu "
                        "status`, then down)")
    p.set_defaults(func=tpm_commands.cmd_demo)

    tpm = sub.add_parser("tpm", help="manage named swtpm instances (start, stop, list)")
    tsub = tpm.add_subparsers(dest="tpm_command", metavar="ACTION", required=True)
    p = tsub.add_parser("start", help="provision (first time) and start a managed swtpm")
    p.add_argument("name", nargs="?", default="default")
    _add_json(p)
    p.set_defaults(func=tpm_commands.cmd_tpm_start)
    p = tsub.add_parser("stop", help="stop a managed swtpm")
    p.add_argument("name", nargs="?", default="default")
    p.add_argument("--all", action="store_true", help="stop every managed swtpm")
    p.set_defaults(func=tpm_commands.cmd_tpm_stop)
    p = tsub.add_parser("list", help="list managed swtpm instances")
    _add_json(p)
    p.set_defaults(func=tpm_commands.cmd_tpm_list)

    p = sub.add_parser("ek", help="show the EK certificate and validate its chain")
    _add_tpm_selection(p)
    p.add_argument("-G", "--algorithm", choices=["rsa", "ecc"], default="rsa")
    p.add_argument("--ca-bundle", type=Path, metavar="PEM",
                   help="trusted EK CAs (default: the work directory's local CA)")
    _add_json(p)
    p.set_defaults(func=tpm_commands.cmd_ek)

    p = sub.add_parser("quote", help="quote PCRs; write tpm2-tools files and evidence.json")
    _add_tpm_selection(p)
    p.add_argument("-l", "--pcr-list", default="sha256:0-7", metavar="BANK:PCRS",
                   help="PCR selection, e.g. sha256:0,1,2,4-7 (default: %(default)s)")
    p.add_argument("-q", "--qualification", metavar="HEX",
                   help="qualifying data (nonce), up to 32 bytes hex (default: random)")
    p.add_argument("-G", "--ak-algorithm", choices=["ecc", "rsa"], default="ecc")
    p.add_argument("--event-log", type=Path, metavar="FILE",
                   help="event log to include in evidence.json")
    p.add_argument("-o", "--output", type=Path, default=Path("."), metavar="DIR")
    _add_json(p)
    p.set_defaults(func=tpm_commands.cmd_quote)

    p = sub.add_parser("verify-quote", help="verify a quote (ours or tpm2_quote's)")
    p.add_argument("directory", nargs="?", type=Path,
                   help="directory holding quote.msg, quote.sig, quote.pcrs and ak.pub/ak.pem")
    p.add_argument("-m", "--message", type=Path, help="TPMS_ATTEST file (quote.msg)")
    p.add_argument("-s", "--signature", type=Path, help="TPMT_SIGNATURE file (quote.sig)")
    p.add_argument("-f", "--pcr", type=Path, help="serialized PCR file (quote.pcrs)")
    p.add_argument("-u", "--public", type=Path,
                   help="AK public key: PEM, TPM2B_PUBLIC or TPMT_PUBLIC")
    p.add_argument("-q", "--nonce", "--qualification", dest="nonce", required=True,
                   metavar="HEX", help="the nonce the quote must carry")
    p.add_argument("--policy", type=Path, metavar="YAML", help="reference policy to enforce")
    p.add_argument("--event-log", type=Path, metavar="FILE",
                   help="event log to replay against the quoted PCRs")
    _add_json(p)
    p.set_defaults(func=tpm_commands.cmd_verify_quote)

    pol = sub.add_parser("policy", help="reference policies (create from a known-good node)")
    psub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    p = psub.add_parser("create", help="create a policy from quote files or a live TPM")
    p.add_argument("--from", dest="source", type=Path, metavar="DIR",
                   help="quote directory (quote.pcrs) written by `testbed quote`")
    _add_tpm_selection(p)
    p.add_argument("-l", "--pcr-list", default="sha256:0-7", metavar="BANK:PCRS")
    p.add_argument("--event-log", type=Path, metavar="FILE",
                   help="event log whose events become expected events")
    p.add_argument("--name", required=True, help="policy name")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="YAML")
    p.set_defaults(func=tpm_commands.cmd_policy_create)
    p = psub.add_parser("show", help="validate and print a policy")
    p.add_argument("path", type=Path)
    _add_json(p)
    p.set_defaults(func=tpm_commands.cmd_policy_show)

    register_cluster_commands(sub)
    register_attack_commands(sub)
    register_image_commands(sub)
    register_qemu_commands(sub)
    register_vsm_commands(sub)

    p = sub.add_parser("eventlog", help="parse and replay a TCG crypto-agile event log")
    p.add_argument("path", type=Path,
                   help="e.g. /sys/kernel/security/tpm0/binary_bios_measurements")
    p.add_argument("-g", "--bank", default="sha256")
    _add_json(p)
    p.set_defaults(func=tpm_commands.cmd_eventlog)
    return parser


def _exit_code(exc: TestbedError) -> int:
    if isinstance(exc, VerificationError | EndorsementError):
        return EXIT_REJECTED
    if isinstance(exc, EvidenceFormatError | PolicyError):
        return EXIT_BAD_INPUT
    if isinstance(exc, TpmError | StateError):
        return EXIT_ENVIRONMENT
    return EXIT_ENVIRONMENT


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("testbed: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TestbedError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": type(exc).__name__, "message": str(exc)}))
        print(f"testbed {args.command}: error: {exc}", file=sys.stderr)
        return _exit_code(exc)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
