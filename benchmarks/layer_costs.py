"""What a split costs besides its MACs: every layer geometry of the benchmark models timed alone, and the
per-node and per-activation overhead fitted to the timings.

For every distinct decomposable layer of the models (at their published input size) the layer alone and its
pairs at up to six ranks per kind (multiples of 16 up to the rank where the pair's MACs reach the layer's) are
timed in onnxruntime by :class:`onnx_lowrank.layer_timing.LayerTimer` — warm-up, then the median of at least 7 runs,
each a one- or two-node model at the layer's real input size — at 1 and 2 intra-op threads.

The fit, per thread count: ``ms ≈ a·MACs + b·activations + c·nodes`` by least squares on the relative error
(each timing weighted by 1/ms), where *activations* are the elements the model writes (the output, plus a pair's
intermediate tensor) and *nodes* is 1 or 2. ``c/a`` and ``b/a`` are the per-node and per-element overheads in
MAC equivalents that the MAC plan (``--by macs``) charges a split (:func:`onnx_lowrank.cost.effective_macs`).
Its check: of the pairs the MAC count calls cheaper than their layer, how many are timed slower, and how many
of those the effective count catches.

    python benchmarks/layer_costs.py                  # ~10 min on 2 cores; needs a quiet machine
    python benchmarks/layer_costs.py --models vgg16 --threads 1

Results: ``benchmarks/results/layer_costs.json`` (the fits, and every timing as a table: ``columns`` and ``data``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MODELS, load, log, machine_info, results_path

from onnx_lowrank.layer_timing import LayerTimer
from onnx_lowrank.passes import find_sites
from onnx_lowrank.passes.fold_batchnorm import fold_batchnorm
from onnx_lowrank.planning.latency import timed_ranks
from onnx_lowrank.run_shapes import resolve_shapes
from onnx_lowrank.timing_cache import TimingStore

DEFAULT_MODELS = ("vgg16", "resnet50", "googlenet", "alexnet", "nin", "resnet18", "mobilenetv2", "densenet121", "digits")
THREADS = (1, 2)
STEP = 16
POINTS = 6


def layer_rows(name: str, threads: int) -> list[dict[str, Any]]:
    """One row per timed model (the layer alone, or a pair at one kind and rank) of one benchmark model."""
    model, _ = load(MODELS[name], quick=False)
    model, _ = fold_batchnorm(model)
    shapes = resolve_shapes(model)
    timer = LayerTimer(model.opset_import, threads=threads, store=TimingStore(None, {"threads": threads}))
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for site in find_sites(model, shapes):
        kinds = site.available(("spatial", "channel"))
        if not kinds or site.cost is None or not site.shape_known or site.input_shape is None or site.executions != 1:
            continue
        key = timer._key(site, site.input_shape, None, 0)
        if key in seen:
            continue
        seen.add(key)
        cost = site.cost
        base = timer.original(site)
        if base is None:
            continue
        rows.append({"model": name, "layer": site.key, "op": site.node.op_type, "kind": None, "rank": 0, "macs": cost.macs,
                     "activations": cost.activations, "nodes": 1, "ms": base, "original_ms": base, "original_macs": cost.macs,
                     "original_activations": cost.activations})  # fmt: skip
        for kind in kinds:
            limit = cost.macs // max(cost.rank_macs[kind], 1)
            grid = list(range(STEP, limit + 1, STEP)) or ([limit] if limit >= 1 else [])
            for rank in timed_ranks(grid, POINTS):
                ms = timer.pair(site, kind, rank)
                if ms is None:
                    continue
                rows.append({"model": name, "layer": site.key, "op": site.node.op_type, "kind": kind, "rank": rank,
                             "macs": cost.rank_macs[kind] * rank,
                             "activations": cost.activations + cost.rank_activations[kind] * rank, "nodes": 2, "ms": ms,
                             "original_ms": base, "original_macs": cost.macs,
                             "original_activations": cost.activations})  # fmt: skip
    return rows


def fit(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """``ms ≈ a·MACs + b·activations + c·nodes``, least squares on relative error; the overheads in MAC equivalents."""
    x = np.array([[r["macs"], r["activations"], r["nodes"]] for r in rows], dtype=np.float64)
    y = np.array([r["ms"] for r in rows], dtype=np.float64)
    w = 1.0 / y
    scale = x.max(axis=0)
    coef, *_ = np.linalg.lstsq(x / scale * w[:, None], y * w, rcond=None)
    a, b, c = (float(v) for v in coef / scale)
    predicted = x @ (coef / scale)
    relative = np.abs(predicted - y) / y
    return {
        "ms_per_gmac": a * 1e9,
        "ms_per_m_activations": b * 1e6,
        "ms_per_node": c,
        "per_node_macs": c / a,
        "per_element_macs": b / a,
        "median_relative_error": float(np.median(relative)),
        "p90_relative_error": float(np.percentile(relative, 90)),
        "rows": len(rows),
    }


def check(rows: Sequence[dict[str, Any]], per_node: float, per_element: float) -> dict[str, int]:
    """Pairs with fewer MACs than their layer: how many are timed slower, and how many the effective count flags."""
    out = {"pairs_cheaper_in_macs": 0, "slower_when_timed": 0, "flagged_by_effective": 0, "slower_and_flagged": 0}
    for r in rows:
        if r["kind"] is None or r["macs"] >= r["original_macs"]:
            continue
        out["pairs_cheaper_in_macs"] += 1
        slower = r["ms"] >= r["original_ms"]
        effective = r["macs"] + per_node * 2 + per_element * r["activations"]
        original = r["original_macs"] + per_node + per_element * r["original_activations"]
        flagged = effective >= original
        out["slower_when_timed"] += int(slower)
        out["flagged_by_effective"] += int(flagged)
        out["slower_and_flagged"] += int(slower and flagged)
    return out


COLUMNS = ("model", "layer", "op", "kind", "rank", "macs", "activations", "nodes", "ms", "original_ms", "original_macs",
           "original_activations")  # fmt: skip


def as_table(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows as one table (a list per row under ``columns``): a fifth of the size of a list of objects."""
    return {"columns": list(COLUMNS), "data": [[row[c] for c in COLUMNS] for row in rows]}


