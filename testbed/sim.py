"""The ``sim`` backend: a cluster of node processes, each with its own swtpm.

Each node is ``python -m testbed.node`` (see :mod:`testbed.node`), started
detached by :func:`up` and reached over its agent socket (:mod:`testbed.agent`).
This module holds everything the CLI side needs: the digest-based measured
boot and the predicted policy, the state layout, node process bookkeeping,
and the four lifecycle operations :func:`up`, :func:`status`, :func:`attest`
and :func:`down`.

State layout (``docs/testbed.md``)::

    WORKDIR/ca/                          the project-local EK CA (shared)
    WORKDIR/clusters/NAME/               0700
        cluster.yaml                     the spec as brought up (tampering included)
        registry.json                    AkRegistry: node -> activated AK (0600)
        clock-history.json               last accepted quote per AK (0600)
        attestations.json                last attestation result per node
        policies/NODE.yaml               each node's reference policy
        nodes/NODE/state/                swtpm state (kept by `down`, removed by --purge)
        nodes/NODE/run/                  node.pid node.json node.log agent.sock
                                         swtpm.pid swtpm.log (removed by `down`)
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attestation.errors import EvidenceFormatError, PolicyError, TestbedError
from attestation.eventlog import EventLogBuilder, initial_pcr_value, parse_event_log, replay
from attestation.evidence import Evidence
from attestation.policy import ReferencePolicy, dump_policy, load_policy, policy_from_evidence
from attestation.registrar import AkRegistry, Registrar
from attestation.report import VerificationReport
from attestation.tpm import TpmClient
from attestation.tpm_types import PcrSelection, parse_attest, parse_public
from attestation.verifier import ClockHistory, QuoteVerifier
from testbed.agent import AgentClient, AgentUnavailable
from testbed.cluster import (
    NAME_PATTERN,
    BootSpec,
    ClusterSpec,
    ClusterSpecError,
    NodeSpec,
    dump_cluster_spec,
    load_cluster_spec,
)
from testbed.errors import StateError
from testbed.localca import LocalCA
from testbed.measured_boot import BootChain, BootStep, ovmf_boot_steps
from testbed.progress import Progress
from testbed.swtpm import Swtpm

__all__ = [
    "BANK",
    "SIM_PCRS",
    "AttestResult",
    "BootArtifacts",
    "BootStep",
    "ClusterPaths",
    "ClusterProcess",
    "DownResult",
    "MeasuredArtifact",
    "NodePaths",
    "NodeStatus",
    "NodeUpResult",
    "UpResult",
    "attest",
    "boot_steps",
    "cluster_processes",
    "down",
    "measure_boot_artifacts",
    "node_policy",
    "predict_boot",
    "predicted_policy",
    "select_cluster",
    "status",
    "up",
    "verify_evidence",
]

BANK = "sha256"
SIM_PCRS = PcrSelection(BANK, (0, 1, 2, 3, 4, 5, 6, 7, 9))
"""What `attest` quotes: firmware and boot manager PCRs 0-7, and PCR 9 (initrd, cmdline)."""
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0
_POLL_S = 0.02
_MAX_STATE_BYTES = 1 << 20
_HISTORY_FORMAT = "testbed-clock-history"


# --- digest-based measured boot ---------------------------------------------------------------


@dataclass(frozen=True)
class MeasuredArtifact:
    """A boot artifact as firmware measures it: its SHA-256, and its size when known."""

    digest: bytes
    size: int | None = None

    @classmethod
    def of(cls, data: bytes) -> MeasuredArtifact:
        return cls(hashlib.sha256(data).digest(), len(data))


@dataclass(frozen=True)
class BootArtifacts:
    """A boot chain by digest: what :func:`measure_boot_artifacts` extends.

    Unlike :class:`~testbed.measured_boot.BootChain` it needs no artifact bytes,
    so a spec may name a kernel by its published SHA-256 alone.
    """

    firmware: MeasuredArtifact
    kernel: MeasuredArtifact
    initrd: MeasuredArtifact
    cmdline: str
    firmware_version: str = "edk2-stable202302"

    @classmethod
    def from_chain(cls, chain: BootChain) -> BootArtifacts:
        return cls(MeasuredArtifact.of(chain.firmware), MeasuredArtifact.of(chain.kernel),
                   MeasuredArtifact.of(chain.initrd), chain.cmdline, chain.firmware_version)

    @classmethod
    def from_spec(cls, boot: BootSpec) -> BootArtifacts:
        firmware, kernel, initrd = (MeasuredArtifact(*a.measure())
                                    for a in (boot.firmware, boot.kernel, boot.initrd))
        return cls(firmware, kernel, initrd, boot.cmdline, boot.firmware_version)

    def summary(self) -> dict[str, str]:
        return {"firmware": f"sha256:{self.firmware.digest.hex()}",
                "kernel": f"sha256:{self.kernel.digest.hex()}",
                "initrd": f"sha256:{self.initrd.digest.hex()}",
                "cmdline": self.cmdline, "firmware_version": self.firmware_version}


def boot_steps(boot: BootArtifacts) -> list[BootStep]:
    """The events of an OVMF direct kernel boot (testbed.measured_boot's one definition)."""
    return ovmf_boot_steps(
        firmware_version=boot.firmware_version, firmware_digest=boot.firmware.digest,
        firmware_size=boot.firmware.size or 0, kernel_digest=boot.kernel.digest,
        kernel_size=boot.kernel.size or 0, initrd_digest=boot.initrd.digest,
        cmdline=boot.cmdline)


def _log_for(steps: list[BootStep]) -> EventLogBuilder:
    log = EventLogBuilder(banks=(BANK,), startup_locality=0)
    for step in steps:
        log.add_digests(step.pcr, step.event_type, step.data, {BANK: step.digest})
    return log


def measure_boot_artifacts(client: TpmClient, boot: BootArtifacts) -> bytes:
    """Extend the TPM with ``boot``'s events; return the matching event log."""
    log = EventLogBuilder(banks=(BANK,), startup_locality=0)
    for step in boot_steps(boot):
        event = log.add_digests(step.pcr, step.event_type, step.data, {BANK: step.digest})
        client.extend_pcr(step.pcr, event.digests)
    return log.to_bytes()


def predict_boot(boot: BootArtifacts) -> tuple[bytes, dict[int, bytes]]:
    """The event log and the :data:`SIM_PCRS` values a node booting ``boot`` will have."""
    log_bytes = _log_for(boot_steps(boot)).to_bytes()
    log = parse_event_log(log_bytes)
    replayed = replay(log, BANK)
    pcrs = {i: replayed.get(i, initial_pcr_value(log, i, BANK)) for i in SIM_PCRS.indices}
    return log_bytes, pcrs


def predicted_policy(node: str, boot: BootArtifacts) -> ReferencePolicy:
    """The policy a node booting ``boot`` satisfies, computed without any TPM."""
    log_bytes, pcrs = predict_boot(boot)
    return policy_from_evidence(
        pcrs, parse_event_log(log_bytes), name=f"{node}-predicted", bank=BANK,
        labels=_labels(boot_steps(boot)),
        description=f"predicted from the boot chain of node {node} (kernel "
                    f"{boot.kernel.digest.hex()[:16]}…, cmdline {boot.cmdline[:60]!r})")


def _labels(steps: list[BootStep]) -> dict[tuple[int, int], str]:
    positions: dict[int, int] = {}
    labels: dict[tuple[int, int], str] = {}
    for step in steps:
        positions[step.pcr] = positions.get(step.pcr, 0) + 1
        labels[(step.pcr, positions[step.pcr])] = step.label
    return labels


def node_policy(node: NodeSpec) -> ReferencePolicy:
    """A node's reference policy: predicted from its *untampered* boot chain, or its file."""
    if node.policy is None:
        return predicted_policy(node.name, BootArtifacts.from_spec(node.boot))
    try:
        return load_policy(node.policy)
    except PolicyError as exc:
        raise ClusterSpecError(f"node {node.name}: policy {node.policy}: {exc}") from None


# --- state layout ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodePaths:
    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def pid_file(self) -> Path:
        return self.run / "node.pid"

    @property
    def info(self) -> Path:
        return self.run / "node.json"

    @property
    def log(self) -> Path:
        return self.run / "node.log"

    @property
    def socket(self) -> Path:
        return self.run / "agent.sock"

    @property
    def swtpm_pid(self) -> Path:
        return self.run / "swtpm.pid"


@dataclass(frozen=True)
class ClusterPaths:
    workdir: Path
    name: str

    def __post_init__(self) -> None:
        if not NAME_PATTERN.fullmatch(self.name):
            raise StateError(f"invalid cluster name {self.name!r}")
        object.__setattr__(self, "workdir", Path(self.workdir).absolute())

    @property
    def root(self) -> Path:
        return self.workdir / "clusters" / self.name

    @property
    def spec(self) -> Path:
        return self.root / "cluster.yaml"

    @property
    def registry(self) -> Path:
        return self.root / "registry.json"

    @property
    def clock_history(self) -> Path:
        return self.root / "clock-history.json"

    @property
    def attestations(self) -> Path:
        return self.root / "attestations.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lifecycle.lock"

    @property
    def attest_lock(self) -> Path:
        return self.root / ".attest.lock"

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    def policy(self, node: str) -> Path:
        return self.root / "policies" / f"{node}.yaml"

    def node(self, name: str) -> NodePaths:
        if not NAME_PATTERN.fullmatch(name):
            raise StateError(f"invalid node name {name!r}")
        return NodePaths(self.root / "nodes" / name)

    def node_names(self) -> list[str]:
        nodes = self.root / "nodes"
        if not nodes.is_dir():
            return []
        return sorted(d.name for d in nodes.iterdir() if d.is_dir()
                      and NAME_PATTERN.fullmatch(d.name))

    def load_spec(self) -> ClusterSpec:
        if not self.spec.is_file():
            raise StateError(f"cluster {self.name!r} has no spec at {self.spec}; "
                             "bring it up with `testbed up`")
        return load_cluster_spec(self.spec)


def select_cluster(workdir: Path, explicit: str | None) -> str | None:
    """The cluster a command means: ``explicit``, else the only one; None if there is none."""
    if explicit:
        if not NAME_PATTERN.fullmatch(explicit):
            raise StateError(f"invalid cluster name {explicit!r}")
        return explicit
    root = workdir / "clusters"
    names = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    if len(names) > 1:
        raise StateError(f"several clusters under {root} ({', '.join(names)}); "
                         "choose one with --cluster NAME")
    return names[0] if names else None


# --- small file helpers ------------------------------------------------------------------------


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_atomic(path: Path, data: str | bytes, mode: int = 0o600) -> None:
    """Write a whole file via a uniquely named temporary and rename (no torn reads)."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with open(fd, "wb") as handle:
            handle.write(raw)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    """A small JSON state file, or None if absent; malformed content is a StateError."""
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_STATE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(data) > _MAX_STATE_BYTES:
        raise StateError(f"{path} is larger than {_MAX_STATE_BYTES} bytes")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StateError(f"{path} is not valid JSON: {exc}") from None


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 16384))
            text = handle.read().decode(errors="replace")
    except OSError:
        return "(no node log)"
    return "\n".join(text.strip().splitlines()[-lines:]) or "(node log is empty)"


# --- processes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterProcess:
    pid: int
    kind: str  # "node" | "swtpm"
    node: str


def process_argv(pid: int) -> list[str] | None:
    """argv of a live process; None if it is gone or a zombie (exited, not yet reaped)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    if state in ("Z", "X") or not raw:
        return None
    return [os.fsdecode(a) for a in raw.rstrip(b"\0").split(b"\0")]


def node_command(paths: ClusterPaths, node: str) -> list[str]:
    return [sys.executable, "-m", "testbed.node", "--workdir", str(paths.workdir),
            "--cluster", paths.name, "--node", node]


def _classify(argv: list[str], paths: ClusterPaths) -> tuple[str, str] | None:
    """(kind, node) if ``argv`` is one of this cluster's node or swtpm processes."""
    if argv[1:3] == ["-m", "testbed.node"] and len(argv) == 9:
        opts = dict(zip(argv[3::2], argv[4::2], strict=True))
        if (opts.get("--workdir") == str(paths.workdir) and opts.get("--cluster") == paths.name
                and NAME_PATTERN.fullmatch(opts.get("--node", ""))):
            return "node", opts["--node"]
    if Path(argv[0]).name == "swtpm":
        prefix = f"file={paths.root}/nodes/"
        for arg in argv:
            if arg.startswith(prefix) and arg.endswith("/run/swtpm.pid"):
                node = arg[len(prefix):-len("/run/swtpm.pid")]
                if NAME_PATTERN.fullmatch(node):
                    return "swtpm", node
    return None


def cluster_processes(paths: ClusterPaths) -> list[ClusterProcess]:
    """Every live node and swtpm process of this cluster, found by scanning /proc.

    Independent of pid files, so processes of a crashed `up` are found even if
    their pid file was never written.
    """
    found: list[ClusterProcess] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        argv = process_argv(int(entry.name))
        kind = _classify(argv, paths) if argv else None
        if kind is not None:
            found.append(ClusterProcess(int(entry.name), *kind))
    return sorted(found, key=lambda p: (p.node, p.kind, p.pid))


def _is_ours(pid: int, paths: ClusterPaths, kind: str, node: str) -> bool:
    argv = process_argv(pid)
    return argv is not None and _classify(argv, paths) == (kind, node)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # only if it happens to be our child


def _wait_gone(pid: int, paths: ClusterPaths, kind: str, node: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not _is_ours(pid, paths, kind, node):
            return True
        time.sleep(_POLL_S)
    return False


def _signal_until_gone(pid: int, paths: ClusterPaths, kind: str, node: str) -> str | None:
    """SIGTERM, then SIGKILL; only while ``pid`` is still verifiably ours."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_ours(pid, paths, kind, node):
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_gone(pid, paths, kind, node, STOP_TIMEOUT_S):
            return sig.name
    return "SIGKILL"


def _ensure_exited(paths: ClusterPaths, node: str, pid: int) -> None:
    """Give a node that is on its way out time to stop its swtpm, then signal it."""
    if not _wait_gone(pid, paths, "node", node, STOP_TIMEOUT_S):
        _signal_until_gone(pid, paths, "node", node)


# --- node process state ---------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeProcessState:
    name: str
    state: str  # running | starting | failed | stopped | down
    pid: int | None
    info: dict[str, Any] = field(default_factory=dict)


def _node_pid(paths: ClusterPaths, node: str) -> int | None:
    """The node's live pid: from its pid file, else from a /proc scan."""
    pid = read_pid(paths.node(node).pid_file)
    if pid is not None and _is_ours(pid, paths, "node", node):
        return pid
    return next((p.pid for p in cluster_processes(paths)
                 if p.kind == "node" and p.node == node), None)


def inspect_node(paths: ClusterPaths, node: str) -> NodeProcessState:
    info = read_json(paths.node(node).info)
    info = info if isinstance(info, dict) else {}
    pid = _node_pid(paths, node)
    recorded = info.get("state")
    if pid is not None:
        if info.get("pid") != pid:
            return NodeProcessState(node, "starting", pid, info)
        live = {"ready": "running", "failed": "failed", "stopped": "stopping"}
        return NodeProcessState(node, live.get(str(recorded), "starting"), pid, info)
    if recorded == "failed":
        return NodeProcessState(node, "failed", None, info)
    return NodeProcessState(node, "stopped" if info else "down", None, info)


_LAUNCHER = 'umask 077; log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


def launch_node(paths: ClusterPaths, node: str) -> int:
    """Start a node detached (own session, re-parented away from us); return its pid.

    A throwaway ``sh`` forks the node and exits at once, so the node is never
    our child: it survives the CLI, and the CLI never has to reap it. The pid
    file is written before anyone waits on readiness (the node writes it too,
    first thing), so a later `down` finds the node even if this CLI dies now.
    """
    node_paths = paths.node(node)
    _private_dir(node_paths.run)
    command = ["sh", "-c", _LAUNCHER, "testbed-launch", str(node_paths.log),
               *node_command(paths, node)]
    try:
        # cwd: `python -m` puts it first on sys.path; the private run dir holds no code.
        res = subprocess.run(command, capture_output=True, text=True, timeout=10,
                             start_new_session=True, check=True, cwd=node_paths.run)
        pid = int(res.stdout.strip())
    except (subprocess.SubprocessError, ValueError, OSError) as exc:
        raise StateError(f"could not start node {node}: {exc}") from None
    write_atomic(node_paths.pid_file, f"{pid}\n")
    return pid


def _clean_stale_run(paths: ClusterPaths, node: str) -> None:
    """Before a (re)start: stop a leftover swtpm and drop the previous run's files."""
    node_paths = paths.node(node)
    with contextlib.suppress(StateError):  # a corrupt pid file: the swtpm is found by scan
        Swtpm.stop_pidfile(node_paths.swtpm_pid)
    for proc in cluster_processes(paths):
        if proc.node == node and proc.kind == "swtpm":
            _signal_until_gone(proc.pid, paths, "swtpm", node)
    if node_paths.run.exists():
        shutil.rmtree(node_paths.run)


def _wait_ready(paths: ClusterPaths, node: str, pid: int, deadline: float) -> dict[str, Any]:
    node_paths = paths.node(node)
    while True:
        info = read_json(node_paths.info)
        if isinstance(info, dict) and info.get("pid") == pid:
            if info.get("state") == "ready":
                return info
            if info.get("state") == "failed":
                _ensure_exited(paths, node, pid)  # it is stopping its swtpm and exiting
                raise _NodeFailed(str(info.get("error") or "node failed"))
        if not _is_ours(pid, paths, "node", node):
            _reap(pid)
            raise _NodeFailed("the node process exited before becoming ready")
        if time.monotonic() > deadline:
            _signal_until_gone(pid, paths, "node", node)
            raise _NodeFailed(f"not ready after {READY_TIMEOUT_S:.0f} s; stopped it")
        time.sleep(_POLL_S)


class _NodeFailed(TestbedError):
    pass


# --- up -------------------------------------------------------------------------------------------


@dataclass
class NodeUpResult:
    name: str
    role: str
    action: str  # started | kept | failed
    pid: int | None = None
    swtpm_pid: int | None = None
    tcti: str | None = None
    registered: bool = False
    tampered: tuple[str, ...] = ()
    error: str | None = None
    log_tail: str | None = None
    note: str | None = None
    enrollment: dict[str, Any] | None = None  # keyless TLS, when the cluster has a CryptoVM

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "action": self.action, "pid": self.pid,
                "swtpm_pid": self.swtpm_pid, "tcti": self.tcti, "registered": self.registered,
                "tampered": list(self.tampered), "error": self.error, "log_tail": self.log_tail,
                "note": self.note, "enrollment": self.enrollment}


@dataclass
class UpResult:
    cluster: str
    directory: Path
    nodes: list[NodeUpResult]

    @property
    def ok(self) -> bool:
        return all(n.action != "failed" for n in self.nodes)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "cluster": self.cluster, "directory": str(self.directory),
                "nodes": [n.to_dict() for n in self.nodes]}


