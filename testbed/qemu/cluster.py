"""Clusters of real VMs: ``testbed up | status | attest | down`` for ``backend: qemu``.

Each node of a qemu cluster spec is a libvirt domain ``testbed-<cluster>.<node>.<tag>``
(:func:`domain_name`: unique per work directory, cluster and node) booting the
guest image under OVMF with its own vTPM. Unlike
:class:`~testbed.qemu.backend.QemuBackend` on its own, the VMs and the libvirt
daemons *outlive the command*: ``up`` boots, registers and attests, then hands
everything over (:meth:`QemuBackend.release`); ``down`` removes it.

State, in the sim layout (:class:`testbed.sim.ClusterPaths`)::

    WORKDIR/clusters/NAME/cluster.yaml, registry.json, clock-history.json,
        attestations.json, policies/NODE.yaml      as for sim nodes
    WORKDIR/clusters/NAME/nodes/NODE/vm.json       the running VM (see VM_FIELDS)
    WORKDIR/vms/NAME/NODE/                          console.log, OVMF_VARS.fd
    WORKDIR/run/libvirt/{libvirtd,virtlogd}.pid     daemons this work dir started
    /var/lib/libvirt/swtpm/<uuid>/                  the vTPM (made by the project)

The VM run directories are outside the 0700 cluster directory because QEMU runs
as ``libvirt-qemu`` and must reach its NVRAM file.

Others reach a running VM's guest agent with :func:`qemu_node_agent`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from attestation.errors import TestbedError
from attestation.policy import ReferencePolicy, dump_policy, load_policy
from attestation.registrar import Registrar
from attestation.tpm_types import parse_public
from testbed import sim
from testbed.cluster import ClusterSpec, NodeSpec, dump_cluster_spec
from testbed.errors import StateError
from testbed.localca import LocalCA
from testbed.progress import Progress
from testbed.qemu.accel import AccelChoice
from testbed.qemu.backend import GuestAgentClient, QemuBackend, QemuNode
from testbed.qemu.domain import DOMAIN_PREFIX, SWTPM_STORAGE, Vm, VmSpec, connect
from testbed.qemu.image import ImageArtifacts, build_image, image_cache
from testbed.qemu.libvirtd import Daemons, ensure_daemons, load_libvirt
from testbed.qemu.predict import QUOTED_PCRS
from testbed.qemu.recipe import load_recipe
from testbed.qemu.vm_roles import start_role_service
from testbed.sim import ClusterPaths, process_argv, read_json, read_pid, write_atomic

__all__ = [
    "ROLE_GUEST_PORTS",
    "VM_FIELDS",
    "QemuDownResult",
    "QemuNodeUp",
    "QemuUpResult",
    "VmProcess",
    "VmStatus",
    "attest",
    "cluster_backend",
    "domain_name",
    "down",
    "qemu_node_agent",
    "read_vm_info",
    "status",
    "up",
    "vm_processes",
]

VM_FIELDS = ("domain", "uuid", "agent_port", "accel", "accel_reason", "firmware", "image",
             "image_dir", "cmdline", "tampered", "memory_mib", "run_dir", "console_log",
             "booted_at", "boot_seconds", "service_ports")
"""The keys of ``nodes/NODE/vm.json`` (``boot_seconds`` is null until the agent answered;
``service_ports``: the host port on 127.0.0.1 of each of the role's guest services)."""
ROLE_GUEST_PORTS: dict[str, dict[str, int]] = {"cryptovm": {"cvm1": 9302}}
"""Per role, the guest services forwarded to the host (name -> guest port)."""
DAEMONS = ("libvirtd", "virtlogd")
LIBVIRT_DOMAIN_XML = Path("/etc/libvirt/qemu")  # where libvirtd keeps defined domains
STOP_TIMEOUT_S = 10.0
_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
           5: "shut off", 6: "crashed", 7: "suspended"}
_NODE = r"([a-z0-9][a-z0-9_-]{0,31})"
_NO_ACCEL = AccelChoice("tcg", "teardown")  # a VmSpec field that teardown does not use


# --- names and vm.json ------------------------------------------------------------------------


