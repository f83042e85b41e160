"""``testbed tpm | ek | quote | verify-quote | policy | eventlog``: the TPM-facing commands,
in the manner of tpm2-tools (and interoperable with its files).

Every argument is checked before the TPM is contacted, so a bad value exits 3 even
when no TPM runs; outputs are written only where asked (``-o``), never over an earlier
result without ``--force``; JSON carries full values (digests, PEM, ISO 8601 UTC times).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from attestation.endorsement import ValidatedEk, load_ca_bundle, validate_ek
from attestation.errors import EndorsementError, PolicyError
from attestation.eventlog import (
    MAX_LOG_BYTES,
    EventLog,
    compare_with_pcrs,
    parse_event_log,
    replay,
)
from attestation.evidence import MAX_EVIDENCE_BYTES, Evidence
from attestation.files import atomic_write, read_bounded
from attestation.policy import ReferencePolicy, dump_policy, load_policy, policy_from_evidence
from attestation.registrar import PinnedAk
from attestation.tools_format import read_pcrs
from attestation.tpm import TpmClient
from attestation.tpm_types import DIGEST_SIZE, PcrSelection, parse_attest, parse_public
from attestation.verifier import QuoteVerifier
from testbed.cli.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.cli.render import emit, print_report, verdict
from testbed.core.clock import iso_utc, utc_now
from testbed.core.errors import ArgumentError, UsageError
from testbed.core.paths import resolve_workdir
from testbed.tpm.managed import ManagedTpms
from testbed.tpm.pcr_banks import require_bank
from testbed.tpm.quote_files import (
    EVIDENCE_FILE,
    PUBLIC_MODE,
    QuoteFiles,
    check_output_file,
    check_quote_directory,
    evidence_from_files,
    load_ak,
    read_evidence,
    read_quote_file,
    write_quote_files,
)

MAX_NONCE = 64  # TPM2B_DATA holds a TPMT_HA; TpmClient.quote allows 64 bytes
# An event log embedded in evidence.json is base64 (4/3) inside a bounded document.
MAX_EMBEDDED_LOG = (MAX_EVIDENCE_BYTES - (64 << 10)) * 3 // 4
DEFAULT_PCRS = "sha256:0-7"


# --- arguments ---------------------------------------------------------------------------


def _hidden_alias(parser: argparse.ArgumentParser, flag: str, dest: str) -> None:
    """An old spelling still accepted, not shown: one flag name per concept in --help."""
    parser.add_argument(flag, dest=dest, default=None, help=argparse.SUPPRESS)


def _add_tpm_selection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TPM selection")
    group.add_argument("-T", "--tcti", help="TCTI to reach the TPM (NAME:CONF)")
    group.add_argument("--tpm", default="default", metavar="NAME",
                       help="managed swtpm to use when no TCTI is given (default: %(default)s)")


def _add_pcrs(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("-l", "--pcrs", default=None, metavar="BANK:PCRS", help=help_text)
    _hidden_alias(parser, "--pcr-list", "pcrs")


def _add_output(parser: argparse.ArgumentParser, metavar: str, help_text: str) -> None:
    parser.add_argument("-o", "--output", type=Path, metavar=metavar, help=help_text)
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing output files")


def _register_tpm(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tpm = sub.add_parser("tpm", help="manage named swtpm instances (start, stop, list)")
    tsub = tpm.add_subparsers(dest="tpm_command", metavar="ACTION", required=True)
    p = tsub.add_parser("start", help="provision (first time) and start a managed swtpm")
    p.add_argument("name", nargs="?", default="default")
    p.set_defaults(func=cmd_tpm_start)
    p = tsub.add_parser("stop", help="stop a managed swtpm")
    p.add_argument("name", nargs="?", default=None)
    p.add_argument("--all", action="store_true", help="stop every managed swtpm")
    p.set_defaults(func=cmd_tpm_stop)
    p = tsub.add_parser("list", help="list managed swtpm instances")
    p.set_defaults(func=cmd_tpm_list)


def _register_ek(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ek", help="print the EK certificate (PEM) after validating its chain")
    _add_tpm_selection(p)
    p.add_argument("-G", "--algorithm", choices=["rsa", "ecc"], default="rsa")
    p.add_argument("--ca-bundle", type=Path, metavar="PEM",
                   help="trusted EK CAs (default: the work directory's local CA)")
    _add_output(p, "FILE", "write the certificate (PEM) to FILE instead of stdout")
    p.set_defaults(func=cmd_ek)


def _register_quote(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("quote", help="quote PCRs: evidence JSON on stdout, or tpm2-tools "
                                     "files and evidence.json in -o DIR")
    _add_tpm_selection(p)
    _add_pcrs(p, f"PCR selection, e.g. sha256:0,1,2,4-7 (default: {DEFAULT_PCRS})")
    p.add_argument("-q", "--nonce", metavar="HEX",
                   help=f"qualifying data, up to {MAX_NONCE} bytes hex (default: random)")
    _hidden_alias(p, "--qualification", "nonce")
    p.add_argument("-G", "--ak-algorithm", choices=["ecc", "rsa"], default="ecc")
    p.add_argument("--event-log", type=Path, metavar="FILE",
                   help="this machine's event log, to embed in the evidence; refused "
                        "unless it replays to the quoted PCRs")
    _add_output(p, "DIR", "write quote.msg, quote.sig, quote.pcrs, ak.pem, ak.pub "
                          "(TPM2B_PUBLIC) and evidence.json into DIR")
    p.set_defaults(func=cmd_quote)


def _register_verify_quote(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("verify-quote", help="verify a quote (evidence.json, or tpm2_quote's "
                                            "files)")
    p.add_argument("directory", nargs="?", type=Path, metavar="DIR|FILE",
                   help="evidence.json, or a directory holding it or quote.msg, quote.sig, "
                        "quote.pcrs and ak.pub/ak.pem (default: .)")
    p.add_argument("-m", "--message", type=Path, help="TPMS_ATTEST file (quote.msg)")
    p.add_argument("-s", "--signature", type=Path, help="TPMT_SIGNATURE file (quote.sig)")
    p.add_argument("-f", "--pcr-file", type=Path, help="serialized PCR file (quote.pcrs)")
    _hidden_alias(p, "--pcr", "pcr_file")
    p.add_argument("-u", "--public", type=Path,
                   help="the AK to trust: PEM, TPM2B_PUBLIC or TPMT_PUBLIC")
    p.add_argument("-q", "--nonce", metavar="HEX",
                   help="the nonce the quote must carry (required)")
    _hidden_alias(p, "--qualification", "nonce")
    p.add_argument("--policy", type=Path, metavar="YAML", help="reference policy to enforce")
    p.add_argument("--event-log", type=Path, metavar="FILE",
                   help="event log to replay against the quoted PCRs (replaces the "
                        "evidence's own)")
    p.set_defaults(func=cmd_verify_quote)


def _register_policy(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pol = sub.add_parser("policy", help="reference policies (create from a known-good node)")
    psub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    p = psub.add_parser("create", help="create a policy from a quote or a live TPM")
    p.add_argument("--from", dest="source", type=Path, metavar="DIR|FILE",
                   help="a quote written by `testbed quote` (evidence.json, or quote.pcrs)")
    _add_tpm_selection(p)
    _add_pcrs(p, f"PCRs to pin (default: all quoted, or {DEFAULT_PCRS} from a live TPM)")
    p.add_argument("--event-log", type=Path, metavar="FILE",
                   help="event log whose events become expected events (default: the "
                        "one in evidence.json, if any)")
    p.add_argument("--name", required=True, help="policy name")
    _add_output(p, "YAML", "the policy file to write")
    p.set_defaults(func=cmd_policy_create)
    p = psub.add_parser("show", help="validate and print a policy")
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_policy_show)


def _register_eventlog(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eventlog", help="parse and replay a TCG crypto-agile event log")
    p.add_argument("path", type=Path,
                   help="e.g. /sys/kernel/security/tpm0/binary_bios_measurements")
    p.add_argument("-g", "--bank", default="sha256")
    p.set_defaults(func=cmd_eventlog)


def register_tpm_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tpm``, ``ek``, ``quote``, ``verify-quote``, ``policy`` and ``eventlog``."""
    for register in (_register_tpm, _register_ek, _register_quote, _register_verify_quote,
                     _register_policy, _register_eventlog):
        register(sub)


