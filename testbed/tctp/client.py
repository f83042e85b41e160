"""The TCTP client: aiohttp, HALECs made on demand and kept in a bounded pool.

``TctpClient(base_url, config_for)`` discovers the server's rules (``OPTIONS *``, and
``OPTIONS /`` when an intermediary refuses the asterisk form: nginx answers it 400),
creates HALECs where the rules say, and sends each request encrypted over an idle HALEC
of the right creation URL, one request at a time per HALEC (TLS records are ordered).
Paths the rules serve in clear are refused unless ``plaintext_ok`` allows them: the
discovery document is unauthenticated, so an intermediary must not be able to turn
encryption off (fail closed).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

import aiohttp
from yarl import URL

from trusted_passages.config import ChannelConfig
from trusted_passages.errors import AttestationRejected
from trusted_passages.interfaces import PeerEvidence
from trusted_passages.tctp import (
    DISCOVERY_TYPE,
    ENCRYPTED,
    MAX_BODY,
    Discovery,
    HalecClient,
    InnerRequest,
    TctpError,
    parse_discovery,
)

DEFAULT_TIMEOUT: Final = 10.0
# Called once the HALEC is attested and before the body is sealed; raises to refuse.
Authorizer = Callable[[InnerRequest, PeerEvidence], Awaitable[None]]


@dataclass(frozen=True)
class TctpResponse:
    status: int
    content_type: str | None
    body: bytes = field(repr=False)
    peer: PeerEvidence | None = None  # the attested server; None for content in clear
    halec: str | None = None


@dataclass
class _Pool:
    idle: list[HalecClient] = field(default_factory=list)
    count: int = 0


class TctpClient:
    """A TCTP client for one base URL (a server, or an intermediary in front of servers)."""

    def __init__(self, base_url: str, config_for: Callable[[str], ChannelConfig], *,
                 max_halecs: int = 4, timeout: float = DEFAULT_TIMEOUT,
                 plaintext_ok: Callable[[str], bool] = lambda _path: False,
                 authorize: Authorizer | None = None) -> None:
        self.base = URL(base_url)
        self._config_for = config_for  # creation URL -> whom we expect there
        self._max_halecs = max_halecs
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._plaintext_ok = plaintext_ok
        self._authorize = authorize
        self._session: aiohttp.ClientSession | None = None
        self._discovery: Discovery | None = None
        self._pools: dict[str, _Pool] = {}
        self._freed = asyncio.Condition()
        self.halecs_created = 0

    async def __aenter__(self) -> TctpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # auto_decompress off: "encrypted" is no compression, and bodies stay bytes.
            self._session = aiohttp.ClientSession(timeout=self._timeout,
                                                  auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # --- discovery ---------------------------------------------------------------------

    async def discover(self) -> Discovery:
        if self._discovery is None:
            self._discovery = await self._fetch_discovery()
        return self._discovery

    async def _fetch_discovery(self) -> Discovery:
        headers = {"Accept": DISCOVERY_TYPE}
        asterisk = URL.build(scheme=self.base.scheme, host=self.base.host or "",
                             port=self.base.port, path="*", encoded=True)
        for url in (asterisk, self.base.with_path("/")):
            status, kind, body = await self._call("OPTIONS", url, headers=headers)
            if status == 200 and kind == DISCOVERY_TYPE:
                return parse_discovery(body)
        raise TctpError(f"{self.base} offers no TCTP discovery document", 502)

    # --- requests ----------------------------------------------------------------------

    async def request(self, method: str, target: str, body: bytes = b"",
                      content_type: str | None = None) -> TctpResponse:
        creation = (await self.discover()).creation_url(URL(target).path)
        if creation is None:
            return await self._in_clear(method, target, body, content_type)
        halec = await self._acquire(creation)
        healthy = False
        try:
            response = await self._over(halec, InnerRequest(method, target, content_type, body))
            healthy = True
            return response
        finally:
            await self._release(creation, halec, healthy)

    async def _in_clear(self, method: str, target: str, body: bytes,
                        content_type: str | None) -> TctpResponse:
        if not self._plaintext_ok(URL(target).path):
            raise TctpError(f"discovery serves {target[:80]!r} in clear, which this client "
                            "does not allow", 502)
        headers = {"Content-Type": content_type} if content_type else {}
        status, kind, answer = await self._call(method, self.base.join(URL(target)),
                                                data=body or None, headers=headers)
        return TctpResponse(status, kind, answer)

    async def _over(self, halec: HalecClient, inner: InnerRequest) -> TctpResponse:
        assert halec.peer is not None and halec.url is not None
        if self._authorize is not None:
            await self._authorize(inner, halec.peer)
        sealed = await asyncio.to_thread(halec.seal_request, inner)
        headers = {"Content-Encoding": ENCRYPTED, "Content-Type": "application/octet-stream"}
        status, _, answer = await self._call(inner.method, self.base.join(URL(inner.target)),
                                             data=sealed, headers=headers)
        opened = await asyncio.to_thread(halec.open_response, status, answer)
        return TctpResponse(opened.status, opened.content_type, opened.body, halec.peer,
                            halec.url)

    # --- the HALEC pool ------------------------------------------------------------------

    async def _acquire(self, creation: str) -> HalecClient:
        pool = self._pools.setdefault(creation, _Pool())
        async with self._freed:
            while not pool.idle and pool.count >= self._max_halecs:
                await self._freed.wait()
            if pool.idle:
                return pool.idle.pop()
            pool.count += 1
        try:
            return await self._create(creation)
        except BaseException:
            async with self._freed:
                pool.count -= 1
                self._freed.notify()
            raise

    async def _release(self, creation: str, halec: HalecClient, healthy: bool) -> None:
        pool = self._pools[creation]
        async with self._freed:
            if healthy:
                pool.idle.append(halec)
            else:  # a refused or broken HALEC is never reused
                pool.count -= 1
            self._freed.notify()

    async def _create(self, creation: str) -> HalecClient:
        halec = HalecClient(self._config_for(creation).connection("client"), creation)
        body: bytes | None = halec.first_flight()
        target = self.base.with_path(creation)
        while body is not None:
            status, _, answer, location = await self._post(target, body)
            try:
                body = await asyncio.to_thread(halec.on_handshake_answer, status, location,
                                               answer)
            except AttestationRejected as exc:
                if not exc.by_peer:
                    await self._tell_refusal(halec)
                raise
            if halec.url is not None:
                target = self.base.with_path(halec.url)
        self.halecs_created += 1
        return halec

    async def _tell_refusal(self, halec: HalecClient) -> None:
        """Send our ERROR frame, so that the server learns why and drops the HALEC."""
        leftover = halec.refusal()
        if leftover and halec.url is not None:
            with contextlib.suppress(TctpError):  # best effort: the server expires it anyway
                await self._post(self.base.with_path(halec.url), leftover)

    # --- HTTP --------------------------------------------------------------------------

    async def _post(self, url: URL, body: bytes) -> tuple[int, str | None, bytes, str | None]:
        try:
            async with self.session.post(url, data=body, headers={
                    "Content-Type": "application/octet-stream"}) as response:
                answer = await self._read(response)
                return (response.status, response.content_type, answer,
                        response.headers.get("Location"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TctpError(f"POST {url}: {type(exc).__name__}: {exc}", 504) from None

    async def _call(self, method: str, url: URL, *, data: bytes | None = None,
                    headers: dict[str, str] | None = None) -> tuple[int, str | None, bytes]:
        try:
            async with self.session.request(method, url, data=data,
                                            headers=headers) as response:
                return response.status, response.content_type, await self._read(response)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TctpError(f"{method} {url}: {type(exc).__name__}: {exc}", 504) from None

    @staticmethod
    async def _read(response: aiohttp.ClientResponse) -> bytes:
        data = bytearray()
        while chunk := await response.content.read(65536):
            data += chunk
            if len(data) > MAX_BODY:
                raise TctpError(f"answer over {MAX_BODY} bytes", 502)
        return bytes(data)
