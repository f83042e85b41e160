"""Placing VMs on the lab's hosts: only on trusted ones, and through SSH only.

What the qemu backend (:mod:`testbed.qemu.backend`) asks of a host before it defines a
domain there over ``qemu+ssh``:

1. :func:`require_trusted`: the host is up and its latest attestation
   (``attestations.json``, :mod:`testbed.hosts.attest`) passed; otherwise
   :class:`HostNotTrusted` names the host and the failed check, before anything is
   copied to it.
2. :meth:`PlacedHost.copy_artifact`: the guest image's files, content-addressed on the
   host (``/var/lib/libvirt/testbed/artifacts/SHA256``, the host's own disk): copied over
   SFTP only when missing, then the host's ``sha256sum`` must give the lab's digest, or
   the host is refused (check ``artifact_digest``).
3. :meth:`PlacedHost.manufacture_vtpm`: ``swtpm_setup`` run on the host (over SSH) into
   libvirt's vTPM directory there; its EK certificate is issued by the host's
   intermediate CA (deep attestation, :func:`testbed.hosts.deep.issue_vtpm_ek_certificate`:
   the key signs in the host TPM) for the request the host's :mod:`testbed.hosts.vtpm_tool`
   makes, checked by the lab first (:func:`testbed.hosts.ekcert.parse_ek_request`).
4. :meth:`PlacedHost.join_vm_segment`: the host's end of the cluster's VM network (a
   bridge the VMs' lab NICs join, a VXLAN to the lab's VM bridge; no address on either:
   the host takes no part).
5. :meth:`PlacedHost.remove_vm`: after the domain is undefined, its run directory and
   vTPM state go; the artifacts stay (by digest: the next VM of that image reuses them).

And, once the VMs run, :func:`forward_to_host`: a placed VM's role service (the
CryptoVM's CVM1 port, forwarded to its host's loopback) reached from the lab through a
one-connection listener on the lab's loopback and an SSH relay (registered with
:func:`testbed.roles.cryptovm.register_host_forward`).
"""

from __future__ import annotations

import contextlib
import datetime
import posixpath
import re
import shlex
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives.asymmetric import rsa

from attestation.errors import VerificationError
from attestation.files import hash_file
from testbed.hosts.attest import read_verdicts
from testbed.hosts.deep import (
    TPM_ATTRIBUTES,
    certify_host_intermediate,
    issue_vtpm_ek_certificate,
    load_intermediate,
)
from testbed.hosts.ekcert import MAX_REQUEST_BYTES, EkRequest, parse_ek_request
from testbed.hosts.layout import HostRecord, HostsError, LabPaths, LabState
from testbed.hosts.network import VXLAN_PORT
from testbed.hosts.remote import (
    HostUnreachable,
    SshSession,
    SshTcpTransport,
    agent_client,
    forward_once,
    libvirt_uri,
)
from testbed.hosts.vtpm_tool import REFUSED, REQUEST, RESPONSE
from testbed.roles.cryptovm import register_host_forward

__all__ = [
    "HOST_STATE",
    "HostNotTrusted",
    "PlacedHost",
    "forward_to_host",
    "require_trusted",
]

HOST_STATE = "/var/lib/libvirt/testbed"
"""Inside a host: the placed VMs' files (its /var/lib/libvirt is the host's own disk)."""
ARTIFACTS = f"{HOST_STATE}/artifacts"
VMS = f"{HOST_STATE}/vms"
VTPM_SETUP = f"{HOST_STATE}/vtpm-setup"
SWTPM_STORAGE = "/var/lib/libvirt/swtpm"  # libvirt's vTPM directories (by domain UUID)
COMMAND_TIMEOUT_S = 60.0
SETUP_TIMEOUT_S = 60.0
MAX_OUTPUT_BYTES = 64 * 1024
MAX_ARTIFACT_BYTES = 1 << 30  # a guest kernel or initrd
INTERMEDIATE_MARGIN = datetime.timedelta(hours=1)  # renewed before, not during, an `up`
_POLL_S = 0.05


class HostNotTrusted(VerificationError):
    """A VM's host is not up, not attested, or failed a check: it gets no VM."""

    def __init__(self, host: str, check: str, reason: str) -> None:
        super().__init__(check, reason)
        self.host = host
        self.args = (f"{host}: {check} ({reason})",)


