"""``testbed migrate NODE --to HOST``: attested, TLS-encrypted live migration of a placed
VM to another host of the lab (docs/hosts.md, "Migration")."""

from __future__ import annotations

import argparse

from testbed.cli.exitcodes import EXIT_OK
from testbed.cli.render import emit
from testbed.core.paths import existing_cluster
from testbed.core.progress import Progress
from testbed.qemu.migration import MigrationResult, migrate, random_marker

__all__ = ["register_migrate_commands"]


def register_migrate_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]
                              ) -> None:
    p = sub.add_parser("migrate", help="live-migrate a placed VM to another host: refused "
                       "unless that host attests now (exit 1); TLS with credentials the lab "
                       "issues to attested hosts")
    p.add_argument("node", help="node name (its VM runs on a host of the lab)")
    p.add_argument("--to", required=True, metavar="HOST", dest="to",
                   help="destination host (host1, host2, ...)")
    p.add_argument("--prove-encryption", action="store_true",
                   help="hold a random marker in the guest's RAM and capture the lab bridge "
                        "during the migration: the marker must not be seen")
    p.add_argument("--no-tls", action="store_true",
                   help="LAB CONTROL ONLY: migrate in clear text (with --prove-encryption the "
                        "capture then sees the marker); never for a VM you trust")
    p.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    paths = existing_cluster(args.workdir, args.cluster, node=args.node,
                             up="testbed up SPEC --backend qemu")
    marker = random_marker() if args.prove_encryption else None
    result = migrate(paths, args.node, args.to, tls=not args.no_tls, marker=marker,
                     progress=Progress(quiet=args.json))
    emit(args, {"ok": True, **result.to_dict()}, lambda: _print(result))
    return EXIT_OK


def _print(result: MigrationResult) -> None:
    how = "TLS" if result.tls else "CLEAR TEXT (lab control)"
    downtime = "?" if result.downtime_ms is None else f"{result.downtime_ms} ms"
    print(f"{result.node}: {result.source} -> {result.destination} ({how}): migrated in "
          f"{result.migration_seconds:.1f} s (downtime {downtime}; {result.seconds:.1f} s "
          f"with attestation and credentials)")
    if result.destination_attestation is not None:
        print(f"  {result.destination}: attested now, "
              f"{result.destination_attestation['message']}")
    if result.capture is not None:
        seen = result.capture["marker_frames"]
        print(f"  capture on {result.capture['bridge']}: {result.capture['frames']} frames, "
              f"{seen} carrying the guest's marker "
              f"({'CLEAR TEXT on the wire' if seen else 'not seen: encrypted'})")
    print(f"  {result.source}: " + ("nothing of the VM left" if not result.source_left
                                    else f"left: {', '.join(result.source_left)}"))
