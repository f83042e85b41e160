"""The ``qemu`` backend: real VMs with OVMF measured boot and a vTPM, under libvirt.

* ``backend``: the cluster backend (``testbed up --backend qemu``), VMs that outlive
  the command.
* ``vms``: the VM driver: boot, wait, predict, attest one-off VMs.
* ``domain``, ``libvirtd``, ``accel``: domain XML and lifecycle, the daemons, KVM or TCG.
* ``image``: the guest image (a Debian root file system in the initramfs).
* ``predict``: the event log OVMF will produce for an image, and the policy from it.
* ``guest``: what runs *inside* the guest (Debian's python3: the agent and its role
  extensions); it imports nothing of ``testbed``.
* ``relay``: Trusted Passages between guests, the host carrying their records.

May import ``testbed.core``, ``spec``, ``tpm``, ``cluster`` and ``roles``; never
``testbed.sim``.
"""
