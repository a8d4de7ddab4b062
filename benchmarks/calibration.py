"""Calibration: accuracy of data-aware conversion, the data-free objective, cost in passes, peak memory.

Parts (``--parts``, default all; run the timed ones alone on a quiet machine)::

    accuracy     trained models, data-free vs data-aware at S = 1.5, 2, 3, 4: the CRNN text-line recogniser
                 (exact-string accuracy, agreement with the original's strings) and the digits CNN (accuracy)
    objectives   the data-free budget allocation under each objective of onnx_lowrank.ranks.weigh_errors
    ablation     the data-aware pipeline with parts switched off (no gains, no refit, refit stages)
    activations  the refit fit to the linear output and to the activation's output (ReLU-aware: Relu, LeakyRelu,
                 Clip after the layer, onnx_lowrank.calibration.activation) at S = 1.5, 2, 3, 4, and two other
                 ways to fit it (the hinge fit alone; 25 iterations on every row); accuracy, agreement and the
                 outputs' relative error on the test split, the refit's seconds, of them the activation-aware
                 fits', and its passes; and whether the variant decompose runs by default gives decompose's own
                 model byte for byte
    kronecker    how close the Kronecker model of the patch covariance comes to the exact one (small layers)
    cost         ``onnx-lowrank decompose --speedup 2 --by macs --calibration`` in a fresh process (wall time, peak RSS,
                 the report's time per pass) against one plain onnxruntime pass of the original model over the
                 same calibration set (same process, batches of 32), at 64 and 512 samples (``--samples``):
                 the CRNN (its calibration lines, repeated to 512), ResNet-50 of the zoo at 224x224, and three
                 detectors at 640x640: ``textdet640``, the trained text detector (models/textdet.onnx, 19 convs)
                 on pages rendered at 640x640 (models/textdet.py, seeded); ``db640``, benchmarks/detector.py's
                 DB-style text detector (61 convs, random weights); ``yolo640``, tests/dynamic_models.py's
                 YOLO-style one (10 convs). ResNet-50 and the random-weight detectors run on seeded random
                 images. The data is written as a folder of .npy so it is memory-mapped. ``--check`` keeps the default check of
                 the result (else ``--check-runs 0``); ``--before REV`` also converts with the package at git
                 revision REV. One more run of the conversion, untimed, counts what the passes do: the
                 onnxruntime sessions built, the runs and samples, and the passes in plain-pass units (each
                 run's samples times the share of the model's MACs its session computes, over the samples)

Results go to ``benchmarks/results/calibration_<part>.json`` (``--quick``: fewer samples and speedups, under
``results/quick/``)::

    python benchmarks/calibration.py --parts accuracy objectives
    python benchmarks/calibration.py --parts activations
    python benchmarks/calibration.py --parts cost --models textline resnet50 --samples 64 512
    python benchmarks/calibration.py --parts cost --models textdet640 db640 yolo640 --samples 64 --check --before f83a825
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, beside this script

from bench_common import ROOT, fmt, log, machine_info, markdown_table, results_path, write_json

from onnx_lowrank import decompose
from onnx_lowrank.calibration import CalibrationOptions, load_calibration, refit_layers
from onnx_lowrank.calibration.refit import DEFAULT_ACTIVATIONS
from onnx_lowrank.ranks import OBJECTIVES
from onnx_lowrank.runtime import make_session
from onnx_lowrank.threads import single_threaded_blas

TEXTLINE = ROOT / "models" / "textline_crnn.onnx"
TEXTLINE_TEST = ROOT / "models" / "textline_test.npz"
TEXTLINE_CALIBRATION = ROOT / "models" / "textline_calibration.npz"
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"
DIGITS_CALIBRATION = ROOT / "models" / "digits_calibration.npz"
SPEEDUPS = (1.5, 2.0, 3.0, 4.0)
TIME = Path("/usr/bin/time")


# --------------------------------------------------------------------------- trained models and their metric


class Trained:
    """A trained model, its test split and metric, and its calibration split."""

    def __init__(self, name: str, quick: bool) -> None:
        self.name = name
        if name == "textline":
            from models.textline import agreement, load_split, read_lines, score

            x, labels = load_split(TEXTLINE_TEST)
            assert labels is not None
            if quick:
                x, labels = x[:200], labels[:200]
            self.path, self.x, self.labels = TEXTLINE, x, labels
            self.calibration = load_calibration(TEXTLINE_CALIBRATION, onnx.load(str(TEXTLINE)))
            self.input_shapes: dict[str, list[int]] = {"input": [1, 1, 32, 256]}
            self.reference = read_lines(TEXTLINE, x)
            self.original = score(self.reference, labels)["exact_accuracy"]

            def evaluate(model: onnx.ModelProto) -> dict[str, float]:
                read = read_lines(model, x)
                return {"accuracy": score(read, labels)["exact_accuracy"], "agreement": agreement(read, self.reference)["string_agreement"]}

            self.evaluate: Callable[[onnx.ModelProto], dict[str, float]] = evaluate
        else:
            with np.load(DIGITS_TEST) as test:
                x, labels = test["input"], test["labels"]
            self.path, self.x, self.labels = DIGITS, x, labels
            self.calibration = load_calibration(DIGITS_CALIBRATION, onnx.load(str(DIGITS)))
            self.input_shapes = {"input": [1, 1, 32, 32]}
            reference = make_session(str(DIGITS)).run(None, {"input": x})[0].argmax(1)
            self.original = float(np.mean(reference == labels))

            def evaluate(model: onnx.ModelProto) -> dict[str, float]:
                got = make_session(model).run(None, {"input": x})[0].argmax(1)
                return {"accuracy": float(np.mean(got == labels)), "agreement": float(np.mean(got == reference))}

            self.evaluate = evaluate

    def free(self, speedup: float, objective: str | None = None) -> tuple[onnx.ModelProto, Any]:
        return decompose(str(self.path), speedup=speedup, input_shapes=self.input_shapes, objective=objective, by="macs", check_runs=0)

    def aware(self, speedup: float, rank_multiple: int | None = None, **options: Any) -> tuple[onnx.ModelProto, Any]:
        activations = options.pop("activation_refit", None)
        knobs = {key: options.pop(key) for key in list(options) if key.startswith("activation_")}  # refit_layers' own
        settings = CalibrationOptions(**options)
        if activations is not None:
            # decompose does not hand activation_refit to its refit yet: convert without the refit, then refit here
            # as decompose does (its settings, numpy's BLAS on one thread)
            settings = replace(settings, refit=False)
        converted, report = decompose(
            str(self.path),
            speedup=speedup,
            calibration=self.calibration,
            calibration_options=settings,
            rank_multiple=rank_multiple,
            by="macs",
            check_runs=0,
        )
        if activations is None or not options.get("refit", True):
            return converted, report
        with single_threaded_blas():
            result = refit_layers(
                onnx.load(str(self.path)),
                converted,
                report,
                self.calibration,
                batch_size=settings.batch_size,
                stages=settings.stages,
                ridge=settings.ridge,
                positions=settings.positions,
                threads=settings.threads,
                inplace=True,
                activations=activations,
                **knobs,
            )
        report.calibration["refit"] = result.to_dict()
        return result.model, report


def _row(model: Trained, label: str, speedup: float, converted: onnx.ModelProto, report: Any, seconds: float) -> dict[str, Any]:
    return {
        "model": model.name,
        "variant": label,
        "speedup": speedup,
        "mac_ratio": report.mac_ratio,
        "seconds": seconds,
        **model.evaluate(converted),
        "ranks": {layer.node: [layer.kind, layer.rank, layer.full_rank] for layer in report.decomposed},
    }


def part_accuracy(models: list[Trained], speedups: tuple[float, ...]) -> dict[str, Any]:
    rows = []
    for model in models:
        for speedup in speedups:
            t0 = time.perf_counter()
            free, report = model.free(speedup)
            rows.append(_row(model, "data-free", speedup, free, report, time.perf_counter() - t0))
            t0 = time.perf_counter()
            aware, report = model.aware(speedup)
            rows.append(_row(model, "data-aware", speedup, aware, report, time.perf_counter() - t0))
            log(f"{model.name} {speedup:g}: " + ", ".join(f"{r['variant']} {r['accuracy']:.4f}" for r in rows[-2:]))
    return {"original": {m.name: m.original for m in models}, "rows": rows}


def part_objectives(models: list[Trained], speedups: tuple[float, ...]) -> dict[str, Any]:
    rows = []
    for model in models:
        for objective in OBJECTIVES:
            for speedup in speedups:
                t0 = time.perf_counter()
                try:
                    converted, report = model.free(speedup, objective)
                except Exception as exc:  # an objective that cannot reach the budget is a result too
                    rows.append({"model": model.name, "variant": objective, "speedup": speedup, "error": str(exc)})
                    continue
                rows.append(_row(model, objective, speedup, converted, report, time.perf_counter() - t0))
            accs = [r.get("accuracy") for r in rows[-len(speedups) :]]
            log(f"{model.name} {objective}: {accs}")
    return {"original": {m.name: m.original for m in models}, "rows": rows}


ABLATIONS: dict[str, dict[str, Any]] = {
    "factors only (no gains, no refit)": {"sensitivity": False, "refit": False},
    "factors + gains (no refit)": {"refit": False},
    "factors + refit (no gains)": {"sensitivity": False},
    "all, 2 stages": {"stages": 2},
    "all, 3 stages (default)": {},
    "all, 5 stages": {"stages": 5},
    "all, damping 1e-3": {"damping": 1e-3},
    "all, damping 1e-1": {"damping": 1e-1},
    "all, 1024 positions": {"positions": 1024},
    "all, ranks in multiples of 8": {"rank_multiple": 8},
    "all, linear refit": {"activation_refit": False},
    "all, ReLU-aware refit": {"activation_refit": True},
}


def part_ablation(models: list[Trained], speedups: tuple[float, ...]) -> dict[str, Any]:
    rows = []
    for model in models:
        for label, options in ABLATIONS.items():
            for speedup in speedups:
                t0 = time.perf_counter()
                converted, report = model.aware(speedup, **options)
                rows.append(_row(model, label, speedup, converted, report, time.perf_counter() - t0))
            log(f"{model.name} {label}: {[round(r['accuracy'], 4) for r in rows[-len(speedups) :]]}")
    return {"original": {m.name: m.original for m in models}, "rows": rows}


ACTIVATION_VARIANTS: dict[str, dict[str, Any]] = {
    "linear refit": {"activation_refit": False},
    "ReLU-aware refit": {"activation_refit": True},
    # a penalty weight that stays small: the Z-step is the hinge fit (Y where the original passes the activation,
    # min(Aθ, 0) where it cuts), a convex upper bound of the objective, never moved to the objective itself
    "ReLU-aware, hinge only (λ = 0.001)": {"activation_refit": True, "activation_lambdas": (1e-3, 1e-3)},
    "ReLU-aware, 25 iterations on every row": {"activation_refit": True, "activation_iterations": 25, "activation_rows": None},
}


def _outputs(path_or_model: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = make_session(str(path_or_model) if isinstance(path_or_model, Path) else path_or_model)
    return np.concatenate([session.run(None, {"input": np.asarray(x[i : i + 100], np.float32)})[0] for i in range(0, len(x), 100)])


def part_activations(models: list[Trained], speedups: tuple[float, ...]) -> dict[str, Any]:
    rows = []
    for model in models:
        reference = _outputs(model.path, model.x).astype(np.float64)
        for speedup in speedups:
            for label, options in ACTIVATION_VARIANTS.items():
                t0 = time.perf_counter()
                converted, report = model.aware(speedup, **options)
                row = _row(model, label, speedup, converted, report, time.perf_counter() - t0)
                refit = report.calibration["refit"]
                row |= {
                    # ||f̂(x) − f(x)|| / ||f(x)|| over the test split's outputs (logits): finer than the accuracy
                    "output_error": float(np.linalg.norm(_outputs(converted, model.x) - reference) / np.linalg.norm(reference)),
                    "refit_seconds": refit["seconds"],
                    "activation_seconds": refit["activation_seconds"],
                    "refit_passes": refit["passes"],
                    "layers": refit["layers"],
                }
                if label == ("ReLU-aware refit" if DEFAULT_ACTIVATIONS else "linear refit"):
                    plain, _ = model.aware(speedup)
                    row["same_as_decompose"] = plain.SerializeToString() == converted.SerializeToString()
                rows.append(row)
            log(
                f"{model.name} {speedup:g}: "
                + ", ".join(
                    f"{r['variant']} {r['accuracy']:.4f} (refit {r['refit_seconds']:.1f} s)" for r in rows[-len(ACTIVATION_VARIANTS) :]
                )
            )
    return {"original": {m.name: m.original for m in models}, "default": DEFAULT_ACTIVATIONS, "rows": rows}


def part_kronecker(models: list[Trained]) -> dict[str, Any]:
    """Relative output error on the calibration data (exact patch covariance) at a few ranks: data-free SVD, the
    Kronecker closed form, and that closed form with its horizontal factor re-solved on the exact covariance."""
    from onnx_lowrank.calibration.data import Batches
    from onnx_lowrank.calibration.data_aware import WhitenedDecomposition, output_error
    from onnx_lowrank.calibration.layers import collect_moments, layer_of
    from onnx_lowrank.factorization import decompose_kernel, reconstruct
    from onnx_lowrank.passes import find_sites
    from onnx_lowrank.passes.fold_batchnorm import fold_batchnorm
    from onnx_lowrank.run_shapes import resolve_shapes

    rows = []
    for model in models:
        proto, _ = fold_batchnorm(onnx.load(str(model.path)))
        sites = [s for s in find_sites(proto, resolve_shapes(proto, model.input_shapes)) if s.available(("spatial",))]
        layers = [layer_of(s.key, [s]) for s in sites]
        collect_moments(proto, layers, Batches(proto, model.calibration, 32), full_gram_max=4608, centered=False)
        for site, layer in zip(sites, layers, strict=True):
            moments = layer.moments
            if moments is None or moments.full is None:
                continue
            w = site.kernel().astype(np.float64)
            free = decompose_kernel(w, site.groups, "spatial")
            aware = WhitenedDecomposition(w, site.groups, "spatial", moments)
            total = output_error(w, site.groups, moments)
            for share in (0.125, 0.25, 0.5):
                rank = max(1, round(aware.full_rank * share))
                refined = _refine_horizontal(aware.factors(rank), w, moments)
                rows.append(
                    {
                        "model": model.name,
                        "layer": site.key,
                        "rank": rank,
                        "full_rank": aware.full_rank,
                        "data_free": output_error(w - reconstruct(free.factors(rank), site.groups), site.groups, moments) / total,
                        "kronecker": output_error(w - reconstruct(aware.factors(rank), site.groups), site.groups, moments) / total,
                        "kronecker_predicted": float(np.square(aware.s[:, rank:]).sum() / np.square(aware.s).sum()),
                        "kronecker_then_exact_horizontal": output_error(w - reconstruct(refined, site.groups), site.groups, moments)
                        / total,
                    }
                )
            log(f"{model.name} {site.key}: {rows[-1]}")
    return {"rows": rows}


def _refine_horizontal(factors: Any, w: np.ndarray, moments: Any) -> Any:
    """The horizontal factor re-solved by least squares on the exact patch covariance, the vertical one kept
    (one group): min_H Σ_n vec(W_n − V H_n)ᵀ G vec(W_n − V H_n), a linear problem per output channel."""
    from onnx_lowrank.factorization import Factors

    v = factors.first.reshape(factors.rank, -1).T  # (R, K): vertical filters as columns
    kw = w.shape[-1]
    r = v.shape[0]
    g = moments.full[0].reshape(r, kw, r, kw)
    # features of output n: (V ⊗ I) maps H_n (K × kw) to the patch space; normal matrix (Vᵀ⊗I) G (V⊗I)
    vi = np.einsum("rk,ij->rikj", v, np.eye(kw)).reshape(r * kw, -1)  # (R·kw, K·kw)
    gm = g.reshape(r * kw, r * kw)
    normal = vi.T @ gm @ vi
    rhs = vi.T @ gm @ w.reshape(w.shape[0], r * kw).T  # (K·kw, N)
    h = np.linalg.lstsq(normal + 1e-12 * np.trace(normal) * np.eye(normal.shape[0]), rhs, rcond=None)[0]  # (K·kw, N)
    second = h.T.reshape(w.shape[0], factors.rank, *([1] * (w.ndim - 3)), kw)
    return Factors(factors.kind, factors.rank, factors.first, second, factors.singular_values)


# --------------------------------------------------------------------------- cost


def _time_v(stderr: str) -> dict[str, float]:
    out: dict[str, float] = {}
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if match:
        out["peak_rss_mib"] = int(match.group(1)) / 1024
    return out


INPUT_NAMES = {"textline": "input", "resnet50": "input", "textdet640": "input", "db640": "images", "yolo640": "images"}
TEXTDET = ROOT / "models" / "textdet.onnx"
TEXTDET_SEED = 640  # the rendered pages of the cost part (the shipped splits are 256x256)


def _model_file(model: str, folder: Path) -> Path:
    """The model of the cost part (the detectors exported by a child process: torch stays out of this one)."""
    if model == "textline":
        return TEXTLINE
    if model == "textdet640":
        return TEXTDET
    if model in ("db640", "yolo640"):
        path = folder / f"{model}.onnx"
        if not path.exists():
            flags = ["--yolo"] if model == "yolo640" else []
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detector.py"), str(path), *flags], check=True, capture_output=True)
        return path
    from models.make_zoo import cached

    return Path(cached("resnet50-bnfolded", 224))


def _calibration_folder(model: str, samples: int, folder: Path) -> tuple[Path, Path]:
    """The model file and a folder of ``<input>.npy`` with ``samples`` calibration samples."""
    data = folder / f"calibration-{samples}"
    data.mkdir()
    path = _model_file(model, folder)
    if model == "textline":
        with np.load(TEXTLINE_CALIBRATION) as source:
            x = source["input"]
        np.save(data / "input.npy", np.resize(x, (samples, *x.shape[1:])))  # the 512 lines, repeated if more are asked
        return path, data
    if model == "textdet640":
        from models.textdet import render_pages

        out = np.lib.format.open_memmap(data / "input.npy", mode="w+", dtype=np.float32, shape=(samples, 1, 640, 640))
        for start in range(0, samples, 16):  # grey pages of the trained detector's kind, raw pixel values 0..255
            stop = min(samples, start + 16)
            out[start:stop] = render_pages(stop - start, TEXTDET_SEED, 640, 640, start=start)[0]
        out.flush()
        del out
        return path, data
    size = 640 if model in ("db640", "yolo640") else 224
    rng = np.random.default_rng(0)
    shape = (samples, 3, size, size)
    out = np.lib.format.open_memmap(data / f"{INPUT_NAMES[model]}.npy", mode="w+", dtype=np.float32, shape=shape)
    for start in range(0, samples, 16):
        stop = min(samples, start + 16)
        out[start:stop] = rng.standard_normal((stop - start, *shape[1:]), dtype=np.float32)
    out.flush()
    del out
    return path, data


_PLAIN = """
import json, sys, time, numpy as np
from onnx_lowrank.runtime import make_session
model, data, name = sys.argv[1], sys.argv[2], sys.argv[3]
x = np.load(data + "/" + name + ".npy", mmap_mode="r")
session = make_session(model)
session.run(None, {name: np.asarray(x[:1], np.float32)})
start = time.perf_counter()
for i in range(0, len(x), 32):
    session.run(None, {name: np.asarray(x[i:i + 32], np.float32)})
