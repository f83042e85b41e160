"""``testbed tpm | ek | quote | verify-quote | policy | eventlog``: the TPM-facing commands,
in the manner of tpm2-tools (and interoperable with its files)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from attestation.endorsement import load_ca_bundle, validate_ek
from attestation.errors import EndorsementError, EvidenceFormatError, PolicyError
from attestation.eventlog import MAX_LOG_BYTES, EventLog, parse_event_log, replay
from attestation.evidence import Evidence
from attestation.files import atomic_write, read_bounded
from attestation.policy import dump_policy, load_policy, policy_from_evidence
from attestation.registrar import PinnedAk
from attestation.tools_format import read_pcrs
from attestation.tpm import TpmClient
from attestation.tpm_types import DIGEST_SIZE, PcrSelection, parse_attest, parse_public
from attestation.verifier import QuoteVerifier
from testbed.cli.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.cli.render import emit, print_report
from testbed.core.paths import resolve_workdir
from testbed.tpm.managed import ManagedTpms
from testbed.tpm.quote_files import (
    QuoteFiles,
    evidence_from_files,
    read_quote_file,
    write_quote_files,
)


def _add_tpm_selection(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TPM selection")
    group.add_argument("-T", "--tcti", help="TCTI to reach the TPM (NAME:CONF)")
    group.add_argument("--tpm", default="default", metavar="NAME",
                       help="managed swtpm to use when no TCTI is given (default: %(default)s)")


def register_tpm_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``tpm``, ``ek``, ``quote``, ``verify-quote``, ``policy`` and ``eventlog``."""
    tpm = sub.add_parser("tpm", help="manage named swtpm instances (start, stop, list)")
    tsub = tpm.add_subparsers(dest="tpm_command", metavar="ACTION", required=True)
    p = tsub.add_parser("start", help="provision (first time) and start a managed swtpm")
    p.add_argument("name", nargs="?", default="default")
    p.set_defaults(func=cmd_tpm_start)
    p = tsub.add_parser("stop", help="stop a managed swtpm")
    p.add_argument("name", nargs="?", default="default")
    p.add_argument("--all", action="store_true", help="stop every managed swtpm")
    p.set_defaults(func=cmd_tpm_stop)
    p = tsub.add_parser("list", help="list managed swtpm instances")
    p.set_defaults(func=cmd_tpm_list)

    p = sub.add_parser("ek", help="show the EK certificate and validate its chain")
    _add_tpm_selection(p)
    p.add_argument("-G", "--algorithm", choices=["rsa", "ecc"], default="rsa")
    p.add_argument("--ca-bundle", type=Path, metavar="PEM",
                   help="trusted EK CAs (default: the work directory's local CA)")
    p.set_defaults(func=cmd_ek)

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
    p.set_defaults(func=cmd_quote)

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
    p.set_defaults(func=cmd_verify_quote)

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
    p.set_defaults(func=cmd_policy_create)
    p = psub.add_parser("show", help="validate and print a policy")
    p.add_argument("path", type=Path)
    p.set_defaults(func=cmd_policy_show)

    p = sub.add_parser("eventlog", help="parse and replay a TCG crypto-agile event log")
    p.add_argument("path", type=Path,
                   help="e.g. /sys/kernel/security/tpm0/binary_bios_measurements")
    p.add_argument("-g", "--bank", default="sha256")
    p.set_defaults(func=cmd_eventlog)


def parse_pcr_list(spec: str) -> PcrSelection:
    """``sha256:0,1,4-7`` -> PcrSelection (tpm2-tools' -l syntax, one bank)."""
    bank, sep, pcrs = spec.partition(":")
    if not sep or bank not in DIGEST_SIZE:
        raise EvidenceFormatError(f"PCR list {spec!r}: expected BANK:PCRS with BANK one of "
                                  f"{', '.join(DIGEST_SIZE)}, e.g. sha256:0-7")
    indices: set[int] = set()
    try:
        for part in pcrs.split(","):
            low, _, high = part.partition("-")
            indices.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise EvidenceFormatError(f"PCR list {spec!r}: {pcrs!r} is not like 0,1,4-7") from None
    if not indices or min(indices) < 0 or max(indices) > 23:
        raise EvidenceFormatError(f"PCR list {spec!r}: PCR indices must be within 0-23")
    return PcrSelection(bank, tuple(sorted(indices)))


