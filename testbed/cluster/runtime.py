"""The ``runtime`` check: a node's ima-ng log, read incrementally, against its runtime policy.

A node has a runtime policy when ``clusters/C/runtime/NODE.yaml`` exists (``testbed up``
writes the sim baseline's for sim nodes; edit it to allow more): then every attestation
of that node quotes PCR 10 too and runs this check, failing closed when the node cannot
show its log. Only entries new since the last good quote are fetched and judged: the
verifier keeps, per node, the log offset and the PCR 10 value that quote proved, and
replays the new entries from there. A TPM reset or restart (the quote's clock info) means
a new boot and a new log: it starts again from offset 0 and a zero PCR 10.

The log is read after the quote, so it may hold entries the quote does not cover yet:
the longest prefix whose replay equals the quoted PCR 10 is judged and kept, the rest
waits for the next quote. A prefix that never matches is a log that lies.

The log comes over a pull node's agent (:func:`agent_reader`) or as the slice a push node
sent with its evidence (:func:`slice_reader`): the same check either way.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from attestation.encoding import require_int
from attestation.errors import TestbedError, VerificationError
from attestation.evidence import Evidence
from attestation.files import atomic_write, private_dir, read_bounded
from attestation.ima import (
    IMA_PCR,
    MAX_CHUNK,
    MAX_POLICY_BYTES,
    ImaEntry,
    RuntimePolicy,
    check_boot_aggregate,
    check_entries,
    dump_runtime_policy,
    load_runtime_policy,
    parse_log,
    replay,
)
from attestation.policy import ReferencePolicy
from attestation.tpm_types import parse_attest
from testbed.cluster.agent import AgentClient
from testbed.core.errors import StateError
from testbed.core.files import read_json, write_json
from testbed.core.paths import ClusterPaths

__all__ = ["RuntimeState", "RuntimeWindow", "agent_reader", "check_runtime",
           "ensure_runtime_policy", "explaining_prefix", "forget_runtime_state", "judge_window",
           "node_runtime_policy", "quoting_pcr10", "runtime_dir", "runtime_window",
           "slice_reader"]

_MAX_PARSED = 4096  # runtime policies kept parsed
MAX_READS = 64  # chunks per check: 64 x 256 KiB of new entries, then the check fails
_ZERO = bytes(32)


def runtime_dir(paths: ClusterPaths) -> Path:
    return paths.root / "runtime"


def _policy_path(paths: ClusterPaths, node: str) -> Path:
    return runtime_dir(paths) / f"{node}.yaml"


def _state_path(paths: ClusterPaths, node: str) -> Path:
    return runtime_dir(paths) / f"{node}.state.json"


def ensure_runtime_policy(paths: ClusterPaths, node: str, policy: RuntimePolicy, *,
                          replace_same_name: bool = False) -> None:
    """Write ``policy`` as the node's runtime policy unless it has one (kept across ups);
    with ``replace_same_name``, also over one of the same name (an earlier prediction)."""
    path = _policy_path(paths, node)
    current = node_runtime_policy(paths, node) if replace_same_name else None
    if not path.exists() or (current is not None and current.name == policy.name
                             and current != policy):
        private_dir(path.parent)
        atomic_write(path, dump_runtime_policy(policy).encode())


_parsed: dict[Path, tuple[bytes, RuntimePolicy]] = {}  # path -> (its bytes, parsed)
_parsed_lock = threading.Lock()


def node_runtime_policy(paths: ClusterPaths, node: str) -> RuntimePolicy | None:
    """The node's runtime policy, or None when it has none (no runtime check).

    The file is read every time; its YAML is parsed again only when its bytes differ
    from the last parse's (a verifier attesting hundreds of nodes each interval)."""
    path = _policy_path(paths, node)
    data = read_bounded(path, MAX_POLICY_BYTES, what="runtime policy", missing_ok=True)
    if data is None:
        return None
    with _parsed_lock:
        hit = _parsed.get(path)
    if hit is not None and hit[0] == data:
        return hit[1]
    policy = load_runtime_policy(data, str(path))
    with _parsed_lock:
        if len(_parsed) >= _MAX_PARSED:
            _parsed.clear()  # bounded: a verifier of more nodes re-parses some
        _parsed[path] = (data, policy)
    return policy


def quoting_pcr10(policy: ReferencePolicy) -> ReferencePolicy:
    """``policy`` with PCR 10 exempt from the TCG event log: the ima-ng log explains it."""
    return dataclasses.replace(policy, unlogged_pcrs=tuple(sorted({*policy.unlogged_pcrs,
                                                                   IMA_PCR})))


@dataclass(frozen=True)
class RuntimeState:
    """What the last good quote proved: the boot, how far the log goes, PCR 10 there."""

    boot: tuple[int, int]  # the TPM's reset and restart counts
    offset: int
    pcr: bytes

    @classmethod
    def load(cls, paths: ClusterPaths, node: str) -> RuntimeState | None:
        path = _state_path(paths, node)
        doc = read_json(path)
        if doc is None:
            return None
        try:
            boot = doc["boot"]
            return cls((require_int(boot[0], "boot", StateError),
                        require_int(boot[1], "boot", StateError)),
                       require_int(doc["offset"], "offset", StateError, minimum=0),
                       bytes.fromhex(doc["pcr"]))
        except (KeyError, IndexError, TypeError, ValueError):
            raise StateError(f"{path} is damaged: remove it to judge the node's runtime log "
                             "from its start") from None

    def save(self, paths: ClusterPaths, node: str) -> None:
        private_dir(runtime_dir(paths))
        write_json(_state_path(paths, node), {"boot": list(self.boot), "offset": self.offset,
                                              "pcr": self.pcr.hex()})