print(json.dumps({"plain_seconds": time.perf_counter() - start}))
"""

# the conversion with every onnxruntime session and run recorded, by phase (run untimed: what the passes do)
_COUNTED = """
import functools, json, sys
import onnx, onnxruntime
import onnx_lowrank.calibration as calibration
import onnx_lowrank.calibration.plan as plan
import onnx_lowrank.runtime as runtime
from onnx_lowrank import decompose
model, data, check_runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
phase = ["other"]
sessions = {}
real_session, real_run = runtime._session, onnxruntime.InferenceSession.run

def _session(ort, source, options, providers):
    session = real_session(ort, source, options, providers)
    graph = (onnx.load_model_from_string(source) if isinstance(source, bytes) else onnx.load(source, load_external_data=False)).graph
    names = sorted({n.name for n in graph.node} | {o for n in graph.node for o in n.output})
    sessions[id(session)] = {"phase": phase[0], "names": names, "runs": [], "nodes": len(graph.node)}
    return session

def run(self, names, feed, *args, **kwargs):
    entry = sessions.get(id(self))
    if entry is not None:
        first = next(iter(feed.values()), None)
        entry["runs"].append(int(first.shape[0]) if getattr(first, "ndim", 0) else 1)
    return real_run(self, names, feed, *args, **kwargs)

