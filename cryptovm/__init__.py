"""CryptoVM: tenants' keys in a virtual security module sealed to a measured TPM state.

Public API (``docs/cryptovm.md`` has the whole story):

* :class:`cryptovm.vsm.CryptoVm` / :class:`cryptovm.vsm.VsmSession` - the VSM in-process
* :class:`cryptovm.server.CryptoVmServer`, :class:`cryptovm.client.CryptoVmClient` - the wire
* :mod:`cryptovm.wire` - the sans-IO frame codec
* :func:`cryptovm.keyattest.verify_key_attestation`, :mod:`cryptovm.release`,
  :mod:`cryptovm.wrapping` - what tenants and requesters run on their side
* :mod:`cryptovm.admin` - CLI-facing management functions

May import ``trusted_passages`` and ``attestation``; never ``testbed``.
"""
