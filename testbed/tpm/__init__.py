"""Software TPMs and what the testbed does with them: swtpm processes (``swtpm``), the
project-local EK CA (``localca``), named TPMs for the CLI (``managed``), the pytest
fixtures (``pytest_plugin``), tpm2-tools quote files (``quote_files``) and simulated
measured boot with its prediction (``boot``).

May import ``testbed.core`` and ``testbed.spec``.
"""