_PCR_PART = re.compile(r"(\d{1,2})(?:-(\d{1,2}))?")


def parse_pcr_list(spec: str) -> PcrSelection:
    """``sha256:0,1,4-7`` -> PcrSelection (tpm2-tools' -l syntax, one bank)."""
    bank, sep, pcrs = spec.partition(":")
    if not sep or bank not in DIGEST_SIZE:
        raise ArgumentError(f"PCR selection {spec!r}: expected BANK:PCRS with BANK one of "
                            f"{', '.join(DIGEST_SIZE)}, e.g. -l sha256:0-7 (one bank)")
    indices: set[int] = set()
    for part in pcrs.split(","):
        match = _PCR_PART.fullmatch(part)
        low, high = (int(match[1]), int(match[2] or match[1])) if match else (0, -1)
        if not match or low > high or high > 23:
            raise ArgumentError(f"PCR selection {spec!r}: {part!r} is not a PCR or range of "
                                "PCRs within 0-23 (e.g. sha256:0,1,4-7)")
        indices.update(range(low, high + 1))
    return PcrSelection(bank, tuple(sorted(indices)))


def parse_hex(value: str, what: str, limit: int = 32) -> bytes:
    try:
        data = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise ArgumentError(f"{what} {value!r} is not hexadecimal (e.g. -q 00112233)") from None
    if len(data) > limit:
        raise ArgumentError(f"{what} is {len(data)} bytes; at most {limit} are allowed")
    return data


