"""Encrypted disks (docs/svd.md), the parts: the spec's ``disks:`` field, the disk
binding and LUKS header reader, and the qemu-storage-daemon driver on real LUKS1
volumes (one format per module: QEMU's formatter times its PBKDF for ~1 s per slot).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.errors import TestbedError
from cryptovm.disks import (
    LUKS_HEADER_SIZE,
    DiskBinding,
    DiskBindingError,
    disk_key_id,
    luks_uuid,
)
from testbed.core.processes import process_argv, wait_gone
from testbed.spec.cluster_spec import ClusterSpecError, DiskSpec, parse_cluster_spec
from testbed.svd.qsd import DiskFormatError, DiskKeyError, QmpError, StorageDaemon, _Qmp
from testbed.svd.volumes import DiskFiles, attach, detach, disk_status

KEY = b"0123456789abcdef" * 4  # a passphrase as the disk key code makes them: 64 hex chars
MARKER = b"plaintext-marker-of-the-svd-tests"
BOOT = {"firmware": {"content": "fw"}, "kernel": {"content": "k"},
        "initrd": {"content": "i"}, "cmdline": "ro"}


# --- the spec ----------------------------------------------------------------------------


def _spec(disks: object, *, role: str = "generic", cryptovm: bool = True,
          backend: str = "sim") -> str:
    nodes: list[dict[str, Any]] = [{"name": "web", "role": role, "boot": BOOT,
                                    "disks": disks}]
    if cryptovm:
        nodes.append({"name": "cvm", "role": "cryptovm", "boot": BOOT})
    return json.dumps({"version": 1, "name": "t", "backend": backend, "nodes": nodes})


@pytest.mark.parametrize("size,expected", [("64M", 64 << 20), ("1G", 1 << 30),
                                           ("16MiB", 16 << 20), (1 << 20, 1 << 20),
                                           ("4G", 4 << 30), ("2048K", 2 << 20)])
def test_disk_sizes(size: object, expected: int) -> None:
    spec = parse_cluster_spec(_spec([{"name": "data", "size": size}]), Path("."))
    disk = spec.node("web").disks[0]
    assert (disk.name, disk.size, disk.mode) == ("data", expected, "host")
    assert spec.node("web").to_dict()["disks"] == [disk.to_dict()]


@pytest.mark.parametrize("disks,where", [
    ([{"name": "d", "size": 0}], "disks[0].size"),
    ([{"name": "d", "size": "1.5G"}], "disks[0].size"),
    ([{"name": "d", "size": "5G"}], "disks[0].size"),
    ([{"name": "d", "size": 1000}], "disks[0].size"),
    ([{"name": "d", "size": "-1M"}], "disks[0].size"),
    ([{"name": "d", "size": True}], "disks[0].size"),
    ([{"name": "d", "size": "99999999999999G"}], "disks[0].size"),
    ([{"name": "d"}], "disks[0].size: missing"),
    ([{"name": "d", "size": "8M", "cipher": "rot13"}], "disks[0].'cipher': unknown key"),
    ([{"name": "d", "size": "8M", "mode": "both"}], "disks[0].mode"),
    ([{"name": "Bad Name", "size": "8M"}], "disks[0].name"),
    ([{"name": "d", "size": "8M"}, {"name": "d", "size": "8M"}], "used by two disks"),
    ([{"name": f"d{i}", "size": "8M"} for i in range(5)], "more than 4 disks"),
    ({"name": "d"}, "expected a list of disks"),
])
def test_bad_disks_name_the_field(disks: object, where: str) -> None:
    with pytest.raises(ClusterSpecError) as info:
        parse_cluster_spec(_spec(disks), Path("."))
    assert "nodes[0].disks" in str(info.value) and where in str(info.value)


def test_disks_need_a_cryptovm_and_the_sim_backend() -> None:
    disks = [{"name": "d", "size": "8M"}]
    with pytest.raises(ClusterSpecError, match="add a node with role: cryptovm"):
        parse_cluster_spec(_spec(disks, cryptovm=False), Path("."))
    with pytest.raises(ClusterSpecError, match="at most one disk, its store, with mode: guest"):
        parse_cluster_spec(_spec(disks, role="cryptovm"), Path("."))
    store = [{"name": "store", "size": "16M", "mode": "guest"}]
    assert parse_cluster_spec(_spec(store, role="cryptovm"), Path(".")).node("web").disks


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.integers(), st.text(max_size=20), st.floats(), st.booleans(), st.none(),
                 st.lists(st.integers(), max_size=2)))
def test_any_size_value_is_a_size_or_one_spec_error(size: object) -> None:
    try:
        spec = parse_cluster_spec(_spec([{"name": "d", "size": size}]), Path("."))
    except ClusterSpecError as exc:
        assert "disks[0].size" in str(exc)
    else:
        assert 1 << 20 <= spec.node("web").disks[0].size <= 4 << 30


# --- the binding and the LUKS header --------------------------------------------------------


def _binding(**changes: Any) -> dict[str, Any]:
    doc = DiskBinding("web", "data", disk_key_id("web", "data"), "cvm", 1 << 20, "host",
                      "2f4e-uuid", b"w" * 256).to_doc()
    doc.update(changes)
    return doc


def test_binding_round_trip_is_private(tmp_path: Path) -> None:
    path = tmp_path / "data.svd.json"
    binding = DiskBinding.from_doc(_binding(), "test")
    binding.save(path)
    assert DiskBinding.load(path) == binding
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert "w" * 20 not in repr(binding)  # the wrapped key is not printed


@pytest.mark.parametrize("changes,message", [
    ({"format": "other"}, "not a version-1 disk binding"),
    ({"version": 2}, "not a version-1 disk binding"),
    ({"key_id": "svd-other-data"}, "is not the key of disk"),
    ({"wrapped_key": "!!"}, "incomplete disk binding"),
    ({"size": -1}, "size must be a positive integer"),
    ({"size": True}, "size must be a positive integer"),
    ({"mode": "both"}, "bad mode"),
    ({"node": ""}, "names must be"),
    ({"luks_uuid": 7}, "names must be"),
])
def test_bad_bindings_are_one_error(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(DiskBindingError, match=message):
        DiskBinding.from_doc(_binding(**changes), "test")


def test_binding_files_bounded_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "b.svd.json"
    path.write_bytes(b"{" * (64 << 10))
    with pytest.raises(DiskBindingError, match=r"larger than|exceeds|too large|limit"):
        DiskBinding.load(path)
    path.write_text("not json")
    with pytest.raises(DiskBindingError, match="not JSON"):
        DiskBinding.load(path)
    with pytest.raises(DiskBindingError):
        DiskBinding.load(tmp_path / "missing.svd.json")


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["format", "version", "node", "disk", "key_id",
                                        "cryptovm", "size", "mode", "luks_uuid",
                                        "wrapped_key", "x"]),
                       st.one_of(st.text(max_size=80), st.integers(), st.none(),
                                 st.booleans(), st.lists(st.text(max_size=3), max_size=2)),
                       max_size=11))
def test_fuzzed_bindings_are_one_error(doc: dict[str, Any]) -> None:
    base = _binding()
    base.update(doc)
    with contextlib.suppress(DiskBindingError):  # the one error allowed
        DiskBinding.from_doc(base, "fuzz")


@pytest.mark.parametrize("content,message", [
    (b"", "truncated"),
    (b"LUKS\xba\xbe\x00\x01" + bytes(100), "truncated"),
    (bytes(LUKS_HEADER_SIZE), "no LUKS1 header"),
    (b"LUKS\xba\xbe\x00\x02" + bytes(LUKS_HEADER_SIZE), "no LUKS1 header"),
    (b"LUKS\xba\xbe\x00\x01" + bytes(96) + (4096).to_bytes(4, "big")
     + bytes(LUKS_HEADER_SIZE), "encrypted data starts at byte 2097152"),
])
def test_luks_header_reader(tmp_path: Path, content: bytes, message: str) -> None:
    image = tmp_path / "d.luks"
    image.write_bytes(content)
    with pytest.raises(DiskBindingError, match=message):
        luks_uuid(image)
    with pytest.raises(DiskBindingError, match="unreadable"):
        luks_uuid(tmp_path / "missing.luks")


# --- qemu-storage-daemon and real LUKS -------------------------------------------------------


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One LUKS1 image (1 MiB payload) formatted by qemu-storage-daemon with KEY."""
    base = tmp_path_factory.mktemp("svd")
    daemon = StorageDaemon(base / "run", "format").start()
    try:
        daemon.create_luks(base / "template.luks", 1 << 20, KEY)
    finally:
        daemon.stop()
    yield base / "template.luks"


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[StorageDaemon]:
    qsd = StorageDaemon(tmp_path / "run", "disk").start()
    try:
        yield qsd
    finally:
        qsd.stop()


