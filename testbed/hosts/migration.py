"""Attested, TLS-encrypted live migration between the lab's hosts: the host side
(docs/hosts.md, "Migration"). The VM side (vm.json, libvirt's migration call, the guest
agent) is :mod:`testbed.qemu.migration`, which sits above this room.

* :func:`attest_now`: a fresh quote of a host over SSH; a host that fails is refused
  (:class:`~testbed.hosts.placement.HostNotTrusted` naming the host and the check).
* :func:`issue_migration_credentials`: the host's x509 migration credentials. The key is
  generated **on the host** (``openssl`` over SSH, written 0600 into its private
  ``/etc/libvirt/migrate-tls``, never sent anywhere); the lab gets its CSR, checks it,
  and has the lab's *migration CA* (under the lab CA root) sign a short-lived
  certificate naming the host (SAN: its name and address, as QEMU checks the address of
  the migration URI) for both TLS ends. Only right after the host attested.
* :func:`migration_ca`: that CA: its key in a 0600 file on the lab, its certificate
  signed by the lab CA root (pathLen 0); the hosts trust it alone for migration streams.
"""

from __future__ import annotations

import datetime
import ipaddress
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from attestation.files import atomic_write, private_dir, read_bounded
from testbed.core.files import locked
from testbed.hosts.attest import HostVerdict, attest_host
from testbed.hosts.layout import HostsError, LabPaths
from testbed.hosts.machine import MIGRATE_TLS_DIR
from testbed.hosts.placement import SWTPM_STORAGE, VMS, HostNotTrusted, PlacedHost
from testbed.hosts.remote import agent_client
from testbed.tpm.localca import LocalCA

__all__ = [
    "CREDENTIAL_VALIDITY",
    "MigrationCa",
    "attest_now",
    "issue_migration_credentials",
    "leftovers",
    "migration_ca",
    "prepare_destination",
]

CREDENTIAL_VALIDITY = datetime.timedelta(hours=1)  # issued per migration, after attesting
CA_VALIDITY = datetime.timedelta(days=30)
CLOCK_SKEW = datetime.timedelta(minutes=5)
MAX_PEM_BYTES = 16 * 1024
QEMU_USER = "libvirt-qemu"  # QEMU reads its TLS key itself (Debian's libvirt runs it so)
_ORG = "trusted-hypervisor-testbed"


def attest_now(lab: LabPaths, host: PlacedHost) -> HostVerdict:
    """``host`` attested now (a fresh quote over its SSH session), or HostNotTrusted."""
    verdict = attest_host(lab, host.name, agent_client(host.session, host.name))
    if not verdict.trusted:
        raise HostNotTrusted(host.name, verdict.failed_check or "host_attestation",
                             verdict.message)
    return verdict


# --- the lab's migration CA --------------------------------------------------------------


@dataclass(frozen=True)
class MigrationCa:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _ca_dir(lab: LabPaths) -> Path:
    return lab.root / "migration-ca"


def migration_ca(lab: LabPaths) -> MigrationCa:
    """The lab's migration CA, made on first use (and again once it nears its end)."""
    directory = private_dir(_ca_dir(lab))
    cert_path, key_path = directory / "ca-cert.pem", directory / "ca-key.pem"
    with locked(directory / ".lock"):
        if cert_path.is_file() and key_path.is_file():
            cert = x509.load_pem_x509_certificate(
                read_bounded(cert_path, MAX_PEM_BYTES, what="migration CA certificate"))
            key = serialization.load_pem_private_key(
                read_bounded(key_path, MAX_PEM_BYTES, what="migration CA key"), None)
            soon = datetime.datetime.now(datetime.UTC) + CREDENTIAL_VALIDITY
            if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > soon:
                return MigrationCa(cert, key)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _sign_ca(LocalCA(lab.ca_dir), key.public_key())
        atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return MigrationCa(cert, key)


def _sign_ca(ca: LocalCA, key: ec.EllipticCurvePublicKey) -> x509.Certificate:
    root, root_key = ca.root_signer()
    now = datetime.datetime.now(datetime.UTC)
    ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                      x509.NameAttribute(NameOID.COMMON_NAME, "lab migration CA")])
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(root.subject).public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True,
                                         False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(root_key, hashes.SHA256()))


# --- a host's credentials -----------------------------------------------------------------


def issue_migration_credentials(lab: LabPaths, host: PlacedHost,
                                verdict: HostVerdict) -> x509.Certificate:
    """New migration credentials for ``host``, which attested just now (``verdict``)."""
    if not verdict.trusted or verdict.host != host.name:
        raise HostNotTrusted(host.name, verdict.failed_check or "host_attestation",
                             "no migration credentials for a host that did not attest good")
    ca = migration_ca(lab)
    csr = _csr_from_host(host)
    cert = _sign_host(ca, host, csr.public_key())
    _install(host, ca, cert)
    return cert


