"""`testbed vsm ...`: the CryptoVM's key and account management and one-shot operations.

Every command opens the CryptoVM state directory locally as root (unsealing the
storage key with the TPM, which only works in the measured state it was sealed to),
acts, and closes. Results print as JSON with --json, else as indented key: value lines.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from attestation.encoding import b64decode
from attestation.files import read_bounded
from cryptovm import admin
from cryptovm.keystore import ALGORITHMS
from cryptovm.wire import MAX_BODY
from testbed.cli.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.cli.tpm import parse_hex, tcti_for
from testbed.core.paths import resolve_workdir


def register_vsm_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    vsm = sub.add_parser("vsm", help="the CryptoVM's virtual security module: keys, accounts",
                         description="Key and account management and one-shot operations on "
                                     "a CryptoVM state directory, as its root account.")
    vsm.add_argument("--state", type=Path, metavar="DIR",
                     help="CryptoVM state directory (default: WORKDIR/cryptovm)")
    vsm.add_argument("-T", "--tcti", help="TCTI of the CryptoVM's TPM")
    vsm.add_argument("--tpm", default="default", metavar="NAME",
                     help="managed swtpm when no TCTI is given (default: %(default)s)")
    groups = vsm.add_subparsers(dest="vsm_command", metavar="ACTION", required=True)
    _state_commands(groups)
    _key_commands(groups)
    _account_commands(groups)


def _add(groups: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = groups.add_parser(name, help=help_text)
    parser.set_defaults(func=func)
    return parser


def _state_commands(groups: Any) -> None:
    p = _add(groups, "init", "create a CryptoVM sealed to the TPM's current PCRs", cmd_init)
    p.add_argument("--pcrs", default="sha256:0-9", help="PCRs the storage key is sealed to")
    p.add_argument("--psk-file", type=Path,
                   help="where to write the root PSK (0600; default: STATE/../root.psk)")
    _add(groups, "status", "state directory, keys, accounts, sealing", cmd_status)
    _add(groups, "audit", "verify the hash-chained audit log", cmd_audit)


def _key_commands(groups: Any) -> None:
    keys = groups.add_parser("key", help="keys: generate, list, public, sign, verify, "
                                         "rotate, delete, attest")
    k = keys.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    p = _add(k, "generate", "generate a key inside the CryptoVM", cmd_key_generate)
    p.add_argument("algorithm", choices=list(ALGORITHMS))
    p.add_argument("--usage", default="sign", help="comma list: sign, decrypt, encrypt, derive")
    p.add_argument("--exportable", action="store_true", help="allow wrapped export")
    p.add_argument("--id", dest="key_id", help="key id (default: generated)")
    _add(k, "list", "list keys and versions", cmd_key_list)
    for name, func in (("public", cmd_key_public), ("rotate", cmd_key_rotate),
                       ("delete", cmd_key_delete)):
        _add(k, name, f"{name} a key", func).add_argument("key_id")
    p = _add(k, "sign", "sign data with a key", cmd_key_sign)
    p.add_argument("key_id")
    p.add_argument("--data", type=Path, required=True, metavar="FILE")
    p = _add(k, "verify", "verify a signature (exit 1 if invalid)", cmd_key_verify)
    p.add_argument("key_id")
    p.add_argument("--data", type=Path, required=True, metavar="FILE")
    p.add_argument("--signature", required=True, metavar="BASE64")
    p = _add(k, "attest", "key attestation: a CryptoVM quote binding the key", cmd_key_attest)
    p.add_argument("key_id")
    p.add_argument("--nonce", required=True, metavar="HEX")


def _account_commands(groups: Any) -> None:
    accounts = groups.add_parser("account", help="accounts (TLS-SE model): create, list, "
                                                 "grant, revoke, delete, certificate")
    a = accounts.add_subparsers(dest="account_command", metavar="ACTION", required=True)
    p = _add(a, "create", "create a guest account with its own PSK", cmd_account_create)
    p.add_argument("name")
    p.add_argument("--privilege", action="append", default=[],
                   help="e.g. records:read, keys:generate, key:<id>:sign (repeatable)")
    _add(a, "list", "list accounts and privileges", cmd_account_list)
    for name, func in (("grant", cmd_account_grant), ("revoke", cmd_account_revoke)):
        p = _add(a, name, f"{name} privileges", func)
        p.add_argument("name")
        p.add_argument("privileges", nargs="+")
    _add(a, "delete", "delete an account", cmd_account_delete).add_argument("name")
    _add(a, "certificate", "issue a client certificate for an account",
         cmd_account_certificate).add_argument("name")


# --- handlers ---------------------------------------------------------------------------


def _where(args: argparse.Namespace) -> tuple[Path, str]:
    state = args.state or resolve_workdir(args.workdir) / "cryptovm" / "state"
    return Path(state), tcti_for(args)


def _emit(args: argparse.Namespace, result: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            text = value if isinstance(value, str) else json.dumps(value)
            print(f"{key}: {text}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    state, tcti = _where(args)
    state.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    result = admin.init(state, tcti, pcrs=args.pcrs)
    psk_file = args.psk_file or state.parent / "root.psk"
    fd = os.open(psk_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:  # the root PSK never goes to the terminal or a log
        handle.write(result.pop("root_psk") + "\n")
    return _emit(args, {**result, "root_psk_file": str(psk_file)})


def cmd_status(args: argparse.Namespace) -> int:
    return _emit(args, admin.status(*_where(args)))


def cmd_audit(args: argparse.Namespace) -> int:
    result = admin.verify_audit(*_where(args))
    _emit(args, result)
    return EXIT_OK if result.get("ok", True) else EXIT_REJECTED


def cmd_key_generate(args: argparse.Namespace) -> int:
    usage = [u for u in args.usage.split(",") if u]
    return _emit(args, admin.key_generate(*_where(args), args.algorithm, usage,
                                          exportable=args.exportable, key_id=args.key_id))


def cmd_key_list(args: argparse.Namespace) -> int:
    return _emit(args, admin.key_list(*_where(args)))


def cmd_key_public(args: argparse.Namespace) -> int:
    return _emit(args, admin.key_public(*_where(args), args.key_id))


def cmd_key_rotate(args: argparse.Namespace) -> int:
    return _emit(args, admin.key_rotate(*_where(args), args.key_id))


def cmd_key_delete(args: argparse.Namespace) -> int:
    return _emit(args, admin.key_delete(*_where(args), args.key_id))


def _data(args: argparse.Namespace) -> bytes:
    """The --data file: what a CVM1 frame can carry, at most."""
    return read_bounded(args.data, MAX_BODY, what="data file")


def cmd_key_sign(args: argparse.Namespace) -> int:
    return _emit(args, admin.key_sign(*_where(args), args.key_id, _data(args)))


def cmd_key_verify(args: argparse.Namespace) -> int:
    signature = b64decode(args.signature, "--signature", limit=MAX_BODY)
    result = admin.key_verify(*_where(args), args.key_id, _data(args), signature)
    _emit(args, result)
    return EXIT_OK if result.get("valid") else EXIT_REJECTED


def cmd_key_attest(args: argparse.Namespace) -> int:
    return _emit(args, admin.key_attest(*_where(args), args.key_id,
                                        parse_hex(args.nonce, "nonce", 32)))


def cmd_account_create(args: argparse.Namespace) -> int:
    return _emit(args, admin.account_create(*_where(args), args.name, args.privilege))


def cmd_account_list(args: argparse.Namespace) -> int:
    return _emit(args, admin.account_list(*_where(args)))


def cmd_account_grant(args: argparse.Namespace) -> int:
    return _emit(args, admin.account_grant(*_where(args), args.name, args.privileges))


def cmd_account_revoke(args: argparse.Namespace) -> int:
    return _emit(args, admin.account_revoke(*_where(args), args.name, args.privileges))


def cmd_account_delete(args: argparse.Namespace) -> int:
    return _emit(args, admin.account_delete(*_where(args), args.name))


def cmd_account_certificate(args: argparse.Namespace) -> int:
    return _emit(args, admin.account_issue_certificate(*_where(args), args.name))
