"""The TCTP server: aiohttp in front of a :class:`~trusted_passages.tctp.HalecTable`.

Routes (``prefix`` lets several services share one intermediary, routed by path):

* ``OPTIONS *`` (or any path) with ``Accept: text/prs.tctp-discovery``: the discovery
  document, cacheable;
* ``POST <prefix>/halecs``, ``POST <prefix>/halecs/<id>``: HALEC creation and handshake;
* ``GET <prefix>/static/...``: public content in clear, cacheable;
* anything else: ``Content-Encoding: encrypted`` bodies only, handed decrypted to the
  service's handler with the client's attested identity; answered encrypted, no-store.

Every refusal is one HTTP status with a one-line reason (never a traceback); the
HALEC state lives in the table, not in any TCP connection.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from aiohttp import web

from trusted_passages.config import ChannelConfig
from trusted_passages.errors import ProtocolError
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.tctp import (
    DISCOVERY_TYPE,
    ENCRYPTED,
    MAX_BODY,
    Discovery,
    DiscoveryRule,
    HalecTable,
    InnerRequest,
    InnerResponse,
    Limits,
    TctpError,
)

log = logging.getLogger(__name__)
Handler = Callable[[InnerRequest, PeerEvidence], InnerResponse]
NO_STORE: Final = {"Cache-Control": "no-store"}
PUBLIC: Final = {"Cache-Control": "public, max-age=60"}
HOST: Final = "127.0.0.1"
T = TypeVar("T")


def default_discovery(prefix: str) -> Discovery:
    """Static content in clear, everything else of the service over a HALEC."""
    return Discovery((DiscoveryRule(f"{prefix}/static/.*", None),
                      DiscoveryRule(f"{prefix}/.*", f"{prefix}/halecs")))


@dataclass
class TctpService:
    """What one TCTP server serves: its identity, handler, prefix and public files."""

    config: ChannelConfig
    handler: Handler
    prefix: str = ""
    static: Mapping[str, bytes] = field(default_factory=dict)  # path under prefix/static/
    discovery: Discovery | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        self.table = HalecTable(lambda: self.config.connection("server"), self.prefix,
                                limits=self.limits)
        if self.discovery is None:
            self.discovery = default_discovery(self.prefix)


def build_app(service: TctpService) -> web.Application:
    routes = _Routes(service)

    @web.middleware
    async def asterisk(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                       ) -> web.StreamResponse:
        # `OPTIONS *` has no path for the router to match: discovery answers it.
        if request.method == "OPTIONS" and request.raw_path == "*":
            return await routes.options(request)
        return await handler(request)

    app = web.Application(client_max_size=MAX_BODY, middlewares=[_errors, asterisk])
    app.router.add_route("OPTIONS", "/{tail:.*}", routes.options)
    app.router.add_post(f"{service.prefix}/halecs", routes.create)
    app.router.add_post(f"{service.prefix}/halecs/{{id}}", routes.handshake)
    app.router.add_get(f"{service.prefix}/static/{{name}}", routes.static)
    app.router.add_route("*", "/{tail:.*}", routes.encrypted)
    return app


@web.middleware
async def _errors(request: web.Request,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                  ) -> web.StreamResponse:
    """Every refusal as one status and one line; asterisk-form OPTIONS routed too."""
    try:
        return await handler(request)
    except TctpError as exc:
        return _refusal(exc.status, exc.reason)
    except ProtocolError as exc:
        return _refusal(400, str(exc))
    except TimeoutError:
        return _refusal(408, "the request body did not arrive in time")


def _refusal(status: int, reason: str) -> web.Response:
    return web.Response(status=status, text=f"tctp: {reason}\n", headers=NO_STORE)


class _Routes:
    def __init__(self, service: TctpService) -> None:
        self.service = service
        self.table = service.table

    async def _body(self, request: web.Request) -> bytes:
        # A slow body hits the per-step deadline; an oversized one aiohttp refuses (413).
        return await asyncio.wait_for(request.read(), self.table.limits.step_timeout)

    async def options(self, request: web.Request) -> web.Response:
        if DISCOVERY_TYPE not in request.headers.get("Accept", ""):
            return web.Response(status=204, headers={"Allow": "OPTIONS, GET, POST"})
        assert self.service.discovery is not None
        return web.Response(body=self.service.discovery.render(),
                            content_type=DISCOVERY_TYPE, headers=PUBLIC)

    async def create(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        answer = await asyncio.to_thread(self.table.create, body)
        return self._handshake_answer(answer.status, answer.body, answer.url)

    async def handshake(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        answer = await asyncio.to_thread(self.table.handshake, request.path, body)
        return self._handshake_answer(answer.status, answer.body, None)

    def _handshake_answer(self, status: int, body: bytes, location: str | None
                          ) -> web.Response:
        headers = dict(NO_STORE)
        if location is not None:
            headers["Location"] = location
        return web.Response(status=status, body=body, headers=headers,
                            content_type="application/octet-stream")

    async def static(self, request: web.Request) -> web.Response:
        content = self.service.static.get(request.match_info["name"])
        if content is None:
            raise TctpError("no such public file", 404)
        return web.Response(body=content, content_type="text/plain", headers=PUBLIC)

    async def encrypted(self, request: web.Request) -> web.Response:
        if request.headers.get("Content-Encoding") != ENCRYPTED:
            raise TctpError("this URL is served over TCTP only (Content-Encoding: encrypted)",
                            400)
        body = await self._body(request)
        halec, inner = await asyncio.to_thread(self.table.open_request, body,
                                               request.method, request.path_qs)
        assert halec.peer is not None  # established
        try:
            answer = await asyncio.to_thread(self.service.handler, inner, halec.peer)
        except TctpError as exc:
            answer = InnerResponse(exc.status, "text/plain", f"{exc.reason}\n".encode())
        sealed = await asyncio.to_thread(self.table.seal_response, halec, answer)
        return web.Response(status=answer.status, body=sealed,
                            content_type="application/octet-stream",
                            headers={**NO_STORE, "Content-Encoding": ENCRYPTED})


class ServerThread:
    """An aiohttp app on its own event loop in a daemon thread (for synchronous callers)."""

    def __init__(self, app: web.Application, host: str = HOST, port: int = 0) -> None:
        self._app = app
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="tctp-http")
        self._thread.start()
        self.port = self._call(self._start(host, port))

    async def _start(self, host: str, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        address = self._runner.addresses[0]
        return int(address[1])

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._call(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_service(service: TctpService, host: str = HOST, port: int = 0) -> ServerThread:
    return ServerThread(build_app(service), host, port)
