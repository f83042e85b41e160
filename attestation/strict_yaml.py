"""The one YAML loader for hand-edited security documents (policies, cluster specs,
image recipes): PyYAML's SafeLoader, stricter.

A duplicate key would silently drop the first value of a hand-edited field, so it is an
error. Merge keys (``<<: [*a, *a, ...]``) copy entries, nest exponentially and turn an
override into a duplicate, so they are refused; plain anchors and aliases stay (PyYAML
builds them as shared references, which cost nothing). Every failure is one exception of
the caller's choosing, with the position, on one line.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import yaml

from attestation.errors import TestbedError

__all__ = ["StrictLoader", "load_yaml", "one_line"]


class StrictLoader(yaml.SafeLoader):
    """SafeLoader without merge keys and with duplicate (or unhashable) keys refused."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise yaml.constructor.ConstructorError(
                    None, None, "merge keys (<<) are not allowed; use an anchor for a whole "
                    "block instead", key_node.start_mark)
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError as exc:
                raise yaml.constructor.ConstructorError(
                    None, None, "unhashable mapping key", key_node.start_mark) from exc
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {str(key)[:60]!r}", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, what: str, error: type[TestbedError]) -> object:
    """The document in ``text``; any YAML failure is ``error("<what>: ...")``."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise error(f"{what}: not valid YAML: {one_line(str(exc))}") from None
    except RecursionError:
        raise error(f"{what}: YAML nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:
        # SafeLoader's own constructors raise these, e.g. for 2024-02-30.
        raise error(f"{what}: invalid YAML value: {one_line(str(exc))}") from None


def one_line(text: str) -> str:
    return " ".join(text.split())[:300]
