"""The ``qemu`` backend: each node of a cluster is a libvirt VM booting the guest image.

A node is the domain ``testbed-<cluster>.<node>.<tag>`` (:func:`domain_name`: unique per
work directory, cluster and node) under OVMF with its own vTPM; its policy is predicted
from the guest image and the node's *honest* command line (:mod:`testbed.qemu.predict`).
The VMs and the libvirt daemons *outlive the command*: ``up`` boots them (in parallel)
and hands them over (:meth:`VmDriver.release`); ``down`` removes them.

State, in the work directory's layout (:mod:`testbed.core.paths`)::

    clusters/NAME/nodes/NODE/vm.json     the running VM (:class:`VmRecord`)
    vms/NAME/NODE/                       console.log, OVMF_VARS.fd
    clusters/NAME/network.json           the VM network's members (:mod:`testbed.qemu.network`)
    bridge tblab<tag>                    the cluster's lab segment (removed by ``down``)
    run/libvirt/{libvirtd,virtlogd}.pid  daemons this work dir started
    /var/lib/libvirt/swtpm/<uuid>/       the vTPM (manufactured by the project)

The VM run directories are outside the 0700 cluster directory because QEMU runs as
``libvirt-qemu`` and must reach its NVRAM file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Self

from attestation.errors import TestbedError
from attestation.files import atomic_write, private_dir
from attestation.policy import ReferencePolicy
from attestation.tpm_types import PcrSelection
from cryptovm.disks import Call, ensure_disk_key
from testbed.cluster.agent import AgentClient, TcpTransport
from testbed.cluster.results import (
    DaemonsOutcome,
    DownResult,
    EnrollmentOutcome,
    NodeDown,
    NodeStatus,
    NodeUp,
    OwnedProcess,
    ServiceInfo,
)
from testbed.cluster.runtime import ensure_runtime_policy
from testbed.cluster.state import load_registry, load_spec, read_attestations, spec_policy
from testbed.core.clock import utc_now
from testbed.core.errors import ArgumentError, StateError
from testbed.core.files import locked, read_json
from testbed.core.paths import ClusterPaths
from testbed.core.processes import process_argv, read_pid, scan_processes, terminate
from testbed.core.progress import Progress
from testbed.hosts.layout import HostsError, LabPaths, LabState
from testbed.hosts.network import add_segment_port, delete_links
from testbed.hosts.placement import PlacedHost, require_trusted
from testbed.hosts.remote import SshTcpTransport
from testbed.qemu.accel import AccelChoice
from testbed.qemu.disks import (
    HOTPLUG_PORTS,
    GuestDiskKeys,
    VmDiskFiles,
    attach_host_disk,
    attach_plain_disk,
    attached_serials,
    disk_root,
    disk_status,
    remove_disk_secrets,
    unlock_guest_disks,
)
from testbed.qemu.domain import DOMAIN_PREFIX, SWTPM_STORAGE, Vm, VmSpec, connect
from testbed.qemu.image.build import GuestImage, build_image, image_cache
from testbed.qemu.libvirtd import Daemons, LibvirtError, ensure_daemons, load_libvirt
from testbed.qemu.network import (
    NO_CRYPTOVM,
    Provisioned,
    bridge_name,
    ensure_bridge,
    provision,
    remove_bridge,
    segment_port,
    segment_prefix,
)
from testbed.qemu.network import STATE_FILE as NETWORK_FILE
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.qemu.predict.runtime import vm_runtime_policy
from testbed.qemu.relay import configure_guest, enroll_guest
from testbed.qemu.store_disk import (
    attach_store_disk,
    discard_store_image,
    reboot_domain,
    store_disk,
    store_status,
)
from testbed.qemu.vms import PORT_ATTEMPTS, QemuNode, VmDriver
from testbed.roles.cryptovm import cryptovm_endpoint, publish_on_host
from testbed.roles.registry import role
from testbed.roles.revocation import provision_vm
from testbed.roles.trust import cluster_tls_ca
from testbed.spec.cluster_spec import ClusterSpec, DiskSpec, NodeSpec
from testbed.spec.recipe import load_recipe
from testbed.svd.volumes import DiskStatus

__all__ = ["QemuBackend", "QemuFacts", "VmFacts", "VmRecord", "VmStatusFacts", "domain_name"]

DAEMONS = ("libvirtd", "virtlogd")
LIBVIRT_DOMAIN_XML = Path("/etc/libvirt/qemu")  # where libvirtd keeps defined domains
STOP_TIMEOUT_S = 10.0
_STATES = {0: "no state", 1: "running", 2: "blocked", 3: "paused", 4: "shutting down",
           5: "shut off", 6: "crashed", 7: "suspended"}
_NODE = r"([a-z0-9][a-z0-9_-]{0,31})"
_NO_ACCEL = AccelChoice("tcg", "teardown")  # a VmSpec field that teardown does not use
HOST_PORTS = (20000, 40000)  # a placed VM's forwards on its host's address (its own netns)


# --- names and vm.json ------------------------------------------------------------------------


def domain_name(paths: ClusterPaths, node: str) -> str:
    """``testbed-<cluster>.<node>.<tag>``, ``tag`` a hash of the work directory.

    libvirt's domain names are machine-wide: the tag keeps two work directories with a
    cluster of the same name apart, and the dots (never part of a name) keep cluster
    ``a`` node ``b-c`` apart from cluster ``a-b`` node ``c``.
    """
    return f"{DOMAIN_PREFIX}{paths.name}.{node}.{_workdir_tag(paths)}"


def _workdir_tag(paths: ClusterPaths) -> str:
    return hashlib.sha256(str(paths.workdir).encode()).hexdigest()[:8]


def _domain_pattern(paths: ClusterPaths) -> str:
    """A regular expression for this cluster's domain names; group 1 is the node."""
    return f"{re.escape(DOMAIN_PREFIX + paths.name)}\\.{_NODE}\\.{_workdir_tag(paths)}"


