"""The attack lab's Secure Virtual Device world (docs/svd.md): a CryptoVM, Bob's
server's encrypted disk, and what a key store *without* attestation would do.

Built once per :class:`~testbed.attacks.lab.Lab` (on the first disk scenario) and
closed with it. The CryptoVM runs in-process, its store sealed through the lab
client's TPM. Bob's server owns one LUKS disk (real qemu-storage-daemon) holding a
marker; its key is a CryptoVM key released only to the server's AK under the
server's policy. The baselines hold the same data without the SVD: a plain image, and
the same passphrase wrapped under a key with no release policy (a plain key store that
decrypts for whoever asks as root, as a hypervisor's KMS would).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from attestation.evidence import Evidence
from attestation.policy import dump_policy
from attestation.tpm import TpmClient
from cryptovm.disks import DiskBinding, Quote, ensure_disk_key, release_disk_key
from cryptovm.vsm import CryptoVm, VsmSession
from testbed.attacks.lab import Lab, LabNode
from testbed.spec.cluster_spec import DiskSpec
from testbed.svd.qsd import StorageDaemon
from testbed.svd.volumes import DiskFiles, attach, detach

__all__ = ["MARKER", "OWNER", "SvdWorld", "lab_quote", "svd_world"]

OWNER = "server"
DISK = DiskSpec("data", 1 << 20)
MARKER = b"bob-customer-ledger:" + b"%032x" % 0xB0B


def lab_quote(node: LabNode) -> Quote:
    """``node``'s quote over its policy's PCRs, as the evidence a release asks for."""
    def quote(data: bytes) -> Evidence:
        with node.issuer.tpm_lock:
            ak = node.client.attestation_key("ecc")  # persistent; its handle stays open
            result = node.client.quote(ak, node.selection, data)
        return Evidence(attest=result.attest, signature=result.signature, ak_public=ak.public,
                        pcr_bank=node.selection.bank, pcrs=result.pcrs,
                        event_log=node.event_log())
    return quote


@dataclass
class SvdWorld:
    lab: Lab
    root: Path
    vm: CryptoVm
    session: VsmSession
    plain_key: str = ""
    plain_wrapped: bytes = field(default=b"", repr=False)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        result: dict[str, Any] = getattr(self.session, op)(**args)
        return result

    def files(self, holder: str, owner: str = OWNER) -> DiskFiles:
        """``owner``'s disk as it sits on ``holder``'s host."""
        return DiskFiles(owner, DISK.name, self.root / holder / "state",
                         self.root / holder / "run")

    def unlock(self, files: DiskFiles, requester: LabNode) -> bytes:
        """Host-side unlock with ``requester``'s quote; what the plain view holds."""
        attach(files, DISK, "cryptovm", self.call, lab_quote(requester),
               lambda: self._disk_key(files.node))
        try:
            with open(files.plain_view, "rb") as f:
                return f.read(len(MARKER))
        finally:
            detach(files)

    def _disk_key(self, owner: str) -> bytes:
        return ensure_disk_key(self.call, owner, DISK.name,
                               dump_policy(self.lab.policies[owner]),
                               self.lab.registry.to_json())

    def provision(self) -> None:
        """Bob's server's disk, formatted and holding the marker; also the baselines."""
        files = self.files(OWNER)
        attach(files, DISK, "cryptovm", self.call, lab_quote(self.lab.nodes[OWNER]),
               lambda: self._disk_key(OWNER))
        try:
            with open(files.plain_view, "r+b") as f:
                f.write(MARKER)
            self._plain_baseline(files)
        finally:
            detach(files)

    def _plain_baseline(self, files: DiskFiles) -> None:
        # The same passphrase, recovered once here through a genuine release, wrapped
        # again under a key *without* a release policy: the plain key store.
        passphrase = release_disk_key(self.call, DiskBinding.load(files.binding),
                                      lab_quote(self.lab.nodes[OWNER]))
        self.plain_key = "plain-kms-data"
        key = self.call("generate", algorithm="rsa-2048", usage=["decrypt"],
                        key_id=self.plain_key)
        public = serialization.load_der_public_key(bytes(key["public_key"]))
        assert isinstance(public, rsa.RSAPublicKey)
        self.plain_wrapped = public.encrypt(passphrase, padding.OAEP(
            padding.MGF1(hashes.SHA256()), hashes.SHA256(), None))

    def plain_release(self) -> bytes:
        """The baseline key store: decrypts the disk key for any caller, no attestation."""
        return bytes(self.call("decrypt", key_id=self.plain_key,
                               ciphertext=self.plain_wrapped)["plaintext"])

    def open_with(self, files: DiskFiles, passphrase: bytes) -> bytes:
        """What a host holding ``passphrase`` reads from the disk."""
        daemon = StorageDaemon(self.root / "baseline-run", files.disk).start()
        try:
            daemon.open_luks(files.image, passphrase)
            view = self.root / "baseline-run" / "view"
            daemon.export_fuse(view)
            with open(view, "rb") as f:
                return f.read(len(MARKER))
        finally:
            daemon.stop()

    def copy_disk(self, to: str) -> DiskFiles:
        """The server's image and binding copied to ``to``'s host (stolen or swapped)."""
        source, target = self.files(OWNER), self.files(to)
        target.image.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.copyfile(source.image, target.image)
        shutil.copyfile(source.binding, target.binding)
        return target

    def close(self) -> None:
        self.vm.close()


def _lent_tpm(node: LabNode) -> Any:
    @contextlib.contextmanager
    def access() -> Iterator[TpmClient]:
        with node.issuer.tpm_lock:
            yield node.client
    return access


_WORLDS: dict[int, SvdWorld] = {}


def svd_world(lab: Lab) -> SvdWorld:
    """The lab's SVD world, built on first use and closed with the lab."""
    world = _WORLDS.get(id(lab))
    if world is not None:
        return world
    root = lab.root / "svd"
    root.mkdir(mode=0o700, exist_ok=True)
    host = lab.nodes["client"]  # the CryptoVM's TPM: sealing only
    vm, psk = CryptoVm.initialize(root / "cryptovm", host.swtpm.tcti,
                                  tpm_access=_lent_tpm(host), event_log=host.event_log())
    world = SvdWorld(lab, root, vm, vm.login("root", psk))
    _WORLDS[id(lab)] = world

    def close() -> None:
        _WORLDS.pop(id(lab), None)
        world.close()
    lab.closers.append(close)
    world.provision()
    return world
