"""Every listener the project runs, flooded: idle connections beyond its slots and
slow-loris peers trickling one byte a second. A genuine client must still be served
within 2 s, the flood must be closed once its step deadline passes (counted from
accept, not extended by the trickle), and the listener must hold no more than its
slots. Short deadlines through constructor parameters keep the file fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from attestation.agent_wire import recv_frame, send_frame
from attestation.slots import ConnectionSlots, Slot
from cryptovm.audit import read_entries
from cryptovm.client import CryptoVmClient
from cryptovm.server import ServerThread
from cryptovm.vsm import CryptoVm
from cryptovm.wire import MAGIC, encode_request
from testbed.attacks.plain import PlainProxy, PlainServer, exchange
from testbed.cluster.agent import sockaddr
from testbed.sim.agent_server import AgentServer
from testbed.tpm.swtpm import Swtpm
from tests.test_sim_agent import FakeBackend
from tests.test_tp_adapters import config, echo_handler
from tests.test_tp_protocol import Pki
from trusted_passages import AsyncAttestedChannel, connect, open_channel, serve, start_server
from trusted_passages.pki import make_ca

FLOOD = 500
TRICKLERS = 20  # of the flood, these send one byte a second
DEADLINE = 1.0  # the listeners' step deadline in these tests
GENUINE_WITHIN = 2.0
HOST = "127.0.0.1"


@pytest.fixture(scope="module", autouse=True)
def enough_descriptors() -> Iterator[None]:
    """Both ends of ~600 connections live in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(make_ca("flood-ca"), make_ca("flood-rogue-ca"))


