"""The fuzz suite (``fuzzing.py``): seeded mutations of models, data files and flags, each run checked against
the contract of :mod:`cli_contract`.

The fast slice runs in the default test run (small built models, ~200 cases); the long slice, the shipped
models included, is marked ``fuzz``::

    python -m pytest -q -m fuzz tests/test_fuzz.py       # 3000 cases
    python benchmarks/fuzz.py --runs 3000 --seed 100000   # the same cases, with the outcome classes printed
"""

from __future__ import annotations

import pytest
from fuzzing import BUILDERS, SAMPLE_BUILDERS, Result, make_case, run_case, summary

FAST_SEEDS = range(200)
LONG_SEEDS = range(100_000, 103_000)
SAMPLE_SEEDS = range(200_000, 200_080)


def check(results: list[Result]) -> dict[str, int]:
    """No case broke the contract; returns the outcome classes."""
    data = summary(results)
    failures = "\n".join(f"{v['case']}\n    {v['problems']}" for v in data["violations"])
    assert not data["violations"], f"{len(data['violations'])} of {data['runs']} cases broke the contract:\n{failures}"
    classes: dict[str, int] = data["classes"]
    return classes


def test_fuzz_fast_slice() -> None:
    """~200 seeded cases on the small built models: the contract holds for each, and the cases reach both
    successful conversions and several kinds of refusal (the fuzzer exercises what it claims to)."""
    classes = check([run_case(make_case(seed, list(BUILDERS))) for seed in FAST_SEEDS])
    assert classes.get("exit 0", 0) >= len(FAST_SEEDS) // 5, classes
    assert sum(1 for k in classes if k.startswith("exit 2")) >= 10, classes


def test_fuzz_sample_slice() -> None:
    """80 seeded cases of a model whose If branch an int64 scalar input's value picks, most with a ``--sample``
    (valid or malformed) and the model mostly whole: the contract holds for each, and the cases reach
    conversions and refusals of samples."""
    results = [run_case(make_case(seed, list(SAMPLE_BUILDERS), (6, 1, 3, 0))) for seed in SAMPLE_SEEDS]
    classes = check(results)
    assert classes.get("exit 0", 0) >= len(SAMPLE_SEEDS) // 5, classes
    refused = [r for r in results if r.outcome.code == 2 and "sample" in r.outcome.error]
    assert len(refused) >= 5, classes


@pytest.mark.fuzz
def test_fuzz_long_slice() -> None:
    """3000 seeded cases, the shipped digits and VGG models among the bases."""
    check([run_case(make_case(seed, [*BUILDERS, "digits", "vgg"])) for seed in LONG_SEEDS])


@pytest.mark.parametrize("seed", [101_465, 102_194])
def test_models_onnxruntime_loads_but_cannot_run(seed: int) -> None:
    """Cases of the long slice that once ended in an internal error: a model without graph outputs, and a
    ConvTranspose whose output_padding its kernel refuses at run time. The plan by latency cannot time them,
    so they are planned by MACs and say why."""
    result = run_case(make_case(seed, [*BUILDERS, "digits", "vgg"]))
    assert not result.problems, result.problems
    assert result.outcome.code == 0 and "onnxruntime cannot run the model" in result.outcome.stdout