def forget_runtime_state(paths: ClusterPaths, node: str) -> None:
    """Drop what the last good quote of an earlier incarnation of ``node`` proved: a node
    registered with a new AK has a new TPM, whose reset and restart counts may equal the
    old one's, so its log must be judged from its start."""
    _state_path(paths, node).unlink(missing_ok=True)


@dataclass(frozen=True)
class RuntimeWindow:
    """What one quote's runtime check judged: the log entries from ``start`` (where the
    last good quote left PCR 10 at ``from_pcr``) to ``end``, which replay to ``quoted``."""

    boot: tuple[int, int]
    start: int
    end: int
    from_pcr: bytes
    quoted: bytes
    entries: tuple[ImaEntry, ...]
    pcrs: Mapping[int, bytes]  # every quoted PCR: a boot_aggregate is checked against 0-9

    @property
    def data(self) -> bytes:
        """The log's bytes ``start``..``end`` (the parser took them verbatim)."""
        return b"".join(entry.line() for entry in self.entries)


def runtime_window(paths: ClusterPaths, node: str, read: Callable[[int], bytes],
                   evidence: Evidence) -> RuntimeWindow:
    """The entries new since the last good quote that explain the quoted PCR 10;
    ``read(offset)`` gives the node's log from there. Raises the ``runtime`` check's
    VerificationError when they cannot be had or do not explain it."""
    quoted = evidence.pcrs.get(IMA_PCR)
    if quoted is None:
        raise VerificationError("runtime", f"the quote does not cover PCR {IMA_PCR}")
    clock = parse_attest(evidence.attest).clock_info
    boot = (clock.reset_count, clock.restart_count)
    state = RuntimeState.load(paths, node)
    if state is None or state.boot != boot:
        state = RuntimeState(boot, 0, _ZERO)
    entries, end = explaining_prefix(read, state, quoted)
    return RuntimeWindow(boot, state.offset, end, state.pcr, quoted, tuple(entries),
                         dict(evidence.pcrs))


def judge_window(window: RuntimeWindow, policy: RuntimePolicy) -> str:
    """Raise the ``runtime`` check's VerificationError for an entry the policy does not
    allow (or a boot_aggregate the quoted PCRs 0-9 do not make), or say what was judged."""
    check_boot_aggregate(window.entries, window.pcrs)
    check_entries(policy, window.entries)
    return (f"{len(window.entries)} new ima-ng entries (log bytes {window.start}-"
            f"{window.end}) replay to the quoted PCR {IMA_PCR} and runtime policy "
            f"{policy.name!r} allows them")


def check_runtime(paths: ClusterPaths, node: str, agent: AgentClient, evidence: Evidence,
                  policy: RuntimePolicy) -> str:
    """The whole check over a node's agent, outside a verification: judge the entries new
    since the last good quote and record the new state, or raise the ``runtime`` check's
    VerificationError. (Verifications run it through ``verify_evidence``.)"""
    window = runtime_window(paths, node, agent_reader(agent), evidence)
    detail = judge_window(window, policy)
    RuntimeState(window.boot, window.end, window.quoted).save(paths, node)
    return detail


def agent_reader(agent: AgentClient) -> Callable[[int], bytes]:
    """A pull node's log, read over its agent (failures are the ``runtime`` check's)."""
    return lambda offset: _read(agent, offset)


def slice_reader(start: int, data: bytes) -> Callable[[int], bytes]:
    """A log slice a push node sent (its bytes from ``start``), read like an agent's."""
    def read(offset: int) -> bytes:
        if not start <= offset <= start + len(data):
            raise VerificationError("runtime", f"the runtime log sent covers bytes {start}-"
                                    f"{start + len(data)}, the check needs it from {offset}")
        return data[offset - start:offset - start + MAX_CHUNK]
    return read


def explaining_prefix(read: Callable[[int], bytes], state: RuntimeState,
                      quoted: bytes) -> tuple[list[ImaEntry], int]:
    """The entries new since ``state`` up to the one after which PCR 10 equals the quoted
    value, and the log offset after it; ``read(offset)`` gives the log's bytes from there."""
    if state.pcr == quoted:
        return [], state.offset
    entries: list[ImaEntry] = []
    offset, pcr = state.offset, state.pcr
    for _ in range(MAX_READS):
        chunk = parse_log(read(offset), offset)
        if not chunk.entries:
            break
        for entry, value in zip(chunk.entries, replay(pcr, chunk.entries), strict=True):
            entries.append(entry)
            if value == quoted:
                return entries, entry.offset + len(entry.line())
        offset, pcr = chunk.end, replay(pcr, chunk.entries)[-1]
    raise VerificationError("runtime", f"the node's ima-ng log (from byte {state.offset}, "
                            f"{len(entries)} new entries) does not replay to the quoted "
                            f"PCR {IMA_PCR} {quoted.hex()}", {"quoted": quoted.hex()})


def _read(agent: AgentClient, offset: int) -> bytes:
    try:
        return agent.runtime_log(offset)
    except TestbedError as exc:  # an agent without the op, a bad frame, a bad chunk
        raise VerificationError("runtime", f"the node's runtime log is unusable: {exc}") \
            from None