def up(workdir: Path, spec: ClusterSpec, *, progress: Progress | None = None) -> UpResult:
    """Bring ``spec``'s nodes up (those already running are left alone) and register them."""
    if spec.backend != "sim":
        raise StateError(f"backend {spec.backend!r} is not implemented yet; use backend: sim")
    paths = ClusterPaths(workdir, spec.name)
    progress = progress or Progress(quiet=True)
    enrolling = any(node.role == "cryptovm" for node in spec.nodes)
    progress.total = len(spec.nodes) + 1 + enrolling
    _private_dir(paths.root)
    # Before any process starts: every artifact must be readable, every policy valid.
    boots = {node.name: BootArtifacts.from_spec(node.effective_boot) for node in spec.nodes}
    policies = {node.name: node_policy(node) for node in spec.nodes}
    with _flock(paths.lock):
        ca = LocalCA.ensure(paths.ca_dir)
        _write_spec_and_policies(paths, spec, policies)
        pids, kept = _start_nodes(paths, spec)
        deadline = time.monotonic() + READY_TIMEOUT_S
        results = [_await_node(paths, node, pids[node.name], deadline, progress,
                               kept_boot=boots[node.name] if node.name in kept else None)
                   for node in spec.nodes]
        with progress.step("registering nodes (EK certificate check, credential activation)"):
            _register_all(paths, ca, results)
        if enrolling:  # after registration: the CryptoVM checks nodes against the registry
            with progress.step("keyless TLS: server and client nodes enroll with the CryptoVM"):
                _enroll_all(paths, results)
    return UpResult(spec.name, paths.root, results)


