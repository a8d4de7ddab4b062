"""Accuracy of the converted text-line recogniser, converted as a user would: the ``onnx-lowrank decompose`` command.

The model is the CRNN of ``models/train_textline.py`` (``models/textline_crnn.onnx``:
3x3 conv stack, BiLSTM, per-step classifier, CTC; dynamic batch and width axes).
For each target speedup S and each mode the command

    onnx-lowrank decompose models/textline_crnn.onnx OUT.onnx --speedup S --report R.json [--calibration models/textline_calibration.npz]

runs in a fresh process under ``/usr/bin/time -v`` (its wall time and peak
RSS), one at a time; the MAC ratio is the one the command printed (and wrote
to its report). The shape the command planned with is taken from its report:
``shape_known`` per conv and the warnings (with the dynamic width axis and no
``--input-shape`` the conv MACs count one output column). ``--input-shape``
adds that flag to every command (``input=1,1,32,256`` plans at the shipped width).

Each converted model then reads the held-out lines of ``models/textline_test.npz``
in onnxruntime; scored with :mod:`models.textline`: exact-string accuracy and
character error rate against the labels, and string agreement (and CER) against
the original model's strings. Results go to
``benchmarks/results/textline_accuracy.json`` (``--quick``: S = 2 only, data-free
and calibrated with the first 64 calibration lines, 200 test lines; results under
``benchmarks/results/quick/``)::

    python benchmarks/textline_accuracy.py
    python benchmarks/textline_accuracy.py --speedups 2 --modes calibrated --calibration-samples 64
    python benchmarks/textline_accuracy.py --input-shape input=1,1,32,256 --out benchmarks/results/textline_accuracy_fixed.json
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, beside this script

from bench_common import ROOT, fmt, log, machine_info, markdown_table, results_path, write_json

from models.textline import agreement, load_split, read_lines, score

MODEL = ROOT / "models" / "textline_crnn.onnx"
TEST = ROOT / "models" / "textline_test.npz"
CALIBRATION = ROOT / "models" / "textline_calibration.npz"
MODES = ("data-free", "calibrated")
TIME = Path("/usr/bin/time")


def _time_v(stderr: str) -> dict[str, float]:
    """Wall seconds and peak RSS (bytes) from GNU time's ``-v`` block."""
    out: dict[str, float] = {}
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if match:
        out["peak_rss_bytes"] = int(match.group(1)) * 1024
    match = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", stderr)
    if match:
        hours, minutes, seconds = match.groups()
        out["wall_seconds"] = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
    return out


