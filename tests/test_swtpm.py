"""Real-swtpm tests for testbed.tpm.localca, testbed.tpm.swtpm and the pytest plugin.

Everything here runs actual swtpm / swtpm_setup processes; no mocks. The
fixtures (swtpm_ca, swtpm_template, swtpm, swtpm_factory) come from the
``testbed_swtpm`` pytest11 plugin under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tpm2_pytss import ESAPI, TCTILdr
from tpm2_pytss.constants import TPM2_CAP, TPM2_HT

import testbed.tpm.swtpm as swtpm_module
from testbed.core.errors import StateError, SwtpmError
from testbed.core.paths import SUN_PATH_MAX
from testbed.tpm.localca import LocalCA
from testbed.tpm.pytest_plugin import SwtpmFactory, _require_binaries
from testbed.tpm.swtpm import (
    ECC_EK_CERT_NV_INDEX,
    ECC_EK_HANDLE,
    PLATFORM_CERT_NV_INDEX,
    RSA_EK_CERT_NV_INDEX,
    RSA_EK_HANDLE,
    Swtpm,
    clone_state,
    provision,
)

NV_CHUNK = 1024  # swtpm's TPM2_PT_NV_BUFFER_MAX


def read_nv(esys: Any, index: int) -> bytes:
    """Read a whole NV index, authorising with the index itself (AUTHREAD)."""
    handle = esys.tr_from_tpmpublic(index)
    public, _name = esys.nv_read_public(handle)
    size = public.nvPublic.dataSize
    data = b""
    while len(data) < size:
        chunk = min(NV_CHUNK, size - len(data))
        data += bytes(esys.nv_read(handle, chunk, len(data), auth_handle=handle))
    return data


def read_cert(esys: Any, index: int) -> x509.Certificate:
    return x509.load_der_x509_certificate(read_nv(esys, index))


def ek_public_der(tpm: Swtpm, handle: int = RSA_EK_HANDLE) -> bytes:
    """The persisted EK's public area, as the TPM marshals it."""
    with tpm.esapi() as esys:
        public, _name, _qname = esys.read_public(esys.tr_from_tpmpublic(handle))
        return bytes(public.marshal())


def handles(tpm: Swtpm, kind: TPM2_HT) -> list[int]:
    with tpm.esapi() as esys:
        _more, data = esys.get_capability(TPM2_CAP.HANDLES, int(kind) << 24, 64)
        return [int(h) for h in data.data.handles]


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie awaiting its reaper)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat_line.rsplit(")", 1)[1].split()[0] == "Z"


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.02)
    return process_gone(pid)


# -- provisioning and the CA ---------------------------------------------------


def test_ek_and_platform_certs_in_nv_chain_to_ca_bundle(swtpm: Swtpm, swtpm_ca: LocalCA) -> None:
    root, intermediate = swtpm_ca.ca_bundle()
    intermediate.verify_directly_issued_by(root)
    with swtpm.esapi() as esys:
        rsa_cert = read_cert(esys, RSA_EK_CERT_NV_INDEX)
        ecc_cert = read_cert(esys, ECC_EK_CERT_NV_INDEX)
        platform_cert = read_cert(esys, PLATFORM_CERT_NV_INDEX)
    for cert in (rsa_cert, ecc_cert, platform_cert):
        cert.verify_directly_issued_by(intermediate)
    rsa_key = rsa_cert.public_key()
    ecc_key = ecc_cert.public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey) and rsa_key.key_size == 2048
    assert isinstance(ecc_key, ec.EllipticCurvePublicKey)
    assert isinstance(ecc_key.curve, ec.SECP384R1)


def test_ek_certs_certify_the_persisted_eks(swtpm: Swtpm) -> None:
    with swtpm.esapi() as esys:
        rsa_cert = read_cert(esys, RSA_EK_CERT_NV_INDEX)
        ecc_cert = read_cert(esys, ECC_EK_CERT_NV_INDEX)
        rsa_pub, _, _ = esys.read_public(esys.tr_from_tpmpublic(RSA_EK_HANDLE))
        ecc_pub, _, _ = esys.read_public(esys.tr_from_tpmpublic(ECC_EK_HANDLE))
    rsa_key = rsa_cert.public_key()
    ecc_key = ecc_cert.public_key()
    assert isinstance(rsa_key, rsa.RSAPublicKey)
    assert isinstance(ecc_key, ec.EllipticCurvePublicKey)
    modulus = int.from_bytes(bytes(rsa_pub.publicArea.unique.rsa), "big")
    assert rsa_key.public_numbers().n == modulus
    point = ecc_pub.publicArea.unique.ecc
    assert ecc_key.public_numbers().x == int.from_bytes(bytes(point.x), "big")


