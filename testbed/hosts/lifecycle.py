"""``testbed hosts up | status | attest | down``: the lab's hosts, written once for the
CLI, the tests and the bench.

``up`` makes the bridge (refusing one it did not make), then per host: its files (TPM
manufactured with the project CA, host key, sshd config, libvirt directories), its
namespace and veth, its init (:mod:`testbed.hosts.machine`); then, over SSH only, it
registers each host TPM and attests it against the host's predicted policy. ``down``
stops every process by PID (the init, what it recorded, and whatever is left in the
host's network namespace: SSH sessions, libvirt helpers) and removes the namespaces,
the veths and the bridge it made.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attestation.errors import TestbedError
from attestation.files import atomic_write, private_dir
from testbed.cluster.agent import AgentClient
from testbed.core.errors import ArgumentError, UsageError
from testbed.core.files import locked, read_json, write_json
from testbed.core.paths import private_tree
from testbed.core.processes import launch_detached, process_argv, terminate
from testbed.core.progress import Progress
from testbed.hosts import deep as _deep  # noqa: F401  # registers the host_attestation check
from testbed.hosts import network
from testbed.hosts.attest import (
    HostVerdict,
    attest_host,
    read_verdicts,
    register_host,
    write_host_policy,
)
from testbed.hosts.layout import (
    DEFAULT_BRIDGE,
    DEFAULT_SUBNET,
    HOST_RUN,
    MAX_HOSTS,
    HostPaths,
    HostRecord,
    HostsError,
    LabPaths,
    LabState,
    host_index,
    host_name,
    validate_bridge,
    validate_subnet,
)
from testbed.hosts.machine import BINDS, MIGRATE_TLS_DIR
from testbed.hosts.measured import StackComponent, resolve_stack
from testbed.hosts.remote import SshSession, agent_client, libvirt_uri, libvirt_version
from testbed.hosts.sshkeys import (
    ensure_host_key,
    ensure_lab_key,
    host_public_key,
    write_authorized_keys,
    write_known_hosts,
    write_libvirt_ssh,
    write_sshd_config,
)
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import STATE_FILE, provision

__all__ = ["HostStatus", "HostUp", "attest", "down", "inventory", "status", "up"]

BOOT_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 10.0  # `status`: a host that does not answer within this is unresponsive
STOP_TIMEOUT_S = 15.0
TAMPERABLE = {"qemu": "qemu-system-x86_64"}
"""``--tamper-qemu``: the stack component a tampered host gets another binary of."""
_LIBVIRT_CONFIGS = ("libvirtd.conf", "libvirt.conf", "qemu.conf", "virtlogd.conf",
                    "libvirt-admin.conf")


@dataclass
class HostUp:
    """One host after ``up``."""

    name: str
    address: str
    action: str  # started | kept
    verdict: HostVerdict | None = None
    tampered: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.name, "address": self.address, "action": self.action,
                "tampered": self.tampered,
                "attestation": self.verdict.to_dict() if self.verdict else None}


@dataclass
class Sessions:
    """The lab's SSH sessions, one per host, closed together."""

    lab: LabPaths
    open: dict[str, SshSession] = field(default_factory=dict)

    def agent(self, record: HostRecord) -> AgentClient:
        session = self.open.setdefault(record.name, SshSession(record.address, self.lab))
        return agent_client(session, record.name)

    def close(self) -> None:
        for session in self.open.values():
            session.close()


# --- up --------------------------------------------------------------------------------


def up(workdir: Path, count: int, *, bridge: str = DEFAULT_BRIDGE,
       subnet: str = DEFAULT_SUBNET, tamper_qemu: Sequence[str] = (),
       progress: Progress | None = None) -> list[HostUp]:
    """``count`` hosts up, registered and attested (already running ones are kept)."""
    if not 1 <= count <= MAX_HOSTS:
        raise UsageError(f"host count {count}: choose 1..{MAX_HOSTS}")
    for name in tamper_qemu:
        if host_index(name) > count:
            raise ArgumentError(f"--tamper-qemu {name}: there are only {count} hosts")
    bridge, subnet = validate_bridge(bridge), str(validate_subnet(subnet))
    progress = progress or Progress(quiet=True)
    progress.expect(2)  # machines, attestation (+1 when the bridge is made)
    lab = LabPaths(workdir)
    private_tree(workdir, lab.root)
    with locked(lab.lock):
        state = _network(lab, bridge, subnet, progress)
        results = _machines(lab, state, count, set(tamper_qemu), progress)
    sessions = Sessions(lab)
    try:
        _attest_all(lab, state, results, sessions, progress)
    finally:
        sessions.close()
    return results


