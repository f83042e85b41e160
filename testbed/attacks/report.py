"""The attack lab's results as text: one table, then each scenario in words."""

from __future__ import annotations

from collections.abc import Sequence

from testbed.attacks.scenarios import ScenarioResult

__all__ = ["print_table"]


def print_table(results: Sequence[ScenarioResult], baseline: str | None = None) -> None:
    if baseline:
        print(f"\nno attack (genuine customer and server): {baseline}")
    width = max([len("attack"), *(len(r.name) for r in results)])
    header = f"{'attack':<{width}} {'plain mTLS':<18} {'Trusted Passages':<18} caught by"
    print("\n" + header)
    print("-" * len(header))
    for r in results:
        plain = "attack succeeds" if r.plain.attack_succeeded else "attack failed (!)"
        tp = "attack SUCCEEDS (!)" if r.trusted_passages.attack_succeeded else "caught"
        where = f"{r.trusted_passages.caught_by} @ {r.trusted_passages.caught_at}" \
            if r.trusted_passages.caught_by else "-"
        print(f"{r.name:<{width}} {plain:<18} {tp:<18} {where}")
    print()
    for r in results:
        print(f"  {r.name}: {r.title}")
        print(f"    plain mTLS: {r.plain.detail}")
        print(f"    Trusted Passages: {r.trusted_passages.detail[:240]}")