def within(module, name, label):
    real = getattr(module, name)
    @functools.wraps(real)
    def wrapped(*args, **kwargs):
        before, phase[0] = phase[0], label
        try:
            return real(*args, **kwargs)
        finally:
            phase[0] = before
    setattr(module, name, wrapped)

runtime._session = _session
onnxruntime.InferenceSession.run = run
within(plan, "collect_moments", "statistics")
within(plan, "measure_gains", "gains")
within(calibration, "refit_layers", "refit")
_, report = decompose(model, speedup=2, by="macs", calibration=data, check_runs=check_runs)
print(json.dumps({"report": report.to_dict(), "sessions": list(sessions.values())}))
"""


def _counts(output: dict[str, Any], samples: int) -> dict[str, Any]:
    """Per phase: sessions built, runs, samples run, and passes in plain-pass units (each run's samples times the
    share of the model's MACs its session computes — a decomposed layer at its MACs after — over ``samples``)."""
    report = output["report"]
    total = max(1, report["macs_before"])
    by_phase: dict[str, dict[str, Any]] = {}
    for session in output["sessions"]:
        names = set(session["names"])
        macs = 0
        for layer in report["layers"]:
            if layer["node"] in names:
                macs += layer["macs_before"]
            elif layer.get("vertical_node") in names or layer.get("horizontal_node") in names:
                macs += layer["macs_after"]
        row = by_phase.setdefault(session["phase"], {"sessions": 0, "runs": 0, "samples": 0, "passes": 0.0})
        row["sessions"] += 1
        row["runs"] += len(session["runs"])
        row["samples"] += sum(session["runs"])
        row["passes"] += sum(session["runs"]) * (macs / total) / samples
    return by_phase


def part_cost(models: list[str], samples_list: list[int], repeat: int, check: bool = False, before: str | None = None) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="calibration-cost-") as tmp:
        folder = Path(tmp)
        codes: dict[str, Path] = {"after": ROOT}
        if before:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from conversion import extract_code

            codes = {"before": extract_code(before, folder / "before"), "after": ROOT}
        for name in models:
            for samples in samples_list:
                model, data = _calibration_folder(name, samples, folder)
                for label, code in codes.items():
                    row = _cost_row(name, model, data, samples, repeat, check, label, code, folder)
                    log(f"{name} {samples} {label}: counted passes {json.dumps(row.get('counts', {}))}")
                    rows.append(row)
                for path in data.iterdir():
                    path.unlink()
                data.rmdir()
    return {"rows": rows, "before": before, "check": check}


