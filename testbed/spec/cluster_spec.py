"""Cluster specs: which nodes a testbed cluster has, what they boot, what they must satisfy.

A spec is a small YAML file (``docs/testbed.md`` has the full description)::

    version: 1
    name: trusted-passages-lab
    backend: sim                 # sim (default) | qemu (real VMs, see below)
    nodes:
      - name: server
        role: server             # verifier | server | client | cryptovm | generic
        network: lab0            # informational for sim (everything is loopback)
        boot:
          firmware: {content: "OVMF demo"}    # or {file: path} or {sha256: hex}
          kernel: {content: "vmlinuz-6.1.0"}
          initrd: {content: "initrd-6.1.0"}
          cmdline: "console=ttyS0 ro quiet"
        policy: predicted        # predicted | path to a reference policy YAML
        tampered: null           # or e.g. {cmdline: "... init=/bin/sh"} (attack lab)

With ``backend: qemu`` (``docs/qemu.md``) every node boots the guest image built
from the top-level ``image:`` recipe (``default``: ``images/guest.yaml``) under
OVMF, so a node's ``boot:`` block is optional and holds only ``cmdline`` (default:
the recipe's), and ``tampered:`` may only replace ``cmdline``. The firmware,
kernel and initrd of such a node are :class:`Artifact` objects of kind ``image``.

Loading is strict, because a spec decides what a verifier will accept: unknown
keys, duplicate keys, YAML merge keys, wrong types and out-of-range values are
:class:`ClusterSpecError`\\ s naming the offending field (``nodes[1].boot.kernel``).
Relative ``file:`` and ``policy:`` paths are resolved against the spec's directory
at load time, so a loaded spec no longer depends on the current directory.
"""

from __future__ import annotations

import hashlib
import os
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from attestation.encoding import require_int
from attestation.errors import EvidenceFormatError, FileInputError
from attestation.files import hash_file, read_bounded
from attestation.strict_yaml import load_yaml
from testbed.core.paths import NAME_PATTERN
from testbed.spec.recipe import DEFAULT_RECIPE, RecipeError, load_recipe

__all__ = [
    "ARTIFACT_NAMES",
    "BACKENDS",
    "DEFAULT_SPEC_RESOURCE",
    "MAX_BATCH_WINDOW_S",
    "MAX_NODES",
    "MAX_SPEC_BYTES",
    "MAX_SWARM_NODES",
    "MAX_TPM_LATENCY_S",
    "NAME_PATTERN",
    "ROLE_NAMES",
    "SPEC_VERSION",
    "Artifact",
    "BootOverride",
    "BootSpec",
    "ClusterSpec",
    "ClusterSpecError",
    "DiskSpec",
    "NodeSpec",
    "default_spec_path",
    "dump_cluster_spec",
    "duration_text",
    "load_cluster_spec",
    "parse_cluster_spec",
    "parse_duration",
    "parse_tamper",
]

SPEC_VERSION = 1
MAX_SPEC_BYTES = 64 * 1024  # a spec is a few KiB; this bounds YAML parsing cost
MAX_NODES = 32  # node entries of a spec (each a process of its own on sim)
MAX_SWARM_NODES = 1000  # nodes expanded from `swarm: N` entries, in all (sim only)
SWARM_ROLES = ("generic",)  # a swarm node serves its agent only (no role ports)
MAX_TEXT_CHARS = 4096  # command lines and stand-in artifact contents
MAX_FILE_BYTES = 1 << 30  # a kernel or firmware image, hashed in chunks
ROLE_NAMES = ("verifier", "server", "client", "cryptovm", "generic")
BACKENDS = ("sim", "qemu")
ARTIFACT_NAMES = ("firmware", "kernel", "initrd")
DEFAULT_FIRMWARE_VERSION = "edk2-stable202302"  # what the simulated OVMF reports
DISK_MODES = ("host", "guest")
MIN_DISK_BYTES = 1 << 20  # LUKS1 headers take ~2 MiB of their own; below 1 MiB is a typo
MAX_DISK_BYTES = 4 << 30  # sim disks live in the work directory: bounded
MAX_DISKS = 4
_SIZE = re.compile(r"([1-9][0-9]{0,12})([KMG]i?B?)?")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
DEFAULT_SPEC_RESOURCE = "examples/sim-cluster.yaml"
DEFAULT_SPEC_RESOURCES = {"sim": DEFAULT_SPEC_RESOURCE, "qemu": "examples/qemu-cluster.yaml"}

