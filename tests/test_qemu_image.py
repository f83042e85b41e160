"""Guest image building blocks: recipe validation, cache key, newc writer, modules, mirrors.

The full build (mmdebstrap, ~40-90 s) runs in the VM tests; these need no network.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import stat
from pathlib import Path

import pytest
import yaml

from testbed.cli.options import spread_global_options
from testbed.cli.qemu import register_image_commands, register_qemu_commands
from testbed.qemu.image.build import _module_order, host_debian_sources, image_digest
from testbed.qemu.image.initramfs import write_newc
from testbed.spec.recipe import DEFAULT_RECIPE, RecipeError, load_recipe, parse_recipe


def read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, content) of a newc archive (test-side reader)."""
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        header = data[offset : offset + 110]
        assert header[:6] == b"070701"
        fields = [int(header[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        mode, size, name_size = fields[1], fields[6], fields[11]
        name = data[offset + 110 : offset + 110 + name_size - 1].decode()
        offset += 110 + name_size
        offset += -offset % 4
        content = data[offset : offset + size]
        offset += size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, content)


def test_newc_round_trip_is_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc/hostname").write_text("guest\n")
    (root / "init").write_text("#!/bin/sh\n")
    os.chmod(root / "init", 0o755)
    (root / "bin").symlink_to("usr/bin")
    os.mkfifo(root / "fifo")
    first, second = io.BytesIO(), io.BytesIO()
    assert write_newc(root, first, epoch=1_700_000_000) == 5
    write_newc(root, second, epoch=1_700_000_000)
    assert first.getvalue() == second.getvalue()
    assert len(first.getvalue()) % 4 == 0
    entries = read_newc(first.getvalue())
    assert list(entries) == ["bin", "etc", "fifo", "init", "etc/hostname"]  # dirs first
    assert entries["etc/hostname"][1] == b"guest\n"
    assert entries["bin"] == (entries["bin"][0], b"usr/bin")
    assert stat.S_ISLNK(entries["bin"][0]) and stat.S_ISFIFO(entries["fifo"][0])
    assert stat.S_IMODE(entries["init"][0]) == 0o755


def test_default_recipe_is_valid() -> None:
    recipe = load_recipe()
    assert recipe.variant == "minbase" and recipe.kernel_package == "linux-image-amd64"
    assert "python3" in recipe.packages and "virtio_net" in recipe.modules
    assert recipe.init_script.read_text().startswith("#!/bin/sh")
    assert ("testbed/qemu/guest/agent.py", "opt/testbed/guest_agent.py") in recipe.project


def _doc() -> dict[str, object]:
    loaded = yaml.safe_load(DEFAULT_RECIPE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.mark.parametrize(("change", "message"), [
    ({"surprise": 1}, "unknown keys"),
    ({"version": 2}, "version"),
    ({"packages": ["ok", "bad;rm -rf"]}, r"packages\[1\]"),
    ({"remove": ["../etc"]}, "stay inside"),
    ({"remove": ["/etc"]}, "relative"),
    ({"project": {"no/such/file.py": "opt/x"}}, "does not exist"),
    ({"agent_port": 0}, "agent_port"),
    ({"compression": "lzma"}, "compression"),
    ({"mirror": "ftp://example.invalid"}, "mirror"),
    ({"cmdline": "a\nb"}, "cmdline"),
])
def test_bad_recipes_name_the_field(change: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        parse_recipe({**_doc(), **change})


def test_digest_follows_inputs_but_not_the_command_line(tmp_path: Path) -> None:
    shutil.copy(DEFAULT_RECIPE, tmp_path / "guest.yaml")
    shutil.copy(DEFAULT_RECIPE.parent / "init", tmp_path / "init")
    recipe = load_recipe(tmp_path / "guest.yaml")
    digest = image_digest(recipe)
    assert image_digest(recipe.with_cmdline("console=ttyS0 init=/bin/sh")) == digest
    (tmp_path / "init").write_text((tmp_path / "init").read_text() + "# changed\n")
    assert image_digest(load_recipe(tmp_path / "guest.yaml")) != digest
    doc = _doc()
    doc["packages"] = [*doc["packages"], "strace"]  # type: ignore[misc]
    (tmp_path / "guest.yaml").write_text(yaml.safe_dump(doc))
    assert image_digest(load_recipe(tmp_path / "guest.yaml")) != digest


def test_module_order_puts_dependencies_first(tmp_path: Path) -> None:
    moddir = tmp_path / "lib/modules/6.1.0-test"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/virtio_net.ko: kernel/net_failover.ko kernel/failover.ko kernel/virtio.ko "
        "kernel/virtio_ring.ko\n"
        "kernel/net_failover.ko: kernel/failover.ko\n"
        "kernel/failover.ko:\n"
        "kernel/virtio.ko: kernel/virtio_ring.ko\n"
        "kernel/virtio_ring.ko:\n"
        "kernel/virtio_pci.ko: kernel/virtio.ko kernel/virtio_ring.ko\n")
    order = _module_order(tmp_path, "6.1.0-test", ("virtio_pci", "virtio-net"))
    assert order == ["kernel/virtio_ring.ko", "kernel/virtio.ko", "kernel/virtio_pci.ko",
                     "kernel/failover.ko", "kernel/net_failover.ko", "kernel/virtio_net.ko"]
    with pytest.raises(RecipeError, match="not a module"):
        _module_order(tmp_path, "6.1.0-test", ("tpm_crb",))


def test_mirror_comes_from_the_hosts_debian_sources_only(tmp_path: Path) -> None:
    sources = tmp_path / "etc/apt/sources.list.d"
    sources.mkdir(parents=True)
    (sources / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://disabled.example\nSuites: bookworm\nEnabled: no\n")
    (sources / "thirdparty.list").write_text("deb https://vendor.example/apt stable main\n")
    assert host_debian_sources("bookworm", tmp_path) == [
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://mirror.example/debian-security bookworm-security main",
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert host_debian_sources("bookworm", empty)[0].startswith("deb http://deb.debian.org/")


def test_cli_hooks_register_their_commands() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir")
    sub = parser.add_subparsers(dest="command", required=True)
    register_image_commands(sub)
    register_qemu_commands(sub)
    spread_global_options(parser)  # as the testbed command does: --json after any command
    args = parser.parse_args(["image", "build", "--force", "--json"])
    assert args.func.__name__ == "cmd_image_build" and args.force and args.json
    args = parser.parse_args(["qemu", "attest", "-n", "3", "--append", " init=/bin/sh"])
    assert (args.func.__name__, args.nodes, args.append) == ("cmd_qemu_attest", 3, " init=/bin/sh")
    args = parser.parse_args(["qemu", "policy", "-o", "p.yaml"])
    assert args.func.__name__ == "cmd_qemu_policy"