def _network(lab: LabPaths, bridge: str, subnet: str, progress: Progress) -> LabState:
    state = LabState.load(lab)
    if state is not None:
        if (state.bridge, str(state.subnet)) != (bridge, subnet):
            raise UsageError(f"the lab is up on bridge {state.bridge} ({state.subnet}); "
                             "`testbed hosts down` first to change it")
        if network.bridge_exists(state.bridge) or not state.created_bridge:
            return state
    state = LabState(bridge, validate_subnet(subnet), hosts=state.hosts if state else {})
    if network.bridge_exists(bridge):
        raise HostsError(f"bridge {bridge} exists and was not made by this lab: refusing to "
                         "use it; choose another with --bridge NAME")
    used = network.subnet_in_use(state.subnet, except_on=bridge)
    if used is not None:
        raise HostsError(f"subnet {state.subnet} is already in use on {used}; choose "
                         "another with --subnet CIDR")
    progress.expect(1)
    with progress.step(f"bridge {bridge} ({state.lab_address}/{state.subnet.prefixlen})"):
        state.created_bridge = True
        state.save(lab)  # before the bridge exists: `down` must find what it made
        network.add_bridge(bridge, state.lab_address, state.subnet.prefixlen)
    return state


def _machines(lab: LabPaths, state: LabState, count: int, tampered: set[str],
              progress: Progress) -> list[HostUp]:
    ca = LocalCA.ensure(lab.ca_dir)
    ensure_lab_key(lab)
    stack = resolve_stack()
    results: list[HostUp] = []
    starting: list[HostRecord] = []
    with progress.step(f"{count} host(s): files, TPM, namespaces, init"):
        for index in range(1, count + 1):
            name = host_name(index)
            record = state.hosts.get(name)
            if record is not None and _machine_alive(record) is not None:
                if name in tampered and not record.tampered:
                    raise UsageError(f"{name} is running untampered: `testbed hosts down` "
                                     "first (tampering applies when a host starts)")
                results.append(HostUp(name, record.address, "kept", tampered=record.tampered))
                continue
            record = HostRecord(name, index, state.address_of(index), state.netns_of(name),
                                state.veth_of(index),
                                tampered=["qemu"] if name in tampered else [])
            _prepare(lab, state, record, ca, stack)
            state.hosts[name] = record
            state.save(lab)
            network.add_host_link(state.bridge, record.netns, record.veth, record.address,
                                  state.subnet.prefixlen)
            record.machine_pid = _launch(lab.host(name), record)
            state.save(lab)
            starting.append(record)
            results.append(HostUp(name, record.address, "started", tampered=record.tampered))
        write_known_hosts(lab, {r.address: host_public_key(lab.host(r.name))
                                for r in state.hosts.values()})
        write_libvirt_ssh(lab)
        for record in starting:
            _wait_booted(lab.host(record.name), record)
    return results


def _prepare(lab: LabPaths, state: LabState, record: HostRecord, ca: LocalCA,
             stack: Sequence[StackComponent]) -> None:
    """The host's disk: TPM (manufactured once), keys, configs, private directories."""
    host = lab.host(record.name)
    private_tree(lab.root, host.root)
    if not (host.tpm_state / STATE_FILE).exists():
        private_tree(lab.root, host.tpm_state.parent)
        provision(host.tpm_state, ca)
    for name, _target in BINDS:
        private_dir(host.fs / name)
    _libvirt_config(host, record)
    write_authorized_keys(host.fs / "root-ssh", lab)
    ensure_host_key(host)
    write_sshd_config(host, record.address)
    replace: dict[str, str] = {}
    for what in record.tampered:
        component = next(c for c in stack if c.name == TAMPERABLE[what])
        replace[component.path] = str(_tampered_copy(host, Path(component.path)))
    write_json(host.config, {"name": record.name, "address": record.address,
                             "lab_address": state.lab_address,
                             "stack": [c.to_dict() for c in stack], "replace": replace})


def _libvirt_config(host: HostPaths, record: HostRecord) -> None:
    """/etc/libvirt for the host: the machine's config files, no domains or networks, and
    a host UUID of its own (libvirt refuses a migration between hosts with one UUID)."""
    etc = private_dir(host.fs / "etc-libvirt")
    for sub in ("qemu", "qemu/networks", "qemu/networks/autostart", "nwfilter", "secrets"):
        private_dir(etc / sub)
    for name in _LIBVIRT_CONFIGS:
        source = Path("/etc/libvirt") / name
        if source.is_file() and not (etc / name).exists():
            shutil.copyfile(source, etc / name)
    conf = etc / "libvirtd.conf"
    text = conf.read_text() if conf.is_file() else ""
    if "\nhost_uuid" not in text:
        host_uuid = uuid.uuid5(uuid.NAMESPACE_DNS, f"{record.name}.{host.root}")
        atomic_write(conf, f'{text}\n# testbed host {record.name}\nhost_uuid = "{host_uuid}"\n'
                     .encode())
    _migration_tls_config(etc)


