"""Everything TPM: the verifier side in pure Python and ``cryptography`` (structures, EK
validation, credential activation, evidence, event logs, policies, named checks), the
attester side (``tpm`` through tpm2-pytss, ``tpm_raw`` in raw commands for guests), and
the project's shared ground: its errors, file primitives, base64, strict YAML and the
agent wire format.

The bottom floor: imports none of ``trusted_passages``, ``cryptovm`` or ``testbed``.
"""
