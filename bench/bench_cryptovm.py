"""CryptoVM signing throughput and latency, measured side by side in one run (not a test).

ECDSA P-256 signatures (32-byte messages):

1. in-process signing with ``cryptography`` (the baseline) and through an in-process
   VSM session (privilege check, audit entry; no wire);
2. through the VSM over loopback TLS 1.3: a server process (``python -m
   cryptovm.server``) and 1 or 8 client processes, each with one connection doing one
   request at a time. Both audit durability modes of the server:
   ``state`` (default: answers to read-only use operations leave once their audit
   entry is written, the fsync follows within ~2 ms; state changes wait for it) and
   ``always`` (every answer waits for the fsync of its audit entry, group-committed).

Goals: >= 5,000 signatures/s with 8 clients, p50 <= 0.5 ms with one client.
Everything shares this machine's cores. "pinned": the server process on the first CPU,
the client processes on the others (a CryptoVM with a vCPU of its own); "shared": the
scheduler places everything.

Run: .venv/bin/python bench/bench_cryptovm.py [--seconds 3] [--configs state/pinned,...]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from attestation.tpm import TpmClient
from cryptovm.client import CryptoVmClient
from cryptovm.vsm import CryptoVm
from testbed.spec.cluster_spec import BootSpec
from testbed.tpm.boot import measure_boot
from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm, provision

BOOT = BootSpec.from_content(firmware="OVMF (bench)", kernel="vmlinuz-bench", initrd="initrd-bench",
                 cmdline="console=ttyS0 role=cryptovm")
KEY_ID = "bench-p256"
MESSAGE = os.urandom(32)


@dataclass
class Result:
    label: str
    rate: float
    p50_ms: float
    p99_ms: float


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


def in_process(seconds: float) -> Result:
    key = ec.generate_private_key(ec.SECP256R1())
    algorithm = ec.ECDSA(hashes.SHA256())
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while (start := time.perf_counter()) < end:
        key.sign(MESSAGE, algorithm)
        latencies.append(time.perf_counter() - start)
    return Result("in-process cryptography", len(latencies) / seconds,
                  _percentile(latencies, 0.5), _percentile(latencies, 0.99))


def in_process_vsm(vm: CryptoVm, psk: bytes, seconds: float) -> Result:
    session = vm.login("bench", psk)
    vm.audit.sync_each = False  # the server's mode: fsync by group commit, not per call
    latencies: list[float] = []
    end = time.perf_counter() + seconds
    while (start := time.perf_counter()) < end:
        session.sign(KEY_ID, MESSAGE)
        latencies.append(time.perf_counter() - start)
    vm.audit.sync()
    return Result("in-process VSM session (no wire)", len(latencies) / seconds,
                  _percentile(latencies, 0.5), _percentile(latencies, 0.99))


def _client(port: int, ca_pem: bytes, psk: bytes, start_at: float, seconds: float,
            cpus: set[int] | None, queue: mp.Queue[tuple[int, list[float]]]) -> None:
    if cpus:
        os.sched_setaffinity(0, cpus)
    with CryptoVmClient("127.0.0.1", port, ca_pem=ca_pem, account="bench", psk=psk) as client:
        for _ in range(50):  # warm up: connection, caches
            client.sign(KEY_ID, MESSAGE)
        while time.monotonic() < start_at:
            time.sleep(0.001)
        latencies: list[float] = []
        end = start_at + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            client.sign(KEY_ID, MESSAGE)
            latencies.append(time.perf_counter() - t)
    queue.put((len(latencies), latencies))


def over_the_wire(port: int, ca_pem: bytes, psk: bytes, clients: int, seconds: float,
                  label: str, cpus: set[int] | None) -> Result:
    queue: mp.Queue[tuple[int, list[float]]] = mp.Queue()
    start_at = time.monotonic() + 1.0 + 0.1 * clients
    workers = [mp.Process(target=_client, args=(port, ca_pem, psk, start_at, seconds, cpus,
                                                  queue))
               for _ in range(clients)]
    for w in workers:
        w.start()
    results = [queue.get(timeout=60 + seconds) for _ in workers]
    for w in workers:
        w.join(10)
    latencies = [lat for _, lats in results for lat in lats]
    return Result(label, sum(n for n, _ in results) / seconds, _percentile(latencies, 0.5),
                  _percentile(latencies, 0.99))


def _start_server(state: Path, tcti: str, mode: str,
                  cpu: int | None) -> tuple[subprocess.Popen[bytes], int]:
    port_file = state.parent / f"port-{mode}-{cpu}"
    pin = [] if cpu is None else ["--cpus", str(cpu)]
    proc = subprocess.Popen([sys.executable, "-m", "cryptovm.server", "--state", str(state),
                             "--tcti", tcti, "--port-file", str(port_file),
                             "--audit-sync", mode, *pin])
    while not port_file.exists():
        if proc.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.02)
    port = int(port_file.read_text())
    port_file.unlink()
    return proc, port


def _setup(base: Path, tpm: Swtpm) -> tuple[bytes, bytes]:
    with TpmClient(tpm.tcti) as client:
        measure_boot(client, BOOT)
    vm, _ = CryptoVm.initialize(base / "state", tpm.tcti)
    with vm:
        root = vm.local_root()
        psk = root.account_create("bench", [f"key:{KEY_ID}:sign"])["psk"]
        root.generate("ec-p256", ["sign"], key_id=KEY_ID)
        return psk, vm.ca.pem


def _wire_rows(state: Path, tcti: str, config: str, ca_pem: bytes, psk: bytes,
               seconds: float) -> list[Result]:
    mode, _, placement = config.partition("/")
    cpus = sorted(os.sched_getaffinity(0))
    pinned = placement == "pinned" and len(cpus) > 1
    proc, port = _start_server(state, tcti, mode, cpus[0] if pinned else None)
    rows = []
    try:
        for clients in (1, 8):
            label = (f"VSM over TLS, audit-sync={mode}, {'pinned' if pinned else 'shared'}, "
                     f"{clients} client{'s' if clients > 1 else ''}")
            rows.append(over_the_wire(port, ca_pem, psk, clients, seconds, label,
                                      set(cpus[1:]) if pinned else None))
    finally:
        proc.terminate()
        proc.wait(20)
    return rows


def _row(result: Result, baseline: float) -> str:
    return (f"| {result.label} | {result.rate:,.0f} /s | {result.p50_ms:.3f} ms | "
            f"{result.p99_ms:.3f} ms | {result.rate / baseline:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--configs", default="state/pinned,state/shared,always/pinned",
                        help="audit-sync mode / pinned (server on CPU 0, clients on the "
                        "others) or shared (the scheduler decides)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cryptovm-") as tmp:
        base = Path(tmp)
        provision(base / "tpm", LocalCA.ensure(base / "ca"))
        with Swtpm(base / "tpm") as tpm:
            psk, ca_pem = _setup(base, tpm)
            baseline = in_process(args.seconds)
            with CryptoVm.open(base / "state", tpm.tcti) as vm:
                results = [baseline, in_process_vsm(vm, psk, args.seconds)]
            for config in args.configs.split(","):
                results += _wire_rows(base / "state", tpm.tcti, config, ca_pem, psk,
                                      args.seconds)
    print(f"ECDSA P-256 signatures, {os.cpu_count()} cores, {args.seconds:g} s per row\n")
    print("| path | rate | p50 | p99 | vs in-process |")
    print("|---|---|---|---|---|")
    for result in results:
        print(_row(result, baseline.rate))
    eight = [r for r in results if r.label.endswith("8 clients")]
    one = [r for r in results if r.label.endswith("1 client")]
    if eight and one:
        print(f"\ngoals: >= 5,000/s with 8 clients (best: {max(r.rate for r in eight):,.0f}/s), "
              f"p50 <= 0.5 ms with 1 client (best: {min(r.p50_ms for r in one):.3f} ms)")


if __name__ == "__main__":
    main()