def domain_name(paths: ClusterPaths, node: str) -> str:
    """``testbed-<cluster>.<node>.<tag>``, ``tag`` a hash of the work directory.

    libvirt's domain names are machine-wide: the tag keeps two work directories
    with a cluster of the same name apart, and the dots (never part of a name)
    keep cluster ``a`` node ``b-c`` apart from cluster ``a-b`` node ``c``.
    """
    return f"{DOMAIN_PREFIX}{paths.name}.{node}.{_workdir_tag(paths)}"


def _workdir_tag(paths: ClusterPaths) -> str:
    return hashlib.sha256(str(paths.workdir).encode()).hexdigest()[:8]


def _domain_pattern(paths: ClusterPaths) -> str:
    """A regular expression for this cluster's domain names; group 1 is the node."""
    return (f"{re.escape(DOMAIN_PREFIX + paths.name)}\\.{_NODE}\\."
            f"{_workdir_tag(paths)}")


def vm_info_path(paths: ClusterPaths, node: str) -> Path:
    return paths.node(node).root / "vm.json"


def vm_run_dir(paths: ClusterPaths, node: str) -> Path:
    return paths.workdir / "vms" / paths.name / node


def read_vm_info(paths: ClusterPaths, node: str) -> dict[str, Any] | None:
    """A node's ``vm.json`` (:data:`VM_FIELDS`), or None if it has no VM."""
    info = read_json(vm_info_path(paths, node))
    if info is not None and not isinstance(info, dict):
        raise StateError(f"{vm_info_path(paths, node)} is not a JSON object; "
                         "`testbed down` removes it")
    return info


def _write_vm_info(paths: ClusterPaths, node: str, info: dict[str, Any]) -> None:
    write_atomic(vm_info_path(paths, node), json.dumps(info, indent=1) + "\n")


def qemu_node_agent(paths: ClusterPaths, node: str, *, timeout: float = 60.0
                    ) -> GuestAgentClient:
    """A client for the guest agent of ``node``'s running VM (port from its vm.json).

    Raises StateError naming what to do when the node has no VM. The client
    connects per request; a VM that stopped shows as ``OSError`` on the call.
    """
    info = read_vm_info(paths, node)
    port = info.get("agent_port") if info else None
    if not isinstance(port, int):
        raise StateError(f"node {node} of cluster {paths.name} has no running VM (no "
                         f"{vm_info_path(paths, node)}); bring it up with "
                         "`testbed up --backend qemu`")
    return GuestAgentClient(port, timeout=timeout, node=node)


def _vm_nodes(paths: ClusterPaths) -> list[str]:
    return [n for n in paths.node_names() if vm_info_path(paths, n).is_file()]


def cluster_backend(paths: ClusterPaths) -> str:
    """``qemu`` if the cluster's spec says so or any of its VMs left a trace, else ``sim``.

    Traces count because a crashed `up` may have booted VMs before anything else.
    """
    with contextlib.suppress(TestbedError):
        if paths.spec.is_file() and paths.load_spec().backend == "qemu":
            return "qemu"
    return "qemu" if _vm_nodes(paths) or vm_processes(paths) else "sim"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


# --- processes (/proc) ------------------------------------------------------------------------


@dataclass(frozen=True)
class VmProcess:
    pid: int
    kind: str  # "qemu" | "swtpm"
    node: str


def _classify(argv: list[str], paths: ClusterPaths) -> tuple[str, str] | None:
    """(kind, node) if ``argv`` is the QEMU or libvirt-run swtpm of one of our domains."""
    domain = _domain_pattern(paths)
    program = Path(argv[0]).name
    if program.startswith("qemu-system"):
        for arg in argv:  # -name guest=<domain>,debug-threads=on
            if match := re.fullmatch(f"guest={domain}(,.*)?", arg):
                return "qemu", match.group(1)
    if program == "swtpm":
        for arg in argv:  # --log file=/var/log/swtpm/libvirt/qemu/<domain>-swtpm.log
            # (not the control socket: libvirt truncates the domain name in that path)
            if match := re.fullmatch(f"file=.*/{domain}-swtpm\\.log(,.*)?", arg):
                return "swtpm", match.group(1)
    return None