def _enroll_all(paths: ClusterPaths, results: list[NodeUpResult]) -> None:
    """Each running server/client node gets its TLS certificate from the CryptoVM (agent
    op ``role``, action ``enroll``, see testbed/tp_role.py). A refusal (a tampered node)
    is reported per node; it does not fail `up`, which attests nothing either."""
    for result in results:
        if result.role not in ("server", "client") or result.action == "failed":
            continue
        try:
            answer = AgentClient(paths.node(result.name).socket, node=result.name).role("enroll")
            result.enrollment = {"ok": True, "certificate": answer.get("certificate"),
                                 "ca": answer.get("ca")}
        except TestbedError as exc:
            result.enrollment = {"ok": False, "error": str(exc)}


def _write_spec_and_policies(paths: ClusterPaths, spec: ClusterSpec,
                             policies: Mapping[str, ReferencePolicy]) -> None:
    _private_dir(paths.root / "policies")
    write_atomic(paths.spec, dump_cluster_spec(spec))
    for name, policy in policies.items():
        write_atomic(paths.policy(name), dump_policy(policy))


def _start_nodes(paths: ClusterPaths, spec: ClusterSpec) -> tuple[dict[str, int], set[str]]:
    """Launch every node that is not up yet (all at once: they come up in parallel)."""
    pids: dict[str, int] = {}
    kept: set[str] = set()
    for node in spec.nodes:
        current = inspect_node(paths, node.name)
        if current.state in ("running", "starting") and current.pid is not None:
            pids[node.name] = current.pid
            kept.add(node.name)
            continue
        if current.pid is not None:  # failed or stopping, still exiting: let it finish
            _ensure_exited(paths, node.name, current.pid)
        _private_dir(paths.root / "nodes")
        _private_dir(paths.node(node.name).root)
        _clean_stale_run(paths, node.name)
        pids[node.name] = launch_node(paths, node.name)
    return pids, kept


