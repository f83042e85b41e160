"""Multiplexing figures, each beside its baseline measured in the same run (not a test).

1. Opening 100 channels (open, one ping-pong, close) over one attested session, against
   100 attested handshakes (connect, one ping-pong, close).
2. Throughput of 3 busy channels over one attested session, against 3 attested sessions,
   each carrying the same bytes.

Real swtpm quotes on both sides (the attack lab's nodes: ECC AKs, measured boot, policies
with PCR values and events); the server runs on threads of this process, over loopback.

Run: .venv/bin/python bench/bench_mux.py [--channels 100] [--megabytes 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.attacks.lab import Lab
from trusted_passages import AttestedChannel, ChannelConfig, connect, serve
from trusted_passages.mux import MuxSettings
from trusted_passages.mux_blocking import MuxChannel, MuxSession

HOST = "127.0.0.1"
CHUNK = 64 * 1024


def _drain(recv: Callable[[], bytes]) -> int:
    total = 0
    while data := recv():
        total += len(data)
    return total


def _echo_once(channel: AttestedChannel | MuxChannel) -> None:
    channel.send(channel.recv())


def _sink(channel: AttestedChannel | MuxChannel) -> None:
    channel.send(str(_drain(channel.recv)).encode())


def _mux_server(handler: Callable[[MuxChannel], None], settings: MuxSettings
                ) -> Callable[[AttestedChannel], None]:
    def serve_session(channel: AttestedChannel) -> None:
        with MuxSession(channel, settings) as session:
            threads = []
            while True:
                try:
                    mux = session.accept(timeout=30)
                except Exception:  # the client closed the session
                    break
                thread = threading.Thread(target=_run_closing, args=(handler, mux))
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join()
    return serve_session


def _run_closing(handler: Callable[[MuxChannel], None], channel: MuxChannel) -> None:
    with channel:
        handler(channel)


def _send_all(channel: AttestedChannel | MuxChannel, size: int) -> None:
    block = bytes(CHUNK)
    for _ in range(size // CHUNK):
        channel.send(block)


def open_handshakes(port: int, config: ChannelConfig, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        with connect(HOST, port, config) as channel:
            channel.send(b"ping")
            channel.recv()
    return time.perf_counter() - start


def open_channels(port: int, config: ChannelConfig, n: int) -> float:
    start = time.perf_counter()
    with MuxSession(connect(HOST, port, config)) as session:
        for _ in range(n):
            with session.open("echo") as channel:
                channel.send(b"ping")
                channel.recv()
    return time.perf_counter() - start


def three_sessions(port: int, config: ChannelConfig, size: int) -> float:
    channels = [connect(HOST, port, config) for _ in range(3)]
    return _stream(channels, size)


def three_channels(port: int, config: ChannelConfig, size: int) -> float:
    with MuxSession(connect(HOST, port, config)) as session:
        channels = [session.open("sink") for _ in range(3)]
        return _stream(channels, size)


def _stream(channels: list[AttestedChannel] | list[MuxChannel], size: int) -> float:
    """Seconds for every channel to carry ``size`` bytes at once (after setup)."""
    done: list[bytes] = []

    def run(channel: AttestedChannel | MuxChannel) -> None:
        _send_all(channel, size)
        if isinstance(channel, MuxChannel):
            channel.close()
            done.append(channel.recv())
        else:  # a plain attested channel has no half-close: the sink counts to size
            done.append(channel.recv())
            channel.close()

    threads = [threading.Thread(target=run, args=(c,)) for c in channels]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    assert done == [str(size).encode()] * 3, done
    return elapsed


def _counting_sink(size: int) -> Callable[[AttestedChannel], None]:
    def sink(channel: AttestedChannel) -> None:
        total = 0
        while total < size:
            total += len(channel.recv())
        channel.send(str(total).encode())
    return sink


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--channels", type=int, default=100)
    parser.add_argument("--megabytes", type=int, default=16, help="per channel, figure 2")
    parser.add_argument("--out", type=Path, help="also write the figures here (markdown)")
    args = parser.parse_args()
    size = args.megabytes * 1024 * 1024
    settings = MuxSettings(applications=frozenset({"echo", "sink"}))
    with Lab() as lab:
        server_cfg = lab.tp_config("server", peer="client")
        client_cfg = lab.tp_config("client", peer="server")
        handlers = {"echo": _echo_once, "sink": _sink}
        with serve(HOST, 0, server_cfg, _echo_once) as plain, \
                serve(HOST, 0, server_cfg, _mux_server(
                    lambda c: handlers[c.application](c), settings)) as muxed, \
                serve(HOST, 0, server_cfg, _counting_sink(size)) as sinks:
            open_handshakes(plain.address[1], client_cfg, 2)  # warm-up
            handshakes = open_handshakes(plain.address[1], client_cfg, args.channels)
            channels = open_channels(muxed.address[1], client_cfg, args.channels)
            sessions = three_sessions(sinks.address[1], client_cfg, size)
            muxed_3 = three_channels(muxed.address[1], client_cfg, size)
    total_mb = 3 * size / 1e6
    lines = [
        f"{args.channels} channels, each: open, one 4-byte ping-pong, close "
        "(real swtpm quotes, loopback, 2 cores)",
        f"  {args.channels} attested handshakes           {handshakes:7.3f} s   "
        f"{handshakes / args.channels * 1000:7.2f} ms each",
        f"  1 attested handshake + {args.channels} mux channels {channels:7.3f} s   "
        f"{channels / args.channels * 1000:7.2f} ms each   "
        f"({handshakes / channels:.1f}x faster)",
        f"3 busy channels, {args.megabytes} MiB each, sent at once",
        f"  3 attested sessions                {sessions:7.3f} s   "
        f"{total_mb / sessions:7.1f} MB/s",
        f"  3 mux channels over 1 session      {muxed_3:7.3f} s   "
        f"{total_mb / muxed_3:7.1f} MB/s   ({sessions / muxed_3:.2f}x the sessions' rate)",
    ]
    print("\n".join(lines))
    if args.out:
        args.out.write_text("# Mux figures (bench/bench_mux.py)\n\n```\n" + "\n".join(lines)
                            + "\n```\n")


if __name__ == "__main__":
    main()
