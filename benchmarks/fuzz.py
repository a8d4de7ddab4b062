"""Fuzz the command line: ``--runs`` seeded cases of mutated models, data files and flags (``tests/fuzzing.py``).

Each case runs ``onnx_lowrank.cli.main`` in this process and is checked against
the contract (exit 0, or exit 2 with one line; no traceback, no internal error,
no warning on the terminal; inputs unchanged; nothing left behind on failure;
an output that loads in onnxruntime whenever the input did). Prints the runs,
the outcome classes and every violation with the seed that replays it; writes
the same to ``benchmarks/results/fuzz.json`` (``--output``)::

    python benchmarks/fuzz.py --runs 3000              # seeds 0..2999, the shipped VGG model included
    python benchmarks/fuzz.py --runs 500 --seed 10000  # seeds 10000..10499
    python benchmarks/fuzz.py --case 1234              # replay one case, printing what it ran and saw

Exit code: 0 when no case broke the contract, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the fuzzer lives with the tests, which run its fast slice

from fuzzing import BUILDERS, make_case, run_case, summary  # noqa: E402

ALL_BASES = [*BUILDERS, "digits", "vgg"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="number of cases (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--case", type=int, help="replay the case of this seed only, verbosely")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz.json")
    args = parser.parse_args()
    if args.case is not None:
        result = run_case(make_case(args.case, ALL_BASES))
        print(result.case.describe())
        print(f"exit {result.outcome.code}\n--- stdout\n{result.outcome.stdout}--- stderr\n{result.outcome.stderr}")
        print("violations:", result.problems or "none")
        return 1 if result.problems else 0
    start = time.perf_counter()
    results = []
    for seed in range(args.seed, args.seed + args.runs):
        result = run_case(make_case(seed, ALL_BASES))
        results.append(result)
        if result.problems:
            print(f"VIOLATION {result.case.describe()}\n  {result.problems}", flush=True)
        if len(results) % 100 == 0:
            print(f"{len(results)} runs, {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    data = summary(results)
    data.update(first_seed=args.seed, seconds=round(time.perf_counter() - start, 1))
    bases: dict[str, int] = {}
    commands: dict[str, int] = {}
    for r in results:
        bases[r.case.base] = bases.get(r.case.base, 0) + 1
        commands[r.case.argv[0]] = commands.get(r.case.argv[0], 0) + 1
    data.update(bases=bases, commands=commands)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(data, indent=2) + "\n")
    print(f"{data['runs']} runs in {data['seconds']} s; {len(data['violations'])} violations")
    for klass, count in data["classes"].items():
        print(f"{count:6d}  {klass}")
    return 1 if data["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