def _await_node(paths: ClusterPaths, node: NodeSpec, pid: int, deadline: float,
                progress: Progress, *, kept_boot: BootArtifacts | None) -> NodeUpResult:
    """Wait for one node; ``kept_boot`` is the spec's boot of a node that was already up."""
    kept = kept_boot is not None
    tampered = node.tampered.fields() if node.tampered else ()
    result = NodeUpResult(node.name, node.role, "kept" if kept else "started", pid,
                          tampered=tampered)
    label = f"node {node.name} ({node.role}{', TAMPERED' if tampered else ''})"
    label += ": already running" if kept else ": swtpm, measured boot, AK, agent"
    try:
        with progress.step(label):
            info = _wait_ready(paths, node.name, pid, deadline)
    except _NodeFailed as exc:
        result.action, result.error = "failed", str(exc)
        result.log_tail = _tail(paths.node(node.name).log)
        return result
    result.swtpm_pid = info.get("swtpm_pid")
    result.tcti = info.get("tcti")
    if kept_boot is not None:
        # A running node keeps what it booted; say so when the spec now differs.
        result.tampered = tuple(info.get("tampered") or ())
        if info.get("boot") != kept_boot.summary():
            result.note = ("runs another boot chain than the spec now gives; "
                           "`testbed down` then `testbed up` to apply the spec")
    return result


