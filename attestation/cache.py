"""A small bounded, thread-safe LRU map for results that are pure functions of bytes.

A verifier sees the same few peers over and over: the same event log, the same AK
public area, the same certificate, handshake after handshake. Caching what is
*derived* from those bytes (a parsed structure, a replay) saves the work without
skipping a check, as long as the key holds every input of the computation, exactly
(the bytes themselves, or their SHA-256 digest when they are large): a changed log,
key or certificate is a new key and is computed afresh. Failures are never cached.

The bound is an entry count: a peer sending a new log on every connection only
evicts the oldest entries (least recently used first), it never grows the map.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedCache(Generic[K, V]):
    """At most ``maxsize`` entries, least recently used evicted first."""

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("a cache holds at least one entry")
        self.maxsize = maxsize
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"BoundedCache({len(self)}/{self.maxsize} entries, {self.hits} hits, "
                f"{self.misses} misses)")

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The cached value for ``key``, else ``compute()`` stored (if it returns:
        an exception propagates and nothing is stored)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key]
            self.misses += 1
        value = compute()  # outside the lock: two threads may compute the same value once
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0
