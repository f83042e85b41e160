"""Where a hosts lab keeps its files, and what the lab records about each host.

Layout (every directory 0700, every file 0600 unless said)::

    WORKDIR/hosts/
        lab.json                 the lab: bridge, subnet, whether we made the bridge, hosts
        ssh/                     the lab's SSH client side: id_ed25519 (the lab key),
                                 known_hosts (every host key we generated), ssh_config and
                                 ssh (libvirt's ssh command: host key checking on)
        registry.json            AkRegistry: host -> AK activated against its EK
        clock-history.json       last accepted quote per AK
        attestations.json        last attestation verdict per host
        policies/HOST.yaml       each host's predicted policy
        evidence/                the evidence log of every host attestation
        machines/HOST/           one host's own files (the "disk" of that machine):
            host.json            what the lab configured (address, boot, stack, tampering)
            machine.json         what the host's init says: state, pids, failures
            machine.log          its stderr; sshd.log, libvirtd.log, virtlogd.log
            tpm/                 the host TPM's state (its NVRAM)
            ssh/                 host key, sshd_config
            fs/NAME/             bound over /run/libvirt, /var/lib/libvirt, /etc/libvirt,
                                 /root/.ssh ... inside the host's mount namespace only

Inside each host, :data:`HOST_RUN` is a tmpfs of its own mount namespace: the host TPM's
sockets and the event log, which nothing outside the host reaches.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.core.errors import ArgumentError, StateError, UsageError
from testbed.core.files import read_json, write_json

__all__ = [
    "DEFAULT_BRIDGE",
    "DEFAULT_SUBNET",
    "EVENT_LOG",
    "HOST_RUN",
    "MAX_HOSTS",
    "TPM_INFO",
    "TPM_RUN",
    "HostPaths",
    "HostRecord",
    "HostsError",
    "LabPaths",
    "LabState",
    "host_name",
    "validate_bridge",
    "validate_subnet",
]

HOST_RUN = Path("/run/testbed-host")
"""Inside a host: a tmpfs of its own mount namespace (outside, an empty directory)."""
TPM_RUN = HOST_RUN / "tpm"  # the host TPM's unix sockets
TPM_INFO = HOST_RUN / "tpm.json"  # its TCTI, for the host agent
EVENT_LOG = HOST_RUN / "eventlog.bin"  # the host's measured boot

DEFAULT_BRIDGE = "tbhost0"
DEFAULT_SUBNET = "10.213.0.0/24"
MAX_HOSTS = 16
FIRST_HOST_OCTET = 10  # host N gets .10+N; .1 is the lab's address on the bridge
_BRIDGE = re.compile(r"[a-z][a-z0-9]{0,11}")  # + "v" + two digits fits IFNAMSIZ (15)
_HOST = re.compile(r"host([1-9][0-9]?)")
_FORMAT = "testbed-hosts-lab"


class HostsError(StateError):
    """A host or the lab network cannot be brought up, reached or taken down."""


def validate_bridge(name: str) -> str:
    if not _BRIDGE.fullmatch(name):
        raise UsageError(f"invalid bridge name {name!r}: 1-12 lowercase letters and digits, "
                         "starting with a letter")
    return name


def validate_subnet(text: str) -> ipaddress.IPv4Network:
    try:
        subnet = ipaddress.IPv4Network(text, strict=True)
    except ValueError as exc:
        raise ArgumentError(f"invalid subnet {text!r}: {exc}") from None
    if not subnet.is_private or subnet.prefixlen > 26:
        raise ArgumentError(f"subnet {subnet} must be a private IPv4 network of /26 or larger")
    return subnet


def host_name(index: int) -> str:
    return f"host{index}"


def host_index(name: str) -> int:
    match = _HOST.fullmatch(name)
    if match is None or not 1 <= int(match.group(1)) <= MAX_HOSTS:
        raise ArgumentError(f"no host {name!r}: hosts are named host1..host{MAX_HOSTS}")
    return int(match.group(1))


@dataclass(frozen=True)
class HostPaths:
    """One host's own files (``hosts/machines/HOST/``)."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def config(self) -> Path:
        return self.root / "host.json"

    @property
    def machine(self) -> Path:
        return self.root / "machine.json"

    @property
    def log(self) -> Path:
        return self.root / "machine.log"

    @property
    def tpm_state(self) -> Path:
        return self.root / "tpm" / "state"

    @property
    def ssh(self) -> Path:
        return self.root / "ssh"

    @property
    def host_key(self) -> Path:
        return self.ssh / "ssh_host_ed25519_key"

    @property
    def sshd_config(self) -> Path:
        return self.ssh / "sshd_config"

    @property
    def fs(self) -> Path:
        return self.root / "fs"

    @property
    def tampered(self) -> Path:
        return self.root / "tampered"


