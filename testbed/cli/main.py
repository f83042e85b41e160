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
    VerificationError,
)
from cryptovm.errors import AlreadyExists, BadRequest, KeyUsageError, NotFound
from testbed.cli.attack import register_attack_commands
from testbed.cli.cluster import register_cluster_commands
from testbed.cli.completion import register_completion_command
from testbed.cli.demo import register_demo_commands
from testbed.cli.evidence import register_evidence_commands
from testbed.cli.exitcodes import (
    EXIT_BAD_INPUT,
    EXIT_ENVIRONMENT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_USAGE,
)
from testbed.cli.hosts import register_hosts_commands
from testbed.cli.migrate import register_migrate_commands
from testbed.cli.mux import register_mux_commands
from testbed.cli.options import spread_global_options
from testbed.cli.qemu import register_image_commands, register_qemu_commands
from testbed.cli.revocation import register_revocation_commands
from testbed.cli.sign import register_sign_commands
from testbed.cli.tamper import register_tamper_commands
from testbed.cli.tctp import register_tctp_commands
from testbed.cli.tpm import register_tpm_commands
from testbed.cli.verifier import register_verifier_commands
from testbed.cli.vsm import register_vsm_commands
from testbed.core.errors import ArgumentError, UsageError

EPILOG = """\
TPM selection (commands that talk to a TPM):
  -T/--tcti NAME:CONF   any tpm2-tss TCTI, as in tpm2-tools (swtpm:port=2321, device:/dev/tpmrm0)
  $TESTBED_TCTI         used when -T is not given
  --tpm NAME            a managed swtpm under the work directory (default: "default");
                        start one with `testbed tpm start`

exit codes:
  0 success   1 attestation rejected (a named check failed)   2 usage error
  3 bad value in a file or argument   4 TPM or environment problem
  70 internal error (a bug)   130 interrupted

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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    register_demo_commands(sub)
    register_tpm_commands(sub)
    register_cluster_commands(sub)
    register_attack_commands(sub)
    register_image_commands(sub)
    register_qemu_commands(sub)
    register_vsm_commands(sub)
    register_tctp_commands(sub)
    register_mux_commands(sub)
    register_sign_commands(sub)
    register_evidence_commands(sub)
    register_verifier_commands(sub)
    register_tamper_commands(sub)
    register_revocation_commands(sub)
    register_hosts_commands(sub)
    register_migrate_commands(sub)
    register_completion_command(sub, parser)
    spread_global_options(parser)
    return parser


# Which exit code each kind of error means (first match wins; README documents the codes).
_EXIT_CODES: tuple[tuple[tuple[type[TestbedError], ...], int], ...] = (
    ((VerificationError, EndorsementError), EXIT_REJECTED),
    ((UsageError,), EXIT_USAGE),
    ((EvidenceFormatError, PolicyError, ArgumentError, NotFound, AlreadyExists, BadRequest,
      KeyUsageError), EXIT_BAD_INPUT),
)


def exit_code_for(exc: TestbedError) -> int:
    """The documented exit code of an error; the TPM and the environment are the rest."""
    return next((code for kinds, code in _EXIT_CODES if isinstance(exc, kinds)),
                EXIT_ENVIRONMENT)


def _fail(args: argparse.Namespace, kind: str, message: str, code: int) -> int:
    """One line on stderr; with --json also a structured error on stdout."""
    if getattr(args, "json", False):
        print(json.dumps({"ok": False, "error": {"type": kind, "message": message,
                                                 "exit_code": code}}))
    print(f"testbed {args.command}: error: {message}", file=sys.stderr)
    return code


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
        return _fail(args, type(exc).__name__, str(exc), exit_code_for(exc))
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # a file or directory the user named, or the machine itself
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(args, "OSError", f"{exc.strerror or exc}{where}", EXIT_ENVIRONMENT)
    except Exception as exc:  # a bug: say so in one line, the traceback only on request
        if os.environ.get("TESTBED_DEBUG"):
            raise
        return _fail(args, "InternalError",
                     f"internal error ({type(exc).__name__}: {exc}); this is a bug: rerun with "
                     "TESTBED_DEBUG=1 for the traceback and report it", EXIT_INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
