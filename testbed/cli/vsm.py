"""`testbed vsm ...`: the CryptoVM's key and account management and one-shot operations.

Every command acts as the CryptoVM's root account, on one of two targets:

* a state directory opened here (``--state DIR``, default ``WORKDIR/cryptovm/state``),
  unsealing its storage key with the TPM (which only works in the measured state it was
  sealed to); created by ``testbed vsm init``;
* with ``--node NODE``, a running cluster node's CryptoVM, over its CVM1 wire protocol
  with the root PSK the node keeps in its state (the cluster from ``--workdir`` and
  ``--cluster``).

Results print as JSON data with --json (keys and certificates PEM, times ISO 8601 UTC),
else as ``key: value`` lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestation.encoding import b64decode, b64encode
from attestation.errors import FileInputError
from attestation.files import atomic_write, private_dir, read_bounded
from cryptovm import admin
from cryptovm.admin import VsmTarget
from cryptovm.errors import StorageError
from cryptovm.keystore import ALGORITHMS
from cryptovm.wire import MAX_BODY
from testbed.cli.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.cli.options import walk_parsers
from testbed.cli.tpm import parse_hex, tcti_for
from testbed.cluster.state import load_spec
from testbed.core.errors import ArgumentError, StateError, UsageError
from testbed.core.paths import ClusterPaths, existing_cluster, resolve_workdir
from testbed.roles.cryptovm import cryptovm_endpoint, published_service

__all__ = ["register_vsm_commands"]

MAX_SIGNATURE = 4096  # an RSA-3072 signature is 384 bytes, ECDSA P-384 at most 104
CONNECT_TIMEOUT_S = 10.0
REQUEST_TIMEOUT_S = 120.0  # an RSA-3072 key generation on a busy node takes seconds
PUBLIC_FORMATS = ("pem", "der", "base64", "jwk")
PUBLIC_MODE = 0o644  # public keys, signatures and certificates


def register_vsm_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    vsm = sub.add_parser("vsm", help="the CryptoVM's virtual security module: keys, accounts",
                         description="Key and account management and one-shot operations, as "
                                     "the CryptoVM's root account: on a state directory here "
                                     "(--state), or on a running cluster node's CryptoVM "
                                     "over its wire protocol (--node).")
    groups = vsm.add_subparsers(dest="vsm_command", metavar="ACTION", required=True)
    _state_commands(groups)
    _key_commands(groups)
    _account_commands(groups)
    for parser in walk_parsers(vsm):  # before or after the action, as the global options
        _target_options(parser, top=parser is vsm)


def _target_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Where the CryptoVM is; on every vsm parser (a value typed later wins)."""
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS
    group = parser.add_argument_group("CryptoVM")
    group.add_argument("--node", default=default(None), metavar="NODE",
                       help="a running cluster node's CryptoVM, over the wire as root")
    group.add_argument("--state", type=Path, default=default(None), metavar="DIR",
                       help="CryptoVM state directory (default: WORKDIR/cryptovm/state)")
    group.add_argument("-T", "--tcti", default=default(None),
                       help="TCTI of the TPM the state is sealed to (not with --node)")
    group.add_argument("--tpm", default=default("default"), metavar="NAME",
                       help="managed swtpm when no TCTI is given (default: default)")


