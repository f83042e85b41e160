"""Trusted Passages figures, side by side in one run (not a test).

1. tp13 attested handshake latency against plain mutual TLS 1.3 with the same library
   (OpenSSL via pyOpenSSL), the same OpenSSL contexts, certificates and keys, over
   loopback TCP, until the first application reply. The floor: plain + one quote + two
   verifications, each measured in this run (both sides' quotes overlap, so one is on
   the critical path). Goal (issue #14): tp13 within 0.5 ms of the floor.
2. Attested handshakes per second with 8 concurrent clients.
3. Genuine attested handshake latency while 500 idle connections (20 of them trickling a
   ClientHello at 1 byte/s) are held open and re-opened as the server drops them, beside
   the no-flood baseline. Goal: < 2 s (docs/security.md, "Listeners").

Both nodes have their own swtpm (ECC P-256 AKs), a simulated measured boot, and
policies with PCR values and events, exactly as in the attack lab.

Figure 1 runs twice. First with one CPU per side (the client process and its swtpm on CPU
0, the server process and all its threads and its swtpm on CPU 1): two machines, as
deployed, on one box; the goal is judged here, because the floor assumes what two
machines give, that the two sides' quotes overlap without taking CPU from each other.
Then with both sides sharing both CPUs, where the two overlapping quotes (and everything
else the two sides do at once) slow each other, which the floor, made of parts measured
one at a time, does not see. ``--pin`` runs only the first, ``--shared`` only the second.

``--profile`` prints instead where one handshake's time goes: each step on one time
line (both processes stamp the machine's monotonic clock), and a cProfile of both cores
driven in one thread (the CPU work, without the waits).

Run: .venv/bin/python bench/bench_trusted_passages.py [--n 1000] [--seconds 5]
[--pin | --shared] [--profile]
(about a minute unattended; report the machine load, ``uptime``, beside the figures).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import multiprocessing
import os
import pstats
import random
import resource
import socket
import ssl
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from OpenSSL import SSL

from attestation.tpm import TpmClient
from testbed.attacks.lab import Lab
from testbed.attacks.plain import PlainServer, exchange
from trusted_passages import BindingContext, TpmIssuer, connect, serve
from trusted_passages.interfaces import spki_digest

HOST = "127.0.0.1"


def timed(fn: Callable[[], object], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return sorted(samples)


def p50(samples: list[float]) -> float:
    return statistics.median(samples)


def p99(samples: list[float]) -> float:
    return samples[max(0, int(len(samples) * 0.99) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000,
                        help="handshakes per latency figure (fewer: a noisier median)")
    parser.add_argument("--seconds", type=float, default=5.0, help="concurrency run length")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--idle", type=int, default=500, help="flood size for figure 3")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--pin", action="store_true",
                        help="figure 1 only with one CPU per side (client and its swtpm on CPU "
                             "0, server and its swtpm on CPU 1): two machines, as deployed")
    layout.add_argument("--shared", action="store_true",
                        help="figure 1 only with both sides sharing both CPUs")
    parser.add_argument("--profile", action="store_true",
                        help="where the time of one handshake goes, instead of the figures")
    args = parser.parse_args()
    print(f"machine load (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.profile:
        profile(args.n, pin=args.pin)
        return
    layouts = [True] if args.pin else [False] if args.shared else [True, False]  # pinned?
    if True in layouts and len(os.sched_getaffinity(0)) < 2:
        sys.exit("one CPU per side needs two CPUs; run with --shared")
    figures = {}
    with Lab() as lab:
        client_cfg = lab.tp_config("client", peer="server")
        server = ServerProcess(lab, args.clients)
        with server as (plain_port, tp_port):
            for pinned in layouts:
                (pin_sides if pinned else share_cpus)(lab, server.pid)
                figures[pinned] = side_by_side(lab, server, plain_port, tp_port, client_cfg,
                                               args.n)
            share_cpus(lab, server.pid)  # the rest: shared
            attested = measure_attested(tp_port, client_cfg, max(20, args.n // 4))
            rate = measure_concurrent(tp_port, client_cfg, args.clients, args.seconds)
            with SustainedFlood(tp_port, args.idle) as flood:
                flooded = measure_attested(tp_port, client_cfg, max(20, args.n // 4))
            drops = flood.reopened
    for pinned in layouts:
        print_latency(figures[pinned], pinned=pinned)
    print(f"attested handshakes with {args.clients} concurrent clients: {rate:.0f} /s "
          f"({args.seconds:.0f} s run, 2 cores, one TPM per side)")
    print("genuine attested handshake, server with 64 slots (blocking adapter, own process)")
    print(f"  no flood                    p50 {p50(attested):6.2f} ms   "
          f"p99 {p99(attested):6.2f} ms")
    print(f"  {args.idle} idle + 20 slow-loris    p50 {p50(flooded):6.2f} ms   "
          f"p99 {p99(flooded):6.2f} ms   max {max(flooded):6.2f} ms   "
          f"(flood connections dropped and re-opened: {drops})")
    verdict = "met" if max(flooded) < 2000 else "NOT met"
    print(f"  goal: every genuine handshake under 2 s while flooded: {verdict}")


def side_by_side(lab: Lab, server: ServerProcess, plain_port: int, tp_port: int,
                 client_cfg, n: int) -> dict[str, list[float]]:  # type: ignore[no-untyped-def]
    """Figure 1, interleaved (one sample of each per round, in a shuffled order, so that
    a change of the machine's load hits them all alike): plain mTLS, tp13 with the request pipelined
    behind the client's evidence, tp13 sending it after Established, and the floor's
    parts, each measured where it runs in a handshake: the quote on the critical path
    (the server's, by the server process with its TPM), the server's validation of the
    client's evidence (in the server process) and the client's of the server's."""
    plain_ctx = client_cfg.ssl_context("client")
    issuer = lab.nodes["client"].issuer.bound(BindingContext("tp13", "client"))
    user_data = spki_digest(lab.nodes["client"].certificate)
    validator = client_cfg.validator
    nonce = os.urandom(32)
    envelope = issuer.issue(user_data, nonce)
    server_envelope = server.envelope(nonce)

    def attested(pipelined: bool) -> None:
        first = b"ping" if pipelined else None
        with connect(HOST, tp_port, client_cfg, first_message=first) as channel:
            if not pipelined:
                channel.send(b"ping")
            channel.recv()

    parts: dict[str, Callable[[], object]] = {
        "plain": lambda: exchange(HOST, plain_port, plain_ctx, b"ping"),
        "tp13": lambda: attested(True),
        "tp13, request after Established": lambda: attested(False),
        "client quote": lambda: issuer.issue(user_data, nonce),
        "quote": lambda: server.measure("quote", nonce),
        "verify": lambda: server.measure("verify", envelope, nonce),
        "client verify": lambda: validator.validate(server_envelope, nonce),
    }
    remote = {"quote", "verify"}
    samples: dict[str, list[float]] = {name: [] for name in parts}
    order = list(parts)
    shuffle = random.Random(14).shuffle  # a new order each round: no part always follows another
    for round_ in range(n + 3):
        shuffle(order)
        for name in order:
            start = time.perf_counter()
            result = parts[name]()
            elapsed = (time.perf_counter() - start) * 1000
            if round_ >= 3:  # warm-up rounds
                # The server's parts report their own time (the pipe's trip is not theirs).
                samples[name].append(result if name in remote else elapsed)
    return {name: sorted(values) for name, values in samples.items()}


def print_latency(figures: dict[str, list[float]], *, pinned: bool = False) -> None:
    plain, attested = figures["plain"], figures["tp13"]
    floor_parts = ("quote", "verify", "client verify")
    floor = {f: f(plain) + sum(f(figures[part]) for part in floor_parts) for f in (p50, p99)}
    where = ("one CPU per side: two machines, as deployed" if pinned
             else "both sides sharing both CPUs")
    print("tp13 handshake over loopback TCP until the first application reply, same OpenSSL "
          f"contexts, certificates and keys ({len(plain)} of each, interleaved; {where})")
    rows = (
        ("plain mutual TLS 1.3", "plain", ""),
        ("Trusted Passages (tp13)", "tp13",
         f"ratio {p50(attested) / p50(plain):.1f}x  (request pipelined behind the client's "
         "evidence)"),
        ("tp13, request after FINISHED", "tp13, request after Established", ""),
        ("server: one quote (swtpm)", "quote", "(on the critical path)"),
        ("client: one quote (swtpm)", "client quote", "(overlaps the server's; not in the floor)"),
        ("server: one verification", "verify", "(the client's evidence)"),
        ("client: one verification", "client verify", "(the server's evidence)"),
    )
    for label, key, note in rows:
        values = figures[key]
        print(f"  {label:<29} p50 {p50(values):6.2f} ms   p99 {p99(values):6.2f} ms   {note}"
              .rstrip())
    print(f"  floor: plain + one quote + two verifications   p50 {floor[p50]:6.2f} ms   "
          f"p99 {floor[p99]:6.2f} ms")
    gap = {f: f(attested) - floor[f] for f in (p50, p99)}
    print(f"  gap: tp13 - floor             p50 {gap[p50]:+6.2f} ms   p99 {gap[p99]:+6.2f} ms")
    verdict = "met" if gap[p50] <= 0.5 else "NOT met"
    if pinned:
        print(f"  goal: tp13 within 0.5 ms of the floor (p50): {verdict}")
    else:
        print(f"  (sharing CPUs the two overlapping quotes compete, which the floor does not "
              f"model; the goal is judged with one CPU per side: {verdict} here)")


CLIENT_CPU, SERVER_CPU = 0, 1


def pin_sides(lab: Lab, server_pid: int | None = None) -> None:
    """The two-machine model on one box: this (client) process and the client's swtpm on
    one CPU, the server's swtpm and the server process on the other (one forked later
    pins itself), so that one side's quote or validation never takes CPU from the
    other's."""
    _set_cpus(os.getpid(), {CLIENT_CPU})
    _set_cpus(lab.nodes["client"].swtpm.pid, {CLIENT_CPU})
    _set_cpus(lab.nodes["server"].swtpm.pid, {SERVER_CPU})
    if server_pid is not None:
        _set_cpus(server_pid, {SERVER_CPU})


def share_cpus(lab: Lab, server_pid: int) -> None:
    """Both sides, their swtpm processes included, on every CPU."""
    every = set(range(os.cpu_count() or 1))
    for pid in (os.getpid(), server_pid, lab.nodes["client"].swtpm.pid,
                lab.nodes["server"].swtpm.pid):
        _set_cpus(pid, every)


def _set_cpus(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` (sched_setaffinity moves one thread only)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.sched_setaffinity(int(task), cpus)


class ServerProcess:
    """Bob's server in its own process, as on a real node (its own interpreter and GIL):
    a plain mTLS server and a Trusted Passages server on the same contexts and keys."""

    def __init__(self, lab: Lab, clients: int, *, stamps: bool = False,
                 pin: bool = False) -> None:
        self._lab, self._clients, self._stamps, self._pin = lab, clients, stamps, pin
        self.stamps: list[dict[str, float]] = []  # the server's, with stamps=True

    def __enter__(self) -> tuple[int, int]:
        node = self._lab.nodes["server"]
        node.issuer.close()
        node.client.close()  # swtpm serves one connection: hand the TPM to the child
        self._pipe, child = multiprocessing.get_context("fork").Pipe()
        self._proc = multiprocessing.get_context("fork").Process(
            target=self._run, args=(child,), daemon=True)
        self._proc.start()
        ports: tuple[int, int] = self._pipe.recv()
        return ports

    @property
    def pid(self) -> int:
        assert self._proc.pid is not None  # started in __enter__
        return self._proc.pid

    def _run(self, pipe) -> None:  # type: ignore[no-untyped-def]
        if self._pin:
            os.sched_setaffinity(0, {SERVER_CPU})
        node = self._lab.nodes["server"]
        client = TpmClient(node.swtpm.tcti)
        issuer = TpmIssuer(client, "server", node.selection, event_log=node.event_log)
        config = self._lab.tp_config("server", peer="client", issuer=issuer)
        stamps = Stamps()
        if self._stamps:
            stamps.install()
        parts = _ServerParts(issuer.bound(BindingContext("tp13", "server")),
                             spki_digest(node.certificate), config.validator)
        with PlainServer(config.ssl_context("server"), lambda m: m) as plain, \
                serve(HOST, 0, config, _echo) as tp:
            pipe.send((plain.port, tp.address[1]))
            while (request := pipe.recv()) is not None:
                pipe.send(parts.run(*request))
        pipe.send(stamps.handshakes)

    def measure(self, part: str, *args: bytes) -> float:
        """Milliseconds the server process took for ``part`` ("quote": its TPM quotes a
        binding; "verify": it validates an envelope), timed there."""
        self._pipe.send((part, *args))
        took: float = self._pipe.recv()
        return took

    def envelope(self, nonce: bytes) -> bytes:
        """The server's evidence for ``nonce``, as in a handshake."""
        self._pipe.send(("envelope", nonce))
        evidence: bytes = self._pipe.recv()
        return evidence

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(OSError):  # the server process is gone already
            self._pipe.send(None)
        if self._pipe.poll(10):
            self.stamps = self._pipe.recv()
        self._proc.join(10)


class _ServerParts:
    """The floor's parts that run on the server's side, timed in the server process."""

    def __init__(self, issuer: TpmIssuer, user_data: bytes, validator) -> None:  # type: ignore[no-untyped-def]
        self._issuer, self._user_data, self._validator = issuer, user_data, validator

    def run(self, part: str, *args: bytes) -> float | bytes:
        if part == "envelope":
            return self._issuer.issue(self._user_data, args[0])
        start = time.perf_counter()
        if part == "quote":
            self._issuer.issue(self._user_data, args[0])
        else:
            self._validator.validate(*args)
        return (time.perf_counter() - start) * 1000


class SustainedFlood:
    """``count`` connections to ``port`` that never finish a handshake, re-opened as the
    server drops them; the first 20 trickle a ClientHello at one byte a second."""

    def __init__(self, port: int, count: int) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
        self._port, self._count = port, count
        self._stop = threading.Event()
        self.reopened = 0
        self._hello = _client_hello()
        self._socks = [self._open() for _ in range(count)]
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _open(self) -> socket.socket:
        sock = socket.create_connection((HOST, self._port))
        sock.setblocking(False)
        return sock

    def _run(self) -> None:
        tick = 0
        while not self._stop.wait(0.05):
            tick += 1
            for i, sock in enumerate(self._socks):
                if i < 20 and tick % 20 == 0:
                    with contextlib.suppress(OSError):
                        sock.send(self._hello[tick // 20 % len(self._hello):][:1])
                if _dropped(sock):
                    sock.close()
                    self._socks[i] = self._open()
                    self.reopened += 1

    def __enter__(self) -> SustainedFlood:
        self._thread.start()
        time.sleep(0.5)  # the server has seen them all
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in self._socks:
            sock.close()


def _dropped(sock: socket.socket) -> bool:
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _client_hello() -> bytes:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="flood")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _echo(channel) -> None:  # type: ignore[no-untyped-def]
    stamps = getattr(channel._core, "_stamps", None)  # set under --profile only
    if stamps is not None:
        stamps["handler"] = time.perf_counter()
    channel.send(channel.recv())


def measure_attested(port: int, client_cfg, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    def once() -> None:
        with connect(HOST, port, client_cfg, first_message=b"ping") as channel:
            channel.recv()

    once()
    return timed(once, n)


def measure_concurrent(port: int, client_cfg, clients: int,  # type: ignore[no-untyped-def]
                       seconds: float) -> float:
    done = [0] * clients
    stop = threading.Event()
    if True:

        def worker(i: int) -> None:
            while not stop.is_set():
                with connect(HOST, port, client_cfg, first_message=b"ping") as channel:
                    channel.recv()
                done[i] += 1

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        return sum(done) / (time.perf_counter() - start)


def profile(n: int, *, pin: bool = False) -> None:
    """The step-by-step time line of ``n`` handshakes, then a cProfile of the cores."""
    stamps = Stamps()
    with Lab() as lab:
        client_cfg = lab.tp_config("client", peer="server")
        if pin:
            pin_sides(lab)
        server = ServerProcess(lab, 1, stamps=True, pin=pin)
        with server as (_, tp_port):
            restore = stamps.install()  # after the fork: the server patches its own copy
            for _ in range(n + 5):
                start = time.perf_counter()
                with connect(HOST, tp_port, client_cfg, first_message=b"ping") as channel:
                    channel.recv()
                    channel._core._stamps.update(connect=start, reply=time.perf_counter())
        print_timeline(stamps.handshakes[5:], server.stamps[5:])
    restore()
    with Lab() as lab:
        profile_cores(lab, n)


def profile_cores(lab: Lab, n: int) -> None:
    """Both sides' cores driven in one thread, bytes handed over in memory: the CPU work
    of a handshake (TLS, quotes, envelopes, frames, verification) without any wait."""
    server_cfg = lab.tp_config("server", peer="client")
    client_cfg = lab.tp_config("client", peer="server")
    issuers = {role: lab.nodes[role].issuer.bound(BindingContext("tp13", role))  # type: ignore[arg-type]
               for role in ("server", "client")}
    spkis = {role: spki_digest(lab.nodes[role].certificate) for role in issuers}
    nonce = os.urandom(32)
    envelopes = {role: issuers[role].issue(spkis[role], nonce) for role in issuers}
    validators = {"server": client_cfg.validator, "client": server_cfg.validator}
    parts: dict[str, Callable[[], object]] = {
        "tp13": lambda: _handshake_in_memory(server_cfg, client_cfg),
        "plain TLS": lambda: _plain_in_memory(server_cfg, client_cfg),
        "two quotes": lambda: [issuers[r].issue(spkis[r], nonce) for r in issuers],
        "two validations": lambda: [validators[r].validate(envelopes[r], nonce)
                                    for r in issuers],
    }
    took: dict[str, list[float]] = {name: [] for name in parts}
    for round_ in range(n + 5):
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            if round_ >= 5:
                took[name].append((time.perf_counter() - start) * 1000)
    cpu = {name: p50(sorted(values)) for name, values in took.items()}
    rest = cpu["tp13"] - cpu["plain TLS"] - cpu["two quotes"] - cpu["two validations"]
    print("both sides in one thread, bytes handed over in memory (no waits, no sockets), p50:")
    for name in parts:
        print(f"  {name:<16} {cpu[name]:6.2f} ms")
    print(f"  the rest of tp13 (frames, envelopes, exporter, certificates, core): {rest:+.2f} ms")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(n):
        _handshake_in_memory(server_cfg, client_cfg)
    profiler.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(25)
        print(out.getvalue())


def _handshake_in_memory(server_cfg, client_cfg) -> None:  # type: ignore[no-untyped-def]
    server, client = server_cfg.connection("server"), client_cfg.connection("client")
    for _ in range(10):
        _hand_over(client, server)
        client.prepare_evidence()  # as the blocking adapter does, after its flush
        _hand_over(server, client)
        if server.established and client.established:
            client.send(b"ping")  # one application record each way, as the plain one
            _hand_over(client, server)
            server.send(b"ping")
            _hand_over(server, client)
            return
    raise RuntimeError("the in-memory handshake did not complete")


def _plain_in_memory(server_cfg, client_cfg) -> None:  # type: ignore[no-untyped-def]
    """Plain mutual TLS 1.3 on the same contexts, one application record each way."""
    server = SSL.Connection(server_cfg.ssl_context("server"), None)
    client = SSL.Connection(client_cfg.ssl_context("client"), None)
    server.set_accept_state()
    client.set_connect_state()
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(SSL.WantReadError):
                side.do_handshake()
            _bio_over(side, server if side is client else client)
    client.sendall(b"ping")
    _bio_over(client, server)
    server.sendall(server.recv(64))
    _bio_over(server, client)
    if client.recv(64) != b"ping":
        raise RuntimeError("the in-memory plain TLS exchange failed")


def _bio_over(source: SSL.Connection, sink: SSL.Connection) -> None:
    with contextlib.suppress(SSL.WantReadError):
        while data := source.bio_read(65536):
            sink.bio_write(data)


def _hand_over(source, sink) -> None:  # type: ignore[no-untyped-def]
    data = source.data_to_send()
    if data:  # b"" would be EOF
        sink.receive_data(data)


# --- where the time goes (--profile) ---------------------------------------------------------

# Both processes stamp time.perf_counter() (CLOCK_MONOTONIC: one clock for the machine), so
# the client's and the server's stamps of one handshake fall on one time line.
# The critical path of one handshake, in causal order: (side, label, what it marks).
STEPS = (
    ("client", "connect", "client: connect() called"),
    ("server", "rx HANDSHAKING", "server: ClientHello in the core (accept, loop, thread hop)"),
    ("server", "tx HANDSHAKING", "server: its TLS flight out of the core (TLS crypto)"),
    ("client", "rx HANDSHAKING", "client: server flight in the core"),
    ("client", "tx HANDSHAKING", "client: TLS Finished out (TLS crypto; its checks follow)"),
    ("server", "rx HANDSHAKING#2", "server: client Finished in the core"),
    ("server", "quote start", "server: its quote starts (client certificate checks, exporter)"),
    ("server", "quote end", "server: quote done (swtpm, envelope)"),
    ("server", "tx AWAIT_EVIDENCE", "server: EVIDENCE out of the core (frame, TLS record)"),
    ("client", "validate start", "client: server EVIDENCE in, its validation starts"),
    ("client", "validate end", "client: validation done"),
    ("client", "tx AWAIT_FINISHED", "client: FINISHED (+ pipelined request) out"),
    ("server", "rx AWAIT_FINISHED", "server: client FINISHED in the core"),
    ("server", "tx ESTABLISHED", "server: Established"),
    ("server", "handler", "server: the handler has the channel (thread hand-over)"),
    ("client", "reply", "client: the reply is in"),
)
# Off the critical path (tpv1.2: the client's evidence and the server's validation of
# it overlap the server's quote and the client's validation): (side, label, what, the
# step it is measured from).
SIDE_STEPS = (
    ("client", "quote start", "client: its quote starts", "client", "tx HANDSHAKING"),
    ("client", "quote end", "client: its quote done (overlapping the server's)", "client",
     "tx HANDSHAKING"),
    ("server", "rx AWAIT_EVIDENCE", "server: client EVIDENCE in the core", "client",
     "tx HANDSHAKING"),
    ("server", "validate end", "server: its validation of the client done", "client",
     "tx HANDSHAKING"),
    ("server", "tx AWAIT_FINISHED", "server: its FINISHED out", "client", "tx HANDSHAKING"),
)


class Stamps:
    """Patches the core, the issuer and the validator to stamp each step of each
    handshake in this process: ``handshakes`` holds one {label: time} per connection."""

    def __init__(self) -> None:
        self.handshakes: list[dict[str, float]] = []
        self._local = threading.local()

    def install(self) -> Callable[[], None]:
        """Patch; returns what undoes it."""
        from trusted_passages import protocol, tpm  # lazy: only --profile patches them

        stamps = self
        core = protocol.TrustedPassagesConnection
        init, receive = core.__init__, core.receive_data
        issue, validate = tpm.TpmIssuer.issue, tpm.TpmValidator.validate

        def patched_init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            self._stamps = {"created": time.perf_counter()}
            stamps.handshakes.append(self._stamps)
            init(self, *args, **kwargs)

        def patched_receive(self, data):  # type: ignore[no-untyped-def]
            stamps._local.current = self._stamps
            _first(self._stamps, f"rx {self.state.name}", time.perf_counter())
            try:
                return receive(self, data)
            finally:
                _first(self._stamps, f"tx {self.state.name}", time.perf_counter())

        def timed(method, label):  # type: ignore[no-untyped-def]
            def wrapper(self, *args):  # type: ignore[no-untyped-def]
                current = getattr(stamps._local, "current", None)
                start = time.perf_counter()
                try:
                    return method(self, *args)
                finally:
                    if current is not None:
                        _first(current, f"{label} start", start)
                        _first(current, f"{label} end", time.perf_counter())
            return wrapper

        finish = core.finish_handshake

        def patched_finish(self):  # type: ignore[no-untyped-def]
            stamps._local.current = self._stamps
            try:
                return finish(self)
            finally:
                _first(self._stamps, f"tx {self.state.name}", time.perf_counter())

        core.__init__ = patched_init  # type: ignore[method-assign]
        core.receive_data = patched_receive  # type: ignore[method-assign]
        core.finish_handshake = patched_finish  # type: ignore[method-assign]
        tpm.TpmIssuer.issue = timed(issue, "quote")  # type: ignore[method-assign]
        tpm.TpmValidator.validate = timed(validate, "validate")  # type: ignore[method-assign]
        prepare = core.prepare_evidence

        def patched_prepare(self, submit=None):  # type: ignore[no-untyped-def]
            stamps._local.current = mine = self._stamps
            if submit is None:
                return prepare(self)

            def traced(fn):  # type: ignore[no-untyped-def]
                def run():  # type: ignore[no-untyped-def]
                    stamps._local.current = mine  # the quote thread stamps this handshake
                    return fn()
                return submit(run)
            return prepare(self, submit=traced)
        core.prepare_evidence = patched_prepare  # type: ignore[method-assign]

        def restore() -> None:
            core.__init__ = init  # type: ignore[method-assign]
            core.receive_data, core.prepare_evidence = receive, prepare  # type: ignore[method-assign]
            core.finish_handshake = finish  # type: ignore[method-assign]
            tpm.TpmIssuer.issue, tpm.TpmValidator.validate = issue, validate  # type: ignore[method-assign]
        return restore

    def mark(self, label: str) -> None:
        """Stamp ``label`` on the handshake this thread last worked on."""
        current = getattr(self._local, "current", None)
        if current is not None:
            _first(current, label, time.perf_counter())


def _first(stamps: dict[str, float], label: str, when: float) -> None:
    """Keep the first time of a label; a second one (the server sees HANDSHAKING twice)
    gets a #2."""
    if label not in stamps:
        stamps[label] = when
    elif f"{label}#2" not in stamps:
        stamps[f"{label}#2"] = when


def print_timeline(client: list[dict[str, float]], server: list[dict[str, float]]) -> None:
    """Per step, the median over the handshakes of its time since the step before."""
    pairs = [(c, srv) for c, srv in zip(client, server, strict=False)
             if all(label in (c if side == "client" else srv) for side, label, _ in STEPS)]
    print(f"one tp13 handshake, step by step (median of {len(pairs)} handshakes; "
          "cumulative ms: the sum of the medians of each step)")
    at = 0.0
    for (side, label, what), (prev_side, prev, _) in zip(STEPS[1:], STEPS, strict=False):
        delta = statistics.median(
            (c if side == "client" else srv)[label] - (c if prev_side == "client" else srv)[prev]
            for c, srv in pairs) * 1000
        at += delta
        print(f"  {at:6.2f}  (+{delta:5.2f})  {what}")
    total = statistics.median(c["reply"] - c["connect"] for c, _ in pairs) * 1000
    print(f"  median connect() to reply: {total:.2f} ms")
    for side, label, what, since_side, since in SIDE_STEPS:
        deltas = [(c if side == "client" else srv)[label]
                  - (c if since_side == "client" else srv)[since]
                  for c, srv in pairs if label in (c if side == "client" else srv)]
        if deltas:
            print(f"  {what}: +{statistics.median(deltas) * 1000:.2f} ms after the "
                  f"client's TLS Finished")


if __name__ == "__main__":
    main()
