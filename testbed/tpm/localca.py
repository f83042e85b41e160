"""A project-local certificate authority for swtpm EK and platform certificates.

swtpm_setup issues EK/platform certificates through ``swtpm_localca``, whose
stock configuration keeps its keys in the machine-wide
``/var/lib/swtpm-localca``. This module points it at a directory the caller
owns (normally the project's state dir, e.g. ``.testbed/ca``) so that each
checkout, CI job or test session has its own root of trust, and a verifier can
be given exactly that root.

The CA is created eagerly by :meth:`LocalCA.ensure`: it asks ``swtpm_localca``
for one throwaway EK certificate (for a random key nobody holds), which is
what makes ``swtpm_localca`` generate the root and intermediate. That costs
~0.5 s once and means :meth:`LocalCA.ca_bundle` works before any TPM exists.

Layout of the directory (all written by this module or ``swtpm_localca``)::

    swtpm-localca-rootca-cert.pem     root CA certificate
    swtpm-localca-rootca-privkey.pem  root CA key        (0600)
    issuercert.pem                    intermediate CA certificate (signs EK certs)
    signkey.pem                       intermediate key   (0600)
    certserial                        next serial number
    swtpm-localca.conf                swtpm_localca config (--configfile)
    swtpm-localca.options             swtpm_cert options   (--optsfile)
    swtpm_setup.conf                  swtpm_setup config   (--config)
    .testbed-ca.lock                  flock serialising CA users
    .lock.swtpm-localca               swtpm_localca's own lock

The directory is 0700 and every file in it 0600, certificates included: nothing
here is meant for another user (a verifier gets the bundle from :meth:`LocalCA.ca_bundle`
or a copy its owner makes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation.files import atomic_write, read_bounded
from testbed.core.errors import StateError, SwtpmError

__all__ = ["BOOTSTRAP_HINT", "DEFAULT_PCR_BANKS", "LocalCA", "find_tool", "validate_pcr_banks"]

BOOTSTRAP_HINT = "install swtpm/swtpm-tools by running the project bootstrap: sh .ci/bootstrap"
DEFAULT_PCR_BANKS = "sha256"
_BANK = r"(?:sha1|sha256|sha384|sha512)"
_PCR_BANKS_RE = re.compile(rf"{_BANK}(?:,{_BANK})*")
_LOCALCA_TIMEOUT_S = 60.0
MAX_ROOT_PEM = 64 * 1024  # the root certificate or key file, at most
RootKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# Arbitrary but valid TPM identity for the one throwaway bootstrap certificate;
# swtpm_localca refuses to issue an EK certificate without them.
_BOOTSTRAP_TPM_ARGS = (
    "--tpm-spec-family", "2.0", "--tpm-spec-level", "0", "--tpm-spec-revision", "164",
    "--tpm-manufacturer", "id:00001014", "--tpm-model", "swtpm", "--tpm-version", "id:20191023",
    "--tpm2",
)  # fmt: skip
_OPTIONS = "--platform-manufacturer testbed\n--platform-version 0.1\n--platform-model swtpm\n"


def find_tool(name: str) -> str:
    """Absolute path of an swtpm tool, or a :class:`SwtpmError` saying how to get it."""
    path = shutil.which(name)
    if path is None:
        raise SwtpmError(f"{name} not found on PATH; {BOOTSTRAP_HINT}")
    return path


def validate_pcr_banks(pcr_banks: str) -> str:
    """Reject anything but a comma-separated list of bank names.

    The value ends up in a ``key = value`` config file and on a command line,
    so a stray newline or space would silently change the configuration.
    """
    if not _PCR_BANKS_RE.fullmatch(pcr_banks):
        raise ValueError(
            f"bad PCR bank list {pcr_banks!r}; expected e.g. 'sha256' or 'sha1,sha256'"
        )
    return pcr_banks


class LocalCA:
    """One swtpm_localca certificate authority living in ``directory``.

    Construct it with :meth:`ensure`; the plain constructor only computes paths.
    """

    ROOT_CERT = "swtpm-localca-rootca-cert.pem"
    ROOT_KEY = "swtpm-localca-rootca-privkey.pem"
    INTERMEDIATE_CERT = "issuercert.pem"
    SIGNING_KEY = "signkey.pem"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory).absolute()

    @classmethod
    def ensure(cls, directory: Path, *, pcr_banks: str = DEFAULT_PCR_BANKS) -> LocalCA:
        """Create (or re-check) the CA in ``directory``; idempotent and process-safe.

        Writes the three config files, creates the root and intermediate if
        they do not exist yet, and tightens permissions. ``pcr_banks`` becomes
        ``active_pcr_banks`` in the swtpm_setup config (a default only:
        :func:`testbed.tpm.swtpm.provision` passes ``--pcr-banks`` explicitly).
        """
        ca = cls(directory)
        validate_pcr_banks(pcr_banks)
        ca._prepare_directory()
        if ca._ready(pcr_banks):
            # Nothing to write: no exclusive lock, which would wait for every provisioning
            # under way (each node start ensures the CA: starts run concurrently).
            return ca
        with ca.lock():
            ca._write_configs(pcr_banks)
            if not ca.root_cert_path.exists():
                ca._bootstrap()
            ca._check_complete()
            ca.tighten_permissions()
        return ca

    # -- paths ---------------------------------------------------------------

    @property
    def root_cert_path(self) -> Path:
        return self.directory / self.ROOT_CERT

    @property
    def root_key_path(self) -> Path:
        return self.directory / self.ROOT_KEY

    @property
    def intermediate_cert_path(self) -> Path:
        return self.directory / self.INTERMEDIATE_CERT

    @property
    def signing_key_path(self) -> Path:
        return self.directory / self.SIGNING_KEY

    @property
    def ca_config_path(self) -> Path:
        """swtpm_localca's config (``--configfile``): where its keys and serial live."""
        return self.directory / "swtpm-localca.conf"

    @property
    def options_path(self) -> Path:
        """swtpm_cert options (``--optsfile``): platform certificate attributes."""
        return self.directory / "swtpm-localca.options"

    @property
    def setup_config_path(self) -> Path:
        """swtpm_setup's config (``--config``): which certificate tool to run."""
        return self.directory / "swtpm_setup.conf"

    @property
    def lock_path(self) -> Path:
        return self.directory / ".testbed-ca.lock"

    @property
    def private_key_paths(self) -> tuple[Path, Path]:
        return (self.root_key_path, self.signing_key_path)

    # -- public operations ---------------------------------------------------

    @contextlib.contextmanager
    def lock(self, *, shared: bool = False) -> Iterator[None]:
        """Hold a flock on the CA for the duration of the block: exclusive, or
        ``shared`` with other shared holders.

        swtpm_localca takes its own lock around the serial counter and each
        certificate it issues, but not around first-time CA creation or our
        permission fix-ups: those hold this lock exclusively, while provisionings
        (which only issue certificates) hold it shared, so that many run at once.
        """
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def ca_bundle(self) -> list[x509.Certificate]:
        """The trust anchors for EK certificates: ``[root, intermediate]``."""
        return [
            x509.load_pem_x509_certificate(self.root_cert_path.read_bytes()),
            x509.load_pem_x509_certificate(self.intermediate_cert_path.read_bytes()),
        ]

    def root_signer(self) -> tuple[x509.Certificate, RootKey]:
        """The root's certificate and private key, read under the CA lock, for what the lab
        CA certifies itself (a host's intermediate, the migration CA); StateError if either
        is unusable."""
        try:
            with self.lock():
                cert = x509.load_pem_x509_certificate(
                    read_bounded(self.root_cert_path, MAX_ROOT_PEM, what="lab CA certificate"))
                key = serialization.load_pem_private_key(
                    read_bounded(self.root_key_path, MAX_ROOT_PEM, what="lab CA key"), None)
        except (ValueError, TypeError) as exc:
            raise StateError(f"the lab CA root in {self.directory} is unusable: {exc}") from None
        if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise StateError(f"the lab CA key in {self.directory} is neither RSA nor EC")
        return cert, key

    def tighten_permissions(self) -> None:
        """Make the directory 0700 and every file in it 0600.

        swtpm_localca runs under umask 077 here, but CAs made by older versions
        have 0640 keys, a 0755 lock file and 0644 certificates; the directory
        being 0700 from the start (see :meth:`_prepare_directory`) closes the
        window in between.
        """
        os.chmod(self.directory, 0o700)
        for entry in self.directory.iterdir():
            if entry.is_file() and not entry.is_symlink():
                os.chmod(entry, 0o600)

    # -- internals -----------------------------------------------------------

    def _prepare_directory(self) -> None:
        """Create the directory 0700, refusing paths that are not ours to use."""
        if "\n" in str(self.directory):
            raise StateError(f"CA directory path contains a newline: {self.directory!r}")
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise StateError(f"CA directory {self.directory} is not a directory") from exc
        info = self.directory.stat()
        if not stat.S_ISDIR(info.st_mode):
            raise StateError(f"CA directory {self.directory} is not a directory")
        if info.st_uid != os.getuid():
            raise StateError(f"CA directory {self.directory} is owned by uid {info.st_uid}")
        os.chmod(self.directory, 0o700)

    def _configs(self, pcr_banks: str) -> dict[Path, str]:
        d = self.directory
        return {
            self.ca_config_path: f"statedir = {d}\n"
            f"signingkey = {self.signing_key_path}\n"
            f"issuercert = {self.intermediate_cert_path}\n"
            f"certserial = {d / 'certserial'}\n",
            self.options_path: _OPTIONS,
            self.setup_config_path: f"create_certs_tool = {find_tool('swtpm_localca')}\n"
            f"create_certs_tool_config = {self.ca_config_path}\n"
            f"create_certs_tool_options = {self.options_path}\n"
            f"active_pcr_banks = {pcr_banks}\n",
        }

    def _write_configs(self, pcr_banks: str) -> None:
        for path, text in self._configs(pcr_banks).items():
            _write_atomic(path, text)

    def _ready(self, pcr_banks: str) -> bool:
        """Whether the CA is complete and its configs are exactly these (read without
        the lock: files are replaced atomically, and anything else takes the lock)."""
        try:
            return all(p.is_file() for p in (self.root_cert_path, self.intermediate_cert_path,
                                              *self.private_key_paths)) and \
                all(path.read_text() == text for path, text in self._configs(pcr_banks).items()) \
                and self._private()
        except OSError:
            return False

    def _private(self) -> bool:
        """The directory 0700 and every file in it 0600 (what tighten_permissions makes)."""
        if stat.S_IMODE(self.directory.stat().st_mode) != 0o700:
            return False
        return all(stat.S_IMODE(entry.lstat().st_mode) & 0o077 == 0
                   for entry in self.directory.iterdir()
                   if entry.is_file() and not entry.is_symlink())

    def _bootstrap(self) -> None:
        """Make swtpm_localca create root + intermediate by issuing one throwaway cert."""
        modulus = rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
        with tempfile.TemporaryDirectory(dir=self.directory) as out:
            cmd = [
                find_tool("swtpm_localca"), "--type", "ek", "--ek", format(modulus, "x"),
                "--dir", out, *_BOOTSTRAP_TPM_ARGS,
                "--configfile", str(self.ca_config_path), "--optsfile", str(self.options_path),
            ]  # fmt: skip
            _run_tool(cmd, "swtpm_localca (CA bootstrap)")

    def _check_complete(self) -> None:
        """Refuse a half-built CA (e.g. root present, intermediate lost)."""
        paths = (self.root_cert_path, self.intermediate_cert_path, *self.private_key_paths)
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise StateError(
                f"CA in {self.directory} is incomplete, missing {missing}; "
                "delete the directory to start a new CA"
            )


def _write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` only if its content changes (no torn reads, no needless rewrite)."""
    if path.exists() and path.read_text() == text:
        return
    atomic_write(path, text.encode())


def _run_tool(cmd: list[str], what: str) -> None:
    """Run a helper tool; turn failure or a hang into SwtpmError with its output."""
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=_LOCALCA_TIMEOUT_S,
                             umask=0o077)  # its keys, serial and lock: the owner's only
    except subprocess.TimeoutExpired as exc:
        raise SwtpmError(f"{what} timed out after {exc.timeout:.0f} s") from exc
    if res.returncode != 0:
        output = _tail(res.stdout + "\n" + res.stderr)
        raise SwtpmError(f"{what} failed (exit {res.returncode}):\n{output}")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
