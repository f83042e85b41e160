"""The Trusted Passages core's certificate cache: keyed by the certificate (compared by
its DER), so another certificate (another key, or the same key under other names) is
never served a cached value; bounded."""

from __future__ import annotations

from trusted_passages import protocol
from trusted_passages.interfaces import spki_digest
from trusted_passages.pki import certify_public_key, generate_key, issue_certificate, make_ca
from trusted_passages.protocol import CERTIFICATE_CACHE_SIZE, certificate_facts


def test_another_certificate_is_never_served_from_the_cache() -> None:
    ca = make_ca("cache CA")
    key, other_key = generate_key(), generate_key()
    first = issue_certificate(ca, "db-1", key)
    same_key_other_name = issue_certificate(ca, "evil-1", key)
    same_name_other_key = issue_certificate(ca, "db-1", other_key)
    for _ in range(2):  # the second round is served from the cache
        assert certificate_facts(first).spki_digest == spki_digest(first)
        assert certificate_facts(first).names == {"db-1"}
    assert certificate_facts(same_key_other_name).names == {"evil-1"}
    assert certificate_facts(same_name_other_key).spki_digest == spki_digest(
        same_name_other_key) != spki_digest(first)
    assert certificate_facts(same_name_other_key).names == {"db-1"}


def test_the_certificate_cache_is_bounded() -> None:
    ca = make_ca("cache CA")
    public = generate_key().public_key()
    for i in range(CERTIFICATE_CACHE_SIZE + 10):
        certificate = certify_public_key(ca, f"node-{i}", public)
        assert certificate_facts(certificate).names == {f"node-{i}"}
    assert len(protocol._CERTIFICATES) == CERTIFICATE_CACHE_SIZE
