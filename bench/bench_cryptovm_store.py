"""Reboot of the CryptoVM VM with its store on an encrypted disk (not a test; docs/svd.md,
"The CryptoVM VM's store disk"; docs/performance.md).

One cluster (one CryptoVM VM with a store disk), rounds in one run, each round:

* plain reboot: ``QemuBackend.reboot`` (``cvm_stop``, power cycle of the same domain and
  vTPM) until the guest agent answers;
* keys back: that, plus ``testbed up`` (registration, attestation, hot-plug of the store
  disk, unseal, LUKS open, mount, CryptoVM store open) until a key made before the first
  reboot signs again.

Run: .venv/bin/python bench/bench_cryptovm_store.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.core.paths import ClusterPaths
from testbed.qemu.backend import QemuBackend
from testbed.roles.cryptovm import cryptovm_endpoint
from tests.vm_lab import CliRunner, vm_workdir

SPEC = """version: 1
name: cvmbench
backend: qemu
image: default
nodes:
  - name: cryptovm
    role: cryptovm
    disks:
      - {name: store, size: 64M, mode: guest}
"""


_cli = CliRunner(timeout=1800)


def _up(workdir: Path, spec: Path) -> None:
    done = _cli(workdir, "up", str(spec), "--json")
    if not done.stdout or not json.loads(done.stdout)["all_attested"]:
        raise SystemExit(f"up failed: {done.stderr[-2000:]}")


def _sign(paths: ClusterPaths) -> None:
    client = cryptovm_endpoint(paths, "cryptovm").client()
    try:
        client.call("sign", key_id="bench-key", data=b"bench")
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    plain: list[float] = []
    keys: list[float] = []
    with vm_workdir("cvmbench-", _cli.purge) as workdir:
        spec = workdir / "cvmbench.yaml"
        spec.write_text(SPEC)
        paths = ClusterPaths(workdir, "cvmbench")
        _up(workdir, spec)
        client = cryptovm_endpoint(paths, "cryptovm").client()
        try:
            client.call("generate", algorithm="ec-p256", usage=["sign"], key_id="bench-key")
        finally:
            client.close()
        for _ in range(rounds):
            started = time.monotonic()
            plain.append(QemuBackend(paths).reboot("cryptovm"))
            _up(workdir, spec)
            _sign(paths)
            keys.append(time.monotonic() - started)
    print(json.dumps({"rounds": rounds, "load": os.getloadavg(),
                      "plain_reboot_s": [round(s, 1) for s in plain],
                      "reboot_to_keys_s": [round(s, 1) for s in keys],
                      "median_plain_s": round(statistics.median(plain), 1),
                      "median_keys_s": round(statistics.median(keys), 1)}, indent=1))


if __name__ == "__main__":
    main()
