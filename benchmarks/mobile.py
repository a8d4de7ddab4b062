"""Mobile benchmark: float, low-rank, INT8 and low-rank + INT8 on onnxruntime CPU; mobile EP coverage; the ORT round trip.

For each model — the trained models of ``models/`` (``--trained``: the digits
CNN and the CRNN text-line recogniser, each with its held-out test set and
calibration set) and three zoo
models at 224x224 (``--zoo``: ResNet-18, GoogLeNet, MobileNetV2, random
weights, BN folded by the exporter) — six variants are built:

============================  =====================================================================
``float``                     the model as given
``low-rank``                  ``decompose(speedup=2, by="macs")`` — the plan for other hardware, as a
                              model converted here for a phone is; trained models with their
                              calibration set (data-free factors at 2x drop the digits CNN to
                              chance); where 2x cannot be reached, the most the allocation reaches
``int8 dynamic``              ``quantize_model(float, "dynamic")`` (onnxruntime ``quantize_dynamic``)
``int8 static``               ``quantize_model(float, "static")``: QDQ, MinMax on the calibration set
``low-rank + int8 dynamic``   the low-rank model, then dynamic INT8
``low-rank + int8 static``    the low-rank model, then static QDQ INT8
============================  =====================================================================

Per variant: file size (``.onnx``); accuracy and top-1 agreement with the float
model on the test set (trained; for the text line exact strings and string agreement) or the relative L2 error and cosine of the
logits against the float model on seeded random inputs (zoo: random weights,
so accuracy means nothing; the zoo's static INT8 is calibrated on seeded random
inputs too); latency at 1 and 2 intra-op threads, the six sessions run in
turn with the order rotated every round (interleaved), medians; mobile
coverage (onnxruntime's usability checker, input shape fixed: NNAPI, CoreML
NeuralNetwork, CoreML MLProgram); and for float, low-rank and
low-rank + int8 static the ORT-format round trip: ``save_ort`` then the .ort's
outputs against the .onnx's in onnxruntime (max abs difference) and its size.

Two parts, so the timing can run alone: ``prepare`` (build, convert, check;
CPU-heavy but untimed) writes the variants to ``--work`` and ``latency`` times
them. Results: ``benchmarks/results/mobile.json`` (updated by each part), and
the Markdown tables for the README on stdout::

    python benchmarks/mobile.py --parts prepare
    python benchmarks/mobile.py --parts latency     # alone on the machine
    python benchmarks/mobile.py --parts tables
    python benchmarks/mobile.py --parts coverage    # the coverage again, on the variants prepare wrote
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, beside this script

from bench_common import ROOT, fmt, log, machine_info, markdown_table, results_path, write_json

from onnx_lowrank import LowRankError, decompose
from onnx_lowrank.mobile import EP_NAMES, coverage, save_ort
from onnx_lowrank.model_io import save_model
from onnx_lowrank.quantize import quantize_model
from onnx_lowrank.runtime import make_session

VARIANTS = ("float", "low-rank", "int8 dynamic", "int8 static", "low-rank + int8 dynamic", "low-rank + int8 static")
ORT_VARIANTS = ("float", "low-rank", "low-rank + int8 static")
PARTS = ("prepare", "coverage", "latency", "tables")
THREADS = (1, 2)
SPEEDUP = 2.0
SEED = 0


@dataclass(frozen=True)
class TrainedModel:
    """A trained model of ``models/``: the ONNX file, a test set (input arrays and ``labels``) and a calibration set."""

    name: str
    path: Path
    test: Path
    calibration: Path
    input_name: str
    input_shape: tuple[int, ...]  # one sample, batch 1: what latency and coverage use
    # "top1": class logits and `labels`; "ctc": per-time-step logits read as strings (`labels_text`, models/textline.py)
    metric: str = "top1"


@dataclass(frozen=True)
class ZooModel:
    name: str
    variant: str  # models/make_zoo.py variant
    size: int


TRAINED: dict[str, TrainedModel] = {
    "digits": TrainedModel(
        "digits",
        ROOT / "models" / "digits_cnn.onnx",
        ROOT / "models" / "digits_test.npz",
        ROOT / "models" / "digits_calibration.npz",
        "input",
        (1, 1, 32, 32),
    ),
    "textline": TrainedModel(
        "textline",
        ROOT / "models" / "textline_crnn.onnx",
        ROOT / "models" / "textline_test.npz",
        ROOT / "models" / "textline_calibration.npz",
        "input",
        (1, 1, 32, 256),
        "ctc",
    ),
}
ZOO: dict[str, ZooModel] = {
    "resnet18": ZooModel("resnet18", "resnet18-bnfolded", 224),
    "googlenet": ZooModel("googlenet", "googlenet-bnfolded", 224),
    "mobilenetv2": ZooModel("mobilenetv2", "mobilenetv2-bnfolded", 224),
}
ZOO_CALIBRATION_SAMPLES = 32
ZOO_EVAL_SAMPLES = 8


# --------------------------------------------------------------------------- prepare


def _random(shape: tuple[int, ...], samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((samples, *shape[1:])).astype(np.float32)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(make_session(path, threads=2).run(None, feeds)[0], dtype=np.float64)


def _run_without_nchwc(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=["NchwcTransformer"])
    return np.asarray(session.run(None, feeds)[0], dtype=np.float64)


def _quality(
    trained: TrainedModel | None, path: Path, reference: np.ndarray, feeds: dict[str, np.ndarray], labels: Any
) -> dict[str, float]:
    logits = _run(path, feeds)
    out = {
        "relative_l2": float(np.linalg.norm(logits - reference) / np.linalg.norm(reference)),
        "cosine": float(np.sum(logits * reference) / (np.linalg.norm(logits) * np.linalg.norm(reference))),
    }
    if trained is not None and trained.metric == "ctc":
        from models.textline import greedy_decode

        # the strings the model reads (greedy CTC decoding): exact-string accuracy, and agreement with the float model's
        read, original = greedy_decode(logits), greedy_decode(reference)
        out["top1_agreement"] = float(np.mean([a == b for a, b in zip(read, original, strict=True)]))
        out["accuracy"] = float(np.mean([a == b for a, b in zip(read, labels, strict=True)]))
        return out
    out["top1_agreement"] = float(np.mean(logits.argmax(1) == reference.argmax(1)))
    if trained is not None:
        out["accuracy"] = float(np.mean(logits.argmax(1) == labels))
    return out


def _lowrank(
    model: onnx.ModelProto, trained: TrainedModel | None, input_name: str, shape: tuple[int, ...]
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``decompose(speedup=2, by="macs")`` (calibrated for trained models): the plan for other hardware, as a
    model converted here for a phone is; the most reachable below 2 where 2 is not."""
    kwargs: dict[str, Any] = {"input_shapes": {input_name: list(shape)}, "by": "macs", "check_runs": 0}
    if trained is not None:
        kwargs["calibration"] = trained.calibration
    target = SPEEDUP
    try:
        new, report = decompose(model, speedup=target, **kwargs)
    except LowRankError as exc:
        text = str(exc)
        if "cannot be reached" not in text:
            raise
        best = float(re.search(r"(?:gives is|at most) ([0-9.]+)x", text).group(1))  # type: ignore[union-attr]
        target = round(best * 0.98, 2)
        log(f"  speedup {SPEEDUP:g} unreachable ({text}); using {target:g}")
        new, report = decompose(model, speedup=target, **kwargs)
    info = {
        "target": target,
        "target_asked": SPEEDUP,
        "mac_ratio": report.mac_ratio,
        "decomposed_layers": len(report.decomposed),
        "layers": len(report.layers),
        "seconds": report.seconds,
    }
    return new, info


