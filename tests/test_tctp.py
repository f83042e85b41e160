"""TCTP (docs/tctp.md): HALECs over real HTTP.

The sans-IO core with fake evidence; the aiohttp server and client over loopback; hostile
bodies and discovery documents (hypothesis); nginx as a real intermediary with a
recording relay behind it; the TRESOR proxy with Cedar, driven by curl; and the demo end
to end on swtpm.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation.errors import PolicyError
from attestation.report import CheckResult, VerificationReport
from testbed.tctp.capture import RecordingRelay
from testbed.tctp.client import TctpClient
from testbed.tctp.nginx import Nginx, Route
from testbed.tctp.proxy import CedarAuthorizer, ClientProxy, serve_proxy, shipped_policy
from testbed.tctp.server import ServerThread, TctpService, serve_service
from trusted_passages import AttestationRejected, ChannelConfig, FakeIssuer, FakeValidator
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.pki import generate_key, issue_certificate, make_ca
from trusted_passages.tctp import (
    Discovery,
    HalecClient,
    HalecTable,
    InnerRequest,
    InnerResponse,
    Limits,
    TctpError,
    decode_request,
    encode_body,
    encode_request,
    handshake_in_memory,
    parse_body,
    parse_discovery,
)

KEY = b"k" * 32
CA = make_ca("tctp test CA")
MARKER = b"MARKER-c0ffee-confidential"


def config(name: str, peer: str, state: str = "good") -> ChannelConfig:
    key = generate_key()
    return ChannelConfig(issue_certificate(CA, name, key), key, [CA.certificate],
                         FakeIssuer(KEY, name, state=state), FakeValidator(KEY),
                         expected_peer=peer, timeout=5.0)


def echo(request: InnerRequest, peer: PeerEvidence) -> InnerResponse:
    return InnerResponse(200, "text/plain", b"to " + peer.node.encode() + b": " + request.body)


def pair(server_state: str = "good") -> tuple[HalecTable, HalecClient]:
    server = config("server", "client", server_state)
    table = HalecTable(lambda: server.connection("server"), "/svc")
    return table, HalecClient(config("client", "server").connection("client"), "/svc/halecs")


# --- the sans-IO core --------------------------------------------------------------------


def test_halec_handshake_attests_both_ends_then_carries_bodies() -> None:
    table, client = pair()
    handshake_in_memory(table, client)
    assert client.established and client.peer is not None and client.peer.node == "server"
    sealed = client.seal_request(InnerRequest("POST", "/svc/a?b=1", "text/plain", MARKER))
    assert MARKER not in sealed
    halec, inner = table.open_request(sealed, "POST", "/svc/a?b=1")
    assert inner.body == MARKER and halec.peer is not None and halec.peer.node == "client"
    answer = table.seal_response(halec, InnerResponse(200, "text/plain", MARKER))
    assert MARKER not in answer
    assert client.open_response(200, answer).body == MARKER


def test_tampered_server_is_refused_with_the_check_named() -> None:
    table, client = pair(server_state="tampered")
    with pytest.raises(AttestationRejected) as caught:
        handshake_in_memory(table, client)
    assert caught.value.check == "policy" and not caught.value.by_peer


def test_altered_replayed_or_moved_bodies_are_refused() -> None:
    for alter in ("flip", "replay", "move", "truncate"):
        table, client = pair()
        handshake_in_memory(table, client)
        first = client.seal_request(InnerRequest("POST", "/svc/a", None, MARKER))
        if alter == "replay":
            table.open_request(first, "POST", "/svc/a")
        body = bytearray(first)
        if alter == "flip":
            body[-3] ^= 1
        if alter == "truncate":
            url, records = parse_body(first)
            body = bytearray(encode_body(url, records[:-(len(records) // 2)]))
        target = "/svc/other" if alter == "move" else "/svc/a"
        with pytest.raises(TctpError) as caught:
            table.open_request(bytes(body), "POST", target)
        assert caught.value.status in (400, 403), alter
        assert len(table) == 0 or alter == "truncate"  # the HALEC is dropped: fail closed


def test_status_altered_in_transit_is_detected() -> None:
    table, client = pair()
    handshake_in_memory(table, client)
    halec, _ = table.open_request(client.seal_request(InnerRequest("GET", "/svc/x", None, b"")),
                                  "GET", "/svc/x")
    answer = table.seal_response(halec, InnerResponse(403, None, b"denied"))
    with pytest.raises(TctpError, match="altered"):
        client.open_response(200, answer)


def test_table_bounds_count_and_expires_idle_halecs() -> None:
    now = [0.0]
    server = config("server", "client")
    table = HalecTable(lambda: server.connection("server"), limits=Limits(max_halecs=2,
                       step_timeout=5, idle_timeout=50), clock=lambda: now[0])
    for _ in range(2):
        table.create(HalecClient(config("client", "server").connection("client"),
                                 "/halecs").first_flight())
    with pytest.raises(TctpError) as caught:
        table.create(HalecClient(config("client", "server").connection("client"),
                                 "/halecs").first_flight())
    assert caught.value.status == 503
    now[0] = 6.0  # past the per-step deadline: unfinished handshakes go
    table.create(HalecClient(config("client", "server").connection("client"),
                             "/halecs").first_flight())
    assert len(table) == 1


def test_discovery_maps_paths_to_creation_urls() -> None:
    doc = parse_discovery(b"/:\n/(service-[a-z]+)/static/.*:\n/(service-[a-z]+)/.*:/\\1/halecs\n")
    assert doc.creation_url("/service-a/records/1") == "/service-a/halecs"
    assert doc.creation_url("/service-b/static/logo") is None
    assert doc.creation_url("/") is None
    with pytest.raises(TctpError):
        doc.creation_url("/elsewhere")
    assert parse_discovery(doc.render()) == doc


@pytest.mark.parametrize("doc", [b"", b"no colon\n", b"relative:/halecs\n", b"/(a+)+:\n",
                                 b"/.*.*.*:\n", b"/[:\n", b"/x:/not-halecs\n",
                                 b"/\xff:\n", b"/x:\n" * 65, b"/" + b"a" * 300 + b":\n"])
def test_hostile_discovery_documents_are_refused(doc: bytes) -> None:
    with pytest.raises(TctpError):
        parse_discovery(doc)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_discovery_parser_answers_any_bytes_with_a_document_or_tctp_error(data: bytes) -> None:
    try:
        doc = parse_discovery(data)
    except TctpError:
        return
    doc.creation_url("/" + "a" * 100)  # patterns stay cheap on a long path
    assert isinstance(doc, Discovery)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_body_parser_answers_any_bytes_with_records_or_tctp_error(data: bytes) -> None:
    for candidate in (data, b"/halecs/" + b"A" * 22 + b"\r\n" + data):
        try:
            url, records = parse_body(candidate)
        except TctpError as exc:
            assert 400 <= exc.status < 500
            continue
        assert url.startswith("/") and records


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_inner_request_decoder_answers_any_bytes_cleanly(data: bytes) -> None:
    with contextlib.suppress(TctpError):
        decode_request(data)
    request = InnerRequest("PUT", "/x?y", "a/b", data)
    assert decode_request(encode_request(request)) == request


# --- over real HTTP ------------------------------------------------------------------


@dataclass
class Served:
    service: TctpService
    thread: ServerThread

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.thread.port}"


@pytest.fixture
def served() -> Iterator[Served]:
    service = TctpService(config("server", "client"), echo, prefix="/svc",
                          static={"logo.txt": b"public"})
    with serve_service(service) as thread:
        yield Served(service, thread)


def client_for(served: Served, **kwargs: object) -> TctpClient:
    return TctpClient(served.url, lambda _creation: config("client", "server"),
                      **kwargs)  # type: ignore[arg-type]


def test_http_round_trips_with_several_halecs_across_connections(served: Served) -> None:
    async def run() -> None:
        async with client_for(served, max_halecs=3) as client:
            replies = await asyncio.gather(*(client.request("POST", f"/svc/r/{i}", MARKER)
                                             for i in range(9)))
            assert all(r.status == 200 and r.body == b"to client: " + MARKER for r in replies)
            assert client.halecs_created == 3 and len(served.service.table) == 3
            await client.close()  # new TCP connections; the HALECs persist on the server
            again = await client.request("GET", "/svc/r/again")
            assert again.status == 200 and client.halecs_created == 3
    asyncio.run(run())


def test_http_discovery_and_plaintext_is_refused_unless_allowed(served: Served) -> None:
    async def run() -> None:
        async with client_for(served) as client:
            with pytest.raises(TctpError, match="in clear"):
                await client.request("GET", "/svc/static/logo.txt")
        async with client_for(served, plaintext_ok=lambda p: "/static/" in p) as client:
            assert (await client.request("GET", "/svc/static/logo.txt")).body == b"public"
    asyncio.run(run())


@pytest.mark.parametrize(("path", "headers", "body", "status"), [
    ("/svc/x", {}, b"plain", 400),
    ("/svc/x", {"Content-Encoding": "encrypted"}, b"garbage", 400),
    ("/svc/x", {"Content-Encoding": "encrypted"}, b"/svc/halecs/" + b"A" * 22
     + b"\r\n\x17\x03\x03\x00\x05hello", 410),
    ("/svc/x", {"Content-Encoding": "encrypted"}, b"/halecs/x\r\n\x17\x03\x03\x40", 400),
    ("/svc/halecs", {}, b"\x16\x03\x01\x00\x02hi", 400),
    ("/svc/halecs", {}, b"\x15\x03\x03\x00\x02\x02\x28", 403),
    ("/svc/halecs", {}, b"not tls", 400),
    ("/svc/halecs", {}, b"\x16" * (1 << 21), 413),
    ("/svc/halecs/" + "B" * 22, {}, b"\x16\x03\x03\x00\x01x", 410),
])
def test_hostile_http_requests_get_one_clear_status(served: Served, path: str,
                                                    headers: dict[str, str], body: bytes,
                                                    status: int) -> None:
    async def run() -> tuple[int, str]:
        async with client_for(served) as client, \
                client.session.post(served.url + path, data=body, headers=headers) as answer:
            return answer.status, await answer.text()
    got, text = asyncio.run(run())
    assert got == status, text
    assert "Traceback" not in text and len(text) < 2000


# --- nginx in between, and a capture between nginx and the server ---------------------


def _require(tool: str, *paths: str) -> None:
    """A missing tool fails the test loudly: .ci/bootstrap installs nginx and curl."""
    if shutil.which(tool) is None and not any(Path(p).exists() for p in paths):
        pytest.fail(f"{tool} is not installed: run .ci/bootstrap (it installs it)",
                    pytrace=False)


def test_nginx_routes_and_caches_but_sees_no_body(served: Served, tmp_path: Path) -> None:
    _require("nginx", "/usr/sbin/nginx")
    with RecordingRelay(served.thread.port) as relay, \
            Nginx(tmp_path / "nginx", [Route("/svc/", relay.port)], relay.port) as nginx:
        async def run() -> list[str]:
            async with TctpClient(nginx.url, lambda _c: config("client", "server"),
                                  plaintext_ok=lambda p: "/static/" in p) as client:
                for i in range(3):
                    reply = await client.request("POST", f"/svc/records/{i}", MARKER)
                    assert reply.body == b"to client: " + MARKER
                caches = []
                for _ in range(2):
                    async with client.session.get(nginx.url + "/svc/static/logo.txt") as got:
                        caches.append(got.headers.get("X-Cache", ""))
                return caches
        caches = asyncio.run(run())
        nginx.stop()
        log = nginx.access_log.read_bytes()
        captured = relay.captured()
    assert caches == ["MISS", "HIT"]  # public content cached, TCTP answers never
    assert b"POST /svc/records/2 HTTP/1.1" in log and b'ce="encrypted"' in log
    assert b"OPTIONS * HTTP/1.1\" 400" in log  # nginx refuses the asterisk form itself
    assert b"POST /svc/records/1 HTTP/1.1" in captured and b"/svc/halecs/" in captured
    assert MARKER not in log and MARKER not in captured


# --- the TRESOR proxy: curl in, TCTP out, Cedar in between ---------------------------

FAKE_POLICY = """
permit (principal, action in [Action::"GET", Action::"POST"], resource)
when { context.server.node == context.service && context.server.policy == "fake" };
forbid (principal, action, resource) when { context.path like "*/admin/*" };
"""


def curl(*args: str) -> tuple[int, str]:
    done = subprocess.run(["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", *args],
                          capture_output=True, text=True, timeout=20, check=False)
    body, _, code = done.stdout.rpartition("\n")
    return int(code or 0), body


def test_curl_through_the_proxy_with_cedar_authorization(tmp_path: Path) -> None:
    _require("curl")
    good = TctpService(config("service-a", "proxy"), echo, prefix="/service-a")
    bad = TctpService(config("service-b", "proxy", state="tampered"), echo, prefix="/service-b")
    policy = tmp_path / "proxy.cedar"
    policy.write_text(FAKE_POLICY)
    authorizer = CedarAuthorizer.from_files([policy], "proxy")
    with serve_service(good) as a, serve_service(bad) as b:
        # Each proxy reaches one service directly here; nginx routes both in the demo.
        proxy = ClientProxy(f"http://127.0.0.1:{a.port}",
                            lambda service: config("proxy", service), authorizer)
        with serve_proxy(proxy) as front:
            port = str(front.port)
            ok = curl("-x", f"http://127.0.0.1:{port}", "--data-binary", "hello",
                      "http://service-a/service-a/records/1")
            reverse = curl(f"http://127.0.0.1:{port}/service-a/records/2")
            denied = curl(f"http://127.0.0.1:{port}/service-a/admin/keys")
        proxy_b = ClientProxy(f"http://127.0.0.1:{b.port}",
                              lambda service: config("proxy", service), authorizer)
        with serve_proxy(proxy_b) as front_b:
            refused = curl(f"http://127.0.0.1:{front_b.port}/service-b/records/1")
    assert ok == (200, "to proxy: hello")
    assert reverse[0] == 200
    assert denied[0] == 403 and "denied by policy" in denied[1]
    assert refused[0] == 502 and "policy" in refused[1]
    assert len(bad.table.refusals) == 0  # the proxy refused the server, not vice versa


def test_cedar_policies_that_do_not_parse_fail_at_start(tmp_path: Path) -> None:
    broken = tmp_path / "broken.cedar"
    broken.write_text("permit (principal, action, resource) when { nonsense ")
    with pytest.raises(PolicyError):
        CedarAuthorizer.from_files([broken], "proxy")
    binary = tmp_path / "binary.cedar"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(PolicyError):
        CedarAuthorizer.from_files([binary], "proxy")


def test_shipped_policy_permits_only_known_good_registered_servers() -> None:
    authorizer = CedarAuthorizer(shipped_policy(), "proxy")
    peer = PeerEvidence("service-a", "server", "tp13", b"", _report(), None,
                        "tctp-server-known-good", True)
    read = InnerRequest("GET", "/service-a/records/1", None, b"")
    assert authorizer.decide(read, peer).allowed
    assert not authorizer.decide(InnerRequest("GET", "/service-a/admin/x", None, b""),
                                 peer).allowed
    for other in (replace(peer, node_verified=False), replace(peer, node="service-b"),
                  replace(peer, policy_name="fake")):
        assert not authorizer.decide(read, other).allowed


def _report() -> VerificationReport:
    return VerificationReport((CheckResult("fake", "passed", "test"),))


# --- the demo end to end: swtpm, nginx, curl, the CLI --------------------------------


@pytest.mark.slow
def test_tctp_demo_cli_end_to_end_on_swtpm() -> None:
    _require("nginx", "/usr/sbin/nginx")
    done = subprocess.run([sys.executable, "-m", "testbed", "tctp", "demo", "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    steps = {step["name"]: step for step in result["steps"]}
    assert all(step["ok"] for step in steps.values())
    assert "registered=true" in steps["attested request (forward proxy, POST)"]["detail"]
    assert "'tctp-proxy-known-good'" in steps["attested request (reverse proxy, GET)"]["detail"]
    assert "attestation refused: policy:" in steps["tampered server behind the same nginx"][
        "detail"]
    assert "denied by policy" in steps["authorization denial (Cedar forbid)"]["detail"]
    assert steps["public content, second fetch (nginx cache)"]["detail"] == "X-Cache: HIT"
    seen = result["intermediary"]
    assert seen["urls_in_access_log"] and seen["urls_in_capture"]
    assert not seen["marker_in_access_log"] and not seen["marker_in_capture"]
    assert "[4/4]" in done.stderr  # progress on stderr, JSON alone on stdout