@dataclass(frozen=True)
class LabPaths:
    """The hosts lab under a work directory (``WORKDIR/hosts/``)."""

    workdir: Path

    @property
    def root(self) -> Path:
        return self.workdir / "hosts"

    @property
    def state(self) -> Path:
        return self.root / "lab.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lab.lock"

    @property
    def attest_lock(self) -> Path:
        return self.root / ".attest.lock"

    @property
    def ssh(self) -> Path:
        return self.root / "ssh"

    @property
    def lab_key(self) -> Path:
        return self.ssh / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh / "known_hosts"

    @property
    def ssh_config(self) -> Path:
        return self.ssh / "ssh_config"

    @property
    def ssh_command(self) -> Path:
        return self.ssh / "ssh"

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
    def evidence(self) -> Path:
        return self.root / "evidence"

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    def policy(self, host: str) -> Path:
        return self.root / "policies" / f"{host}.yaml"

    def host(self, name: str) -> HostPaths:
        host_index(name)
        return HostPaths(self.root / "machines" / name)


@dataclass
class HostRecord:
    """What the lab knows about one host it made."""

    name: str
    index: int
    address: str
    netns: str
    veth: str
    machine_pid: int | None = None
    tampered: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "address": self.address,
                "netns": self.netns, "veth": self.veth, "machine_pid": self.machine_pid,
                "tampered": list(self.tampered)}

    @classmethod
    def from_dict(cls, doc: object, where: str) -> HostRecord:
        if not isinstance(doc, dict):
            raise StateError(f"{where}: a host entry is not an object")
        try:
            pid = doc.get("machine_pid")
            return cls(str(doc["name"]), int(doc["index"]), str(doc["address"]),
                       str(doc["netns"]), str(doc["veth"]),
                       None if pid is None else int(pid),
                       [str(t) for t in doc.get("tampered", [])])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{where}: host entry is damaged ({exc}); "
                             "`testbed hosts down` clears it") from None


@dataclass
class LabState:
    """``lab.json``: the network the lab made and its hosts."""

    bridge: str
    subnet: ipaddress.IPv4Network
    created_bridge: bool = False
    hosts: dict[str, HostRecord] = field(default_factory=dict)

    @property
    def lab_address(self) -> str:
        return str(self.subnet.network_address + 1)

    def address_of(self, index: int) -> str:
        return str(self.subnet.network_address + FIRST_HOST_OCTET + index)

    def netns_of(self, name: str) -> str:
        return f"{self.bridge}-{name}"

    def veth_of(self, index: int) -> str:
        return f"{self.bridge}v{index}"

    def save(self, paths: LabPaths) -> None:
        write_json(paths.state, {
            "format": _FORMAT, "version": 1, "bridge": self.bridge, "subnet": str(self.subnet),
            "created_bridge": self.created_bridge,
            "hosts": {n: h.to_dict() for n, h in sorted(self.hosts.items())}})

    @classmethod
    def load(cls, paths: LabPaths) -> LabState | None:
        doc = read_json(paths.state)
        if doc is None:
            return None
        where = str(paths.state)
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT \
                or not isinstance(doc.get("hosts"), dict):
            raise StateError(f"{where} is not a hosts lab file; remove it after checking "
                             "`ip netns` and `ip link` by hand")
        hosts = {str(n): HostRecord.from_dict(h, where) for n, h in doc["hosts"].items()}
        return cls(validate_bridge(str(doc.get("bridge"))),
                   validate_subnet(str(doc.get("subnet"))),
                   bool(doc.get("created_bridge")), hosts)