def tcti_for(args: argparse.Namespace) -> str:
    if args.tcti:
        return str(args.tcti)
    if os.environ.get("TESTBED_TCTI"):
        return os.environ["TESTBED_TCTI"]
    return ManagedTpms(resolve_workdir(args.workdir, create=False)).tcti(args.tpm)


def _hex_map(pcrs: dict[int, bytes]) -> dict[str, str]:
    return {str(i): v.hex() for i, v in sorted(pcrs.items())}


def _read_log_bytes(path: Path, limit: int = MAX_LOG_BYTES) -> bytes:
    return read_bounded(path, limit, what="event log")


# --- tpm ---------------------------------------------------------------------------------


def cmd_tpm_start(args: argparse.Namespace) -> int:
    managed = ManagedTpms(resolve_workdir(args.workdir))
    before = managed.get(args.name)
    tpm = managed.start(args.name)
    started = before is None or not before.running
    data = {"name": tpm.name, "tcti": tpm.tcti, "pid": tpm.pid, "started": started,
            "provisioned": before is None, "state_dir": str(tpm.state_dir),
            "ca_dir": str(managed.workdir / "ca")}
    state = "started" if started else "already running"
    emit(args, data, lambda: print(f"{tpm.name}: {state} (pid {tpm.pid}), TCTI {tpm.tcti}"))
    return EXIT_OK


def cmd_tpm_stop(args: argparse.Namespace) -> int:
    if args.all and args.name is not None:
        raise UsageError("give a TPM name or --all, not both")
    managed = ManagedTpms(resolve_workdir(args.workdir, create=False))
    names = [t.name for t in managed.list()] if args.all else [args.name or "default"]
    stopped = {name: managed.stop(name) for name in names}
    data = {"stopped": [n for n, s in stopped.items() if s],
            "not_running": [n for n, s in stopped.items() if not s]}

    def human() -> None:
        for name, was in stopped.items():
            print(f"{name}: {'stopped' if was else 'was not running'}")

    emit(args, data, human)
    return EXIT_OK


def cmd_tpm_list(args: argparse.Namespace) -> int:
    tpms = ManagedTpms(resolve_workdir(args.workdir, create=False)).list()
    rows = [{"name": t.name, "running": t.running, "pid": t.pid, "tcti": t.tcti or None,
             "state_dir": str(t.state_dir)} for t in tpms]

    def human() -> None:
        print(f"{'NAME':<16} {'STATE':<8} {'PID':>7}  TCTI")
        for r in rows:
            state = "running" if r["running"] else "stopped"
            print(f"{r['name']!s:<16} {state:<8} {r['pid'] or '-'!s:>7}  {r['tcti'] or '-'}")

    emit(args, rows, human)
    return EXIT_OK


# --- ek ----------------------------------------------------------------------------------


def cmd_ek(args: argparse.Namespace) -> int:
    if args.output is not None:
        check_output_file(args.output, force=args.force)
    if args.ca_bundle:
        bundle, source = load_ca_bundle(args.ca_bundle), str(args.ca_bundle)
    else:
        ca = ManagedTpms(resolve_workdir(args.workdir, create=False)).existing_ca()
        bundle, source = ca.ca_bundle(), f"the local CA in {ca.directory}"
    with TpmClient(tcti_for(args)) as client:
        ek = client.endorsement_key(args.algorithm)
    if ek.certificate is None:
        raise EndorsementError(f"the TPM has no {args.algorithm.upper()} EK certificate in NV")
    validated = validate_ek(ek.certificate, parse_public(ek.public), bundle)
    pem = validated.certificate.public_bytes(serialization.Encoding.PEM)
    if args.output is not None:
        atomic_write(args.output, pem, mode=PUBLIC_MODE)
    data = _ek_data(args, validated, pem, source)
    emit(args, data, lambda: _print_ek(args, validated, pem, source))
    return EXIT_OK