_TOP_KEYS = ("version", "name", "description", "backend", "image", "nodes")
_NODE_KEYS = ("name", "role", "network", "boot", "policy", "tampered", "disks", "tpm_latency",
              "batch_window", "host", "swarm")
_HOST_NAME = re.compile(r"host([1-9][0-9]?)")  # testbed.hosts.layout's names: host1..host16
MAX_HOST_INDEX = 16
_DISK_KEYS = ("name", "size", "mode")
MAX_TPM_LATENCY_S = 10.0  # a modelled TPM command; hardware quotes take 0.02-0.6 s
MAX_BATCH_WINDOW_S = 2.0  # a batch waits at most this long for company
_DURATION = re.compile(r"(\d{1,6}(?:\.\d{1,6})?)(ms|s)")
_BOOT_KEYS = (*ARTIFACT_NAMES, "cmdline", "firmware_version")
_ARTIFACT_KEYS = ("content", "file", "sha256")
_HEX = re.compile(r"[0-9a-fA-F]{64}")


class ClusterSpecError(EvidenceFormatError):
    """A cluster spec is malformed or unusable; the message starts with the field path.

    A subclass of :class:`EvidenceFormatError` so the CLI reports it as malformed
    input (exit 3), like a malformed policy or evidence file.
    """


# --- data model -------------------------------------------------------------------------

ArtifactKind = Literal["content", "file", "sha256", "image"]


@dataclass(frozen=True)
class Artifact:
    """One boot artifact: stand-in ``content`` text, a ``file`` to hash, or a ``sha256``.

    Kind ``image`` (qemu nodes only; ``value`` is ``firmware``, ``kernel`` or
    ``initrd``) is the guest image's own file: only the qemu backend, which
    builds the image, knows its digest. ``where`` is the field path, for error
    messages about a file that cannot be read.
    """

    kind: ArtifactKind
    value: str  # the text, the absolute path, or the lowercase hex digest
    where: str = field(default="", compare=False)

    def measure(self) -> tuple[bytes, int | None]:
        """(SHA-256 digest, size in bytes); size is None when only the digest is known."""
        if self.kind == "content":
            data = self.value.encode()
            return hashlib.sha256(data).digest(), len(data)
        if self.kind == "sha256":
            return bytes.fromhex(self.value), None
        if self.kind == "image":
            raise ClusterSpecError(f"{self.where}: the guest image's {self.value} is measured "
                                   "by the qemu backend only (backend: qemu)")
        return _hash_file(Path(self.value), self.where)

    def to_dict(self) -> dict[str, str]:
        return {self.kind: self.value}


@dataclass(frozen=True)
class BootSpec:
    """What a node boots, the one type for it: three artifacts and a kernel command line.

    A sim node's artifacts are stand-ins (content, file or digest) that its simulated
    firmware measures (:mod:`testbed.tpm.boot`); a qemu node's are the guest image's own
    files (kind ``image``), which its real OVMF measures.
    """

    firmware: Artifact
    kernel: Artifact
    initrd: Artifact
    cmdline: str
    firmware_version: str = DEFAULT_FIRMWARE_VERSION

    @classmethod
    def from_content(cls, firmware: str, kernel: str, initrd: str, cmdline: str,
                     firmware_version: str = DEFAULT_FIRMWARE_VERSION) -> BootSpec:
        """A boot of stand-in artifacts given by their content (the attack lab, tests)."""
        return cls(Artifact("content", firmware), Artifact("content", kernel),
                   Artifact("content", initrd), cmdline, firmware_version)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {name: getattr(self, name).to_dict() for name in ARTIFACT_NAMES
                               if getattr(self, name).kind != "image"}  # implied by backend
        out["cmdline"] = self.cmdline
        if self.firmware_version != DEFAULT_FIRMWARE_VERSION:
            out["firmware_version"] = self.firmware_version
        return out