def load_registry(paths: ClusterPaths) -> AkRegistry:
    try:
        text = paths.registry.read_text()
    except FileNotFoundError:
        return AkRegistry()
    return AkRegistry.from_json(text)


def _register_all(paths: ClusterPaths, ca: LocalCA, results: list[NodeUpResult]) -> None:
    registry = load_registry(paths)
    bundle = ca.ca_bundle()
    for result in results:
        if result.action == "failed":
            continue
        try:
            register_node(paths, result.name, Registrar(bundle), registry)
            result.registered = True
        except TestbedError as exc:
            result.action, result.error = "failed", f"registration failed: {exc}"
    write_atomic(paths.registry, registry.to_json() + "\n")


def register_node(paths: ClusterPaths, node: str, registrar: Registrar,
                  registry: AkRegistry) -> None:
    """Activate ``node``'s AK against its validated EK and record it in ``registry``.

    The CLI is the registrar: Registrar.challenge validates the EK certificate
    against the work dir's CA and runs MakeCredential; only the TPM holding that
    EK can return the secret, proving the AK lives beside it.
    """
    agent = AgentClient(paths.node(node).socket, node=node)
    identity = agent.identity()
    ak = parse_public(identity.ak_public)
    if registry.node_of(ak) == node:
        return  # activated before: the AK is persistent, and still the one in this TPM
    challenge = registrar.challenge(identity.ek_certificate, identity.ek_public,
                                    identity.ak_public)
    secret = agent.activate(challenge)
    record = registrar.complete(ak.name, secret)
    registry.add(node, record.ak)