def vm_processes(paths: ClusterPaths) -> list[VmProcess]:
    """Every live QEMU and swtpm process of this cluster's VMs, found by scanning /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            argv = process_argv(int(entry.name))
            kind = _classify(argv, paths) if argv else None
            if kind is not None:
                found.append(VmProcess(int(entry.name), *kind))
    return sorted(found, key=lambda p: (p.node, p.kind, p.pid))


def _is_ours(proc: VmProcess, paths: ClusterPaths) -> bool:
    argv = process_argv(proc.pid)
    return argv is not None and _classify(argv, paths) == (proc.kind, proc.node)


def _signal_until_gone(proc: VmProcess, paths: ClusterPaths) -> None:
    """SIGTERM, then SIGKILL, only while the pid is still verifiably one of ours."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_ours(proc, paths):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S / 2
        while time.monotonic() < deadline and _is_ours(proc, paths):
            time.sleep(0.05)


# --- libvirt ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _libvirt(paths: ClusterPaths) -> Iterator[Any]:
    """A connection; daemons are started if needed and left running (``down`` stops them)."""
    ensure_daemons(paths.workdir / "run" / "libvirt")
    conn = connect()
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _lookup(conn: Any, name: str) -> Any | None:
    libvirt = load_libvirt()
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError:
        return None


def _domain_state(domain: Any | None) -> str:
    if domain is None:
        return "missing"
    libvirt = load_libvirt()
    try:
        return _STATES.get(int(domain.state()[0]), "unknown")
    except libvirt.libvirtError:
        return "missing"


def _remove_domain(conn: Any, domain: Any) -> None:
    """Destroy and undefine with NVRAM and vTPM state (libvirt stops swtpm with QEMU)."""
    spec = VmSpec(name=domain.name(), kernel=Path(), initrd=Path(), cmdline="",
                  run_dir=Path("/nonexistent"), agent_port=0, guest_port=0,
                  accel=_NO_ACCEL, uuid=domain.UUIDString())
    Vm(conn, spec, domain).destroy()


def _cluster_domains(conn: Any, paths: ClusterPaths) -> dict[str, Any]:
    """node -> libvirt domain, for every domain (running or not) of this cluster."""
    pattern = re.compile(_domain_pattern(paths))
    return {match.group(1): d for d in conn.listAllDomains(0)
            if (match := pattern.fullmatch(d.name()))}


# --- up ---------------------------------------------------------------------------------------


@dataclass
class QemuNodeUp:
    name: str
    role: str
    action: str = "started"  # started | kept | failed
    domain: str = ""
    agent_port: int | None = None
    boot_seconds: float | None = None
    registered: bool = False
    attested: bool | None = None  # None: not attested (failed before)
    failed_check: str | None = None
    detail: str | None = None
    tampered: tuple[str, ...] = ()
    error: str | None = None
    console_tail: str | None = None
    note: str | None = None
    service: str | None = None  # the role's service in the VM, when it has one

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "tampered": list(self.tampered)}


@dataclass
class QemuUpResult:
    cluster: str
    directory: Path
    accel: str
    accel_reason: str
    image: str
    nodes: list[QemuNodeUp]
    seconds: float = 0.0  # the whole `up`, image and policies included
    vm_seconds: float = 0.0  # first define -> every VM attested

    @property
    def ok(self) -> bool:
        """Every node booted and registered (a rejected attestation is reported, not failed)."""
        return all(n.action != "failed" for n in self.nodes)

    @property
    def rejected(self) -> list[str]:
        """Honest (untampered) nodes whose attestation was rejected: something is wrong."""
        return [n.name for n in self.nodes if n.attested is False and not n.tampered]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "backend": "qemu", "cluster": self.cluster,
                "directory": str(self.directory), "accel": self.accel,
                "accel_reason": self.accel_reason, "image": self.image,
                "seconds": round(self.seconds, 1),
                "seconds_define_to_all_attested": round(self.vm_seconds, 1),
                "all_attested": all(n.attested for n in self.nodes),
                "nodes": [n.to_dict() for n in self.nodes]}


@dataclass
class _Up:
    """What one `up` works with."""

    paths: ClusterPaths
    spec: ClusterSpec
    backend: QemuBackend
    image: ImageArtifacts
    policies: dict[str, ReferencePolicy]
    ca: LocalCA
    registry_lock: threading.Lock = field(default_factory=threading.Lock)


