"""Batched quotes: figures side by side in one run (not a test).

1. Attested handshakes per second with 50 concurrent clients when the server's TPM
   takes 200 ms per quote (testbed.tpm.latency, a model), unbatched against batched:
   (a) the clients' TPM unmodelled (swtpm speed, as if each client had its own TPM),
   (b) the clients' TPM at 200 ms too (all 50 connections from one client node).
   Goal: batched >= 20x unbatched.
2. The handshake latency batching adds, one client at a time, both TPMs at 200 ms:
   unbatched, batched (eager group commit, the default) and batched waiting the whole
   window. Goal: added <= one window.
3. With plain swtpm (no latency model): tp13 against plain mutual TLS 1.3 with the same
   contexts, and the floor plain + one quote + two verifications (the two sides' quotes
   overlap), one CPU per side: bench_trusted_passages.py's first figure.

The server runs in its own process (its own interpreter, GIL and TPM proxy); the clients
are threads of this one. Nodes, boots and policies are the attack lab's.

Run: .venv/bin/python bench/bench_batching.py [--clients 50] [--seconds 20] [--tpm-ms 200]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_trusted_passages import (
    ServerProcess,
    p50,
    p99,
    pin_sides,
    print_latency,
    share_cpus,
    side_by_side,
    timed,
)

from attestation.tpm import TpmClient
from testbed.attacks.lab import Lab
from testbed.tpm.latency import LatencyModel, TpmLatencyProxy
from trusted_passages import ChannelConfig, TpmIssuer, connect, serve

HOST = "127.0.0.1"
TIMEOUT = 300.0  # unbatched, 50 clients queue for minutes' worth of 200 ms quotes


@dataclass(frozen=True)
class Mode:
    batched: bool
    window: float
    eager: bool = True

    def issuer(self, client: TpmClient, name: str, lab: Lab) -> TpmIssuer:
        node = lab.nodes[name]
        issuer = TpmIssuer(client, name, node.selection, event_log=node.event_log)
        return issuer.batched(self.window, eager=self.eager) if self.batched else issuer

    def __str__(self) -> str:
        if not self.batched:
            return "unbatched"
        return f"batched ({self.window * 1000:.0f} ms window{'' if self.eager else ', waited'})"


class BatchServer:
    """Bob's server in a child process, its TPM behind a latency proxy of its own."""

    def __init__(self, lab: Lab, mode: Mode, tpm_ms: float, tmp: Path) -> None:
        self._lab, self._mode, self._tpm_ms, self._tmp = lab, mode, tpm_ms, tmp
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._pipe, child = context.Pipe()
        self._proc = context.Process(target=self._run, args=(child,), daemon=True)

    def __enter__(self) -> BatchServer:
        self._proc.start()
        self.port: int = self._pipe.recv()
        return self

    def _run(self, pipe) -> None:  # type: ignore[no-untyped-def]
        node = self._lab.nodes["server"]
        with TpmLatencyProxy(node.swtpm, self._tmp / "server.sock",
                             LatencyModel.quote_ms(self._tpm_ms)) as proxy:
            client = TpmClient(proxy.tcti)
            issuer = self._mode.issuer(client, "server", self._lab)
            config = replace(self._lab.tp_config("server", peer="client", issuer=issuer),
                             timeout=TIMEOUT)
            with serve(HOST, 0, config, lambda ch: ch.send(ch.recv())) as server:
                pipe.send(server.address[1])
                self._stop.wait()
                pipe.send(proxy.signed)
            client.close()

    def quotes(self) -> int:
        """Stop the server; the quotes its TPM signed."""
        if not self._stop.is_set():
            self._stop.set()
            self.signed: int = self._pipe.recv()
            self._proc.join(10)
        return self.signed

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()


@dataclass(frozen=True)
class Run:
    rate: float
    latencies: list[float]
    server_quotes: int
    client_quotes: int


def client_side(lab: Lab, mode: Mode, tpm_ms: float, tmp: Path
                ) -> tuple[ChannelConfig, TpmLatencyProxy | None, TpmClient]:
    node = lab.nodes["client"]
    proxy = None
    tcti = node.swtpm.tcti
    if tpm_ms > 0:
        proxy = TpmLatencyProxy(node.swtpm, tmp / f"client-{time.monotonic_ns()}.sock",
                                LatencyModel.quote_ms(tpm_ms))
        tcti = proxy.tcti
    client = TpmClient(tcti)
    issuer = mode.issuer(client, "client", lab)
    config = replace(lab.tp_config("client", peer="server", issuer=issuer), timeout=TIMEOUT)
    return config, proxy, client


def concurrent(lab: Lab, mode: Mode, clients: int, seconds: float, server_ms: float,
               client_ms: float, tmp: Path) -> Run:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()
    with BatchServer(lab, mode, server_ms, tmp) as server:
        # After the fork: the server's process must not inherit the client's TPM socket.
        config, proxy, tpm = client_side(lab, mode, client_ms, tmp)

        def worker() -> None:
            while not stop.is_set():
                begun = time.perf_counter()
                with connect(HOST, server.port, config) as channel:
                    channel.send(b"ping")
                    channel.recv()
                ended = time.perf_counter()
                if ended <= deadline:
                    with lock:
                        latencies.append((ended - begun) * 1000)

        start = time.perf_counter()
        deadline = start + seconds
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        server_quotes = server.quotes()
    client_quotes = proxy.signed if proxy else 0
    tpm.close()
    if proxy:
        proxy.close()
    return Run(len(latencies) / seconds, sorted(latencies), server_quotes, client_quotes)


