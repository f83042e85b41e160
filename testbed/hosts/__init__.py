"""Hypervisor hosts on this machine: network and mount namespaces, each with its own sshd,
libvirtd and host TPM, reached only over SSH and attested (docs/hosts.md)."""
