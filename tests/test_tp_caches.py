"""The Trusted Passages core's certificate caches: keyed by the certificate's exact DER
bytes, so another certificate (another key, or the same key under other names) is never
served a cached value; bounded."""

from __future__ import annotations

from trusted_passages import protocol
from trusted_passages.interfaces import spki_digest
from trusted_passages.pki import certify_public_key, generate_key, issue_certificate, make_ca
from trusted_passages.protocol import (
    CERTIFICATE_CACHE_SIZE,
    cached_certificate_names,
    cached_spki_digest,
    certificate_names,
)


def test_another_certificate_is_never_served_from_the_cache() -> None:
    ca = make_ca("cache CA")
    key, other_key = generate_key(), generate_key()
    first = issue_certificate(ca, "db-1", key)
    same_key_other_name = issue_certificate(ca, "evil-1", key)
    same_name_other_key = issue_certificate(ca, "db-1", other_key)
    for _ in range(2):  # the second round is served from the caches
        assert cached_spki_digest(first) == spki_digest(first)
        assert cached_certificate_names(first) == {"db-1"}
    assert cached_certificate_names(same_key_other_name) == {"evil-1"}
    assert cached_spki_digest(same_name_other_key) == spki_digest(same_name_other_key)
    assert cached_spki_digest(same_name_other_key) != cached_spki_digest(first)
    assert cached_certificate_names(same_name_other_key) == certificate_names(
        same_name_other_key)


def test_the_certificate_caches_are_bounded() -> None:
    ca = make_ca("cache CA")
    public = generate_key().public_key()
    for i in range(CERTIFICATE_CACHE_SIZE + 10):
        certificate = certify_public_key(ca, f"node-{i}", public)
        assert cached_certificate_names(certificate) == {f"node-{i}"}
        cached_spki_digest(certificate)
    assert len(protocol._NAMES) == len(protocol._SPKI_DIGESTS) == CERTIFICATE_CACHE_SIZE
