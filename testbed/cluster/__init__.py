"""One cluster model for every backend: the backend interface (``backend``), the results
of ``up``/``status``/``attest``/``down`` (``results``), the one agent client (``agent``),
the cluster's shared state (``state``), attestation written once (``verification``) and
``up`` written once (``lifecycle``).

May import ``testbed.core``, ``testbed.spec`` and ``testbed.tpm``; never a role or a
backend.
"""