def _migration_tls_config(etc: Path) -> None:
    """TLS migration with the host's own credentials, the peer's certificate verified
    (docs/hosts.md, "Migration"); the directory (libvirtd refuses to start without it)
    stays empty until the host attested."""
    private_dir(etc / Path(MIGRATE_TLS_DIR).relative_to("/etc/libvirt"))
    qemu_conf = etc / "qemu.conf"
    text = qemu_conf.read_text() if qemu_conf.is_file() else ""
    if "\nmigrate_tls_x509_cert_dir" not in text:
        atomic_write(qemu_conf, f'{text}\n# testbed: attested TLS migration\n'
                     f'migrate_tls_x509_cert_dir = "{MIGRATE_TLS_DIR}"\n'
                     'migrate_tls_x509_verify = 1\n'.encode())


def _tampered_copy(host: HostPaths, binary: Path) -> Path:
    """A copy of ``binary`` with its last byte flipped (the tampered-host attack)."""
    target = private_dir(host.tampered) / binary.name
    if not target.exists():
        shutil.copyfile(binary, target)
        with target.open("r+b") as handle:
            handle.seek(-1, 2)
            last = handle.read(1)
            handle.seek(-1, 2)
            handle.write(bytes([last[0] ^ 0xFF]))
    target.chmod(0o755)  # QEMU's user runs it: a tampered host still runs the VMs it gets
    return target


def _launch(host: HostPaths, record: HostRecord) -> int:
    with contextlib.suppress(FileNotFoundError):
        host.machine.unlink()
    argv = ["ip", "netns", "exec", record.netns, "unshare", "--mount", "--uts",
            "--propagation", "private", "--", sys.executable, "-m", "testbed.hosts.machine",
            "--host-dir", str(host.root)]
    return launch_detached(argv, host.log, cwd=host.root)


def _machine_info(host: HostPaths) -> dict[str, Any]:
    try:
        doc = read_json(host.machine)
    except TestbedError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _is_machine(pid: int) -> bool:
    argv = process_argv(pid)
    return argv is not None and "testbed.hosts.machine" in argv


def _machine_alive(record: HostRecord) -> int | None:
    pid = record.machine_pid
    return pid if pid is not None and _is_machine(pid) else None


def _wait_booted(host: HostPaths, record: HostRecord) -> None:
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    while time.monotonic() < deadline:
        info = _machine_info(host)
        if info.get("state") == "ready":
            return
        if info.get("state") == "failed" or _machine_alive(record) is None:
            raise HostsError(f"host {record.name} failed to boot: "
                             f"{info.get('error') or 'its init exited'} (log: {host.log}); "
                             "`testbed hosts down` cleans up")
        time.sleep(0.05)
    raise HostsError(f"host {record.name} did not boot within {BOOT_TIMEOUT_S:.0f} s "
                     f"(log: {host.log}); `testbed hosts down` cleans up")


def _attest_all(lab: LabPaths, state: LabState, results: list[HostUp], sessions: Sessions,
                progress: Progress) -> None:
    with progress.step(f"register and attest {len(results)} host(s) over SSH"):
        for result in results:
            write_host_policy(lab, result.name)

        def one(result: HostUp) -> HostVerdict:
            agent = sessions.agent(state.hosts[result.name])
            refused = register_host(lab, result.name, agent)
            return refused or attest_host(lab, result.name, agent)

        with ThreadPoolExecutor(max_workers=4) as pool:
            for result, verdict in zip(results, pool.map(one, results), strict=True):
                result.verdict = verdict


# --- attest ----------------------------------------------------------------------------


def attest(workdir: Path, host: str) -> HostVerdict:
    """Re-attest one host now, over SSH."""
    lab = LabPaths(workdir)
    record = _record(lab, host)
    sessions = Sessions(lab)
    try:
        return attest_host(lab, host, sessions.agent(record))
    finally:
        sessions.close()


def _record(lab: LabPaths, host: str) -> HostRecord:
    host_index(host)
    state = LabState.load(lab)
    if state is None or host not in state.hosts:
        have = ", ".join(sorted(state.hosts)) if state and state.hosts else "none"
        raise ArgumentError(f"no host {host!r} in this lab (hosts: {have}); "
                            "`testbed hosts up N` makes them")
    return state.hosts[host]