def test_ca_dir_is_0700_and_every_file_0600(swtpm_ca: LocalCA, swtpm_template: Path) -> None:
    # swtpm_template forces a provisioning through the CA first.
    assert stat.S_IMODE(swtpm_ca.directory.stat().st_mode) == 0o700
    for key in swtpm_ca.private_key_paths:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    for entry in swtpm_ca.directory.iterdir():  # certserial, swtpm_localca's lock, ...
        assert stat.S_IMODE(entry.lstat().st_mode) == 0o600, entry
    assert stat.S_IMODE(swtpm_template.stat().st_mode) == 0o700
    for entry in swtpm_template.iterdir():
        assert stat.S_IMODE(entry.lstat().st_mode) == 0o600, entry


def test_an_older_ca_with_open_modes_is_tightened(tmp_path: Path, swtpm_ca: LocalCA) -> None:
    old = tmp_path / "ca"
    old.mkdir()
    for entry in swtpm_ca.directory.iterdir():
        (old / entry.name).write_bytes(entry.read_bytes())
        os.chmod(old / entry.name, 0o644)
    os.chmod(old, 0o755)
    LocalCA(old).tighten_permissions()
    assert stat.S_IMODE(old.stat().st_mode) == 0o700
    assert {stat.S_IMODE(e.stat().st_mode) for e in old.iterdir()} == {0o600}
    assert "/var/lib/swtpm-localca" not in swtpm_ca.setup_config_path.read_text()
    assert "/var/lib/swtpm-localca" not in swtpm_ca.ca_config_path.read_text()


def test_ca_ensure_is_idempotent(swtpm_ca: LocalCA) -> None:
    before = swtpm_ca.root_cert_path.read_bytes()
    again = LocalCA.ensure(swtpm_ca.directory)
    assert again.root_cert_path.read_bytes() == before
    assert [c.subject for c in again.ca_bundle()] == [c.subject for c in swtpm_ca.ca_bundle()]


def test_provision_refuses_to_overwrite_existing_state(
    swtpm_ca: LocalCA, swtpm_template: Path
) -> None:
    with pytest.raises(StateError, match="already holds TPM state"):
        provision(swtpm_template, swtpm_ca)


def test_concurrent_provisionings_get_distinct_cert_serials(
    swtpm_ca: LocalCA, tmp_path: Path
) -> None:
    dirs = [tmp_path / "a", tmp_path / "b"]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda d: provision(d, swtpm_ca), dirs))
    serials = set()
    for state in dirs:
        with Swtpm(state) as tpm, tpm.esapi() as esys:
            serials.add(read_cert(esys, RSA_EK_CERT_NV_INDEX).serial_number)
    assert len(serials) == 2


def test_clones_share_the_template_ek_unique_tpms_do_not(
    swtpm: Swtpm, swtpm_factory: SwtpmFactory, swtpm_ca: LocalCA
) -> None:
    clone = swtpm_factory()
    unique = swtpm_factory(unique=True)
    assert ek_public_der(clone) == ek_public_der(swtpm)
    assert ek_public_der(unique) != ek_public_der(swtpm)
    with unique.esapi() as esys:  # a unique TPM still chains to the same CA
        read_cert(esys, RSA_EK_CERT_NV_INDEX).verify_directly_issued_by(swtpm_ca.ca_bundle()[1])


# -- running swtpm ----------------------------------------------------------------


def test_two_tcp_instances_run_side_by_side(swtpm_factory: SwtpmFactory) -> None:
    first, second = swtpm_factory(transport="tcp"), swtpm_factory(transport="tcp")
    assert first.port != second.port
    assert {first.ctrl_port, second.ctrl_port}.isdisjoint({first.port, second.port})
    assert first.pid != second.pid
    for tpm in (first, second):
        assert tpm.tcti == f"swtpm:host=127.0.0.1,port={tpm.port}"
        with ESAPI(TCTILdr(tpm.tcti_name, tpm.tcti_conf)) as esys:
            assert len(bytes(esys.get_random(8))) == 8


