"""``testbed tctp demo``: curl -> TRESOR client proxy -> nginx -> TCTP servers, on swtpm.

Three machines (:mod:`testbed.tctp.world`): ``service-a`` (known-good boot),
``service-b`` (the same service on a tampered kernel) and ``proxy``. nginx routes
``/service-a/`` and ``/service-b/`` to the two servers, each through a recording relay.
The demo shows: an attested request both ways through nginx, the reverse-proxy form,
a Cedar denial at the proxy, the tampered server refused with the check named, nginx
caching public content, and that neither nginx's access log nor the capture between
nginx and the servers holds the marker carried in the bodies.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from testbed.core.progress import Progress
from testbed.tctp.capture import RecordingRelay
from testbed.tctp.nginx import Nginx, NginxError, Route
from testbed.tctp.proxy import CedarAuthorizer, ClientProxy, serve_proxy, shipped_policy
from testbed.tctp.server import TctpService, serve_service
from testbed.tctp.world import PROXY_POLICY, SERVER_POLICY, World
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.tctp import Discovery, DiscoveryRule, InnerRequest, InnerResponse, TctpError

SERVICES: Final = ("service-a", "service-b")
# One document for every service behind the intermediary (seed 000's shape).
DISCOVERY: Final = Discovery((
    DiscoveryRule("/", None),
    DiscoveryRule("/(service-[a-z0-9]+)/static/.*", None),
    DiscoveryRule("/(service-[a-z0-9]+)/.*", r"/\1/halecs"),
))


def records(request: InnerRequest, peer: PeerEvidence) -> InnerResponse:
    """The demo service: patient records, the marker in every body."""
    document = {"path": request.target, "client": peer.node,
                "client_policy": peer.policy_name, "marker": marker(),
                "received": request.body.decode("utf-8", errors="replace")}
    return InnerResponse(200, "application/json", json.dumps(document).encode() + b"\n")


def marker() -> str:
    return f"MARKER-{os.getpid()}-patient-John-Doe-broken-leg"


@dataclass
class Step:
    name: str
    command: str
    status: int
    expected: int
    detail: str

    @property
    def ok(self) -> bool:
        return self.status == self.expected


@dataclass
class DemoResult:
    steps: list[Step] = field(default_factory=list)
    intermediary: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        seen = self.intermediary
        return (all(s.ok for s in self.steps) and seen.get("urls_in_access_log") is True
                and seen.get("urls_in_capture") is True and seen.get("marker_in_access_log")
                is False and seen.get("marker_in_capture") is False)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 2),
                "steps": [{**asdict(s), "ok": s.ok} for s in self.steps],
                "intermediary": self.intermediary}


def run_tctp_demo(progress: Progress | None = None) -> DemoResult:
    """The whole demo; every process it starts is stopped before it returns."""
    if shutil.which("curl") is None:
        raise NginxError("curl is not installed")
    progress = progress or Progress()
    progress.expect(4)
    started = time.monotonic()
    result = DemoResult()
    with ExitStack() as stack:
        with progress.step("three machines: swtpm, measured boot, AK registered"):
            world = stack.enter_context(World())
        with progress.step("TCTP servers, recording relays, nginx, the client proxy"):
            relays = {name: stack.enter_context(_serve(world, name)) for name in SERVICES}
            nginx = stack.enter_context(Nginx(world.root / "nginx", [
                Route(f"/{name}/", relays[name].port) for name in SERVICES],
                relays["service-a"].port))
            proxy = ClientProxy(nginx.url, lambda service: world.config(
                "proxy", peer=service, peer_policy=SERVER_POLICY),
                CedarAuthorizer(shipped_policy(), "proxy"))
            front = stack.enter_context(serve_proxy(proxy))
        with progress.step("curl through the proxy: attested, denied, refused, cached"):
            result.steps = _curl_steps(f"http://127.0.0.1:{front.port}", nginx.url)
        with progress.step("what nginx and the wire saw"):
            nginx.stop()
            result.intermediary = _intermediary_view(nginx, relays)
    result.seconds = time.monotonic() - started
    return result


@contextmanager
def _serve(world: World, name: str) -> Iterator[RecordingRelay]:
    service = TctpService(world.config(name, peer="proxy", peer_policy=PROXY_POLICY),
                          records, prefix=f"/{name}", static={"notice.txt": b"public\n"},
                          discovery=DISCOVERY)
    with serve_service(service) as thread, RecordingRelay(thread.port) as relay:
        yield relay


def _curl_steps(proxy: str, nginx: str) -> list[Step]:
    post = ["-x", proxy, "-H", "Content-Type: text/plain", "--data-binary",
            f"note: {marker()}", "http://service-a/service-a/records/7"]
    plan = [
        ("attested request (forward proxy, POST)", post, 200),
        ("attested request (reverse proxy, GET)", [f"{proxy}/service-a/records/8"], 200),
        ("authorization denial (Cedar forbid)", [f"{proxy}/service-a/admin/keys"], 403),
        ("tampered server behind the same nginx", [f"{proxy}/service-b/records/1"], 502),
        ("public content, first fetch (nginx)", [f"{nginx}/service-a/static/notice.txt"], 200),
        ("public content, second fetch (nginx cache)",
         [f"{nginx}/service-a/static/notice.txt"], 200),
    ]
    steps = []
    for name, args, expected in plan:
        status, headers, body = _curl(args)
        detail = (headers.get("x-tctp-server") or headers.get("x-cache") or body.strip())
        if name.startswith("public"):
            detail = f"X-Cache: {headers.get('x-cache', '?')}"
        elif status == 200:
            detail += "; " + _server_view(body)
        steps.append(Step(name, shlex.join(["curl", *args]), status, expected, detail[:300]))
    return steps


def _server_view(body: str) -> str:
    """What the server attested about its client, from the demo service's answer."""
    try:
        doc = json.loads(body)
        return f"the server attested {doc['client']!r} under {doc['client_policy']!r}"
    except (ValueError, KeyError, TypeError):
        return "unexpected answer"


