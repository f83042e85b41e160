"""CI in a container (docs/ci/): the Containerfile, its ignore file and the example
workflow run the same commands as .ci/run; and the image really builds and runs the
suite's swtpm tests here, with podman (rootful, vfs storage).

No registry can be reached from this machine, so the `debian:12` base is made with
debootstrap from the host's Debian mirror and imported. Building is slow (minutes), so
the base and the image are cached machine-wide under /var/cache/trusted-testbed/containers
(or $TESTBED_CONTAINER_CACHE), so every CI clone on one machine reuses them, tagged by a
hash of everything that goes into them: an unchanged tree costs one `podman run`, a
changed one rebuilds the image's last layer.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CI_DIR = ROOT / "docs" / "ci"
CONTAINERFILE = CI_DIR / "Containerfile"
IGNOREFILE = CI_DIR / "Containerfile.dockerignore"
WORKFLOW = CI_DIR / "github-actions.yml"
# podman storage and configuration (several GB with vfs); TESTBED_CONTAINER_CACHE moves it
# out of the checkout, e.g. to keep it across fresh clones on a CI machine
CACHE = Path(os.environ.get("TESTBED_CONTAINER_CACHE")
             or "/var/cache/trusted-testbed/containers")
SUITE = "bookworm"
BASE_RECIPE = "debootstrap --variant=minbase v1"  # bump to rebuild every cached base
IN_IMAGE_TEST = "tests/test_container_swtpm_fixture.py"
INSTALL_HINT = "run `sh .ci/bootstrap` (apt: podman buildah runc debootstrap)"


# --- the Containerfile, read as a builder does ---------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def parse_containerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(args.split())))
    assert not pending, "Containerfile ends inside a continued line"
    return instructions


def test_containerfile_is_debian12_and_runs_the_projects_own_commands() -> None:
    instructions = parse_containerfile(CONTAINERFILE.read_text())
    keywords = [i.keyword for i in instructions]
    assert set(keywords) <= {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "CMD"}
    assert instructions[0] == Instruction("ARG", "BASE_IMAGE=debian:12")
    assert instructions[1] == Instruction("FROM", "${BASE_IMAGE}")
    assert keywords.count("FROM") == 1
    runs = [i.args for i in instructions if i.keyword == "RUN"]
    assert all("sh .ci/bootstrap" in r for r in runs) and len(runs) == 2
    # the whole tree is copied before the last bootstrap, and the default command is .ci/test
    copy_all = instructions.index(Instruction("COPY", ". /src/"))
    assert copy_all < len(instructions) - 1 - keywords[::-1].index("RUN")
    assert instructions[-1] == Instruction("CMD", '["sh", ".ci/test"]')
    # ... which are the commands CI runs
    ci_run = (ROOT / ".ci" / "run").read_text()
    assert "sh .ci/bootstrap && sh .ci/test" in ci_run
    # the image's own suite does not try to build the image inside it
    assert Instruction("ENV", "TESTBED_IN_CI_IMAGE=1") in instructions


def ignore_patterns() -> list[str]:
    return [line.strip() for line in IGNOREFILE.read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as Docker reads it: `*` and `?` stay within one path
    element, a leading `**/` matches any number of directories."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def ignored(relative: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``relative`` out: a pattern matching the path or
    one of its parent directories (no `!` exceptions are used in the ignore file)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    return any(_pattern_regex(p).match(prefix) for p in patterns for prefix in prefixes)


def test_ignore_file_keeps_state_caches_and_secrets_out_of_the_context() -> None:
    patterns = ignore_patterns()
    for path in [".git/config", ".venv/bin/python", ".testbed/ca/signkey.pem",
                 "testbed/__pycache__/cli.cpython-311.pyc", "a/b/server.key",
                 "x/y-privkey.pem", "images/out/vmlinuz", "disk.qcow2", "ansible/results/x",
                 "trusted_hypervisor_testbed.egg-info/PKG-INFO", ".mypy_cache/x"]:
        assert ignored(path, patterns), path
    for path in ["pyproject.toml", ".ci/bootstrap", ".ci/constraints.txt", "testbed/cli.py",
                 "tests/conftest.py", "images/guest.yaml", "docs/ci/Containerfile",
                 "ansible/site.yml"]:
        assert not ignored(path, patterns), path
    # everything .gitignore keeps out of the repository stays out of the image too
    for line in (ROOT / ".gitignore").read_text().splitlines():
        entry = line.strip().rstrip("/")
        if not entry or entry.startswith("#"):
            continue
        sample = entry.replace("*", "x")
        assert ignored(sample, patterns), entry
        if entry.startswith("*"):  # a pattern without a slash applies at any depth
            assert ignored(f"sub/dir/{sample}", patterns), entry


def test_workflow_builds_the_image_and_runs_the_suite_in_it() -> None:
    workflow: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    assert triggers and "pull_request" in triggers
    assert workflow["jobs"]
    for name, job in workflow["jobs"].items():
        assert job["runs-on"] and job["timeout-minutes"] <= 90, name
        commands = [step["run"] for step in job["steps"] if "run" in step]
        assert any(step.get("uses", "").startswith("actions/checkout@")
                   for step in job["steps"]), name
        build = [c for c in commands if c.startswith("docker build")]
        assert build and "--file docs/ci/Containerfile" in build[0], name
        tag = shlex.split(build[0])[shlex.split(build[0]).index("--tag") + 1]
        runs = [shlex.split(c) for c in commands if c.startswith("docker run")]
        assert runs and tag in runs[0], name
        assert runs[0][runs[0].index(tag) + 1:][:2] == ["sh", ".ci/test"], name
    full = workflow["jobs"]["test"]["steps"][-1]["run"]
    assert full.strip().endswith("testbed-ci sh .ci/test")  # the whole suite, no selection


# --- building and running the image here ---------------------------------------------------------


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"missing: {', '.join(missing)}: {INSTALL_HINT}", pytrace=False)


class Podman:
    """podman with its own storage (vfs) and configuration under the cache directory."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        runtime = "runc" if shutil.which("runc") else "crun"
        # Rootful podman without systemd: cgroupfs, file events, host network (no CNI or
        # netavark needed), and ulimits within the host's hard limits (root here has no
        # CAP_SYS_RESOURCE: podman's defaults would fail in setrlimit). runc, because
        # crun refuses hybrid cgroup v1/v2 hierarchies like this machine's.
        nofile = min(_hard_limit("NOFILE"), 65536)
        nproc = min(_hard_limit("NPROC"), 4096)
        (cache / "containers.conf").write_text("\n".join([
            "[containers]",
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]',
            'netns = "host"',
            "[engine]",
            'cgroup_manager = "cgroupfs"',
            'events_logger = "file"',
            f'runtime = "{runtime}"',
            f'tmp_dir = "{cache / "tmp"}"', ""]))
        (cache / "storage.conf").write_text("\n".join([
            "[storage]", 'driver = "vfs"', f'graphroot = "{cache / "storage"}"',
            f'runroot = "{cache / "run"}"', ""]))
        self.env = {**os.environ, "CONTAINERS_CONF": str(cache / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(cache / "storage.conf")}

    def run(self, *args: str, timeout: float = 900, stdin: Any = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, stdin=stdin)
        if check and proc.returncode != 0:
            pytest.fail(f"podman {' '.join(args)} exited {proc.returncode}:\n"
                        f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}", pytrace=False)
        return proc

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def drop_other_tags(self, repository: str, keep: str) -> None:
        listing = self.run("images", "--format", "{{.Repository}}:{{.Tag}}", repository).stdout
        old = [t for t in listing.split() if t != keep and t.startswith(repository + ":")]
        if old:
            self.run("rmi", "--force", *old, check=False)
        self.run("image", "prune", "--force", check=False)


def _hard_limit(name: str) -> int:
    import resource

    hard = resource.getrlimit(getattr(resource, f"RLIMIT_{name}"))[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def context_digest(extra: list[str]) -> str:
    """SHA-256 over every file of the build context (as the ignore file leaves it)."""
    patterns = ignore_patterns()
    digest = hashlib.sha256("\0".join(extra).encode())
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel_dir = os.path.relpath(dirpath, ROOT)
        dirnames[:] = sorted(d for d in dirnames
                             if not ignored(os.path.normpath(os.path.join(rel_dir, d)),
                                            patterns))
        for name in sorted(filenames):
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if ignored(rel, patterns):
                continue
            path = Path(dirpath) / name
            digest.update(f"\0{rel}\0{path.stat().st_mode & 0o111}\0".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _base_image(podman: Podman, scratch: Path) -> tuple[str, float]:
    """The Debian 12 base: debootstrap from the host's mirror, imported (cached)."""
    from testbed.qemu.image.build import host_debian_sources

    sources = host_debian_sources(SUITE)
    mirror = next(line.split()[1] for line in sources if line.split()[2] == SUITE)
    tag = "localhost/testbed-debian-base:" + hashlib.sha256(
        "\n".join([BASE_RECIPE, *sources]).encode()).hexdigest()[:16]
    if podman.exists(tag):
        return tag, 0.0
    started = time.monotonic()
    rootfs = scratch / "rootfs"
    proc = subprocess.run(["debootstrap", "--variant=minbase", SUITE, str(rootfs), mirror],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"debootstrap exited {proc.returncode}:\n{proc.stdout[-3000:]}"
                    f"\n{proc.stderr[-3000:]}", pytrace=False)
    # like the official image: bookworm, -updates, -security; no caches or package lists
    (rootfs / "etc/apt/sources.list").write_text("\n".join(sources) + "\n")
    for leftover in ["var/cache/apt/archives", "var/lib/apt/lists"]:
        for item in (rootfs / leftover).glob("*"):
            if item.is_file():
                item.unlink()
    with subprocess.Popen(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", "-", "."],
                          stdout=subprocess.PIPE) as tar:
        podman.run("import", "--change", "CMD [\"bash\"]", "-", tag, stdin=tar.stdout)
    shutil.rmtree(rootfs, ignore_errors=True)
    podman.drop_other_tags("localhost/testbed-debian-base", tag)
    return tag, time.monotonic() - started


def _host_ca_mounts(scratch: Path) -> list[str]:
    """Let pip inside the build trust what the host trusts (a TLS-intercepting proxy's CA,
    as on this project's machines): the host's bundle and a pip.conf naming it, mounted
    for the RUN steps only (nothing of it ends up in the image)."""
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if not bundle.is_file():
        return []
    pip_conf = scratch / "pip.conf"
    pip_conf.write_text("[global]\ncert = /run/host-ca.crt\n")
    return ["--volume", f"{bundle}:/run/host-ca.crt:ro", "--volume", f"{pip_conf}:/etc/pip.conf:ro"]


@pytest.fixture
def ci_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Podman, str]]:
    if os.environ.get("TESTBED_IN_CI_IMAGE"):
        pytest.skip("running inside the CI image built from docs/ci/Containerfile: "
                    "the image is not built again inside itself")
    if os.geteuid() != 0:
        pytest.fail("building the CI image needs root (rootful podman, debootstrap)",
                    pytrace=False)
    _require("podman", "buildah", "debootstrap", "tar")
    CACHE.mkdir(parents=True, exist_ok=True)
    podman = Podman(CACHE)
    scratch = tmp_path_factory.mktemp("ci-image")
    base, base_seconds = _base_image(podman, scratch)
    tag = "localhost/testbed-ci:" + context_digest(
        [base, CONTAINERFILE.read_text(), IGNOREFILE.read_text()])[:16]
    if not podman.exists(tag):
        started = time.monotonic()
        podman.run("build", "--layers", "--file", str(CONTAINERFILE), "--ignorefile",
                   str(IGNOREFILE), "--build-arg", f"BASE_IMAGE={base}", "--network", "host",
                   *_host_ca_mounts(scratch), "--tag", tag, str(ROOT), timeout=1800)
        print(f"\nbuilt {tag} in {time.monotonic() - started:.0f} s "
              f"(base: {'cached' if not base_seconds else f'{base_seconds:.0f} s'})")
        podman.drop_other_tags("localhost/testbed-ci", tag)
    yield podman, tag


def test_ci_image_has_the_tools_and_runs_the_suites_swtpm_tests(
        ci_image: tuple[Podman, str]) -> None:
    """One container (each `podman run` copies the whole image with vfs: ~15 s): what is
    in the image, then `sh .ci/test` on the swtpm fixture's tests, as CI would run it."""
    podman, tag = ci_image
    script = ("set -e; . /etc/os-release; echo debian=$VERSION_ID; "
              "for b in swtpm swtpm_setup swtpm_localca tpm2_getrandom; do command -v $b; done; "
              ".venv/bin/python -c 'import testbed, trusted_passages, tpm2_pytss'; "
              "test ! -e .testbed && test ! -e .git && echo clean-context; "
              f"exec sh .ci/test {IN_IMAGE_TEST}")
    proc = podman.run("run", "--rm", tag, "sh", "-c", script, timeout=600, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "debian=12" in output and "clean-context" in output
    for binary in ("swtpm", "swtpm_setup", "swtpm_localca", "tpm2_getrandom"):
        assert f"/usr/bin/{binary}" in output, binary
    assert "== ruff" in output and "== mypy" in output and "== pytest" in output
    assert re.search(r"^2 passed", output, re.MULTILINE), output[-3000:]