def _copy(volume: Path, tmp_path: Path) -> Path:
    image = tmp_path / "disk.luks"
    shutil.copyfile(volume, image)
    return image


def test_plain_view_encrypts_and_key_never_on_a_command_line(
        volume: Path, daemon: StorageDaemon, tmp_path: Path) -> None:
    image = _copy(volume, tmp_path)
    assert luks_uuid(image)  # a real LUKS1 header
    daemon.open_luks(image, KEY)
    view = tmp_path / "view"
    daemon.export_fuse(view)
    assert os.stat(view).st_mode & 0o777 == 0o600
    with open(view, "r+b") as f:
        f.write(MARKER)
    assert daemon.pid is not None
    argv = " ".join(process_argv(daemon.pid) or [])
    assert KEY.decode() not in argv and "secret" not in argv
    qmp = daemon.qmp()
    try:  # the secret object was deleted as soon as the volume was open
        objects = [o["name"] for o in qmp.execute("qom-list", path="/objects")]
    finally:
        qmp.close()
    assert "svd-key" not in objects
    assert daemon.stop()
    assert MARKER not in image.read_bytes()
    assert str(view) not in Path("/proc/self/mountinfo").read_text()
    assert not daemon.socket.exists() and not daemon.pid_file.exists()
    reopened = StorageDaemon(tmp_path / "run", "again").start()
    try:
        reopened.open_luks(image, KEY)
        reopened.export_fuse(tmp_path / "view2")
        assert (tmp_path / "view2").read_bytes()[:len(MARKER)] == MARKER
    finally:
        reopened.stop()


