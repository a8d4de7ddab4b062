"""Fine-tune benchmark: test accuracy of the trained models converted, then converted with ``--finetune``.

Each row is one ``onnx-lowrank decompose`` command, run in a fresh process (its wall time and peak RSS are that
process's), on the model's calibration split; the accuracy is always measured on the test split, which no
step of the conversion sees:

* text line (``models/textline_crnn.onnx``, exact strings of its 600 test lines, original 93.00 %): the default
  plan at one thread (``--speedup 2 --threads 1``, by latency), and ``--speedup 2`` / ``--speedup 3 --by macs``;
* digits CNN (``models/digits_cnn.onnx``, accuracy on its 450 test digits): ``--speedup 4 --by macs``;
* text detector (``models/textdet.onnx``, text-mask IoU of its 128 test pages): ``--speedup 2 --threads 1``.

Variants: ``calibrated`` (``--calibration``, no fine-tune), ``+ fine-tune factors`` (``--finetune``: the
decomposed layers' factors and biases), ``+ fine-tune all`` (``--finetune --finetune-all``). The digits CNN
also has the data-free conversion (no ``--calibration``) and that conversion fine-tuned on the calibration
inputs through the API (``onnx_lowrank.finetune.finetune_conversion``, every weight, :data:`API_OPTIONS`,
:data:`API_STEPS` steps): the command line's fine-tune needs ``--calibration``, which makes the conversion
itself data-aware. A plan by latency is made afresh by each
command, so its rows may differ in plan (their MAC ratio and measured speedup are in the table).

    python benchmarks/finetune.py                                   # every row, results/finetune.json (about an hour)
    python benchmarks/finetune.py --models textline --targets 2x-latency --variants factors
    python benchmarks/finetune.py --quick                           # a development check: 20 steps, results/quick/
    python benchmarks/finetune.py --table                           # the table of the last results
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, beside this script

from bench_common import ROOT, fmt, log, machine_info, markdown_table, results_path, write_json

MODELS = ROOT / "models"
SOURCES = {"textline": "textline_crnn.onnx", "digits": "digits_cnn.onnx", "textdet": "textdet.onnx"}
METRICS = {"textline": "exact strings", "digits": "accuracy", "textdet": "mask IoU"}


@dataclass(frozen=True)
class Target:
    model: str
    name: str
    flags: tuple[str, ...]


TARGETS = [
    Target("textline", "2x-latency", ("--speedup", "2", "--threads", "1")),
    Target("textline", "2x-macs", ("--speedup", "2", "--by", "macs")),
    Target("textline", "3x-macs", ("--speedup", "3", "--by", "macs")),
    Target("digits", "4x-macs", ("--speedup", "4", "--by", "macs")),
    Target("textdet", "2x-latency", ("--speedup", "2", "--threads", "1")),
]
VARIANTS = {
    "calibrated": (),
    "factors": ("--finetune",),
    "all": ("--finetune", "--finetune-all"),
    "data-free": (),  # digits only: no --calibration
    "data-free+api": (),  # digits only: the data-free conversion fine-tuned through the API
}
LABELS = {
    "calibrated": "calibrated",
    "factors": "+ fine-tune factors",
    "all": "+ fine-tune all",
    "data-free": "data-free",
    "data-free+api": "data-free + fine-tune all (API)",
}
DATA_FREE = ("data-free", "data-free+api")
# the fine-tune of a model the conversion broke (the digits CNN data-free at 4x: 9.56 %) takes larger steps, longer, and
# the feature term: the options measured best on its held-back slice
API_OPTIONS: dict[str, Any] = {"lr": 3e-3, "temperature": 8.0}
API_STEPS = 1500


# --------------------------------------------------------------------------- the worker: one conversion in its own process


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One ``decompose`` command (``argv``), or the data-free conversion fine-tuned through the API (``api``)."""
    start = time.perf_counter()
    out: dict[str, Any] = {}
    if "argv" in spec:
        from onnx_lowrank.cli import main

        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            out["code"] = main(spec["argv"])
        out["stdout"] = printed.getvalue()
    else:
        import onnx

        from onnx_lowrank import decompose, save_model
        from onnx_lowrank.config import FinetuneConfig
        from onnx_lowrank.finetune import FinetuneOptions, finetune_conversion

        api = spec["api"]
        original = onnx.load(api["source"])
        converted, report = decompose(original, speedup=api["speedup"], by="macs", check_runs=0)
        with np.load(api["data"]) as loaded:
            data = {k: loaded[k] for k in loaded.files}
        config = FinetuneConfig(enabled=True, trainable="all", steps=api["steps"], features=True, options=FinetuneOptions(**API_OPTIONS))
        tuned, report.finetune = finetune_conversion(original, converted, report, data, config)
        save_model(tuned, api["out"])
        Path(api["report"]).write_text(report.to_json())
        out["code"] = 0
    out["wall_seconds"] = time.perf_counter() - start
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def in_process(spec: dict[str, Any]) -> dict[str, Any]:
    """The worker in a fresh process (so its peak RSS is its own)."""
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"code": done.returncode, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    result: dict[str, Any] = json.loads(lines[-1])
    if result.get("code"):
        result["error"] = result.get("stdout", "").strip()[-300:] or done.stderr.strip()[-300:]
    return result


