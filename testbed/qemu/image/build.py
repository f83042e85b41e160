"""Guest images: a Debian root filesystem packed into the initramfs, plus its kernel.

``build_image(workdir, recipe)`` runs ``mmdebstrap`` (variant minbase, Debian
packages only, from the host's own Debian mirror), trims the tree (no docs,
locales, man pages, perl, dpkg database; only the kernel modules the recipe
names), copies the project's guest agent and ``attestation`` package in, installs
the recipe's ``/init`` and packs everything as one compressed ``newc`` archive.
The firmware then boots ``vmlinuz`` + ``initrd.img`` (QEMU direct kernel boot),
so measured boot covers the entire guest OS.

Images are cached under ``<workdir>/images/<digest>/`` where ``digest`` is the
SHA-256 of the recipe inputs (recipe fields except the command line, init
script, project files, resolved mirror list, builder version): the same inputs
never rebuild, any change does. Layout::

    vmlinuz  initrd.img  cmdline  manifest.json
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attestation.files import hash_file
from testbed.core.errors import StateError
from testbed.core.files import locked
from testbed.qemu.image.initramfs import write_newc
from testbed.spec.recipe import (
    REPO_ROOT,
    ImageRecipe,
    RecipeError,
    load_recipe,
    project_files,
)

__all__ = [
    "BUILDER_VERSION",
    "GuestImage",
    "ImageBuildError",
    "RootTree",
    "base_manifest",
    "build_image",
    "cached_image",
    "host_debian_sources",
    "image_cache",
    "image_digest",
    "pack_initrd",
    "prepare_rootfs",
]

BUILDER_VERSION = 1
MAX_IMAGE_FILE_BYTES = 1 << 31
MMDEBSTRAP_TIMEOUT_S = 1800
_SOURCES_FILES = ("etc/apt/sources.list", "etc/apt/sources.list.d/*.list",
                  "etc/apt/sources.list.d/*.sources")
_DEFAULT_MIRRORS = ("http://deb.debian.org/debian", "http://deb.debian.org/debian-security")


def image_cache(workdir: Path) -> Path:
    """Where guest images and firmware references live: ``$TESTBED_IMAGE_CACHE``, else
    the work directory. One cache serves every work directory (an image takes 30-90 s
    to build, a firmware reference a VM boot)."""
    return Path(os.environ.get("TESTBED_IMAGE_CACHE") or workdir).absolute()


class ImageBuildError(StateError):
    """The guest image could not be built (missing tool, mmdebstrap failure...)."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: the files a qemu node's firmware boots, and what went into
    them (the node's :class:`~testbed.spec.cluster_spec.BootSpec` names them, kind
    ``image``)."""

    directory: Path
    kernel: Path
    initrd: Path
    cmdline: str
    agent_port: int
    manifest: dict[str, Any]

    @property
    def digest(self) -> str:
        return str(self.manifest["digest"])

    @classmethod
    def load(cls, directory: Path, cmdline: str | None = None) -> GuestImage:
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(directory, directory / "vmlinuz", directory / "initrd.img",
                   cmdline if cmdline is not None else manifest["cmdline"],
                   int(manifest["agent_port"]), manifest)


# --- the host's Debian mirror -------------------------------------------------------------


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    stanza: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if stanza:
                yield stanza
            stanza = {}
        elif not line.startswith("#") and ":" in line and not line[0].isspace():
            key, _, value = line.partition(":")
            stanza[key.strip().lower()] = value.strip()


def _host_entries(root: Path) -> Iterator[tuple[str, str]]:
    """(URI, suite) of every enabled ``deb`` source on this host."""
    for pattern in _SOURCES_FILES:
        for name in sorted(glob.glob(str(root / pattern))):
            text = Path(name).read_text(errors="replace")
            if name.endswith(".sources"):
                for st in _deb822_stanzas(text):
                    if "deb" in st.get("types", "").split() and st.get("enabled", "yes") != "no":
                        for uri in st.get("uris", "").split():
                            yield from ((uri, suite) for suite in st.get("suites", "").split())
            else:
                for line in text.splitlines():
                    words = [w for w in line.split() if not w.startswith("[")]
                    if len(words) >= 3 and words[0] == "deb":
                        yield words[1], words[2]


def host_debian_sources(suite: str, root: Path = Path("/")) -> list[str]:
    """One-line ``deb`` sources for ``suite`` (+ -updates, -security) from the host's apt.

    Only entries whose suite is ``suite`` or ``suite-*`` are used, so third-party
    repositories on the host never end up in the guest. Falls back to
    deb.debian.org when the host has none (e.g. not a Debian host).
    """
    wanted = (suite, f"{suite}-updates", f"{suite}-security")
    lines = [f"deb {uri} {s} main" for uri, s in _host_entries(root) if s in wanted]
    if not lines:
        lines = [f"deb {_DEFAULT_MIRRORS[0]} {suite} main",
                 f"deb {_DEFAULT_MIRRORS[1]} {suite}-security main"]
    return list(dict.fromkeys(lines))


def _sources(recipe: ImageRecipe) -> list[str]:
    if recipe.mirror == "auto":
        return host_debian_sources(recipe.suite)
    return [f"deb {recipe.mirror} {recipe.suite} main"]


def image_digest(recipe: ImageRecipe) -> str:
    """The cache key of ``recipe``'s image."""
    extra = {"sources": "\n".join(_sources(recipe)), "builder": str(BUILDER_VERSION)}
    return recipe.inputs_digest(extra)


