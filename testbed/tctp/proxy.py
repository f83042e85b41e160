"""The TRESOR client proxy: plain HTTP in (an unmodified client, e.g. curl), TCTP out.

``curl -x http://127.0.0.1:PORT http://service-a/records/1`` (forward proxy) and
``curl http://127.0.0.1:PORT/service-a/records/1`` (reverse proxy) both work. Each
request is authorized by Cedar policies read from files, on the request (method, path,
service) and on the attested identities of both HALEC ends (the proxy's node; the
server's node, policy and whether its AK is registered), after the HALEC is attested
and before the body is sealed: a denied body never leaves the proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

import cedarpy
from aiohttp import web
from yarl import URL

from attestation.errors import PolicyError
from attestation.files import read_bounded
from testbed.tctp.client import TctpClient
from testbed.tctp.server import HOST, ServerThread
from trusted_passages.config import ChannelConfig
from trusted_passages.errors import AttestationRejected
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.tctp import MAX_BODY, InnerRequest, TctpError

MAX_POLICY_FILE: Final = 256 * 1024
SHIPPED_POLICY: Final = "proxy.cedar"


class AuthorizationDenied(TctpError):
    """Cedar denied the request at the proxy."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"denied by policy: {reason}", 403)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: tuple[str, ...]  # the policies that decided (Cedar's ids)
    errors: tuple[str, ...]


def service_of(path: str) -> str:
    """The first path segment: the service a request is for."""
    return path.lstrip("/").split("/", 1)[0]


def shipped_policy() -> str:
    return (resources.files("testbed.tctp") / "policies" / SHIPPED_POLICY).read_text()


class CedarAuthorizer:
    """Cedar over policies in files; default deny, forbid wins (Cedar's semantics)."""

    def __init__(self, policies: str, proxy_node: str) -> None:
        self.policies = policies
        self.proxy_node = proxy_node
        self.decisions: list[tuple[str, Decision]] = []  # (request line, decision)
        self._probe()

    @classmethod
    def from_files(cls, paths: Sequence[Path], proxy_node: str) -> CedarAuthorizer:
        texts = []
        for path in paths:
            try:
                texts.append(read_bounded(path, MAX_POLICY_FILE, what="Cedar policy file")
                             .decode("utf-8"))
            except UnicodeDecodeError:
                raise PolicyError(f"{path}: a Cedar policy file is UTF-8 text") from None
        return cls("\n".join(texts), proxy_node)

    def _probe(self) -> None:
        # A policy text Cedar cannot parse must fail at start, not deny silently later.
        result = cedarpy.is_authorized(self._request("GET", "/probe/x", None), self.policies,
                                       [])
        errors = list(result.diagnostics.errors)
        if errors:
            raise PolicyError(f"Cedar policies do not load: {'; '.join(map(str, errors))}")

    def _request(self, method: str, path: str, server: PeerEvidence | None) -> dict[str, Any]:
        service = service_of(path)
        return {
            "principal": f'Proxy::"{_quote(self.proxy_node)}"',
            "action": f'Action::"{_quote(method)}"',
            "resource": f'Service::"{_quote(service)}"',
            "context": {
                "path": path, "service": service, "client": {"node": self.proxy_node},
                "server": {"node": server.node if server else "",
                           "policy": (server.policy_name or "") if server else "",
                           "node_verified": bool(server and server.node_verified)},
            },
        }

    def decide(self, request: InnerRequest, server: PeerEvidence) -> Decision:
        path = URL(request.target).path
        result = cedarpy.is_authorized(self._request(request.method, path, server),
                                       self.policies, [])
        decision = Decision(bool(result.allowed), tuple(result.diagnostics.reasons),
                            tuple(map(str, result.diagnostics.errors)))
        self.decisions.append((f"{request.method} {path}", decision))
        return decision

    async def __call__(self, request: InnerRequest, server: PeerEvidence) -> None:
        decision = self.decide(request, server)
        if not decision.allowed:
            why = (f"forbidden by {', '.join(decision.reasons)}" if decision.reasons
                   else "no policy permits it")
            raise AuthorizationDenied(f"{request.method} {URL(request.target).path} to "
                                      f"{server.node!r}: {why}")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class ClientProxy:
    """The proxy's HTTP face; ``upstream`` is the TCTP side (an intermediary or a server)."""

    def __init__(self, upstream: str, config_for_service: Callable[[str], ChannelConfig],
                 authorizer: CedarAuthorizer, *, timeout: float = 10.0) -> None:
        self.authorizer = authorizer
        self.client = TctpClient(upstream, lambda creation: config_for_service(
            service_of(creation)), authorize=authorizer, timeout=timeout)
        self.refusals: list[str] = []

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _cleanup(self, _app: web.Application) -> None:
        await self.client.close()

    async def handle(self, request: web.Request) -> web.Response:
        if request.method == "CONNECT":
            return _text(405, "tctp proxy: CONNECT (tunnels) is not offered\n")
        target = request.rel_url.path_qs  # absolute-form (forward proxy) or origin-form
        try:
            body = await request.read()
            answer = await self.client.request(request.method, target, body,
                                               request.headers.get("Content-Type"))
        except AttestationRejected as exc:
            self.refusals.append(f"{exc.check}: {exc.reason}")
            return _text(502, f"tctp proxy: attestation refused: {exc.check}: {exc.reason}\n")
        except TctpError as exc:
            self.refusals.append(exc.reason)
            return _text(exc.status, f"tctp proxy: {exc.reason}\n")
        headers = {}
        if answer.peer is not None:
            headers["X-TCTP-Server"] = (f"{answer.peer.node}; policy={answer.peer.policy_name}; "
                                        f"registered={str(answer.peer.node_verified).lower()}")
        return web.Response(status=answer.status, body=answer.body, headers=headers,
                            content_type=answer.content_type or "application/octet-stream")


def _text(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, headers={"Cache-Control": "no-store"})


def serve_proxy(proxy: ClientProxy, host: str = HOST, port: int = 0) -> ServerThread:
    return ServerThread(proxy.app(), host, port)


__all__ = ["AuthorizationDenied", "CedarAuthorizer", "ClientProxy", "Decision",
           "serve_proxy", "service_of", "shipped_policy"]