def write(path: Path, result: dict[str, Any]) -> None:
    """The results as JSON, one timing per line (the tables run to thousands of rows), written through a rename."""
    head = {k: v for k, v in result.items() if k != "rows"}
    tables = []
    for threads, table in result["rows"].items():
        lines = ",\n".join("      " + json.dumps(row) for row in table["data"])
        tables.append(f'    "{threads}": {{\n      "columns": {json.dumps(table["columns"])},\n      "data": [\n{lines}\n      ]\n    }}')
    text = json.dumps(head, indent=2)[:-2] + ',\n  "rows": {\n' + ",\n".join(tables) + "\n  }\n}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(DEFAULT_MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=list(THREADS))
    parser.add_argument("--out", help="results file (default benchmarks/results/layer_costs.json)")
    args = parser.parse_args(argv)
    out = results_path("layer_costs", False, args.out)
    start = time.perf_counter()
    result: dict[str, Any] = {"benchmark": "layer_costs", "machine": machine_info(), "rows": {}, "fits": {}, "checks": {}}
    for threads in args.threads:
        rows: list[dict[str, Any]] = []
        for name in args.models:
            t0 = time.perf_counter()
            got = layer_rows(name, threads)
            rows += got
            log(f"[{threads}T] {name}: {len(got)} timings ({time.perf_counter() - t0:.0f} s)")
        result["rows"][str(threads)] = as_table(rows)
        fitted = fit(rows)
        result["fits"][str(threads)] = fitted
        result["checks"][str(threads)] = {
            "macs": check(rows, 0.0, 0.0),
            "effective": check(rows, fitted["per_node_macs"], fitted["per_element_macs"]),
        }
        log(f"[{threads}T] fit: {fitted}")
        log(f"[{threads}T] check: {result['checks'][str(threads)]}")
        write(out, result)
    result["seconds"] = time.perf_counter() - start
    result["machine_after"] = {"load_average": machine_info()["load_average"]}
    write(out, result)
    print(f"Wrote {out} ({result['seconds'] / 60:.1f} min).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