@dataclass(frozen=True)
class VmRecord:
    """A node's running VM, as ``nodes/NODE/vm.json`` keeps it."""

    domain: str
    uuid: str
    agent_port: int
    accel: str
    accel_reason: str
    firmware: str
    image: str  # the guest image's digest
    image_dir: str
    cmdline: str
    tampered: tuple[str, ...]
    memory_mib: int
    run_dir: str
    console_log: str
    booted_at: str
    boot_seconds: float | None = None  # None until the agent answered
    service_ports: dict[str, int] = field(default_factory=dict)  # role service -> host port
    host: str | None = None  # the lab host it is placed on (docs/hosts.md); None: local

    def save(self, paths: ClusterPaths, node: str) -> None:
        doc = {**asdict(self), "tampered": list(self.tampered)}
        atomic_write(paths.node(node).vm, (json.dumps(doc, indent=1) + "\n").encode())

    @classmethod
    def load(cls, paths: ClusterPaths, node: str) -> Self | None:
        """The node's record, None if it has no VM."""
        path = paths.node(node).vm
        doc = read_json(path)
        if doc is None:
            return None
        try:
            record = cls(**{**doc, "tampered": tuple(doc.get("tampered") or ())})
        except TypeError:
            record = None
        if record is None or not isinstance(record.agent_port, int) \
                or not isinstance(record.domain, str) or not isinstance(record.uuid, str):
            raise StateError(f"{path} is damaged; `testbed down` removes it")
        return record


@dataclass(frozen=True)
class VmFacts:
    """A VM in the result of ``up``."""

    domain: str
    agent_port: int | None = None
    boot_seconds: float | None = None
    host: str | None = None  # the lab host it runs on; None: the local libvirt
    disks: tuple[DiskStatus, ...] = ()  # host-side disks attached after attestation

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["disks"] = [d.to_dict() for d in self.disks]
        return out

    def summary_items(self) -> list[tuple[str, str]]:
        boot = f"{self.boot_seconds:.1f} s" if self.boot_seconds is not None else "-"
        items = [("domain", self.domain), ("host", self.host or "local"),
                 ("port", str(self.agent_port or "-")), ("boot", boot)]
        if self.disks:
            items.append(("disks", ", ".join(d.summary() for d in self.disks)))
        return items


@dataclass(frozen=True)
class VmStatusFacts:
    """A VM in the result of ``status``."""

    domain: str
    accel: str | None = None
    firmware: str | None = None
    tpm: str | None = None
    qemu_pid: int | None = None
    swtpm_pid: int | None = None
    agent_port: int | None = None
    booted_at: str | None = None
    boot_seconds: float | None = None
    cmdline: str | None = None
    image: str | None = None
    host: str | None = None  # the lab host it runs on; None: the local libvirt
    disks: tuple[DiskStatus, ...] = ()  # host-side disks: attached (unlocked) or not

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["disks"] = [d.to_dict() for d in self.disks]
        return out

    def summary_items(self) -> list[tuple[str, str]]:
        boot = f"{self.boot_seconds:.1f} s" if self.boot_seconds is not None else "-"
        items = [("domain", self.domain), ("host", self.host or "local"),
                 ("accel", self.accel or "-"),
                 ("qemu", str(self.qemu_pid or "-")), ("swtpm", str(self.swtpm_pid or "-")),
                 ("port", str(self.agent_port or "-")), ("boot", boot)]
        if self.disks:
            items.append(("disks", ", ".join(d.summary() for d in self.disks)))
        return items


@dataclass(frozen=True)
class QemuFacts:
    """The whole ``up``: accelerator, guest image, VM time."""

    accel: str
    accel_reason: str
    image: str
    seconds_define_to_all_attested: float
    network: dict[str, Any] | None = None  # the VM network (testbed/qemu/network.py)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds_define_to_all_attested":
                round(self.seconds_define_to_all_attested, 1)}

    def summary_items(self) -> list[tuple[str, str]]:
        items = [("accel", f"{self.accel} ({self.accel_reason})"), ("image", self.image[:16]),
                 ("VMs", f"{self.seconds_define_to_all_attested:.1f} s from the first define")]
        if self.network is not None:
            members = ", ".join(self.network["members"]) or "none"
            source = self.network.get("cryptovm")
            items.append(("network", f"WireGuard between {members}" + (
                f" (peers released by {source})" if source else f" ({NO_CRYPTOVM})")))
        return items


# --- processes (/proc) ------------------------------------------------------------------------


def _classify(argv: list[str], paths: ClusterPaths) -> tuple[str, str] | None:
    """(kind, node) if ``argv`` is the QEMU or libvirt-run swtpm of one of our domains."""
    if not argv:
        return None
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


def vm_processes(paths: ClusterPaths) -> list[OwnedProcess]:
    """Every live QEMU and swtpm process of this cluster's VMs, found by scanning /proc."""
    found = [OwnedProcess(pid, kind, node)
             for pid, (kind, node) in scan_processes(lambda argv: _classify(argv, paths))]
    return sorted(found, key=lambda p: (p.node, p.kind, p.pid))


def _is_ours(proc: OwnedProcess, paths: ClusterPaths) -> bool:
    argv = process_argv(proc.pid)
    return argv is not None and _classify(argv, paths) == (proc.kind, proc.node)


# --- libvirt ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _libvirt(paths: ClusterPaths) -> Iterator[Any]:
    """A connection; daemons are started if needed and left running (``down`` stops them)."""
    ensure_daemons(paths.libvirt_run)
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


# --- the backend ------------------------------------------------------------------------------


