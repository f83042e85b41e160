"""A TCP relay that records every byte it forwards: the capture between an
intermediary and a server (no tcpdump needed; loopback only, bounded)."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Final

MAX_CAPTURE: Final = 16 << 20  # bytes kept; more traffic is relayed but not recorded
_CHUNK: Final = 65536


class RecordingRelay:
    """Listens on 127.0.0.1:``port``, relays each connection to ``upstream``, records both
    directions."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self._recorded = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.connections = 0
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="relay")
        self._thread.start()

    def captured(self) -> bytes:
        with self._lock:
            return bytes(self._recorded)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                inbound, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._relay, args=(inbound,), daemon=True).start()

    def _relay(self, inbound: socket.socket) -> None:
        try:
            outbound = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
        except OSError:
            inbound.close()
            return
        back = threading.Thread(target=self._pump, args=(outbound, inbound), daemon=True)
        back.start()
        self._pump(inbound, outbound)
        back.join(timeout=30)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        source.settimeout(30)
        try:
            while chunk := source.recv(_CHUNK):
                self._record(chunk)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def _record(self, chunk: bytes) -> None:
        with self._lock:
            room = MAX_CAPTURE - len(self._recorded)
            self._recorded += chunk[:max(room, 0)]

    def close(self) -> None:
        self._closing.set()
        self._listener.close()
        self._thread.join(timeout=2)

    def __enter__(self) -> RecordingRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
