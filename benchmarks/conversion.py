"""Conversion speed and memory: ``onnx-lowrank decompose`` against a plain onnx.load + onnx.save of the same model.

The main model is the full VGG-16 of ``models/make_vgg.py`` (138 M parameters, a
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
    so (c) − (b) is what that run costs on the largest model of the zoo;
(d) ``decompose IN OUT --speedup 2 --by macs --quiet --report R.json`` with the default check of the result (up to
    10 interleaved runs of both models): the command a new user runs. The report gives the check's own seconds
    (``latency.check.seconds``: holding the weights for it, building both sessions, the runs), so (d) minus
    them is the conversion's own work.

``--models`` adds models to VGG-16 (steps a, b, d each): ``resnet50`` (the zoo's ResNet-50 at 224x224, exported
once into the zoo cache), ``textdet640`` (``models/textdet.onnx``, the trained text detector, at 640x640 by
``--input-shape``), ``db640`` (``benchmarks/detector.py``: a DB-style text detector, 61 convs and 4
transposed convs, at 640x640), ``yolo640`` (``tests/dynamic_models.py``'s YOLO-style detector at 640x640, given by
``--input-shape``) and any model of the zoo by its name (``googlenet``, ``mobilenetv2``, …; 224x224).
``--before REV`` also runs (b) and (d) with the package as it was at git revision ``REV`` (extracted with
``git archive`` into the work folder), interleaved with the current code: the before/after columns.

The steps alternate (a, b, c, d, … per model) ``--repeat`` times; times are medians, peaks the largest seen.
Targets: time(b) / time(a) ≤ 2, (time(d) − check) / time(a) ≤ 2 and time(d) / time(a) ≤ 3.5; peak RSS of (b)
and (d) / file size ≤ 2.5. Small models cannot meet the memory target against their file size alone: the
interpreter with onnxruntime, onnx, numpy and scipy imported holds ~100 MiB before any model is read, so the
table also gives (peak RSS − that) / file. Exactness, from the ``--report`` JSON of VGG-16: every decomposed
layer's ``relative_error`` (measured on the stored factors) within 1e-6 of its ``optimal_error``
(Eckart–Young, from the singular values). Results go to ``benchmarks/results/conversion.json`` (``--quick``: a
quarter-width VGG-16 at 64x64, results in ``benchmarks/results/quick/``)::

    python benchmarks/conversion.py                                   # full VGG-16, 3 repeats (~1 GB of temporary files)
    python benchmarks/conversion.py --models resnet50 textdet640 db640 yolo640 --before f83a825  # f83a825: before issue 22
    python benchmarks/conversion.py --quick

Wall times need a quiet machine (run it alone); peak RSS does not.
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

TIME_TARGET = 2.0  # time(decompose) / time(load + save), the check's own seconds left out
CHECKED_TIME_TARGET = 3.5  # time(decompose with its check) / time(load + save)
RSS_TARGET = 2.5  # peak RSS(decompose) / file size
EXACTNESS = 1e-6  # |relative_error - optimal_error| per decomposed layer
SPEEDUP = "2"
LOAD_SAVE = "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])"
MAC_PLAN = ["--by", "macs", "--check-runs", "0"]  # the conversion alone, as before the plan by latency became the default


def run_measured(command: list[str], log_path: Path, cwd: Path = ROOT) -> dict[str, Any]:
    """Run one command to its end; wall seconds, peak RSS of that process, CPU time, exit code, output tail."""
    start = time.perf_counter()
    with open(log_path, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, cwd=cwd)
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


# models besides VGG-16: how each is made (in a child process: the parent stays small, see SYMBOLIC_COPY) and the
# flags its conversion needs
EXTRA_MODELS = {
    "resnet50": "the zoo's ResNet-50 (bnfolded) at 224x224",
    "textdet640": "models/textdet.onnx: the trained text detector at 640x640 (dynamic H/W, --input-shape)",
    "db640": "benchmarks/detector.py: a DB-style text detector at 640x640 (61 Conv, 4 ConvTranspose)",
    "yolo640": "tests/dynamic_models.py's YOLO-style detector at 640x640 (dynamic H/W, --input-shape)",
}
MAKE_ZOO = """
import shutil, sys
from models.make_zoo import cached
shutil.copyfile(cached(sys.argv[1], int(sys.argv[2])), sys.argv[3])
"""


def make_model(name: str, path: Path, log_path: Path) -> list[str]:
    """Write model ``name`` to ``path`` (in a child process); the extra flags its conversion needs."""
    python = sys.executable
    if name == "textdet640":
        shutil.copyfile(ROOT / "models" / "textdet.onnx", path)
        return ["--input-shape", "input=1,1,640,640"]
    if name == "db640":
        command = [python, str(ROOT / "benchmarks" / "detector.py"), str(path)]
    elif name == "yolo640":
        command = [python, str(ROOT / "benchmarks" / "detector.py"), str(path), "--yolo"]
    else:
        variant = name if "-" in name else f"{name}-bnfolded"
        command = [python, "-c", MAKE_ZOO, variant, "224", str(path)]
    made = run_measured(command, log_path)
    if made["returncode"] != 0:
        raise SystemExit(f"making {name} failed: {made['output_tail']}")
    return ["--input-shape", "images=1,3,640,640"] if name == "yolo640" else []


def extract_code(rev: str, folder: Path) -> Path:
    """The package as it was at git revision ``rev``, extracted (``git archive``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", rev, "onnx_lowrank"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def decompose_step(code: Path, source: Path, out: Path, report: Path, log_path: Path, check: bool, extra: list[str]) -> dict[str, Any]:
    """``decompose --speedup 2 --by macs`` of ``source`` by the package in ``code`` (its folder first on the path),
    with the default check or ``--check-runs 0``; the report's figures of the check."""
    flags = ["--by", "macs"] + ([] if check else ["--check-runs", "0"])
    command = [sys.executable, "-m", "onnx_lowrank", "decompose", str(source), str(out), "--speedup", SPEEDUP, *flags, *extra]
    run = run_measured([*command, "--quiet", "--report", str(report)], log_path, cwd=code)
    remove_model(out)
    if run["returncode"] != 0:
        raise SystemExit(f"onnx-lowrank decompose failed ({' '.join(command)}): {run['output_tail']}")
    data = json.loads(report.read_text())
    latency = data.get("latency", {})
    run["report_seconds"] = data.get("seconds")
    run["measured_speedup"] = latency.get("measured_speedup")
    run["check_runs"] = latency.get("runs")
    run["check_seconds"] = (latency.get("check") or {}).get("seconds")  # None: code without the figure (before)
    run["sizes"] = data.get("shapes")
    return run


def summarize(
    name: str, size: int, plain: list[dict[str, Any]], steps: dict[str, list[dict[str, Any]]], startup_rss: int
) -> dict[str, Any]:
    """Medians and peaks of one model's steps, and the ratios the targets are about."""
    time_a = statistics.median(r["seconds"] for r in plain)
    out: dict[str, Any] = {
        "model": name,
        "file_bytes": size,
        "load_save_seconds": time_a,
        "load_save_peak_rss_bytes": max(r["peak_rss_bytes"] for r in plain),
        "startup_rss_bytes": startup_rss,
        "steps": {},
    }
    for label, runs in steps.items():
        wall = statistics.median(r["seconds"] for r in runs)
        peak = max(r["peak_rss_bytes"] for r in runs)
        checks = [r["check_seconds"] for r in runs if r.get("check_seconds") is not None]
        check = statistics.median(checks) if checks else None
        # code without the check's own figure: the check costs what the run with it took over the run without
        without = out["steps"].get(label.replace("checked", "unchecked"))
        if check is None and "checked" in label and without is not None:
            check = max(0.0, wall - without["wall_seconds"])
        out["steps"][label] = {
            "wall_seconds": wall,
            "peak_rss_bytes": peak,
            "check_seconds": check,
            "check_seconds_measured": bool(checks),
            "own_seconds": wall - (check or 0.0),
            "time_ratio": wall / time_a,
            "own_time_ratio": (wall - (check or 0.0)) / time_a,
            "rss_to_file": peak / size,
            "rss_above_startup_to_file": (peak - startup_rss) / size,
            "check_runs": statistics.median(r["check_runs"] for r in runs) if all(r.get("check_runs") for r in runs) else None,
            "measured_speedup": statistics.median(r["measured_speedup"] for r in runs)
            if all(r.get("measured_speedup") for r in runs)
            else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument(
        "--quick", action="store_true", help="a quarter-width VGG-16 at 64x64, one repeat: a development check, not results"
    )
    parser.add_argument("--repeat", type=int, help="rounds of the steps (default 3; --quick 1)")
    parser.add_argument("--models", nargs="*", default=[], help=f"models besides VGG-16: {', '.join(EXTRA_MODELS)} or a zoo name")
    parser.add_argument("--before", metavar="REV", help="also run (b) and (d) with the package at this git revision")
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
    codes: dict[str, Path] = {"after": ROOT}
    if args.before:
        codes = {"before": extract_code(args.before, workdir / "before"), "after": ROOT}
        result["before"] = {
            "revision": args.before,
            "commit": subprocess.run(
                ["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip(),
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
        models: dict[str, tuple[Path, list[str]]] = {"vgg16": (source, [])}
        for name in args.models:
            path = workdir / f"{name}.onnx"
            log(f"making {name}")
            models[name] = (path, make_model(name, path, workdir / f"make-{name}.log"))
        # interpreter start and imports are part of both steps' wall time; recorded to show how much of each they are
        result["startup"] = {
            "import onnx": run_measured([python, "-c", "import onnx"], workdir / "startup.log"),
            "import onnx_lowrank.cli": run_measured([python, "-c", "import onnx_lowrank.cli"], workdir / "startup.log"),
            # what a conversion holds before reading any model: the package and onnxruntime, numpy, scipy imported
            "imports of a conversion": run_measured(
                [python, "-c", "import onnx_lowrank.cli, onnx_lowrank.api, onnxruntime, scipy.linalg"], workdir / "startup.log"
            ),
        }
        startup_rss = result["startup"]["imports of a conversion"]["peak_rss_bytes"]
        plain: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
        steps: dict[str, dict[str, list[dict[str, Any]]]] = {name: {} for name in models}
        sized: list[dict[str, Any]] = []
        for i in range(repeat):
            for name, (path, extra) in models.items():
                a = run_measured([python, "-c", LOAD_SAVE, str(path), str(copy)], workdir / "load_save.log")
                remove_model(copy)
                if a["returncode"] != 0:
                    raise SystemExit(f"onnx.load + onnx.save failed: {a['output_tail']}")
                plain[name].append(a)
                target = workdir / f"{name}.lowrank.onnx"
                for label, code in codes.items():
                    for check in (False, True):
                        step = f"{label}, {'checked' if check else 'unchecked'}"
                        run = decompose_step(code, path, target, report, workdir / "decompose.log", check, extra)
                        steps[name].setdefault(step, []).append(run)
                        if name == "vgg16" and label == "after" and not check:
                            result.setdefault("exactness", exactness(report))
                if name == "vgg16":
                    given = f"{input_name}={','.join(map(str, input_shape))}"
                    c = decompose_step(
                        ROOT, dynamic, converted, workdir / "sized.json", workdir / "sized.log", False, ["--input-shape", given]
                    )
                    sized.append(c)
                summary = ", ".join(
                    f"{step} {runs[-1]['seconds']:.1f} s / {runs[-1]['peak_rss_bytes'] / 2**20:.0f} MiB"
                    + (f" (check {runs[-1]['check_seconds']:.1f} s)" if runs[-1].get("check_seconds") else "")
                    for step, runs in steps[name].items()
                )
                log(f"round {i + 1}/{repeat} {name}: load+save {a['seconds']:.1f} s / {a['peak_rss_bytes'] / 2**20:.0f} MiB; {summary}")
        result["load_save"] = plain["vgg16"]
        result["decompose"] = steps["vgg16"]["after, unchecked"]
        result["decompose_sized_by_a_run"] = sized
        result["models"] = {
            name: summarize(name, model_bytes(path), plain[name], steps[name], startup_rss) for name, (path, _) in models.items()
        }
        result["commands"] = {
            "load+save": 'python -c "import sys, onnx; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])" IN COPY',
            "unchecked": f"onnx-lowrank decompose IN OUT --speedup {SPEEDUP} --by macs --check-runs 0 --quiet --report R.json",
            "checked": f"onnx-lowrank decompose IN OUT --speedup {SPEEDUP} --by macs --quiet --report R.json",
        }
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    time_a = statistics.median(r["seconds"] for r in plain["vgg16"])
    time_b = statistics.median(r["seconds"] for r in result["decompose"])
    time_c = statistics.median(r["seconds"] for r in sized)
    run_c = statistics.median(r["sizes"]["seconds"] for r in sized)
    peak_a = max(r["peak_rss_bytes"] for r in plain["vgg16"])
    peak_b = max(r["peak_rss_bytes"] for r in result["decompose"])
    peak_c = max(r["peak_rss_bytes"] for r in sized)
    checked = result["models"]["vgg16"]["steps"]["after, checked"]
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
        "checked_seconds": checked["wall_seconds"],
        "checked_check_seconds": checked["check_seconds"],
        "checked_own_time_ratio": checked["own_time_ratio"],
        "checked_own_time_target_met": checked["own_time_ratio"] <= TIME_TARGET,
        "checked_time_ratio": checked["time_ratio"],
        "checked_time_target": CHECKED_TIME_TARGET,
        "checked_time_target_met": checked["time_ratio"] <= CHECKED_TIME_TARGET,
        "checked_peak_rss_bytes": checked["peak_rss_bytes"],
        "checked_rss_to_file": checked["rss_to_file"],
        "checked_rss_target_met": checked["rss_to_file"] <= RSS_TARGET,
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
    print(table_of_models(result["models"]))
    print()
    startup = result["startup"]
    imports = ", ".join(f"`{name}` {run['seconds']:.2f} s / {run['peak_rss_bytes'] / mib:.0f} MiB" for name, run in startup.items())
    print(f"Interpreter start and imports alone: {imports}.")

    def verdict(met: bool) -> str:
        return "met" if met else "NOT met"

    print(f"- time(decompose) / time(load + save) = {s['time_ratio']:.2f} (target ≤ {TIME_TARGET:g}): {verdict(s['time_target_met'])}")
    print(f"- peak RSS(decompose) / file size = {s['rss_to_file']:.2f} (target ≤ {RSS_TARGET:g}): {verdict(s['rss_target_met'])}")
    print(
        f"- with the check: (time − check) / time(load + save) = {s['checked_own_time_ratio']:.2f} (target ≤ {TIME_TARGET:g}): "
        f"{verdict(s['checked_own_time_target_met'])}; time / time(load + save) = {s['checked_time_ratio']:.2f} "
        f"(target ≤ {CHECKED_TIME_TARGET:g}): {verdict(s['checked_time_target_met'])}; peak RSS / file = "
        f"{s['checked_rss_to_file']:.2f} (target ≤ {RSS_TARGET:g}): {verdict(s['checked_rss_target_met'])}"
    )
    print(
        f"- exactness: max |relative_error − optimal_error| = {ex['max_gap']:.2g} over {ex['decomposed_layers']} decomposed layers "
        f"(tolerance {EXACTNESS:g}): {'met' if ex['passed'] else 'NOT met: ' + ', '.join(ex['over_tolerance'])}"
    )
    if args.quick:
        print("(--quick: a small model, so interpreter start and imports dominate both steps; the targets are for the full VGG-16.)")
    print(f"Wrote {out}")
    return 0


def table_of_models(models: dict[str, dict[str, Any]]) -> str:
    """One row per model and step: wall, peak RSS, the check's seconds and the ratios the targets are about."""
    mib = 2**20
    rows = []
    for name, model in models.items():
        rows.append(
            [
                name,
                f"{model['file_bytes'] / mib:,.0f}",
                "onnx.load + onnx.save",
                fmt(model["load_save_seconds"], ".2f"),
                "–",
                "–",
                fmt(model["load_save_peak_rss_bytes"] / mib, ".0f"),
                fmt(model["load_save_peak_rss_bytes"] / model["file_bytes"], ".2f", "x"),
                "–",
            ]
        )
        for step, row in model["steps"].items():
            check = row["check_seconds"]
            check_text = (
                "–" if check is None or "unchecked" in step else fmt(check, ".1f") + ("" if row["check_seconds_measured"] else " (est.)")
            )
            rows.append(
                [
                    name,
                    "",
                    f"decompose ({step})",
                    fmt(row["wall_seconds"], ".2f") + f" ({row['time_ratio']:.2f}x)",
                    check_text,
                    fmt(row["own_seconds"], ".2f") + f" ({row['own_time_ratio']:.2f}x)",
                    fmt(row["peak_rss_bytes"] / mib, ".0f"),
                    fmt(row["rss_to_file"], ".2f", "x"),
                    fmt(row["rss_above_startup_to_file"], ".2f", "x"),
                ]
            )
    headers = [
        "model",
        "file MiB",
        "step",
        "wall s (vs load+save)",
        "check s",
        "wall − check s (vs load+save)",
        "peak RSS MiB",
        "RSS / file",
        "(RSS − imports) / file",
    ]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    sys.exit(main())
