"""The ``sim`` backend: each node a process with its own swtpm and simulated measured boot
(``backend``, ``processes``), the node process itself (``node``) and its agent
(``agent_server``).

May import ``testbed.core``, ``spec``, ``tpm``, ``cluster`` and ``roles``; never
``testbed.qemu``.
"""
