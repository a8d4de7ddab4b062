"""The default ``--speedup 2`` (planned by latency measured here) against the plan by MAC count, per model and thread count.

For each model and each intra-op thread count T (1 and 2), every conversion a fresh CLI process timed by wall
clock (interpreter start and imports included: what a user waits for), peak RSS from ``os.wait4``:

1. *MAC plan*: ``onnx-lowrank decompose IN OUT --speedup 2 --by macs --threads T --report R.json`` (its summary
   includes the quick timing of the result every conversion now makes);
2. *default, cold*: ``onnx-lowrank decompose IN OUT --speedup 2 --threads T --report R.json`` with an empty
   timing cache (``ONNX_LOWRANK_CACHE_DIR`` pointing to a fresh folder);
3. *default, warm*: the same conversion again, the timing cache as (2) left it: a second conversion of a
   similar model.

The default's extra time is (2) − (1); its budget: at most 15 s or 10 × (1), whichever is larger.

Then the benchmark times the results itself, at T threads: the original, the MAC plan and the default run
round-robin (the order rotated every round), ``--runs`` rounds after ``--warmup`` rounds, thread spinning off;
medians and ratios. And where the time goes, from onnxruntime's profiler (original and MAC plan interleaved):
the conv kernels' measured ratio against their MAC ratio, and the *bound* — the ratio the MAC plan would reach
if every conv kernel ran exactly at its MAC ratio, every fully connected one at its own, and the rest stayed
(see ``benchmarks/speed.py``).

Targets: the default measures ≥ 1.9x at 1 thread and ≥ 1.8x at 2 threads where the model allows it (else the
tool refuses, stating the most it can reach); the MAC plan measures ≥ 0.9 of its MAC ratio at 1 thread where
the bound is at least 0.9 of it.

    python benchmarks/default_plan.py --models vgg16 resnet50        # one part (< 20 min each on 2 cores)
    python benchmarks/default_plan.py --models googlenet alexnet nin digits

Each run merges its rows into ``benchmarks/results/default_plan.json`` (one row per model and thread count,
replaced when run again), so the table can be built in parts; ``--table`` prints the Markdown of what is there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MODELS, fmt, load, log, machine_info, markdown_table, results_path, write_json
from conversion import run_measured
from speed import breakdown, mac_ratio_of

from onnx_lowrank.report import Report
from onnx_lowrank.runtime import make_session
from onnx_lowrank.timing import kernel_times
from onnx_lowrank.timing_cache import CACHE_ENV
from onnx_lowrank.verify import random_inputs

DEFAULT_MODELS = ("vgg16", "resnet50", "googlenet", "alexnet", "nin", "resnet18", "mobilenetv2", "densenet121", "digits", "textline")
THREADS = (1, 2)
SPEEDUP = 2.0
TARGET = {1: 1.9, 2: 1.8}  # the default's measured ratio at --speedup 2, per thread count
EFFICIENCY_TARGET = 0.9  # the MAC plan's measured / MAC ratio at 1 thread, where the bound allows
BUDGET_SECONDS, BUDGET_FACTOR = 15.0, 10.0


def round_robin(sessions: Sequence[Any], feeds: Mapping[str, Any], runs: int, warmup: int) -> list[float]:
    """Median milliseconds of each session, run in turn every round, the order rotated from round to round."""
    for _ in range(warmup):
        for session in sessions:
            session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for i in range(runs):
        order = [(i + j) % len(sessions) for j in range(len(sessions))]
        for j in order:
            t0 = time.perf_counter()
            sessions[j].run(None, feeds)
            times[j].append((time.perf_counter() - t0) * 1000.0)
    return [statistics.median(t) for t in times]


def shape_flags(spec: Any) -> list[str]:
    """``--input-shape`` flags for a model with symbolic input dims (a recogniser's width, say)."""
    flags: list[str] = []
    for name, shape in (spec.input_shapes or {}).items():
        flags += ["--input-shape", f"{name}={','.join(map(str, shape))}"]
    return flags


def convert(source: Path, out: Path, threads: int, extra: list[str], cache: Path, log_path: Path) -> dict[str, Any]:
    """One CLI conversion in a fresh process; its wall time, peak RSS and --report."""
    report_path = out.with_suffix(".json")
    command = [sys.executable, "-m", "onnx_lowrank", "decompose", str(source), str(out), "--speedup", f"{SPEEDUP:g}"]
    command += ["--threads", str(threads), *extra, "--quiet", "--report", str(report_path)]
    os.environ[CACHE_ENV] = str(cache)
    try:
        run = run_measured(command, log_path)
    finally:
        del os.environ[CACHE_ENV]
    run["report"] = json.loads(report_path.read_text()) if run["returncode"] == 0 else None
    return run


def report_of(data: Mapping[str, Any]) -> Report:
    from onnx_lowrank.report import LayerReport

    fields = {k: v for k, v in data.items() if k in Report.__dataclass_fields__ and k != "layers"}
    layers = [LayerReport(**{k: v for k, v in layer.items() if k in LayerReport.__dataclass_fields__}) for layer in data["layers"]]
    return Report(**fields, layers=layers)


def summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """What a conversion did: status, time, RSS, MAC ratio, decompose's own timing; the refusal when there is one."""
    out: dict[str, Any] = {"seconds": run["seconds"], "peak_rss_mib": run["peak_rss_bytes"] / 2**20, "returncode": run["returncode"]}
    if run["report"] is None:
        out["status"] = "refused" if run["returncode"] == 2 else "error"
        out["message"] = " ".join(run["output_tail"])[-600:]
        return out
    report = run["report"]
    out.update(
        status="ok",
        mac_ratio=report["mac_ratio"],
        decomposed=sum(1 for layer in report["layers"] if layer["decomposed"]),
        by=report["policy"].get("by"),
        latency={k: v for k, v in report["latency"].items() if k != "rounds"},
        rounds=len(report["latency"].get("rounds", [])),
        ranks={layer["node"]: [layer["kind"], layer["rank"], layer["full_rank"]] for layer in report["layers"] if layer["decomposed"]},
    )
    return out


def plain_mac_plan(source: Path, out: Path, shapes: Mapping[str, Sequence[int]] | None) -> dict[str, Any]:
    """The plan by MACs without the overhead model (the allocation of the previous release), converted in-process."""
    from onnx_lowrank import decompose
    from onnx_lowrank.planning import mac_budget as mac_plan

    saved = mac_plan.PER_NODE_MACS, mac_plan.PER_ELEMENT_MACS
    mac_plan.PER_NODE_MACS, mac_plan.PER_ELEMENT_MACS = 0, 0.0
    try:
        start = time.perf_counter()
        model, report = decompose(str(source), speedup=SPEEDUP, by="macs", check_runs=0, input_shapes=shapes)
        seconds = time.perf_counter() - start
    finally:
        mac_plan.PER_NODE_MACS, mac_plan.PER_ELEMENT_MACS = saved
    onnx.save(model, str(out))
    return {"status": "ok", "seconds": seconds, "mac_ratio": report.mac_ratio, "decomposed": len(report.decomposed)}


def bench(name: str, threads_list: Sequence[int], runs: int, warmup: int, work: Path) -> list[dict[str, Any]]:
    spec = MODELS[name]
    model, meta = load(spec, quick=False)
    source = work / f"{name}.onnx"
    onnx.save(model, str(source))
    # the plan by MACs does not depend on the thread count: one conversion serves both
    mac_path, plain_path = work / f"{name}-macs.onnx", work / f"{name}-plain.onnx"
    flags = shape_flags(spec)
    mac = convert(source, mac_path, 1, ["--by", "macs", "--check-runs", "0", *flags], work / "unused-cache", work / "macs.log")
    plain = plain_mac_plan(source, plain_path, spec.input_shapes)
    log(f"[{name}] MAC plan converted in {mac['seconds']:.1f} s")
    rows = []
    for threads in threads_list:
        row: dict[str, Any] = {"model": name, "threads": threads, "input_size": meta.get("input_size"), "load_average": os.getloadavg()}
        cache = work / "timing-cache"  # keyed by thread count inside: cold for each thread count's first conversion
        default_path = work / f"{name}-default-{threads}.onnx"
        cold = convert(source, default_path, threads, flags, cache, work / "cold.log")
        warm = convert(source, default_path, threads, flags, cache, work / "warm.log")
        row["mac_plan"], row["default"], row["default_warm"] = summary(mac), summary(cold), summary(warm)
        row["mac_plan_plain"] = dict(plain)
        extra = cold["seconds"] - mac["seconds"]
        budget = max(BUDGET_SECONDS, BUDGET_FACTOR * mac["seconds"])
        row["default_extra_seconds"], row["budget_seconds"], row["budget_met"] = extra, budget, extra <= budget
        log(f"[{name} {threads}T] default converted in {cold['seconds']:.1f} s (warm cache {warm['seconds']:.1f} s)")

        original = make_session(model, threads=threads)
        feeds = random_inputs(original, seed=0, input_shapes=spec.input_shapes)
        sessions, labels = [original], ["original"]
        candidates = {}
        for label, path, ok in (
            ("mac_plan", mac_path, mac["report"] is not None),
            ("mac_plan_plain", plain_path, True),
            ("default", default_path, cold["report"] is not None),
        ):
            if ok:
                candidates[label] = onnx.load(str(path))
                sessions.append(make_session(candidates[label], threads=threads))
                labels.append(label)
        medians = round_robin(sessions, feeds, runs, warmup)
        row["measured_ms"] = dict(zip(labels, medians, strict=True))
        for label in labels[1:]:
            row[label]["measured"] = medians[0] / row["measured_ms"][label]
            if row[label].get("mac_ratio"):
                row[label]["efficiency"] = row[label]["measured"] / row[label]["mac_ratio"]
        del sessions
        if "mac_plan" in candidates and mac["report"] is not None:
            report = report_of(mac["report"])
            profiled = kernel_times([model, candidates["mac_plan"], candidates["mac_plan_plain"]], feeds, threads, runs=runs, warmup=warmup)
            conv_macs = mac_ratio_of(report, ("Conv", "ConvTranspose")) or 1.0
            row["mac_plan"]["breakdown"] = breakdown(profiled[0], profiled[1], conv_macs, mac_ratio_of(report, ("Gemm", "MatMul")) or 1.0)
            row["mac_plan"]["conv_mac_ratio"] = conv_macs
            row["mac_plan_plain"]["conv_kernel_ratio"] = profiled[0].conv_ms / profiled[2].conv_ms
        row["load_average_after"] = os.getloadavg()
        log(f"[{name} {threads}T] {line(row)}")
        rows.append(row)
    return rows


def line(row: Mapping[str, Any]) -> str:
    mac, default, plain = row["mac_plan"], row["default"], row["mac_plan_plain"]
    text = f"MAC plan {fmt(mac.get('mac_ratio'), '.2f', 'x')} MACs, {fmt(mac.get('measured'), '.2f', 'x')} measured"
    text += f" (without overheads: {fmt(plain.get('mac_ratio'), '.2f', 'x')} MACs, {fmt(plain.get('measured'), '.2f', 'x')} measured)"
    if default["status"] == "ok":
        text += f"; default {fmt(default.get('mac_ratio'), '.2f', 'x')} MACs, {fmt(default.get('measured'), '.2f', 'x')} measured"
    else:
        text += f"; default {default['status']}: {default.get('message')}"
    return text


def _order(row: Mapping[str, Any]) -> tuple[int, int]:
    return (DEFAULT_MODELS.index(row["model"]) if row["model"] in DEFAULT_MODELS else 99, row["threads"])


def tables(result: Mapping[str, Any]) -> str:
    """Two Markdown tables: the default against the MAC plan, and the MAC plan with and without its overhead model."""
    rows = []
    for row in sorted(result["rows"], key=_order):
        mac, default, warm = row["mac_plan"], row["default"], row["default_warm"]
        cells = [row["model"], str(row["threads"]), fmt(mac.get("mac_ratio"), ".2f", "x"), fmt(mac.get("measured"), ".2f", "x")]
        if default["status"] == "ok":
            cells += [fmt(default.get("mac_ratio"), ".2f", "x"), fmt(default.get("measured"), ".2f", "x")]
            cells += [fmt(default["latency"].get("measured_speedup"), ".2f", "x")]
        else:
            message = default.get("message", "")
            best = re.search(r"at most ([\d.]+x)", message)
            cells += ["–", f"refused: at most {best.group(1)}" if best else default["status"], "–"]
        cells += [fmt(mac["seconds"], ".1f", " s"), fmt(default["seconds"], ".1f", " s"), fmt(warm["seconds"], ".1f", " s")]
        cells += [f"{row['default_extra_seconds']:.1f} s / {row['budget_seconds']:.0f} s"]
        rows.append(cells)
    headers = [
        "model",
        "threads",
        "MAC plan: MAC ratio",
        "MAC plan: measured",
        "default: MAC ratio",
        "default: measured",
        "default: measured by decompose",
        "conversion: MAC plan",
        "conversion: default",
        "conversion: default, timing cache warm",
        "default's extra time / budget",
    ]
    first = markdown_table(headers, rows)
    rows = []
    for row in sorted(result["rows"], key=_order):
        mac, plain = row["mac_plan"], row["mac_plan_plain"]
        breakdown_ = mac.get("breakdown", {})
        cells = [row["model"], str(row["threads"])]
        cells += [fmt(plain.get("mac_ratio"), ".2f", "x"), fmt(plain.get("measured"), ".2f", "x"), fmt(plain.get("efficiency"), ".2f")]
        cells += [fmt(mac.get("mac_ratio"), ".2f", "x"), fmt(mac.get("measured"), ".2f", "x"), fmt(mac.get("efficiency"), ".2f")]
        cells += [
            fmt(breakdown_.get("bound"), ".2f", "x"),
            fmt(breakdown_.get("conv_ratio"), ".2f", "x"),
            fmt(mac.get("conv_mac_ratio"), ".2f", "x"),
        ]
        rows.append(cells)
    headers = [
        "model",
        "threads",
        "MACs only: MAC ratio",
        "MACs only: measured",
        "MACs only: measured / MACs",
        "with overheads: MAC ratio",
        "with overheads: measured",
        "with overheads: measured / MACs",
        "bound",
        "conv kernels",
        "conv MAC ratio",
    ]
    return first + "\n\n" + markdown_table(headers, rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(DEFAULT_MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=list(THREADS))
    parser.add_argument("--runs", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up rounds (default 3)")
    parser.add_argument("--out", help="results file (default benchmarks/results/default_plan.json)")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of the results file and stop")
    args = parser.parse_args(argv)
    out = results_path("default_plan", False, args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {"benchmark": "default_plan", "rows": [], "runs": []}
    if args.table:
        print(tables(result))
        return 0
    start = time.perf_counter()
    machine = machine_info()
    if machine["load_average"] and machine["load_average"][0] > 0.5:
        log(f"warning: load average {machine['load_average'][0]:.2f}: other work is running, timings will be noisy")
    with tempfile.TemporaryDirectory(prefix="default-plan-") as tmp:
        for name in args.models:
            rows = bench(name, args.threads, args.runs, args.warmup, Path(tmp))
            keys = {(r["model"], r["threads"]) for r in rows}
            result["rows"] = [r for r in result["rows"] if (r["model"], r["threads"]) not in keys] + rows
            write_json(out, result)
    result["runs"].append({"models": args.models, "threads": args.threads, "machine": machine, "seconds": time.perf_counter() - start,
                           "load_average_after": os.getloadavg(), "timed_runs": args.runs, "warmup": args.warmup})  # fmt: skip
    write_json(out, result)
    print(tables(result))
    print(f"\nWrote {out} ({(time.perf_counter() - start) / 60:.1f} min).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
