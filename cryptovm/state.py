"""The CryptoVM state directory (0700, files 0600)::

    cryptovm.json        manifest (plain, no secrets); written last by init
    sealed.json          the storage key sealed to the TPM (TPM2B_PUBLIC/PRIVATE)
    config.enc           encrypted: accounts (with PSKs), the TLS CA key, release policies
    ca.pem               the CA certificate (public; what clients trust)
    keys/<id>/vNNNNNNNN.key   encrypted key versions (see keystore.py)
    records/<name>.rec   encrypted data records
    network.enc          encrypted: the lab network's members (cryptovm/network.py)
    audit.log            the hash-chained audit log
    lock                 flock: one CryptoVM process per state directory
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from attestation.files import (
    FILE_MODE,
    atomic_write,
    private_dir,
    remove_durably,
    remove_stale_temps,
)
from cryptovm.encoding import check_name
from cryptovm.errors import NotFound, SealedStorageError, StorageError
from cryptovm.keystore import StateCipher, read_state_file
from cryptovm.sealing import SealedBlob

STATE_FORMAT = "cryptovm-state"
STATE_VERSION = 1
MAX_RECORD = 64 * 1024


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self._lock_fd = -1

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r})"

    @property
    def manifest(self) -> Path:
        return self.path / "cryptovm.json"

    @property
    def sealed(self) -> Path:
        return self.path / "sealed.json"

    @property
    def config(self) -> Path:
        return self.path / "config.enc"

    @property
    def ca_pem(self) -> Path:
        return self.path / "ca.pem"

    @property
    def keys(self) -> Path:
        return self.path / "keys"

    @property
    def records(self) -> Path:
        return self.path / "records"

    @property
    def audit(self) -> Path:
        return self.path / "audit.log"

    def initialized(self) -> bool:
        return self.manifest.exists()

    def prepare(self) -> None:
        private_dir(self.path)
        private_dir(self.keys)
        private_dir(self.records)
        remove_stale_temps(self.path)
        remove_stale_temps(self.records)

    # --- one process per directory --------------------------------------------------

    def lock(self) -> None:
        private_dir(self.path)
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"{self.path} is in use by another CryptoVM process (a running "
                               "server?): talk to it over the wire instead") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # --- manifest and sealed key ---------------------------------------------------------

    def write_manifest(self, pcr_selection: str) -> None:
        doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "pcr_selection": pcr_selection,
               "created": int(time.time())}
        atomic_write(self.manifest, json.dumps(doc, indent=1).encode())

    def read_manifest(self) -> dict[str, Any]:
        raw = read_state_file(self.manifest, missing_ok=True)
        if raw is None:
            raise StorageError(f"{self.path} is not an initialized CryptoVM state directory "
                               "(no cryptovm.json)")
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise StorageError(f"{self.manifest}: {exc}") from None
        if doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
            raise StorageError(f"{self.manifest}: not a version-{STATE_VERSION} CryptoVM state")
        return dict(doc)

    def write_sealed(self, blob: SealedBlob) -> None:
        atomic_write(self.sealed, blob.to_json())

    def read_sealed(self) -> SealedBlob:
        raw = read_state_file(self.sealed, missing_ok=True)
        if raw is None:
            raise SealedStorageError(f"{self.sealed} is missing: the storage key is gone and "
                                     "with it every key of this CryptoVM")
        return SealedBlob.from_json(raw)

    # --- encrypted configuration ----------------------------------------------------------

    def write_config(self, cipher: StateCipher, doc: dict[str, Any]) -> None:
        blob = cipher.seal("config", {"name": "config"}, {}, json.dumps(doc).encode())
        atomic_write(self.config, blob)

    def read_config(self, cipher: StateCipher) -> dict[str, Any]:
        _, plaintext = cipher.open(read_state_file(self.config), "config",
                                   {"name": "config"}, str(self.config))
        doc = json.loads(plaintext)
        if not isinstance(doc, dict):
            raise StorageError(f"{self.config}: not a configuration document")
        return doc

    # --- data records ------------------------------------------------------------------------

    def _record(self, name: str) -> Path:
        return self.records / f"{check_name(name, 'record name')}.rec"

    def write_record(self, cipher: StateCipher, name: str, data: bytes) -> None:
        atomic_write(self._record(name), cipher.seal("record", {"name": name}, {}, data))

    def read_record(self, cipher: StateCipher, name: str) -> bytes:
        path = self._record(name)
        blob = read_state_file(path, missing_ok=True)
        if blob is None:
            raise NotFound(f"no record {name!r}")
        return cipher.open(blob, "record", {"name": name}, str(path))[1]

    def delete_record(self, name: str) -> None:
        path = self._record(name)
        if not path.exists():
            raise NotFound(f"no record {name!r}")
        remove_durably(path)

    def record_names(self) -> list[str]:
        return sorted(p.stem for p in self.records.glob("*.rec"))
