"""The Secure Virtual Device's disks on this machine: LUKS volumes opened by
qemu-storage-daemon with a key handed over its private QMP socket (``qsd``), and the
volumes of a node, their sidecars and plain views (``volumes``); docs/svd.md.

May import ``testbed.core`` and ``testbed.spec``.
"""