def convert(speedup: float, mode: str, calibration: Path | None, input_shape: str | None, folder: Path) -> dict[str, Any]:
    """Run one ``decompose`` command; what it printed, its report, wall time and peak RSS."""
    tag = f"{mode}-{speedup:g}"
    out, report_path = folder / f"{tag}.onnx", folder / f"{tag}.json"
    command = [
        sys.executable,
        "-m",
        "onnx_lowrank",
        "decompose",
        str(MODEL),
        str(out),
        "--speedup",
        f"{speedup:g}",
        "--report",
        str(report_path),
    ]
    if mode == "calibrated":
        assert calibration is not None
        command += ["--calibration", str(calibration)]
    if input_shape:
        command += ["--input-shape", input_shape]
    wrapped = [str(TIME), "-v", *command] if TIME.exists() else command
    start = time.perf_counter()
    process = subprocess.run(wrapped, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    shown = [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in command[1:]]
    result: dict[str, Any] = {
        "command": " ".join(["python", *shown]).replace(str(folder) + "/", ""),
        "returncode": process.returncode,
        "wall_seconds": seconds,
        **_time_v(process.stderr),
    }
    printed = [line for line in (process.stdout + process.stderr).splitlines() if not line.startswith("\t")]
    totals = [line for line in printed if line.startswith("decomposed ")]
    result["printed_totals"] = totals[-1] if totals else None
    match = re.search(r"\(([\d.]+)x fewer\)", totals[-1]) if totals else None
    result["printed_mac_ratio"] = float(match.group(1)) if match else None
    result["printed_warnings"] = [line for line in printed if line.startswith("warning:") or line.startswith("calibration:")]
    if process.returncode != 0:
        result["error"] = [line for line in printed if line.strip()][-3:]
        return result
    report = json.loads(report_path.read_text())
    convs = [layer for layer in report["layers"] if layer["op_type"] in ("Conv", "ConvTranspose")]
    result.update(
        output=out,
        report_mac_ratio=report["mac_ratio"],
        macs_before=report["macs_before"],
        macs_after=report["macs_after"],
        planned_shape="input as given by --input-shape " + input_shape
        if input_shape
        else ("every conv sized" if all(layer["shape_known"] for layer in convs) else "conv input width unknown: MACs per output column"),
        convs_unsized=[layer["node"] for layer in convs if not layer["shape_known"]],
        allocation=report["policy"].get("allocation"),
        decomposed={layer["node"]: [layer["kind"], layer["rank"], layer["full_rank"]] for layer in report["layers"] if layer["decomposed"]},
        skipped={layer["node"]: layer["reason"] for layer in report["layers"] if not layer["decomposed"]},
        calibration={k: v for k, v in report.get("calibration", {}).items() if k != "refit"},
        refit_layers=len(report.get("calibration", {}).get("refit", {}).get("layers", [])),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speedups", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--calibration-samples", type=int, help="use only the first N calibration lines (default: all 512)")
    parser.add_argument("--test-samples", type=int, help="score only the first N test lines (default: all)")
    parser.add_argument("--input-shape", help="passed to every decompose command, e.g. input=1,1,32,256")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads for reading the test lines")
    parser.add_argument("--quick", action="store_true", help="S = 2, 64 calibration lines, 200 test lines; results under results/quick/")
    parser.add_argument("--out", help="results file (default benchmarks/results/textline_accuracy.json)")
    args = parser.parse_args()
    if args.quick:
        args.speedups, args.calibration_samples, args.test_samples = [2.0], args.calibration_samples or 64, args.test_samples or 200

    x, labels = load_split(TEST)
    assert labels is not None, f"{TEST} holds no labels_text"
    if args.test_samples:
        x, labels = x[: args.test_samples], labels[: args.test_samples]
    original = read_lines(MODEL, x, threads=args.threads)
    baseline = score(original, labels)
    log(f"original: {baseline}")

    with tempfile.TemporaryDirectory(prefix="textline-") as tmp:
        folder = Path(tmp)
        calibration = CALIBRATION
        if args.calibration_samples:
            with np.load(CALIBRATION) as data:
                subset = {k: data[k][: args.calibration_samples] for k in data.files}
            calibration = folder / f"calibration-{args.calibration_samples}.npz"
            np.savez(calibration, **subset)
        calibration_lines = len(np.load(calibration)["input"])
        rows: list[dict[str, Any]] = []
        for speedup in args.speedups:
            for mode in args.modes:
                log(f"--speedup {speedup:g} {mode} ...")
                run = convert(speedup, mode, calibration if mode == "calibrated" else None, args.input_shape, folder)
                if "output" in run:
                    read = read_lines(run.pop("output"), x, threads=args.threads)
                    run.update(score(read, labels), **agreement(read, original))
                rows.append({"speedup": speedup, "mode": mode, **run})
                log(json.dumps({k: rows[-1].get(k) for k in ("printed_mac_ratio", "exact_accuracy", "string_agreement", "wall_seconds")}))
        shutil.rmtree(folder, ignore_errors=True)

    result = {
        "model": str(MODEL.relative_to(ROOT)),
        "test_lines": len(labels),
        "calibration_lines": calibration_lines,
        "input_shape_flag": args.input_shape,
        "original": baseline,
        "results": rows,
        "machine": machine_info(),
    }
    path = results_path("textline_accuracy", args.quick, args.out)
    write_json(path, result)

    print(
        f"Original: exact {baseline['exact_accuracy'] * 100:.2f} %, CER {baseline['cer'] * 100:.2f} % "
        f"({len(labels)} test lines); calibration: {calibration_lines} lines."
    )
    print()
    table = []
    for r in rows:
        table.append(
            [
                f"{r['speedup']:g}",
                r["mode"],
                fmt(r.get("printed_mac_ratio"), ".2f", "x"),
                fmt(None if "exact_accuracy" not in r else r["exact_accuracy"] * 100, ".2f", " %"),
                fmt(None if "cer" not in r else r["cer"] * 100, ".2f", " %"),
                fmt(None if "string_agreement" not in r else r["string_agreement"] * 100, ".2f", " %"),
                fmt(r.get("wall_seconds"), ".1f"),
                fmt(None if "peak_rss_bytes" not in r else r["peak_rss_bytes"] / 2**20, ".0f"),
                r.get("planned_shape") or "; ".join(r.get("error", [])),
            ]
        )
    headers = ["S", "mode", "MAC ratio (printed)", "exact", "CER", "agreement", "wall s", "peak RSS MiB", "planned with"]
    print(markdown_table(headers, table))
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
