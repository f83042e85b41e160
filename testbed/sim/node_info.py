"""``run/node.json``: what a node process says about itself, written by the node at each
change of state (atomically: ``up`` polls it) and read by the backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Self

from testbed.core.errors import StateError
from testbed.core.files import read_json, write_json

__all__ = ["NodeInfo", "NodeInfoState"]

NodeInfoState = Literal["starting", "ready", "failed", "stopped"]
_STATES = ("starting", "ready", "failed", "stopped")


@dataclass
class NodeInfo:
    node: str
    cluster: str
    pid: int
    agent_socket: str
    state: NodeInfoState = "starting"
    updated: float = 0.0
    role: str | None = None
    boot: dict[str, str] | None = None  # what it booted, by digest (testbed.tpm.boot)
    tampered: list[str] = field(default_factory=list)
    swtpm_pid: int | None = None
    tcti: str | None = None
    tpm_latency_ms: float | None = None  # the latency model in front of swtpm, if any
    batch_window_ms: float | None = None  # its quotes are batched within this window
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> Self | None:
        """The node's record, None if it wrote none (yet); a damaged one is a StateError."""
        doc = read_json(path)
        if doc is None:
            return None
        known = {f.name for f in fields(cls)}
        try:
            info = cls(**{k: v for k, v in doc.items() if k in known})
        except (TypeError, AttributeError):
            info = None
        if info is None or not isinstance(info.pid, int) or info.state not in _STATES:
            raise StateError(f"{path} is damaged; `testbed down` then `testbed up` the node")
        return info