def test_wrong_key_is_one_error(volume: Path, daemon: StorageDaemon, tmp_path: Path) -> None:
    with pytest.raises(DiskKeyError, match="does not open this LUKS volume"):
        daemon.open_luks(_copy(volume, tmp_path), b"f" * 64)


@pytest.mark.parametrize("damage", ["magic", "keyslot", "truncated", "empty"])
def test_damaged_images_are_one_error(volume: Path, daemon: StorageDaemon, tmp_path: Path,
                                      damage: str) -> None:
    image = _copy(volume, tmp_path)
    data = bytearray(image.read_bytes())
    if damage == "magic":
        data[0:6] = b"XXXXXX"
    elif damage == "keyslot":  # key slot 0's salt and material offset
        data[208 + 8:208 + 48] = os.urandom(40)
    elif damage == "truncated":
        data = data[:64 << 10]
    else:
        data = bytearray()
    image.write_bytes(bytes(data))
    with pytest.raises((DiskFormatError, DiskBindingError)) as info:
        daemon.open_luks(image, KEY)
    assert isinstance(info.value, TestbedError)
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


def test_long_run_directories_get_a_short_private_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    qsd = StorageDaemon(deep, "disk")
    assert len(str(qsd.socket)) < 100 and qsd.socket.parent != deep
    qsd.start()
    try:
        assert os.stat(qsd.socket.parent).st_mode & 0o777 == 0o700
        assert StorageDaemon(deep, "disk").pid == qsd.pid  # found again by another caller
    finally:
        assert qsd.stop()
    assert not qsd.socket.parent.exists()


# --- unlocking: checks before any request, locking after a crash ------------------------------


def _refuse_calls(op: str, **args: Any) -> dict[str, Any]:
    raise AssertionError(f"no request may reach the CryptoVM, got {op}")


def test_swapped_image_is_refused_before_any_request(volume: Path, tmp_path: Path) -> None:
    files = DiskFiles("web", "data", tmp_path / "state", tmp_path / "run")
    files.image.parent.mkdir(parents=True)
    shutil.copyfile(volume, files.image)
    binding = DiskBinding.from_doc(_binding(luks_uuid="another-disks-uuid"), "test")
    binding.save(files.binding)
    with pytest.raises(DiskBindingError, match="an image swapped in"):
        attach(files, DiskSpec("data", 1 << 20), "cvm", _refuse_calls, _refuse_quote, bytes)
    DiskBinding.from_doc(_binding(node="db", key_id="svd-db-data"), "t").save(files.binding)
    with pytest.raises(DiskBindingError, match="binds disk 'data' of node 'db'"):
        attach(files, DiskSpec("data", 1 << 20), "cvm", _refuse_calls, _refuse_quote, bytes)
    files.binding.unlink()
    with pytest.raises(DiskBindingError, match="exists without its binding"):
        attach(files, DiskSpec("data", 1 << 20), "cvm", _refuse_calls, _refuse_quote, bytes)
    assert files.daemon.pid is None


def _refuse_quote(data: bytes) -> Any:
    raise AssertionError("no quote may be asked for")


def test_detach_after_a_killed_daemon_leaves_nothing(volume: Path, tmp_path: Path) -> None:
    files = DiskFiles("web", "data", tmp_path / "state", tmp_path / "run")
    files.image.parent.mkdir(parents=True)
    shutil.copyfile(volume, files.image)
    daemon = files.daemon.start()
    daemon.open_luks(files.image, KEY)
    files.plain_view.parent.mkdir(parents=True)
    daemon.export_fuse(files.plain_view)
    pid = daemon.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # a crash: the FUSE mount stays behind, dead
    wait_gone(pid, lambda: process_argv(pid) is not None, 5.0)
    detach(files)
    assert str(files.plain_view) not in Path("/proc/self/mountinfo").read_text()
    assert not files.plain_view.exists() and not daemon.pid_file.exists()
    assert disk_status(files, DiskSpec("data", 1 << 20)).state == "absent"  # no binding here


@pytest.mark.parametrize("answer,message", [
    (b"", "closed its QMP socket"),
    (b"not json\n", "malformed QMP"),
    (b"[1, 2]\n", "malformed QMP"),
    (b"{" * ((1 << 20) + 65536), "oversized QMP message"),
    (None, "did not answer"),  # silent: the read deadline ends it
])
def test_hostile_qmp_answers_are_one_error(tmp_path: Path, answer: bytes | None,
                                           message: str) -> None:
    """What the QMP client accepts is bounded in size and time (a daemon gone wrong, or
    something else listening on its socket)."""
    path = tmp_path / "qmp.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            if answer is not None:
                with contextlib.suppress(OSError):
                    conn.sendall(answer)
            if answer != b"":  # b"": closed at once
                time.sleep(0.6)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(QmpError, match=message):
            _Qmp(path, timeout=0.3)
    finally:
        thread.join(5)
        listener.close()