@dataclass(frozen=True)
class BootOverride:
    """The ``tampered:`` block: the boot fields a tampered node gets instead."""

    firmware: Artifact | None = None
    kernel: Artifact | None = None
    initrd: Artifact | None = None
    cmdline: str | None = None
    firmware_version: str | None = None

    def fields(self) -> tuple[str, ...]:
        """Names of the overridden fields, in spec order."""
        return tuple(name for name in _BOOT_KEYS if getattr(self, name) is not None)

    def apply(self, boot: BootSpec) -> BootSpec:
        return replace(boot, **{name: getattr(self, name) for name in self.fields()})

    def merged(self, other: BootOverride) -> BootOverride:
        """This override with ``other``'s fields taking precedence."""
        return replace(self, **{name: getattr(other, name) for name in other.fields()})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in self.fields():
            value = getattr(self, name)
            out[name] = value.to_dict() if isinstance(value, Artifact) else value
        return out


@dataclass(frozen=True)
class DiskSpec:
    """An encrypted disk of a node (docs/svd.md): ``host`` mode is unlocked by the
    hypervisor after the node attested, ``guest`` mode by the node itself."""

    name: str
    size: int  # bytes of payload, a multiple of 1 MiB
    mode: str = "host"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "size": self.size, "mode": self.mode}


@dataclass(frozen=True)
class NodeSpec:
    name: str
    role: str
    boot: BootSpec
    network: str = "lab0"
    policy: Path | None = None  # None: predicted from the boot chain
    tampered: BootOverride | None = None
    disks: tuple[DiskSpec, ...] = ()
    tpm_latency: float = 0.0  # s per signing command (testbed.tpm.latency's model); sim
    batch_window: float | None = None  # s: the node's quotes share batches (sim)
    host: str | None = None  # the hypervisor host the VM runs on (qemu); None: this machine
    swarm: str | None = None  # the `swarm:` entry this node was expanded from

    @property
    def effective_boot(self) -> BootSpec:
        """What the node really boots: its boot chain with the tampered fields applied."""
        return self.tampered.apply(self.boot) if self.tampered else self.boot

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "role": self.role, "network": self.network,
            "boot": self.boot.to_dict(),
            "policy": "predicted" if self.policy is None else str(self.policy),
            "tampered": self.tampered.to_dict() if self.tampered else None,
            **({"disks": [d.to_dict() for d in self.disks]} if self.disks else {}),
            **({"tpm_latency": duration_text(self.tpm_latency)} if self.tpm_latency else {}),
            **({"batch_window": duration_text(self.batch_window)}
               if self.batch_window is not None else {}),
            **({"host": self.host} if self.host is not None else {}),
            **({"swarm": self.swarm} if self.swarm else {}),
        }  # fmt: skip


@dataclass(frozen=True)
class ClusterSpec:
    name: str
    nodes: tuple[NodeSpec, ...]
    backend: str = "sim"
    description: str = ""
    version: int = SPEC_VERSION
    image: Path | None = None  # qemu: the guest image recipe (None for sim)

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ClusterSpecError(f"nodes: no node named {name!r} in cluster {self.name!r} "
                               f"(nodes: {', '.join(n.name for n in self.nodes)})")

    def with_tamper(self, node: str, override: BootOverride) -> ClusterSpec:
        """The same cluster with ``override`` merged into ``node``'s ``tampered`` block."""
        target = self.node(node)
        if target.swarm is not None:
            raise ClusterSpecError(f"--tamper {node}: a swarm node boots its swarm's chain; "
                                   f"tamper the `{target.swarm}` entry of the spec, or at run "
                                   f"time: `testbed tamper {node} --runtime PATH`")
        if self.backend == "qemu" and override.fields() != ("cmdline",):
            raise ClusterSpecError(f"--tamper {node}: the qemu backend boots the guest image; "
                                   "only its cmdline can be tampered")
        merged = target.tampered.merged(override) if target.tampered else override
        nodes = tuple(replace(n, tampered=merged) if n.name == node else n for n in self.nodes)
        return replace(self, nodes=nodes)

    def with_tpm_latency(self, seconds: float) -> ClusterSpec:
        """The same cluster with every sim node's TPM behind the latency model."""
        if self.backend != "sim":
            raise ClusterSpecError("--tpm-latency: only sim nodes' swtpm can sit behind the "
                                   "latency model")
        return replace(self, nodes=tuple(replace(n, tpm_latency=seconds) for n in self.nodes))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.version, "name": self.name}
        if self.description:
            out["description"] = self.description
        out["backend"] = self.backend
        if self.image is not None:
            out["image"] = str(self.image)
        out["nodes"] = _collapse_swarms(self.nodes)
        return out

    def swarms(self) -> dict[str, tuple[NodeSpec, ...]]:
        """Each swarm entry's name -> its nodes, in spec order."""
        groups: dict[str, list[NodeSpec]] = {}
        for node in self.nodes:
            if node.swarm is not None:
                groups.setdefault(node.swarm, []).append(node)
        return {name: tuple(members) for name, members in groups.items()}


