"""Connection slots: the one admission rule of every listener the project runs.

A listener holds at most ``limit`` connections. When a newcomer finds every slot taken,
the connection that has proven least is dropped to make room: the lowest ``rank``
(e.g. 0 = TLS handshake not finished, 1 = TLS done but not logged in), the oldest
first within a rank. Connections that have proven themselves (authenticated,
attested, or busy with a request) have no rank and are never evicted; when all slots
hold such connections, the newcomer is refused. So a flood of idle or slow
connections from anyone can delay a genuine client by one eviction, not lock it out.

A slot may carry a ``reassess`` probe (e.g. "have bytes arrived that the listener has not
read yet?", a non-blocking peek): it is asked before its slot would be evicted, and a
new rank it returns is taken instead (the connection moved on unseen: a genuine
client whose ClientHello arrived after accept, while a busy listener had not yet read
it, must not be evicted as silent).

Each slot also carries the deadline of its current step (counted from accept for
the first step, from the end of the previous one after that; never reset by a byte
arriving): :meth:`ConnectionSlots.expire` drops the slots whose deadline passed.
Dropping is the listener's ``drop`` callback, given why (:data:`EVICTED`,
:data:`EXPIRED`, :data:`CLOSING`): close or shut down the socket, cancel a task,
perhaps tell the peer first. It must be safe to call from the thread that calls
:meth:`admit`, :meth:`expire` or :meth:`drop_all`, and it runs outside the table's lock.

Thread-safe; standard library only (the guest agent uses it).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["CLOSING", "EVICTED", "EXPIRED", "ConnectionSlots", "Drop", "Slot", "has_data",
           "shutdown"]

Clock = Callable[[], float]
Drop = Callable[[str], None]
Reassess = Callable[[], int | None]  # a better rank now, or None
EVICTED = "evicted"  # made room for a newcomer
EXPIRED = "expired"  # its step deadline passed
CLOSING = "closing"  # the listener is shutting down


@dataclass(eq=False)
class Slot:
    """One admitted connection: how to drop it, its current deadline and eviction rank."""

    drop: Drop = field(repr=False)
    opened: float
    deadline: float | None
    rank: int | None
    since: float  # when it entered its current rank: the oldest is evicted first
    active: bool = True  # False once released, evicted or expired
    reassess: Reassess | None = field(default=None, repr=False)  # asked before eviction


class ConnectionSlots:
    """At most ``limit`` connections; see the module docstring for who is evicted."""

    def __init__(self, limit: int, *, clock: Clock = time.monotonic) -> None:
        if limit < 1:
            raise ValueError("a listener needs at least one connection slot")
        self.limit = limit
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: set[Slot] = set()
        self.evicted = 0  # counters for status and tests
        self.refused = 0
        self.expired = 0

    def __repr__(self) -> str:
        return f"ConnectionSlots({len(self)}/{self.limit})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def admit(self, drop: Drop, *, timeout: float | None, rank: int | None = 0,
              reassess: Reassess | None = None) -> Slot | None:
        """A slot for a new connection, evicting if full; None: refuse the newcomer."""
        now = self._clock()
        slot = Slot(drop, now, None if timeout is None else now + timeout, rank, now,
                    reassess=reassess)
        with self._lock:
            victim = self._victim(now) if len(self._slots) >= self.limit else None
            if len(self._slots) >= self.limit and victim is None:
                self.refused += 1
                return None
            if victim is not None:
                self._remove(victim)
                self.evicted += 1
            self._slots.add(slot)
        if victim is not None:
            victim.drop(EVICTED)
        return slot

    def step(self, slot: Slot, *, timeout: float | None, rank: int | None) -> None:
        """The connection moved on: a new deadline (from now) and eviction rank."""
        now = self._clock()
        with self._lock:
            slot.deadline = None if timeout is None else now + timeout
            slot.reassess = None  # the listener has seen it move on
            if slot.rank != rank:
                slot.rank, slot.since = rank, now

    def release(self, slot: Slot) -> None:
        """The connection ended (idempotent: an evicted or expired slot is gone already)."""
        with self._lock:
            self._remove(slot)

    def expire(self) -> int:
        """Drop every connection whose step deadline has passed; returns how many."""
        now = self._clock()
        with self._lock:
            late = [s for s in self._slots if s.deadline is not None and s.deadline <= now]
            for slot in late:
                self._remove(slot)
            self.expired += len(late)
        for slot in late:
            slot.drop(EXPIRED)
        return len(late)

    def drop_all(self) -> None:
        """Drop every connection (listener shutting down)."""
        with self._lock:
            slots = list(self._slots)
            for slot in slots:
                self._remove(slot)
        for slot in slots:
            slot.drop(CLOSING)

    def next_deadline(self) -> float | None:
        with self._lock:
            deadlines = [s.deadline for s in self._slots if s.deadline is not None]
        return min(deadlines, default=None)

    def _victim(self, now: float) -> Slot | None:
        ranked = sorted((s for s in self._slots if s.rank is not None), key=_eviction_order)
        for slot in ranked:
            better = slot.reassess() if slot.reassess is not None else None
            if better is None or better <= (slot.rank or 0):
                return slot
            slot.rank, slot.since, slot.reassess = better, now, None  # asked once
        return min((s for s in ranked if s.rank is not None), key=_eviction_order,
                   default=None)

    def _remove(self, slot: Slot) -> None:
        if slot in self._slots:
            self._slots.discard(slot)
            slot.active = False


def _eviction_order(slot: Slot) -> tuple[int, float]:
    return (slot.rank or 0, slot.since)  # only ranked slots are compared


def shutdown(sock: socket.socket) -> Drop:
    """The drop of a connection served by a thread of its own: shutting the socket down
    wakes that thread (its blocked read sees the end of the stream) and it cleans up."""

    def drop(_reason: str) -> None:
        with contextlib.suppress(OSError):  # closed already
            sock.shutdown(socket.SHUT_RDWR)

    return drop


def has_data(sock: socket.socket) -> bool:
    """Bytes are waiting on a just-accepted socket (a genuine client's first flight follows
    its connect): rank it above silent connections from the start, not only once they
    are read, so a fast-renewed silent flood cannot evict it first."""
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False
