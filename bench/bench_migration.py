"""Live migration figures between two hosts of a lab (not a test; docs/hosts.md,
"Migration"; goal: one migration of a 512 MiB guest <= 30 s under TCG).

In one run: two hosts on a scratch network, one 512 MiB VM (TCG) placed on host1, then
per round a TLS migration host1 -> host2 (``testbed migrate``: both hosts attested
now, fresh credentials, the destination prepared, libvirt's migration) and, as the
same-run baseline, a migration back without TLS (host2 -> host1, still attested). For
each: libvirt's migrate3 call, its completed-job ``downtime``, the data moved, and the
whole command. Everything is torn down at the end. The guest image comes from
``$TESTBED_IMAGE_CACHE`` (default /var/cache/trusted-testbed), built beforehand.

Run: .venv/bin/python bench/bench_migration.py [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.cluster import lifecycle as cluster
from testbed.core.paths import ClusterPaths
from testbed.core.progress import Progress
from testbed.hosts import lifecycle as hosts
from testbed.hosts.network import scratch_network
from testbed.qemu.backend import QemuBackend
from testbed.qemu.migration import MigrationResult, migrate
from testbed.spec.cluster_spec import parse_cluster_spec
from tests.vm_lab import CACHE, vm_workdir

SPEC = """\
version: 1
name: benchmig
backend: qemu
image: default
nodes:
  - name: vm1
    role: generic
    host: host1
"""


def figures(result: MigrationResult) -> dict[str, object]:
    return {"tls": result.tls, "from": result.source, "to": result.destination,
            "migrate3_s": result.migration_seconds, "downtime_ms": result.downtime_ms,
            "data_mib": None if result.data_bytes is None else round(result.data_bytes / 2**20, 1),
            "page_mib": None if result.page_bytes is None else round(result.page_bytes / 2**20, 1),
            "command_s": result.seconds}


def _teardown(root: Path) -> None:
    """The VM and the lab, whatever the run got to."""
    QemuBackend(ClusterPaths(root, "benchmig")).down(purge=True)
    hosts.down(root)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    os.environ["TESTBED_IMAGE_CACHE"] = str(CACHE)  # for the lab and the cluster, in-process
    bridge, subnet = scratch_network("tbbm")
    out: dict[str, object] = {"load_before": os.getloadavg()}
    with vm_workdir("bench-migration-", _teardown) as root:
        started = time.monotonic()
        hosts.up(root, 2, bridge=bridge, subnet=subnet)
        spec = parse_cluster_spec(SPEC, root)
        paths = ClusterPaths(root, spec.name)
        backend = QemuBackend(paths)
        try:
            up = cluster.up(backend, spec, Progress(quiet=True))
        finally:
            backend.close()
        assert up.ok and not up.rejected, up.to_dict()
        out["setup_s"] = round(time.monotonic() - started, 1)
        rounds = []
        for _ in range(args.rounds):
            tls = migrate(paths, "vm1", "host2")
            plain = migrate(paths, "vm1", "host1", tls=False)
            rounds.append({"tls": figures(tls), "baseline_no_tls": figures(plain)})
        out["rounds"] = rounds
        out["load_after"] = os.getloadavg()
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
