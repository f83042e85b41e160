"""The verifier: continuous attestation, and revocation that acts (docs/runtime.md)."""
