"""CLI hooks for the QEMU backend: ``testbed image ...`` and ``testbed qemu ...``.

The lead wires them into :func:`testbed.cli.build_parser`::

    from testbed.qemu.commands import register_image_commands, register_qemu_commands
    register_image_commands(sub)
    register_qemu_commands(sub)

Handlers take the parsed ``argparse.Namespace`` (with the global ``--workdir``)
and return the exit code; errors are :class:`~attestation.errors.TestbedError`
subclasses, which ``testbed.cli.main`` already maps to exit codes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time
from pathlib import Path
from typing import Any

from attestation.policy import dump_policy
from testbed.output import emit, print_report
from testbed.workdir import resolve_workdir

__all__ = ["cmd_image_build", "cmd_qemu_attest", "cmd_qemu_cleanup", "cmd_qemu_policy",
           "register_image_commands", "register_qemu_commands"]

EXIT_OK, EXIT_REJECTED = 0, 1


def _json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _recipe_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", type=Path, metavar="YAML",
                        help="image recipe (default: images/guest.yaml)")


def register_image_commands(sub: Any) -> None:
    """``testbed image build``: build (or reuse) the cached guest image."""
    image = sub.add_parser("image", help="guest images for the QEMU backend")
    isub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    p = isub.add_parser("build", help="build the guest image (cached by a hash of its inputs)")
    _recipe_flag(p)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    _json_flag(p)
    p.set_defaults(func=cmd_image_build)


def register_qemu_commands(sub: Any) -> None:
    """``testbed qemu policy`` and ``testbed qemu attest``."""
    qemu = sub.add_parser("qemu", help="real VMs: OVMF measured boot, vTPM, attestation")
    qsub = qemu.add_subparsers(dest="qemu_command", metavar="ACTION", required=True)
    p = qsub.add_parser("policy", help="write the policy predicted for the guest image")
    _recipe_flag(p)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="YAML")
    p.set_defaults(func=cmd_qemu_policy)
    p = qsub.add_parser("attest", help="boot VMs, attest each against the predicted policy, "
                                       "tear everything down")
    _recipe_flag(p)
    p.add_argument("-n", "--nodes", type=int, default=1, help="VMs to boot in parallel")
    p.add_argument("--append", default="", metavar="TEXT",
                   help="append TEXT to the booted command line (not to the policy's): "
                        "an attack demo, e.g. --append ' init=/bin/sh'")
    _json_flag(p)
    p.set_defaults(func=cmd_qemu_attest)
    p = qsub.add_parser("cleanup", help="destroy testbed-* domains left by a killed run "
                                        "(only when no other testbed run is active)")
    p.set_defaults(func=cmd_qemu_cleanup)


def _image(args: argparse.Namespace, *, force: bool = False) -> Any:
    from testbed.qemu.image import build_image, image_cache
    from testbed.qemu.recipe import DEFAULT_RECIPE, load_recipe

    recipe = load_recipe(args.recipe or DEFAULT_RECIPE)
    return build_image(image_cache(resolve_workdir(args.workdir)), recipe, force=force)


def _backend(args: argparse.Namespace) -> Any:
    from testbed.qemu.backend import QemuBackend
    from testbed.qemu.image import image_cache

    workdir = resolve_workdir(args.workdir)
    return QemuBackend(workdir, reference_dir=image_cache(workdir) / "firmware")


def cmd_image_build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    image = _image(args, force=args.force)
    m = image.manifest
    data = {"directory": str(image.directory), "digest": image.digest,
            "kernel_version": m["kernel_version"], "cmdline": image.cmdline,
            "kernel_bytes": m["kernel"]["size"], "initrd_bytes": m["initrd"]["size"],
            "build_seconds": m["build_seconds"],
            "this_run_seconds": round(time.monotonic() - started, 1)}

    def human() -> None:
        print(f"image {image.digest[:16]} in {image.directory}")
        print(f"  kernel {m['kernel_version']} ({m['kernel']['size'] >> 20} MiB), initrd "
              f"{m['initrd']['size'] >> 20} MiB, built in {m['build_seconds']} s")

    emit(args, data, human)
    return EXIT_OK


def cmd_qemu_policy(args: argparse.Namespace) -> int:
    image = _image(args)
    with _backend(args) as backend:
        policy = backend.predicted_policy(image)
    args.output.write_text(dump_policy(policy))
    print(f"wrote {args.output} ({len(policy.events)} expected events, PCRs 0-9)")
    return EXIT_OK


def cmd_qemu_attest(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= 8:
        raise SystemExit("testbed qemu attest: --nodes must be 1..8")
    image = _image(args)
    with _backend(args) as backend:
        policy = backend.predicted_policy(image)
        started = time.monotonic()
        nodes = [backend.boot(f"vm{i}", image, cmdline=image.cmdline + args.append)
                 for i in range(args.nodes)]

        def attest(node: Any) -> Any:
            backend.wait(node)
            return backend.attest(node, policy)[0]

        with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
            reports = list(pool.map(attest, nodes))
        total = time.monotonic() - started
        data = {"accel": backend.accel.accel, "accel_reason": backend.accel.reason,
                "seconds_to_all_attested": round(total, 1),
                "nodes": [{"name": n.name, "boot_seconds": round(n.boot_seconds or 0, 1),
                           **r.to_dict()} for n, r in zip(nodes, reports, strict=True)]}

        def human() -> None:
            print(f"accelerator: {backend.accel.accel} ({backend.accel.reason})")
            for node, report in zip(nodes, reports, strict=True):
                print_report(report, f"{node.name} (agent up {node.boot_seconds:.1f} s "
                                     "after define)")
            print(f"{len(nodes)} node(s) attested in {total:.1f} s")

        emit(args, data, human)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_REJECTED


def cmd_qemu_cleanup(args: argparse.Namespace) -> int:
    from testbed.qemu.domain import connect, remove_leftovers
    from testbed.qemu.libvirtd import ensure_daemons

    daemons = ensure_daemons(resolve_workdir(args.workdir) / "run" / "libvirt")
    try:
        conn = connect()
        try:
            removed = remove_leftovers(conn)
        finally:
            conn.close()
    finally:
        daemons.stop()
    print(f"removed {len(removed)} domain(s): {', '.join(removed) or '-'}")
    return EXIT_OK
