"""Handlers for the TPM-facing commands: tpm, ek, quote, verify-quote, policy, eventlog, demo."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from attestation.endorsement import load_ca_bundle, validate_ek
from attestation.errors import EndorsementError, EvidenceFormatError, PolicyError, TpmError
from attestation.eventlog import EventLog, parse_event_log, replay
from attestation.evidence import Evidence
from attestation.policy import dump_policy, load_policy, policy_from_evidence
from attestation.registrar import PinnedAk
from attestation.tools_format import read_pcrs
from attestation.tpm import TpmClient
from attestation.tpm_types import DIGEST_SIZE, PcrSelection, parse_attest, parse_public
from attestation.verifier import QuoteVerifier
from testbed.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.managed import ManagedTpms
from testbed.output import emit, print_report
from testbed.quote_files import QuoteFiles, evidence_from_files, read_bounded, write_quote_files
from testbed.workdir import resolve_workdir


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
    return ManagedTpms(resolve_workdir(args.workdir)).tcti(args.tpm)


# --- tpm ------------------------------------------------------------------------------


def cmd_tpm_start(args: argparse.Namespace) -> int:
    tpm = ManagedTpms(resolve_workdir(args.workdir)).start(args.name)
    emit(args, {"name": tpm.name, "tcti": tpm.tcti, "pid": tpm.pid},
         lambda: print(f"{tpm.name}: running (pid {tpm.pid}), TCTI {tpm.tcti}"))
    return EXIT_OK


def cmd_tpm_stop(args: argparse.Namespace) -> int:
    managed = ManagedTpms(resolve_workdir(args.workdir))
    names = [t.name for t in managed.list()] if args.all else [args.name]
    for name in names:
        print(f"{name}: {'stopped' if managed.stop(name) else 'was not running'}")
    return EXIT_OK


def cmd_tpm_list(args: argparse.Namespace) -> int:
    tpms = ManagedTpms(resolve_workdir(args.workdir)).list()
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
    event_log = read_bounded(args.event_log) if args.event_log else None
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
        selection, pcrs = read_pcrs(read_bounded(args.source / "quote.pcrs"))
        bank = selection.bank
    else:
        selection = parse_pcr_list(args.pcr_list)
        with TpmClient(tcti_for(args)) as client:
            pcrs = client.read_pcrs(selection.bank, selection.indices)
        bank = selection.bank
    policy = policy_from_evidence(pcrs, log, name=args.name, bank=bank)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(dump_policy(policy))
    tmp.replace(args.output)
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
    return parse_event_log(read_bounded(path)) if path else None


# --- eventlog ---------------------------------------------------------------------------


def cmd_eventlog(args: argparse.Namespace) -> int:
    data = read_bounded(args.path) if args.path.stat().st_size else args.path.read_bytes()
    log = parse_event_log(data)
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


def cmd_demo(args: argparse.Namespace) -> int:
    workdir = resolve_workdir(args.workdir)
    if getattr(args, "backend", "sim") == "qemu":
        from testbed.qemu.demo import run_qemu_demo

        return run_qemu_demo(workdir, json_output=args.json, keep=args.keep)
    from testbed.demo import run_demo

    return run_demo(workdir, json_output=args.json)


__all__ = ["TpmError", "cmd_demo"]