# --- build steps ------------------------------------------------------------------------


def _run(cmd: list[str], what: str, timeout: float, log: Path) -> None:
    with log.open("ab") as out:
        out.write(f"$ {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            res = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                 check=False)
        except subprocess.TimeoutExpired:
            raise ImageBuildError(f"{what} timed out after {timeout:.0f} s (log: {log})") from None
        except FileNotFoundError:
            raise ImageBuildError(f"{what}: {cmd[0]} is not installed; apt-get install "
                                  f"{cmd[0]} (see docs/qemu.md)") from None
    if res.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise ImageBuildError(f"{what} failed (exit {res.returncode}); log {log}:\n{tail}")


def _bootstrap(recipe: ImageRecipe, rootfs: Path, log: Path) -> None:
    if shutil.which("mmdebstrap") is None:
        raise ImageBuildError("mmdebstrap is not installed: apt-get install mmdebstrap")
    if os.geteuid() != 0:
        raise ImageBuildError("building the guest image needs root (mmdebstrap --mode=root "
                              "creates device nodes and runs maintainer scripts)")
    excludes = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*",
                "/usr/share/info/*"]
    cmd = ["mmdebstrap", "--mode=root", f"--variant={recipe.variant}",
           "--include=" + ",".join([recipe.kernel_package, *recipe.packages]),
           *(f"--dpkgopt=path-exclude={p}" for p in excludes),
           recipe.suite, str(rootfs), *_sources(recipe)]
    _run(cmd, "mmdebstrap", MMDEBSTRAP_TIMEOUT_S, log)


def _packages(rootfs: Path) -> dict[str, str]:
    """Installed packages and versions, from dpkg's status file."""
    packages: dict[str, str] = {}
    text = (rootfs / "var/lib/dpkg/status").read_text(errors="replace")
    for stanza in _deb822_stanzas(text):
        if stanza.get("status", "").endswith(" installed"):
            packages[stanza["package"]] = stanza.get("version", "")
    return dict(sorted(packages.items()))


def _kernel_version(rootfs: Path) -> str:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageBuildError(f"expected one kernel in /boot, found {[k.name for k in kernels]}")
    return kernels[0].name.removeprefix("vmlinuz-")


