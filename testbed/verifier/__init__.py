"""The verifier service: continuous attestation of a cluster's nodes (docs/verifier.md)."""