def sequential(lab: Lab, mode: Mode, n: int, tpm_ms: float, tmp: Path) -> list[float]:
    with BatchServer(lab, mode, tpm_ms, tmp) as server:
        config, proxy, tpm = client_side(lab, mode, tpm_ms, tmp)  # after the fork

        def once() -> None:
            with connect(HOST, server.port, config) as channel:
                channel.send(b"ping")
                channel.recv()

        once()
        samples = timed(once, n)
        server.quotes()
    tpm.close()
    if proxy:
        proxy.close()
    return samples


def release_lab_tpms(lab: Lab) -> None:
    """swtpm serves one connection at a time: the lab's own clients let go."""
    for name in ("server", "client"):
        node = lab.nodes[name]
        node.issuer.close()
        node.client.close()


def reattach_lab_tpms(lab: Lab) -> None:
    for name in ("server", "client"):
        node = lab.nodes[name]
        node.client = TpmClient(node.swtpm.tcti)
        node.issuer = TpmIssuer(node.client, name, node.selection, event_log=node.event_log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--tpm-ms", type=float, default=200.0)
    parser.add_argument("--window-ms", type=float, default=200.0)
    parser.add_argument("--n", type=int, default=20, help="handshakes per latency figure")
    parser.add_argument("--figures", default="123", help="which figures to run (default 123)")
    parser.add_argument("--handshakes", type=int, default=1000,
                        help="handshakes per latency figure of figure 3")
    args = parser.parse_args()
    window = args.window_ms / 1000
    unbatched, batched = Mode(False, 0), Mode(True, window)
    tmp = Path(tempfile.mkdtemp(prefix="bench-batching-"))
    with Lab() as lab:
        release_lab_tpms(lab)
        if "1" in args.figures:
            figure_1(lab, args, unbatched, batched, tmp)
        if "2" in args.figures:
            figure_2(lab, args, unbatched, window, tmp)
        reattach_lab_tpms(lab)
        if "3" in args.figures:
            figure_3(lab, args.handshakes)


def figure_1(lab: Lab, args: argparse.Namespace, unbatched: Mode, batched: Mode,
         tmp: Path) -> None:
    print(f"1. {args.clients} concurrent clients, server TPM {args.tpm_ms:.0f} ms per quote "
          f"(latency model), {args.seconds:.0f} s per run")
    for label, client_ms in (("(a) client TPM unmodelled", 0.0),
                             (f"(b) client TPM {args.tpm_ms:.0f} ms", args.tpm_ms)):
        runs = {mode: concurrent(lab, mode, args.clients, args.seconds, args.tpm_ms,
                                 client_ms, tmp) for mode in (unbatched, batched)}
        print(f"  {label}")
        for mode, run in runs.items():
            print(f"    {mode!s:<32} {run.rate:7.1f} handshakes/s   p50 "
                  f"{p50(run.latencies):8.0f} ms   p99 {p99(run.latencies):8.0f} ms   "
                  f"server quotes {run.server_quotes}, client quotes {run.client_quotes}")
        gain = runs[batched].rate / max(runs[unbatched].rate, 1e-9)
        print(f"    batched / unbatched: {gain:.1f}x (goal >= 20x: "
              f"{'met' if gain >= 20 else 'NOT met'})")


def figure_2(lab: Lab, args: argparse.Namespace, unbatched: Mode, window: float,
         tmp: Path) -> None:
    batched = Mode(True, window)
    print(f"2. one client at a time, both TPMs {args.tpm_ms:.0f} ms: handshake latency")
    base = sequential(lab, unbatched, args.n, args.tpm_ms, tmp)
    print(f"    {unbatched!s:<32} p50 {p50(base):7.1f} ms   p99 {p99(base):7.1f} ms")
    for mode in (batched, Mode(True, window, eager=False)):
        samples = sequential(lab, mode, args.n, args.tpm_ms, tmp)
        added = p50(samples) - p50(base)
        print(f"    {mode!s:<32} p50 {p50(samples):7.1f} ms   p99 {p99(samples):7.1f} ms"
              f"   added {added:+7.1f} ms (goal <= one window, {window * 1000:.0f} ms: "
              f"{'met' if added <= window * 1000 else 'NOT met'})")


def figure_3(lab: Lab, n: int) -> None:
    """bench_trusted_passages.py's first figure, with one CPU per side (where its goal is
    judged; one run, interleaved)."""
    print("3. plain swtpm (no latency model), one client at a time")
    client_cfg = lab.tp_config("client", peer="server")
    server = ServerProcess(lab, 1)
    with server as (plain_port, tp_port):
        pin_sides(lab, server.pid)
        try:
            figures = side_by_side(lab, server, plain_port, tp_port, client_cfg, n)
        finally:
            share_cpus(lab, server.pid)
    print_latency(figures, pinned=True)


if __name__ == "__main__":
    main()
