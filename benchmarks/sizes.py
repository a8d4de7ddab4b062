"""Honest MACs on models with run-time shapes: the MAC ratio ``decompose --speedup 2`` reports against an
independent count of the MACs that run.

The models are the torch exports with dynamic axes of ``tests/dynamic_models.py`` (an OCR recogniser whose
per-time-step classifier follows a run-time Reshape, a Conv1d stack behind a Pad computed from the input
length, convs in both branches of an If, a YOLO-style detector with symbolic H/W). Each is converted at
``--speedup 2`` twice: as a user types it (no ``--input-shape``: the tool must refuse, naming the input, or
plan on real sizes) and with the reference size given. The independent count runs the original and the
converted model in onnxruntime with its profiler and sums the MACs of every node that executed, from the
shapes the profiler recorded (``tests/mac_count.py``). No timing is involved::

    python benchmarks/sizes.py     # → benchmarks/results/sizes.json and a Markdown table
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, beside this script
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the exported models and the counter

import onnx
from bench_common import machine_info, markdown_table, results_path, write_json
from dynamic_models import MODELS, export
from mac_count import profiled_macs, random_input

from onnx_lowrank import LowRankError, decompose

CASES = [(name, MODELS[name][2]) for name in MODELS] + [("branchy", (1, 3, 32, 32))]


def main() -> int:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in CASES:
            path = export(name, Path(tmp) / f"{name}.onnx")
            model = onnx.load(path)
            input_name = MODELS[name][1]
            feeds = {input_name: random_input(shape)}
            before = profiled_macs(model, feeds)
            row: dict[str, Any] = {"model": name, "reference_input": list(shape), "independent_macs_before": before}
            try:
                decompose(model, speedup=2, by="macs")
                row["without_input_shape"] = "converted"
            except LowRankError as exc:
                row["without_input_shape"] = f"refused: {exc}"
            new, report = decompose(model, speedup=2, input_shapes={input_name: shape}, by="macs", check_runs=0)
            after = profiled_macs(new, feeds)
            row.update(
                reported_macs_before=report.macs_before,
                reported_macs_after=report.macs_after,
                reported_ratio=report.mac_ratio,
                independent_macs_after=after,
                independent_ratio=before / after,
                sizes=report.shapes,
                control_flow=report.control_flow,
            )
            rows.append(row)
    out = results_path("sizes", False)
    write_json(out, {"benchmark": "sizes", "machine": machine_info(), "rows": rows})
    table = [
        [
            r["model"],
            "x".join(map(str, r["reference_input"])),
            f"{r['reported_ratio']:.3f}x",
            f"{r['independent_ratio']:.3f}x",
            f"{r['reported_macs_before'] / r['independent_macs_before']:.4f}",
            r["without_input_shape"].split(":")[0],
        ]
        for r in rows
    ]
    print(
        markdown_table(
            ["model", "reference input", "reported MAC ratio", "independent count", "reported/independent MACs", "no --input-shape"], table
        )
    )
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
