"""Hypervisor hosts on this machine (docs/hosts.md): each a network namespace on a lab
bridge with its own mount and UTS namespaces, sshd, libvirtd and host TPM, reached only
over SSH, registered and attested.

* ``layout``: where the lab and each host keep their files; the lab's state (``lab.json``).
* ``network``: the bridge, the namespaces and veths (iproute2).
* ``sshkeys``: keys, known_hosts, sshd and ssh configs.
* ``measured``: the host's measured boot (the hypervisor stack in PCR 14), its prediction.
* ``machine``: a host's init, inside its namespaces.
* ``agent``: the host agent, run by the lab over SSH.
* ``remote``: the lab's SSH (paramiko) and ``qemu+ssh`` side.
* ``attest``: registration and attestation of host TPMs.
* ``deep``: deep attestation: each host's intermediate CA (key in its TPM), vTPM EK
  certificates it issues, the verifier's ``host_attestation`` check.
* ``lifecycle``: ``testbed hosts up | status | attest | down``.
* ``placement``: placing qemu VMs on trusted hosts (trust check, artifacts by digest,
  the vTPM made on the host); ``ekcert``: issuing those vTPMs' EK certificates;
  ``vtpm_tool``: swtpm_setup's certificate tool, run on the host.

May import ``testbed.core``, ``spec``, ``tpm``, ``cluster`` and ``roles``; never the
backends (``sim``, ``qemu``), which will place VMs on hosts.
"""