def client_hello() -> bytes:
    """A real TLS ClientHello: a slow-loris peer trickles it, so TLS keeps waiting."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="flood")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


class Flood:
    """``count`` connections that say nothing, the first ``TRICKLERS`` of them sending
    ``trickle`` one byte a second from a thread of their own."""

    def __init__(self, connect: Callable[[], socket.socket], count: int, trickle: bytes) -> None:
        self.socks = [connect() for _ in range(count)]
        self._trickle = trickle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle_loop, daemon=True)
        self._thread.start()

    def _trickle_loop(self) -> None:
        for byte in self._trickle:
            for sock in self.socks[:TRICKLERS]:
                with contextlib.suppress(OSError):
                    sock.send(bytes([byte]))
            if self._stop.wait(1.0):
                return

    def open_after(self, seconds: float) -> list[socket.socket]:
        """The flood's connections the listener has not closed ``seconds`` from now."""
        time.sleep(seconds)
        return [sock for sock in self.socks if not closed_by_peer(sock)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for sock in self.socks:
            sock.close()

    def __enter__(self) -> Flood:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the peer closed (alerts or error frames may come before the end)."""
    sock.settimeout(0.05)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset
    return True


def tcp(port: int) -> Callable[[], socket.socket]:
    return lambda: socket.create_connection((HOST, port), timeout=5)


def timed(action: Callable[[], object]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


def flood_size(slots: int) -> int:
    return max(FLOOD, slots + 50)


# --- CVM1 ----------------------------------------------------------------------------------


@pytest.fixture
def vm(swtpm: Swtpm, tmp_path: Path) -> Iterator[tuple[CryptoVm, bytes]]:
    vm, root_psk = CryptoVm.initialize(tmp_path / "state", swtpm.tcti, audit_sync_each=False)
    with vm:
        yield vm, root_psk


def test_cvm1_serves_a_genuine_client_through_a_flood(vm: tuple[CryptoVm, bytes]) -> None:
    cryptovm, psk = vm
    with ServerThread(cryptovm, handshake_timeout=DEADLINE, login_timeout=DEADLINE) as thread:
        server = thread.server
        with Flood(tcp(server.port), flood_size(server.max_connections), client_hello()) as flood:
            time.sleep(0.3)  # let the server accept them all
            assert len(server.slots) == server.max_connections  # full, and no more

            def genuine() -> None:
                with CryptoVmClient(HOST, server.port, ca_pem=cryptovm.ca.pem, account="root",
                                    psk=psk, timeout=5) as client:
                    client.call("ping")

            assert timed(genuine) < GENUINE_WITHIN
            assert flood.open_after(DEADLINE + 1.0) == []
        assert server.slots.evicted >= 50 and server.slots.expired > 0


def test_cvm1_drops_a_peer_that_never_logs_in(vm: tuple[CryptoVm, bytes]) -> None:
    cryptovm, _ = vm
    with ServerThread(cryptovm, idle_timeout=30, handshake_timeout=DEADLINE,
                      login_timeout=DEADLINE) as thread:
        context = ssl.create_default_context(cadata=cryptovm.ca.pem.decode())
        context.check_hostname = False
        with socket.create_connection((HOST, thread.port), timeout=5) as raw, \
                context.wrap_socket(raw) as tls:
            started = time.monotonic()
            # Pings keep a connection active but not logged in: the login deadline holds.
            request = 1
            while not closed_by_peer(tls) and time.monotonic() - started < 5:
                with contextlib.suppress(OSError):
                    tls.sendall(encode_request(request, "ping", None, {}))
                request += 1
                time.sleep(0.2)
            assert time.monotonic() - started < DEADLINE + 1.5


def test_cvm1_malformed_frames_before_login_cannot_fill_the_audit_log(
        vm: tuple[CryptoVm, bytes]) -> None:
    cryptovm, _ = vm
    cryptovm.audit.set_unauthenticated_limit(5, 60.0)
    with ServerThread(cryptovm) as thread:
        context = ssl.create_default_context(cadata=cryptovm.ca.pem.decode())
        context.check_hostname = False
        size = cryptovm.audit.path.stat().st_size
        junk = MAGIC + (9).to_bytes(4, "big") + b"not json!"
        with socket.create_connection((HOST, thread.port), timeout=5) as raw, \
                context.wrap_socket(raw) as tls:
            tls.sendall(junk * 2000)  # one connection, 2,000 malformed frames
            assert closed_by_peer_within(tls, 2.0)
        for _ in range(30):  # and 30 connections, one malformed frame each
            with socket.create_connection((HOST, thread.port), timeout=5) as raw, \
                    context.wrap_socket(raw) as tls:
                tls.sendall(junk)
                assert closed_by_peer_within(tls, 2.0)
    cryptovm.audit.flush_suppressed(force=True)
    cryptovm.audit.sync()
    entries = [e for e in read_entries(cryptovm.audit.path) if e["op"] == "frame"]
    summaries = [e for e in read_entries(cryptovm.audit.path) if e["op"] == "audit.suppressed"]
    assert len(entries) == 5
    assert len(summaries) == 1 and "suppressed 26 " in summaries[0]["detail"]
    assert cryptovm.audit.path.stat().st_size - size < 10_000


def closed_by_peer_within(sock: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if closed_by_peer(sock):
            return True
    return False


# --- Trusted Passages ----------------------------------------------------------------------


def test_tp_blocking_serves_a_genuine_client_through_a_flood(pki: Pki) -> None:
    slots = 64
    with serve(HOST, 0, config(pki, "server", timeout=DEADLINE), echo_handler,
               max_connections=slots) as server, \
            Flood(tcp(server.address[1]), flood_size(slots), client_hello()) as flood:
        time.sleep(0.3)
        assert server.connections <= slots

        def genuine() -> None:
            with connect(*server.address, config(pki, "client", expected_peer="server")) as ch:
                ch.send(b"ping")
                assert ch.recv() == b"ping"

        assert timed(genuine) < GENUINE_WITHIN
        assert flood.open_after(DEADLINE + 0.5) == []
        assert server.connections == 0


def test_tp_asyncio_serves_a_genuine_client_through_a_flood(pki: Pki) -> None:
    slots = 64

    async def scenario() -> tuple[float, list[socket.socket], int]:
        async def echo(channel: AsyncAttestedChannel) -> None:
            while data := await channel.recv():
                await channel.send(data)

        async with await start_server(HOST, 0, config(pki, "server", timeout=DEADLINE), echo,
                                      max_connections=slots) as server:
            port = server.address[1]
            flood = await asyncio.to_thread(Flood, tcp(port), flood_size(slots), client_hello())
            try:
                await asyncio.sleep(0.3)
                assert server.connections <= slots
                started = time.monotonic()
                async with await open_channel(HOST, port, config(pki, "client")) as channel:
                    await channel.send(b"ping")
                    assert await channel.recv() == b"ping"
                took = time.monotonic() - started
                still_open = await asyncio.to_thread(flood.open_after, DEADLINE + 0.5)
                return took, still_open, server.connections
            finally:
                flood.close()

    took, still_open, held = asyncio.run(scenario())
    assert took < GENUINE_WITHIN and still_open == [] and held == 0


# --- the sim node agent --------------------------------------------------------------------


def test_sim_agent_serves_a_genuine_client_through_a_flood(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    agent = AgentServer(FakeBackend(), path, idle_timeout=DEADLINE)  # type: ignore[arg-type]
    agent.start()

    def unix() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        with sockaddr(path) as address:
            sock.connect(address)
        return sock

    try:
        with Flood(unix, flood_size(agent.slots.limit), b"\x00\x00\x01\x00{}") as flood:
            time.sleep(0.3)
            assert len(agent.slots) <= agent.slots.limit

            def genuine() -> None:
                with unix() as sock:
                    send_frame(sock, {"op": "status"})
                    assert recv_frame(sock) == b'{"node":"n1","state":"ready"}'

            assert timed(genuine) < GENUINE_WITHIN
            assert flood.open_after(DEADLINE + 0.5) == []
    finally:
        agent.close()


# --- the attack lab's plain TLS relay ------------------------------------------------------


def test_plain_relay_serves_a_genuine_client_through_a_flood(pki: Pki) -> None:
    server_side, client_side = config(pki, "server"), config(pki, "client")
    with PlainServer(server_side.ssl_context("server"), lambda request: request) as upstream, \
            PlainProxy(server_side.ssl_context("server"), client_side.ssl_context("client"),
                       ("127.0.0.1", upstream.port), handshake_timeout=DEADLINE,
                       max_connections=64) as proxy, \
            Flood(tcp(proxy.port), flood_size(64), client_hello()) as flood:
        time.sleep(0.3)
        assert len(proxy.slots) <= 64

        def genuine() -> None:
            assert exchange(HOST, proxy.port, client_side.ssl_context("client"),
                            b"ping") == b"ping"

        assert timed(genuine) < GENUINE_WITHIN
        assert flood.open_after(DEADLINE + 0.5) == []


# --- the admission rule itself -------------------------------------------------------------


def test_slots_evict_the_least_proven_oldest_first_and_refuse_when_all_are_proven() -> None:
    now = [0.0]
    slots = ConnectionSlots(3, clock=lambda: now[0])
    dropped: list[tuple[str, str]] = []

    def admit(name: str, rank: int | None = 0) -> Slot | None:
        now[0] += 1
        return slots.admit(lambda why: dropped.append((name, why)), timeout=10, rank=rank)

    admit("a", 1), admit("b")
    c = admit("c")
    assert c is not None
    assert admit("d") is not None and dropped == [("b", "evicted")]  # rank 0 before rank 1
    slots.step(c, timeout=None, rank=None)  # proven: no deadline, never evicted
    assert admit("e") is not None and dropped[-1] == ("d", "evicted")
    now[0] = 100.0
    assert slots.expire() == 2 and {n for n, why in dropped if why == "expired"} == {"a", "e"}
    assert admit("f", None) is not None and admit("g", None) is not None
    assert admit("h") is None and slots.refused == 1  # all proven: the newcomer is refused
    slots.release(c)
    slots.release(c)  # idempotent
    assert len(slots) == 2 and not c.active


def test_a_silent_slot_that_spoke_unseen_is_ranked_up_before_it_would_be_evicted() -> None:
    """A genuine client's ClientHello may arrive after accept, before a busy listener reads
    it: asked before eviction, its slot moves up, and the next silent one goes instead."""
    now = [0.0]
    slots = ConnectionSlots(2, clock=lambda: now[0])
    dropped: list[str] = []
    spoke = {"genuine": False}

    def admit(name: str, reassess=None) -> Slot | None:  # type: ignore[no-untyped-def]
        now[0] += 1
        return slots.admit(lambda why: dropped.append(name), timeout=10, rank=0,
                           reassess=reassess)

    admit("genuine", lambda: 1 if spoke["genuine"] else None)
    admit("flood-1")
    spoke["genuine"] = True  # its first bytes wait unread
    assert admit("flood-2") is not None and dropped == ["flood-1"]
    assert admit("flood-3") is not None and dropped == ["flood-1", "flood-2"]
    now[0] += 1
    silent = admit("flood-4")
    assert silent is not None and dropped[-1] == "flood-3"
    slots.step(silent, timeout=None, rank=2)
    assert admit("flood-5") is not None and dropped[-1] == "genuine"  # ranked 1, oldest left
