"""The long fuzz run (not a test): the properties of tests/test_parsers_fuzz.py, every
parser in attestation/ and the verifier on mutated genuine swtpm evidence, with
--count cases each (default 10,000), printing cases/s and failures per property.

A failure is any exception other than the property's own project error, or a verdict
that does not follow the evidence's meaning; the first of each is printed with its input.
Exit status 1 if anything failed.

Run: .venv/bin/python bench/fuzz_long.py [--count 10000] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.tpm.localca import LocalCA
from testbed.tpm.swtpm import Swtpm, provision
from tests.test_parsers_fuzz import PROPERTIES, Property, genuine_from_tpm, verify_property


@dataclass
class Tally:
    cases: int = 0
    failures: int = 0
    first: str = ""
    seconds: float = 0.0


def run(prop: Property, count: int) -> Tally:
    tally = Tally()

    # Failures are counted, not raised: a long run reports every property in full.
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def body(data: st.DataObject) -> None:
        value: Any = data.draw(prop.strategy)
        tally.cases += 1
        try:
            prop.run(value)
        except Exception as exc:  # the very thing being counted
            tally.failures += 1
            if not tally.first:
                tally.first = f"{type(exc).__name__}: {exc} -- input {value!r:.300}"

    start = time.perf_counter()
    body()
    tally.seconds = time.perf_counter() - start
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="cases per property")
    parser.add_argument("--only", nargs="*", default=None, metavar="NAME")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-long-") as tmp:
        state = Path(tmp) / "state"
        provision(state, LocalCA.ensure(Path(tmp) / "ca"))
        with Swtpm(state) as tpm:
            genuine = genuine_from_tpm(tpm.tcti)
        props = [*PROPERTIES, verify_property(genuine)]
        if args.only:
            props = [p for p in props if p.name in args.only]
        print(f"{'property':<24} {'cases':>7} {'cases/s':>9} {'failures':>8}")
        failed = 0
        for prop in props:
            tally = run(prop, args.count)
            rate = tally.cases / tally.seconds if tally.seconds else 0.0
            print(f"{prop.name:<24} {tally.cases:>7} {rate:>9.0f} {tally.failures:>8}",
                  flush=True)
            if tally.first:
                print(f"    first failure: {tally.first}")
            failed += tally.failures
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
