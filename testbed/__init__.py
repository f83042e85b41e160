"""The testbed: clusters of attested nodes on software TPMs (``sim``) or real VMs
(``qemu``), the attack lab, the demo and the ``testbed`` command.

Its rooms, from the ground up (each imports only rooms below it; ``docs/architecture.md``
draws them): ``core`` (errors, paths, files, processes, progress), ``spec`` (cluster
specs and image recipes), ``tpm`` (swtpm, the local EK CA, measured boot), ``cluster``
(the backend interface, results, the agent client, lifecycle), ``roles``, the backends
``sim`` and ``qemu`` (independent of each other), ``attacks``, ``demo``, and ``cli``
on top. Below all of them: ``cryptovm``, ``trusted_passages`` and ``attestation``.
"""