# --------------------------------------------------------------------------- the test metrics


class Evaluator:
    """A model's test-split metric: exact strings (text line), accuracy (digits), mean page IoU (text detector)."""

    def __init__(self, model: str, quick: bool) -> None:
        self.model = model
        if model == "textline":
            from models.textline import load_split

            x, labels = load_split(MODELS / "textline_test.npz")
            assert labels is not None
            self.x, self.truth = (x[:200], labels[:200]) if quick else (x, labels)
        elif model == "textdet":
            from models.textdet import load_split as load_pages

            x, masks = load_pages(MODELS / "textdet_test.npz")
            assert masks is not None
            self.x, self.truth = (x[:32], masks[:32]) if quick else (x, masks)
        else:
            with np.load(MODELS / "digits_test.npz") as data:
                self.x, self.truth = data["input"], data["labels"]

    def __call__(self, path: Path) -> float:
        if self.model == "textline":
            from models.textline import read_lines, score

            return float(score(read_lines(path, self.x, threads=1), self.truth)["exact_accuracy"])
        if self.model == "textdet":
            from models.textdet import evaluate

            return float(evaluate(path, self.x, self.truth, threads=1)["iou"])
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return float(np.mean(session.run(None, {"input": self.x})[0].argmax(axis=1) == np.asarray(self.truth)))


# --------------------------------------------------------------------------- the rows


def command(target: Target, variant: str, out: Path, report: Path, steps: int | None) -> list[str]:
    argv = ["decompose", str(MODELS / SOURCES[target.model]), str(out), *target.flags, "--report", str(report), "--quiet"]
    if variant not in DATA_FREE:
        argv += ["--calibration", str(MODELS / f"{target.model}_calibration.npz")]
    argv += list(VARIANTS[variant])
    if steps is not None and "--finetune" in argv:
        argv += ["--finetune-steps", str(steps)]
    return argv


