"""pytest plugin handing out real, running swtpm instances.

Registered through the ``pytest11`` entry point ``testbed_swtpm``, so any
project with this package installed gets the fixtures (disable with
``-p no:testbed_swtpm``):

``swtpm_ca`` (session)
    A :class:`~testbed.tpm.localca.LocalCA` in a session temp dir; its
    :meth:`~testbed.tpm.localca.LocalCA.ca_bundle` is the trust anchor for every
    EK certificate the other fixtures produce.
``swtpm_template`` (session)
    One provisioned TPM state directory, made once per session (~1 s).
``swtpm`` (function)
    A running :class:`~testbed.tpm.swtpm.Swtpm` on a fresh *copy* of the
    template. Copying takes milliseconds, but every copy is the same TPM:
    same seeds, same EKs, same EK certificates. Tests that need a TPM with
    an identity of its own use ``swtpm_factory(unique=True)``. It listens on
    unix sockets (0600 in a 0700 directory, no TCP port another local user
    could reach): ``.tcti`` is ``swtpm:path=...``, ``.socket_path`` the data
    socket for raw commands.
``swtpm_factory`` (function)
    ``make(*, unique=False, transport="unix") -> Swtpm`` for tests needing
    several TPMs; ``unique=True`` provisions a new TPM (own EK, ~1 s), as
    needed e.g. for "AK from another TPM" tests; ``transport="tcp"`` for a
    test that needs a port.

Everything is stopped at teardown. Missing swtpm binaries fail the test
loudly (never skip): a silently skipped attestation suite proves nothing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.tpm.localca import BOOTSTRAP_HINT, LocalCA
from testbed.tpm.swtpm import Swtpm, Transport, clone_state, provision

__all__ = [
    "REQUIRED_BINARIES",
    "SwtpmFactory",
    "swtpm",
    "swtpm_ca",
    "swtpm_factory",
    "swtpm_template",
]

REQUIRED_BINARIES = ("swtpm", "swtpm_setup", "swtpm_localca")


def _require_binaries() -> None:
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    if missing:
        pytest.fail(
            f"swtpm tools missing from PATH: {', '.join(missing)}; {BOOTSTRAP_HINT}",
            pytrace=False,
        )


class SwtpmFactory:
    """Makes running swtpm instances under one directory and stops them all."""

    def __init__(self, ca: LocalCA, template: Path, directory: Path) -> None:
        self._ca = ca
        self._template = template
        self._directory = directory
        self._instances: list[Swtpm] = []

    @property
    def instances(self) -> list[Swtpm]:
        return list(self._instances)

    def __call__(self, *, unique: bool = False, transport: Transport = "unix") -> Swtpm:
        """Start a new swtpm: a template copy, or a freshly provisioned TPM if ``unique``."""
        state = self._directory / f"tpm{len(self._instances)}"
        if unique:
            provision(state, self._ca)
        else:
            clone_state(self._template, state)
        tpm = Swtpm(state, transport=transport)
        self._instances.append(tpm)
        return tpm.start()

    def stop_all(self) -> None:
        """Stop every instance, even if stopping one of them fails."""
        errors: list[Exception] = []
        for tpm in self._instances:
            try:
                tpm.stop()
            except Exception as exc:  # collect, keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture(scope="session")
def swtpm_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    """A project-local CA for this test session (root + intermediate created)."""
    _require_binaries()
    return LocalCA.ensure(tmp_path_factory.mktemp("swtpm-ca"))


@pytest.fixture(scope="session")
def swtpm_template(swtpm_ca: LocalCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TPM state directory provisioned once per session, to be copied, never run."""
    state = tmp_path_factory.mktemp("swtpm-template") / "state"
    provision(state, swtpm_ca)
    return state


@pytest.fixture
def swtpm(swtpm_template: Path, tmp_path: Path) -> Iterator[Swtpm]:
    """A running swtpm (unix sockets) on a copy of the session template; shares its EK."""
    state = tmp_path / "swtpm-state"
    clone_state(swtpm_template, state)
    with Swtpm(state) as tpm:
        yield tpm


@pytest.fixture
def swtpm_factory(
    swtpm_ca: LocalCA, swtpm_template: Path, tmp_path: Path
) -> Iterator[SwtpmFactory]:
    """A callable making extra swtpm instances; all stopped at teardown."""
    factory = SwtpmFactory(swtpm_ca, swtpm_template, tmp_path / "tpms")
    try:
        yield factory
    finally:
        factory.stop_all()