LISTED = 10  # nodes kept per list in the results file (a QDQ model lists hundreds); the counts are complete


def compact_coverage(mobile: dict[str, Any]) -> dict[str, Any]:
    """The coverage per EP for the results file: the numbers, and the first nodes of each list with its length."""
    out = {}
    for key, ep in mobile.items():
        entry = {k: v for k, v in ep.items() if k not in ("caveats", "splitting_nodes", "refused_nodes")}
        entry["splitting_ops"] = sorted({n["op"] for n in ep["splitting_nodes"]})
        for listed in ("splitting_nodes", "refused_nodes"):
            entry[listed] = ep[listed][:LISTED]
            entry[f"{listed}_count"] = len(ep[listed])
        out[key] = entry
    return out


def prepare(name: str, work: Path) -> dict[str, Any]:
    """Build the six variants of one model into ``work/<name>/``; their quality, sizes, coverage and ORT round trip."""
    trained = TRAINED.get(name)
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    if trained is not None:
        model = onnx.load(str(trained.path))
        input_name, shape = trained.input_name, trained.input_shape
        with np.load(trained.test) as data:
            feeds = {input_name: data[input_name].astype(np.float32)}
            labels = [str(t) for t in data["labels_text"]] if trained.metric == "ctc" else data["labels"]
        calibration: Any = trained.calibration
        source = {"path": str(trained.path.relative_to(ROOT)), "test": str(trained.test.relative_to(ROOT))}
    else:
        from models.make_zoo import cached

        spec = ZOO[name]
        path = cached(spec.variant, spec.size)
        model = onnx.load(str(path))
        input_name, shape = "input", (1, 3, spec.size, spec.size)
        feeds = {input_name: _random(shape, ZOO_EVAL_SAMPLES, SEED + 1)}
        labels = None
        calibration = {input_name: _random(shape, ZOO_CALIBRATION_SAMPLES, SEED)}
        source = {"zoo_variant": spec.variant, "input_size": spec.size, "weights": "random (seeded)"}

    paths = {v: folder / (v.replace(" + ", "+").replace(" ", "-") + ".onnx") for v in VARIANTS}
    build: dict[str, Any] = {}
    start = time.perf_counter()
    save_model(model, paths["float"])
    log(f"{name}: low-rank")
    low, build["low-rank"] = _lowrank(model, trained, input_name, shape)
    save_model(low, paths["low-rank"])
    for base, prefix in (("float", ""), ("low-rank", "low-rank + ")):
        for mode in ("dynamic", "static"):
            variant = f"{prefix}int8 {mode}"
            log(f"{name}: {variant}")
            result = quantize_model(paths[base], mode, calibration=calibration if mode == "static" else None)
            save_model(result.model, paths[variant])
            build[variant] = result.to_dict()
    log(f"{name}: quality, coverage, ORT")
    reference = _run(paths["float"], feeds)
    variants: dict[str, Any] = {}
    for v in VARIANTS:
        entry: dict[str, Any] = {
            "file": str(paths[v].relative_to(work)),
            "bytes": paths[v].stat().st_size,
            "quality": _quality(trained, paths[v], reference, feeds, labels),
            "mobile": compact_coverage(coverage(paths[v], input_shapes={input_name: list(shape)}).to_dict()),
        }
        if v in build:
            entry["build"] = build[v]
        if v in ORT_VARIANTS:
            ort_path = paths[v].with_suffix(".ort")
            save_ort(paths[v], ort_path)
            onnx_out, ort_out = _run(paths[v], feeds), _run(ort_path, feeds)
            # the .ort is optimized for any CPU (the converter leaves out the x86 NCHWc layout); the .onnx loaded on
            # this x86 machine gets it: the same graph without it must give the .ort's outputs bit for bit
            portable = _run_without_nchwc(paths[v], feeds)
            entry["ort"] = {
                "bytes": ort_path.stat().st_size,
                "max_abs_difference": float(np.max(np.abs(ort_out - onnx_out))),
                "relative_l2": float(np.linalg.norm(ort_out - onnx_out) / np.linalg.norm(onnx_out)),
                "outputs_equal": bool(np.array_equal(ort_out, onnx_out)),
                "outputs_equal_without_nchwc": bool(np.array_equal(ort_out, portable)),
            }
        variants[v] = entry
    return {
        "source": source,
        "input": {"name": input_name, "shape": list(shape)},
        "evaluation_samples": len(next(iter(feeds.values()))),
        "variants": variants,
        "prepare_seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------- latency


def latency(entry: dict[str, Any], work: Path, runs: int, warmup: int) -> dict[str, Any]:
    """Median ms of each variant at 1 and 2 threads, the variants run in turn, the order rotated every round."""
    shape = entry["input"]["shape"]
    feed = {entry["input"]["name"]: _random(tuple(shape), 1, SEED + 2)}
    out: dict[str, Any] = {}
    for threads in THREADS:
        sessions = {v: make_session(work / entry["variants"][v]["file"], threads=threads) for v in VARIANTS}
        names = list(sessions)
        for _ in range(warmup):
            for v in names:
                sessions[v].run(None, feed)
        times: dict[str, list[float]] = {v: [] for v in names}
        for i in range(runs):
            order = names[i % len(names) :] + names[: i % len(names)]
            for v in order:
                t0 = time.perf_counter()
                sessions[v].run(None, feed)
                times[v].append((time.perf_counter() - t0) * 1000.0)
        medians = {v: statistics.median(t) for v, t in times.items()}
        out[str(threads)] = {"median_ms": medians, "runs": runs, "warmup": warmup}
        del sessions
    return out


# --------------------------------------------------------------------------- tables


def tables(results: dict[str, Any]) -> str:
    """The README tables: variants (size, quality, latency), coverage before/after, ORT round trip."""
    out = []
    rows = []
    for name, entry in results["models"].items():
        variants = entry.get("variants", {})
        timing = entry.get("latency", {})
        base = variants.get("float", {})
        for v in VARIANTS:
            if v not in variants:
                continue
            e = variants[v]
            q = e["quality"]
            if "accuracy" in q:
                quality = f"{q['accuracy']:.2%} (agree {q['top1_agreement']:.1%})"
            else:
                quality = f"rel L2 {q['relative_l2']:.3f}, cos {q['cosine']:.4f}"
            cells = [name, v]
            if v.startswith("low-rank"):
                lr = variants["low-rank"]["build"]
                cells[1] += f" ({lr['mac_ratio']:.2f}x MACs)" if v == "low-rank" else ""
            cells += [f"{e['bytes'] / 1e6:.2f} MB", f"{e['bytes'] / base['bytes']:.2f}x", quality]
            for t in THREADS:
                med = timing.get(str(t), {}).get("median_ms", {})
                if v in med and "float" in med:
                    cells.append(f"{med[v]:.2f} ms ({med['float'] / med[v]:.2f}x)")
                else:
                    cells.append("–")
            rows.append(cells)
    out.append(
        markdown_table(
            ["model", "variant", "size", "size vs float", "accuracy / output error vs float", "1 thread (speedup)", "2 threads (speedup)"],
            rows,
        )
    )
    cov_rows = []
    for name, entry in results["models"].items():
        variants = entry.get("variants", {})
        for v in ("float", "low-rank", "int8 static", "low-rank + int8 static"):
            if v not in variants:
                continue
            cells = [name, v]
            for key in EP_NAMES:
                ep = variants[v]["mobile"][key]
                cells.append(f"{ep['partitions']} ({ep['supported_nodes']}/{ep['total_nodes']})")
            split = sorted({op for key in EP_NAMES for op in variants[v]["mobile"][key]["splitting_ops"]})
            cells.append(", ".join(split) or "–")
            cov_rows.append(cells)
    out.append(markdown_table(["model", "variant", *[f"{n}: partitions (nodes)" for n in EP_NAMES.values()], "split at"], cov_rows))
    ort_rows = []
    for name, entry in results["models"].items():
        for v in ORT_VARIANTS:
            e = entry.get("variants", {}).get(v)
            if e is None or "ort" not in e:
                continue
            o = e["ort"]
            ort_rows.append(
                [
                    name,
                    v,
                    f"{o['bytes'] / 1e6:.2f} MB",
                    f"{fmt(o['max_abs_difference'], '.2g')} ({fmt(o['relative_l2'], '.1g')})",
                    "yes" if o["outputs_equal"] else "no",
                    "yes" if o.get("outputs_equal_without_nchwc") else "no",
                ]
            )
    out.append(
        markdown_table(
            ["model", "variant", ".ort size", ".ort vs .onnx: max abs (rel. L2)", "bit-identical", "bit-identical, NCHWc off"], ort_rows
        )
    )
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=["prepare", "latency", "tables"])
    parser.add_argument("--trained", nargs="*", default=list(TRAINED), help=f"trained models ({', '.join(TRAINED)})")
    parser.add_argument("--zoo", nargs="*", default=list(ZOO), help=f"zoo models ({', '.join(ZOO)})")
    parser.add_argument("--work", default=str(ROOT / ".mobile-bench"), help="where the variants are written")
    parser.add_argument("--runs", type=int, default=30, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", help="results file (default benchmarks/results/mobile.json)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.trained if m not in TRAINED] + [m for m in args.zoo if m not in ZOO]
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")
    path = results_path("mobile", False, args.out)
    import json

    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    work = Path(args.work)
    names = [*args.trained, *args.zoo]
    if "prepare" in args.parts:
        for name in names:
            log(f"prepare {name}")
            entry = prepare(name, work)
            entry["latency"] = {}  # rebuilt variants: earlier timings no longer hold for them
            results["models"][name] = entry
            results["prepare_environment"] = machine_info()
            write_json(path, results)
    if "coverage" in args.parts and "prepare" not in args.parts:  # again, on the variants prepare wrote
        for name in names:
            entry = results["models"][name]
            shapes = {entry["input"]["name"]: entry["input"]["shape"]}
            for variant in entry["variants"].values():
                variant["mobile"] = compact_coverage(coverage(work / variant["file"], input_shapes=shapes).to_dict())
            write_json(path, results)
    if "latency" in args.parts:
        for name in names:
            log(f"latency {name}")
            results["models"][name]["latency"] = latency(results["models"][name], work, args.runs, args.warmup)
            results["latency_environment"] = machine_info()
            write_json(path, results)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