def swarm_node_name(swarm: str, index: int) -> str:
    """The name of a swarm entry's ``index``-th node: ``NAME-000`` ..."""
    return f"{swarm}-{index:03d}"


def _collapse_swarms(nodes: tuple[NodeSpec, ...]) -> list[dict[str, Any]]:
    """The nodes as spec entries: a swarm's nodes back into their one ``swarm: N`` entry."""
    entries: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for node in nodes:
        if node.swarm is None:
            entries.append(node.to_dict())
        elif node.swarm not in counts:
            counts[node.swarm] = 0
            entries.append({**node.to_dict(), "name": node.swarm})
        if node.swarm is not None:
            counts[node.swarm] += 1
    for entry in entries:
        if "swarm" in entry:
            entry["swarm"] = counts[entry["name"]]
    return entries


# --- loading -------------------------------------------------------------------------------


def default_spec_path(backend: str = "sim") -> Path:
    """The shipped example of ``testbed up`` for ``backend``.

    sim: verifier, server, client; qemu: cryptovm, server, client as real VMs.
    """
    name = DEFAULT_SPEC_RESOURCES[backend]
    path = Path(str(resources.files("testbed").joinpath(name)))
    if not path.is_file():
        raise ClusterSpecError(f"the default cluster spec {name} is missing "
                               "from the installed testbed package")
    return path


