"""Which accelerator a VM gets: KVM only when it really works, else TCG.

``/dev/kvm`` existing is not enough. On this project's CI machines it is a
nested *PVM* (module ``kvm_pvm``, a paravirtualised KVM without VMX/SVM) that
cannot boot a stock Debian kernel, so it is detected and TCG is used instead.
``$TESTBED_ACCEL`` (``kvm`` or ``tcg``) overrides the detection.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Accel", "AccelChoice", "detect_accel"]

Accel = Literal["kvm", "tcg"]
KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator and why it was chosen (reported by tests and benchmarks)."""

    accel: Accel
    reason: str

    @property
    def domain_type(self) -> str:
        """libvirt's ``<domain type=...>``: ``kvm`` or ``qemu`` (TCG)."""
        return "kvm" if self.accel == "kvm" else "qemu"


def _cpu_flags(cpuinfo: Path) -> set[str]:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _kvm_api_ok(device: Path) -> bool:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def detect_accel(*, env: dict[str, str] | None = None, root: Path = Path("/")) -> AccelChoice:
    """KVM if /dev/kvm is a real, usable KVM on a CPU with VMX/SVM; TCG otherwise."""
    override = (env if env is not None else dict(os.environ)).get("TESTBED_ACCEL", "")
    if override in ("kvm", "tcg"):
        return AccelChoice(override, f"forced by TESTBED_ACCEL={override}")  # type: ignore[arg-type]
    device = root / "dev/kvm"
    if not device.exists():
        return AccelChoice("tcg", "no /dev/kvm")
    if (root / "sys/module/kvm_pvm").exists():
        return AccelChoice("tcg", "/dev/kvm is a nested PVM (kvm_pvm) that cannot boot a "
                                  "Debian kernel")
    flags = _cpu_flags(root / "proc/cpuinfo")
    if not flags & {"vmx", "svm"}:
        return AccelChoice("tcg", "the CPU has no vmx/svm flag")
    if not _kvm_api_ok(device):
        return AccelChoice("tcg", "/dev/kvm does not answer KVM_GET_API_VERSION")
    return AccelChoice("kvm", "/dev/kvm with vmx/svm")