class QemuBackend:
    """VMs under libvirt on this machine (see the module docstring)."""

    name = "qemu"
    pcrs = PcrSelection("sha256", QUOTED_PCRS)

    def __init__(self, paths: ClusterPaths) -> None:
        self.paths = paths
        self._driver: VmDriver | None = None
        self._image: GuestImage | None = None
        self._booted: dict[str, QemuNode] = {}
        self._launched = 0.0
        self._network: dict[str, Any] | None = None
        self._hosts: dict[str, PlacedHost] = {}  # placement: host -> its SSH side
        self._host_conns: dict[str, Any] = {}  # host -> libvirt over qemu+ssh
        self._artifacts: dict[str, tuple[str, str]] = {}  # host -> (kernel, initrd) there
        self._disk_specs: dict[str, list[DiskSpec]] = {}
        self._store_specs: dict[str, DiskSpec | None] = {}
        # A cluster with disks gives every VM the empty hot-plug ports (no firmware event):
        # a disk can then be attached to any of its VMs (stolen-disk attaches a copy).
        self._hotplug_ports = 0

    @staticmethod
    def has_traces(paths: ClusterPaths) -> bool:
        """Whether the cluster's spec says qemu or any of its VMs left a trace (a crashed
        ``up`` may have booted VMs before it wrote anything else)."""
        with contextlib.suppress(TestbedError):
            if paths.spec.is_file() and load_spec(paths).backend == "qemu":
                return True
        return bool(_vm_nodes(paths) or vm_processes(paths))

    # --- up -------------------------------------------------------------------------------

    def prepare(self, spec: ClusterSpec, progress: Progress) -> dict[str, ReferencePolicy]:
        if spec.backend != "qemu":
            raise StateError(f"cluster {spec.name} has backend {spec.backend}, not qemu")
        self._trusted_hosts(spec)  # before anything is built, copied or defined
        self._hotplug_ports = HOTPLUG_PORTS if any(n.disks for n in spec.nodes) else 0
        # + the VM network (keyless TLS adds its own) + copying artifacts to hosts
        progress.expect(5 + len(spec.nodes) + bool(self._hosts))
        cache = image_cache(self.paths.workdir)
        recipe = load_recipe(spec.image) if spec.image else load_recipe()
        with progress.step("guest image (built once, then cached)"):
            self._image = build_image(cache, recipe)
        with progress.step("libvirt (started if needed, left running)"):
            self._driver = VmDriver(self.paths.workdir, reference_dir=cache / "firmware")
        if self._hosts:
            with progress.step(f"hosts {', '.join(sorted(self._hosts))}: intermediate CA, "
                               "guest image (copied by digest over SFTP, verified there)"):
                self._copy_artifacts()
        with progress.step("predicted policies (firmware reference captured once)"):
            for node in spec.nodes:  # PCR 10: the guest agent's files (docs/runtime.md)
                ensure_runtime_policy(self.paths, node.name,
                                      vm_runtime_policy(node.name, recipe),
                                      replace_same_name=True)
            return {n.name: self._policy(n) for n in spec.nodes}

    def _policy(self, node: NodeSpec) -> ReferencePolicy:
        """The spec's file, else predicted from the image and the node's *honest* cmdline."""
        assert self._driver is not None and self._image is not None
        policy = spec_policy(node)
        if policy is not None:
            return policy
        predicted = self._driver.predicted_policy(self._image, node.boot.cmdline)
        return replace(predicted, name=f"{node.name}-predicted")

    def launch(self, spec: ClusterSpec, progress: Progress) -> list[NodeUp]:
        assert self._driver is not None
        names = ", ".join(n.name for n in spec.nodes)
        self._launched = time.monotonic()
        ensure_bridge(bridge_name(self.paths))
        self._join_hosts_to_vm_network()
        with progress.step(f"defining and starting VMs ({names}; "
                           f"{self._driver.accel.accel})"):
            return [self._boot_or_keep(node) for node in spec.nodes]

    def _boot_or_keep(self, spec: NodeSpec) -> NodeUp:
        """Keep a running VM of this cluster, else (re)define and start one."""
        assert self._driver is not None and self._image is not None
        tampered = spec.tampered.fields() if spec.tampered else ()
        node = NodeUp(spec.name, spec.role, VmFacts(domain_name(self.paths, spec.name)),
                      tampered=tampered)
        record = VmRecord.load(self.paths, spec.name)
        if record is not None and record.host != spec.host:  # the spec moved the node
            _remove_recorded_vm(self.paths, spec.name, record, self._driver.conn)
            record = None
        conn = self._conn(spec.host)
        domain = _lookup(conn, domain_name(self.paths, spec.name))
        if domain is not None and domain.isActive() and record is not None \
                and record.uuid == domain.UUIDString():
            node.action, node.tampered = "kept", record.tampered
            node.facts = VmFacts(record.domain, record.agent_port, record.boot_seconds,
                                 record.host)
            changed = [what for what, now, then in (
                ("command line", spec.effective_boot.cmdline, record.cmdline),
                ("guest image", self._image.digest, record.image)) if now != then]
            if changed:  # its policy is the spec's now: attestation will say whether it matters
                node.note = (f"runs another {' and '.join(changed)} than the spec now gives; "
                             "`testbed down` then `testbed up --backend qemu` to apply the spec")
            return node
        if domain is not None:  # stopped, crashed, or not the VM our vm.json describes
            _remove_domain(conn, domain)
        try:
            if spec.host is not None:
                self._boot_placed(spec, node)
            else:
                self._boot(spec, node)
        except TestbedError as exc:
            node.fail(f"could not start the VM: {exc}")
        return node

    def _boot(self, spec: NodeSpec, node: NodeUp) -> None:
        assert self._driver is not None and self._image is not None
        cmdline = spec.effective_boot.cmdline
        private_dir(self.paths.node(spec.name).root)
        self.paths.node(spec.name).vm.unlink(missing_ok=True)
        guest_ports = role(spec.role).guest_ports
        discard_store_image(self.paths, spec)  # sealed to the vTPM of a domain now gone
        booted = self._driver.boot(spec.name, self._image, cmdline=cmdline,
                                   domain=domain_name(self.paths, spec.name),
                                   run_dir=self.paths.vm_root / spec.name,
                                   guest_ports=list(guest_ports.values()),
                                   hotplug_ports=self._hotplug_ports,
                                   lab_bridge=bridge_name(self.paths))
        self._record(spec, node, booted.vm.spec, None)
        self._booted[spec.name] = booted

    def wait_ready(self, node: NodeUp) -> None:
        """New VMs: until the guest agent answers (a kept VM's agent answered before)."""
        booted = self._booted.get(node.name)
        if booted is None or self._driver is None:
            return
        self._driver.wait(booted)
        seconds = round(booted.boot_seconds or 0.0, 1)
        record = VmRecord.load(self.paths, node.name)
        if record is not None:
            replace(record, boot_seconds=seconds).save(self.paths, node.name)
        host = record.host if record is not None else None
        node.facts = VmFacts(booted.vm.spec.name, booted.vm.spec.agent_port, seconds, host)

    def agent(self, node: str, *, timeout: float = 60.0) -> AgentClient:
        """The guest agent of ``node``'s running VM (its port from vm.json)."""
        record = VmRecord.load(self.paths, node)
        if record is None:
            raise StateError(f"node {node} of cluster {self.paths.name} has no running VM (no "
                             f"{self.paths.node(node).vm}); bring it up with "
                             "`testbed up --backend qemu`")
        if record.host is not None:  # its forward is on the host's loopback: through SSH
            transport = SshTcpTransport(self._placed(record.host).session, record.agent_port)
            return AgentClient(transport, node=node, timeout=timeout)
        return AgentClient(TcpTransport(record.agent_port), node=node, timeout=timeout)

    def start_service(self, node: NodeUp) -> None:
        # Every guest takes the verifier's revocation decisions (docs/runtime.md).
        provision_vm(self.paths, node.name, self.agent(node.name))
        self._attach_store_disk(node)  # the CryptoVM VM's store, before it starts on it
        start = role(node.role).vm_service
        record = VmRecord.load(self.paths, node.name)
        if start is not None and record is not None:
            node.service = start(self.paths, node.name, self.agent(node.name),
                                 record.service_ports)
            if record.host is not None:
                node.service = self._placed_service(node.name, record.host) or node.service

    def _placed_service(self, node: str, host: str) -> ServiceInfo | None:
        """A placed VM's service port is on its host's loopback: published as such, so
        that the lab reaches it through SSH (docs/hosts.md)."""
        return publish_on_host(self.paths, node, host)

    def _attach_store_disk(self, node: NodeUp) -> None:
        """Hot-plug the CryptoVM VM's store disk (testbed/qemu/store_disk.py): plain to
        the host, LUKS2 inside the guest, which opens it with its vTPM."""
        spec = load_spec(self.paths).node(node.name)
        disk = store_disk(spec)
        if disk is None or self._driver is None:
            return
        if spec.host is not None:
            raise StateError(f"node {node.name}: the CryptoVM's store disk is for VMs on this "
                             "machine only so far (docs/svd.md)")
        domain = _lookup(self._driver.conn, domain_name(self.paths, node.name))
        if domain is None:
            raise StateError(f"node {node.name}: its domain is gone")
        attach_store_disk(domain, self.paths, node.name, disk)

    def reboot(self, node: str, timeout: float = 300.0) -> float:
        """Power-cycle ``node``'s VM: the same domain and vTPM state, a fresh measured boot
        (the CryptoVM closes its store first); returns when its agent answers again, the
        seconds it took. ``up`` then attests it and starts its service again."""
        record = VmRecord.load(self.paths, node)
        if record is None or record.host is not None:
            raise StateError(f"node {node}: no VM of this machine to reboot; "
                             "`testbed up --backend qemu` first")
        is_cryptovm = load_spec(self.paths).node(node).role == "cryptovm"

        def stop_guest() -> None:
            if is_cryptovm:
                with contextlib.suppress(TestbedError):
                    self.agent(node, timeout=60).call({"op": "cvm_stop"})

        started = time.monotonic()
        with _libvirt(self.paths) as conn:
            domain = _lookup(conn, record.domain)
            if domain is None or not domain.isActive():
                raise StateError(f"node {node}: its VM is not running; `testbed up` starts it")
            reboot_domain(domain, stop_guest)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.agent(node, timeout=10).call({"op": "status"})
                return time.monotonic() - started
            except TestbedError:
                if time.monotonic() > deadline:
                    raise StateError(f"node {node}: its agent did not answer within "
                                     f"{timeout:.0f} s of the reboot") from None
                time.sleep(1.0)

    def finish(self, nodes: list[NodeUp], progress: Progress) -> None:
        """Host-side encrypted disks (:mod:`testbed.qemu.disks`), the VM network between
        the attested VMs (:mod:`testbed.qemu.network`), keyless TLS; Trusted Passages
        between guests is provisioned per channel (:mod:`testbed.qemu.relay`)."""
        self._attach_host_disks(nodes, progress)
        self._guest_disks(nodes, progress)
        self._vm_network(nodes, progress)
        self._keyless(nodes, progress)

    def _vm_network(self, nodes: list[NodeUp], progress: Progress) -> None:
        """WireGuard between the attested VMs, their peers released by the CryptoVM VM
        (:mod:`testbed.qemu.network`); placed VMs too: their hosts' bridges are ports of
        the lab's (docs/hosts.md). Without an attested CryptoVM VM: no VM network."""
        attested = {n.name: n.attested is True and n.action != "failed" for n in nodes}
        cryptovm = next((n for n in nodes if n.role == "cryptovm" and n.service
                         and attested[n.name]), None)
        members = [n for n in nodes if attested[n.name] and n is not cryptovm]
        with progress.step("VM network (WireGuard keys made in the guests, peers released "
                           "by the CryptoVM VM over Trusted Passages)"):
            try:
                if cryptovm is not None and members:
                    self._configure_guests([cryptovm, *members], nodes)
                done = provision(self.paths, attested,
                                 lambda name: self.agent(name, timeout=120),
                                 [n.name for n in nodes],
                                 cryptovm=cryptovm.name if cryptovm is not None else None)
            except TestbedError as exc:  # no channel to the CryptoVM: nobody joins
                done = Provisioned([], {n.name: f"Trusted Passages to the CryptoVM not set "
                                        f"up: {exc}" for n in members}, {}, 0.0)
        for node in nodes:
            reason = done.refused.get(node.name)
            if reason is not None and node.attested is True and node is not cryptovm:
                node.note = f"not on the VM network: {reason}"
        self._network = done.to_dict()

    def _attach_host_disks(self, nodes: list[NodeUp], progress: Progress) -> None:
        """Host-side encrypted disks, once every VM attested and the CryptoVM serves."""
        spec = load_spec(self.paths)
        host = [(n, spec.node(n.name)) for n in nodes if _host_disks(spec.node(n.name))]
        if not host:
            return
        with progress.step("encrypted disks: released after attestation, hot-plugged "
                           "(QEMU decrypts; docs/svd.md)"):
            cryptovm = next(n.name for n in spec.nodes if n.role == "cryptovm")
            try:
                client = cryptovm_endpoint(self.paths, cryptovm).client()
            except TestbedError as exc:  # e.g. the CryptoVM VM failed
                for node, _ in host:
                    if node.action != "failed" and node.attested is True:
                        node.fail(f"disks not attached: no CryptoVM to ask ({exc})")
                return
            try:
                for node, node_spec in host:
                    self._attach_disks(node, node_spec, cryptovm, client.call)
            finally:
                client.close()

    def _guest_disks(self, nodes: list[NodeUp], progress: Progress) -> None:
        """Guest-side encrypted disks (docs/svd.md, "VMs: guest-side disks"): each attested
        VM gets its plain qcow2 hot-plugged and unlocks it itself, with the key it fetches
        from the CryptoVM VM over an attested channel; the host relays, never holds it."""
        spec = load_spec(self.paths)
        owners = [n for n in nodes if _guest_disks(spec.node(n.name))
                  and n.action != "failed" and n.attested is True]
        cryptovm = next((n for n in nodes if n.role == "cryptovm" and n.service
                         and n.attested is True and n.action != "failed"), None)
        if not owners:
            return
        progress.expect(1)
        with progress.step("guest-side disks: each VM fetches its key from the CryptoVM VM "
                           "over Trusted Passages"):
            if cryptovm is None or self._driver is None:
                for node in owners:
                    node.fail("guest disks not unlocked: no attested CryptoVM VM to ask")
                return
            try:
                self._configure_guests([cryptovm, *owners], nodes)
                client = cryptovm_endpoint(self.paths, cryptovm.name).client()
            except TestbedError as exc:
                for node in owners:
                    node.fail(f"guest disks not unlocked: {exc}")
                return
            try:
                for node in owners:
                    self._unlock_guest_disks(node, spec.node(node.name), cryptovm.name,
                                             client.call)
            finally:
                client.close()

    def _unlock_guest_disks(self, node: NodeUp, spec: NodeSpec, cryptovm: str,
                            call: Call) -> None:
        assert self._driver is not None
        domain = _lookup(self._driver.conn, domain_name(self.paths, node.name))
        first = len(_host_disks(spec))  # the host-side disks' targets come first
        disks = [(VmDiskFiles(self.paths, node.name, d.name), d) for d in _guest_disks(spec)]
        keys = GuestDiskKeys(call, self.paths.policy(node.name).read_text(),
                             self.paths.registry.read_text())
        try:
            for index, (files, disk) in enumerate(disks):
                attach_plain_disk(domain, files, disk, f"vd{chr(ord('b') + first + index)}")
            unlocked = unlock_guest_disks(
                self.agent(node.name, timeout=120), self.agent(cryptovm, timeout=120),
                node=node.name, cryptovm=cryptovm, disks=disks, keys=keys,
                pcrs=QUOTED_PCRS)
        except (TestbedError, OSError) as exc:
            node.fail(f"guest disks not unlocked: {exc}")
            return
        if isinstance(node.facts, VmFacts):
            node.facts = replace(node.facts, disks=(*node.facts.disks, *unlocked))

    def _keyless(self, nodes: list[NodeUp], progress: Progress) -> None:
        """Keyless TLS on VMs, as on sim nodes: each attested server and client guest gets
        its TLS certificate from the attested CryptoVM guest, over an attested channel
        (the host relays it), for a key made in the guest (docs/cryptovm.md)."""
        attested = [n for n in nodes if n.attested is True and n.action != "failed"]
        cryptovm = next((n for n in attested if n.role == "cryptovm" and n.service), None)
        enrollees = [n for n in attested if role(n.role).enroll is not None]
        if cryptovm is None or not enrollees:
            return
        progress.expect(1)
        with progress.step("keyless TLS: server and client VMs enroll with the CryptoVM VM"):
            try:
                self._configure_guests([cryptovm, *enrollees], nodes)
            except TestbedError as exc:
                for node in enrollees:
                    node.enrollment = EnrollmentOutcome(False, error=str(exc))
                return
            for node in enrollees:
                node.enrollment = self._enroll(node.name, cryptovm.name)

    def _configure_guests(self, targets: list[NodeUp], nodes: list[NodeUp]) -> None:
        """Each guest's bootstrap identity (cluster CA) and trust anchors: the registry
        ``up`` wrote and every node's policy (the guests validate each other)."""
        ca = cluster_tls_ca(self.paths)
        registry = load_registry(self.paths).to_json()
        policies = {n.name: self.paths.policy(n.name).read_text() for n in nodes
                    if self.paths.policy(n.name).is_file()}
        for node in targets:
            configure_guest(self.agent(node.name), node.name, ca, registry_json=registry,
                            policies=policies, pcrs=QUOTED_PCRS)

    def _enroll(self, node: str, cryptovm: str) -> EnrollmentOutcome:
        try:
            outcome = enroll_guest(self.agent(node, timeout=120), self.agent(cryptovm),
                                   node_name=node, cryptovm_name=cryptovm)
        except TestbedError as exc:
            return EnrollmentOutcome(False, error=str(exc))
        view = outcome.client_view
        if not outcome.established:
            why = view.get("error") or outcome.server_view.get("error") or "no answer"
            return EnrollmentOutcome(False, error=f"enrollment with {cryptovm} failed: {why}")
        return EnrollmentOutcome(True, view.get("certificate"), view.get("ca"))

    def _attach_disks(self, node: NodeUp, spec: NodeSpec, cryptovm: str, call: Call) -> None:
        """Fail closed: a VM that did not pass its attestation is not even asked for."""
        if node.action == "failed" or node.attested is not True or self._driver is None:
            return
        agent = self.agent(node.name)
        domain = _lookup(self._driver.conn, domain_name(self.paths, node.name))
        attached: list[DiskStatus] = []
        for index, disk in enumerate(_host_disks(spec)):
            try:
                attached.append(attach_host_disk(
                    self._driver.conn, domain, VmDiskFiles(self.paths, node.name, disk.name),
                    disk, f"vd{chr(ord('b') + index)}", cryptovm, call,
                    lambda data: agent.quote(data, list(QUOTED_PCRS)),
                    lambda disk=disk: ensure_disk_key(  # type: ignore[misc]
                        call, node.name, disk.name, self.paths.policy(node.name).read_text(),
                        self.paths.registry.read_text())))
            except (TestbedError, OSError) as exc:
                node.fail(f"disk {disk.name} not attached: {exc}")
                return
        if isinstance(node.facts, VmFacts):
            node.facts = replace(node.facts, disks=tuple(attached))

    def facts(self) -> QemuFacts:
        assert self._driver is not None and self._image is not None
        return QemuFacts(self._driver.accel.accel, self._driver.accel.reason,
                         self._image.digest, time.monotonic() - self._launched, self._network)

    def log_file(self, node: str) -> Path | None:
        with contextlib.suppress(StateError):
            record = VmRecord.load(self.paths, node)
            return Path(record.console_log) if record is not None else None
        return None

    def close(self) -> None:
        """The VMs and daemons stay up; only this command's libvirt connections close."""
        if self._driver is not None:
            self._driver.release()
            self._driver = None
        for conn in self._host_conns.values():
            with contextlib.suppress(Exception):
                conn.close()
        for host in self._hosts.values():
            host.close()
        self._host_conns.clear()
        self._hosts.clear()

    # --- placement on the lab's hosts (docs/hosts.md) -------------------------------------

    def _trusted_hosts(self, spec: ClusterSpec) -> None:
        """Every host the spec names is up and attested (HostNotTrusted names one that is
        not, and its check); their SSH sides are kept for this command."""
        named = [n.host for n in spec.nodes if n.host is not None]
        if not named:
            return
        for node in spec.nodes:
            if node.host is not None and node.disks:
                raise ArgumentError(f"node {node.name}: encrypted disks are not placed on "
                                    "hosts yet (docs/hosts.md); run the node on the local "
                                    "libvirt")
        lab = LabPaths(self.paths.workdir)
        for name, record in require_trusted(self.paths.workdir, named).items():
            self._hosts[name] = PlacedHost(lab, record)

    def _join_hosts_to_vm_network(self) -> None:
        """Each host of the spec joins the cluster's VM segment (docs/hosts.md)."""
        for name in sorted(self._hosts):
            self.join_host_to_vm_network(name)

    def join_host_to_vm_network(self, host: str) -> None:
        """``host`` joins the cluster's VM segment: a bridge of the cluster bridge's name
        in its namespace (a placed VM's lab NIC needs it: before placing or migrating a
        VM there), a VXLAN of its own to the lab's bridge. Idempotent."""
        state = LabState.load(LabPaths(self.paths.workdir))
        placed = self._placed(host)
        assert state is not None  # _placed found the host in it
        bridge = bridge_name(self.paths)
        ensure_bridge(bridge)
        port = segment_port(self.paths, host)
        placed.join_vm_segment(bridge, port.host_device, port.vni, state.lab_address)
        add_segment_port(port.lab_device, port.vni, state.lab_address, placed.address,
                         state.bridge, bridge)

    def _copy_artifacts(self) -> None:
        assert self._image is not None
        for name, host in sorted(self._hosts.items()):
            host.prepare()
            host.ensure_intermediate()  # deep attestation: issues the VMs' EK certificates
            self._artifacts[name] = (host.copy_artifact(self._image.kernel, "the guest kernel"),
                                     host.copy_artifact(self._image.initrd, "the guest initrd"))

    def _placed(self, host: str) -> PlacedHost:
        """The host's SSH side, kept for this command (``status``, ``attest`` open it here)."""
        if host not in self._hosts:
            lab = LabPaths(self.paths.workdir)
            state = LabState.load(lab)
            if state is None or host not in state.hosts:
                raise HostsError(f"host {host} of this cluster's VMs is not in the hosts lab "
                                 "any more (`testbed hosts status`)")
            self._hosts[host] = PlacedHost(lab, state.hosts[host])
        return self._hosts[host]

    def _conn(self, host: str | None) -> Any:
        """libvirt here, or on ``host`` over qemu+ssh (one connection per command)."""
        assert self._driver is not None
        if host is None:
            return self._driver.conn
        if host not in self._host_conns:
            self._host_conns[host] = connect(self._hosts[host].libvirt_uri)
        return self._host_conns[host]

    def _boot_placed(self, spec: NodeSpec, node: NodeUp) -> None:
        """Define and start the node's VM on its host: files and vTPM made there over SSH,
        the domain over qemu+ssh, its forwards on the host's address (the lab bridge)."""
        assert self._driver is not None and self._image is not None and spec.host
        host, (kernel, initrd) = self._hosts[spec.host], self._artifacts[spec.host]
        started = time.monotonic()
        name = domain_name(self.paths, spec.name)
        private_dir(self.paths.node(spec.name).root)
        self.paths.node(spec.name).vm.unlink(missing_ok=True)
        guest_ports = role(spec.role).guest_ports
        run_dir = Path(host.make_run_dir(name))
        for attempt in range(PORT_ATTEMPTS):
            ports = random.sample(range(*HOST_PORTS), 1 + len(guest_ports))
            vm_spec = VmSpec(
                name=name, kernel=Path(kernel), initrd=Path(initrd),
                cmdline=spec.effective_boot.cmdline, run_dir=run_dir, agent_port=ports[0],
                guest_port=self._image.agent_port, accel=self._driver.accel,
                firmware=self._driver.firmware, memory_mib=self._driver.memory_mib,
                forwards=tuple(zip(ports[1:], guest_ports.values(), strict=True)),
                uuid=str(uuid.uuid4()), lab_bridge=bridge_name(self.paths))  # host's end
            host.manufacture_vtpm(spec.name, vm_spec.uuid)
            try:
                vm = Vm.start_placed(self._conn(spec.host), vm_spec)
                break
            except LibvirtError as exc:  # lost the race for a forwarded port: retry
                host.remove_vm(name, vm_spec.uuid)
                if "forwarding" not in str(exc) or attempt == PORT_ATTEMPTS - 1:
                    raise
        self._record(spec, node, vm.spec, spec.host)
        relay = SshTcpTransport(host.session, vm_spec.agent_port)  # its forward: host loopback
        self._booted[spec.name] = QemuNode(spec.name, vm, self._image,
                                           spec.effective_boot.cmdline, started, transport=relay)

    def _record(self, spec: NodeSpec, node: NodeUp, vm: VmSpec, host: str | None) -> None:
        """``vm.json`` for a VM just started, and the node's facts."""
        assert self._image is not None
        guest_ports = role(spec.role).guest_ports
        VmRecord(
            domain=vm.name, uuid=vm.uuid, agent_port=vm.agent_port, accel=vm.accel.accel,
            accel_reason=vm.accel.reason, firmware=vm.firmware, image=self._image.digest,
            image_dir=str(self._image.directory), cmdline=vm.cmdline, tampered=node.tampered,
            memory_mib=vm.memory_mib, run_dir=str(vm.run_dir),
            console_log=str(vm.console_log), booted_at=utc_now(),
            service_ports={name: port for name, (port, _) in zip(guest_ports, vm.forwards,
                                                                 strict=True)},
            host=host,
        ).save(self.paths, spec.name)
        node.facts = VmFacts(vm.name, vm.agent_port, host=host)

    # --- status ---------------------------------------------------------------------------

    def status(self) -> list[NodeStatus]:
        """Each node's VM: libvirt state, accelerator, vTPM, agent, boot time, last attestation."""
        paths = self.paths
        spec = load_spec(paths) if paths.spec.is_file() else None
        roles = {n.name: n.role for n in spec.nodes} if spec else {}
        names = [*roles, *(n for n in paths.node_names() if n not in roles)]
        self._disk_specs = {n.name: [] if store_disk(n) else list(n.disks)
                            for n in spec.nodes} if spec else {}
        self._store_specs = {n.name: store_disk(n) for n in spec.nodes} if spec else {}
        last = read_attestations(paths)
        procs = vm_processes(paths)
        with _placed_domains(paths) as placed:
            if not _local_vm_nodes(paths) and all(p.node in placed for p in procs):
                return [self._status(n, roles.get(n, "?"), placed.get(n), procs, last.get(n))
                        for n in names]  # nothing to ask the local libvirt about
            with _libvirt(paths) as conn:
                domains = {**_cluster_domains(conn, paths), **placed}
                return [self._status(n, roles.get(n, "?"), domains.get(n), procs, last.get(n))
                        for n in names]

    def _disks(self, name: str, domain: Any | None, running: bool) -> tuple[DiskStatus, ...]:
        attached = attached_serials(domain) if running and domain is not None else set()
        store = self._store_specs.get(name)
        return tuple(disk_status(VmDiskFiles(self.paths, name, d.name), d, d.name in attached)
                     for d in self._disk_specs.get(name, ())) + (
            (store_status(self.paths, name, store, store.name in attached),) if store else ())

    def _status(self, name: str, role_name: str, domain: Any | None,
                procs: list[OwnedProcess], last: Any) -> NodeStatus:
        record = VmRecord.load(self.paths, name)
        state = _domain_state(domain) if record or domain is not None else "down"
        pids = {p.kind: p.pid for p in procs if p.node == name}
        agent, reason = None, _vm_state_reason(state, record)
        if state == "running" and record is not None:
            agent = "answering" if self.agent(name, timeout=3.0).answers() else "not answering"
            if agent == "not answering":
                reason = (f"the guest agent (relay port {record.agent_port}) did not answer "
                          "within 3 s; see the console log")
        if record is not None:
            where = f"on {record.host}, " if record.host else ""
            facts = VmStatusFacts(
                record.domain, record.accel, record.firmware,
                f"swtpm ({where}run by libvirt), EK certificate from the work dir's CA",
                pids.get("qemu"), pids.get("swtpm"), record.agent_port, record.booted_at,
                record.boot_seconds, record.cmdline, record.image, record.host,
                self._disks(name, domain, state == "running"))
        return NodeStatus(name=name, role=role_name, state=state, reason=reason, agent=agent,
                          service=None, tampered=record.tampered if record else (),
                          last_attestation=last, facts=facts)

    # --- down -----------------------------------------------------------------------------

    def down(self, *, purge: bool) -> DownResult:
        """Destroy and undefine every VM of the cluster (vTPM and NVRAM included), verify
        in /proc that no QEMU or swtpm of it is left, then stop the daemons this work dir
        started if no domain remains. Registry, policies and attestation history stay
        unless ``purge``."""
        paths = self.paths
        lock = locked(paths.lock) if paths.root.is_dir() else contextlib.nullcontext()
        with lock:
            removed, daemons = self._teardown_libvirt()
            for proc in vm_processes(paths):  # e.g. a QEMU libvirt lost track of
                _stop(proc, paths)
            leftovers = _wait_processes_gone(paths)
            if not leftovers:
                _leave_vm_network(paths)
                remove_bridge(bridge_name(paths))
                _remove_state(paths, purge)
        nodes = [NodeDown(node, "libvirt") for node in removed]
        return DownResult(self.name, paths.name, nodes, purge and not leftovers, leftovers,
                          daemons)

    def _teardown_libvirt(self) -> tuple[list[str], DaemonsOutcome]:
        """Remove the cluster's domains; libvirt is only started if anything may need it."""
        paths = self.paths
        placed = _remove_placed(paths)
        if not (_local_vm_nodes(paths) or _defined_domains(paths) or _our_daemons(paths)
                or any(p.node not in placed for p in vm_processes(paths))):
            return placed, DaemonsOutcome(ours=False)
        with _libvirt(paths) as conn:
            removed = sorted({*placed, *_remove_domains(conn, paths)})
            remove_disk_secrets(conn, paths)  # normally gone right after the hot-plug
            # Running domains only: a stale definition someone left must not pin the daemons.
            remaining = tuple(sorted(d.name() for d in conn.listAllDomains(0) if d.isActive()))
        ours = _our_daemons(paths)
        if not ours:
            return removed, DaemonsOutcome(ours=False)
        if remaining:
            return removed, DaemonsOutcome(kept_for=remaining)
        Daemons(paths.libvirt_run, dict(ours)).stop()  # once the connection is closed
        return removed, DaemonsOutcome(stopped=tuple(sorted(ours)))


