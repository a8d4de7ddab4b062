"""Conversion speed and memory: ``onnx-lowrank decompose`` against a plain onnx.load + onnx.save of the same model.

The model is the full VGG-16 of ``models/make_vgg.py`` (138 M parameters, a
~528 MB file), written to a temporary folder. Each step runs in a fresh
subprocess, one at a time, timed by wall clock from start to exit (interpreter
start and imports included: what a user waits for), with its peak resident set
size taken from ``os.wait4`` (the kernel's ``ru_maxrss`` of that one child):

(a) ``python -c "onnx.save(onnx.load(IN), COPY)"``;
(b) ``python -m onnx_lowrank decompose IN OUT --speedup 2 --by macs --check-runs 0 --quiet --report R.json``: the
    conversion itself (the default plan by latency, and the timing of the result, cost seconds on top: see
    ``benchmarks/default_plan.py``);
(c) the same on a copy of IN whose input height and width are symbolic, with ``--input-shape`` giving
    224x224: the sizes then come from one onnxruntime run of the model (``onnx_lowrank/run_shapes.py``),
    so (c) − (b) is what that run costs on the largest model of the zoo.

The steps alternate (a, b, c, a, b, c, …) ``--repeat`` times; times are medians, peaks
the largest seen. Targets: time(b) / time(a) ≤ 2 and peak RSS(b) / file size ≤
2.5. Exactness, from the ``--report`` JSON: every decomposed layer's
``relative_error`` (measured on the stored factors) within 1e-6 of its
``optimal_error`` (Eckart–Young, from the singular values). Results go to
``benchmarks/results/conversion.json`` (``--quick``: a quarter-width VGG-16 at
64x64, results in ``benchmarks/results/quick/``)::

    python benchmarks/conversion.py              # full VGG-16, 3 repeats (~1 GB of temporary files)
    python benchmarks/conversion.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, beside this script

from bench_common import QUICK_VGG, ROOT, fmt, log, machine_info, markdown_table, results_path, write_json

TIME_TARGET = 2.0  # time(decompose) / time(load + save)
RSS_TARGET = 2.5  # peak RSS(decompose) / file size
EXACTNESS = 1e-6  # |relative_error - optimal_error| per decomposed layer
SPEEDUP = "2"
LOAD_SAVE = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
MAC_PLAN = ["--by", "macs", "--check-runs", "0"]  # the conversion alone, as before the plan by latency became the default


def run_measured(command: list[str], log_path: Path) -> dict[str, Any]:
    """Run one command to its end; wall seconds, peak RSS of that process, CPU time, exit code, output tail."""
    start = time.perf_counter()
    with open(log_path, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT)
        # wait4 gives the resource usage of this one child; RUSAGE_CHILDREN would be the peak over every child so far
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    # ru_maxrss is in KiB on Linux, bytes on macOS
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    text = log_path.read_text(errors="replace").strip().splitlines()
    return {
        "command": command,
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "user_seconds": usage.ru_utime,
        "system_seconds": usage.ru_stime,
        "returncode": process.returncode,
        "output_tail": text[-5:],
    }


def model_bytes(path: Path) -> int:
    """Size of the model file and of its external data file, if there is one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def remove_model(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


# run in a child: loaded here, the 528 MB model would stay in this process's memory, and every later child
# would start with that resident set (Linux carries the peak RSS across fork and exec into ru_maxrss)
SYMBOLIC_COPY = """
import json, sys, onnx
model = onnx.load(sys.argv[1])
value = model.graph.input[0]
dims = value.type.tensor_type.shape.dim
shape = [d.dim_value or 1 for d in dims]
for axis, name in ((2, "height"), (3, "width")):
    dims[axis].Clear()
    dims[axis].dim_param = name
onnx.save(model, sys.argv[2])
print(json.dumps([value.name, shape]))
"""


def _symbolic_copy(source: Path, target: Path) -> tuple[str, list[int]]:
    """A copy of the model whose input height and width are symbolic; the input's name and its real shape."""
    out = subprocess.run([sys.executable, "-c", SYMBOLIC_COPY, str(source), str(target)], capture_output=True, text=True, check=True)
    name, shape = json.loads(out.stdout.strip().splitlines()[-1])
    return str(name), [int(d) for d in shape]


def exactness(report_path: Path) -> dict[str, Any]:
    """Per decomposed layer: the stored factors' error against the Eckart–Young optimum."""
    report = json.loads(report_path.read_text())
    layers = [layer for layer in report["layers"] if layer["decomposed"]]
    gaps = {layer["node"]: abs(layer["relative_error"] - layer["optimal_error"]) for layer in layers}
    worst = max(gaps.values(), default=0.0)
    return {
        "decomposed_layers": len(layers),
        "max_gap": worst,
        "worst_layer": max(gaps, key=lambda node: gaps[node]) if gaps else None,
        "over_tolerance": sorted(node for node, gap in gaps.items() if gap > EXACTNESS),
        "passed": worst <= EXACTNESS,
        "mac_ratio": report["macs_before"] / report["macs_after"] if report["macs_after"] else None,
        "layers": {layer["node"]: [layer["rank"], layer["relative_error"], layer["optimal_error"]] for layer in layers},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--quick", action="store_true", help="a quarter-width VGG-16 at 64x64, one repeat: a development check, not results"
    )
    parser.add_argument("--repeat", type=int, help="rounds of (a) then (b) (default 3; --quick 1)")
    parser.add_argument("--workdir", help="folder for the model files (default: a new temporary folder, removed afterwards)")
    parser.add_argument("--out", help="results file (default: benchmarks/results/conversion.json; --quick: benchmarks/results/quick/)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be >= 1")
    out = results_path("conversion", args.quick, args.out)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="onnx-lowrank-conversion-"))
    workdir.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    source, copy, converted, report = (workdir / n for n in ("vgg16.onnx", "copy.onnx", "vgg16.lowrank.onnx", "report.json"))
    shape = ["--width", str(QUICK_VGG["width"]), "--size", "64", "--fc", str(QUICK_VGG["fc"])] if args.quick else []
    result: dict[str, Any] = {
        "benchmark": "conversion",
        "quick": args.quick,
        "machine": machine_info(),
        "model": {"source": "models/make_vgg.py", "arguments": shape},
        "repeat": repeat,
    }
    try:
        log(f"building VGG-16 in {workdir}")
        build = run_measured([python, str(ROOT / "models" / "make_vgg.py"), str(source), *shape], workdir / "build.log")
        if build["returncode"] != 0:
            raise SystemExit(f"models/make_vgg.py failed: {build['output_tail']}")
        size = model_bytes(source)
        result["model"].update(file_bytes=size, build=build)
        dynamic = workdir / "vgg16.dynamic.onnx"
        input_name, input_shape = _symbolic_copy(source, dynamic)
        # interpreter start and imports are part of both steps' wall time; recorded to show how much of each they are
        result["startup"] = {
            "import onnx": run_measured([python, "-c", "import onnx"], workdir / "startup.log"),
            "import onnx_lowrank.cli": run_measured([python, "-c", "import onnx_lowrank.cli"], workdir / "startup.log"),
        }
        plain: list[dict[str, Any]] = []
        lowrank: list[dict[str, Any]] = []
        sized: list[dict[str, Any]] = []
        for i in range(repeat):
            a = run_measured([python, "-c", LOAD_SAVE, str(source), str(copy)], workdir / "load_save.log")
            remove_model(copy)
            if a["returncode"] != 0:
                raise SystemExit(f"onnx.load + onnx.save failed: {a['output_tail']}")
            plain.append(a)
            command = [python, "-m", "onnx_lowrank", "decompose", str(source), str(converted), "--speedup", SPEEDUP, *MAC_PLAN, "--quiet"]
            b = run_measured([*command, "--report", str(report)], workdir / "decompose.log")
            remove_model(converted)
            if b["returncode"] != 0:
                raise SystemExit(f"onnx-lowrank decompose failed: {b['output_tail']}")
            lowrank.append(b)
            given = f"{input_name}={','.join(map(str, input_shape))}"
            c_command = [
                python,
                "-m",
                "onnx_lowrank",
                "decompose",
                str(dynamic),
                str(converted),
                "--speedup",
                SPEEDUP,
                *MAC_PLAN,
                "--quiet",
            ]
            c = run_measured([*c_command, "--input-shape", given, "--report", str(workdir / "sized.json")], workdir / "sized.log")
            remove_model(converted)
            if c["returncode"] != 0:
                raise SystemExit(f"onnx-lowrank decompose --input-shape failed: {c['output_tail']}")
            c["sizes"] = json.loads((workdir / "sized.json").read_text())["shapes"]
            sized.append(c)
            log(
                f"round {i + 1}/{repeat}: load+save {a['seconds']:.2f} s, {a['peak_rss_bytes'] / 2**20:.0f} MiB; "
                f"decompose {b['seconds']:.2f} s, {b['peak_rss_bytes'] / 2**20:.0f} MiB; "
                f"with a sizing run {c['seconds']:.2f} s ({c['sizes']['seconds']:.2f} s in the run), {c['peak_rss_bytes'] / 2**20:.0f} MiB"
            )
        result["load_save"] = plain
        result["decompose"] = lowrank
        result["decompose_sized_by_a_run"] = sized
        result["exactness"] = exactness(report)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    time_a = statistics.median(r["seconds"] for r in plain)
    time_b = statistics.median(r["seconds"] for r in lowrank)
    time_c = statistics.median(r["seconds"] for r in sized)
    run_c = statistics.median(r["sizes"]["seconds"] for r in sized)
    peak_a = max(r["peak_rss_bytes"] for r in plain)
    peak_b = max(r["peak_rss_bytes"] for r in lowrank)
    peak_c = max(r["peak_rss_bytes"] for r in sized)
    result["summary"] = {
        "file_bytes": size,
        "load_save_seconds": time_a,
        "decompose_seconds": time_b,
        "time_ratio": time_b / time_a,
        "time_target": TIME_TARGET,
        "time_target_met": time_b / time_a <= TIME_TARGET,
        "load_save_peak_rss_bytes": peak_a,
        "decompose_peak_rss_bytes": peak_b,
        "rss_to_file": peak_b / size,
        "rss_target": RSS_TARGET,
        "rss_target_met": peak_b / size <= RSS_TARGET,
        "exactness_tolerance": EXACTNESS,
        "exactness_met": result["exactness"]["passed"],
        "sized_by_a_run_seconds": time_c,
        "sizing_run_seconds": run_c,
        "sized_by_a_run_peak_rss_bytes": peak_c,
        "load_average_after": machine_info()["load_average"],
    }
    write_json(out, result)

    s, ex = result["summary"], result["exactness"]
    mib = 2**20
    print(
        f"VGG-16 ({'quick: ' + ' '.join(shape) if shape else 'full'}), file {size / mib:.0f} MiB; "
        f"wall time median of {repeat} fresh processes, interpreter start included; peak RSS the largest seen."
    )
    print()
    rows = [
        ["onnx.load + onnx.save", fmt(time_a, ".2f"), fmt(peak_a / mib, ".0f"), fmt(peak_a / size, ".2f", "x")],
        [f"onnx-lowrank decompose --speedup {SPEEDUP}", fmt(time_b, ".2f"), fmt(peak_b / mib, ".0f"), fmt(peak_b / size, ".2f", "x")],
        [
            f"the same, symbolic H/W and --input-shape (sizes from a run: {run_c:.2f} s)",
            fmt(time_c, ".2f"),
            fmt(peak_c / mib, ".0f"),
            fmt(peak_c / size, ".2f", "x"),
        ],
    ]
    print(markdown_table(["step", "wall s", "peak RSS (MiB)", "peak RSS / file"], rows))
    print()
    startup = result["startup"]
    imports = ", ".join(f"`{name}` {run['seconds']:.2f} s" for name, run in startup.items())
    print(f"Interpreter start and imports alone: {imports}.")

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    print(f"- time(decompose) / time(load + save) = {s['time_ratio']:.2f} (target ≤ {TIME_TARGET:g}): {verdict(s['time_target_met'])}")
    print(f"- peak RSS(decompose) / file size = {s['rss_to_file']:.2f} (target ≤ {RSS_TARGET:g}): {verdict(s['rss_target_met'])}")
    print(
        f"- exactness: max |relative_error − optimal_error| = {ex['max_gap']:.2g} over {ex['decomposed_layers']} decomposed layers "
        f"(tolerance {EXACTNESS:g}): {'met' if ex['passed'] else 'NOT met: ' + ', '.join(ex['over_tolerance'])}"
    )
    if args.quick:
        print("(--quick: a small model, so interpreter start and imports dominate both steps; the targets are for the full VGG-16.)")
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
