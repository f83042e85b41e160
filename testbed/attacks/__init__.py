"""The attack lab: the Trusted Passages paper's attack scenarios, each run against plain
mutual TLS and against Trusted Passages (``lab``, ``scenarios``, ``plain``), the tampered
boot of a real VM (``qemu``), running them on a backend (``runs``) and their table
(``report``). May import every room below the demo but ``testbed.sim``.
"""