def _ek_data(args: argparse.Namespace, validated: ValidatedEk, pem: bytes,
             source: str) -> dict[str, Any]:
    cert = validated.certificate
    return {"algorithm": args.algorithm, "valid": True, "trusted_by": source,
            "chain": list(validated.chain_subjects),
            "certificate_sha256": validated.fingerprint, "ek_name": validated.public.name.hex(),
            "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
            "serial_number": format(cert.serial_number, "x"),
            "not_before": iso_utc(cert.not_valid_before_utc.timestamp()),
            "not_after": iso_utc(cert.not_valid_after_utc.timestamp()),
            "certificate_pem": pem.decode(),
            "output": None if args.output is None else str(args.output)}


def _print_ek(args: argparse.Namespace, validated: ValidatedEk, pem: bytes,
              source: str) -> None:
    # Without -o the PEM is the output (`testbed ek > ek.pem`); the check goes to stderr.
    out = sys.stdout if args.output is not None else sys.stderr
    print(f"{args.algorithm.upper()} EK certificate: valid, chains to {source}", file=out)
    for depth, subject in enumerate(validated.chain_subjects):
        print(f"  {'  ' * depth}{subject}", file=out)
    print(f"  certificate sha256: {validated.fingerprint}", file=out)
    if args.output is None:
        sys.stdout.write(pem.decode())
    else:
        print(f"wrote {args.output}")


# --- quote -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuoteRequest:
    """A quote's arguments, all checked before the TPM is contacted."""

    selection: PcrSelection
    nonce: bytes
    event_log: bytes | None
    log: EventLog | None
    output: Path | None


def _quote_request(args: argparse.Namespace) -> QuoteRequest:
    selection = parse_pcr_list(args.pcrs or DEFAULT_PCRS)
    if args.nonce is not None and not args.nonce.removeprefix("0x"):
        raise ArgumentError("-q: the nonce is empty; give hex digits, or leave out -q for a "
                            "random one")
    nonce = parse_hex(args.nonce, "nonce", MAX_NONCE) if args.nonce else os.urandom(32)
    raw_log = _read_log_bytes(args.event_log, MAX_EMBEDDED_LOG) if args.event_log else None
    log = parse_event_log(raw_log) if raw_log is not None else None
    if log is not None and selection.bank not in log.spec_id.banks:
        raise ArgumentError(f"--event-log {args.event_log} has no {selection.bank} digests "
                            f"(it has {', '.join(log.spec_id.banks)}); quote a bank it has")
    if args.output is not None:
        check_quote_directory(args.output, force=args.force)
    return QuoteRequest(selection, nonce, raw_log, log, args.output)


def _check_log_replays(args: argparse.Namespace, request: QuoteRequest,
                       pcrs: dict[int, bytes]) -> None:
    """Embed a log only if it explains the quoted PCRs: else it is some other machine's."""
    if request.log is None:
        return
    mismatches = compare_with_pcrs(request.log, pcrs, request.selection.bank)
    if mismatches:
        first = mismatches[0]
        more = f" (and {len(mismatches) - 1} more PCRs)" if len(mismatches) > 1 else ""
        raise ArgumentError(
            f"--event-log {args.event_log} does not replay to the quoted PCRs: PCR "
            f"{first.pcr} replays to {first.expected_from_log.hex()} but the TPM has "
            f"{first.quoted.hex()}{more}; give this TPM's own event log, or leave it out")


def cmd_quote(args: argparse.Namespace) -> int:
    request = _quote_request(args)
    with TpmClient(tcti_for(args)) as client:
        require_bank(client, request.selection)
        ak = client.attestation_key(args.ak_algorithm)
        try:
            quote = client.quote(ak, request.selection, request.nonce)
        finally:
            client.flush(ak)
    quoted_at = utc_now()
    _check_log_replays(args, request, quote.pcrs)
    evidence = Evidence(attest=quote.attest, signature=quote.signature, ak_public=ak.public,
                        pcr_bank=request.selection.bank, pcrs=quote.pcrs,
                        event_log=request.event_log)
    files = write_quote_files(request.output, evidence) if request.output else []
    data = _quote_data(args, request, evidence, files, quoted_at)
    emit(args, data, lambda: _print_quote(request, evidence, files))
    return EXIT_OK


