"""The cluster backends by name, and which one an existing cluster runs on."""

from __future__ import annotations

from testbed.cluster.backend import ClusterBackend
from testbed.core.paths import ClusterPaths
from testbed.qemu.backend import QemuBackend
from testbed.sim.backend import SimBackend

__all__ = ["BACKENDS", "backend_for", "open_backend"]

BACKENDS: dict[str, type[SimBackend] | type[QemuBackend]] = {"sim": SimBackend,
                                                              "qemu": QemuBackend}


def backend_for(name: str, paths: ClusterPaths) -> ClusterBackend:
    """A fresh backend object for ``paths`` (close() it when done)."""
    return BACKENDS[name](paths)


def open_backend(paths: ClusterPaths) -> ClusterBackend:
    """The backend an existing cluster runs on: its spec's, or where its VMs left traces."""
    return backend_for("qemu" if QemuBackend.has_traces(paths) else "sim", paths)