def _cost_row(
    name: str, model: Path, data: Path, samples: int, repeat: int, check: bool, label: str, code: Path, folder: Path
) -> dict[str, Any]:
    """Wall, peak RSS and the report's seconds of ``repeat`` conversions (the plain pass before each), and what the
    passes do (one more, untimed conversion), with the package in ``code``."""
    row: dict[str, Any] = {"model": name, "samples": samples, "code": label, "file_mib": model.stat().st_size / 2**20, "runs": []}
    input_name = INPUT_NAMES[name]
    check_flags = [] if check else ["--check-runs", "0"]
    for _ in range(repeat):  # interleaved: plain pass, conversion
        plain = subprocess.run(
            [sys.executable, "-c", _PLAIN, str(model), str(data), input_name], capture_output=True, text=True, check=True, cwd=ROOT
        )
        report_path = folder / "report.json"
        command = ["-m", "onnx_lowrank", "decompose", str(model), str(folder / "out.onnx"), "--speedup", "2", "--by", "macs", *check_flags]
        command += ["--calibration", str(data), "--report", str(report_path), "--quiet"]
        wrapped = [str(TIME), "-v", sys.executable, *command] if TIME.exists() else [sys.executable, *command]
        start = time.perf_counter()
        proc = subprocess.run(wrapped, capture_output=True, text=True, check=False, cwd=code)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            row["error"] = proc.stderr.strip().splitlines()[-1:]
            break
        report = json.loads(report_path.read_text())
        cal = report["calibration"]
        passes = cal["statistics_seconds"] + cal.get("sensitivity", {}).get("seconds", 0.0) + cal.get("refit", {}).get("seconds", 0.0)
        plain_seconds = json.loads(plain.stdout.strip().splitlines()[-1])["plain_seconds"]
        run = {
            "plain_seconds": plain_seconds,
            "conversion_wall_seconds": wall,
            "statistics_seconds": cal["statistics_seconds"],
            "factor_seconds": cal["factor_seconds"],
            "sensitivity_seconds": cal.get("sensitivity", {}).get("seconds", 0.0),
            "refit_seconds": cal.get("refit", {}).get("seconds", 0.0),
            "check_seconds": (report["latency"].get("check") or {}).get("seconds"),
            "passes_seconds": passes,
            "ratio_passes_to_plain": passes / plain_seconds,
            "ratio_wall_to_plain": wall / plain_seconds,
            **_time_v(proc.stderr),
        }
        row["runs"].append(run)
        log(f"{name} {samples} {label}: {json.dumps({k: round(v, 2) for k, v in run.items() if isinstance(v, float)})}")
    counted = subprocess.run(
        [sys.executable, "-c", _COUNTED, str(model), str(data), "10" if check else "0"],
        capture_output=True,
        text=True,
        check=False,
        cwd=code,
    )
    if counted.returncode == 0:
        row["counts"] = _counts(json.loads(counted.stdout.strip().splitlines()[-1]), samples)
    else:
        row["counts_error"] = counted.stderr.strip().splitlines()[-1:]
    if row["runs"]:
        best = min(row["runs"], key=lambda r: r["ratio_wall_to_plain"])
        row.update({k: v for k, v in best.items()})
        row["rss_budget_mib"] = 2048 + 3 * row["file_mib"]
        row["command"] = (
            f"onnx-lowrank decompose MODEL OUT --speedup 2 --by macs {' '.join(check_flags)} --calibration DATA --report R.json --quiet"
        ).replace("  ", " ")
    return row


