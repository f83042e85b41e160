"""Two verifier processes share a cluster's nodes through a real PostgreSQL: leases, no
node attested twice in an interval, and the nodes of a verifier killed with SIGKILL
taken over by the other within one interval.

The test starts its own PostgreSQL (the Debian package's initdb and postgres, as the
``postgres`` user when run as root) in a temporary directory, unix socket only, and
stops it by PID.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.core.paths import ClusterPaths
from testbed.core.processes import process_argv
from testbed.sim.backend import SimBackend
from testbed.spec.cluster_spec import default_spec_path
from testbed.verifier.service import VerifierConfig, start_verifier, stop_verifiers
from testbed.verifier.store import open_store
from tests.sim_lab import run_cli

CLUSTER = "pglab"
NODES = ("p0", "p1", "p2")
INTERVAL = 1.0
SLACK = 0.35  # one tick, one quote and its verification on a shared 2-core machine


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server; its URL (unix socket, trust authentication)."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.fail("PostgreSQL is not installed: run .ci/bootstrap (it installs it)",
                    pytrace=False)
    as_root = os.geteuid() == 0
    user: dict[str, Any] = {"user": "postgres", "group": "postgres", "extra_groups": []} \
        if as_root else {}
    top = Path(tempfile.mkdtemp(prefix="testbed-pg-"))
    if as_root:
        shutil.chown(top, "postgres", "postgres")
    data = top / "data"
    subprocess.run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                    "--no-sync", "-E", "UTF8"], check=True, capture_output=True, **user)
    server = subprocess.Popen([str(bindir / "postgres"), "-D", str(data), "-k", str(top),
                               "-c", "listen_addresses=", "-c", "fsync=off"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **user)
    url = f"postgresql://postgres@/postgres?host={top}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                open_store(url).close()
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterPaths]:
    top = tmp_path_factory.mktemp("pglab")
    doc = yaml.safe_load(default_spec_path().read_text())
    doc["name"] = CLUSTER
    doc["nodes"] = [dict(doc["nodes"][0], name=n, role="generic") for n in NODES]
    spec = top / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    rc, out, err = run_cli(top / "w", "up", str(spec))
    paths = ClusterPaths(top / "w", CLUSTER)
    try:
        assert rc == 0, out + err
        yield paths
    finally:
        stop_verifiers(paths)
        assert SimBackend(paths).down(purge=False).ok


def _attestations(url: str) -> list[Any]:
    store = open_store(url)
    try:
        return [e for e in store.events_after(0, limit=100_000) if e.kind == "attestation"]
    finally:
        store.close()


def test_two_verifiers_share_nodes_and_take_over(postgres: str,
                                                cluster: ClusterPaths) -> None:
    configs = [VerifierConfig(cluster.workdir, CLUSTER, name=name, interval=INTERVAL,
                              db=postgres) for name in ("va", "vb")]
    first = start_verifier(configs[0])
    time.sleep(INTERVAL * 1.5)  # va claims every node first
    second = start_verifier(configs[1])
    time.sleep(INTERVAL * 2.5)
    os.kill(first, signal.SIGKILL)
    killed_at = time.time()
    time.sleep(INTERVAL * 2.5)
    events = _attestations(postgres)
    assert all(e.ok for e in events), [e for e in events if not e.ok][:3]

    # va attested before it died; afterwards vb attested every node within one interval.
    assert {e.node for e in events if e.verifier == "va"} == set(NODES)
    after = [e for e in events if e.time > killed_at]
    assert {e.verifier for e in after} == {"vb"}
    for node in NODES:
        first_after = min(e.time for e in after if e.node == node)
        assert first_after - killed_at <= INTERVAL + SLACK, (node, first_after - killed_at)

    # No node was attested twice in an interval, whichever verifier did it.
    for node in NODES:
        times = sorted(e.time for e in events if e.node == node)
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert len(times) >= 5 and min(gaps) > INTERVAL - 0.2, (node, gaps)

    # The CLI reads the same database (start saved its URL); va's row is a stale heartbeat.
    rc, out, err = run_cli(cluster.workdir, "verifier", "status", "--json")
    assert rc == 0, err
    status = json.loads(out)
    assert status["database"] == "postgresql"
    running = {v["name"]: v["running"] for v in status["verifiers"]}
    assert running == {"va": False, "vb": True}
    assert {n["state"] for n in status["nodes"]} == {"trusted"}
    # va's pid file outlived it: a new va starts anyway (the pid is checked in /proc).
    assert (cluster.root / "verifier" / "va.pid").exists()
    again = start_verifier(configs[0])
    stopped = stop_verifiers(cluster)
    assert stopped == {"va": "SIGTERM", "vb": "SIGTERM"}
    deadline = time.monotonic() + 5  # an exiting process shows an empty argv a moment
    while any(process_argv(p) is not None for p in (first, second, again)):
        assert time.monotonic() < deadline, "a verifier outlived stop"
        time.sleep(0.02)
    with contextlib.suppress(FileNotFoundError):
        assert not list((cluster.root / "verifier").glob("*.pid"))
