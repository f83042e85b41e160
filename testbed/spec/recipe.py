"""The guest image recipe (``images/guest.yaml``): what goes into a guest image.

Loading is strict (unknown keys, wrong types and unsafe paths are
:class:`RecipeError` naming the field), because the recipe decides what the
guest runs and therefore what a verifier will be told to accept.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from attestation.encoding import require_int
from attestation.errors import EvidenceFormatError, FileInputError
from attestation.files import read_bounded
from attestation.strict_yaml import load_yaml

__all__ = [
    "DEFAULT_RECIPE",
    "REPO_ROOT",
    "ImageRecipe",
    "RecipeError",
    "load_recipe",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO_ROOT / "images" / "guest.yaml"
RECIPE_VERSION = 1
MAX_RECIPE_BYTES = 64 * 1024
_KEYS = ("version", "name", "suite", "variant", "mirror", "kernel_package", "packages",
         "modules", "cmdline", "agent_port", "compression", "remove", "project",
         "keep_programs")
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]*")
_MODULE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PROGRAM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_MIRROR = re.compile(r"(auto|https?://[A-Za-z0-9._:/~+-]+)")
COMPRESSIONS = ("zstd", "gzip")


class RecipeError(EvidenceFormatError):
    """The image recipe is malformed; the message starts with the field."""


@dataclass(frozen=True)
class ImageRecipe:
    """A validated recipe. ``path`` is where it was read from (for the init script)."""

    name: str
    suite: str
    variant: str
    mirror: str
    kernel_package: str
    packages: tuple[str, ...]
    modules: tuple[str, ...]
    cmdline: str
    agent_port: int
    compression: str
    remove: tuple[str, ...]
    project: tuple[tuple[str, str], ...]
    keep_programs: tuple[str, ...] = ()
    path: Path = field(default=DEFAULT_RECIPE, compare=False)

    @property
    def init_script(self) -> Path:
        """The guest's ``/init``: the file ``init`` beside the recipe."""
        return self.path.parent / "init"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("path")
        data["project"] = dict(self.project)
        return data

    def with_cmdline(self, cmdline: str) -> ImageRecipe:
        """The same recipe with another kernel command line (for tamper tests)."""
        return replace(self, cmdline=_check_cmdline(cmdline))

    def inputs_digest(self, extra: dict[str, str]) -> str:
        """SHA-256 over the recipe, its init script and every project file copied in.

        The command line is left out: it is not part of the image's bytes (the
        firmware passes it), so changing it needs no rebuild.
        """
        recipe = self.to_dict()
        recipe.pop("cmdline")
        h = hashlib.sha256()
        h.update(json.dumps({"recipe": recipe, "extra": extra}, sort_keys=True).encode())
        h.update(b"\0init\0" + self.init_script.read_bytes())
        for source, _dest in self.project:
            for path in _project_files(REPO_ROOT / source):
                rel = path.relative_to(REPO_ROOT).as_posix()
                h.update(b"\0file\0" + rel.encode() + b"\0" + path.read_bytes())
        return h.hexdigest()


def _project_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def project_files(source: str) -> list[Path]:
    """The files a ``project`` entry copies (``*.py`` below a directory)."""
    return _project_files(REPO_ROOT / source)


def load_recipe(path: Path = DEFAULT_RECIPE) -> ImageRecipe:
    """Read and validate a recipe file."""
    path = Path(path).absolute()
    try:
        raw = read_bounded(path, MAX_RECIPE_BYTES, what="image recipe")
        text = raw.decode("utf-8")
    except FileInputError as exc:
        raise RecipeError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path}: not UTF-8 (byte {exc.start})") from None
    recipe = parse_recipe(load_yaml(text, f"recipe {path}", RecipeError), path)
    if not recipe.init_script.is_file():
        raise RecipeError(f"recipe {path}: no init script at {recipe.init_script}")
    return recipe


def parse_recipe(doc: object, path: Path = DEFAULT_RECIPE) -> ImageRecipe:
    """Validate a loaded YAML document."""
    if not isinstance(doc, dict):
        raise RecipeError("recipe: expected a mapping at the top level")
    unknown = sorted(str(k) for k in doc if k not in _KEYS)
    missing = sorted(k for k in _KEYS if k not in doc)
    if unknown or missing:
        raise RecipeError(f"recipe: unknown keys {unknown}, missing keys {missing}")
    require_int(doc["version"], "version", RecipeError, exactly=RECIPE_VERSION)
    return ImageRecipe(
        name=_match(doc, "name", _NAME),
        suite=_match(doc, "suite", _NAME),
        variant=_choice(doc, "variant", ("minbase",)),
        mirror=_match(doc, "mirror", _MIRROR),
        kernel_package=_match(doc, "kernel_package", _PACKAGE),
        packages=_names(doc, "packages", _PACKAGE),
        modules=_names(doc, "modules", _MODULE),
        cmdline=_check_cmdline(doc["cmdline"]),
        agent_port=_port(doc["agent_port"]),
        compression=_choice(doc, "compression", COMPRESSIONS),
        remove=tuple(_relative(p, "remove") for p in _list(doc, "remove")),
        project=_project(doc["project"]),
        keep_programs=_names(doc, "keep_programs", _PROGRAM),
        path=path,
    )


def _match(doc: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = doc[key]
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise RecipeError(f"{key}: {value!r} is not valid")
    return value


def _choice(doc: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    if doc[key] not in choices:
        raise RecipeError(f"{key}: must be one of {', '.join(choices)}")
    return str(doc[key])


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc[key]
    if not isinstance(value, list):
        raise RecipeError(f"{key}: expected a list")
    return value


def _names(doc: dict[str, Any], key: str, pattern: re.Pattern[str]) -> tuple[str, ...]:
    values = _list(doc, key)
    for index, value in enumerate(values):
        if not isinstance(value, str) or not pattern.fullmatch(value):
            raise RecipeError(f"{key}[{index}]: {value!r} is not valid")
    return tuple(values)


def _check_cmdline(value: object) -> str:
    if not isinstance(value, str) or not value.isprintable() or len(value) > 1024:
        raise RecipeError("cmdline: expected one printable line of at most 1024 characters")
    return value


def _port(value: object) -> int:
    return require_int(value, "agent_port", RecipeError, minimum=1, maximum=65535)


def _relative(value: object, key: str) -> str:
    """A relative path inside the image; no ``..``, no absolute paths."""
    if not isinstance(value, str) or not value or "\n" in value:
        raise RecipeError(f"{key}: {value!r} is not a path")
    pure = PurePosixPath(value)
    if pure.is_absolute() or ".." in pure.parts:
        raise RecipeError(f"{key}: {value!r} must be relative and stay inside its root")
    return pure.as_posix()


def _project(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value:
        raise RecipeError("project: expected a mapping of source -> destination")
    pairs = []
    for source, dest in value.items():
        src, dst = _relative(source, "project"), _relative(dest, "project")
        if not (REPO_ROOT / src).exists():
            raise RecipeError(f"project: {src} does not exist in {REPO_ROOT}")
        pairs.append((src, dst))
    return tuple(pairs)