def require_trusted(workdir: Path, hosts: Iterable[str]) -> dict[str, HostRecord]:
    """Each host's record, if every one is up and its latest attestation passed."""
    lab = LabPaths(workdir)
    state = LabState.load(lab)
    verdicts = read_verdicts(lab)
    records = {}
    for host in sorted(set(hosts)):
        if state is None or host not in state.hosts:
            raise HostNotTrusted(host, "host_up", "no such host in this lab; "
                                 "`testbed hosts up N` makes host1..hostN")
        verdict = verdicts.get(host)
        if verdict is None:
            raise HostNotTrusted(host, "host_attestation", "never attested; "
                                 f"`testbed hosts attest {host}`")
        if not verdict.trusted:
            raise HostNotTrusted(host, verdict.failed_check or "host_attestation",
                                 verdict.message)
        records[host] = state.hosts[host]
    return records


@dataclass
class PlacedHost:
    """One host VMs are placed on: its SSH session (opened on first use, closed by
    :meth:`close`) and its libvirt URI (``qemu+ssh``, the lab's ssh command)."""

    lab: LabPaths
    record: HostRecord
    session: SshSession = field(init=False)
    _sftp: paramiko.SFTPClient | None = None

    def __post_init__(self) -> None:
        self.session = SshSession(self.record.address, self.lab)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def address(self) -> str:
        return self.record.address

    @property
    def libvirt_uri(self) -> str:
        return libvirt_uri(self.lab, self.record.address)

    def close(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        self.session.close()

    # --- commands and files on the host ------------------------------------------------

    def run(self, argv: list[str], timeout: float = COMMAND_TIMEOUT_S) -> str:
        """``argv`` on the host; its stdout, or HostsError with its output's tail."""
        code, out = self._finish(self.session.exec(shlex.join(argv), timeout), timeout)
        if code != 0:
            raise HostsError(f"{self.name}: `{argv[0]}` failed (exit {code}): "
                             f"{out.strip()[-300:]}")
        return out

    def _finish(self, channel: paramiko.Channel, timeout: float) -> tuple[int, str]:
        """Exit status and output (stdout and stderr, bounded) of a finished command."""
        channel.set_combine_stderr(True)
        deadline = time.monotonic() + timeout
        out = b""
        with contextlib.closing(channel):
            while not channel.exit_status_ready() or channel.recv_ready():
                if time.monotonic() > deadline:
                    raise HostUnreachable(f"{self.name}: a command did not finish within "
                                          f"{timeout:.0f} s")
                if channel.recv_ready():
                    out = (out + channel.recv(65536))[-MAX_OUTPUT_BYTES:]
                else:
                    time.sleep(_POLL_S)
            return channel.recv_exit_status(), out.decode(errors="replace")

    def sftp(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            try:
                self._sftp = self.session.client().open_sftp()
            except (paramiko.SSHException, OSError) as exc:
                raise HostUnreachable(f"{self.name}: SFTP failed: {exc}") from None
        return self._sftp

    def prepare(self) -> None:
        """The placement directories; QEMU's and swtpm's users (libvirt-qemu, tss) must
        traverse them and /run/libvirt (the host's private directories are 0700; a stock
        host has both 0755), the contents stay root's."""
        self.run(["mkdir", "-p", ARTIFACTS, VMS, VTPM_SETUP, SWTPM_STORAGE])
        self.run(["chmod", "0711", "/var/lib/libvirt", "/run/libvirt", "/run/libvirt/qemu",
                  HOST_STATE, ARTIFACTS,
                  VMS, SWTPM_STORAGE])
        self.run(["chmod", "0700", VTPM_SETUP])

    def ensure_intermediate(self) -> None:
        """The host's intermediate CA certified (the host attested now) unless a current
        one exists: before ``up`` makes its registrar, whose EK path links are the
        intermediates of trusted hosts at that moment."""
        intermediate = load_intermediate(self.lab, self.name)
        soon = datetime.datetime.now(datetime.UTC) + INTERMEDIATE_MARGIN
        if intermediate is None or intermediate.certificate.not_valid_after_utc < soon:
            certify_host_intermediate(self.lab, self.name, agent_client(self.session, self.name))

    # --- artifacts ----------------------------------------------------------------------

    def copy_artifact(self, local: Path, what: str) -> str:
        """``local`` on the host by its SHA-256 (copied only when missing), verified there."""
        digest = hash_file(local, MAX_ARTIFACT_BYTES, what=what)[0].hex()
        remote = f"{ARTIFACTS}/{digest}"
        if not self._exists(remote):
            part = f"{remote}.part"
            try:
                self.sftp().put(str(local), part)
                self.sftp().chmod(part, 0o644)
            except (OSError, paramiko.SSHException) as exc:
                raise HostUnreachable(f"{self.name}: copying {what} failed: {exc}") from None
            self.run(["mv", "-f", part, remote])
        found = self.run(["sha256sum", remote]).split(" ", 1)[0]
        if found != digest:
            raise HostNotTrusted(self.name, "artifact_digest",
                                 f"its copy of {what} ({remote}) has SHA-256 {found[:16]}…, "
                                 f"the lab's has {digest[:16]}…; refused")
        return remote

    def _exists(self, path: str) -> bool:
        try:
            self.sftp().stat(path)
        except FileNotFoundError:
            return False
        except (OSError, paramiko.SSHException) as exc:
            raise HostUnreachable(f"{self.name}: SFTP stat {path}: {exc}") from None
        return True

    # --- VMs ------------------------------------------------------------------------------

    def run_dir(self, domain: str) -> str:
        return f"{VMS}/{domain}"

    def make_run_dir(self, domain: str) -> str:
        path = self.run_dir(domain)
        self.run(["mkdir", "-p", path])
        self.run(["chmod", "0711", path])
        return path

    def manufacture_vtpm(self, node: str, vm_uuid: str) -> None:
        """``node``'s vTPM state made on the host, where libvirt's swtpm will find it."""
        exchange = f"{VTPM_SETUP}/{vm_uuid}"
        state = f"{SWTPM_STORAGE}/{vm_uuid}/tpm2"
        self.run(["mkdir", "-p", exchange, state])  # sshd's umask is the host init's 077
        self.run(["chmod", "0711", f"{SWTPM_STORAGE}/{vm_uuid}"])  # swtpm (tss) traverses
        self.run(["chmod", "0700", exchange, state])  # libvirt chowns state to tss
        try:
            self._write_setup_files(exchange)
            channel = self.session.exec(shlex.join(
                ["swtpm_setup", "--tpm2", "--tpmstate", state, "--create-ek-cert",
                 "--lock-nvram", "--pcr-banks", "sha256", "--config",
                 f"{exchange}/swtpm_setup.conf"]), SETUP_TIMEOUT_S)
            self._answer_ek_request(node, exchange, channel)
            code, out = self._finish(channel, SETUP_TIMEOUT_S)
            if code != 0:
                raise HostsError(f"{self.name}: swtpm_setup failed (exit {code}): "
                                 f"{out.strip()[-300:]}")
        except BaseException:
            with contextlib.suppress(HostsError):
                self.run(["rm", "-rf", f"{SWTPM_STORAGE}/{vm_uuid}"])
            raise
        finally:
            with contextlib.suppress(HostsError):
                self.run(["rm", "-rf", exchange])

    def _write_setup_files(self, exchange: str) -> None:
        """swtpm_setup's config: its certificate tool is :mod:`testbed.hosts.vtpm_tool`."""
        tool = f"{exchange}/certs-tool"
        files = {
            tool: "#!/bin/sh\nexec " + shlex.join(
                [sys.executable, "-m", "testbed.hosts.vtpm_tool", "--exchange", exchange])
            + ' "$@"\n',
            f"{exchange}/tool.conf": "", f"{exchange}/tool.options": "",
            f"{exchange}/swtpm_setup.conf":
                f"create_certs_tool = {tool}\ncreate_certs_tool_config = {exchange}/tool.conf\n"
                f"create_certs_tool_options = {exchange}/tool.options\n"
                "active_pcr_banks = sha256\n",
        }
        try:
            for path, text in files.items():
                with self.sftp().open(path, "w") as handle:
                    handle.write(text.encode())
            self.sftp().chmod(tool, 0o700)
        except (OSError, paramiko.SSHException) as exc:
            raise HostUnreachable(f"{self.name}: writing swtpm_setup's files: {exc}") from None

    def _answer_ek_request(self, node: str, exchange: str, channel: paramiko.Channel) -> None:
        """Wait for the host's EK request; issue the certificate, or refuse it."""
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while not self._exists(f"{exchange}/{REQUEST}"):
            if channel.exit_status_ready():
                return  # swtpm_setup ended without asking: its exit status says why
            if time.monotonic() > deadline:
                raise HostsError(f"{self.name}: swtpm_setup asked for no EK certificate "
                                 f"within {SETUP_TIMEOUT_S:.0f} s")
            time.sleep(_POLL_S)
        try:
            with self.sftp().open(f"{exchange}/{REQUEST}", "r") as handle:
                data = handle.read(MAX_REQUEST_BYTES + 1)
            cert = self._issue(node, parse_ek_request(data, self.name))
        except (HostsError, VerificationError):
            with self.sftp().open(f"{exchange}/{REFUSED}", "w") as handle:
                handle.write(b"refused\n")
            raise
        with self.sftp().open(f"{exchange}/{RESPONSE}.part", "w") as handle:
            handle.write(cert)
        self.sftp().posix_rename(f"{exchange}/{RESPONSE}.part", f"{exchange}/{RESPONSE}")

    def _issue(self, node: str, request: EkRequest) -> bytes:
        """The EK certificate from this host's intermediate CA (refused unless the host's
        latest attestation is good), the node recorded as running on this host."""
        ek = rsa.RSAPublicNumbers(65537, int(request.modulus_hex, 16)).public_key()
        identity = [(k, v) for k, v in request.identity if k in TPM_ATTRIBUTES]
        return issue_vtpm_ek_certificate(self.lab, self.name, ek, node=node, identity=identity,
                                         agent=agent_client(self.session, self.name))

    # --- the VM network across hosts -----------------------------------------------------

    def join_vm_segment(self, bridge: str, device: str, vni: int, lab_address: str) -> None:
        """On the host: ``bridge`` (the VMs' lab NICs join it) with ``device``, a VXLAN
        (``vni``) to the lab's end at ``lab_address``, as its one uplink; made again if
        either exists. One SSH command."""
        _check_link_names(self.name, bridge, device)
        link = ["link", "add", device, "type", "vxlan", "id", str(vni), "local", self.address,
                "remote", lab_address, "dstport", str(VXLAN_PORT), "dev", "eth0"]
        script = "\n".join([
            f"ip link del {device} 2>/dev/null || true",
            f"{{ [ -e /sys/class/net/{bridge} ] || ip link add {bridge} type bridge; }}",
            f"echo 1 > /proc/sys/net/ipv6/conf/{bridge}/disable_ipv6",
            f"ip link set {bridge} up",
            "ip " + shlex.join(link),
            f"echo 1 > /proc/sys/net/ipv6/conf/{device}/disable_ipv6",
            f"ip link set {device} master {bridge} up",
        ])
        self.run(["sh", "-ec", script])

    def leave_vm_segment(self, bridge: str, device: str) -> None:
        """The host's end of the segment removed (nothing of it is left on the host)."""
        _check_link_names(self.name, bridge, device)
        self.run(["sh", "-c", f"ip link del {device} 2>/dev/null; "
                              f"ip link del {bridge} 2>/dev/null; true"])

    def remove_vm(self, domain: str, vm_uuid: str) -> None:
        """A VM's run directory (console log, NVRAM) and vTPM state on the host."""
        if "/" in domain or not domain or "/" in vm_uuid or not vm_uuid:
            raise HostsError(f"{self.name}: refusing to remove {domain!r}/{vm_uuid!r}")
        self.run(["rm", "-rf", posixpath.join(VMS, domain),
                  posixpath.join(SWTPM_STORAGE, vm_uuid)])


def _check_link_names(host: str, *names: str) -> None:
    """Interface names go into a shell command on the host: only what the lab makes."""
    for name in names:
        if not re.fullmatch(r"tb[a-z0-9]{1,13}", name):
            raise HostsError(f"{host}: refusing the interface name {name!r}")


def forward_to_host(workdir: Path, host: str, port: int) -> tuple[str, int]:
    """An address on the lab's loopback for one connection to ``port`` on ``host``'s
    loopback, over an SSH session of its own (closed when that connection ends)."""
    lab = LabPaths(workdir)
    state = LabState.load(lab)
    if state is None or host not in state.hosts:
        raise HostsError(f"{host} is not in the hosts lab of {workdir} any more "
                         "(`testbed hosts status`)")
    session = SshSession(state.hosts[host].address, lab)
    return forward_once(SshTcpTransport(session, port), on_close=session.close)


register_host_forward(forward_to_host)