def parse_hex(value: str, what: str, limit: int = 32) -> bytes:
    try:
        data = bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise EvidenceFormatError(f"{what} {value!r} is not hexadecimal") from None
    if len(data) > limit:
        raise EvidenceFormatError(f"{what} is {len(data)} bytes; at most {limit} are allowed")
    return data


def tcti_for(args: argparse.Namespace) -> str:
    if args.tcti:
        return str(args.tcti)
    if os.environ.get("TESTBED_TCTI"):
        return os.environ["TESTBED_TCTI"]
    return ManagedTpms(resolve_workdir(args.workdir, create=False)).tcti(args.tpm)


# --- tpm ------------------------------------------------------------------------------


def cmd_tpm_start(args: argparse.Namespace) -> int:
    tpm = ManagedTpms(resolve_workdir(args.workdir)).start(args.name)
    emit(args, {"name": tpm.name, "tcti": tpm.tcti, "pid": tpm.pid},
         lambda: print(f"{tpm.name}: running (pid {tpm.pid}), TCTI {tpm.tcti}"))
    return EXIT_OK


def cmd_tpm_stop(args: argparse.Namespace) -> int:
    managed = ManagedTpms(resolve_workdir(args.workdir, create=False))
    names = [t.name for t in managed.list()] if args.all else [args.name]
    for name in names:
        print(f"{name}: {'stopped' if managed.stop(name) else 'was not running'}")
    return EXIT_OK


def cmd_tpm_list(args: argparse.Namespace) -> int:
    tpms = ManagedTpms(resolve_workdir(args.workdir, create=False)).list()
    rows = [{"name": t.name, "running": t.running, "pid": t.pid, "tcti": t.tcti or None}
            for t in tpms]

    def human() -> None:
        print(f"{'NAME':<16} {'STATE':<8} {'PID':>7}  TCTI")
        for r in rows:
            state = "running" if r["running"] else "stopped"
            print(f"{r['name']!s:<16} {state:<8} {r['pid'] or '-'!s:>7}  {r['tcti'] or '-'}")

    emit(args, rows, human)
    return EXIT_OK


# --- ek --------------------------------------------------------------------------------


def cmd_ek(args: argparse.Namespace) -> int:
    if args.ca_bundle:
        bundle, source = load_ca_bundle(args.ca_bundle), str(args.ca_bundle)
    else:
        ca = ManagedTpms(resolve_workdir(args.workdir)).ca()
        bundle, source = ca.ca_bundle(), f"the local CA in {ca.directory}"
    with TpmClient(tcti_for(args)) as client:
        ek = client.endorsement_key(args.algorithm)
    if ek.certificate is None:
        raise EndorsementError(f"the TPM has no {args.algorithm.upper()} EK certificate in NV")
    validated = validate_ek(ek.certificate, parse_public(ek.public), bundle)
    data = {"algorithm": args.algorithm, "valid": True, "chain": list(validated.chain_subjects),
            "certificate_sha256": validated.fingerprint,
            "ek_name": parse_public(ek.public).name.hex()}

    def human() -> None:
        print(f"{args.algorithm.upper()} EK certificate: valid, chains to {source}")
        for depth, subject in enumerate(validated.chain_subjects):
            print(f"  {'  ' * depth}{subject}")
        print(f"  certificate sha256: {validated.fingerprint}")

    emit(args, data, human)
    return EXIT_OK


# --- quote -------------------------------------------------------------------------------