# --- status ---------------------------------------------------------------------------------------


@dataclass
class NodeStatus:
    name: str
    role: str
    state: str
    pid: int | None
    swtpm_pid: int | None
    tcti: str | None
    agent: str
    service: str | None
    tampered: list[str]
    last_attestation: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def status(workdir: Path, cluster: str) -> list[NodeStatus]:
    paths = ClusterPaths(workdir, cluster)
    spec = paths.load_spec() if paths.spec.is_file() else None
    specs = {n.name: n for n in spec.nodes} if spec else {}
    # Spec order first, then nodes left over from an earlier spec of this cluster.
    names = [*specs, *(n for n in paths.node_names() if n not in specs)]
    results = read_json(paths.attestations) or {}
    return [_node_status(paths, name, specs.get(name), results.get(name)) for name in names]


def _node_status(paths: ClusterPaths, name: str, node_spec: NodeSpec | None,
                 last: dict[str, Any] | None) -> NodeStatus:
    state = inspect_node(paths, name)
    service = None
    label = state.state
    if state.state == "running":
        try:
            service = str(AgentClient(paths.node(name).socket, timeout=2.0,
                                      node=name).status().get("service"))
        except TestbedError:
            label = "unresponsive"
    live = state.info if state.pid else {}  # what the running node reports about itself
    spec_tampered = node_spec.tampered.fields() if node_spec and node_spec.tampered else ()
    return NodeStatus(
        name=name, role=str(live.get("role") or (node_spec.role if node_spec else "?")),
        state=label, pid=state.pid, swtpm_pid=live.get("swtpm_pid"), tcti=live.get("tcti"),
        agent=str(paths.node(name).socket), service=service,
        tampered=list(live.get("tampered", spec_tampered)), last_attestation=last,
    )  # fmt: skip


