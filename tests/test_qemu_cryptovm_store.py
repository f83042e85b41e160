"""The CryptoVM VM keeps its sealed store on an encrypted disk (docs/svd.md, "The CryptoVM
VM's store disk").

One module-scoped real cluster: a single CryptoVM VM with a store disk (TCG unless KVM
works). `up` attests it, hot-plugs a plain qcow2, and the guest formats it as LUKS2 with
a passphrase sealed to its vTPM PCRs (dm-crypt, ext4, the CryptoVM's store on it). A
tenant key and a disk key made before a reboot of the VM (same domain, same vTPM, a fresh
measured boot) are there again after it attests: the tenant key signs, verified with its
public key from before; the disk key releases the same passphrase against the VM's
fresh quote. The qcow2 holds no key label. That another measured state cannot unseal the
disk is shown without a third boot, in tests/test_cryptovm_storedisk.py (a real swtpm,
a PCR extended first, real cryptsetup).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from cryptovm.disks import (
    DiskBinding,
    disk_key_id,
    ensure_disk_key,
    new_passphrase,
    release_disk_key,
)
from testbed.cluster.agent import AgentClient
from testbed.core.paths import ClusterPaths
from testbed.qemu.backend import QemuBackend
from testbed.qemu.predict.events import QUOTED_PCRS
from testbed.qemu.store_disk import store_image
from testbed.roles.cryptovm import cryptovm_endpoint
from tests.vm_lab import CliRunner, cli_json, require_root_and_libvirt, vm_workdir

CLUSTER = "cvmstore"
TENANT_KEY = "tenant-" + os.urandom(5).hex()  # the marker: its name is in the store's files
SPEC = f"""version: 1
name: {CLUSTER}
backend: qemu
image: default
nodes:
  - name: cryptovm
    role: cryptovm
    disks:
      - {{name: store, size: 64M, mode: guest}}
"""


_cli = CliRunner(timeout=900)


def _up(workdir: Path, spec: Path) -> dict[str, Any]:
    up = _cli(workdir, "up", str(spec), "--json")
    if up.returncode == 4 and "did not answer within" in up.stdout + up.stderr:
        # Under heavy load a TCG guest's agent may outlast up's waits (boot, registration);
        # up is idempotent: it keeps the running VM and carries on with it.
        up = _cli(workdir, "up", str(spec), "--json")
    doc: dict[str, Any] = cli_json(up)
    return doc


@dataclass
class Lab:
    workdir: Path
    spec: Path
    paths: ClusterPaths
    up: dict[str, Any]
    figures: dict[str, float] = field(default_factory=dict)
    probe_passphrase: bytes = b""

    def agent(self, timeout: float = 60.0) -> AgentClient:
        return QemuBackend(self.paths).agent("cryptovm", timeout=timeout)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_root_and_libvirt(
        "the CryptoVM store test needs root and libvirt-clients (docs/qemu.md)")
    with vm_workdir("cvmstore-", _cli.purge) as workdir:
        spec = workdir / "cvmstore.yaml"
        spec.write_text(SPEC)
        yield Lab(workdir, spec, ClusterPaths(workdir, CLUSTER), _up(workdir, spec))


def _probe_binding(lab: Lab, call: Any) -> DiskBinding:
    """A disk key of the CryptoVM released to the CryptoVM VM's own quote (as it releases
    every host-side disk key): wrapped here, released after the reboot."""
    public = ensure_disk_key(call, "cryptovm", "probe", lab.paths.policy("cryptovm").read_text(),
                             lab.paths.registry.read_text())
    fresh = new_passphrase(public)
    binding = DiskBinding("cryptovm", "probe", disk_key_id("cryptovm", "probe"), "cryptovm",
                          1 << 20, "host", "probe", fresh.wrapped_key)
    lab.probe_passphrase = fresh.passphrase  # in memory only
    return binding


@pytest.mark.slow
def test_keys_survive_a_reboot_and_the_store_disk_is_ciphertext(lab: Lab) -> None:
    node = lab.up["nodes"][0]
    assert lab.up["all_attested"] and node["action"] == "started", \
        (node.get("error"), node.get("log_tail"))
    assert "store disk" in lab.agent().call({"op": "cvm_status"})["state"]
    client = cryptovm_endpoint(lab.paths, "cryptovm").client()
    try:
        public = bytes(client.call("generate", algorithm="ec-p256", usage=["sign"],
                                   key_id=TENANT_KEY, exportable=False)["public_key"])
        binding = _probe_binding(lab, client.call)
    finally:
        client.close()

    rebooted = time.monotonic()
    reboot = _cli(lab.workdir, "reboot", "cryptovm", "--json")  # power cycle, then up
    assert reboot.stdout, reboot.stderr[-3000:]
    rebooted_doc = json.loads(reboot.stdout)
    assert "reboot_s" in rebooted_doc, rebooted_doc
    lab.figures["plain_reboot_s"] = rebooted_doc["reboot_s"]
    again = rebooted_doc["up"]
    if reboot.returncode == 4 and "did not answer within" in reboot.stdout + reboot.stderr:
        again = _up(lab.workdir, lab.spec)  # as in _up: a slow TCG agent under heavy load
    assert again["all_attested"], (reboot.returncode, json.dumps(again["nodes"])[:4000],
                                   reboot.stderr[-2000:])
    client = cryptovm_endpoint(lab.paths, "cryptovm").client()
    try:
        signature = bytes(client.call("sign", key_id=TENANT_KEY, data=b"after the reboot")
                          ["signature"])
        lab.figures["reboot_to_keys_s"] = time.monotonic() - rebooted
        agent = lab.agent()
        passphrase = release_disk_key(client.call, binding,
                                      lambda data: agent.quote(data, list(QUOTED_PCRS)))
    finally:
        client.close()
    node = again["nodes"][0]
    assert again["all_attested"] and node["action"] == "kept", node
    key = serialization.load_der_public_key(public)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(signature, b"after the reboot", ec.ECDSA(hashes.SHA256()))
    assert passphrase == lab.probe_passphrase

    status = json.loads(_cli(lab.workdir, "status", "--json").stdout)
    assert [(d["name"], d["mode"], d["state"]) for d in status["nodes"][0]["disks"]] == \
        [("store", "guest", "unlocked")]
    image = store_image(lab.paths, "cryptovm", "store")
    data = image.read_bytes()
    assert TENANT_KEY.encode() not in data and b"cryptovm.json" not in data
    assert b"LUKS\xba\xbe\x00\x02" in data  # the guest's LUKS2 header, inside the qcow2
    print(f"\nFIGURES plain reboot (power cycle to agent) {lab.figures['plain_reboot_s']:.1f} s;"
          f" reboot to keys back (attested, unsealed, store open, signed) "
          f"{lab.figures['reboot_to_keys_s']:.1f} s", file=sys.stderr)
