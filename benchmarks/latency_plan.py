"""Does ``--speedup 2`` by latency hold? decompose's figure against an independent timing, per model, threads, cache.

For each model and intra-op thread count T, three conversions, each a fresh CLI process
(``decompose IN OUT --speedup 2 --threads T --report R.json``; wall time from the benchmark):

1. *clean*: an empty timing cache;
2. *warm*: the cache (1) left — a second conversion of the same model;
3. *loaded*: a new cache filled by a conversion run while a CPU-bound process holds one core (its own result is
   recorded, not judged), then the conversion again on the quiet machine with that cache: what a cache filled on
   a busy machine does to a plan.

Each result is then timed independently: original and result in ``--pairs`` paired interleaved runs (the order
flipped every round), the ratio of medians and its 95 % bootstrap interval (:func:`onnx_lowrank.stats.speedup_estimate`).
Checked per row: the independent figure lies in [1.9, 2.4]x (or decompose refused, naming the bound), the MACs cut
are at most 1.5x the independent figure, and whether decompose's own interval contains the independent median.

``--efficiency`` adds the plan by MACs (``--by macs``) at 1 thread: measured / MAC ratio (target 0.9).

``--containment N`` repeats, on the clean result of each model at each thread count, decompose's own check
(:func:`onnx_lowrank.timing.measure_speedup` with the check's limits, as a conversion runs it) then an independent 30-pair timing, N times:
how often the interval holds the independent median (target: 9 of 10).

    python benchmarks/latency_plan.py --models digits textline nin resnet18          # needs a quiet machine
    python benchmarks/latency_plan.py --models resnet50 --threads 2 --containment 0
    python benchmarks/latency_plan.py --table

Rows merge into ``benchmarks/results/latency_plan.json`` (one per model and thread count, replaced when rerun).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import MODELS, fmt, load, log, machine_info, markdown_table, results_path, write_json
from default_plan import SPEEDUP, shape_flags
from default_plan import convert as run_conversion

from onnx_lowrank.runtime import make_session
from onnx_lowrank.stats import speedup_estimate
from onnx_lowrank.timing import CHECK_BUDGET_MS, CHECK_WIDTH, measure_speedup, paired_times
from onnx_lowrank.verify import random_inputs

BAND = (1.9, 2.4)
MAC_OVERCUT = 1.5
EFFICIENCY_TARGET = 0.9
RESULTS = "latency_plan.json"


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """A CPU-bound process holding one core for the time of the block."""
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        yield
    finally:
        spinner.kill()
        spinner.wait()


def convert(source: Path, out: Path, threads: int, flags: list[str], cache: Path, logs: Path) -> dict[str, Any]:
    """One CLI conversion in a fresh process (default_plan's, with the timing cache at ``cache``): wall time,
    peak RSS, and what its report says."""
    run = run_conversion(source, out, threads, flags, cache, logs)
    out_row: dict[str, Any] = {"seconds": run["seconds"], "peak_rss_mib": run["peak_rss_bytes"] / 2**20}
    if run["returncode"] != 0:
        out_row["status"] = "refused" if run["returncode"] == 2 else "error"
        out_row["message"] = " ".join(run["output_tail"])[-500:]
        return out_row
    report = run["report"]
    latency = report["latency"]
    out_row.update(
        status="ok",
        mac_ratio=report["mac_ratio"],
        by=latency.get("by"),
        speedup=latency.get("measured_speedup"),
        low=latency.get("speedup_low"),
        high=latency.get("speedup_high"),
        pairs=latency.get("runs"),
        met=latency.get("met"),
        rounds=len(latency.get("rounds", [])),
        predicted=latency.get("predicted_speedup"),
        layers_timed=latency.get("layers_timed"),
        layers_retimed=latency.get("layers_retimed"),
        cache=latency.get("timing_cache"),
        warnings=report.get("warnings", []),
    )
    return out_row


def independent(original: Any, candidate_path: Path, feeds: Mapping[str, Any], threads: int, pairs: int) -> dict[str, Any]:
    """Original against the result: ``pairs`` interleaved runs after warm-up, ratio of medians and its interval."""
    candidate = make_session(onnx.load(str(candidate_path)), threads=threads)
    for _ in range(3):
        original.run(None, feeds)
        candidate.run(None, feeds)
    estimate = speedup_estimate(*paired_times(original, candidate, feeds, pairs))
    return {"speedup": estimate.ratio, "low": estimate.low, "high": estimate.high, "pairs": estimate.runs}


def judge(conversion: dict[str, Any], measured: dict[str, Any] | None) -> None:
    """The row's checks: in the band, MACs not over-cut, decompose's interval containing the independent median."""
    if conversion["status"] != "ok" or measured is None:
        conversion["in_band"] = None
        return
    ratio = measured["speedup"]
    conversion["independent"] = measured
    conversion["in_band"] = BAND[0] <= ratio <= BAND[1]
    conversion["mac_over_measured"] = conversion["mac_ratio"] / ratio
    conversion["macs_within"] = conversion["mac_ratio"] <= MAC_OVERCUT * ratio
    low, high = conversion.get("low"), conversion.get("high")
    conversion["contains_independent"] = None if low is None else bool(low <= ratio <= high)


def containment(
    original_model: onnx.ModelProto, candidate_path: Path, feeds: Mapping[str, Any], threads: int, repeats: int
) -> dict[str, Any]:
    """decompose's check, then an independent 30-pair timing, ``repeats`` times: how often the interval holds it."""
    candidate = make_session(onnx.load(str(candidate_path)), threads=threads)
    held = 0
    trials = []
    for _ in range(repeats):
        original = make_session(original_model, threads=threads)
        # what the result check of a conversion runs (timing.ResultCheck): at most 10 pairs, early stop when narrow
        check = measure_speedup(original, candidate, feeds, max_runs=10, budget_ms=CHECK_BUDGET_MS, width=CHECK_WIDTH)
        other = speedup_estimate(*paired_times(original, candidate, feeds, 30))
        inside = check.low is not None and check.high is not None and check.low <= other.ratio <= check.high
        held += int(inside)
        trials.append({"check": [check.low, check.ratio, check.high, check.runs], "independent": other.ratio})
    return {"repeats": repeats, "held": held, "trials": trials}


def bench(name: str, threads_list: Sequence[int], pairs: int, efficiency: bool, repeats: int, work: Path) -> list[dict[str, Any]]:
    spec = MODELS[name]
    model, meta = load(spec, quick=False)
    source = work / f"{name}.onnx"
    onnx.save(model, str(source))
    flags = shape_flags(spec)
    rows = []
    for threads in threads_list:
        row: dict[str, Any] = {"model": name, "threads": threads, "input_size": meta.get("input_size"), "load_average": os.getloadavg()}
        original = make_session(model, threads=threads)
        feeds = random_inputs(original, seed=0, input_shapes=spec.input_shapes)
        clean_cache, loaded_cache = work / f"cache-clean-{threads}", work / f"cache-loaded-{threads}"
        for state in ("clean", "warm", "loaded"):
            out = work / f"{name}-{state}-{threads}.onnx"
            if state == "loaded":
                with busy_core():
                    row["filled_under_load"] = convert(source, out, threads, flags, loaded_cache, work / "busy.log")
            cache = loaded_cache if state == "loaded" else clean_cache
            row[state] = convert(source, out, threads, flags, cache, work / f"{state}.log")
            measured = independent(original, out, feeds, threads, pairs) if row[state]["status"] == "ok" else None
            judge(row[state], measured)
            log(f"[{name} {threads}T {state}] {line(row[state])}")
        if efficiency and threads == 1:
            out = work / f"{name}-macs.onnx"
            mac = convert(source, out, 1, ["--by", "macs", "--check-runs", "0", *flags], work / "unused-cache", work / "macs.log")
            if mac["status"] == "ok":
                mac["independent"] = independent(original, out, feeds, 1, pairs)
                mac["efficiency"] = mac["independent"]["speedup"] / mac["mac_ratio"]
            row["mac_plan"] = mac
            log(f"[{name} 1T MAC plan] {fmt(mac.get('mac_ratio'), '.2f', 'x')} MACs, efficiency {fmt(mac.get('efficiency'), '.2f')}")
        if repeats and row["clean"]["status"] == "ok":
            row["containment"] = containment(model, work / f"{name}-clean-{threads}.onnx", feeds, threads, repeats)
            log(f"[{name} {threads}T] interval held the independent median {row['containment']['held']} of {repeats}")
        row["load_average_after"] = os.getloadavg()
        rows.append(row)
    return rows


def line(c: Mapping[str, Any]) -> str:
    if c["status"] != "ok":
        return f"{c['status']}: {c.get('message', '')[-200:]}"
    ind = c.get("independent") or {}
    return (
        f"decompose {fmt(c.get('speedup'), '.2f', 'x')} ({fmt(c.get('low'), '.2f')}-{fmt(c.get('high'), '.2f')}), "
        f"independent {fmt(ind.get('speedup'), '.2f', 'x')} ({fmt(ind.get('low'), '.2f')}-{fmt(ind.get('high'), '.2f')}), "
        f"MACs {c['mac_ratio']:.2f}x, {c.get('rounds')} round(s), {c['seconds']:.1f} s"
    )


def tables(result: Mapping[str, Any]) -> str:
    rows = []
    for row in sorted(result["rows"], key=lambda r: (r["model"], r["threads"])):
        for state in ("clean", "warm", "loaded"):
            c = row[state]
            cells = [row["model"], str(row["threads"]), state]
            if c["status"] != "ok":
                cells += [f"{c['status']}: {c.get('message', '')[-120:]}", "–", "–", "–", "–", fmt(c["seconds"], ".1f", " s")]
            else:
                ind = c["independent"]
                cells += [
                    f"{c['speedup']:.2f}x ({fmt(c.get('low'), '.2f')}–{fmt(c.get('high'), '.2f')}, {c.get('pairs')} pairs)",
                    f"{ind['speedup']:.2f}x ({fmt(ind.get('low'), '.2f')}–{fmt(ind.get('high'), '.2f')})",
                    f"{c['mac_ratio']:.2f}x ({c['mac_over_measured']:.2f}× measured)",
                    "yes" if c["in_band"] and c["macs_within"] else "no",
                    str(c.get("rounds")),
                    fmt(c["seconds"], ".1f", " s"),
                ]
            rows.append(cells)
    headers = [
        "model",
        "threads",
        "cache",
        "decompose says (95 % CI)",
        "independent (95 % CI)",
        "MACs cut",
        "in [1.9, 2.4] and MACs ≤ 1.5×",
        "rounds",
        "conversion",
    ]
    text = markdown_table(headers, rows)
    eff = [
        [
            r["model"],
            fmt(r["mac_plan"].get("mac_ratio"), ".2f", "x"),
            fmt((r["mac_plan"].get("independent") or {}).get("speedup"), ".2f", "x"),
            fmt(r["mac_plan"].get("efficiency"), ".2f"),
        ]
        for r in sorted(result["rows"], key=lambda r: r["model"])
        if "mac_plan" in r
    ]
    if eff:
        text += "\n\n" + markdown_table(["model", "MAC plan: MACs cut", "measured, 1 thread", "measured / MACs"], eff)
    held = [
        [r["model"], str(r["threads"]), f"{r['containment']['held']} of {r['containment']['repeats']}"]
        for r in sorted(result["rows"], key=lambda r: (r["model"], r["threads"]))
        if "containment" in r
    ]
    if held:
        text += "\n\n" + markdown_table(["model", "threads", "decompose's interval holds an independent 30-pair median"], held)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["digits", "textline", "nin", "resnet18"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--pairs", type=int, default=30, help="independent paired runs (default 30)")
    parser.add_argument("--efficiency", action="store_true", help="also the plan by MACs at 1 thread: measured / MACs")
    parser.add_argument("--containment", type=int, default=10, metavar="N", help="repeats of the interval check (default 10; 0: none)")
    parser.add_argument("--out", help=f"results file (default benchmarks/results/{RESULTS})")
    parser.add_argument("--table", action="store_true", help="print the Markdown tables of the results file and stop")
    args = parser.parse_args(argv)
    out = results_path(RESULTS.removesuffix(".json"), False, args.out)
    previous = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if args.table:
        print(tables(previous))
        return 0
    with tempfile.TemporaryDirectory(prefix="latency-plan-") as tmp:
        rows = []
        for name in args.models:
            rows += bench(name, args.threads, args.pairs, args.efficiency, args.containment, Path(tmp))
    keys = {(r["model"], r["threads"]) for r in rows}
    merged = [r for r in previous["rows"] if (r["model"], r["threads"]) not in keys] + rows
    result = {"benchmark": "latency_plan", "machine": machine_info(), "speedup": SPEEDUP, "band": BAND, "rows": merged}
    write_json(out, result)
    print(tables(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