def test_unix_socket_transport_serves_tcti_and_raw_commands(swtpm_factory: SwtpmFactory) -> None:
    tpm = swtpm_factory(transport="unix")
    assert tpm.tcti == f"swtpm:path={tpm.socket_path}"
    for sock in (tpm.socket_path, tpm.ctrl_socket_path):
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(tpm.socket_path.parent.stat().st_mode) == 0o700
    with tpm.esapi() as esys:  # tpm2-tss 3.2.1's swtpm TCTI does unix sockets
        assert len(bytes(esys.get_random(8))) == 8
    # What QEMU does: raw TPM2_GetRandom(8) bytes on the data socket.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(tpm.socket_path))
        sock.sendall(struct.pack(">HIIH", 0x8001, 12, 0x17B, 8))
        response = sock.recv(64)
    tag, size, rc, count = struct.unpack(">HIIH", response[:12])
    assert (tag, size, rc, count) == (0x8001, 20, 0, 8)


@pytest.fixture
def runtime_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short private $XDG_RUNTIME_DIR of our own, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="xdg-", dir="/tmp"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def deep_dir(tmp_path: Path) -> Path:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(os.fsencode(deep / "swtpm.sock.ctrl")) > SUN_PATH_MAX
    return deep


@pytest.mark.parametrize("base", ["xdg", "tmp"])
def test_a_deep_run_dir_gets_its_sockets_in_a_short_private_dir(
    base: str, runtime_dir: Path, swtpm_template: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if base == "tmp":
        monkeypatch.delenv("XDG_RUNTIME_DIR")
    state = deep_dir(tmp_path) / "state"
    clone_state(swtpm_template, state)
    tpm = Swtpm(state)
    expected = runtime_dir / "testbed" if base == "xdg" else Path(f"/tmp/testbed-{os.geteuid()}")
    assert tpm.socket_path.parent.parent == expected
    with tpm:
        assert len(os.fsencode(tpm.ctrl_socket_path)) <= SUN_PATH_MAX
        for directory in (tpm.socket_path.parent, expected):
            assert stat.S_IMODE(directory.lstat().st_mode) == 0o700
            assert directory.lstat().st_uid == os.geteuid()
        with tpm.esapi() as esys:  # the TCTI reaches it by that short path
            assert len(bytes(esys.get_random(8))) == 8
        assert not (state / "swtpm.sock").exists()
    assert not tpm.socket_path.parent.exists()  # stop removes the directory it made


def test_stop_pidfile_removes_the_short_socket_dir(
    runtime_dir: Path, swtpm_template: Path, tmp_path: Path
) -> None:
    state = deep_dir(tmp_path) / "state"
    clone_state(swtpm_template, state)
    tpm = Swtpm(state, detached=True).start()
    try:
        os.kill(tpm.pid, signal.SIGKILL)  # no graceful exit: the sockets stay behind
        assert wait_gone(tpm.pid)
        assert tpm.socket_path.is_socket()
        tpm.pid_file.write_text("99999999\n")  # ... and a stale pid file
        assert Swtpm.stop_pidfile(tpm.pid_file) is False
        tpm.start()  # the stale sockets do not stop a restart
        assert Swtpm.stop_pidfile(tpm.pid_file) is True
        assert not tpm.socket_path.parent.exists()
    finally:
        tpm.stop()


@pytest.mark.parametrize("squat", ["other owner", "symlink", "open mode"])
def test_a_socket_dir_someone_else_prepared_is_refused(
    squat: str, runtime_dir: Path, swtpm_template: Path, tmp_path: Path
) -> None:
    base = runtime_dir / "testbed"
    if squat == "symlink":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        base.symlink_to(tmp_path / "elsewhere")
    else:
        base.mkdir(mode=0o700)
        if squat == "other owner":
            os.chown(base, 65534, 65534)  # nobody
        else:
            os.chmod(base, 0o755)
    state = deep_dir(tmp_path) / "state"
    clone_state(swtpm_template, state)
    tpm = Swtpm(state)
    with pytest.raises(StateError, match="refusing socket directory"):
        tpm.start()
    assert not tpm.running
    assert list((tmp_path / "elsewhere").iterdir() if squat == "symlink" else []) == []


def test_stop_is_idempotent_and_restart_keeps_state(swtpm: Swtpm) -> None:
    ek = ek_public_der(swtpm)
    pid = swtpm.pid
    swtpm.stop()
    swtpm.stop()
    assert not swtpm.running
    assert wait_gone(pid, timeout=0.5)
    swtpm.start()
    assert swtpm.pid != pid
    assert ek_public_der(swtpm) == ek


def test_flush_transients_removes_leftover_objects(swtpm: Swtpm) -> None:
    with swtpm.esapi() as esys:  # a "crashed" client: creates, never flushes
        esys.create_primary(None, "ecc256")
    assert len(handles(swtpm, TPM2_HT.TRANSIENT)) == 1
    assert swtpm.flush_transients() == 1
    assert handles(swtpm, TPM2_HT.TRANSIENT) == []
    assert swtpm.flush_transients() == 0


def test_tcp_start_retries_when_port_is_taken(
    swtpm_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_free_port_pair = swtpm_module._free_port_pair
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        offers = iter([taken])
        monkeypatch.setattr(
            swtpm_module, "_free_port_pair", lambda: next(offers, None) or real_free_port_pair()
        )
        clone_state(swtpm_template, tmp_path / "state")
        with Swtpm(tmp_path / "state", transport="tcp") as tpm:
            assert tpm.port != taken
            with tpm.esapi() as esys:
                assert len(bytes(esys.get_random(4))) == 4


def test_second_swtpm_on_same_state_fails_with_log_tail(swtpm: Swtpm, tmp_path: Path) -> None:
    intruder = Swtpm(swtpm.state_dir, run_dir=tmp_path / "intruder")
    with pytest.raises(SwtpmError, match="lock"):
        intruder.start()
    assert not intruder.running
    assert swtpm.running


def test_start_on_missing_state_dir_is_a_state_error(tmp_path: Path) -> None:
    with pytest.raises(StateError, match="does not exist"):
        Swtpm(tmp_path / "nope").start()


# -- no orphans ---------------------------------------------------------------------

CHILD = """
import os, sys, time
from pathlib import Path
from testbed.tpm.swtpm import Swtpm
tpm = Swtpm(Path(sys.argv[1])).start()
print(tpm.pid, flush=True)
if sys.argv[2] == "return":
    sys.exit(0)  # normal exit: the atexit hook stops swtpm gracefully
if sys.argv[2] == "os._exit":
    os._exit(0)  # no atexit, no finally: only PR_SET_PDEATHSIG can clean up
time.sleep(60)  # until the test SIGKILLs us
"""


@pytest.mark.parametrize("death", ["return", "os._exit", "sigkill"])
def test_dead_parent_leaves_no_orphan_swtpm(
    death: str, swtpm_template: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    clone_state(swtpm_template, state)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(state), death], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    swtpm_pid = int(child.stdout.readline())
    try:
        if death == "sigkill":
            child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert wait_gone(swtpm_pid), "swtpm outlived its parent"
        # swtpm deletes its pid file only on a graceful (SIGTERM) exit.
        assert (state / "swtpm.pid").exists() == (death != "return")
    finally:
        child.kill()
        child.wait()
        if not process_gone(swtpm_pid):
            os.kill(swtpm_pid, signal.SIGKILL)


def test_stop_pidfile_stops_a_detached_swtpm(swtpm_template: Path, tmp_path: Path) -> None:
    clone_state(swtpm_template, tmp_path / "state")
    tpm = Swtpm(tmp_path / "state", detached=True).start()
    try:
        assert os.getsid(tpm.pid) == tpm.pid  # own session: survives our terminal
        assert Swtpm.stop_pidfile(tpm.pid_file) is True
        assert wait_gone(tpm.pid, timeout=0.5)
        assert not tpm.pid_file.exists()
        assert Swtpm.stop_pidfile(tpm.pid_file) is False
    finally:
        tpm.stop()


def test_stop_pidfile_refuses_a_pid_that_is_not_swtpm(tmp_path: Path) -> None:
    pid_file = tmp_path / "swtpm.pid"
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pid_file.write_text(f"{sleeper.pid}\n")
        with pytest.raises(SwtpmError, match="refusing"):
            Swtpm.stop_pidfile(pid_file)
        assert sleeper.poll() is None
        assert pid_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stop_pidfile_refuses_an_swtpm_started_with_another_pid_file(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    stale = tmp_path / "other.pid"
    stale.write_text(str(swtpm.pid))
    with pytest.raises(SwtpmError, match="refusing"):
        Swtpm.stop_pidfile(stale)
    assert swtpm.running


# -- the plugin ---------------------------------------------------------------------


def test_plugin_fails_loudly_without_swtpm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"sh \.ci/bootstrap"):
        _require_binaries()
