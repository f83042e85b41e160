"""The blocking and asyncio adapters over real loopback sockets, with the fake
attester: timeouts, silent and vanishing peers, concurrency, large application data.
(tests/test_tp_tpm.py runs the same adapters with real swtpm quotes.)"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from tests.test_tp_protocol import KEY, Pki, RawTls
from trusted_passages import (
    AttestationRejected,
    AttestedChannel,
    ChannelConfig,
    FakeIssuer,
    FakeValidator,
    ProtocolError,
    TrustedPassagesConnection,
    connect,
    open_channel,
    serve,
    start_server,
)
from trusted_passages.aio import AsyncAttestedChannel
from trusted_passages.aio import establish as aio_establish
from trusted_passages.blocking import establish
from trusted_passages.frames import HEADER, parse_error_payload
from trusted_passages.pki import generate_key, issue_certificate, make_ca

LOCALHOST = "127.0.0.1"
SHORT = 0.3


@pytest.fixture(scope="module")
def pki() -> Pki:
    return Pki(make_ca("tp-adapter-ca"), make_ca("rogue-ca"))


def config(pki: Pki, node: str, *, timeout: float = 5.0, state: str = "good",
           expected_peer: str | None = None) -> ChannelConfig:
    key = pki.keys.setdefault((node, "tp13"), generate_key())
    return ChannelConfig(issue_certificate(pki.ca, node, key), key, [pki.ca.certificate],
                         FakeIssuer(KEY, node, state=state), FakeValidator(KEY),
                         timeout=timeout, expected_peer=expected_peer)


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A TCP server that accepts and never says a word."""
    listener = socket.create_server((LOCALHOST, 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]),
                              daemon=True)
    thread.start()
    yield listener
    thread.join(1)
    for sock in accepted:
        sock.close()
    listener.close()


def echo_handler(channel: AttestedChannel) -> None:
    while data := channel.recv():
        channel.send(data)


def raw_tls_client(pki: Pki, address: tuple[str, int]) -> tuple[socket.socket, RawTls]:
    """A TLS client that completes the handshake and then says nothing."""
    sock = socket.create_connection(address, timeout=5)
    raw = RawTls(config(pki, "client"), "client")
    while not raw.handshake_done:
        sock.sendall(raw.data_to_send())
        raw.receive_data(sock.recv(65536))
    sock.sendall(raw.data_to_send())
    return sock, raw


def read_until_closed(sock: socket.socket, raw: RawTls) -> bytes:
    while data := sock.recv(65536):
        raw.receive_data(data)
    return raw.plaintext


# --- blocking ------------------------------------------------------------------------------


def test_blocking_round_trip_of_large_application_data(pki: Pki) -> None:
    with serve(LOCALHOST, 0, config(pki, "server"), echo_handler) as server, \
            connect(*server.address, config(pki, "client", expected_peer="server")) as channel:
        payload = bytes(range(256)) * 4096  # 1 MiB: many TLS records, many reads
        channel.send(payload)
        echoed = b""
        while len(echoed) < len(payload):
            echoed += channel.recv()
        assert echoed == payload


def test_server_times_out_a_client_that_sends_no_evidence(pki: Pki) -> None:
    failures: list[AttestationRejected] = []
    with serve(LOCALHOST, 0, config(pki, "server", timeout=SHORT), echo_handler,
               on_failure=failures.append) as server:
        sock, raw = raw_tls_client(pki, server.address)
        started = time.monotonic()
        with sock:
            plaintext = read_until_closed(sock, raw)
        assert SHORT * 0.8 < time.monotonic() - started < SHORT + 2
    error = plaintext[plaintext.rindex(b"TPv1") + HEADER.size:]
    assert parse_error_payload(error) == ("timeout", "timeout waiting for the client's evidence")
    assert failures[0].check == "timeout"


def test_a_handshake_in_its_thread_keeps_its_deadline_and_close_drops_it(pki: Pki) -> None:
    """The blocking server takes a connection over at its first bytes: a peer that then
    stalls mid-ClientHello is timed out from accept (not from its bytes), and closing
    the server drops it at once rather than waiting for that deadline."""
    failures: list[AttestationRejected] = []
    with serve(LOCALHOST, 0, config(pki, "server", timeout=SHORT), echo_handler,
               on_failure=failures.append) as server:
        with socket.create_connection(server.address, timeout=5) as sock:
            started = time.monotonic()
            sock.sendall(b"\x16\x03\x01")  # a record header, then nothing
            assert sock.recv(1) == b""
            assert SHORT * 0.8 < time.monotonic() - started < SHORT + 2
        assert [f.check for f in failures] == ["timeout"]
    server = serve(LOCALHOST, 0, config(pki, "server", timeout=30), echo_handler)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01")
        time.sleep(0.2)  # handed to its thread
        assert server.connections == 1
        started = time.monotonic()
        server.close()
        assert time.monotonic() - started < 2
        assert sock.recv(1) == b""


