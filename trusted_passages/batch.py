"""Batched bindings: one TPM quote over the Merkle root of many sessions' bindings.

Sans-IO and pure (hashlib only). The tree is RFC 6962/9162's Merkle Tree Hash with
its domain separation: a leaf hashes as SHA-256(0x00 || data), an inner node as
SHA-256(0x01 || left || right), so a leaf can never pass for a node. A leaf's data
is the session's :func:`~trusted_passages.interfaces.binding_digest` (profile, issuer
role, session exporter, key hash): exactly what an unbatched quote would carry.

The quote of a batch carries :func:`batch_qualifying_data` of the root, under its
own domain, so a batched quote never equals an unbatched binding and vice versa.
Each session receives the quote and a :class:`BatchProof` (its index, the batch
size and the audit path); :func:`root_from_path` recomputes the root from the
session's own leaf, and the verifier compares it with the quoted one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from attestation.errors import EvidenceFormatError

__all__ = [
    "BATCH_DOMAIN",
    "MAX_BATCH",
    "BatchProof",
    "MerkleTree",
    "batch_qualifying_data",
    "leaf_hash",
    "node_hash",
    "root_from_path",
]

BATCH_DOMAIN: Final = b"trusted-passages/batch/v1\x00"
MAX_BATCH: Final = 1 << 16  # bounds the path a peer may send: at most 16 hashes
HASH_BYTES: Final = 32


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def batch_qualifying_data(root: bytes) -> bytes:
    """The quote's qualifying data for a batch: the root under the batch domain."""
    return hashlib.sha256(BATCH_DOMAIN + root).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2): RFC 6962's k."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An RFC 6962 Merkle tree over a fixed list of leaf data (built once, then read)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        if not 1 <= len(leaves) <= MAX_BATCH:
            raise ValueError(f"a batch holds 1..{MAX_BATCH} leaves, got {len(leaves)}")
        self._hashes = [leaf_hash(leaf) for leaf in leaves]
        # Every subtree hash, computed once: each waiter of a batch asks for its path.
        self._subtrees: dict[tuple[int, int], bytes] = {}
        self.root = self._subtree(0, len(self._hashes))

    @property
    def size(self) -> int:
        return len(self._hashes)

    def _subtree(self, start: int, end: int) -> bytes:
        if end - start == 1:
            return self._hashes[start]
        cached = self._subtrees.get((start, end))
        if cached is None:
            k = _split(end - start)
            cached = node_hash(self._subtree(start, start + k), self._subtree(start + k, end))
            self._subtrees[(start, end)] = cached  # same value from any thread: no lock
        return cached

    def path(self, index: int) -> tuple[bytes, ...]:
        """The audit path of leaf ``index``, leaf side first (RFC 6962 PATH(m, D[n]))."""
        if not 0 <= index < self.size:
            raise IndexError(f"leaf {index} is not in a tree of {self.size}")
        path: list[bytes] = []
        start, end = 0, self.size
        while end - start > 1:
            k = _split(end - start)
            if index < start + k:
                path.append(self._subtree(start + k, end))
                end = start + k
            else:
                path.append(self._subtree(start, start + k))
                start += k
        return tuple(reversed(path))

    def proof(self, index: int) -> BatchProof:
        return BatchProof(index, self.size, self.path(index))


def root_from_path(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes:
    """The root that ``path`` leads to from leaf data ``leaf`` at ``index`` of ``size``.

    RFC 9162 section 2.1.3.2. Raises ValueError if the path has the wrong length for
    (index, size), so a path can only be checked, never stretched.
    """
    if not 0 <= index < size <= MAX_BATCH:
        raise ValueError(f"leaf index {index} is not within a batch of {size}")
    fn, sn, r = index, size - 1, leaf_hash(leaf)
    for sibling in path:
        if sn == 0:
            raise ValueError("the path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(sibling, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, sibling)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ValueError("the path is shorter than the tree is deep")
    return r


@dataclass(frozen=True)
class BatchProof:
    """Where one session's leaf sits in its batch: index, batch size and audit path."""

    index: int
    size: int
    path: tuple[bytes, ...]

    def root(self, leaf: bytes) -> bytes:
        return root_from_path(leaf, self.index, self.size, self.path)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "size": self.size, "path": [p.hex() for p in self.path]}

    @classmethod
    def from_dict(cls, doc: object) -> BatchProof:
        """Strict decoding; only EvidenceFormatError escapes."""
        if not isinstance(doc, dict) or set(doc) != {"index", "size", "path"}:
            raise EvidenceFormatError("envelope batch must be an object with keys "
                                      "['index', 'path', 'size']")
        size, index, path = doc["size"], doc["index"], doc["path"]
        if type(size) is not int or not 1 <= size <= MAX_BATCH:
            raise EvidenceFormatError(f"envelope batch size must be an integer 1..{MAX_BATCH}")
        if type(index) is not int or not 0 <= index < size:
            raise EvidenceFormatError("envelope batch index must be an integer 0..size-1")
        if not isinstance(path, list) or len(path) > MAX_BATCH.bit_length():
            raise EvidenceFormatError("envelope batch path must be a list of at most "
                                      f"{MAX_BATCH.bit_length()} hashes")
        return cls(index, size, tuple(_hash(item) for item in path))


def _hash(value: object) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * HASH_BYTES:
        raise EvidenceFormatError(f"envelope batch path entries must be {2 * HASH_BYTES} "
                                  "hex characters")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise EvidenceFormatError("envelope batch path entry is not hexadecimal") from None