def _curl(args: list[str]) -> tuple[int, dict[str, str], str]:
    try:
        done = subprocess.run(["curl", "-sS", "--max-time", "20", "-D", "-", *args],
                              capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        raise TctpError("curl did not finish within 30 s", 504) from None
    head, _, body = done.stdout.partition("\n\n")  # (text mode: CRLF read as LF)
    lines = head.split("\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return 0, {}, done.stderr.strip()
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    return status, headers, body


def _intermediary_view(nginx: Nginx, relays: dict[str, RecordingRelay]) -> dict[str, Any]:
    log = nginx.access_log.read_bytes()
    captured = b"".join(relay.captured() for relay in relays.values())
    secret = marker().encode()
    return {
        "access_log": str(nginx.access_log), "access_log_lines": log.count(b"\n"),
        "access_log_sample": [line.decode(errors="replace") for line in
                              log.splitlines() if b"records/7" in line][:2],
        "urls_in_access_log": b"/service-a/records/7" in log,
        "urls_in_capture": b"POST /service-a/records/7" in captured,
        "halec_urls_in_capture": captured.count(b"/halecs/"),
        "capture_bytes": len(captured),
        "marker_in_access_log": secret in log,
        "marker_in_capture": secret in captured,
    }


def render(result: DemoResult) -> str:
    lines = ["TCTP demo: curl -> client proxy -> nginx -> TCTP server (attested both ways)", ""]
    for step in result.steps:
        mark = "ok " if step.ok else "BAD"
        lines.append(f"  {mark} {step.status:3d}  {step.name}")
        lines.append(f"           {step.detail}")
    seen = result.intermediary
    lines += ["", "what the intermediary saw:",
              f"  nginx access log: {seen.get('access_log_lines')} lines; URLs there: "
              f"{seen.get('urls_in_access_log')}; body marker there: "
              f"{seen.get('marker_in_access_log')}",
              f"  capture nginx<->servers: {seen.get('capture_bytes')} bytes; request lines "
              f"there: {seen.get('urls_in_capture')}; body marker there: "
              f"{seen.get('marker_in_capture')}"]
    lines += [f"    {line}" for line in seen.get("access_log_sample", [])]
    lines += ["", f"{'as expected' if result.ok else 'NOT as expected'} "
                  f"({result.seconds:.1f} s)"]
    return "\n".join(lines)


def main_json(result: DemoResult) -> str:
    return json.dumps(result.to_dict(), indent=2)


__all__ = ["DemoResult", "main_json", "render", "run_tctp_demo"]
