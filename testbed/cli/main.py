"""The ``testbed`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from attestation.errors import (
    EndorsementError,
    EvidenceFormatError,
    PolicyError,
    TestbedError,
    TpmError,
    VerificationError,
)
from testbed.cli.attack import register_attack_commands
from testbed.cli.cluster import register_cluster_commands
from testbed.cli.demo import register_demo_commands
from testbed.cli.exitcodes import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REJECTED,
)
from testbed.cli.qemu import register_image_commands, register_qemu_commands
from testbed.cli.tpm import register_tpm_commands
from testbed.cli.vsm import register_vsm_commands
from testbed.core.errors import StateError

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed",
        description="Trusted-hypervisor testbed: swtpm/QEMU measured boot, TPM 2.0 quotes, "
                    "attestation-bound TLS (Trusted Passages) and a CryptoVM.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", metavar="DIR",
                        help="state directory (default: $TESTBED_HOME or ./.testbed)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    register_demo_commands(sub)
    register_tpm_commands(sub)
    register_cluster_commands(sub)
    register_attack_commands(sub)
    register_image_commands(sub)
    register_qemu_commands(sub)
    register_vsm_commands(sub)

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