def cmd_quote(args: argparse.Namespace) -> int:
    selection = parse_pcr_list(args.pcr_list)
    nonce = (parse_hex(args.qualification, "qualifying data") if args.qualification
             else os.urandom(32))
    event_log = read_bounded(args.event_log, MAX_LOG_BYTES, what="event log") \
        if args.event_log else None
    with TpmClient(tcti_for(args)) as client:
        ak = client.attestation_key(args.ak_algorithm)
        try:
            quote = client.quote(ak, selection, nonce)
        finally:
            client.flush(ak)
    evidence = Evidence(attest=quote.attest, signature=quote.signature, ak_public=ak.public,
                        pcr_bank=selection.bank, pcrs=quote.pcrs, event_log=event_log)
    files = write_quote_files(args.output, evidence)
    clock = parse_attest(quote.attest).clock_info
    data = {"nonce": nonce.hex(), "pcrs": {str(i): v.hex() for i, v in quote.pcrs.items()},
            "files": [str(f) for f in files], "clock": clock.clock,
            "reset_count": clock.reset_count, "restart_count": clock.restart_count}

    def human() -> None:
        print(f"quoted {selection.bank} PCRs {','.join(map(str, selection.indices))} "
              f"with nonce {nonce.hex()}")
        for f in files:
            print(f"  wrote {f}")

    emit(args, data, human)
    return EXIT_OK


def cmd_verify_quote(args: argparse.Namespace) -> int:
    base = QuoteFiles.in_directory(args.directory or Path("."))
    files = QuoteFiles(args.message or base.message, args.signature or base.signature,
                       args.pcr or base.pcrs, args.public or base.ak)
    evidence, bare = evidence_from_files(files, args.event_log)
    ak = parse_public(evidence.ak_public)
    trust = PinnedAk([ak.public_key()], f"AK given in {files.ak}", bare_key=bare)
    policy = load_policy(args.policy) if args.policy else None
    report = QuoteVerifier(ak_trust=trust, policy=policy).verify(
        evidence, parse_hex(args.nonce, "nonce", 64))
    emit(args, report.to_dict(), lambda: print_report(report, f"quote {files.message}"))
    return EXIT_OK if report.ok else EXIT_REJECTED


# --- policy -----------------------------------------------------------------------------


def cmd_policy_create(args: argparse.Namespace) -> int:
    log = _load_log(args.event_log)
    if args.source is not None:
        selection, pcrs = read_pcrs(read_quote_file(args.source / "quote.pcrs"))
        bank = selection.bank
    else:
        selection = parse_pcr_list(args.pcr_list)
        with TpmClient(tcti_for(args)) as client:
            pcrs = client.read_pcrs(selection.bank, selection.indices)
        bank = selection.bank
    policy = policy_from_evidence(pcrs, log, name=args.name, bank=bank)
    atomic_write(args.output, dump_policy(policy).encode(), mode=0o644)
    print(f"wrote policy {policy.name!r} to {args.output}: {len(policy.pcrs)} PCR values, "
          f"{len(policy.events)} expected events")
    return EXIT_OK


def cmd_policy_show(args: argparse.Namespace) -> int:
    policy = load_policy(args.path)
    data = {"name": policy.name, "bank": policy.bank,
            "pcrs": {str(i): v.hex() for i, v in policy.pcrs.items()},
            "events": [{"pcr": e.pcr, "digest": e.digest.hex(), "label": e.label}
                       for e in policy.events]}
    emit(args, data, lambda: print(dump_policy(policy), end=""))
    return EXIT_OK


def _load_log(path: Path | None) -> EventLog | None:
    return parse_event_log(read_bounded(path, MAX_LOG_BYTES, what="event log")) if path else None


# --- eventlog ---------------------------------------------------------------------------


def cmd_eventlog(args: argparse.Namespace) -> int:
    log = parse_event_log(read_bounded(args.path, MAX_LOG_BYTES, what="event log"))
    if args.bank not in log.spec_id.banks:
        raise PolicyError(f"the log has no {args.bank} digests (it has "
                          f"{', '.join(log.spec_id.banks)})")
    pcrs = replay(log, args.bank)
    out = {"events": [{"number": e.number, "pcr": e.pcr, "type": e.type_name,
                       "digest": e.digests.get(args.bank, b"").hex(),
                       "description": e.description} for e in log.events],
           "pcrs": {args.bank: {str(i): v.hex() for i, v in sorted(pcrs.items())}}}

    def human() -> None:
        for e in log.events:
            print(f"#{e.number:<4} PCR {e.pcr:<2} {e.type_name:<36} "
                  f"{e.digests.get(args.bank, b'').hex()[:16]}  {e.description}")
        print(f"replayed {args.bank} PCRs:")
        for i, v in sorted(pcrs.items()):
            print(f"  {i:>2}: {v.hex()}")

    emit(args, out, human)
    return EXIT_OK