def up(workdir: Path, spec: ClusterSpec, *, progress: Progress | None = None) -> QemuUpResult:
    """Boot every VM of ``spec`` that is not running (in parallel), register and attest all.

    The VMs keep running after this returns; ``down`` stops them.
    """
    if spec.backend != "qemu":
        raise StateError(f"cluster {spec.name} has backend {spec.backend}, not qemu")
    paths = ClusterPaths(workdir, spec.name)
    progress = progress or Progress(quiet=True)
    progress.total = 4 + len(spec.nodes)
    started = time.monotonic()
    sim._private_dir(paths.root)
    with progress.step("guest image (built once, then cached)"):
        image = build_image(image_cache(paths.workdir), load_recipe(spec.image) if spec.image
                            else None)
    with progress.step("libvirt (started if needed, left running)"):
        backend = QemuBackend(paths.workdir, reference_dir=image_cache(paths.workdir) / "firmware")
    try:
        with sim._flock(paths.lock):
            with progress.step("predicted policies (firmware reference captured once)"):
                policies = {n.name: _policy(backend, image, n) for n in spec.nodes}
                _write_spec_and_policies(paths, spec, policies)
            run = _Up(paths, spec, backend, image, policies, LocalCA.ensure(paths.ca_dir))
            define = time.monotonic()
            results = _boot_all(run, progress)
            done = time.monotonic()
    finally:
        backend.release()  # the VMs and daemons stay up
    return QemuUpResult(spec.name, paths.root, backend.accel.accel, backend.accel.reason,
                        image.digest, results, done - started, done - define)


def _policy(backend: QemuBackend, image: ImageArtifacts, node: NodeSpec) -> ReferencePolicy:
    """Predicted from the image and the node's *honest* command line, or the spec's file."""
    if node.policy is not None:
        return load_policy(node.policy)
    policy = backend.predicted_policy(image, node.boot.cmdline)
    return replace(policy, name=f"{node.name}-predicted")


def _write_spec_and_policies(paths: ClusterPaths, spec: ClusterSpec,
                             policies: dict[str, ReferencePolicy]) -> None:
    sim._private_dir(paths.root / "policies")
    write_atomic(paths.spec, dump_cluster_spec(spec))
    for name, policy in policies.items():
        write_atomic(paths.policy(name), dump_policy(policy))


def _boot_all(run: _Up, progress: Progress) -> list[QemuNodeUp]:
    names = ", ".join(n.name for n in run.spec.nodes)
    with progress.step(f"defining and starting VMs ({names}; {run.backend.accel.accel})"):
        booted = {n.name: _boot_or_keep(run, run.backend.conn, n) for n in run.spec.nodes}
    with concurrent.futures.ThreadPoolExecutor(len(booted)) as pool:
        futures = {name: pool.submit(_bring_up, run, *item) for name, item in booted.items()}
        results = []
        for node in run.spec.nodes:
            tampered = ", TAMPERED" if node.tampered else ""
            with progress.step(f"node {node.name} ({node.role}{tampered}): boot, EK check, "
                               "credential activation, attestation"):
                results.append(futures[node.name].result())
    return results


def _boot_or_keep(run: _Up, conn: Any, node: NodeSpec) -> tuple[QemuNodeUp, QemuNode | None]:
    """Keep a running VM of this cluster, else (re)define and start one."""
    paths, name = run.paths, node.name
    result = QemuNodeUp(name, node.role, domain=domain_name(paths, name),
                        tampered=node.tampered.fields() if node.tampered else ())
    domain = _lookup(conn, result.domain)
    info = read_vm_info(paths, name) or {}
    if domain is not None and domain.isActive() and info.get("uuid") == domain.UUIDString():
        result.action, result.agent_port = "kept", info.get("agent_port")
        result.boot_seconds = info.get("boot_seconds")
        result.tampered = tuple(info.get("tampered") or ())
        changed = [what for what, now, then in (
            ("command line", node.effective_boot.cmdline, info.get("cmdline")),
            ("guest image", run.image.digest, info.get("image"))) if now != then]
        if changed:  # its policy is the spec's now: attestation will say whether it matters
            result.note = (f"runs another {' and '.join(changed)} than the spec now gives; "
                           "`testbed down` then `testbed up --backend qemu` to apply the spec")
        return result, None
    if domain is not None:  # stopped, crashed, or not the VM our vm.json describes
        _remove_domain(conn, domain)
    try:
        booted = _boot(run, node, result)
    except TestbedError as exc:
        result.action, result.error = "failed", f"could not start the VM: {exc}"
        return result, None
    return result, booted