# --- attest ---------------------------------------------------------------------------------------


class _HistoryStore:
    """A :class:`ClockHistory` persisted as the last accepted TPMS_ATTEST per AK.

    Only public ClockHistory methods are used: loading re-records each stored
    quote, which restores exactly the state the verifier had after accepting it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.history = ClockHistory()
        self._attests: dict[str, str] = {}
        doc = read_json(path)
        if doc is None:
            return
        if not isinstance(doc, dict) or doc.get("format") != _HISTORY_FORMAT \
                or not isinstance(doc.get("aks"), dict):
            raise StateError(f"{path} is not a clock history file")
        for name_hex, attest_b64 in doc["aks"].items():
            self._restore(str(name_hex), attest_b64)

    def _restore(self, name_hex: str, attest_b64: object) -> None:
        try:
            raw = base64.b64decode(str(attest_b64), validate=True)
            self.history.record(bytes.fromhex(name_hex), parse_attest(raw).clock_info, raw)
        except (binascii.Error, ValueError, EvidenceFormatError) as exc:
            raise StateError(f"{self.path}: entry {name_hex[:16]} is corrupt: {exc}") from None
        self._attests[name_hex] = str(attest_b64)

    def remember(self, evidence: Evidence) -> None:
        name = parse_public(evidence.ak_public).name.hex()
        self._attests[name] = base64.b64encode(evidence.attest).decode()

    def save(self) -> None:
        doc = {"format": _HISTORY_FORMAT, "version": 1, "aks": self._attests}
        write_atomic(self.path, json.dumps(doc, indent=1) + "\n")


@dataclass(frozen=True)
class AttestResult:
    cluster: str
    node: str
    policy: str
    nonce: bytes
    time: str
    report: VerificationReport

    def to_dict(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "node": self.node, "policy": self.policy,
                "nonce": self.nonce.hex(), "time": self.time, **self.report.to_dict()}


def attest(workdir: Path, cluster: str, node: str, *,
           policy_path: Path | None = None) -> AttestResult:
    """Quote ``node`` with a fresh nonce over its agent and verify it; record the result."""
    paths = ClusterPaths(workdir, cluster)
    spec = paths.load_spec()
    if node not in {n.name for n in spec.nodes}:  # a clear error, not a socket error
        raise StateError(f"cluster {cluster} has no node {node!r} (nodes: "
                         f"{', '.join(n.name for n in spec.nodes)})")
    policy = _attest_policy(paths, node, policy_path)
    nonce = os.urandom(32)
    evidence = AgentClient(paths.node(node).socket, node=node).quote(nonce, SIM_PCRS.indices)
    report = verify_evidence(workdir, cluster, node, evidence, nonce, policy)
    result = AttestResult(cluster, node, policy.name, nonce, _now(), report)
    _record_result(paths, result)
    return result


def _attest_policy(paths: ClusterPaths, node: str, explicit: Path | None) -> ReferencePolicy:
    path = explicit or paths.policy(node)
    if explicit is None and not path.is_file():
        raise StateError(f"node {node} has no policy at {path}; bring the cluster up with "
                         "`testbed up` or pass --policy FILE")
    return load_policy(path)


def verify_evidence(workdir: Path, cluster: str, node: str, evidence: Evidence, nonce: bytes,
                    policy: ReferencePolicy | None = None) -> VerificationReport:
    """Verify evidence claimed to come from ``node`` with the cluster's registry and history.

    The clock history is loaded, used and saved under a lock, so replays and
    rollbacks are caught across CLI invocations (and concurrent ones).
    """
    paths = ClusterPaths(workdir, cluster)
    registry = load_registry(paths)
    if node not in registry.nodes():
        raise StateError(f"node {node} is not registered in cluster {cluster}: its AK was "
                         "never activated (run `testbed up`)")
    if policy is None:
        policy = load_policy(paths.policy(node))
    with _flock(paths.attest_lock):
        store = _HistoryStore(paths.clock_history)
        verifier = QuoteVerifier(ak_trust=registry.for_node(node), policy=policy,
                                 clock_history=store.history)
        report = verifier.verify(evidence, nonce)
        if report.ok:
            store.remember(evidence)
            store.save()
    return report


def _record_result(paths: ClusterPaths, result: AttestResult) -> None:
    failure = result.report.failure
    with _flock(paths.attest_lock):
        doc = read_json(paths.attestations)
        doc = doc if isinstance(doc, dict) else {}
        doc[result.node] = {"ok": result.report.ok, "time": result.time,
                            "failed_check": failure.name if failure else None,
                            "detail": failure.detail if failure else None,
                            "policy": result.policy}
        write_atomic(paths.attestations, json.dumps(doc, indent=1, sort_keys=True) + "\n")


# --- down -----------------------------------------------------------------------------------------


@dataclass
class NodeDownResult:
    name: str
    node_pid: int | None = None
    stopped_by: str | None = None  # agent | SIGTERM | SIGKILL | None (was not running)
    swtpm_stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class DownResult:
    cluster: str
    nodes: list[NodeDownResult]
    purged: bool
    leftovers: list[ClusterProcess] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": not self.leftovers, "cluster": self.cluster, "purged": self.purged,
                "nodes": [n.to_dict() for n in self.nodes],
                "leftover_pids": [p.pid for p in self.leftovers]}


def down(workdir: Path, cluster: str, *, purge: bool = False) -> DownResult:
    """Stop every node and swtpm of ``cluster`` and verify none is left; remove run state.

    TPM state (node identities), the registry, policies and the clock history
    stay for the next `up` unless ``purge``, which removes the cluster directory.
    """
    paths = ClusterPaths(workdir, cluster)
    # Even with the cluster directory deleted, its processes are still found in /proc.
    lock = _flock(paths.lock) if paths.root.is_dir() else contextlib.nullcontext()
    with lock:
        names = sorted(set(paths.node_names()) | {p.node for p in cluster_processes(paths)})
        results = [_stop_node(paths, name) for name in names]
        for proc in cluster_processes(paths):  # anything not found through its pid file
            _signal_until_gone(proc.pid, paths, proc.kind, proc.node)
        leftovers = cluster_processes(paths)
        if not leftovers:
            _remove_state(paths, names, purge)
    return DownResult(cluster, results, purge and not leftovers, leftovers)


def _stop_node(paths: ClusterPaths, name: str) -> NodeDownResult:
    result = NodeDownResult(name, _node_pid(paths, name))
    if result.node_pid is not None:
        result.stopped_by = _stop_node_process(paths, name, result.node_pid)
    node_paths = paths.node(name)
    with contextlib.suppress(StateError):  # unreadable pid file: down()'s /proc scan finds it
        result.swtpm_stopped = Swtpm.stop_pidfile(node_paths.swtpm_pid)
    return result


def _stop_node_process(paths: ClusterPaths, name: str, pid: int) -> str | None:
    """Ask the agent to shut down (the node stops its swtpm itself), then signal."""
    with contextlib.suppress(TestbedError, AgentUnavailable):
        AgentClient(paths.node(name).socket, timeout=2.0, node=name).shutdown()
        if _wait_gone(pid, paths, "node", name, STOP_TIMEOUT_S):
            return "agent"
    return _signal_until_gone(pid, paths, "node", name)


def _remove_state(paths: ClusterPaths, names: list[str], purge: bool) -> None:
    if purge:
        shutil.rmtree(paths.root, ignore_errors=True)
        return
    for name in names:
        shutil.rmtree(paths.node(name).run, ignore_errors=True)


def node_info_atomic(paths: NodePaths, info: Mapping[str, Any]) -> None:
    """node.json, written by the node process (atomic: `up` polls it)."""
    write_atomic(paths.info, json.dumps(dict(info), indent=1) + "\n")
