"""Testbed plumbing: a project-local swtpm CA, swtpm process lifecycle and the
pytest plugin that hands running software TPMs to tests.

Nothing here talks to a real TPM or to system-wide swtpm state
(``/var/lib/swtpm-localca``): every file lives in a directory the caller
chooses, so parallel checkouts and CI jobs never share keys or serial numbers.
"""
