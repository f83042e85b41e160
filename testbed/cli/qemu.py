"""``testbed image build`` and ``testbed qemu policy | attest | cleanup``: guest images and
one-off VMs (clusters of VMs are ``testbed up --backend qemu``, :mod:`testbed.cli.cluster`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import time
from pathlib import Path

from attestation.files import atomic_write
from attestation.policy import dump_policy
from attestation.report import VerificationReport
from testbed.cli.exitcodes import EXIT_OK, EXIT_REJECTED
from testbed.cli.render import emit, print_report
from testbed.core.errors import ArgumentError
from testbed.core.paths import resolve_workdir
from testbed.qemu.domain import connect, remove_leftovers
from testbed.qemu.image.build import GuestImage, build_image, image_cache
from testbed.qemu.image.encrypted import (
    EncryptedImage,
    TenantCryptoVm,
    build_encrypted_image,
    tenant_directory,
)
from testbed.qemu.libvirtd import ensure_daemons
from testbed.qemu.vms import QemuNode, VmDriver
from testbed.spec.recipe import DEFAULT_RECIPE, load_recipe

__all__ = ["cmd_image_build", "cmd_qemu_attest", "cmd_qemu_cleanup", "cmd_qemu_policy",
           "register_image_commands", "register_qemu_commands"]


def _recipe_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", type=Path, metavar="YAML",
                        help="image recipe (default: images/guest.yaml)")


def register_image_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``testbed image build``: build (or reuse) the cached guest image."""
    image = sub.add_parser("image", help="guest images for the QEMU backend")
    isub = image.add_subparsers(dest="image_command", metavar="ACTION", required=True)
    p = isub.add_parser("build", help="build the guest image (cached by a hash of its inputs)")
    _recipe_flag(p)
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--encrypted", action="store_true",
                   help="put the root filesystem on a LUKS disk whose key is generated in "
                        "the tenant's CryptoVM; only kernel and initrd stay in clear "
                        "(docs/svd.md)")
    p.set_defaults(func=cmd_image_build)


def register_qemu_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.set_defaults(func=cmd_qemu_attest)
    p = qsub.add_parser("cleanup", help="destroy testbed-* domains left by a killed run "
                                        "(only when no other testbed run is active)")
    p.set_defaults(func=cmd_qemu_cleanup)


def _image(args: argparse.Namespace, *, force: bool = False) -> GuestImage:
    recipe = load_recipe(args.recipe or DEFAULT_RECIPE)
    return build_image(image_cache(resolve_workdir(args.workdir)), recipe, force=force)


def _driver(args: argparse.Namespace) -> VmDriver:
    workdir = resolve_workdir(args.workdir)
    return VmDriver(workdir, reference_dir=image_cache(workdir) / "firmware")


def _encrypted_image(args: argparse.Namespace) -> EncryptedImage:
    recipe = load_recipe(args.recipe or DEFAULT_RECIPE)
    cache = image_cache(resolve_workdir(args.workdir))
    with TenantCryptoVm(tenant_directory(cache)) as tenant:
        return build_encrypted_image(cache, recipe, tenant, force=args.force)


def cmd_image_build(args: argparse.Namespace) -> int:
    started = time.monotonic()
    encrypted = _encrypted_image(args) if getattr(args, "encrypted", False) else None
    image = encrypted.boot if encrypted else _image(args, force=args.force)
    m = image.manifest
    data = {"directory": str(image.directory), "digest": image.digest,
            "kernel_version": m["kernel_version"], "cmdline": image.cmdline,
            "kernel_bytes": m["kernel"]["size"], "initrd_bytes": m["initrd"]["size"],
            "build_seconds": m["build_seconds"],
            "this_run_seconds": round(time.monotonic() - started, 1)}
    if encrypted is not None:
        data["encrypted"] = {"root_disk": str(encrypted.root),
                             "root_bytes": m["root"]["luks_bytes"],
                             "key_id": encrypted.binding.key_id,
                             "luks_uuid": encrypted.binding.luks_uuid}

    def human() -> None:
        print(f"image {image.digest[:16]} in {image.directory}")
        print(f"  kernel {m['kernel_version']} ({m['kernel']['size'] >> 20} MiB), initrd "
              f"{m['initrd']['size'] >> 20} MiB, built in {m['build_seconds']} s")
        if encrypted is not None:
            print(f"  root filesystem encrypted: {encrypted.root.name} "
                  f"({m['root']['luks_bytes'] >> 20} MiB, LUKS1), key "
                  f"{encrypted.binding.key_id} in the tenant's CryptoVM")

    emit(args, data, human)
    return EXIT_OK


def cmd_qemu_policy(args: argparse.Namespace) -> int:
    image = _image(args)
    with _driver(args) as driver:
        policy = driver.predicted_policy(image)
    atomic_write(args.output, dump_policy(policy).encode(), mode=0o644)
    emit(args, {"output": str(args.output), "policy": policy.name,
                 "expected_events": len(policy.events),
                 "pcr_values": {str(i): v.hex() for i, v in policy.pcrs.items()}},
         lambda: print(f"wrote {args.output} ({len(policy.events)} expected events, "
                       "PCRs 0-9)"))
    return EXIT_OK


def cmd_qemu_attest(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= 8:
        raise ArgumentError(f"--nodes {args.nodes}: must be 1..8 (each VM needs ~1 GiB and "
                            "a share of 2 cores under TCG)")
    image = _image(args)
    with _driver(args) as driver:
        policy = driver.predicted_policy(image)
        started = time.monotonic()
        nodes = [driver.boot(f"vm{i}", image, cmdline=image.cmdline + args.append)
                 for i in range(args.nodes)]

        def attest(node: QemuNode) -> VerificationReport:
            driver.wait(node)
            return driver.attest(node, policy)[0]

        with concurrent.futures.ThreadPoolExecutor(len(nodes)) as pool:
            reports = list(pool.map(attest, nodes))
        total = time.monotonic() - started
        data = {"accel": driver.accel.accel, "accel_reason": driver.accel.reason,
                "seconds_to_all_attested": round(total, 1),
                "nodes": [{"name": n.name, "boot_seconds": round(n.boot_seconds or 0, 1),
                           **r.to_dict()} for n, r in zip(nodes, reports, strict=True)]}

        def human() -> None:
            print(f"accelerator: {driver.accel.accel} ({driver.accel.reason})")
            for node, report in zip(nodes, reports, strict=True):
                print_report(report, f"{node.name} (agent up {node.boot_seconds:.1f} s "
                                     "after define)")
            print(f"{len(nodes)} node(s) attested in {total:.1f} s")

        emit(args, data, human)
    return EXIT_OK if all(r.ok for r in reports) else EXIT_REJECTED


def cmd_qemu_cleanup(args: argparse.Namespace) -> int:
    daemons = ensure_daemons(resolve_workdir(args.workdir) / "run" / "libvirt")
    try:
        conn = connect()
        try:
            removed = remove_leftovers(conn)
        finally:
            conn.close()
    finally:
        daemons.stop()
    emit(args, {"removed_domains": list(removed)},
         lambda: print(f"removed {len(removed)} domain(s): {', '.join(removed) or '-'}"))
    return EXIT_OK
