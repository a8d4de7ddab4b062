"""Accuracy without retraining: data-free decomposition against calibration-aware conversion.

For each target speedup (total conv MACs before / after) the digits CNN of
``models/train_digits.py`` is converted four ways and scored on its held-out
test set:

* ``data-free``: ``decompose(model, speedup=S)`` — ranks by kernel energy, SVD factors;
* ``data-free + refit``: the same ranks and factors, each stage's source layers refit on the calibration set
  (:func:`onnx_lowrank.calibration.refit_layers`);
* ``data-aware``: ``decompose(model, speedup=S, calibration=..., refit=False)`` — factors minimising each
  layer's output error on the calibration statistics, ranks by predicted damage to the outputs;
* ``data-aware + refit``: the default calibrated conversion (the same, then the staged refit).

The calibration set (``models/digits_calibration.npz``) is disjoint from the
test set and from the training data. Writes ``benchmarks/results/accuracy.json``
and prints a Markdown table::

    python benchmarks/accuracy.py
    python benchmarks/accuracy.py --speedups 2 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from onnx_lowrank import decompose
from onnx_lowrank.calibration import load_calibration, refit_layers
from onnx_lowrank.report import Report
from onnx_lowrank.runtime import make_session

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("data-free", "data-free + refit", "data-aware", "data-aware + refit")
DATA_AWARE = ("data-aware", "data-aware + refit")


def logits_of(model: onnx.ModelProto, x: np.ndarray, threads: int) -> np.ndarray:
    return np.asarray(make_session(model, threads=threads).run(None, {"input": x})[0], dtype=np.float64)


def evaluate(model: onnx.ModelProto, x: np.ndarray, labels: np.ndarray, reference: np.ndarray, threads: int) -> dict[str, float]:
    """Test accuracy, and against the original's logits: top-1 agreement and relative L2 error."""
    logits = logits_of(model, x, threads)
    return {
        "accuracy": float(np.mean(logits.argmax(1) == labels)),
        "top1_agreement": float(np.mean(logits.argmax(1) == reference.argmax(1))),
        "logits_relative_l2": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
    }


def summary(report: Report) -> dict[str, Any]:
    return {
        "mac_ratio": report.mac_ratio,
        "params_after": report.params_after,
        "ranks": {layer.node: layer.rank for layer in report.layers if layer.decomposed},
    }


def check_targets(original: float, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """At 2x at most 0.5 points lost with calibration; data-aware at least as accurate as data-free everywhere."""
    targets: dict[str, Any] = {
        "data_aware_at_least_data_free_everywhere": all(
            r["variants"][v]["accuracy"] >= r["variants"]["data-free"]["accuracy"] for r in rows for v in DATA_AWARE
        )
    }
    at_2x = next((r for r in rows if r["speedup"] == 2.0), None)
    if at_2x is not None:
        drops = {v: (original - at_2x["variants"][v]["accuracy"]) * 100 for v in DATA_AWARE}
        targets["drop_points_at_2x"] = drops
        targets["drop_at_2x_le_0.5_points"] = {v: d <= 0.5 + 1e-9 for v, d in drops.items()}
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models/digits_cnn.onnx"))
    parser.add_argument("--test", default=str(ROOT / "models/digits_test.npz"))
    parser.add_argument("--calibration", default=str(ROOT / "models/digits_calibration.npz"))
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--repeat", type=int, default=3, help="runs timed per variant (the best is reported)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/accuracy.json"))
    args = parser.parse_args()

    model = onnx.load(args.model)
    with np.load(args.test) as test:
        x, labels = test["input"], test["labels"]
    calibration = load_calibration(args.calibration, model)
    calib_size = len(next(iter(calibration.values())))
    reference = logits_of(model, x, args.threads)
    original = float(np.mean(reference.argmax(1) == labels))

    rows: list[dict[str, Any]] = []
    for speedup in args.speedups:
        row: dict[str, Any] = {"speedup": speedup, "variants": {}}
        free, free_report = decompose(model, speedup=speedup, by="macs", check_runs=0)
        row["variants"]["data-free"] = {**evaluate(free, x, labels, reference, args.threads), **summary(free_report)}
        runs = [refit_layers(model, free, free_report, calibration, threads=args.threads) for _ in range(args.repeat)]
        row["variants"]["data-free + refit"] = {
            **evaluate(runs[0].model, x, labels, reference, args.threads),
            **summary(free_report),
            "seconds": min(run.seconds for run in runs),
        }
        for name, refit in (("data-aware", False), ("data-aware + refit", True)):
            times, converted, report = [], None, None
            for _ in range(args.repeat):  # the machine is shared: the best of a few runs
                t0 = time.perf_counter()
                converted, report = decompose(model, speedup=speedup, calibration=calibration, refit=refit, by="macs", check_runs=0)
                times.append(time.perf_counter() - t0)
            assert converted is not None and report is not None
            row["variants"][name] = {
                **evaluate(converted, x, labels, reference, args.threads),
                **summary(report),
                "seconds": min(times),
                "seconds_all_runs": times,
                "layers": [
                    {"node": layer.node, "rank": layer.rank, "gain": layer.gain, "output_error": layer.output_error}
                    for layer in report.decomposed
                ],
            }
        rows.append(row)
        print(f"speedup {speedup:g}: " + ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in row["variants"].items()), file=sys.stderr)

    targets = check_targets(original, rows)
    result = {
        "model": Path(args.model).name,
        "test_samples": len(labels),
        "calibration_samples": calib_size,
        "timing": f"best of {args.repeat} runs, wall seconds, onnxruntime threads {args.threads}",
        "original_accuracy": original,
        "results": rows,
        "targets": targets,
        "environment": {
            "python": platform.python_version(),
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "threads": args.threads,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"Original test accuracy: {original * 100:.2f} % ({len(labels)} test samples); calibration set: {calib_size} samples.")
    print()
    print("| speedup | " + " | ".join(VARIANTS) + " | time (s) |")
    print("|---|" + "---|" * (len(VARIANTS) + 1))
    for r in rows:
        cells = [f"{r['variants'][v]['accuracy'] * 100:.2f} % ({r['variants'][v]['mac_ratio']:.2f}x)" for v in VARIANTS]
        times = " / ".join(f"{r['variants'][v]['seconds']:.2f}" for v in VARIANTS[1:])
        print(f"| {r['speedup']:g}x | " + " | ".join(cells) + f" | {times} |")
    print()
    print(f"Cells: test accuracy (achieved conv MAC ratio). Time: best of {args.repeat} runs (wall seconds) of the refit / conversions.")
    print(f"Targets: {json.dumps(targets)}")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
