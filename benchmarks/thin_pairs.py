"""Which thin convs run faster here: the factor order of Tai et al.'s pair, and Zhang et al.'s "3-D" chain.

For every distinct k×k conv (k > 1) of the benchmark models, at its real input size, at the ranks that cut its
MACs 2x and 3x (multiples of 16), four one-layer models are built and timed in onnxruntime:

* ``vertical first`` — what the converter writes: a k×1 conv (C → K) then a 1×k conv (K → N);
* ``horizontal first`` — the same rank the other way round: a 1×k conv (C → K) then a k×1 conv (K → N), the same
  MACs (onnxruntime runs a 1×3 conv slower than a 3×1 one: microsoft/onnxruntime issue 9192);
* ``3-D`` (Zhang et al. 2015, "Accelerating very deep convolutional networks", Sec. 5): the spatial pair with
  its second conv split by channels — k×1 (C → K), 1×k (K → K₂), 1×1 (K₂ → N) — with K₂ chosen (a multiple
  of 16) so the chain costs the pair's MACs or fewer.

Each alternative is timed against the vertical-first pair, interleaved (:func:`onnx_lowrank.timing.measure_speedup`:
paired runs until the ratio's 95 % interval is 4 % wide, or 3 s), at 1 and 2 threads. A ratio above 1 means the
alternative runs faster. The summary gives, per thread count and alternative, the median ratio over layers and
how many layers it is faster on with the interval's lower end above 1.05 — what an option must show to be offered
to the plan by latency.

    python benchmarks/thin_pairs.py                  # ~10 min on 2 cores; needs a quiet machine
    python benchmarks/thin_pairs.py --models resnet50 --threads 1

Results: ``benchmarks/results/thin_pairs.json``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MODELS, load, log, machine_info, results_path, write_json

from onnx_lowrank.passes import find_sites, fold_batchnorm
from onnx_lowrank.run_shapes import resolve_shapes
from onnx_lowrank.runtime import make_session
from onnx_lowrank.timing import measure_speedup

DEFAULT_MODELS = ("vgg16", "resnet50", "resnet18", "densenet121", "nin", "digits", "textline")
THREADS = (1, 2)
REDUCTIONS = (2.0, 3.0)
STEP = 16


def _geometries(name: str) -> list[dict[str, Any]]:
    """Every distinct k×k conv (k > 1, one group) of the model at its real input size."""
    spec = MODELS[name]
    model, _ = load(spec, quick=False)
    model, _ = fold_batchnorm(model)
    shapes = resolve_shapes(model, spec.input_shapes)
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    for site in find_sites(model, shapes):
        if site.node.op_type != "Conv" or site.weight is None or not site.shape_known or site.input_shape is None or site.groups != 1:
            continue
        n, c, *kernel = site.weight.shape
        if len(kernel) != 2 or kernel[0] != kernel[1] or kernel[0] < 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in site.node.attribute}
        strides = tuple(attrs.get("strides", (1, 1)))
        dilations = tuple(attrs.get("dilations", (1, 1)))
        if dilations != (1, 1) or strides[0] != strides[1]:
            continue
        key = (n, c, kernel[0], strides[0], tuple(site.input_shape))
        found.setdefault(
            key, {"model": name, "layer": site.key, "n": n, "c": c, "k": kernel[0], "stride": strides[0], "input": list(site.input_shape)}
        )
    return list(found.values())


def _conv(x: str, y: str, weight: str, kernel: tuple[int, int], stride: tuple[int, int]) -> onnx.NodeProto:
    pads = [kernel[0] // 2, kernel[1] // 2, kernel[0] // 2, kernel[1] // 2]
    return helper.make_node("Conv", [x, weight], [y], kernel_shape=list(kernel), strides=list(stride), pads=pads)


def _chain(geometry: dict[str, Any], layers: list[tuple[int, int, tuple[int, int], tuple[int, int]]]) -> onnx.ModelProto:
    """A model of convs in a row: (out channels, in channels, kernel, stride) each, random weights."""
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i, (out, inp, kernel, stride) in enumerate(layers):
        name = f"w{i}"
        inits.append(numpy_helper.from_array((rng.standard_normal((out, inp, *kernel)) * 0.05).astype(np.float32), name))
        nodes.append(_conv(current, f"y{i}", name, kernel, stride))
        current = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, geometry["input"])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _variants(geometry: dict[str, Any], rank: int) -> dict[str, tuple[onnx.ModelProto, int]]:
    """The three models at ``rank``, each with its MACs per output pixel (stride 1)."""
    n, c, k, s = geometry["n"], geometry["c"], geometry["k"], geometry["stride"]
    pair_macs = rank * c * k + n * rank * k
    # the 3-D chain's K2: the largest multiple of 16 whose chain costs no more than the pair
    k2 = max(STEP, (int((pair_macs - rank * c * k) / (rank * k + n)) // STEP) * STEP)
    return {
        "vertical first": (_chain(geometry, [(rank, c, (k, 1), (s, 1)), (n, rank, (1, k), (1, s))]), pair_macs),
        "horizontal first": (_chain(geometry, [(rank, c, (1, k), (1, s)), (n, rank, (k, 1), (s, 1))]), pair_macs),
        "3-D": (
            _chain(geometry, [(rank, c, (k, 1), (s, 1)), (k2, rank, (1, k), (1, s)), (n, k2, (1, 1), (1, 1))]),
            rank * c * k + k2 * rank * k + n * k2,
        ),
    }


def rows_for(geometry: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    n, c, k = geometry["n"], geometry["c"], geometry["k"]
    x = np.random.default_rng(1).standard_normal(geometry["input"]).astype(np.float32)
    out = []
    for reduction in REDUCTIONS:
        rank = int(n * c * k * k / reduction / (c * k + n * k)) // STEP * STEP
        if rank < STEP:
            continue
        variants = _variants(geometry, rank)
        base = make_session(variants["vertical first"][0], threads=threads)
        for name in ("horizontal first", "3-D"):
            model, macs = variants[name]
            other = make_session(model, threads=threads)
            estimate = measure_speedup(base, other, {"x": x}, max_runs=40, budget_ms=3000.0, width=0.04, warmup=3)
            out.append(
                {
                    **geometry,
                    "threads": threads,
                    "reduction": reduction,
                    "rank": rank,
                    "variant": name,
                    "pair_macs_per_pixel": variants["vertical first"][1],
                    "variant_macs_per_pixel": macs,
                    "vertical_first_ms": estimate.original_ms,
                    "variant_ms": estimate.candidate_ms,
                    "ratio": estimate.ratio,
                    "ratio_low": estimate.low,
                    "ratio_high": estimate.high,
                    "runs": estimate.runs,
                }
            )
    return out


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for threads in sorted({r["threads"] for r in rows}):
        for variant in sorted({r["variant"] for r in rows}):
            mine = [r for r in rows if r["threads"] == threads and r["variant"] == variant]
            if not mine:
                continue
            out[f"{variant}, {threads} thread(s)"] = {
                "layers": len(mine),
                "median_ratio": statistics.median(r["ratio"] for r in mine),
                "faster_by_5pct": sum(1 for r in mine if (r["ratio_low"] or 0) > 1.05),
                "slower_by_5pct": sum(1 for r in mine if (r["ratio_high"] or 2) < 0.95),
                "macs_ratio_median": statistics.median(r["variant_macs_per_pixel"] / r["pair_macs_per_pixel"] for r in mine),
            }
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(DEFAULT_MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=list(THREADS))
    parser.add_argument("--out", help="results file (default benchmarks/results/thin_pairs.json)")
    args = parser.parse_args(argv)
    out = results_path("thin_pairs", False, args.out)
    start = time.perf_counter()
    geometries = [g for name in args.models for g in _geometries(name)]
    log(f"{len(geometries)} distinct k×k conv geometries")
    rows: list[dict[str, Any]] = []
    for threads in args.threads:
        for i, geometry in enumerate(geometries, 1):
            rows += rows_for(geometry, threads)
            log(f"[{threads}T] {i}/{len(geometries)} {geometry['model']} {geometry['layer']}")
    result = {
        "benchmark": "thin_pairs",
        "machine": machine_info(),
        "summary": summary(rows),
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    write_json(out, result)
    for key, value in result["summary"].items():
        print(f"{key}: {value}")
    print(f"Wrote {out} ({result['seconds'] / 60:.1f} min).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