def test_connect_times_out_on_a_silent_server(pki: Pki, silent_listener: socket.socket) -> None:
    started = time.monotonic()
    with pytest.raises(AttestationRejected) as caught:
        connect(*silent_listener.getsockname()[:2], config(pki, "client", timeout=SHORT))
    assert caught.value.check == "timeout"
    assert caught.value.reason == "timeout waiting for the TLS handshake"
    assert time.monotonic() - started < SHORT + 2


def test_connect_to_a_closed_port_is_a_protocol_error(pki: Pki) -> None:
    with socket.create_server((LOCALHOST, 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(ProtocolError, match="cannot connect"):
        connect(LOCALHOST, port, config(pki, "client", timeout=SHORT))


def test_recv_times_out_and_then_sees_the_close(pki: Pki) -> None:
    release = threading.Event()

    def quiet_then_close(channel: AttestedChannel) -> None:
        release.wait(5)

    with serve(LOCALHOST, 0, config(pki, "server"), quiet_then_close) as server, \
            connect(*server.address, config(pki, "client")) as channel:
        with pytest.raises(ProtocolError, match="timeout waiting for application data"):
            channel.recv(timeout=SHORT)
        release.set()
        assert channel.recv() == b""  # clean close_notify from the server


def test_concurrent_clients_are_served_independently(pki: Pki) -> None:
    results: dict[int, bytes] = {}

    def client(index: int) -> None:
        with connect(*server.address, config(pki, "client")) as channel:
            channel.send(f"client {index}".encode())
            results[index] = channel.recv()

    with serve(LOCALHOST, 0, config(pki, "server"), echo_handler) as server:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
    assert results == {i: f"client {i}".encode() for i in range(6)}


def test_policy_rejection_through_the_blocking_adapter(pki: Pki) -> None:
    failures: list[AttestationRejected] = []
    with serve(LOCALHOST, 0, config(pki, "server"), echo_handler,
               on_failure=failures.append) as server, \
            pytest.raises(AttestationRejected) as caught:
        connect(*server.address, config(pki, "client", state="tampered"))
    assert (caught.value.check, caught.value.by_peer) == ("policy", True)
    assert failures and failures[0].check == "policy" and not failures[0].by_peer


def test_a_pipelined_first_message_is_served_and_a_refused_ones_never_is(pki: Pki) -> None:
    seen: list[bytes] = []

    def handler(channel: AttestedChannel) -> None:
        request = channel.recv()
        seen.append(request)
        channel.send(b"re: " + request)

    failures: list[AttestationRejected] = []
    with serve(LOCALHOST, 0, config(pki, "server"), handler,
               on_failure=failures.append) as server:
        with connect(*server.address, config(pki, "client"), first_message=b"GET /") as ch:
            assert ch.recv() == b"re: GET /"
        with pytest.raises(AttestationRejected) as caught:
            connect(*server.address, config(pki, "client", state="tampered"),
                    first_message=b"GET /secret")
    assert caught.value.check == "policy" and failures[0].check == "policy"
    assert seen == [b"GET /"]  # the refused client's request reached no handler


def test_a_forked_child_quotes_in_threads_of_its_own(pki: Pki) -> None:
    """The client's quote thread pool (tpv1.1: without concurrent evidence) is per
    process: a child forked after the parent connected (its pool's threads left behind)
    still connects."""
    client = replace(config(pki, "client"), concurrent_evidence=False)
    with serve(LOCALHOST, 0, config(pki, "server"), echo_handler) as server:
        with connect(*server.address, client, first_message=b"a") as ch:
            assert ch.recv() == b"a" and not ch._core.concurrent

        def child() -> None:
            with connect(*server.address, client, first_message=b"b") as c:
                os._exit(0 if c.recv() == b"b" else 1)

        process = multiprocessing.get_context("fork").Process(target=child)
        process.start()
        process.join(20)
        if process.exitcode is None:
            process.kill()
        assert process.exitcode == 0


@pytest.mark.parametrize(("client_side", "server_side"),
                         [(True, True), (True, False), (False, True)])
def test_tpv1_2_and_tpv1_1_peers_interoperate_on_both_adapters(
        pki: Pki, client_side: bool, server_side: bool) -> None:
    """Concurrent evidence (tpv1.2) is used only when both sides offer it; a tpv1.1 peer
    on either side gets the older order, through both adapters."""
    client = replace(config(pki, "client"), concurrent_evidence=client_side)
    server_config = replace(config(pki, "server"), concurrent_evidence=server_side)
    with serve(LOCALHOST, 0, server_config, echo_handler) as server, \
            connect(*server.address, client, first_message=b"ping") as ch:
        assert ch.recv() == b"ping"
        assert ch._core.concurrent is (client_side and server_side)

    async def scenario() -> None:
        async def handler(channel: AsyncAttestedChannel) -> None:
            await channel.send(await channel.recv())

        aio_server = await start_server(LOCALHOST, 0, server_config, handler)
        port = aio_server.sockets[0].getsockname()[1]
        try:
            async with await open_channel(LOCALHOST, port, client,
                                          first_message=b"pong") as ch:
                assert await ch.recv() == b"pong"
        finally:
            aio_server.close()
            await aio_server.wait_closed()

    asyncio.run(scenario())


# --- asyncio ------------------------------------------------------------------------------------


def test_asyncio_round_trip_and_expected_peer(pki: Pki) -> None:
    async def scenario() -> None:
        async def handler(channel: AsyncAttestedChannel) -> None:
            while data := await channel.recv():
                await channel.send(data)

        server = await start_server(LOCALHOST, 0, config(pki, "server"), handler)
        port = server.sockets[0].getsockname()[1]
        try:
            async with await open_channel(LOCALHOST, port,
                                          config(pki, "client", expected_peer="server")) as ch:
                await ch.send(b"x" * 100_000)
                got = b""
                while len(got) < 100_000:
                    got += await ch.recv()
                assert got == b"x" * 100_000 and ch.peer.node == "server"
            with pytest.raises(AttestationRejected) as caught:
                await open_channel(LOCALHOST, port, config(pki, "client", expected_peer="db"))
            assert caught.value.check == "expected_peer"
            async with await open_channel(LOCALHOST, port, config(pki, "client"),
                                          first_message=b"pipelined") as ch:
                assert await ch.recv() == b"pipelined"
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


def test_asyncio_server_times_out_a_silent_client(pki: Pki) -> None:
    failures: list[AttestationRejected] = []

    async def scenario() -> bytes:
        async def never(channel: AsyncAttestedChannel) -> None:
            raise AssertionError("a silent client must not be established")

        server = await start_server(LOCALHOST, 0, config(pki, "server", timeout=SHORT), never,
                                    on_failure=failures.append)
        try:
            address = server.sockets[0].getsockname()[:2]
            sock, raw = await asyncio.to_thread(raw_tls_client, pki, address)
            with sock:
                return await asyncio.to_thread(read_until_closed, sock, raw)
        finally:
            server.close()
            await server.wait_closed()

    plaintext = asyncio.run(scenario())
    assert b"attestation failed: timeout: timeout waiting for the client's evidence" in plaintext
    assert failures[0].check == "timeout"


def test_asyncio_open_channel_times_out_on_a_silent_server(
        pki: Pki, silent_listener: socket.socket) -> None:
    async def attempt() -> None:
        await open_channel(*silent_listener.getsockname()[:2],
                           config(pki, "client", timeout=SHORT))

    with pytest.raises(AttestationRejected) as caught:
        asyncio.run(attempt())
    assert caught.value.reason == "timeout waiting for the TLS handshake"


def test_validator_failures_never_leak_as_other_exceptions(pki: Pki) -> None:
    class Exploding(FakeValidator):
        def validate(self, evidence: bytes, nonce: bytes):  # type: ignore[no-untyped-def]
            raise ProtocolError("validator backend unavailable")

    server_config = config(pki, "server")
    broken = ChannelConfig(server_config.certificate, server_config.private_key,
                           [pki.ca.certificate], server_config.issuer, Exploding(KEY))
    with serve(LOCALHOST, 0, broken, echo_handler) as server, \
            pytest.raises(AttestationRejected) as caught:
        connect(*server.address, config(pki, "client"))
    assert caught.value.check == "validator" and caught.value.by_peer


# --- a server that answers and hangs up in one flight ---------------------------------------


def answer_and_hang_up(sock: socket.socket, core: TrustedPassagesConnection) -> None:
    """The server side by hand: once established, FINISHED, b"bye" and close_notify go
    out in one write, so the client reads them, and sees them, together."""
    sock.sendall(core.data_to_send())
    while not core.established:
        core.receive_data(sock.recv(65536))
        if not core.established:
            sock.sendall(core.data_to_send())
    core.send(b"bye")
    core.close()
    sock.sendall(core.data_to_send())


@pytest.fixture
def hang_up_server(pki: Pki) -> Iterator[socket.socket]:
    """The client's end of a socket pair whose server end answers and hangs up."""
    near, far = socket.socketpair()
    server = threading.Thread(target=answer_and_hang_up,
                              args=(far, config(pki, "server").connection("server")))
    server.start()
    yield near
    server.join(5)
    near.close()
    far.close()


def test_blocking_data_and_close_that_come_with_finished_are_both_seen(
        pki: Pki, hang_up_server: socket.socket) -> None:
    channel = establish(hang_up_server, config(pki, "client").connection("client"), 5.0)
    assert channel.recv(timeout=SHORT) == b"bye"
    assert channel.recv(timeout=SHORT) == b""  # the close_notify read with them


def test_asyncio_data_and_close_that_come_with_finished_are_both_seen(
        pki: Pki, hang_up_server: socket.socket) -> None:
    async def scenario() -> list[bytes]:
        reader, writer = await asyncio.open_connection(sock=hang_up_server)
        channel = await aio_establish(reader, writer,
                                      config(pki, "client").connection("client"), 5.0)
        try:
            return [await channel.recv(timeout=SHORT), await channel.recv(timeout=SHORT)]
        finally:
            writer.transport.abort()  # the fixture closes the socket

    assert asyncio.run(scenario()) == [b"bye", b""]
