"""SSH material of the lab and its hosts: keys made with ssh-keygen, every private key
0600 in a 0700 directory; the known_hosts file (every host key the lab generated, and
nothing else); each host's sshd_config; the ssh command libvirt runs.

sshd on a host: key-only, root with a key only (``prohibit-password``), no PAM, no
forwarding of any kind, no tty for the lab key (``restrict``), listening on the host's
lab address only.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from attestation.files import atomic_write, private_dir, read_bounded
from testbed.hosts.layout import HostPaths, HostsError, LabPaths

__all__ = [
    "ensure_host_key",
    "ensure_lab_key",
    "host_public_key",
    "write_authorized_keys",
    "write_known_hosts",
    "write_libvirt_ssh",
    "write_sshd_config",
]

SSHD = "/usr/sbin/sshd"
_MAX_KEY = 16 << 10


def _keygen(path: Path, comment: str) -> None:
    private_dir(path.parent)
    if path.is_file():
        return
    try:
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                        "-f", str(path)], capture_output=True, text=True, check=True,
                       timeout=30, umask=0o077)
    except FileNotFoundError:
        raise HostsError("ssh-keygen is missing: install openssh-client") from None
    except subprocess.CalledProcessError as exc:
        raise HostsError(f"ssh-keygen failed: {exc.stderr.strip()[-300:]}") from None


def ensure_lab_key(lab: LabPaths) -> Path:
    """The key the lab logs into every host with (made once)."""
    _keygen(lab.lab_key, "testbed-hosts-lab")
    return lab.lab_key


def ensure_host_key(host: HostPaths) -> Path:
    _keygen(host.host_key, f"testbed-{host.name}")
    return host.host_key


def _public(private_key: Path) -> str:
    data = read_bounded(Path(f"{private_key}.pub"), _MAX_KEY, what="SSH public key")
    return data.decode().strip()


def host_public_key(host: HostPaths) -> str:
    """``TYPE BASE64`` of the host key (no comment)."""
    return " ".join(_public(host.host_key).split()[:2])


def write_known_hosts(lab: LabPaths, keys: dict[str, str]) -> None:
    """``keys``: address -> ``TYPE BASE64``; the file names exactly these hosts."""
    lines = "".join(f"{address} {key}\n" for address, key in sorted(keys.items()))
    atomic_write(lab.known_hosts, lines.encode())


def write_authorized_keys(directory: Path, lab: LabPaths) -> None:
    """The host's /root/.ssh: the lab key only, with every forwarding and the tty off."""
    private_dir(directory)
    atomic_write(directory / "authorized_keys", f"restrict {_public(lab.lab_key)}\n".encode())


def write_sshd_config(host: HostPaths, address: str) -> None:
    config = f"""\
# testbed host {host.name}: written by `testbed hosts up`
ListenAddress {address}
Port 22
HostKey "{host.host_key}"
PidFile none
AuthorizedKeysFile .ssh/authorized_keys
PermitRootLogin prohibit-password
AllowUsers root
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes yes
AllowTcpForwarding no
AllowStreamLocalForwarding no
AllowAgentForwarding no
X11Forwarding no
PermitTunnel no
PermitUserEnvironment no
# SFTP (in-process, no helper binary): the lab copies image artifacts and vTPM files
Subsystem sftp internal-sftp
LoginGraceTime 15
MaxStartups 20:50:60
# The lab multiplexes one connection: the host agent, SFTP, a relay per connection to
# each placed VM's agent or service. OpenSSH's default of 10 sessions refused the 11th
# ("open failed: Connect failed") while two VMs of one host registered at once.
MaxSessions 64
LogLevel INFO
"""
    atomic_write(host.sshd_config, config.encode())
    try:
        subprocess.run([SSHD, "-t", "-f", str(host.sshd_config)], capture_output=True,
                       text=True, check=True, timeout=30)
    except FileNotFoundError:
        raise HostsError(f"{SSHD} is missing: install openssh-server") from None
    except subprocess.CalledProcessError as exc:
        raise HostsError(f"sshd rejects the config of {host.name}: "
                         f"{exc.stderr.strip()[-300:]}") from None


def write_libvirt_ssh(lab: LabPaths) -> None:
    """The ssh command libvirt's ``qemu+ssh`` transport runs: OpenSSH with the lab's own
    config (the lab key only, the lab's known_hosts only, strict host key checking)."""
    config = f"""\
Host *
    User root
    IdentityFile "{lab.lab_key}"
    IdentitiesOnly yes
    UserKnownHostsFile "{lab.known_hosts}"
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    CheckHostIP no
    BatchMode yes
    ConnectTimeout 10
    ControlMaster no
    LogLevel ERROR
"""
    atomic_write(lab.ssh_config, config.encode())
    script = f'#!/bin/sh\nexec ssh -F {shlex.quote(str(lab.ssh_config))} "$@"\n'
    atomic_write(lab.ssh_command, script.encode(), mode=0o700)
    os.chmod(lab.ssh_command, 0o700)
