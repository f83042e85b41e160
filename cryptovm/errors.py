"""CryptoVM errors, all under the project's root :class:`~attestation.errors.TestbedError`.

Every error that reaches a client carries a stable ``code`` (the wire protocol's
error code) and, for denials, the name of the ``check`` that failed.
"""

from __future__ import annotations

from attestation.errors import EvidenceFormatError, TestbedError


class CryptoVmError(TestbedError):
    """Root of the CryptoVM's own errors."""

    code = "error"


class SealedStorageError(CryptoVmError):
    """The storage key cannot be unsealed (other PCR values, another TPM) or the state
    directory is damaged."""

    code = "sealed_storage"


class StorageError(CryptoVmError):
    """A state file is missing, corrupt, fails authentication or cannot be written."""

    code = "storage"


class AccessDenied(CryptoVmError):
    """An operation was refused. ``check`` names the rule that refused it
    (``authentication``, ``privilege``, ``usage``, ``exportable``, ``release_policy``...)."""

    code = "denied"

    def __init__(self, check: str, reason: str) -> None:
        super().__init__(f"{check}: {reason}")
        self.check = check
        self.reason = reason


class AuthenticationFailed(AccessDenied):
    """Unknown account, wrong PSK or certificate, disabled account."""

    code = "auth_failed"

    def __init__(self, reason: str) -> None:
        super().__init__("authentication", reason)


class KeyUsageError(AccessDenied):
    """The key's usage flags do not allow the operation (sign-only, non-exportable...)."""

    code = "usage"


class ReleaseDenied(AccessDenied):
    """Attestation-gated release refused: ``check`` is the failed verifier check
    (``nonce``, ``ak_trust``, ``policy``, ``recipient_binding``...)."""

    code = "release_denied"


class NotFound(CryptoVmError):
    """No such key, key version, account or record."""

    code = "not_found"


class AlreadyExists(CryptoVmError):
    code = "exists"


class BadRequest(CryptoVmError):
    """Arguments of an operation are missing, of the wrong type or out of range."""

    code = "bad_request"


class CryptoOperationFailed(CryptoVmError):
    """The cryptographic operation itself failed (bad ciphertext, bad tag, bad padding)."""

    code = "crypto"


class ServerError(CryptoVmError):
    """The CVM1 server could not start (address in use, a bad address), or did not start
    or stop within its deadline, or could not close cleanly (audit log not synced)."""

    code = "server"


class ProtocolError(EvidenceFormatError):
    """A wire frame is malformed, truncated, oversized, or names an unknown operation."""

    code = "malformed_frame"

    def __init__(self, message: str, *, code: str = "malformed_frame", fatal: bool = False
                 ) -> None:
        super().__init__(message)
        self.code = code
        # fatal: framing is lost (bad magic, oversized length); the connection must close.
        self.fatal = fatal
