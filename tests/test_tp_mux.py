"""TLS multiplexing over one attested session: the sans-IO core (open/close, credit,
round robin, every peer violation named), its frame parser under hypothesis, and the
blocking and asyncio adapters over real attested channels on real sockets (fake
attester; tests/test_tp_sign.py runs channels with real swtpm quotes)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.demo.mux import APPLICATIONS
from tests.test_tp_protocol import KEY
from trusted_passages import ChannelConfig, FakeIssuer, FakeValidator
from trusted_passages.aio import AsyncAttestedChannel
from trusted_passages.aio import establish as aio_establish
from trusted_passages.blocking import AttestedChannel, establish
from trusted_passages.errors import ProtocolError
from trusted_passages.mux import (
    HEADER,
    HELLO,
    VERSION,
    WINDOW,
    ChannelAccepted,
    ChannelData,
    ChannelEnded,
    ChannelOpened,
    ChannelRefused,
    FrameType,
    MuxConnection,
    MuxError,
    MuxEvent,
    MuxSettings,
    SessionEnded,
    encode_frame,
)
from trusted_passages.mux_aio import AsyncMuxSession
from trusted_passages.mux_blocking import MuxSession, serve_applications
from trusted_passages.pki import generate_key, issue_certificate, make_ca

SMALL = MuxSettings(max_channels=4, max_frame=1024, initial_window=4096)


# --- two cores wired back to back ---------------------------------------------------------


class Pair:
    """A client and a server core; ``pump`` carries bytes both ways until quiet."""

    def __init__(self, client: MuxSettings = SMALL, server: MuxSettings = SMALL) -> None:
        self.client = MuxConnection(True, client)
        self.server = MuxConnection(False, server)
        self.events: dict[str, list[MuxEvent]] = {"client": [], "server": []}
        self.pump()

    def pump(self, limit: int = 1 << 18) -> None:
        while self.client.wants_write or self.server.wants_write:
            self.events["server"] += self.server.receive_data(self.client.data_to_send(limit))
            self.events["client"] += self.client.receive_data(self.server.data_to_send(limit))

    def data(self, side: str, channel: int) -> bytes:
        return b"".join(e.data for e in self.events[side]
                        if isinstance(e, ChannelData) and e.channel == channel)


def test_open_send_close_both_ways() -> None:
    pair = Pair()
    channel = pair.client.open("chat")
    pair.pump()
    assert ChannelOpened(channel, "chat") in pair.events["server"]
    assert ChannelAccepted(channel) in pair.events["client"]
    pair.client.send(channel, b"hello")
    pair.server.send(channel, b"welcome")
    pair.client.close(channel)
    pair.pump()
    assert pair.data("server", channel) == b"hello"
    assert pair.data("client", channel) == b"welcome"
    assert ChannelEnded(channel) in pair.events["server"]
    with pytest.raises(ProtocolError, match="closed for sending"):
        pair.client.send(channel, b"more")
    pair.server.close(channel)
    pair.pump()
    assert pair.client.open_channels == pair.server.open_channels == 0


def test_ids_never_collide_and_unknown_applications_are_refused() -> None:
    pair = Pair(server=MuxSettings(applications=frozenset({"chat"})))
    ours, theirs = pair.client.open("chat"), pair.server.open("files")
    refused = pair.client.open("telnet")
    pair.pump()
    assert (ours % 2, theirs % 2) == (1, 0)
    assert ChannelRefused(refused, "no application 'telnet'") in pair.events["client"]
    assert pair.client.open_channels == 2


def test_flow_control_stops_at_the_window_and_credit_resumes() -> None:
    pair = Pair()
    channel = pair.client.open("bulk")
    pair.pump()
    pair.client.send(channel, bytes(10_000))
    pair.pump()
    assert len(pair.data("server", channel)) == SMALL.initial_window  # the rest waits
    assert pair.client.pending(channel) == 10_000 - SMALL.initial_window
    pair.server.consumed(channel, SMALL.initial_window)  # the application read it all
    pair.pump()
    assert len(pair.data("server", channel)) == 8192


def test_round_robin_a_busy_channel_does_not_starve_the_others() -> None:
    big = MuxSettings(max_frame=1024, initial_window=1 << 20)
    pair = Pair(big, big)
    busy, quiet = pair.client.open("bulk"), pair.client.open("chat")
    pair.pump()
    pair.client.send(busy, bytes(500_000))
    pair.client.send(quiet, b"ping")
    first = pair.client.data_to_send(limit=4096)  # a few frames' worth
    events = pair.server.receive_data(first)
    assert ChannelData(quiet, b"ping") in events  # second frame out, not after 500 kB


# --- violations: each named, GOAWAY to the peer -------------------------------------------


def frame(kind: FrameType, channel: int, payload: bytes = b"") -> bytes:
    return encode_frame(kind, channel, payload)


def ready_server() -> MuxConnection:
    server = MuxConnection(False, SMALL)
    server.data_to_send()
    server.receive_data(frame(FrameType.HELLO, 0, HELLO.pack(VERSION, 4, 1024, 4096)))
    return server


def opened(server: MuxConnection, channel: int = 1) -> MuxConnection:
    server.receive_data(frame(FrameType.OPEN, channel, WINDOW.pack(4096) + b"app"))
    server.data_to_send()
    return server


@pytest.mark.parametrize(("wire", "code"), [
    (frame(FrameType.DATA, 7, b"x"), "unknown_channel"),
    (frame(FrameType.CREDIT, 9, WINDOW.pack(1)), "unknown_channel"),
    (frame(FrameType.DATA, 1, bytes(1024)) * 5, "window_overrun"),
    (HEADER.pack(FrameType.DATA, 1, 1025), "oversized_frame"),
    (frame(FrameType.CLOSE, 1) + frame(FrameType.DATA, 1, b"x"), "data_after_close"),
    (b"".join(frame(FrameType.OPEN, c, WINDOW.pack(1) + b"a") for c in (3, 5, 7, 9)),
     "too_many_channels"),
    (frame(FrameType.OPEN, 2, WINDOW.pack(1) + b"a"), "bad_channel_id"),
    (frame(FrameType.OPEN, 1, WINDOW.pack(1) + b"a"), "bad_channel_id"),
    (HEADER.pack(99, 1, 0), "malformed_frame"),
    (frame(FrameType.HELLO, 0, HELLO.pack(VERSION, 4, 1024, 4096)), "protocol"),
    (frame(FrameType.OPEN, 3, WINDOW.pack(0) + b"a"), "malformed_frame"),
    (frame(FrameType.OPEN, 3, WINDOW.pack(1) + b"\xff"), "malformed_frame"),
])
def test_every_violation_is_one_named_error_and_a_goaway(wire: bytes, code: str) -> None:
    server = opened(ready_server())
    with pytest.raises(MuxError) as caught:
        server.receive_data(wire)
    assert caught.value.code == code and not caught.value.by_peer
    goaway = server.data_to_send()
    assert goaway[0] == FrameType.GOAWAY and code.encode() in goaway
    with pytest.raises(MuxError):  # dead for good
        server.send(1, b"late")
    client = MuxConnection(True, SMALL)
    with pytest.raises(MuxError) as told:
        client.receive_data(frame(FrameType.HELLO, 0, HELLO.pack(VERSION, 4, 1024, 4096))
                            + goaway)
    assert told.value.by_peer and told.value.code == code


def test_frames_before_hello_and_a_truncated_end_are_violations() -> None:
    with pytest.raises(MuxError, match="protocol: OPEN before HELLO"):
        MuxConnection(False).receive_data(frame(FrameType.OPEN, 1, WINDOW.pack(1) + b"a"))
    server = ready_server()
    server.receive_data(frame(FrameType.OPEN, 1, WINDOW.pack(1) + b"a")[:-1])
    with pytest.raises(MuxError) as caught:
        server.receive_data(b"")
    assert caught.value.code == "truncated_frame"
    assert ready_server().receive_data(b"") == [SessionEnded()]


# --- hypothesis: the parser's only failure is MuxError ----------------------------------


def valid_stream() -> bytes:
    return (frame(FrameType.HELLO, 0, HELLO.pack(VERSION, 4, 1024, 4096))
            + frame(FrameType.OPEN, 1, WINDOW.pack(4096) + b"chat")
            + frame(FrameType.DATA, 1, b"hello")
            + frame(FrameType.CREDIT, 2, WINDOW.pack(10))
            + frame(FrameType.CLOSE, 1))


def feed_all(chunks: list[bytes]) -> None:
    server = MuxConnection(False, SMALL)
    server.open  # noqa: B018 - the core exists before any byte arrives
    try:
        for chunk in chunks:
            if chunk:  # b"" is the end of the stream, fed last
                server.receive_data(chunk)
        server.receive_data(b"")
    except MuxError as exc:
        assert exc.code and exc.reason
        if not exc.by_peer:  # its own finding is told to the peer; a peer's GOAWAY is not echoed
            assert server.data_to_send().count(bytes([FrameType.GOAWAY])) >= 1


@given(st.lists(st.binary(min_size=1, max_size=2000), max_size=8))
def test_random_bytes_fail_only_with_mux_error(chunks: list[bytes]) -> None:
    feed_all(chunks)


@given(st.integers(0, 200), st.integers(0, 255), st.data())
def test_mutated_and_truncated_streams_fail_only_with_mux_error(
        position: int, value: int, data: st.DataObject) -> None:
    wire = bytearray(valid_stream())
    wire[position % len(wire)] = value
    cut = data.draw(st.integers(0, len(wire)))
    split = data.draw(st.integers(0, cut))
    feed_all([bytes(wire[:split]), bytes(wire[split:cut])])


@given(st.integers(1025, 0xFFFF))
def test_oversized_lengths_are_refused_from_the_header_alone(length: int) -> None:
    server = ready_server()
    with pytest.raises(MuxError, match="oversized_frame"):
        server.receive_data(HEADER.pack(FrameType.DATA, 1, length))


# --- adapters over real attested channels -------------------------------------------------


def channel_config(node: str) -> ChannelConfig:
    ca = _CA
    key = generate_key()
    return ChannelConfig(issue_certificate(ca, node, key), key, [ca.certificate],
                         FakeIssuer(KEY, node), FakeValidator(KEY), timeout=5)


_CA = make_ca("tp-mux-ca")


@pytest.fixture
def attested_pair() -> Iterator[tuple[AttestedChannel, AttestedChannel]]:
    """Two ends of one established attested channel over a real socket pair."""
    client_sock, server_sock = socket.socketpair()
    ends: dict[str, AttestedChannel] = {}

    def run(name: str, sock: socket.socket, role: str) -> None:
        ends[name] = establish(sock, channel_config(name).connection(role), 5)  # type: ignore[arg-type]

    server = threading.Thread(target=run, args=("server", server_sock, "server"))
    server.start()
    run("client", client_sock, "client")
    server.join(5)
    yield ends["client"], ends["server"]
    for end in ends.values():
        end.close()


DEMO_APPLICATIONS = APPLICATIONS  # chat, files, metrics: the `testbed mux demo`'s


def demo_three_applications(client: MuxSession, server: MuxSession) -> dict[str, bytes]:
    """Three applications share one attested session (docs/multiplexing.md)."""
    served = threading.Thread(target=serve_applications,
                              args=(server, DEMO_APPLICATIONS), kwargs={"channels": 3})
    served.start()
    chat, files, metrics = (client.open(name) for name in ("chat", "files", "metrics"))
    answers = {}
    chat.send(b"hello over a shared session")
    answers["chat"] = chat.recv()
    files.send(b"0123456789" * 10_000)  # bigger than one window: credit flows back
    metrics.send(b"x" * 300_000)
    for channel in (files, metrics, chat):
        channel.close()
    answers["files"] = b"".join(iter(files.recv, b""))
    answers["metrics"] = b"".join(iter(metrics.recv, b""))
    served.join(5)
    return answers


def test_three_applications_share_one_attested_session(
        attested_pair: tuple[AttestedChannel, AttestedChannel]) -> None:
    client_end, server_end = attested_pair
    settings = MuxSettings(applications=frozenset(DEMO_APPLICATIONS))
    opened_server: list[MuxSession] = []
    starter = threading.Thread(target=lambda: opened_server.append(
        MuxSession(server_end, settings)))
    starter.start()
    with MuxSession(client_end) as client:
        starter.join(5)
        with opened_server[0] as server:
            answers = demo_three_applications(client, server)
            assert answers == {"chat": b"HELLO OVER A SHARED SESSION",
                               "files": (b"0123456789" * 10_000)[::-1],
                               "metrics": b"300000"}
            assert client.peer.node == "server" and server.peer.node == "client"
            with pytest.raises(MuxError, match="refused: 'telnet'"):
                client.open("telnet")


def test_a_misbehaving_peer_ends_the_session_with_the_named_error(
        attested_pair: tuple[AttestedChannel, AttestedChannel]) -> None:
    client_end, server_end = attested_pair
    hello = frame(FrameType.HELLO, 0, HELLO.pack(VERSION, 4, 1024, 4096))
    server_end.send(hello)
    session = MuxSession(client_end)
    server_end.send(frame(FrameType.DATA, 41, b"stray"))  # a hostile mux peer
    with pytest.raises(MuxError) as caught:
        session.accept(timeout=2)
    assert caught.value.code == "unknown_channel" and session.failure is caught.value
    told = b""  # what the hostile peer was told
    while b"unknown_channel" not in told:
        told += server_end.recv(2)
    assert bytes([FrameType.GOAWAY]) + b"\x00\x00" in told
    session.close()


def test_asyncio_sessions_carry_channels_both_ways() -> None:
    async def scenario() -> tuple[bytes, bytes]:
        client_sock, server_sock = socket.socketpair()
        ends = await asyncio.gather(
            _aio_end(client_sock, "client"), _aio_end(server_sock, "server"))
        client, server = await asyncio.gather(AsyncMuxSession.start(ends[0]),
                                              AsyncMuxSession.start(ends[1]))
        async with client, server:
            opened = await client.open("echo")
            accepted = await server.accept()
            await opened.send(b"x" * 200_000)
            await opened.close()
            got = b""
            while data := await accepted.recv():
                got += data
            back = await server.open("reply")
            await back.send(b"done")
            await back.close()
            reply = await (await client.accept()).recv()
        return got, reply

    got, reply = asyncio.run(scenario())
    assert got == b"x" * 200_000 and reply == b"done"


async def _aio_end(sock: socket.socket, role: str) -> AsyncAttestedChannel:
    reader, writer = await asyncio.open_connection(sock=sock)
    return await aio_establish(reader, writer, channel_config(role).connection(role), 5)  # type: ignore[arg-type]


def test_the_mux_demo_runs_three_applications_over_one_attested_session() -> None:
    """`testbed mux demo`: the same three applications between two swtpm machines."""
    result = subprocess.run([sys.executable, "-m", "testbed", "mux", "demo", "--json"],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["peer_node"] == "server"
    assert all(a["as_expected"] for a in report["applications"].values())
    assert "telnet" in report["refused"]