def _module_order(rootfs: Path, version: str, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to /lib/modules/VERSION) in load order, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (rootfs / "lib/modules" / version / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path not in order:
            for dep in reversed(deps[path]):
                visit(dep)
            order.append(path)

    for name in wanted:
        found = by_name.get(name.replace("-", "_"))
        if found is None:
            raise RecipeError(f"modules: {name} is not a module of kernel {version} "
                              "(built in, or misspelt)")
        visit(found)
    return order


def _trim_modules(rootfs: Path, version: str, keep: list[str]) -> None:
    moddir = rootfs / "lib/modules" / version
    saved = {path: (moddir / path).read_bytes() for path in keep}
    shutil.rmtree(moddir)
    for path, data in saved.items():
        (moddir / path).parent.mkdir(parents=True, exist_ok=True)
        (moddir / path).write_bytes(data)


def _remove(rootfs: Path, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        for name in glob.glob(str(rootfs / pattern)):
            path = Path(name)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def _elf_files(rootfs: Path, programs: list[Path]) -> list[Path]:
    """The kept programs plus every shared object under the Python trees."""
    trees = [rootfs / "usr/lib/python3", *sorted((rootfs / "usr/lib").glob("python3.*"))]
    objects = [p for tree in trees for p in sorted(tree.rglob("*.so")) if p.is_file()]
    return [*programs, *objects]


def _needed_libraries(rootfs: Path, files: list[Path], log: Path) -> set[str]:
    """Library paths (inside the image) that ``files`` load, per the image's own ld.so."""
    loader = "/lib64/ld-linux-x86-64.so.2"
    needed: set[str] = set()
    for path in files:
        inside = "/" + path.relative_to(rootfs).as_posix()
        res = subprocess.run(["chroot", str(rootfs), loader, "--list", inside],
                             capture_output=True, text=True, timeout=60, check=False)
        if res.returncode != 0:
            with log.open("a") as out:
                out.write(f"ld.so --list {inside} failed: {res.stderr.strip()}\n")
            raise ImageBuildError(f"cannot resolve the libraries of {inside} (log: {log})")
        for line in res.stdout.splitlines():
            target = line.partition("=>")[2].split("(")[0].strip()
            if target.startswith("/"):
                needed.add(target)
    return needed


def _prune(rootfs: Path, keep_programs: tuple[str, ...], log: Path) -> None:
    """Delete every program but ``keep_programs`` and every library nothing kept loads."""
    bindirs = [rootfs / "usr/bin", rootfs / "usr/sbin"]
    kept = [d / name for d in bindirs for name in keep_programs if (d / name).exists()]
    for directory in bindirs:
        for path in directory.iterdir():
            if path.name not in keep_programs:
                path.unlink()
    programs = [p.resolve() for p in kept]
    needed = {os.path.realpath(rootfs / name.lstrip("/"))
              for name in _needed_libraries(rootfs, _elf_files(rootfs, programs), log)}
    libdir = rootfs / "usr/lib/x86_64-linux-gnu"
    for path in libdir.iterdir():
        if path.is_dir() and not path.is_symlink():
            if path.name not in ("ossl-modules",):  # OpenSSL loads its providers itself
                shutil.rmtree(path)
        elif ".so" in path.name and str(path.resolve()) not in needed and \
                "ld-linux" not in path.name:
            path.unlink()


def _install_project(rootfs: Path, recipe: ImageRecipe, modules: list[str]) -> None:
    for source, dest in recipe.project:
        src = REPO_ROOT / source
        for path in project_files(source):
            target = rootfs / dest if path == src else rootfs / dest / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    etc = rootfs / "etc/testbed"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "modules").write_text("".join(f"{m}\n" for m in modules))
    (etc / "agent_port").write_text(f"{recipe.agent_port}\n")
    (rootfs / "etc/hostname").write_text(f"{recipe.name}\n")
    shutil.copyfile(recipe.init_script, rootfs / "init")
    os.chmod(rootfs / "init", 0o755)  # noqa: S103 - the guest's PID 1 must be executable


def _compile_python(rootfs: Path, recipe: ImageRecipe, log: Path) -> None:
    """Byte-compile the project files with the guest's own Python (its bytecode magic)."""
    targets = sorted({"/" + dest for _, dest in recipe.project})
    cmd = ["chroot", str(rootfs), "python3", "-m", "compileall", "-q",
           "--invalidation-mode", "unchecked-hash", *targets]
    _run(cmd, "compileall", 300, log)


def _pack(rootfs: Path, target: Path, compression: str, epoch: int) -> None:
    tool = {"zstd": ["zstd", "-q", "-T0", "-10", "-c"], "gzip": ["gzip", "-n", "-6", "-c"]}
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        proc = subprocess.Popen(tool[compression], stdin=subprocess.PIPE, stdout=out)
        assert proc.stdin is not None
        with proc.stdin as pipe:
            write_newc(rootfs, pipe, epoch=epoch)
        if proc.wait() != 0:
            raise ImageBuildError(f"{compression} failed (exit {proc.returncode})")
    os.replace(tmp, target)


def _sha256(path: Path) -> str:
    return hash_file(path, MAX_IMAGE_FILE_BYTES, what="image file")[0].hex()


@dataclass
class RootTree:
    """A prepared root filesystem tree (bootstrapped, trimmed, project installed) and
    what the manifest says about it; packing it is up to the caller."""

    rootfs: Path
    kernel_version: str
    packages: dict[str, str]
    modules: list[str]


def prepare_rootfs(recipe: ImageRecipe, out: Path, scratch: Path) -> RootTree:
    """Every build step but packing: the tree under ``scratch``, ``vmlinuz`` into ``out``."""
    rootfs, log = scratch / "rootfs", out / "build.log"
    _bootstrap(recipe, rootfs, log)
    version = _kernel_version(rootfs)
    shutil.copyfile(rootfs / "boot" / f"vmlinuz-{version}", out / "vmlinuz")
    packages = _packages(rootfs)
    modules = _module_order(rootfs, version, recipe.modules)
    _trim_modules(rootfs, version, modules)
    _install_project(rootfs, recipe, modules)
    _compile_python(rootfs, recipe, log)
    _remove(rootfs, (*recipe.remove, "var/lib/dpkg"))
    if recipe.keep_programs:
        _prune(rootfs, recipe.keep_programs, log)
    return RootTree(rootfs, version, packages, modules)


def base_manifest(recipe: ImageRecipe, digest: str, out: Path, tree: RootTree,
                  started: float) -> dict[str, Any]:
    """The manifest of a packed image in ``out`` (vmlinuz and initrd.img written)."""
    return {
        "digest": digest, "name": recipe.name, "recipe": recipe.to_dict(),
        "sources": _sources(recipe), "kernel_version": tree.kernel_version,
        "modules": tree.modules, "packages": tree.packages, "cmdline": recipe.cmdline,
        "agent_port": recipe.agent_port,
        "kernel": {"sha256": _sha256(out / "vmlinuz"), "size": (out / "vmlinuz").stat().st_size},
        "initrd": {"sha256": _sha256(out / "initrd.img"),
                   "size": (out / "initrd.img").stat().st_size},
        "build_seconds": round(time.monotonic() - started, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def pack_initrd(rootfs: Path, target: Path, compression: str) -> None:
    """``rootfs`` as the compressed initramfs ``target`` (mtimes clamped to now)."""
    _pack(rootfs, target, compression, int(time.time()))


def _build(recipe: ImageRecipe, digest: str, out: Path, scratch: Path) -> dict[str, Any]:
    started = time.monotonic()
    tree = prepare_rootfs(recipe, out, scratch)
    pack_initrd(tree.rootfs, out / "initrd.img", recipe.compression)
    return base_manifest(recipe, digest, out, tree, started)


def cached_image(workdir: Path, recipe: ImageRecipe) -> GuestImage | None:
    """The image for ``recipe`` if it is already built, else None."""
    directory = Path(workdir).absolute() / "images" / image_digest(recipe)
    if not (directory / "manifest.json").is_file():
        return None
    return GuestImage.load(directory, recipe.cmdline)


def build_image(workdir: Path, recipe: ImageRecipe | None = None, *,
                force: bool = False) -> GuestImage:
    """Build (or reuse the cached) guest image for ``recipe`` under ``workdir/images``."""
    recipe = recipe or load_recipe()
    images = Path(workdir).absolute() / "images"
    images.mkdir(parents=True, exist_ok=True)
    digest = image_digest(recipe)
    directory = images / digest
    with locked(images / ".build.lock"):  # one build at a time: mmdebstrap is heavy
        if (directory / "manifest.json").is_file() and not force:
            return GuestImage.load(directory, recipe.cmdline)
        partial = images / f".{digest}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(mode=0o755)
        with tempfile.TemporaryDirectory(dir=images, prefix=".scratch-") as scratch:
            manifest = _build(recipe, digest, partial, Path(scratch))
        (partial / "cmdline").write_text(recipe.cmdline + "\n")
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        for name in ("vmlinuz", "initrd.img", "cmdline", "manifest.json"):
            os.chmod(partial / name, 0o644)  # QEMU runs as libvirt-qemu and must read them
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(partial, directory)
    return GuestImage.load(directory, recipe.cmdline)