def _add(groups: Any, name: str, help_text: str, func: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = groups.add_parser(name, help=help_text)
    parser.set_defaults(func=func)
    return parser


def _state_commands(groups: Any) -> None:
    p = _add(groups, "init", "create a CryptoVM sealed to the TPM's current PCRs", cmd_init)
    p.add_argument("--pcrs", default="sha256:0-9", metavar="BANK:PCRS",
                   help="PCRs the storage key is sealed to (default: %(default)s)")
    p.add_argument("--psk-file", type=Path, metavar="FILE",
                   help="where to write the root PSK (0600; default: STATE/../root.psk)")
    _add(groups, "status", "state directory or node, keys, accounts, audit", cmd_status)
    _add(groups, "audit", "verify the hash-chained audit log (exit 1 if broken)", cmd_audit)


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
    p = _add(k, "public", "a key's public key (PEM SubjectPublicKeyInfo by default)",
             cmd_key_public)
    p.add_argument("key_id")
    p.add_argument("--format", choices=PUBLIC_FORMATS, default="pem",
                   help="pem (openssl pkey -pubin), der (binary), base64 (of the DER), "
                        "jwk (JSON Web Key) (default: %(default)s)")
    p.add_argument("--version", dest="key_version", type=int, metavar="N",
                   help="key version (default: the primary)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE", help="write it to FILE")
    for name, func in (("rotate", cmd_key_rotate), ("delete", cmd_key_delete)):
        _add(k, name, f"{name} a key", func).add_argument("key_id")
    p = _add(k, "sign", "sign data with a key", cmd_key_sign)
    p.add_argument("key_id")
    p.add_argument("--data", required=True, metavar="FILE", help="data to sign ('-': stdin)")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="also write the raw signature to FILE")
    p = _add(k, "verify", "verify a signature (exit 1 if invalid)", cmd_key_verify)
    p.add_argument("key_id")
    p.add_argument("--data", required=True, metavar="FILE", help="signed data ('-': stdin)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--signature", metavar="BASE64", help="the signature, base64")
    which.add_argument("--signature-file", metavar="FILE",
                       help="the raw signature (as `key sign -o` writes it; '-': stdin)")
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
    p.add_argument("--psk-file", type=Path, metavar="FILE",
                   help="write the account's PSK (hex) to FILE, 0600, instead of printing it")
    _add(a, "list", "list accounts and privileges", cmd_account_list)
    for name, func in (("grant", cmd_account_grant), ("revoke", cmd_account_revoke)):
        p = _add(a, name, f"{name} privileges", func)
        p.add_argument("name")
        p.add_argument("privileges", nargs="+")
    _add(a, "delete", "delete an account", cmd_account_delete).add_argument("name")
    p = _add(a, "certificate", "issue a client certificate (and its key) for an account",
             cmd_account_certificate)
    p.add_argument("name")
    p.add_argument("-o", "--output", type=Path, metavar="DIR",
                   help="write NAME.crt, NAME.key (0600) and ca.crt to DIR (0700) instead "
                        "of printing the private key")


# --- where the CryptoVM is ----------------------------------------------------------------


@dataclass(frozen=True)
class Connected:
    """A CryptoVM to act on as root, and what says which one it is."""

    target: VsmTarget
    where: dict[str, Any]  # node, endpoint, state_dir, pcr_selection


@contextmanager
def _connect(args: argparse.Namespace) -> Iterator[Connected]:
    if args.node is not None:
        with _remote(args) as connected:
            yield connected
        return
    state = _state_dir(args)
    if not (state / "cryptovm.json").is_file():  # checked first: opening would create it
        raise StateError(f"no CryptoVM in {state}: `testbed vsm init` creates one (or "
                         "--node NODE for a running cluster's)")
    with ExitStack() as stack:
        try:
            local = stack.enter_context(admin.open_local(state, tcti_for(args)))
        except StorageError as exc:
            raise _node_hint(state, exc) from None
        yield Connected(local, {"node": None, "endpoint": None, **local.where()})


def _node_hint(state: Path, exc: StorageError) -> StorageError:
    """A running cluster node holds its own state directory: say how to reach it."""
    parts = state.parts
    if len(parts) >= 6 and parts[-2:] == ("state", "cryptovm") and parts[-6] == "clusters":
        return StorageError(f"{exc}: `testbed vsm --node {parts[-3]} ...` does (cluster "
                            f"{parts[-5]})")
    return exc


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state is not None:
        return Path(args.state).absolute()
    return resolve_workdir(args.workdir, create=False) / "cryptovm" / "state"


@contextmanager
def _remote(args: argparse.Namespace) -> Iterator[Connected]:
    """The node's CryptoVM over CVM1 as root (its endpoint and root PSK from the node)."""
    if args.state is not None or args.tcti is not None:
        raise UsageError("--node reaches a running node's CryptoVM over the wire: "
                         "drop --state and -T/--tcti")
    paths, node = _cluster_node(args)
    published = published_service(paths, node)  # StateError (4) when it is not running
    endpoint = cryptovm_endpoint(paths, node)
    try:
        client = endpoint.client(timeout=CONNECT_TIMEOUT_S, io_timeout=REQUEST_TIMEOUT_S)
    except OSError as exc:
        raise StateError(f"node {node}'s CryptoVM does not answer at {endpoint.host}:"
                         f"{endpoint.port} ({exc.strerror or exc}): is the cluster up? "
                         "`testbed status`; `testbed up` starts it") from None
    with client:
        yield Connected(client, {"node": node, "endpoint": f"{endpoint.host}:{endpoint.port}",
                                 "state_dir": None, "pcr_selection": published.pcr_selection})


def _cluster_node(args: argparse.Namespace) -> tuple[ClusterPaths, str]:
    """The cluster's node ``--node``, which must be a cryptovm node (else exit 3)."""
    node: str = args.node
    paths = existing_cluster(args.workdir, args.cluster, node=node)
    cluster = paths.name
    spec = load_spec(paths)
    role = spec.node(node).role  # ClusterSpecError (3) naming the nodes it has
    if role != "cryptovm":
        runs = [n.name for n in spec.nodes if n.role == "cryptovm"]
        raise ArgumentError(f"node {node!r} of cluster {cluster!r} is a {role} node, not a "
                            f"cryptovm node (cryptovm nodes: {', '.join(runs) or 'none'})")
    return paths, node


