"""Webhooks: each state change and failed attestation POSTed as signed JSON.

The body is the event (:meth:`Event.to_dict`) with the cluster's name; the header
``X-Testbed-Signature: sha256=HEX`` is HMAC-SHA256 of the exact body under a secret
read from a file that must be a private regular file (0600). A receiver checks the
signature and refuses a ``seq`` it has seen (replays). Delivery runs in one thread
behind a bounded queue: a slow or dead endpoint delays nothing but its own POSTs, and
when the queue is full the oldest pending event is dropped and counted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import queue
import stat
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from attestation.errors import FileInputError
from attestation.files import read_bounded
from testbed.core.errors import ArgumentError
from testbed.verifier.store import Event

__all__ = ["SIGNATURE_HEADER", "WebhookSender", "load_secret", "sign"]

SIGNATURE_HEADER = "X-Testbed-Signature"
MAX_SECRET_BYTES = 4096
MIN_SECRET_BYTES = 16
QUEUE_LIMIT = 1000
POST_TIMEOUT_S = 2.0

log = logging.getLogger("testbed.verifier.webhooks")


def load_secret(path: Path) -> bytes:
    """The HMAC secret: a regular file of ours nobody else can read, 16 bytes at least."""
    try:
        secret = read_bounded(path, MAX_SECRET_BYTES, what="webhook secret").strip()
        mode = os.stat(path).st_mode
    except (FileInputError, OSError) as exc:
        raise ArgumentError(str(exc)) from None
    if stat.S_IMODE(mode) & 0o077:
        raise ArgumentError(f"webhook secret {path} is readable by others "
                            f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it")
    if len(secret) < MIN_SECRET_BYTES:
        raise ArgumentError(f"webhook secret {path} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def _check_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ArgumentError(f"webhook URL {url[:100]!r} is not http:// or https://")
    return url


class WebhookSender:
    """POSTs events to every URL from one background thread; :meth:`close` to stop."""

    def __init__(self, cluster: str, urls: Sequence[str], secret: bytes) -> None:
        self.cluster = cluster
        self.urls = [_check_url(u) for u in urls]
        self._secret = secret
        self._queue: queue.Queue[Event | None] = queue.Queue(QUEUE_LIMIT)
        self.dropped = 0
        self.failed = 0
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def send(self, event: Event) -> None:
        """Queue ``event`` (never blocks: a full queue loses its oldest event)."""
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self._queue.get_nowait()
                    self.dropped += 1

    def close(self, timeout: float = POST_TIMEOUT_S) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            body = json.dumps({"cluster": self.cluster, **event.to_dict()},
                              sort_keys=True).encode()
            for url in self.urls:
                self._post(url, body)

    def _post(self, url: str, body: bytes) -> None:
        # S310: _check_url admitted http(s) URLs only.
        request = urllib.request.Request(url, data=body, method="POST", headers={  # noqa: S310
            "Content-Type": "application/json", SIGNATURE_HEADER: sign(self._secret, body)})
        try:
            with urllib.request.urlopen(request, timeout=POST_TIMEOUT_S) as answer:  # noqa: S310
                answer.read(1024)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            self.failed += 1
            log.warning("webhook %s: %s", url, exc)
