"""The ground floor of ``testbed``: errors, the work directory and cluster state layout,
file and process primitives, progress display.

Imports nothing of ``testbed`` outside ``testbed.core`` (only ``attestation``'s errors and
file primitives); every other room of ``testbed`` may import it.
"""
