"""Print the model zoo's conversion figures as a Markdown table.

    python models/zoo_table.py                 # the tests' input sizes, from the zoo cache
    python models/zoo_table.py --published     # published sizes: 224, AlexNet 227 (exported into the cache first)
    python models/zoo_table.py --size 128      # the ImageNet networks at 128x128
    python models/zoo_table.py --only resnet50-bnkept nin-bnfolded --json figures.json

Per variant, with the package's default splits (``--kinds spatial`` for the
spatial split alone, as in the tests):

* convs: Conv nodes in the exported graph; splittable: those with a kernel of at least 2x2;
* ``--speedup 2``: layers decomposed, layers left alone by reason, total conv MAC
  ratio. Where 2x cannot be reached the conversion is done at the most the
  model allows (rounded down to 0.01) and the cell says so;
* full rank: the largest output difference from the original over the largest
  output, with the original's own distance from the float64 result beside it
  (the float rounding the rewrite has to be compared with);
* time and peak RSS: ``decompose(path, speedup=2)`` run in a fresh process:
  the call's wall clock (loading the file included) and the process's peak
  resident set (VmHWM; the imports of numpy, scipy, onnx included).

Needs torch only to export variants missing from the cache.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from collections import Counter
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

if __package__ in (None, ""):  # run as a script: make `models` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import make_zoo
from models.zoo import VARIANTS, Variant

KINDS: list[str] | None = None  # None: the package's default kinds
FULL_RANK = 1 << 30


def _short_reason(reason: str | None) -> str:
    """A reason without its numbers, so that layers group: "left as is by --speedup", "kernel 1x1 is 1 in a spatial dim"."""
    text = (reason or "?").split(":")[0]
    return re.sub(r"--speedup [\d.]+", "--speedup", text).strip()


def _peak_rss_mb() -> float:
    """This process's peak resident set size.

    Linux's VmHWM belongs to the process's own address space; ``ru_maxrss``
    would carry over the parent's peak through fork and exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: KiB on most Unixes


def _child(path: str, speedup: float) -> None:
    """Convert once and print the figures as JSON on the last line (runs in its own process)."""
    from onnx_lowrank import LowRankError, decompose

    result: dict[str, Any] = {"speedup": speedup}
    start = time.perf_counter()
    try:
        _, report = decompose(path, speedup=speedup, kinds=KINDS, by="macs", check_runs=0)
    except LowRankError as exc:
        result["error"] = str(exc)
    else:
        result.update(
            mac_ratio=report.mac_ratio,
            decomposed=len(report.decomposed),
            skipped=dict(Counter(_short_reason(layer.reason) for layer in report.layers if not layer.decomposed)),
        )
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = _peak_rss_mb()
    print(json.dumps(result))


def _convert_in_child(path: Path, speedup: float) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(path), "--speedup", repr(speedup)]
    if KINDS is not None:
        command += ["--kinds", ",".join(KINDS)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"conversion of {path} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return np.asarray(ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0], np.float64)


def _full_rank_error(path: Path) -> tuple[float, float]:
    """(converted vs original, original vs float64), each over the largest output."""
    from onnx_lowrank import decompose

    with np.load(make_zoo.reference_path(path)) as reference:
        x, exact = reference["input"], reference["expected"]
    y = _run(path, x)
    converted, _ = decompose(path, rank=FULL_RANK, force=True, kinds=KINDS)
    got = _run(converted, x)
    scale = float(np.abs(exact).max())
    return float(np.abs(got - y).max()) / scale, float(np.abs(y - exact).max()) / scale


def row(v: Variant, size: int | None) -> dict[str, Any]:
    """All figures of one variant."""
    path = make_zoo.cached(v, size)
    graph = onnx.load(str(path), load_external_data=False)
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    splittable = sum(min(next(a.ints for a in n.attribute if a.name == "kernel_shape")) >= 2 for n in convs)
    at2 = _convert_in_child(path, 2.0)
    figures: dict[str, Any] = {"variant": v.name, "size": int(dict((p.key, p.value) for p in graph.metadata_props)["zoo.input_size"])}
    if "error" in at2:
        stated = re.search(r"(\d+(?:\.\d+)?)x", at2["error"])
        best = float(stated.group(1)) if stated else 1.0
        figures["best"] = best
        # the stated best is rounded to 3 digits, maybe up: step down until a conversion succeeds
        target = math.floor(best * 100) / 100
        while "error" in at2 and target > 1.0:
            at2 = _convert_in_child(path, target)
            target = round(target - 0.01, 2)
    full, own = _full_rank_error(path)
    figures.update(convs=len(convs), splittable=splittable, at2=at2, full_rank_error=full, own_error=own)
    return figures


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | input | convs (splittable) | decomposed at 2x | left alone, by reason | MAC ratio | "
        "full-rank output error (original's own) | time | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        at2 = r["at2"]
        ratio = f"{at2['mac_ratio']:.2f}x" if "mac_ratio" in at2 else "-"
        if "best" in r:
            ratio = f"2x unreachable (max {r['best']:g}x); {ratio} at --speedup {at2['speedup']:g}"
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(at2.get("skipped", {}).items(), key=lambda kv: -kv[1])) or "-"
        lines.append(
            f"| {r['variant']} | {r['size']}x{r['size']} | {r['convs']} ({r['splittable']}) | {at2.get('decomposed', '-')} | {skipped} | "
            f"{ratio} | {r['full_rank_error']:.1e} ({r['own_error']:.1e}) | {at2['seconds']:.1f} s | {at2['peak_rss_mb']:.0f} MB |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--size", type=int, help="input size of the ImageNet networks (default: the tests' sizes)")
    sizes.add_argument("--published", action="store_true", help="the published input sizes")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[v.name for v in VARIANTS])
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--kinds", help="splits to offer, comma-separated (default: the package's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--speedup", type=float, default=2.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    global KINDS
    KINDS = [k for k in args.kinds.split(",") if k] if args.kinds else None
    if args.child:
        _child(args.child, args.speedup)
        return
    rows = []
    for v in VARIANTS:
        if args.only and v.name not in args.only:
            continue
        size = make_zoo.input_size(v.arch, args.size) if args.size or args.published else None
        rows.append(row(v, size))
        print(f"{v.name}: done", file=sys.stderr, flush=True)
    splits = "spatial split only" if KINDS == ["spatial"] else f"splits: {', '.join(KINDS) if KINDS else 'package default'}"
    print(f"{splits}; torch {metadata.version('torch')}, onnxruntime {metadata.version('onnxruntime')}, {os.cpu_count()} CPUs.\n")
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