# --- output -------------------------------------------------------------------------------


def _emit(args: argparse.Namespace, data: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print_fields(data)
    return EXIT_OK


def _print_fields(data: dict[str, Any], indent: str = "") -> None:
    for key, value in data.items():
        if isinstance(value, str) and "\n" in value:  # PEM
            print(f"{indent}{key}:\n{value.rstrip()}")
        elif isinstance(value, str):
            print(f"{indent}{key}: {value}")
        else:
            print(f"{indent}{key}: {json.dumps(value)}")


def _readable(result: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = admin.jsonable(result, readable=True)
    return data


def _write_public(path: Path, data: bytes) -> str:
    """A non-secret output file (signature, public key, certificate); its absolute path."""
    try:
        atomic_write(path, data, mode=PUBLIC_MODE)
    except OSError as exc:
        raise FileInputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return str(path.absolute())


def _read_input(name: str, limit: int, what: str) -> bytes:
    """A file, or stdin for '-', of at most ``limit`` bytes."""
    if name != "-":
        return read_bounded(Path(name), limit, what=what)
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise FileInputError(f"{what} on stdin is larger than {limit} bytes")
    return data


# --- handlers -----------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    if args.node is not None:
        raise UsageError("a cluster node creates its CryptoVM when it first comes up "
                         "(`testbed up`); `vsm init` creates one here: drop --node")
    pcrs = admin.check_pcrs(args.pcrs)  # before any directory or TPM is touched
    state = args.state or resolve_workdir(args.workdir) / "cryptovm" / "state"
    private_dir(Path(state).parent)
    result = admin.init(Path(state), tcti_for(args), pcrs=pcrs)
    psk_file = Path(args.psk_file or Path(state).parent / "root.psk").absolute()
    # The root PSK never goes to the terminal or a log: the file is its only copy.
    atomic_write(psk_file, (result.pop("root_psk") + "\n").encode())
    return _emit(args, {**result, "root_psk_file": str(psk_file)})


def cmd_status(args: argparse.Namespace) -> int:
    with _connect(args) as vsm:
        return _emit(args, vsm.where | admin.summary(vsm.target))


def cmd_audit(args: argparse.Namespace) -> int:
    with _connect(args) as vsm:
        report = vsm.target.call("audit_verify")
    _emit(args, _readable(report))
    return EXIT_OK if report.get("ok") else EXIT_REJECTED


def _call(args: argparse.Namespace, op: str, **op_args: Any) -> dict[str, Any]:
    with _connect(args) as vsm:
        return vsm.target.call(op, **op_args)


def cmd_key_generate(args: argparse.Namespace) -> int:
    usage = [u for u in args.usage.split(",") if u]
    return _emit(args, _readable(_call(args, "generate", algorithm=args.algorithm, usage=usage,
                                       exportable=args.exportable, key_id=args.key_id)))


def cmd_key_list(args: argparse.Namespace) -> int:
    keys = _readable(_call(args, "list_keys"))
    if args.json:
        return _emit(args, keys)
    print(f"{'KEY':<20} {'ALGORITHM':<9} {'USAGE':<14} {'VERSION':<7} {'EXPORTABLE':<10} "
          f"{'OWNER':<12} CREATED")
    for k in keys["keys"]:
        print(f"{k['key_id']:<20} {k['algorithm']:<9} {','.join(k['usage']):<14} "
              f"{k['version']:<7} {'yes' if k['exportable'] else 'no':<10} {k['owner']:<12} "
              f"{k['created']}")
    return EXIT_OK


def cmd_key_public(args: argparse.Namespace) -> int:
    result = _call(args, "public_key", key_id=args.key_id, version=args.key_version)
    der: bytes = result["public_key"]
    encoded = _public_key_as(args.format, der, args.key_id)
    data = {"key_id": args.key_id, "version": result["version"],
            "algorithm": result["algorithm"], "format": args.format}
    if args.output is not None:
        raw = der if args.format == "der" else _text(encoded).encode()
        return _emit(args, data | {"file": _write_public(args.output, raw)})
    if args.json:
        return _emit(args, data | {"public_key": b64encode(der) if args.format == "der"
                                   else encoded})
    if args.format == "der":
        if sys.stdout.isatty():
            raise UsageError("DER is binary: write it with -o FILE or redirect stdout")
        sys.stdout.buffer.write(der)
        sys.stdout.flush()
    else:
        sys.stdout.write(_text(encoded))
    return EXIT_OK


def _public_key_as(fmt: str, der: bytes, key_id: str) -> str | dict[str, str]:
    if fmt == "jwk":
        return admin.public_key_jwk(der, kid=key_id)
    if fmt == "base64":
        return b64encode(der)
    return admin.public_key_pem(der)  # der: the PEM's content, for the JSON case only


def _text(encoded: str | dict[str, str]) -> str:
    text = encoded if isinstance(encoded, str) else json.dumps(encoded)
    return text if text.endswith("\n") else text + "\n"


def cmd_key_rotate(args: argparse.Namespace) -> int:
    return _emit(args, _readable(_call(args, "rotate", key_id=args.key_id)))


def cmd_key_delete(args: argparse.Namespace) -> int:
    return _emit(args, _readable(_call(args, "delete", key_id=args.key_id)))


def _data(args: argparse.Namespace) -> bytes:
    """The --data input: what a CVM1 frame can carry, at most."""
    return _read_input(args.data, MAX_BODY, "data file")


def cmd_key_sign(args: argparse.Namespace) -> int:
    result = _call(args, "sign", key_id=args.key_id, data=_data(args))
    signature: bytes = result["signature"]
    written = _write_public(args.output, signature) if args.output is not None else None
    return _emit(args, {"key_id": args.key_id, "algorithm": result["algorithm"],
                        "version": result["version"], "signature": b64encode(signature),
                        "signature_file": written})


def _signature(args: argparse.Namespace) -> bytes:
    if args.signature is not None:
        return b64decode(args.signature, "--signature", limit=MAX_SIGNATURE)
    if args.signature_file == "-" and args.data == "-":
        raise UsageError("only one of --data and --signature-file can be stdin ('-')")
    return _read_input(args.signature_file, MAX_SIGNATURE, "signature file")


def cmd_key_verify(args: argparse.Namespace) -> int:
    signature = _signature(args)  # both inputs read (and checked) before connecting
    data = _data(args)
    result = _call(args, "verify", key_id=args.key_id, data=data, signature=signature)
    _emit(args, {"key_id": args.key_id, "valid": bool(result["valid"]),
                 "version": result["version"]})
    return EXIT_OK if result["valid"] else EXIT_REJECTED


def cmd_key_attest(args: argparse.Namespace) -> int:
    nonce = parse_hex(args.nonce, "nonce", 32)
    with _connect(args) as vsm:
        return _emit(args, admin.key_attestation(vsm.target, args.key_id, nonce))


def cmd_account_create(args: argparse.Namespace) -> int:
    result = _readable(_call(args, "account_create", name=args.name,
                             privileges=args.privilege))
    if args.psk_file is None:
        return _emit(args, result)
    path = Path(args.psk_file).absolute()
    atomic_write(path, (result.pop("psk") + "\n").encode())  # 0600
    return _emit(args, result | {"psk_file": str(path)})


def cmd_account_list(args: argparse.Namespace) -> int:
    listed = _readable(_call(args, "account_list"))
    if args.json:
        return _emit(args, listed)
    print(f"{'ACCOUNT':<20} {'ROOT':<4} {'ENABLED':<7} {'CREATED':<25} PRIVILEGES")
    for a in listed["accounts"]:
        print(f"{a['name']:<20} {'yes' if a['root'] else 'no':<4} "
              f"{'yes' if a['enabled'] else 'no':<7} {a['created']:<25} "
              f"{', '.join(a['privileges']) or '-'}")
    return EXIT_OK


def cmd_account_grant(args: argparse.Namespace) -> int:
    return _emit(args, _readable(_call(args, "account_grant", name=args.name,
                                       privileges=args.privileges)))


def cmd_account_revoke(args: argparse.Namespace) -> int:
    return _emit(args, _readable(_call(args, "account_revoke", name=args.name,
                                       privileges=args.privileges)))


def cmd_account_delete(args: argparse.Namespace) -> int:
    return _emit(args, _readable(_call(args, "account_delete", name=args.name)))


def cmd_account_certificate(args: argparse.Namespace) -> int:
    # The directory first: a certificate issued but not written would still be registered.
    directory = private_dir(Path(args.output).absolute()) if args.output is not None else None
    result = _readable(_call(args, "account_issue_certificate", name=args.name))
    if directory is None:
        return _emit(args, result)
    key = result.pop("private_key")
    files = {"certificate": _write_public(directory / f"{args.name}.crt",
                                          result["certificate"].encode()),
             "private_key": str(directory / f"{args.name}.key"),
             "ca_certificate": _write_public(directory / "ca.crt",
                                             result["ca_certificate"].encode())}
    atomic_write(directory / f"{args.name}.key", key.encode())  # 0600
    return _emit(args, result | {"files": files})
