"""What the user declares: cluster specs (``cluster_spec``, with ``BootSpec``, the one type
for what a node boots) and guest image recipes (``recipe``), both loaded strictly.

May import ``testbed.core`` only (and ``attestation``'s parsers).
"""