def _boot(run: _Up, node: NodeSpec, result: QemuNodeUp) -> QemuNode:
    paths, cmdline = run.paths, node.effective_boot.cmdline
    sim._private_dir(paths.node(node.name).root)
    vm_info_path(paths, node.name).unlink(missing_ok=True)
    service_ports = ROLE_GUEST_PORTS.get(node.role, {})
    booted = run.backend.boot(node.name, run.image, cmdline=cmdline, domain=result.domain,
                              run_dir=vm_run_dir(paths, node.name),
                              guest_ports=list(service_ports.values()))
    spec = booted.vm.spec
    result.agent_port = spec.agent_port
    _write_vm_info(paths, node.name, {
        "service_ports": {name: host for name, (host, _) in zip(service_ports, spec.forwards,
                                                                 strict=True)},
        "domain": spec.name, "uuid": spec.uuid, "agent_port": spec.agent_port,
        "accel": spec.accel.accel, "accel_reason": spec.accel.reason, "firmware": spec.firmware,
        "image": run.image.digest, "image_dir": str(run.image.directory), "cmdline": cmdline,
        "tampered": list(result.tampered), "memory_mib": spec.memory_mib,
        "run_dir": str(spec.run_dir), "console_log": str(spec.console_log),
        "booted_at": _now(), "boot_seconds": None})  # fmt: skip
    return booted


def _bring_up(run: _Up, result: QemuNodeUp, booted: QemuNode | None) -> QemuNodeUp:
    """Wait for the agent (new VMs), register the AK, attest against the node's policy."""
    if result.action == "failed":
        return result
    try:
        if booted is not None:
            run.backend.wait(booted)
            result.boot_seconds = round(booted.boot_seconds or 0.0, 1)
            info = read_vm_info(run.paths, result.name) or {}
            _write_vm_info(run.paths, result.name, {**info, "boot_seconds": result.boot_seconds})
        agent = qemu_node_agent(run.paths, result.name)
        _register(run, result.name, agent)
        result.registered = True
        outcome = _attest(run.paths, result.name, agent, run.policies[result.name])
    except (TestbedError, OSError) as exc:
        result.action, result.error = "failed", str(exc).split("; console:")[0]
        if booted is not None:
            result.console_tail = booted.vm.console(15)
        return result
    report = outcome.report
    result.attested = report.ok
    if report.failure is not None:
        result.failed_check, result.detail = report.failure.name, report.failure.detail
        return result  # no service on a VM that failed its attestation
    try:
        info = read_vm_info(run.paths, result.name) or {}
        result.service = start_role_service(run.paths, result.name, result.role, agent,
                                            info.get("service_ports") or {})
    except (TestbedError, OSError) as exc:
        result.action, result.error = "failed", f"{result.role} service: {exc}"
    return result


def _register(run: _Up, node: str, agent: GuestAgentClient) -> None:
    """EK certificate against the work dir's CA, credential activation, AK into registry.json."""
    ek_cert, ek_public, ak_public = agent.identity()
    ak = parse_public(ak_public)
    with run.registry_lock:
        if sim.load_registry(run.paths).node_of(ak) == node:
            return  # the AK persists in this vTPM and was activated before
    registrar = Registrar(run.ca.ca_bundle())
    challenge = registrar.challenge(ek_cert, ek_public, ak_public)
    record = registrar.complete(ak.name, agent.activate(challenge))
    with run.registry_lock:
        registry = sim.load_registry(run.paths)
        registry.add(node, record.ak)  # replaces the AK of an earlier VM of this node
        write_atomic(run.paths.registry, registry.to_json() + "\n")


# --- attest -----------------------------------------------------------------------------------


def _attest(paths: ClusterPaths, node: str, agent: GuestAgentClient,
            policy: ReferencePolicy) -> sim.AttestResult:
    """A fresh quote from inside the guest, verified and recorded as for sim nodes."""
    nonce = os.urandom(32)
    evidence = agent.quote(nonce, QUOTED_PCRS)
    report = sim.verify_evidence(paths.workdir, paths.name, node, evidence, nonce, policy)
    result = sim.AttestResult(paths.name, node, policy.name, nonce, _now(), report)
    sim._record_result(paths, result)
    return result