# --------------------------------------------------------------------------- tables


def _accuracy_table(result: dict[str, Any], variants: list[str]) -> str:
    out = []
    for name in dict.fromkeys(r["model"] for r in result["rows"]):
        header = ["S", *variants]
        rows = []
        for speedup in dict.fromkeys(r["speedup"] for r in result["rows"] if r["model"] == name):
            cells = [f"{speedup:g}x"]
            for variant in variants:
                hit = next((r for r in result["rows"] if r["model"] == name and r["speedup"] == speedup and r["variant"] == variant), None)
                if hit is None or "accuracy" not in hit:
                    cells.append("–")
                else:
                    cells.append(f"{hit['accuracy'] * 100:.2f} % ({hit['mac_ratio']:.2f}x)")
            rows.append(cells)
        out.append(f"{name} (original {result['original'][name] * 100:.2f} %)\n\n" + markdown_table(header, rows))
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["accuracy", "objectives", "ablation", "kronecker", "cost"])
    parser.add_argument("--trained", nargs="+", default=["textline", "digits"], choices=["textline", "digits"])
    parser.add_argument("--speedups", type=float, nargs="+", default=list(SPEEDUPS))
    parser.add_argument("--models", nargs="+", default=["textline", "resnet50"], choices=list(INPUT_NAMES), help="cost part")
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 512], help="cost part: calibration set sizes")
    parser.add_argument("--repeat", type=int, default=1, help="cost part: runs per setting (the lowest ratio is kept)")
    parser.add_argument("--check", action="store_true", help="cost part: keep the default check of the result (else --check-runs 0)")
    parser.add_argument("--before", metavar="REV", help="cost part: also convert with the package at this git revision")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    speedups = (2.0,) if args.quick else tuple(args.speedups)
    trained = [Trained(name, args.quick) for name in args.trained] if set(args.parts) - {"cost"} else []
    for part in args.parts:
        if part == "accuracy":
            result = part_accuracy(trained, speedups)
            table = _accuracy_table(result, ["data-free", "data-aware"])
        elif part == "objectives":
            result = part_objectives(trained, speedups)
            table = _accuracy_table(result, list(OBJECTIVES))
        elif part == "ablation":
            result = part_ablation(trained, speedups)
            table = _accuracy_table(result, list(ABLATIONS))
        elif part == "activations":
            result = part_activations(trained, speedups)
            table = _accuracy_table(result, list(ACTIVATION_VARIANTS))
            table += "\n\n" + markdown_table(
                [
                    "model",
                    "S",
                    "variant",
                    "agreement",
                    "output error",
                    "refit s",
                    "of them activation fits s",
                    "refit passes",
                    "same as decompose",
                ],
                [
                    [
                        r["model"],
                        f"{r['speedup']:g}x",
                        r["variant"],
                        fmt(r["agreement"] * 100, ".2f", " %"),
                        fmt(r["output_error"], ".4f"),
                        fmt(r["refit_seconds"], ".1f"),
                        fmt(r["activation_seconds"], ".1f"),
                        fmt(r["refit_passes"], ".0f"),
                        str(r.get("same_as_decompose", "–")),
                    ]
                    for r in result["rows"]
                ],
            )
        elif part == "kronecker":
            result = part_kronecker(trained)
            keys = ["data_free", "kronecker", "kronecker_predicted", "kronecker_then_exact_horizontal"]
            table = markdown_table(
                ["model", "layer", "rank", *keys],
                [[r["model"], r["layer"], f"{r['rank']}/{r['full_rank']}", *(fmt(r[k], ".4f") for k in keys)] for r in result["rows"]],
            )
        elif part == "cost":
            result = part_cost(
                args.models, [min(s, 64) for s in args.samples] if args.quick else args.samples, args.repeat, args.check, args.before
            )
            table = markdown_table(
                [
                    "model",
                    "samples",
                    "code",
                    "plain pass s",
                    "stats s",
                    "gains s",
                    "refit s",
                    "SVDs s",
                    "passes / plain",
                    "wall / plain",
                    "check s",
                    "peak RSS MiB",
                    "budget MiB",
                    "passes counted (stats / gains / refit)",
                ],
                [
                    [
                        r["model"],
                        str(r["samples"]),
                        r.get("code", "after"),
                        fmt(r.get("plain_seconds"), ".1f"),
                        fmt(r.get("statistics_seconds"), ".1f"),
                        fmt(r.get("sensitivity_seconds"), ".1f"),
                        fmt(r.get("refit_seconds"), ".1f"),
                        fmt(r.get("factor_seconds"), ".1f"),
                        fmt(r.get("ratio_passes_to_plain"), ".2f", "x"),
                        fmt(r.get("ratio_wall_to_plain"), ".2f", "x"),
                        fmt(r.get("check_seconds"), ".1f"),
                        fmt(r.get("peak_rss_mib"), ".0f"),
                        fmt(r.get("rss_budget_mib"), ".0f"),
                        " / ".join(fmt((r.get("counts") or {}).get(p, {}).get("passes"), ".2f") for p in ("statistics", "gains", "refit")),
                    ]
                    for r in result["rows"]
                ],
            )
        else:
            raise SystemExit(f"unknown part {part!r}")
        result["machine"] = machine_info()
        path = results_path(f"calibration_{part}", args.quick)
        write_json(path, result)
        print(f"## {part}\n\n{table}\n\nWrote {path}\n", flush=True)


if __name__ == "__main__":
    main()