def _host_disks(spec: NodeSpec) -> list[DiskSpec]:
    return [d for d in spec.disks if d.mode == "host"]


def _guest_disks(spec: NodeSpec) -> list[DiskSpec]:
    """A VM's guest-side disks, which it unlocks with a key of the CryptoVM (the CryptoVM
    VM's own store disk is guest-side too, but sealed to its vTPM: store_disk)."""
    return [] if store_disk(spec) else [d for d in spec.disks if d.mode == "guest"]


def _vm_nodes(paths: ClusterPaths) -> list[str]:
    return [n for n in paths.node_names() if paths.node(n).vm.is_file()]


def _placed_records(paths: ClusterPaths) -> dict[str, VmRecord]:
    """node -> vm.json, for the nodes whose VM is placed on a lab host."""
    found = {}
    for node in _vm_nodes(paths):
        with contextlib.suppress(StateError):
            record = VmRecord.load(paths, node)
            if record is not None and record.host is not None:
                found[node] = record
    return found


def _local_vm_nodes(paths: ClusterPaths) -> list[str]:
    placed = _placed_records(paths)
    return [n for n in _vm_nodes(paths) if n not in placed]


@contextlib.contextmanager
def _host_libvirt(paths: ClusterPaths, host: str) -> Iterator[tuple[PlacedHost, Any] | None]:
    """The lab host's SSH side and libvirt (qemu+ssh); None if the host is gone."""
    lab = LabPaths(paths.workdir)
    state = LabState.load(lab)
    if state is None or host not in state.hosts:
        yield None
        return
    placed = PlacedHost(lab, state.hosts[host])
    try:
        conn = connect(placed.libvirt_uri)
    except LibvirtError:
        placed.close()
        yield None
        return
    try:
        yield placed, conn
    finally:
        with contextlib.suppress(Exception):
            conn.close()
        placed.close()