def load_cluster_spec(path: Path, backend: str | None = None) -> ClusterSpec:
    """Read, parse and validate the spec at ``path``; ``backend`` overrides the spec's."""
    path = Path(path).absolute()
    try:
        data = read_bounded(path, MAX_SPEC_BYTES, what="cluster spec")
    except FileInputError as exc:
        raise ClusterSpecError(str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClusterSpecError(f"cluster spec {path}: not UTF-8 (byte {exc.start})") from None
    return parse_cluster_spec(text, base_dir=path.parent, backend=backend)


def parse_cluster_spec(text: str, base_dir: Path, backend: str | None = None) -> ClusterSpec:
    """Parse spec text; relative paths in it are resolved against ``base_dir``.

    ``backend`` (``testbed up --backend``) replaces the spec's ``backend:``.
    """
    if len(text) > MAX_SPEC_BYTES:
        raise ClusterSpecError(f"spec: larger than {MAX_SPEC_BYTES} characters")
    document = load_yaml(text, "spec", ClusterSpecError)
    return _cluster(document, Path(base_dir).absolute(), backend)


def _cluster(document: object, base: Path, backend_override: str | None = None) -> ClusterSpec:
    doc = _mapping(document, "spec", _TOP_KEYS)
    require_int(doc.get("version"), "version", ClusterSpecError, exactly=SPEC_VERSION)
    name = _name(doc.get("name"), "name")
    backend = backend_override or doc.get("backend", "sim")
    if backend not in BACKENDS:
        raise ClusterSpecError(f"backend: {_show(backend)} is not one of {', '.join(BACKENDS)}")
    description = _text(doc.get("description", ""), "description", 500)
    image = _image(doc, base) if backend == "qemu" else None
    if image is None and "image" in doc:
        raise ClusterSpecError("image: only a qemu cluster boots a guest image (backend: qemu)")
    image_cmdline = _recipe_cmdline(image) if image is not None else None
    nodes = _nodes(doc.get("nodes"), base, image_cmdline)
    _check_disks(nodes, str(backend))
    return ClusterSpec(name, nodes, str(backend), description, image=image)


def _check_disks(nodes: tuple[NodeSpec, ...], backend: str) -> None:
    """Disks are keyed by the cluster's CryptoVM; a qemu VM has host-side and guest-side
    disks, the CryptoVM (node or VM) at most its store disk, sealed to its own TPM."""
    for i, node in enumerate(nodes):
        if not node.disks:
            continue
        if backend != "sim" and node.role == "cryptovm" and node.disks[0].size < 32 << 20:
            raise ClusterSpecError(f"nodes[{i}].disks[0].size: the CryptoVM VM's store disk "
                                   "needs at least 32M (LUKS2's header takes 16M)")
        if node.role == "cryptovm" and (len(node.disks) > 1 or node.disks[0].mode != "guest"):
            raise ClusterSpecError(f"nodes[{i}].disks: a cryptovm node has at most one disk, "
                                   "its store, with mode: guest (its key is sealed to the "
                                   "node's own TPM; docs/svd.md)")
        if not any(n.role == "cryptovm" for n in nodes):
            raise ClusterSpecError(f"nodes[{i}].disks: disks are keyed by a CryptoVM: add a "
                                   "node with role: cryptovm")


def _image(doc: dict[str, object], base: Path) -> Path:
    value = doc.get("image", "default")
    return DEFAULT_RECIPE if value == "default" else _path(value, "image", base)


def _recipe_cmdline(recipe: Path) -> str:
    """The recipe's command line: what a qemu node boots unless its spec says otherwise."""
    try:
        return load_recipe(recipe).cmdline
    except RecipeError as exc:
        raise ClusterSpecError(f"image: {exc}") from None


def _nodes(value: object, base: Path, image_cmdline: str | None) -> tuple[NodeSpec, ...]:
    if not isinstance(value, list) or not value:
        raise ClusterSpecError(f"nodes: expected a non-empty list of nodes, got {_kind(value)}")
    if len(value) > MAX_NODES:
        raise ClusterSpecError(f"nodes: more than {MAX_NODES} nodes")
    nodes: list[NodeSpec] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        node = _node(item, f"nodes[{i}]", base, image_cmdline)
        expanded = _swarm(node, item, f"nodes[{i}]", image_cmdline) \
            if isinstance(item, dict) and "swarm" in item else [node]
        for each in expanded:
            if each.name in seen:
                raise ClusterSpecError(f"nodes[{i}].name: {each.name!r} is used by two nodes")
            seen.add(each.name)
        nodes += expanded
    if sum(n.swarm is not None for n in nodes) > MAX_SWARM_NODES:
        raise ClusterSpecError(f"nodes: more than {MAX_SWARM_NODES} swarm nodes in all")
    return tuple(nodes)


def _swarm(template: NodeSpec, doc: dict[str, object], path: str,
           image_cmdline: str | None) -> list[NodeSpec]:
    """``swarm: N``: N nodes like ``template``, named NAME-000..., hosted many to a
    process on sim (testbed.sim.swarm), each with its own swtpm, EK and AK."""
    count = require_int(doc["swarm"], f"{path}.swarm", ClusterSpecError, minimum=1,
                        maximum=MAX_SWARM_NODES)
    if image_cmdline is not None:
        raise ClusterSpecError(f"{path}.swarm: only sim nodes come in swarms (backend: sim)")
    if template.role not in SWARM_ROLES:
        raise ClusterSpecError(f"{path}.swarm: a swarm's role must be one of "
                               f"{', '.join(SWARM_ROLES)}, not {template.role!r}")
    if template.disks:
        raise ClusterSpecError(f"{path}.disks: swarm nodes have no encrypted disks")
    if len(swarm_node_name(template.name, count - 1)) > 32:
        raise ClusterSpecError(f"{path}.name: {template.name!r} is too long for a swarm "
                               "(its nodes are named NAME-000...: at most 28 characters)")
    return [replace(template, name=swarm_node_name(template.name, i), swarm=template.name)
            for i in range(count)]


def _node(value: object, path: str, base: Path, image_cmdline: str | None) -> NodeSpec:
    """A node; ``image_cmdline`` is set for qemu nodes (the guest image's command line)."""
    doc = _mapping(value, path, _NODE_KEYS)
    name = _name(doc.get("name"), f"{path}.name")
    role = doc.get("role", "generic")
    if role not in ROLE_NAMES:
        raise ClusterSpecError(f"{path}.role: {_show(role)} is not one of {', '.join(ROLE_NAMES)}")
    network = _name(doc.get("network", "lab0"), f"{path}.network")
    host = _host(doc["host"], f"{path}.host", image_cmdline) if "host" in doc else None
    if image_cmdline is not None:
        boot = _image_boot(doc.get("boot"), f"{path}.boot", image_cmdline)
        _image_only(doc.get("tampered"), f"{path}.tampered")
    elif "boot" not in doc:
        raise ClusterSpecError(f"{path}.boot: missing")
    else:
        boot = _boot(doc["boot"], f"{path}.boot", base)
    policy = _policy(doc.get("policy", "predicted"), f"{path}.policy", base)
    tampered = _override(doc.get("tampered"), f"{path}.tampered", base)
    disks = _disks(doc.get("disks", []), f"{path}.disks")
    if image_cmdline is not None and ("tpm_latency" in doc or "batch_window" in doc):
        raise ClusterSpecError(f"{path}: tpm_latency and batch_window are for sim nodes "
                               "(a VM's vTPM is not behind the latency model)")
    latency = parse_duration(doc["tpm_latency"], f"{path}.tpm_latency",
                             MAX_TPM_LATENCY_S) if "tpm_latency" in doc else 0.0
    window = parse_duration(doc["batch_window"], f"{path}.batch_window",
                            MAX_BATCH_WINDOW_S) if "batch_window" in doc else None
    return NodeSpec(name, str(role), boot, network, policy, tampered, disks, latency, window,
                    host)


def _host(value: object, path: str, image_cmdline: str | None) -> str:
    """A hypervisor host's name (``host1`` .. ``host16``), for qemu nodes only."""
    if image_cmdline is None:
        raise ClusterSpecError(f"{path}: only a qemu node runs on a hypervisor host "
                               "(backend: qemu)")
    match = _HOST_NAME.fullmatch(value) if isinstance(value, str) else None
    if match is None or not 1 <= int(match.group(1)) <= MAX_HOST_INDEX:
        raise ClusterSpecError(f"{path}: {_show(value)} is not a host name "
                               f"(host1..host{MAX_HOST_INDEX})")
    return str(value)


def _disks(value: object, path: str) -> tuple[DiskSpec, ...]:
    if not isinstance(value, list):
        raise ClusterSpecError(f"{path}: expected a list of disks, got {_kind(value)}")
    if len(value) > MAX_DISKS:
        raise ClusterSpecError(f"{path}: more than {MAX_DISKS} disks")
    disks = tuple(_disk(item, f"{path}[{i}]") for i, item in enumerate(value))
    names = [d.name for d in disks]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ClusterSpecError(f"{path}[{i}].name: {name!r} is used by two disks")
    return disks


def _disk(value: object, path: str) -> DiskSpec:
    doc = _mapping(value, path, _DISK_KEYS)
    name = _name(doc.get("name"), f"{path}.name")
    if "size" not in doc:
        raise ClusterSpecError(f"{path}.size: missing (e.g. 64M)")
    mode = doc.get("mode", "host")
    if mode not in DISK_MODES:
        raise ClusterSpecError(f"{path}.mode: {_show(mode)} is not one of "
                               f"{', '.join(DISK_MODES)}")
    return DiskSpec(name, _disk_size(doc["size"], f"{path}.size"), str(mode))


def _disk_size(value: object, path: str) -> int:
    """``64M``, ``1G``, ``16MiB`` or a number of bytes; 1 MiB..4 GiB, whole MiB."""
    match = _SIZE.fullmatch(str(value)) if isinstance(value, int | str) and not isinstance(
        value, bool) else None
    if match is None:
        raise ClusterSpecError(f"{path}: {_show(value)} is not a size (e.g. 64M, 1G, or bytes)")
    size = int(match.group(1)) * _UNITS[(match.group(2) or "")[:1]]
    if not MIN_DISK_BYTES <= size <= MAX_DISK_BYTES or size % MIN_DISK_BYTES:
        raise ClusterSpecError(f"{path}: {_show(value)} must be whole MiB between 1M and 4G")
    return size


def parse_duration(value: object, where: str, limit: float) -> float:
    """``200ms`` or ``0.2s`` -> seconds, 0..``limit`` (a unit is required: ``200`` is
    ambiguous)."""
    match = _DURATION.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ClusterSpecError(f"{where}: {_show(value)} is not a duration: give a number "
                               "with a unit, e.g. 200ms or 0.2s")
    seconds = float(match[1]) / (1000 if match[2] == "ms" else 1)
    if seconds > limit:
        raise ClusterSpecError(f"{where}: {value} is more than the {limit:g} s allowed")
    return seconds


def duration_text(seconds: float) -> str:
    """What :func:`parse_duration` reads back to ``seconds`` (to the microsecond, its
    resolution)."""
    return f"{round(seconds * 1e6) / 1000:.3f}".rstrip("0").rstrip(".") + "ms"


def _image_only(value: object, path: str) -> None:
    """A qemu node's boot/tampered block may only name a command line."""
    if isinstance(value, dict):
        for key in value:
            if key in _BOOT_KEYS and key != "cmdline":
                raise ClusterSpecError(
                    f"{path}.{key}: a qemu node boots the guest image's own firmware, kernel "
                    "and initrd; only cmdline may be given (change the image with the "
                    "spec's `image:` recipe, or use backend: sim)")


def _image_boot(value: object, path: str, image_cmdline: str) -> BootSpec:
    """A qemu node's boot: the guest image, with the spec's command line if it has one."""
    if value is not None:
        _image_only(value, path)
        _mapping(value, path, ("cmdline",))
    doc = value if isinstance(value, dict) else {}
    cmdline = _text(doc.get("cmdline", image_cmdline), f"{path}.cmdline", MAX_TEXT_CHARS)
    firmware, kernel, initrd = (Artifact("image", k, f"{path}.{k}") for k in ARTIFACT_NAMES)
    return BootSpec(firmware, kernel, initrd, cmdline)


def _boot(value: object, path: str, base: Path) -> BootSpec:
    doc = _mapping(value, path, _BOOT_KEYS)
    missing = [k for k in (*ARTIFACT_NAMES, "cmdline") if k not in doc]
    if missing:
        raise ClusterSpecError(f"{path}.{missing[0]}: missing")
    firmware, kernel, initrd = (_artifact(doc[k], f"{path}.{k}", base) for k in ARTIFACT_NAMES)
    cmdline = _text(doc["cmdline"], f"{path}.cmdline", MAX_TEXT_CHARS)
    version = _text(doc.get("firmware_version", DEFAULT_FIRMWARE_VERSION),
                    f"{path}.firmware_version", 128)
    return BootSpec(firmware, kernel, initrd, cmdline, version)


def _override(value: object, path: str, base: Path) -> BootOverride | None:
    if value is None:
        return None
    doc = _mapping(value, path, _BOOT_KEYS)
    if not doc:
        raise ClusterSpecError(f"{path}: empty; use null (or leave it out) for an honest node")
    fields: dict[str, Any] = {}
    for key in ARTIFACT_NAMES:
        if key in doc:
            fields[key] = _artifact(doc[key], f"{path}.{key}", base)
    if "cmdline" in doc:
        fields["cmdline"] = _text(doc["cmdline"], f"{path}.cmdline", MAX_TEXT_CHARS)
    if "firmware_version" in doc:
        fields["firmware_version"] = _text(doc["firmware_version"],
                                           f"{path}.firmware_version", 128)
    return BootOverride(**fields)


def _artifact(value: object, path: str, base: Path) -> Artifact:
    if isinstance(value, str):
        raise ClusterSpecError(f"{path}: expected one of {{content: TEXT}}, {{file: PATH}} or "
                               "{sha256: HEX}, got a bare string")
    doc = _mapping(value, path, _ARTIFACT_KEYS)
    if len(doc) != 1:
        raise ClusterSpecError(f"{path}: give exactly one of content, file, sha256")
    kind, raw = next(iter(doc.items()))
    if kind == "content":
        return Artifact("content", _text(raw, f"{path}.content", MAX_TEXT_CHARS,
                                         single_line=False), path)
    if kind == "sha256":
        if not isinstance(raw, str) or not _HEX.fullmatch(raw):
            raise ClusterSpecError(f"{path}.sha256: expected 64 hex characters (quoted)")
        return Artifact("sha256", raw.lower(), path)
    return Artifact("file", str(_path(raw, f"{path}.file", base)), path)


def _policy(value: object, path: str, base: Path) -> Path | None:
    if value == "predicted":
        return None
    return _path(value, path, base)


def _path(value: object, path: str, base: Path) -> Path:
    text = _text(value, path, 4096)
    if not text or "\x00" in text:
        raise ClusterSpecError(f"{path}: expected a file path")
    return Path(os.path.normpath(base / Path(text).expanduser()))


# --- field helpers -----------------------------------------------------------------------


def _mapping(value: object, path: str, allowed: tuple[str, ...]) -> dict[str, object]:
    if value is None and path == "spec":
        raise ClusterSpecError("spec: the document is empty")
    if not isinstance(value, dict):
        raise ClusterSpecError(f"{path}: expected a mapping, got {_kind(value)}")
    for key in value:
        if key not in allowed:
            raise ClusterSpecError(f"{path}.{_show(key)}: unknown key (allowed: "
                                   f"{', '.join(allowed)})")
    return value


def _name(value: object, path: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ClusterSpecError(f"{path}: {_show(value)} is not a valid name (1-32 characters: "
                               "lowercase letters, digits, - and _, starting with a letter or "
                               "digit)")
    return value


def _text(value: object, path: str, limit: int, *, single_line: bool = True) -> str:
    if not isinstance(value, str):
        raise ClusterSpecError(f"{path}: expected a string, got {_kind(value)}")
    if len(value) > limit:
        raise ClusterSpecError(f"{path}: longer than {limit} characters")
    printable = value.isprintable() if single_line else value.replace("\n", "").isprintable()
    if not printable:
        raise ClusterSpecError(f"{path}: must be printable text"
                               + (" on a single line" if single_line else ""))
    return value


def _kind(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a float", type(None): "nothing"}
    return names.get(type(value), f"a {type(value).__name__}")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxstring, _REPR.maxother = 2, 3, 3, 50, 50


def _show(value: object) -> str:
    # Bounded: a value may be a deeply shared structure built from YAML aliases.
    return _REPR.repr(value)


def _hash_file(path: Path, where: str) -> tuple[bytes, int]:
    """SHA-256 and size of a regular file (a FIFO or a device is refused, not read)."""
    try:
        return hash_file(path, MAX_FILE_BYTES, what=f"{where}.file:")
    except FileInputError as exc:
        raise ClusterSpecError(str(exc)) from None


# --- dumping and the --tamper syntax ----------------------------------------------------------


def dump_cluster_spec(spec: ClusterSpec) -> str:
    """YAML that :func:`parse_cluster_spec` reads back to an equal spec (paths absolute)."""
    header = "# Cluster spec as brought up by `testbed up` (format: docs/testbed.md).\n"
    return header + yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True,
                                   width=1000)


def parse_tamper(text: str, base_dir: Path | None = None) -> tuple[str, BootOverride]:
    """``NODE=FIELD:VALUE`` (the ``testbed up --tamper`` syntax) -> (node, override).

    FIELD is ``cmdline`` or ``firmware_version`` (VALUE is the text), or an
    artifact (``firmware``, ``kernel``, ``initrd``) whose VALUE is
    ``content=TEXT``, ``file=PATH``, ``sha256=HEX``, or plain TEXT meaning content.
    """
    node, sep, rest = text.partition("=")
    name, colon, value = rest.partition(":")
    if not sep or not colon:
        raise ClusterSpecError(f"--tamper {text!r}: expected NODE=FIELD:VALUE, e.g. "
                               "client=cmdline:'console=ttyS0 init=/bin/sh'")
    where = f"--tamper {node}"
    _name(node, where)
    if name == "cmdline":
        return node, BootOverride(cmdline=_text(value, f"{where}.cmdline", MAX_TEXT_CHARS))
    if name == "firmware_version":
        return node, BootOverride(firmware_version=_text(value, f"{where}.{name}", 128))
    if name not in ARTIFACT_NAMES:
        raise ClusterSpecError(f"{where}: field {name!r} is not one of "
                               f"{', '.join((*ARTIFACT_NAMES, 'cmdline', 'firmware_version'))}")
    kind, eq, rest_value = value.partition("=")
    document: Mapping[str, object] = (
        {kind: rest_value} if eq and kind in _ARTIFACT_KEYS else {"content": value})
    artifact = _artifact(dict(document), f"{where}.{name}", base_dir or Path.cwd())
    overrides: dict[str, Any] = {name: artifact}
    return node, BootOverride(**overrides)