def _quote_data(args: argparse.Namespace, request: QuoteRequest, evidence: Evidence,
                files: list[Path], quoted_at: str) -> dict[str, Any]:
    clock = parse_attest(evidence.attest).clock_info
    return {"nonce": request.nonce.hex(), "bank": request.selection.bank,
            "pcrs": _hex_map(evidence.pcrs), "ak_algorithm": args.ak_algorithm,
            "quoted_at": quoted_at, "clock_ms": clock.clock,
            "reset_count": clock.reset_count, "restart_count": clock.restart_count,
            "event_log": None if args.event_log is None else str(args.event_log),
            "output": None if request.output is None else str(request.output),
            "files": [str(f) for f in files], "evidence": evidence.to_dict()}


def _print_quote(request: QuoteRequest, evidence: Evidence, files: list[Path]) -> None:
    selection = request.selection
    summary = (f"quoted {selection.bank} PCRs {','.join(map(str, selection.indices))} "
               f"with nonce {request.nonce.hex()}")
    if not files:  # no -o: the evidence itself is the output (`testbed quote > ev.json`)
        sys.stdout.write(evidence.to_json().decode() + "\n")
        print(summary, file=sys.stderr)
        return
    print(summary)
    for f in files:
        print(f"  wrote {f}")


# --- verify-quote ------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedQuote:
    evidence: Evidence
    trust: PinnedAk
    source: Path


def _load_quote(args: argparse.Namespace) -> LoadedQuote:
    """evidence.json (a file, or in DIR) unless tpm2-tools files are named; then the
    --event-log and -u overrides."""
    path: Path = args.directory or Path(".")
    tools_files = any(x is not None for x in (args.message, args.signature, args.pcr_file))
    if not path.is_dir() and tools_files:
        raise UsageError(f"{path} is not a directory: -m/-s/-f name quote files in one")
    json_path = path / EVIDENCE_FILE if path.is_dir() else path
    if not tools_files and (json_path.exists() or json_path == path):  # a FIFO: refused
        evidence, bare, source = read_evidence(json_path), False, json_path
    else:
        base = QuoteFiles.in_directory(path)
        files = QuoteFiles(args.message or base.message, args.signature or base.signature,
                           args.pcr_file or base.pcrs, args.public or base.ak)
        evidence, bare = evidence_from_files(files)
        source = files.message
    if args.event_log is not None:
        evidence = replace(evidence, event_log=_read_log_bytes(args.event_log))
    if args.public is not None:
        ak_public, bare_given = load_ak(args.public)
        label, bare = f"AK given in {args.public}", bare and bare_given
    else:
        ak_public, label = evidence.ak_public, f"AK in {source}"
    trust = PinnedAk([parse_public(ak_public).public_key()], label, bare_key=bare)
    return LoadedQuote(evidence, trust, source)


def cmd_verify_quote(args: argparse.Namespace) -> int:
    if args.nonce is None:  # not argparse-required: the hidden --qualification counts too
        raise UsageError("verify-quote needs -q/--nonce HEX: the nonce the quote must carry")
    nonce = parse_hex(args.nonce, "nonce", MAX_NONCE)
    policy = load_policy(args.policy) if args.policy else None
    quote = _load_quote(args)
    report = QuoteVerifier(ak_trust=quote.trust, policy=policy).verify(quote.evidence, nonce)
    data = {**report.to_dict(), "verdict": verdict(report), "source": str(quote.source),
            "nonce": nonce.hex(), "policy": None if policy is None else policy.name,
            "event_log_supplied": quote.evidence.event_log is not None, "verified_at": utc_now()}
    emit(args, data, lambda: print_report(report, f"quote {quote.source}"))
    return EXIT_OK if report.ok else EXIT_REJECTED


# --- policy ------------------------------------------------------------------------------


def _check_policy_name(name: str) -> None:
    """Validate the name as a policy would, before any work (a bad name is exit 3)."""
    ReferencePolicy(name, "sha256", {0: bytes(32)})


def _subset(pcrs: dict[int, bytes], bank: str, wanted: PcrSelection | None,
            where: str) -> dict[int, bytes]:
    """The PCRs -l asks for, out of those a quote holds; all of them without -l."""
    if wanted is None:
        return pcrs
    if wanted.bank != bank:
        raise ArgumentError(f"-l {wanted.bank}: the quote in {where} is of the {bank} bank")
    missing = sorted(set(wanted.indices) - pcrs.keys())
    if missing:
        raise ArgumentError(f"-l: PCR {','.join(map(str, missing))} not in the quote in "
                            f"{where} (it has {','.join(map(str, sorted(pcrs)))})")
    return {i: pcrs[i] for i in wanted.indices}