# --- status ----------------------------------------------------------------------------


@dataclass
class HostStatus:
    name: str
    address: str
    state: str  # running | failed | stopped
    components: dict[str, str]  # sshd, libvirtd, virtlogd, tpm -> state and reason
    libvirt: str  # the version over qemu+ssh, or why not
    attestation: HostVerdict | None
    tampered: list[str]

    @property
    def trusted(self) -> bool:
        """Running, and its last attestation passed (a stopped host is not trusted)."""
        return self.state == "running" and bool(self.attestation and self.attestation.trusted)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.name, "address": self.address, "state": self.state,
                "components": self.components, "libvirt": self.libvirt,
                "tampered": self.tampered,
                "trusted": self.trusted,
                "attestation": self.attestation.to_dict() if self.attestation else None}


def status(workdir: Path) -> tuple[LabState | None, list[HostStatus]]:
    lab = LabPaths(workdir)
    state = LabState.load(lab)
    if state is None:
        return None, []
    verdicts = read_verdicts(lab)
    sessions = Sessions(lab)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            rows = list(pool.map(lambda r: _host_status(lab, r, sessions, verdicts),
                                 sorted(state.hosts.values(), key=lambda r: r.index)))
    finally:
        sessions.close()
    return state, rows


def _host_status(lab: LabPaths, record: HostRecord, sessions: Sessions,
                 verdicts: dict[str, HostVerdict]) -> HostStatus:
    host = lab.host(record.name)
    info = _machine_info(host)
    alive = _machine_alive(record) is not None
    state = "running" if alive and info.get("state") == "ready" else (
        "failed" if info.get("state") == "failed" or alive else "stopped")
    failures, pids = _mapping(info, "failures"), _mapping(info, "processes")
    components = {}
    for name in ("swtpm", "virtlogd", "libvirtd", "sshd"):
        pid = pids.get(name)
        if not alive:
            components[name] = "stopped"
        elif name in failures:
            components[name] = f"failed: {failures[name]}"
        elif not isinstance(pid, int) or process_argv(pid) is None:
            components[name] = "failed: not running"
        else:
            components[name] = "running"
    libvirt = "not checked (host not running)"
    if state == "running":
        _probe_over_ssh(sessions, record, components)
        try:
            libvirt = libvirt_version(libvirt_uri(lab, record.address))
        except TestbedError as exc:
            libvirt = f"unresponsive: {exc}"
    return HostStatus(record.name, record.address, state, components, libvirt,
                      verdicts.get(record.name), record.tampered)


def _probe_over_ssh(sessions: Sessions, record: HostRecord, components: dict[str, str]
                    ) -> None:
    """sshd and the TPM as the lab sees them: an SSH login, then the agent's ``status``
    (which runs a TPM command). A process that runs but does not answer is unresponsive."""
    agent = sessions.agent(record).with_timeout(PROBE_TIMEOUT_S)
    try:
        sessions.open[record.name].client()
    except TestbedError as exc:
        components["sshd"] = f"unresponsive: {exc}"
        return
    try:
        tpm = str(agent.status().get("tpm"))
    except TestbedError as exc:
        tpm = f"unresponsive: the host agent did not answer ({exc})"
    if components["swtpm"] == "running" and tpm != "answers":
        components["swtpm"] = tpm if tpm.startswith("unresponsive") else f"unresponsive: {tpm}"


# --- inventory -------------------------------------------------------------------------

INVENTORY_GROUP = "testbed_hosts"
TRUSTED_GROUP = "testbed_hosts_trusted"
ANSIBLE_REMOTE_TMP = str(HOST_RUN / "ansible")
"""A host's own tmpfs: its /root is this machine's (only /root/.ssh is private)."""


def inventory(workdir: Path) -> dict[str, Any]:
    """The lab's hosts as an Ansible inventory, in the JSON form of an inventory script's
    ``--list`` (with ``_meta``). Read-only: no SSH, nothing written; a host counts as
    trusted when its init runs, is ready, and its latest attestation passed.

    Connection: OpenSSH (Ansible's ``ssh`` plugin) as root with the lab key and the lab's
    own ssh_config, i.e. its known_hosts only and strict host key checking: a host key
    is never learned."""
    lab = LabPaths(workdir)
    state = LabState.load(lab)
    records = sorted(state.hosts.values(), key=lambda r: r.index) if state else []
    verdicts = read_verdicts(lab) if records else {}
    hostvars = {r.name: _inventory_vars(lab, r, verdicts.get(r.name)) for r in records}
    return {
        "all": {"children": [INVENTORY_GROUP, TRUSTED_GROUP]},
        INVENTORY_GROUP: {"hosts": list(hostvars), "vars": {
            "ansible_connection": "ssh", "ansible_user": "root", "ansible_port": 22,
            "ansible_python_interpreter": "/usr/bin/python3",
            "ansible_remote_tmp": ANSIBLE_REMOTE_TMP,
            "ansible_ssh_private_key_file": str(lab.lab_key),
            "ansible_ssh_common_args": f"-F {shlex.quote(str(lab.ssh_config))}",
        }},
        TRUSTED_GROUP: {"hosts": [n for n, v in hostvars.items() if v["testbed_host_trusted"]]},
        "_meta": {"hostvars": hostvars},
    }


