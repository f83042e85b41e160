"""attestation.cache.BoundedCache: bounded, least recently used first, failures never kept."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attestation.cache import BoundedCache


@given(st.integers(1, 8), st.lists(st.binary(max_size=3), max_size=60))
def test_the_cache_is_bounded_and_serves_exactly_what_was_computed(
        maxsize: int, keys: list[bytes]) -> None:
    cache: BoundedCache[bytes, bytes] = BoundedCache(maxsize)
    for key in keys:
        assert cache.get_or_compute(key, lambda k=key: k[::-1] + b"!") == key[::-1] + b"!"
        assert len(cache) <= maxsize
    assert cache.hits + cache.misses == len(keys)


def test_least_recently_used_goes_first() -> None:
    cache: BoundedCache[str, int] = BoundedCache(2)
    calls: list[str] = []

    def compute(key: str) -> int:
        calls.append(key)
        return len(calls)

    cache.get_or_compute("a", lambda: compute("a"))
    cache.get_or_compute("b", lambda: compute("b"))
    cache.get_or_compute("a", lambda: compute("a"))  # a is now the most recent
    cache.get_or_compute("c", lambda: compute("c"))  # evicts b
    cache.get_or_compute("a", lambda: compute("a"))
    cache.get_or_compute("b", lambda: compute("b"))
    assert calls == ["a", "b", "c", "b"]


def test_a_failure_is_not_stored() -> None:
    cache: BoundedCache[str, int] = BoundedCache(4)

    def fail() -> int:
        raise ValueError("bad input")

    with pytest.raises(ValueError):
        cache.get_or_compute("k", fail)
    assert len(cache) == 0 and cache.get_or_compute("k", lambda: 7) == 7


def test_a_cache_holds_at_least_one_entry() -> None:
    with pytest.raises(ValueError):
        BoundedCache(0)
