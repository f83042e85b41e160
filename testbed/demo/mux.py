"""``testbed mux demo``: three applications share one attested session.

Two attack-lab machines (each its own swtpm, measured boot, registered AK) open one
Trusted Passages session; over it the client runs three applications as mux channels
(docs/multiplexing.md): ``chat`` (answers in upper case), ``files`` (sends 100 kB back
reversed: more than one window, so credit has to flow back) and ``metrics`` (counts
300 kB). An application the server does not offer is refused by name.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from testbed.attacks.lab import Lab
from testbed.core.progress import Progress
from trusted_passages.blocking import AttestedChannel, connect, serve
from trusted_passages.mux import MuxError, MuxSettings
from trusted_passages.mux_blocking import MuxChannel, MuxSession, serve_applications

__all__ = ["APPLICATIONS", "MuxDemoResult", "run_mux_demo"]

HOST = "127.0.0.1"
SESSION_TIMEOUT_S = 10.0


def upper(channel: MuxChannel) -> None:
    while data := channel.recv():
        channel.send(data.upper())


def reverse(channel: MuxChannel) -> None:
    received = b""
    while data := channel.recv():
        received += data
    channel.send(received[::-1])


def count(channel: MuxChannel) -> None:
    total = 0
    while data := channel.recv():
        total += len(data)
    channel.send(str(total).encode())


APPLICATIONS: dict[str, Callable[[MuxChannel], None]] = {
    "chat": upper, "files": reverse, "metrics": count}

_CHAT = b"hello over a shared session"
_FILE = b"0123456789" * 10_000
_METRICS = b"x" * 300_000
_EXPECTED = {"chat": _CHAT.upper(), "files": _FILE[::-1], "metrics": b"300000"}


@dataclass(frozen=True)
class MuxDemoResult:
    peer_node: str  # who the client's session attested
    peer_policy: str | None
    answers: dict[str, bytes]
    refused: str  # what the server said to an application it does not offer
    seconds: float

    @property
    def ok(self) -> bool:
        return self.answers == _EXPECTED and "telnet" in self.refused

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "peer_node": self.peer_node, "peer_policy": self.peer_policy,
                "applications": {name: {"answer_bytes": len(answer),
                                        "as_expected": answer == _EXPECTED[name]}
                                 for name, answer in self.answers.items()},
                "refused": self.refused, "seconds": round(self.seconds, 2)}


def run_mux_demo(progress: Progress) -> MuxDemoResult:
    with progress.step("two machines: swtpm, measured boot, AK registered"):
        lab = Lab().start()
    try:
        return _run(lab, progress)
    finally:
        lab.close()


def _run(lab: Lab, progress: Progress) -> MuxDemoResult:
    settings = MuxSettings(applications=frozenset(APPLICATIONS))
    finished = threading.Event()

    def handle(channel: AttestedChannel) -> None:
        with MuxSession(channel, settings) as session:
            for thread in serve_applications(session, APPLICATIONS, channels=3):
                thread.join(SESSION_TIMEOUT_S)
            finished.wait(SESSION_TIMEOUT_S)  # the client has read every answer

    server = serve(HOST, 0, lab.tp_config("server", peer="client"), handle)
    try:
        with progress.step("one attested session, three applications over it"):
            started = time.monotonic()
            config = lab.tp_config("client", peer="server")
            with connect(HOST, server.address[1], config) as channel, \
                    MuxSession(channel) as client:
                refused = _refused(client)
                answers = _exchange(client)
                finished.set()
                peer = client.peer
            seconds = time.monotonic() - started
    finally:
        finished.set()
        server.close(timeout=2)
    return MuxDemoResult(peer.node, peer.policy_name, answers, refused, seconds)


def _refused(client: MuxSession) -> str:
    try:
        client.open("telnet").close()
    except MuxError as exc:
        return str(exc)
    return "opened (unexpected)"


def _exchange(client: MuxSession) -> dict[str, bytes]:
    chat, files, metrics = (client.open(name) for name in APPLICATIONS)
    chat.send(_CHAT)
    answers = {"chat": chat.recv()}
    files.send(_FILE)
    metrics.send(_METRICS)
    for channel in (files, metrics, chat):
        channel.close()
    answers["files"] = b"".join(iter(files.recv, b""))
    answers["metrics"] = b"".join(iter(metrics.recv, b""))
    return answers
