"""The project's one bounded reader and one atomic writer (attestation/files.py)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.encoding import b64decode, b64encode
from attestation.errors import EvidenceFormatError, FileInputError
from attestation.files import atomic_write, hash_file, read_bounded, remove_stale_temps


@settings(max_examples=50)
@given(data=st.binary(max_size=3000), limit=st.integers(0, 3000))
def test_reads_exactly_what_is_there_up_to_the_limit(tmp_path_factory: pytest.TempPathFactory,
                                                     data: bytes, limit: int) -> None:
    path = tmp_path_factory.mktemp("r") / "f"
    path.write_bytes(data)
    if len(data) <= limit:
        assert read_bounded(path, limit) == data
        assert hash_file(path, limit)[1] == len(data)
    else:
        with pytest.raises(FileInputError, match=f"larger than {limit} bytes"):
            read_bounded(path, limit)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileInputError, match=r"policy file .*nope does not exist"):
        read_bounded(tmp_path / "nope", 10, what="policy file")
    assert read_bounded(tmp_path / "nope", 10, missing_ok=True) is None


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a character device"),
                                            ("/dev/urandom", "a character device"),
                                            ("/proc", "a directory")])
def test_devices_and_directories_are_refused_unread(path: str, kind: str) -> None:
    with pytest.raises(FileInputError, match=f"is not a regular file \\({kind}\\)"):
        read_bounded(Path(path), 1 << 30)


def test_a_fifo_without_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FileInputError, match=r"\(a FIFO\)"):
        read_bounded(fifo, 100)  # would block forever if it were opened for reading
    with pytest.raises(FileInputError, match=r"\(a FIFO\)"):
        hash_file(fifo, 100)


def test_unreadable_files_are_an_error_not_a_traceback(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.write_bytes(b"x")
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway; a file inside a non-directory then
        locked = locked / "below"
    with pytest.raises(FileInputError, match="cannot read"):
        read_bounded(locked, 10)


def test_atomic_write_replaces_privately_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"one")
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    atomic_write(tmp_path / "public.pem", b"cert", mode=0o644)
    assert stat.S_IMODE((tmp_path / "public.pem").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["public.pem", "state.json"]


def test_atomic_write_keeps_the_old_content_when_it_fails(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "state.json"
    atomic_write(path, b"old")

    def crash(*args: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # the temp file is gone


def test_concurrent_writers_never_mix(tmp_path: Path) -> None:
    path = tmp_path / "f"
    payloads = [bytes([n]) * 65536 for n in range(8)]
    threads = [threading.Thread(target=atomic_write, args=(path, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads
    assert remove_stale_temps(tmp_path) == 0


@given(st.binary(max_size=200))
def test_base64_round_trips(data: bytes) -> None:
    assert b64decode(b64encode(data), "x") == data


@given(st.one_of(st.text(max_size=40), st.integers(), st.none(), st.binary(max_size=10)))
def test_base64_decoder_raises_only_format_errors(value: object) -> None:
    try:
        b64decode(value, "field", limit=16)
    except EvidenceFormatError as exc:
        assert "field" in str(exc)


def test_base64_limit_is_checked_before_decoding() -> None:
    with pytest.raises(EvidenceFormatError, match="longer than 3 bytes"):
        b64decode("A" * 1_000_000, "blob", limit=3)
