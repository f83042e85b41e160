"""The QEMU/libvirt backend: real VMs with OVMF measured boot and a vTPM.

* :mod:`testbed.qemu.image` builds the guest image (Debian rootfs in the initramfs).
* :mod:`testbed.qemu.predict` predicts the event log OVMF will produce for an image.
* :mod:`testbed.qemu.libvirtd` starts/stops libvirtd and virtlogd when needed.
* :mod:`testbed.qemu.domain` defines and runs VMs through libvirt-python.
* :mod:`testbed.qemu.guest_agent` runs *inside* the guest (Debian's python3, stdlib only).
* :mod:`testbed.qemu.backend` ties it together: boot, attest, verify.
"""