def row_of(target: Target, variant: str, spec: dict[str, Any], result: dict[str, Any], report_path: Path) -> dict[str, Any]:
    shown = ["onnx-lowrank", *spec["argv"]] if "argv" in spec else None
    row: dict[str, Any] = {"model": target.model, "target": target.name, "variant": LABELS[variant], "command": shown}
    if "error" in result:
        row["error"] = result["error"]
        return row
    report = json.loads(report_path.read_text())
    latency = report.get("latency") or {}
    tune = report.get("finetune") or {}
    answers = tune.get("answers") or {}
    row.update(
        mac_ratio=report.get("mac_ratio"),
        measured_speedup=latency.get("measured_speedup"),
        speedup_low=latency.get("speedup_low"),
        speedup_high=latency.get("speedup_high"),
        threads=latency.get("threads"),
        wall_seconds=result["wall_seconds"],
        peak_rss_mib=result["peak_rss_mib"],
        answers=report.get("answers"),
    )
    if tune and "skipped" not in tune:
        before, after = (answers.get("before") or [{}])[0], (answers.get("after") or [{}])[0]
        row["finetune"] = {
            "steps": tune["steps"],
            "best_step": tune["best_step"],
            "seconds": tune["seconds"],
            "train_seconds": tune["train_seconds"],
            "stop_reason": tune["stop_reason"],
            "trained_count": tune["trained_count"],
            "trained_elements": tune["trained_elements"],
            "losses": {name: loss["kind"] for name, loss in tune["output_losses"].items()},
            "held_back": {"measure": after.get("measure"), "before": before.get("value"), "after": after.get("value")},
            "write_back_max_relative": tune["write_back"]["max_relative"],
            "tolerance": tune["write_back"]["tolerance"],
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    names = ", ".join(sorted({t.name for t in TARGETS}))
    parser.add_argument("--targets", nargs="+", help=f"target names (default: every target of the models): {names}")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, help="--finetune-steps for every fine-tune (default: the command line's budget)")
    parser.add_argument("--quick", action="store_true", help="20 fine-tune steps and fewer test samples: a development check")
    parser.add_argument("--out", default=None)
    parser.add_argument("--table", action="store_true", help="print the table of the results file and stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    path = results_path("finetune", args.quick, args.out)
    if args.table:
        print(table(json.loads(path.read_text())["rows"]))
        return
    steps = 20 if args.quick and args.steps is None else args.steps
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for model in args.models:
            evaluate = Evaluator(model, args.quick)
            original = evaluate(MODELS / SOURCES[model])
            rows.append({"model": model, "target": "original", "variant": "original", "metric": METRICS[model], "accuracy": original})
            log(f"{model} original: {original:.4f}")
            for target in (t for t in TARGETS if t.model == model and (not args.targets or t.name in args.targets)):
                for variant in args.variants:
                    if variant in DATA_FREE and model != "digits":
                        continue
                    stem = f"{model}-{target.name}-{variant}"
                    out, report = work / f"{stem}.onnx", work / f"{stem}.json"
                    spec: dict[str, Any]
                    if variant == "data-free+api":
                        speedup = float(target.flags[target.flags.index("--speedup") + 1])
                        api = {"source": str(MODELS / SOURCES[model]), "speedup": speedup, "out": str(out), "report": str(report)}
                        spec = {"api": {**api, "data": str(MODELS / f"{model}_calibration.npz"), "steps": steps or API_STEPS}}
                    else:
                        spec = {"argv": command(target, variant, out, report, steps)}
                    result = in_process(spec)
                    row = row_of(target, variant, spec, result, report)
                    row["metric"] = METRICS[model]
                    if "error" not in row:
                        row["accuracy"] = evaluate(out)
                        row["of_original"] = row["accuracy"] / original if original else None
                    rows.append(row)
                    shown = {k: row.get(k) for k in ("accuracy", "mac_ratio", "measured_speedup", "wall_seconds", "peak_rss_mib", "error")}
                    log(f"{stem}: {json.dumps(shown)}")
    results = {"machine": machine_info(), "quick": args.quick, "steps": steps, "rows": rows}
    write_json(path, results)
    print(table(rows))
    log(f"wrote {path}")


def table(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        tune = r.get("finetune") or {}
        held = tune.get("held_back") or {}
        answers = "–"
        if held.get("before") is not None and held.get("after") is not None:
            answers = f"{100 * held['before']:.1f} → {100 * held['after']:.1f} %"
        out.append(
            [
                r["model"],
                r["target"],
                r["variant"],
                fmt(100 * r["accuracy"], ".2f", " %") if "accuracy" in r else f"error: {r.get('error', '')[:60]}",
                fmt(r.get("of_original"), ".3f"),
                fmt(r.get("mac_ratio"), ".2f", "x"),
                fmt(r.get("measured_speedup"), ".2f", "x")
                + (f" ({r['speedup_low']:.2f}–{r['speedup_high']:.2f})" if r.get("speedup_low") and r.get("speedup_high") else ""),
                answers,
                f"{tune['steps']} ({tune['best_step']})" if tune else "–",
                fmt(tune.get("seconds"), ".0f", " s"),
                fmt(r.get("wall_seconds"), ".0f", " s"),
                fmt(r.get("peak_rss_mib"), ".0f", " MiB"),
            ]
        )
    headers = ["model", "target", "variant", "test metric", "of original", "MACs cut", "measured", "held-back answers"]
    headers += ["steps (best)", "fine-tune", "command wall time", "peak RSS"]
    return markdown_table(headers, out)


if __name__ == "__main__":
    main()