@contextlib.contextmanager
def _placed_domains(paths: ClusterPaths) -> Iterator[dict[str, Any | None]]:
    """node -> its domain on its host (None if gone or the host does not answer)."""
    by_host: dict[str, list[tuple[str, VmRecord]]] = {}
    for node, record in _placed_records(paths).items():
        by_host.setdefault(str(record.host), []).append((node, record))
    with contextlib.ExitStack() as stack:
        found: dict[str, Any | None] = {}
        for host, records in sorted(by_host.items()):
            remote = stack.enter_context(_host_libvirt(paths, host))
            for node, record in records:
                found[node] = _lookup(remote[1], record.domain) if remote else None
        yield found


def _remove_placed_vm(paths: ClusterPaths, record: VmRecord) -> bool:
    """Destroy and undefine a placed VM, then its run directory and vTPM on the host
    (the guest image's artifacts stay there, by digest). False if the host is gone."""
    assert record.host is not None
    with _host_libvirt(paths, record.host) as remote:
        if remote is None:
            return False
        placed, conn = remote
        domain = _lookup(conn, record.domain)
        if domain is not None:
            _remove_domain(conn, domain)
        with contextlib.suppress(HostsError):
            placed.remove_vm(record.domain, record.uuid)
        return True


def _leave_vm_network(paths: ClusterPaths) -> None:
    """The VM segment's ends on the hosts that ran this cluster's VMs (over SSH; a host
    that is gone took its end with it), then the lab's ports of it (by name)."""
    lab = LabPaths(paths.workdir)
    state = LabState.load(lab)
    hosts = {r.host for r in _placed_records(paths).values() if r.host is not None}
    for host in sorted(hosts & set(state.hosts if state else ())):
        assert state is not None
        placed = PlacedHost(lab, state.hosts[host])
        port = segment_port(paths, host)
        try:
            with contextlib.suppress(HostsError):
                placed.leave_vm_segment(bridge_name(paths), port.host_device)
        finally:
            placed.close()
    delete_links(segment_prefix(paths))