def _inventory_vars(lab: LabPaths, record: HostRecord, verdict: HostVerdict | None
                    ) -> dict[str, Any]:
    ready = (_machine_alive(record) is not None
             and _machine_info(lab.host(record.name)).get("state") == "ready")
    return {"ansible_host": record.address,
            "testbed_host_state": "running" if ready else "stopped",
            "testbed_host_trusted": bool(ready and verdict and verdict.trusted),
            "testbed_host_failed_check": verdict.failed_check if verdict else None,
            "testbed_host_tampered": list(record.tampered),
            "testbed_host_libvirt_uri": libvirt_uri(lab, record.address)}


# --- down ------------------------------------------------------------------------------


def down(workdir: Path, progress: Progress | None = None) -> dict[str, Any]:
    """Stop every host and remove what the lab made; says what was stopped and removed."""
    progress = progress or Progress(quiet=True)
    lab = LabPaths(workdir)
    if not lab.root.is_dir():
        return {"hosts": {}, "removed": [], "left": []}
    with locked(lab.lock):
        state = LabState.load(lab)
        if state is None:
            return {"hosts": {}, "removed": [], "left": []}
        stopped: dict[str, dict[str, Any]] = {}
        removed: list[str] = []
        left: list[int] = []
        for record in sorted(state.hosts.values(), key=lambda r: r.index):
            with progress.step(f"stop {record.name}"):
                stopped[record.name], leftover = _stop_host(lab.host(record.name), record)
                left += leftover
                if network.delete_link(record.veth):
                    removed.append(f"veth {record.veth}")
                if network.delete_netns(record.netns):
                    removed.append(f"netns {record.netns}")
        if state.created_bridge and network.delete_link(state.bridge):
            removed.append(f"bridge {state.bridge}")
        if not left:
            lab.state.unlink()
    return {"hosts": stopped, "removed": removed, "left": left}


def _stop_host(host: HostPaths, record: HostRecord) -> tuple[dict[str, Any], list[int]]:
    """The init (it stops its children), then any recorded child, then the namespace."""
    report: dict[str, Any] = {}
    info = _machine_info(host)
    pid = _machine_alive(record)
    if pid is not None:
        report["init"] = terminate(pid, lambda: _is_machine(pid), STOP_TIMEOUT_S)
    for name, child in _mapping(info, "processes").items():
        if isinstance(child, int) and _is_named(child, name):
            report[name] = _terminate_named(child, name)
    left = [p for p in (pid, *_mapping(info, "processes").values())
            if isinstance(p, int) and _recorded_alive(p)]
    for stray in network.netns_pids(record.netns):  # ssh sessions, libvirt helpers
        report.setdefault("namespace", []).append(stray)
        try:
            _terminate_any(stray)
        except TestbedError:
            left.append(stray)
    return report, left


def _recorded_alive(pid: int) -> bool:
    """A recorded pid that still runs one of the programs a host starts."""
    argv = process_argv(pid)
    return argv is not None and len(argv) > 0 and any(
        name in argv[0] or "testbed.hosts.machine" in argv
        for name in ("swtpm", "sshd", "libvirtd", "virtlogd"))


def _terminate_named(pid: int, name: str) -> str | None:
    return terminate(pid, lambda: _is_named(pid, name), STOP_TIMEOUT_S)


def _terminate_any(pid: int) -> str | None:
    return terminate(pid, lambda: process_argv(pid) is not None, STOP_TIMEOUT_S)


def _mapping(info: dict[str, Any], key: str) -> dict[str, Any]:
    value = info.get(key)
    return value if isinstance(value, dict) else {}


def _is_named(pid: int, name: str) -> bool:
    """Still the program we started (sshd rewrites its argv[0] to ``sshd: ...``)."""
    argv = process_argv(pid)
    return argv is not None and len(argv) > 0 and name in argv[0]