def _csr_from_host(host: PlacedHost) -> x509.CertificateSigningRequest:
    """A P-256 key made on the host (0600, owned by QEMU's user) and its CSR."""
    key = f"{MIGRATE_TLS_DIR}/server-key.pem"
    host.run(["chmod", "0711", "/etc/libvirt", MIGRATE_TLS_DIR])  # QEMU opens files by path
    script = (f"set -e; umask 077; rm -f {key}.new; "
              f"openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out {key}.new "
              "2>/dev/null; "
              f"openssl req -new -key {key}.new -subj /CN={shlex.quote(host.name)} -batch; "
              f"chown {QEMU_USER} {key}.new; mv -f {key}.new {key}; "
              f"cp -p {key} {MIGRATE_TLS_DIR}/client-key.pem")
    out = host.run(["sh", "-c", script])
    try:
        csr = x509.load_pem_x509_csr(out.encode()[:MAX_PEM_BYTES])
    except ValueError:
        raise HostsError(f"{host.name}: its migration key request is not a PEM CSR: "
                         f"{out.strip()[:200]!r}") from None
    public = csr.public_key()
    if not csr.is_signature_valid or not isinstance(public, ec.EllipticCurvePublicKey) \
            or public.curve.name != "secp256r1":
        raise HostsError(f"{host.name}: its migration key request is not a self-signed "
                         "P-256 CSR: refused")
    return csr


def _sign_host(ca: MigrationCa, host: PlacedHost, key: object) -> x509.Certificate:
    """The host's certificate: its name and address as QEMU checks them (the migration
    URI's address; libvirt passes it as ``tls-hostname``), server and client."""
    assert isinstance(key, ec.EllipticCurvePublicKey)
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
                      x509.NameAttribute(NameOID.COMMON_NAME, host.name)])
    san = x509.SubjectAlternativeName([x509.DNSName(host.name),
                                       x509.IPAddress(ipaddress.ip_address(host.address))])
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    return (x509.CertificateBuilder()
            .subject_name(name).issuer_name(ca.certificate.subject).public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + CREDENTIAL_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False,
                                         False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(san, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski.value), critical=False)
            .sign(ca.key, hashes.SHA256()))


def _install(host: PlacedHost, ca: MigrationCa, cert: x509.Certificate) -> None:
    """The certificates beside the key; the migration CA is the hosts' only anchor."""
    pem = cert.public_bytes(serialization.Encoding.PEM)
    files = {"ca-cert.pem": ca.pem, "server-cert.pem": pem, "client-cert.pem": pem}
    try:
        for name, data in files.items():
            with host.sftp().open(f"{MIGRATE_TLS_DIR}/{name}.part", "w") as handle:
                handle.write(data)
            host.sftp().chmod(f"{MIGRATE_TLS_DIR}/{name}.part", 0o644)
            host.sftp().posix_rename(f"{MIGRATE_TLS_DIR}/{name}.part",
                                     f"{MIGRATE_TLS_DIR}/{name}")
    except (OSError, paramiko.SSHException) as exc:
        raise HostsError(f"{host.name}: installing its migration certificates: {exc}") \
            from None


# --- the destination before, the source after ---------------------------------------------


def prepare_destination(host: PlacedHost, domain: str, vm_uuid: str,
                        artifacts: Sequence[tuple[Path, str]]) -> None:
    """What an incoming VM needs on ``host``: the guest image's artifacts (by digest,
    verified there), its run directory, and an empty vTPM directory. libvirt 9.0 runs
    ``swtpm_setup`` for a vTPM directory it does not find, even for an incoming
    migration (it fails there: no certificate authority on the host, and it must not
    make a new vTPM anyway); with the directory present it starts swtpm on it, and
    QEMU's tpm-emulator hands swtpm the source vTPM's state blobs from the stream."""
    host.prepare()
    for local, what in artifacts:
        host.copy_artifact(local, what)
    host.make_run_dir(domain)
    vtpm = f"{SWTPM_STORAGE}/{vm_uuid}"
    host.run(["mkdir", "-p", f"{vtpm}/tpm2"])
    host.run(["chmod", "0711", vtpm])
    host.run(["chmod", "0700", f"{vtpm}/tpm2"])


def leftovers(host: PlacedHost, domain: str, vm_uuid: str) -> list[str]:
    """What of a VM is still on ``host`` (its run directory, its vTPM directory)."""
    found = []
    for path in (f"{VMS}/{domain}", f"{SWTPM_STORAGE}/{vm_uuid}"):
        if host.run(["sh", "-c", f"test -e {shlex.quote(path)} && echo yes || true"]).strip():
            found.append(path)
    return found