def _remove_placed(paths: ClusterPaths) -> list[str]:
    return sorted(node for node, record in _placed_records(paths).items()
                  if _remove_placed_vm(paths, record))


def _remove_recorded_vm(paths: ClusterPaths, node: str, record: VmRecord, conn: Any) -> None:
    """The VM ``vm.json`` describes, wherever it runs (before the node moves)."""
    if record.host is not None:
        _remove_placed_vm(paths, record)
    elif (domain := _lookup(conn, record.domain)) is not None:
        _remove_domain(conn, domain)
    paths.node(node).vm.unlink(missing_ok=True)


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
        with contextlib.suppress(StateError):
            record = VmRecord.load(paths, node)
            if record is not None and re.fullmatch(r"[0-9a-f-]{36}", record.uuid):
                shutil.rmtree(SWTPM_STORAGE / record.uuid, ignore_errors=True)
    return sorted(domains)


def _stop(proc: OwnedProcess, paths: ClusterPaths) -> None:
    """SIGTERM, then SIGKILL, only while the pid is still verifiably one of ours."""
    with contextlib.suppress(StateError):  # a survivor is reported as a leftover
        terminate(proc.pid, lambda: _is_ours(proc, paths), STOP_TIMEOUT_S / 2)


def _wait_processes_gone(paths: ClusterPaths) -> list[OwnedProcess]:
    """libvirt reaps QEMU and swtpm asynchronously: give them a moment."""
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (left := vm_processes(paths)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _remove_state(paths: ClusterPaths, purge: bool) -> None:
    shutil.rmtree(paths.vm_root, ignore_errors=True)
    if purge:  # the disks' ciphertext too (without it their bindings are useless)
        shutil.rmtree(disk_root(paths), ignore_errors=True)
        shutil.rmtree(paths.root, ignore_errors=True)
        return
    for node in paths.node_names():
        paths.node(node).vm.unlink(missing_ok=True)
    with contextlib.suppress(TestbedError):  # the CryptoVM's store: its vTPM is gone too
        for spec in load_spec(paths).nodes:
            discard_store_image(paths, spec)
    (paths.root / NETWORK_FILE).unlink(missing_ok=True)  # the guests' keys died with them


def _our_daemons(paths: ClusterPaths) -> dict[str, int]:
    """libvirtd/virtlogd started by this work directory's commands, still running."""
    ours: dict[str, int] = {}
    for name in DAEMONS:
        pid = None
        with contextlib.suppress(StateError):
            pid = read_pid(paths.libvirt_run / f"{name}.pid")
        if pid is not None and _is_daemon(pid, name, paths.libvirt_run):
            ours[name] = pid
    return ours


def _is_daemon(pid: int, name: str, run_dir: Path) -> bool:
    """Whether ``pid`` is ``name`` started by us: its argv names our pid file."""
    argv = process_argv(pid) or []
    return bool(argv) and Path(argv[0]).name == name and str(run_dir / f"{name}.pid") in argv


def _vm_state_reason(state: str, record: VmRecord | None) -> str | None:
    """Why a VM that the cluster started is not running (None if it runs or never ran)."""
    if state in ("running", "down") or record is None:
        return None
    if state == "missing":
        return "its domain is gone from libvirt (destroyed outside the testbed?)"
    return f"libvirt reports the domain {state}; its console log is {record.console_log}"
