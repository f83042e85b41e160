"""The demo, the README's first command: on the ``sim`` backend (``sim``) and on real VMs
(``qemu``). May import every room but ``testbed.cli``.
"""
