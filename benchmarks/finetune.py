"""Fine-tune benchmark: accuracy of the trained models after conversion, then after distillation toward the original.

Rows (model × target × variant), accuracy always on the test split, never on the data trained on:

* text line (``models/textline_crnn.onnx``, exact strings on ``models/textline_test.npz``) at 2x and 3x MACs,
  ``onnx-lowrank decompose --speedup S --by macs --calibration models/textline_calibration.npz``;
* digits CNN (``models/digits_cnn.onnx``, accuracy on ``models/digits_test.npz``) at 4x MACs, data-free
  (``--speedup 4 --by macs``), fine-tuned on ``models/digits_calibration.npz``.

Variants: the converted model as written; ``+ fine-tune factors`` (the decomposed layers' factors and biases,
:func:`onnx_lowrank.finetune.decomposed_weights` of the report's pairs); ``+ fine-tune all`` (every float
weight). Each fine-tune runs in its own process: wall seconds (loading, the teacher's pass, training, the
checks) and peak RSS are that process's; the training seconds are the loop's own. The machine may be shared
with other jobs: the wall times say what this run took, not what the code needs on a quiet machine.

    python benchmarks/finetune.py                       # all rows, results/finetune.json
    python benchmarks/finetune.py --models digits --quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, beside this script

from bench_common import ROOT, fmt, log, machine_info, markdown_table, results_path, write_json

MODELS = ROOT / "models"

# the options each model is fine-tuned with (chosen on the held-back slice and recorded in the results)
OPTIONS: dict[str, dict[str, Any]] = {
    "textline": {"steps": 600, "minutes": 5.0, "lr": 1e-4, "threads": 2},
    "digits": {"steps": 1500, "minutes": 5.0, "lr": 3e-3, "threads": 2, "feature_weight": 1.0},
}
TARGETS: dict[str, list[float]] = {"textline": [2.0, 3.0], "digits": [4.0]}


# --------------------------------------------------------------------------- the worker: one fine-tune in its own process


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    import onnx

    from onnx_lowrank.finetune import FinetuneOptions, decomposed_weights, finetune

    start = time.perf_counter()
    original, converted = onnx.load(spec["original"]), onnx.load(spec["converted"])
    report = json.loads(Path(spec["report"]).read_text())
    pairs = [(layer["vertical_node"], layer["horizontal_node"]) for layer in report["layers"] if layer.get("decomposed")]
    weights = decomposed_weights(converted, pairs)
    options = dict(spec["options"])
    if options.pop("features", False):
        options["features"] = weights.features
    with np.load(spec["data"]) as loaded:
        data = {k: loaded[k] for k in loaded.files}
    trainable = None if spec["train"] == "all" else weights.initializers
    written, result = finetune(original, converted, data, trainable=trainable, options=FinetuneOptions(**options))
    onnx.save(written, spec["out"])
    out = result.to_dict()
    out["wall_seconds"] = time.perf_counter() - start
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# --------------------------------------------------------------------------- conversion and evaluation


def convert(model: str, speedup: float, work: Path) -> tuple[Path, Path, float]:
    """``onnx-lowrank decompose`` at ``speedup`` by MACs (calibrated for the text line); the file, report, seconds."""
    out, report = work / f"{model}-{speedup:g}x.onnx", work / f"{model}-{speedup:g}x.json"
    source = MODELS / ("textline_crnn.onnx" if model == "textline" else "digits_cnn.onnx")
    command = [sys.executable, "-m", "onnx_lowrank", "decompose", str(source), str(out), "--speedup", f"{speedup:g}", "--by", "macs"]
    command += ["--check-runs", "0", "--report", str(report)]
    if model == "textline":
        command += ["--calibration", str(MODELS / "textline_calibration.npz")]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, text=True)
    return out, report, time.perf_counter() - start


class Evaluator:
    """A model's test-split metric (exact strings for the text line, accuracy for the digits)."""

    def __init__(self, model: str, quick: bool) -> None:
        self.model = model
        if model == "textline":
            from models.textline import load_split

            x, labels = load_split(MODELS / "textline_test.npz")
            assert labels is not None
            self.x, self.labels = (x[:200], labels[:200]) if quick else (x, labels)
        else:
            with np.load(MODELS / "digits_test.npz") as data:
                self.x, self.labels = data["input"], data["labels"]

    def __call__(self, path: Path) -> float:
        if self.model == "textline":
            from models.textline import read_lines, score

            return score(read_lines(path, self.x, threads=1), self.labels)["exact_accuracy"]
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return float(np.mean(session.run(None, {"input": self.x})[0].argmax(axis=1) == np.asarray(self.labels)))


def run_finetune(spec: dict[str, Any]) -> dict[str, Any]:
    """The worker in a fresh process (so its peak RSS is its own)."""
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--variants", nargs="+", default=["factors", "all"], choices=["factors", "all"])
    parser.add_argument("--quick", action="store_true", help="fewer steps and test lines: a development check")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in args.models:
            evaluate = Evaluator(model, args.quick)
            source = MODELS / ("textline_crnn.onnx" if model == "textline" else "digits_cnn.onnx")
            rows.append({"model": model, "target": "original", "variant": "original", "accuracy": evaluate(source)})
            log(f"{model} original: {rows[-1]['accuracy']:.4f}")
            for speedup in TARGETS[model]:
                converted, report, seconds = convert(model, speedup, work)
                base = "calibrated" if model == "textline" else "data-free"
                rows.append(
                    {
                        "model": model,
                        "target": f"{speedup:g}x MACs",
                        "variant": base,
                        "accuracy": evaluate(converted),
                        "convert_seconds": seconds,
                    }
                )
                log(f"{model} {speedup:g}x {base}: {rows[-1]['accuracy']:.4f}")
                for variant in args.variants:
                    options = dict(OPTIONS[model])
                    if args.quick:
                        options["steps"] = max(20, options["steps"] // 10)
                    spec = {
                        "original": str(source),
                        "converted": str(converted),
                        "report": str(report),
                        "data": str(MODELS / f"{model}_calibration.npz"),
                        "train": variant,
                        "options": options,
                        "out": str(work / f"{model}-{speedup:g}x-{variant}.onnx"),
                    }
                    result = run_finetune(spec)
                    row = {"model": model, "target": f"{speedup:g}x MACs", "variant": f"+ fine-tune {variant}", "options": options}
                    if "error" in result:
                        row["error"] = result["error"]
                    else:
                        row.update(
                            accuracy=evaluate(Path(spec["out"])),
                            seconds=result["wall_seconds"],
                            train_seconds=result["train_seconds"],
                            peak_rss_mib=result["peak_rss_mib"],
                            result={k: v for k, v in result.items() if k not in ("options",)},
                        )
                    rows.append(row)
                    shown = {k: row.get(k) for k in ("accuracy", "seconds", "peak_rss_mib", "error")}
                    log(f"{model} {speedup:g}x {variant}: {json.dumps(shown)}")
    results = {
        "machine": machine_info(),
        "quick": args.quick,
        "rows": rows,
        "peak_rss_parent_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    path = results_path("finetune", args.quick, args.out)
    write_json(path, results)
    table = [
        [
            r["model"],
            r["target"],
            r["variant"],
            fmt(100 * r["accuracy"], ".2f", " %") if "accuracy" in r else f"error: {r.get('error', '')[:60]}",
            fmt(r.get("seconds"), ".0f", " s"),
            fmt(r.get("peak_rss_mib"), ".0f", " MiB"),
        ]
        for r in rows
    ]
    print(markdown_table(["model", "target", "variant", "test accuracy", "fine-tune wall time", "peak RSS"], table))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
