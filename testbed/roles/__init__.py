"""The roles of a cluster's nodes (verifier, server, client, cryptovm, generic): one
module per role, holding both what runs on a node (a sim node process, a qemu VM) and
the host side that talks to it, and a registry the backends look roles up in.

May import ``testbed.core``, ``testbed.spec``, ``testbed.tpm`` and ``testbed.cluster``;
never a backend (``testbed.sim``, ``testbed.qemu``): the backends import roles.
"""