def attest(workdir: Path, cluster: str, node: str, *,
           policy_path: Path | None = None) -> sim.AttestResult:
    """``testbed attest NODE`` for a VM: quote PCRs 0-9 with a fresh nonce and verify it."""
    paths = ClusterPaths(workdir, cluster)
    spec = paths.load_spec()
    spec.node(node)  # a clear error for an unknown node
    policy_file = policy_path or paths.policy(node)
    if not policy_file.is_file():
        raise StateError(f"node {node} has no policy at {policy_file}; bring the cluster up "
                         "with `testbed up --backend qemu` or pass --policy FILE")
    agent = qemu_node_agent(paths, node)
    try:
        return _attest(paths, node, agent, load_policy(policy_file))
    except OSError as exc:
        raise StateError(f"node {node}: its VM's guest agent on 127.0.0.1:{agent.port} does "
                         f"not answer ({exc}); see `testbed status`, then `testbed up "
                         "--backend qemu`") from None


# --- status -----------------------------------------------------------------------------------


@dataclass
class VmStatus:
    name: str
    role: str
    domain: str
    state: str  # libvirt's: running, shut off, paused, crashed, ...; missing; down (no VM)
    agent: str | None  # answering | not answering | None (not running)
    accel: str | None
    firmware: str | None
    tpm: str | None
    swtpm_pid: int | None
    qemu_pid: int | None
    agent_port: int | None
    booted_at: str | None
    boot_seconds: float | None
    cmdline: str | None
    tampered: list[str]
    image: str | None
    last_attestation: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def status(workdir: Path, cluster: str) -> list[VmStatus]:
    """Each node's VM: libvirt state, accelerator, vTPM, agent, boot time, last attestation."""
    paths = ClusterPaths(workdir, cluster)
    spec = paths.load_spec() if paths.spec.is_file() else None
    roles = {n.name: n.role for n in spec.nodes} if spec else {}
    names = [*roles, *(n for n in paths.node_names() if n not in roles)]
    last = read_json(paths.attestations) or {}
    procs = vm_processes(paths)
    if not _vm_nodes(paths) and not procs:  # nothing to ask libvirt about
        return [_status(paths, n, roles.get(n, "?"), None, procs, last.get(n)) for n in names]
    with _libvirt(paths) as conn:
        domains = _cluster_domains(conn, paths)
        return [_status(paths, n, roles.get(n, "?"), domains.get(n), procs, last.get(n))
                for n in names]


def _status(paths: ClusterPaths, name: str, role: str, domain: Any | None,
            procs: list[VmProcess], last: dict[str, Any] | None) -> VmStatus:
    info = read_vm_info(paths, name) or {}
    state = _domain_state(domain) if info or domain is not None else "down"
    pids = {p.kind: p.pid for p in procs if p.node == name}
    agent = None
    if state == "running":
        agent = "answering" if _answers(paths, name) else "not answering"
    return VmStatus(
        name=name, role=role, domain=domain_name(paths, name), state=state, agent=agent,
        accel=info.get("accel"), firmware=info.get("firmware"),
        tpm="swtpm (run by libvirt), EK certificate from the work dir's CA" if info else None,
        swtpm_pid=pids.get("swtpm"), qemu_pid=pids.get("qemu"),
        agent_port=info.get("agent_port"), booted_at=info.get("booted_at"),
        boot_seconds=info.get("boot_seconds"), cmdline=info.get("cmdline"),
        tampered=list(info.get("tampered") or []), image=info.get("image"),
        last_attestation=last)  # fmt: skip


def _answers(paths: ClusterPaths, node: str) -> bool:
    try:
        qemu_node_agent(paths, node, timeout=3.0).status()
    except (TestbedError, OSError, ValueError):
        return False
    return True


# --- down -------------------------------------------------------------------------------------


@dataclass
class QemuDownResult:
    cluster: str
    nodes: list[str]  # the domains removed, by node
    purged: bool
    daemons: str
    leftovers: list[VmProcess] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": not self.leftovers, "backend": "qemu", "cluster": self.cluster,
                "purged": self.purged, "removed_domains": self.nodes, "daemons": self.daemons,
                "leftover_pids": [p.pid for p in self.leftovers]}


