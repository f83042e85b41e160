"""The verifier: pure Python + ``cryptography``, no TPM needed.

Every step is a named check (see :mod:`attestation.report`):

structure, ak_attributes, ak_trust, signature_algorithm, signature, magic,
attestation_type, qualifying_data, pcr_selection, pcr_digest, clock, event_log,
policy -- and, for TPM2_Certify, certified_name and key_attributes.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from attestation.cache import BoundedCache
from attestation.errors import EventLogError, VerificationError
from attestation.eventlog import (
    CACHED_LOG_BYTES,
    CACHED_LOGS,
    EventLog,
    PcrMismatch,
    compare_with_pcrs,
    parse_event_log_cached,
)
from attestation.evidence import Evidence, KeyCertification
from attestation.policy import (
    EventCountMismatch,
    EventMismatch,
    PolicyMismatch,
    ReferencePolicy,
    evaluate_policy,
)
from attestation.registrar import AkTrust, PinnedAk, check_ak_attributes
from attestation.report import Check, CheckSkipped, VerificationReport, run_checks
from attestation.tpm_types import (
    TPM_GENERATED_VALUE,
    Alg,
    Attest,
    CertifyInfo,
    ClockInfo,
    ObjectAttributes,
    PublicArea,
    QuoteInfo,
    Signature,
    StructureTag,
    parse_attest,
    parse_public,
    parse_public_cached,
    parse_signature,
)

ALLOWED_HASHES = frozenset({"sha256", "sha384", "sha512"})
_HASHES: dict[str, hashes.HashAlgorithm] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(), "sha512": hashes.SHA512(),
}
TPM_KEY_REQUIRED = (ObjectAttributes.FIXED_TPM | ObjectAttributes.FIXED_PARENT
                    | ObjectAttributes.SENSITIVE_DATA_ORIGIN)


# --- clock, reset and restart monotonicity ------------------------------------------


@dataclass(frozen=True)
class ClockState:
    clock: int
    reset_count: int
    restart_count: int
    attest_digest: bytes


class ClockHistory:
    """The last accepted clock state per AK: detects replays, rollbacks and reboots.

    Only the AK's endorsement-hierarchy counters are comparable (other hierarchies
    obfuscate them), which is why the attester's AK lives there.
    """

    def __init__(self) -> None:
        self._last: dict[bytes, ClockState] = {}
        self._lock = threading.Lock()

    def check(self, ak_name: bytes, info: ClockInfo, attest: bytes) -> str:
        with self._lock:
            last = self._last.get(ak_name)
        digest = hashlib.sha256(attest).digest()
        if last is None:
            return f"first quote of this AK (clock {info.clock} ms, resets {info.reset_count})"
        if hmac.compare_digest(last.attest_digest, digest):
            raise VerificationError("clock", "this exact quote was already accepted (replay)")
        return _compare_clock(last, info)

    def record(self, ak_name: bytes, info: ClockInfo, attest: bytes) -> None:
        state = ClockState(info.clock, info.reset_count, info.restart_count,
                           hashlib.sha256(attest).digest())
        with self._lock:
            self._last[ak_name] = state


def _compare_clock(last: ClockState, info: ClockInfo) -> str:
    if info.reset_count < last.reset_count:
        raise VerificationError("clock", f"resetCount went back from {last.reset_count} to "
                                f"{info.reset_count} (rolled-back or replayed quote)")
    if info.reset_count > last.reset_count:
        return f"reboot detected: resetCount {last.reset_count} -> {info.reset_count}"
    if info.restart_count < last.restart_count:
        raise VerificationError("clock", f"restartCount went back from {last.restart_count} to "
                                f"{info.restart_count} within one boot (rolled back)")
    if info.restart_count > last.restart_count:
        return f"TPM restart detected: restartCount {last.restart_count} -> {info.restart_count}"
    if info.clock < last.clock:
        raise VerificationError("clock", f"clock went back from {last.clock} to {info.clock} ms "
                                "within one boot (replayed or rolled back)")
    return f"clock advanced {info.clock - last.clock} ms within the same boot"


# --- shared signature checks ---------------------------------------------------------


def check_signature_algorithm(ak: PublicArea, sig: Signature) -> str:
    if sig.hash_name not in ALLOWED_HASHES:
        raise VerificationError("signature_algorithm",
                                f"{sig.hash_name} signatures are not accepted")
    expected_kind = "rsa" if ak.type == Alg.RSA else "ecc"
    if (expected_kind == "rsa") != (sig.sig_alg in (Alg.RSASSA, Alg.RSAPSS)):
        raise VerificationError("signature_algorithm",
                                f"signature algorithm {Alg(sig.sig_alg).name} does not fit a "
                                f"{expected_kind.upper()} AK")
    if sig.sig_alg not in (Alg.RSASSA, Alg.RSAPSS, Alg.ECDSA):
        raise VerificationError("signature_algorithm",
                                f"{Alg(sig.sig_alg).name} signatures are not supported")
    if ak.scheme != Alg.NULL and (ak.scheme, ak.scheme_hash) != (sig.sig_alg, sig.hash_alg):
        raise VerificationError("signature_algorithm", "signature scheme differs from the AK's")
    return f"{Alg(sig.sig_alg).name} with {sig.hash_name}"


_ECDSA = {name: ec.ECDSA(algorithm) for name, algorithm in _HASHES.items()}


def check_signature(ak: PublicArea, sig: Signature, message: bytes) -> str:
    key = ak.public_key()
    name = sig.hash_name
    algorithm = _HASHES[name]
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15() if sig.sig_alg == Alg.RSASSA
                else padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO))
            key.verify(sig.rsa_signature, message, pad, algorithm)
        else:
            der = utils.encode_dss_signature(int.from_bytes(sig.r), int.from_bytes(sig.s))
            key.verify(der, message, _ECDSA[name])
    except InvalidSignature:
        raise VerificationError("signature", "the signature does not verify with the AK") from None
    return "valid signature by the AK"


def check_magic(attest: Attest) -> str:
    if attest.magic != TPM_GENERATED_VALUE:
        raise VerificationError("magic", f"magic is 0x{attest.magic:08x}, not TPM_GENERATED "
                                "(0xff544347): not produced by a TPM")
    return "TPM_GENERATED"


def check_type(attest: Attest, expected: StructureTag) -> str:
    if attest.type != expected:
        try:
            got = StructureTag(attest.type).name
        except ValueError:
            got = f"0x{attest.type:04x}"
        raise VerificationError("attestation_type", f"attestation is {got}, expected "
                                f"{expected.name}")
    return expected.name


def check_qualifying_data(attest: Attest, nonce: bytes) -> str:
    if not hmac.compare_digest(attest.extra_data, nonce):
        raise VerificationError("qualifying_data", "qualifying data does not equal the expected "
                                "nonce (stale, replayed or for another session)")
    return f"matches the {len(nonce)}-byte nonce"


# --- the quote verifier ---------------------------------------------------------------


@dataclass
class _Parsed:
    attest: Attest | None = None
    signature: Signature | None = None
    ak: PublicArea | None = None
    log: EventLog | None = None


class QuoteVerifier:
    """Verifies evidence bundles against a nonce, AK trust and an optional policy."""

    def __init__(self, *, ak_trust: AkTrust, policy: ReferencePolicy | None = None,
                 clock_history: ClockHistory | None = None) -> None:
        self.ak_trust = ak_trust
        self.policy = policy
        self.clock_history = clock_history

    def verify(self, evidence: Evidence, nonce: bytes) -> VerificationReport:
        p = _Parsed()
        report = run_checks(self._quote_checks(evidence, nonce, p))
        if report.ok and self.clock_history is not None and p.ak and p.attest:
            self.clock_history.record(p.ak.name, p.attest.clock_info, p.attest.raw)
        return report

    def verify_certification(self, certification: KeyCertification, ak_public: bytes,
                             nonce: bytes) -> VerificationReport:
        """TPM2_Certify: the AK vouches that ``key_public`` is a key inside its TPM."""
        p = _Parsed()
        key: list[PublicArea] = []

        def structure() -> str:
            p.attest = parse_attest(certification.attest)
            p.signature = parse_signature(certification.signature)
            p.ak = parse_public_cached(ak_public)
            key.append(parse_public(certification.key_public))
            return "TPMS_ATTEST, TPMT_SIGNATURE and both TPMT_PUBLICs decode"

        return run_checks([
            ("structure", structure),
            *self._signer_checks(p),
            ("attestation_type", lambda: check_type(_a(p), StructureTag.ATTEST_CERTIFY)),
            ("qualifying_data", lambda: check_qualifying_data(_a(p), nonce)),
            ("certified_name", lambda: _check_certified_name(_a(p), key[0])),
            ("key_attributes", lambda: _check_tpm_key(key[0])),
        ])

    def _signer_checks(self, p: _Parsed) -> list[Check]:
        return [
            ("ak_attributes", lambda: self._check_ak_attributes(_k(p))),
            ("ak_trust", lambda: self.ak_trust.trust(_k(p))),
            ("signature_algorithm", lambda: check_signature_algorithm(_k(p), _s(p))),
            ("signature", lambda: check_signature(_k(p), _s(p), _a(p).raw)),
            ("magic", lambda: check_magic(_a(p))),
        ]

    def _quote_checks(self, evidence: Evidence, nonce: bytes, p: _Parsed) -> list[Check]:
        def structure() -> str:
            p.attest = parse_attest(evidence.attest)
            p.signature = parse_signature(evidence.signature)
            p.ak = parse_public_cached(evidence.ak_public)
            return "TPMS_ATTEST, TPMT_SIGNATURE and AK TPMT_PUBLIC decode"

        return [
            ("structure", structure),
            *self._signer_checks(p),
            ("attestation_type", lambda: check_type(_a(p), StructureTag.ATTEST_QUOTE)),
            ("qualifying_data", lambda: check_qualifying_data(_a(p), nonce)),
            ("pcr_selection", lambda: _check_selection(_a(p), evidence)),
            ("pcr_digest", lambda: _check_pcr_digest(_a(p), _s(p), evidence)),
            ("clock", lambda: self._check_clock(p)),
            ("event_log", lambda: _check_event_log(evidence, p, self._unlogged_pcrs())),
            ("policy", lambda: self._check_policy(evidence, p)),
        ]

    def _unlogged_pcrs(self) -> tuple[int, ...]:
        return self.policy.unlogged_pcrs if self.policy is not None else ()

    def _check_ak_attributes(self, ak: PublicArea) -> str:
        if isinstance(self.ak_trust, PinnedAk) and self.ak_trust.bare_key:
            return ("not in the evidence: the AK was given as a bare public key; the caller "
                    "vouches that it is a restricted TPM key (tpm2_checkquote semantics)")
        return check_ak_attributes(ak)

    def _check_clock(self, p: _Parsed) -> str:
        info = _a(p).clock_info
        if not info.safe:
            # The TPM lost Clock since it last saved it (an unorderly shutdown): values it
            # reported before may be ahead of this one, so freshness by clock is void.
            raise VerificationError("clock", "clock safe flag is 0: the TPM clock may have "
                                    "gone backwards (TPMS_CLOCK_INFO.safe)")
        if self.clock_history is None:
            return (f"clock safe; no history kept, so not compared with earlier quotes "
                    f"(clock {info.clock} ms, resetCount {info.reset_count})")
        return self.clock_history.check(_k(p).name, info, _a(p).raw)

    def _check_policy(self, evidence: Evidence, p: _Parsed) -> str:
        if self.policy is None:
            raise CheckSkipped("no reference policy given: the PCR values were not judged, so "
                               "the platform's state is not established (pass --policy)")
        if self.policy.bank != evidence.pcr_bank:
            raise VerificationError("policy", f"policy {self.policy.name!r} is for the "
                                    f"{self.policy.bank} bank, the quote is {evidence.pcr_bank}")
        # Event-level mismatches say *what* changed (which kernel, which command line),
        # so they lead; whole-PCR mismatches follow.
        mismatches = _policy_mismatches(self.policy, evidence, p.log)
        if mismatches:
            more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
            raise VerificationError("policy", f"policy {self.policy.name!r}: "
                                    f"{mismatches[0].describe()}{more}",
                                    {"mismatches": [m.to_dict() for m in mismatches]})
        return f"satisfies policy {self.policy.name!r}"


def _policy_mismatches(policy: ReferencePolicy, evidence: Evidence,
                       log: EventLog | None) -> tuple[PolicyMismatch, ...]:
    """Every way the evidence differs from ``policy``, event-level mismatches first (they
    say *what* changed: which kernel, which command line). Memoized, like the replay, by
    the policy's value, the quoted PCRs and the log's exact bytes (``log`` is their parse)."""
    event_log = evidence.event_log
    if log is None or event_log is None or len(event_log) > CACHED_LOG_BYTES:
        return _ordered(evaluate_policy(policy, evidence.pcrs, log))
    return _policy_mismatches_cached(policy, tuple(sorted(evidence.pcrs.items())), event_log)


_POLICY_MISMATCHES: BoundedCache[tuple[ReferencePolicy, tuple[tuple[int, bytes], ...], bytes],
                                 tuple[PolicyMismatch, ...]] = BoundedCache(CACHED_LOGS)


def _policy_mismatches_cached(policy: ReferencePolicy, pcrs: tuple[tuple[int, bytes], ...],
                              event_log: bytes) -> tuple[PolicyMismatch, ...]:
    return _POLICY_MISMATCHES.get_or_compute(
        (policy, pcrs, event_log),
        lambda: _ordered(evaluate_policy(policy, dict(pcrs), parse_event_log_cached(event_log))))


def _ordered(mismatches: list[PolicyMismatch]) -> tuple[PolicyMismatch, ...]:
    return tuple(sorted(mismatches,
                        key=lambda m: not isinstance(m, EventMismatch | EventCountMismatch)))


def _a(p: _Parsed) -> Attest:
    assert p.attest is not None  # run_checks stops before a check whose input failed
    return p.attest


def _s(p: _Parsed) -> Signature:
    assert p.signature is not None
    return p.signature


def _k(p: _Parsed) -> PublicArea:
    assert p.ak is not None
    return p.ak


def _quote_info(attest: Attest) -> QuoteInfo:
    if not isinstance(attest.attested, QuoteInfo):
        raise VerificationError("attestation_type", "not a quote")
    return attest.attested


def _check_selection(attest: Attest, evidence: Evidence) -> str:
    selections = _quote_info(attest).pcr_select
    if len(selections) != 1:
        raise VerificationError("pcr_selection", f"quote selects {len(selections)} banks; "
                                "exactly one is supported")
    selected = selections[0]
    if selected.bank != evidence.pcr_bank:
        raise VerificationError("pcr_selection", f"quote covers the {selected.bank} bank but "
                                f"the evidence reports {evidence.pcr_bank}")
    if set(selected.indices) != set(evidence.pcrs):
        raise VerificationError("pcr_selection", f"quote covers PCRs {list(selected.indices)} "
                                f"but the evidence reports {sorted(evidence.pcrs)}")
    return f"{selected.bank} PCRs {','.join(map(str, selected.indices))}"


def _check_pcr_digest(attest: Attest, sig: Signature, evidence: Evidence) -> str:
    info = _quote_info(attest)
    indices = info.pcr_select[0].indices
    composite = b"".join(evidence.pcrs[i] for i in indices)
    # TPM2_Quote digests the PCRs with the signing scheme's hash.
    if not hmac.compare_digest(hashlib.new(sig.hash_name, composite).digest(), info.pcr_digest):
        raise VerificationError("pcr_digest", "the reported PCR values do not hash to the "
                                "quoted pcrDigest (a PCR value was altered)")
    return "reported PCR values hash to the quoted pcrDigest"


def _check_event_log(evidence: Evidence, p: _Parsed, unlogged: tuple[int, ...]) -> str:
    """The log must explain every quoted PCR, except those the policy exempts."""
    if evidence.event_log is None:
        raise CheckSkipped("no event log supplied: what the quoted PCR values measure is not "
                           "explained")
    try:
        p.log, mismatches = replayed_log(evidence.event_log, evidence.pcrs, evidence.pcr_bank,
                                         unlogged)
    except EventLogError as exc:
        raise VerificationError("event_log", f"event log unusable: {exc}") from None
    if mismatches:
        raise VerificationError("event_log", "; ".join(m.describe() for m in mismatches),
                                {"mismatches": [m.to_dict() for m in mismatches]})
    exempt = sorted(set(unlogged) & set(evidence.pcrs))
    note = f" (PCRs {', '.join(map(str, exempt))} not logged, per the policy)" if exempt else ""
    return (f"replay of {len(p.log.events)} events explains all {len(evidence.pcrs)} quoted "
            f"PCRs{note}")


# --- the event-log replay, cached ------------------------------------------------------

# A peer sends the same log on every handshake: parsing and replaying it again costs
# more than the signature check. The key is every input of the replay (the log's
# SHA-256, the bank, the quoted values, the exemptions), so a changed log or PCR value
# is replayed afresh; an unusable log raises and is never stored.
REPLAY_CACHE_SIZE = 256
_REPLAYS: BoundedCache[tuple[bytes, str, tuple[tuple[int, bytes], ...], tuple[int, ...]],
                       tuple[EventLog, tuple[PcrMismatch, ...]]] = BoundedCache(REPLAY_CACHE_SIZE)


def replayed_log(log: bytes, pcrs: Mapping[int, bytes], bank: str, unlogged: Iterable[int]
                 ) -> tuple[EventLog, tuple[PcrMismatch, ...]]:
    """``log`` parsed, and the quoted PCRs it does not explain (cached for logs up to
    CACHED_LOG_BYTES, which bounds what the cache holds; EventLogError)."""
    quoted = tuple(sorted(pcrs.items()))
    exempt = tuple(sorted(set(unlogged)))

    def replay() -> tuple[EventLog, tuple[PcrMismatch, ...]]:
        parsed = parse_event_log_cached(log)
        return parsed, tuple(compare_with_pcrs(parsed, dict(quoted), bank, unlogged=exempt))

    if len(log) > CACHED_LOG_BYTES:
        return replay()
    return _REPLAYS.get_or_compute((hashlib.sha256(log).digest(), bank, quoted, exempt), replay)


def _check_certified_name(attest: Attest, key: PublicArea) -> str:
    info = attest.attested
    if not isinstance(info, CertifyInfo):
        raise VerificationError("certified_name", "not a certify attestation")
    if not hmac.compare_digest(info.name, key.name):
        raise VerificationError("certified_name", "the certified Name is not the Name of the "
                                "presented key (another key was certified)")
    return "certified Name equals the key's Name"


def _check_tpm_key(key: PublicArea) -> str:
    missing = TPM_KEY_REQUIRED & ~key.attributes
    if missing:
        raise VerificationError("key_attributes", f"key lacks {missing!r}: it was not generated "
                                "in the TPM or can leave it")
    return "fixedTPM, fixedParent, sensitiveDataOrigin: generated in and bound to the TPM"