def _pcrs_from_quote(source: Path, wanted: PcrSelection | None,
                     ) -> tuple[str, dict[int, bytes], bytes | None]:
    """Bank, PCRs and embedded event log of a quote that `testbed quote` wrote."""
    json_path = source / EVIDENCE_FILE if source.is_dir() else source
    if json_path.exists() or json_path == source:  # a FIFO or a missing file: refused
        evidence = read_evidence(json_path)
        bank, pcrs, log = evidence.pcr_bank, evidence.pcrs, evidence.event_log
    else:
        selection, pcrs = read_pcrs(read_quote_file(source / "quote.pcrs"))
        bank, log = selection.bank, None
    return bank, _subset(pcrs, bank, wanted, str(source)), log


def cmd_policy_create(args: argparse.Namespace) -> int:
    _check_policy_name(args.name)
    if args.output is None:
        raise UsageError("policy create needs -o FILE: where to write the policy")
    check_output_file(args.output, force=args.force)
    wanted = parse_pcr_list(args.pcrs) if args.pcrs else None
    raw_log = _read_log_bytes(args.event_log) if args.event_log else None
    if args.source is not None:
        bank, pcrs, embedded = _pcrs_from_quote(args.source, wanted)
        raw_log = raw_log if raw_log is not None else embedded
        origin = str(args.source)
    else:
        selection = wanted or parse_pcr_list(DEFAULT_PCRS)
        with TpmClient(tcti_for(args)) as client:
            require_bank(client, selection)
            pcrs = client.read_pcrs(selection.bank, selection.indices)
        bank, origin = selection.bank, f"the TPM at {client.tcti}"
    log = parse_event_log(raw_log) if raw_log is not None else None
    policy = policy_from_evidence(pcrs, log, name=args.name, bank=bank)
    atomic_write(args.output, dump_policy(policy).encode(), mode=PUBLIC_MODE)
    data = {"created": str(args.output), "from": origin, **_policy_data(policy)}
    emit(args, data, lambda: print(
        f"wrote policy {policy.name!r} to {args.output}: {bank} PCRs "
        f"{','.join(map(str, policy.pcrs))}, {len(policy.events)} expected events"))
    return EXIT_OK


def _policy_data(policy: ReferencePolicy) -> dict[str, Any]:
    return {"name": policy.name, "bank": policy.bank, "pcrs": _hex_map(policy.pcrs),
            "events": [{"pcr": e.pcr, "type": e.type_name, "digest": e.digest.hex(),
                        "label": e.label} for e in policy.events]}


def cmd_policy_show(args: argparse.Namespace) -> int:
    policy = load_policy(args.path)
    emit(args, {"file": str(args.path), **_policy_data(policy)},
         lambda: print(dump_policy(policy), end=""))
    return EXIT_OK


# --- eventlog ----------------------------------------------------------------------------


def cmd_eventlog(args: argparse.Namespace) -> int:
    if args.bank not in DIGEST_SIZE:
        raise ArgumentError(f"-g {args.bank}: not a bank (one of {', '.join(DIGEST_SIZE)})")
    log = parse_event_log(_read_log_bytes(args.path))
    if args.bank not in log.spec_id.banks:
        raise PolicyError(f"the log has no {args.bank} digests (it has "
                          f"{', '.join(log.spec_id.banks)}); choose one with -g")
    pcrs = replay(log, args.bank)
    out = {"file": str(args.path), "bank": args.bank,
           "events": [{"number": e.number, "pcr": e.pcr, "type": e.type_name,
                       "digest": e.digests.get(args.bank, b"").hex(),
                       "description": e.description} for e in log.events],
           "pcrs": {args.bank: _hex_map(pcrs)}}

    def human() -> None:
        for e in log.events:
            print(f"#{e.number:<4} PCR {e.pcr:<2} {e.type_name:<36} "
                  f"{e.digests.get(args.bank, b'').hex()[:16]}  {e.description}")
        print(f"replayed {args.bank} PCRs:")
        for i, v in sorted(pcrs.items()):
            print(f"  {i:>2}: {v.hex()}")

    emit(args, out, human)
    return EXIT_OK