def down(workdir: Path, cluster: str, *, purge: bool = False) -> QemuDownResult:
    """Destroy and undefine every VM of ``cluster`` (vTPM and NVRAM included), verify in
    /proc that no QEMU or swtpm of it is left, then stop the daemons this work dir started
    if no domain remains. Registry, policies and attestation history stay unless ``purge``.
    """
    paths = ClusterPaths(workdir, cluster)
    lock = sim._flock(paths.lock) if paths.root.is_dir() else contextlib.nullcontext()
    with lock:
        removed, daemons = _teardown_libvirt(paths)
        for proc in vm_processes(paths):  # e.g. a QEMU libvirt lost track of
            _signal_until_gone(proc, paths)
        leftovers = _wait_processes_gone(paths)
        if not leftovers:
            _remove_state(paths, purge)
    return QemuDownResult(cluster, removed, purge and not leftovers, daemons(), leftovers)


def _teardown_libvirt(paths: ClusterPaths) -> tuple[list[str], Callable[[], str]]:
    """Remove the cluster's domains; libvirt is only started if anything may need it."""
    if not (_vm_nodes(paths) or vm_processes(paths) or _defined_domains(paths)
            or _our_daemons(paths)):
        return [], lambda: "libvirt not needed: no VM of this cluster anywhere"
    with _libvirt(paths) as conn:
        return _remove_domains(conn, paths), _stop_daemons(paths, conn)


def _defined_domains(paths: ClusterPaths) -> list[Path]:
    """libvirt's saved definitions of this cluster's domains (seen without a daemon)."""
    pattern = re.compile(_domain_pattern(paths) + r"\.xml")
    return [p for p in LIBVIRT_DOMAIN_XML.glob(f"{DOMAIN_PREFIX}*.xml")
            if pattern.fullmatch(p.name)]


def _remove_domains(conn: Any, paths: ClusterPaths) -> list[str]:
    domains = _cluster_domains(conn, paths)
    for domain in domains.values():
        _remove_domain(conn, domain)
    for node in _vm_nodes(paths):  # vTPM state of a VM whose domain is already gone
        uuid = (read_vm_info(paths, node) or {}).get("uuid")
        if isinstance(uuid, str) and re.fullmatch(r"[0-9a-f-]{36}", uuid):
            shutil.rmtree(SWTPM_STORAGE / uuid, ignore_errors=True)
    return sorted(domains)


def _wait_processes_gone(paths: ClusterPaths) -> list[VmProcess]:
    """libvirt reaps QEMU and swtpm asynchronously: give them a moment."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (left := vm_processes(paths)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _remove_state(paths: ClusterPaths, purge: bool) -> None:
    shutil.rmtree(paths.workdir / "vms" / paths.name, ignore_errors=True)
    if purge:
        shutil.rmtree(paths.root, ignore_errors=True)
        return
    for node in paths.node_names():
        vm_info_path(paths, node).unlink(missing_ok=True)


def _stop_daemons(paths: ClusterPaths, conn: Any) -> Callable[[], str]:
    """Decide now (connection open) whether to stop our daemons; stop them after it closes."""
    # Running domains only: a stale definition someone left must not pin the daemons.
    remaining = [d.name() for d in conn.listAllDomains(0) if d.isActive()]
    run_dir = paths.workdir / "run" / "libvirt"
    ours = _our_daemons(paths)
    if not ours:
        return lambda: "libvirtd/virtlogd were not started by this work directory: left alone"
    if remaining:
        return lambda: (f"libvirtd/virtlogd kept running: other domains remain "
                        f"({', '.join(sorted(remaining))})")

    def stop() -> str:  # called once the connection is closed
        Daemons(run_dir, dict(ours)).stop()
        return f"stopped {', '.join(sorted(ours))} (started by this work directory)"
    return stop


def _our_daemons(paths: ClusterPaths) -> dict[str, int]:
    """libvirtd/virtlogd started by this work directory's commands, still running."""
    run_dir = paths.workdir / "run" / "libvirt"
    return {name: pid for name in DAEMONS
            if (pid := read_pid(run_dir / f"{name}.pid")) and _is_daemon(pid, name, run_dir)}


def _is_daemon(pid: int, name: str, run_dir: Path) -> bool:
    """Whether ``pid`` is ``name`` started by us: its argv names our pid file."""
    argv = process_argv(pid)
    return argv is not None and Path(argv[0]).name == name \
        and str(run_dir / f"{name}.pid") in argv
