"""Accounts and privileges, after TLS-SE's root and guest accounts.

A root account exists from the start; root creates guest accounts, each with its own
pre-shared key (32 random bytes) and a set of privileges, can enable and disable
them, set or rotate their PSK and issue them client certificates. PSKs live only
inside the encrypted configuration document and in memory; they are compared in
constant time and never logged or printed (``repr`` hides them).

Privileges::

    records:read  records:write            every data record
    record:<name>:read  record:<name>:write  one record
    keys:generate  keys:import  keys:list
    key:<id>:<op>   op in sign verify decrypt encrypt derive public attest
                    export rotate delete release
    key:<id>:use    = sign verify decrypt encrypt derive public attest
    key:<id>:*      every op on the key;  <id> may be * (every key)
    audit:read
    tls:enroll     a TLS certificate for the attested node's own name (attested sessions)

The account that creates a key owns it and holds every key privilege on it.
Root holds every privilege; only root manages accounts and release policies.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cryptovm.encoding import NAME_RE, check_name
from cryptovm.errors import AlreadyExists, AuthenticationFailed, BadRequest, NotFound

ROOT = "root"
PSK_SIZE = 32
KEY_OPS = frozenset({"sign", "verify", "decrypt", "encrypt", "derive", "public", "attest",
                     "export", "rotate", "delete", "release"})
USE_OPS = frozenset({"sign", "verify", "decrypt", "encrypt", "derive", "public", "attest"})
_NAME = NAME_RE.pattern
PRIVILEGE_RE = re.compile(
    rf"records:(read|write)|record:{_NAME}:(read|write)|keys:(generate|import|list)"
    rf"|key:(\*|{_NAME}):(\*|use|{'|'.join(sorted(KEY_OPS))})|audit:read|tls:enroll")
_CLIENT_LABEL = b"CVM1 psk-auth client\x00"
_SERVER_LABEL = b"CVM1 psk-auth server\x00"
_DUMMY_PSK = os.urandom(PSK_SIZE)  # unknown accounts cost the same HMAC as known ones


def validate_privileges(privileges: Iterable[str]) -> frozenset[str]:
    result = set()
    for privilege in privileges:
        if not isinstance(privilege, str) or PRIVILEGE_RE.fullmatch(privilege) is None:
            raise BadRequest(f"privilege {str(privilege)[:80]!r} is not valid (see "
                             "docs/cryptovm.md: records:read, keys:generate, key:<id>:sign, ...)")
        result.add(privilege)
    return frozenset(result)


@dataclass(frozen=True)
class Account:
    name: str
    psk: bytes = field(repr=False)
    privileges: frozenset[str] = frozenset()
    enabled: bool = True
    cert_fingerprints: frozenset[str] = frozenset()
    created: int = 0

    @property
    def is_root(self) -> bool:
        return self.name == ROOT

    def allows(self, privilege: str) -> bool:
        """Whether the account holds ``privilege`` (wildcards and ``use`` expanded)."""
        if self.is_root or privilege in self.privileges:
            return True
        kind, _, rest = privilege.partition(":")
        if kind == "key":
            target, _, op = rest.rpartition(":")
            wanted = {f"key:{t}:{o}" for t in (target, "*") for o in (op, "*")}
            if op in USE_OPS:
                wanted |= {f"key:{target}:use", "key:*:use"}
            return not wanted.isdisjoint(self.privileges)
        if kind == "record":
            _, _, op = rest.rpartition(":")
            return f"records:{op}" in self.privileges
        return False

    def describe(self) -> dict[str, Any]:
        """JSON-able, without the PSK."""
        return {"name": self.name, "privileges": sorted(self.privileges),
                "enabled": self.enabled, "root": self.is_root,
                "certificates": sorted(self.cert_fingerprints), "created": self.created}

    def to_doc(self) -> dict[str, Any]:
        """For the encrypted configuration document only (includes the PSK)."""
        return {**self.describe(), "psk": self.psk.hex()}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Account:
        return cls(name=doc["name"], psk=bytes.fromhex(doc["psk"]),
                   privileges=frozenset(doc["privileges"]), enabled=bool(doc["enabled"]),
                   cert_fingerprints=frozenset(doc["certificates"]), created=int(doc["created"]))


def psk_client_proof(psk: bytes, challenge: bytes, client_nonce: bytes, account: str) -> bytes:
    return hmac.new(psk, _CLIENT_LABEL + challenge + client_nonce + account.encode(),
                    hashlib.sha256).digest()


def psk_server_proof(psk: bytes, challenge: bytes, client_nonce: bytes, account: str) -> bytes:
    return hmac.new(psk, _SERVER_LABEL + challenge + client_nonce + account.encode(),
                    hashlib.sha256).digest()


class AccountBook:
    """All accounts. Mutations return nothing until the caller persisted them."""

    def __init__(self, accounts: Iterable[Account] = ()) -> None:
        self._accounts = {a.name: a for a in accounts}

    def __repr__(self) -> str:
        return f"AccountBook({sorted(self._accounts)})"

    @classmethod
    def with_root(cls) -> tuple[AccountBook, bytes]:
        psk = os.urandom(PSK_SIZE)
        return cls([Account(ROOT, psk, created=int(time.time()))]), psk

    def to_doc(self) -> list[dict[str, Any]]:
        return [a.to_doc() for _, a in sorted(self._accounts.items())]

    @classmethod
    def from_doc(cls, doc: Iterable[Mapping[str, Any]]) -> AccountBook:
        return cls(Account.from_doc(d) for d in doc)

    def names(self) -> list[str]:
        return sorted(self._accounts)

    def get(self, name: str) -> Account:
        try:
            return self._accounts[name]
        except KeyError:
            raise NotFound(f"no account {name!r}") from None

    def copy(self) -> AccountBook:
        return AccountBook(self._accounts.values())

    # --- authentication -----------------------------------------------------------

    def authenticate_psk(self, name: str, challenge: bytes, client_nonce: bytes,
                         proof: bytes) -> Account:
        """Check an HMAC proof of the PSK; the same work for unknown accounts."""
        account = self._accounts.get(name)
        expected = psk_client_proof(account.psk if account else _DUMMY_PSK, challenge,
                                    client_nonce, name)
        if not hmac.compare_digest(expected, proof) or account is None:
            raise AuthenticationFailed(f"unknown account or wrong PSK for {name[:64]!r}")
        if not account.enabled:
            raise AuthenticationFailed(f"account {name!r} is disabled")
        return account

    def by_certificate(self, fingerprint: str) -> Account:
        for account in self._accounts.values():
            if fingerprint in account.cert_fingerprints:
                if not account.enabled:
                    raise AuthenticationFailed(f"account {account.name!r} is disabled")
                return account
        raise AuthenticationFailed("the client certificate is not registered to any account "
                                   "(revoked or never issued)")

    # --- management (root) ----------------------------------------------------------

    def create(self, name: str, privileges: Iterable[str]) -> bytes:
        check_name(name, "account name")
        if name in self._accounts:
            raise AlreadyExists(f"account {name!r} exists")
        psk = os.urandom(PSK_SIZE)
        self._accounts[name] = Account(name, psk, validate_privileges(privileges),
                                       created=int(time.time()))
        return psk

    def delete(self, name: str) -> None:
        self._guest(name)
        del self._accounts[name]

    def _put(self, account: Account) -> Account:
        self._accounts[account.name] = account
        return account

    def set_privileges(self, name: str, privileges: Iterable[str]) -> Account:
        account = self._guest(name)
        return self._put(replace(account, privileges=validate_privileges(privileges)))

    def grant(self, name: str, privileges: Iterable[str]) -> Account:
        account = self._guest(name)
        return self.set_privileges(name, account.privileges | validate_privileges(privileges))

    def revoke(self, name: str, privileges: Iterable[str]) -> Account:
        account = self._guest(name)
        return self.set_privileges(name, account.privileges - set(privileges))

    def set_enabled(self, name: str, enabled: bool) -> Account:
        return self._put(replace(self._guest(name), enabled=enabled))

    def set_psk(self, name: str, psk: bytes | None = None) -> bytes:
        """Set (TLS-SE ``?A0``) or rotate the PSK; returns it."""
        new = os.urandom(PSK_SIZE) if psk is None else psk
        if len(new) != PSK_SIZE:
            raise BadRequest(f"a PSK is {PSK_SIZE} bytes, not {len(new)}")
        self._accounts[name] = replace(self.get(name), psk=new)
        return new

    def add_certificate(self, name: str, fingerprint: str) -> Account:
        account = self.get(name)
        return self._put(replace(account,
                                 cert_fingerprints=account.cert_fingerprints | {fingerprint}))

    def remove_certificates(self, name: str) -> Account:
        return self._put(replace(self.get(name), cert_fingerprints=frozenset()))

    def _guest(self, name: str) -> Account:
        account = self.get(name)
        if account.is_root:
            raise BadRequest("the root account cannot be deleted, disabled or restricted")
        return account
