"""Speed benchmark: MAC ratio against measured onnxruntime CPU latency, and output error, per model and target.

For each model (VGG-16, ResNet-50, GoogLeNet, AlexNet, CIFAR NIN) and each
target ``--speedup`` (1.5, 2, 3; a target the model cannot reach is recorded as
"unreachable: best X" and the run goes on), plus VGG-16 at the ranks of Tai et
al.'s own VGG-16 (spatial split only), the decomposed model is compared with
the original:

* MAC ratio (the report's total MACs before / after);
* measured latency ratio (original median ms / decomposed median ms) at 1 and 2
  intra-op threads, at onnxruntime's default graph optimization
  (``ORT_ENABLE_ALL``) and at ``ORT_ENABLE_EXTENDED``: both sessions warmed up,
  then run alternately with the order flipped every round, thread spinning off
  (:func:`onnx_lowrank.timing.interleaved_latency`);
* efficiency: measured ratio / MAC ratio;
* where the time goes, from onnxruntime's profiler (each node's kernel time,
  median over the same number of runs, original and candidate interleaved,
  summed by class): the conv kernels, the
  fully connected kernels, and everything else (pooling, elementwise, layout
  reorders). From these: the measured ratio of the conv kernels alone (Tai et
  al. count conv MACs only: 2.94x at their VGG-16 ranks), of all MAC-carrying
  kernels, and the *bound*: the whole-model ratio the candidate would reach if
  its conv kernels ran exactly at the conv MAC ratio, its fully connected ones
  at theirs, and the rest stayed as it was (Amdahl's law over the original's
  profile);
* output error on a seeded random input: relative L2, cosine, max abs.

Two studies at speedup 2 on VGG-16 and ResNet-50 choose the defaults:
``rank_multiple`` 1 / 8 / 16 / 32 / 64, and ``kinds`` spatial / spatial+channel / channel.
Then the latency-aware policy: ``decompose(speedup=S, by="latency",
threads=T)`` for T = 1, 2 at each reachable target, with its predicted and
measured speedup and an independent interleaved re-measurement; the target is
a re-measured ratio of at least 0.95·S.

Every configuration runs in this one process, strictly one after another (two
timing processes at once would time each other). Results go to
``benchmarks/results/speed.json`` (``--quick``: ``benchmarks/results/quick/speed.json``,
development numbers only), rewritten after every configuration; the Markdown
tables for the README are printed at the end::

    python benchmarks/speed.py                       # full run (~20 min on 2 cores, ~30 with studies; needs a quiet machine)
    python benchmarks/speed.py --quick               # quarter-width VGG-16 at 64x64 and NIN, 10 runs (under a minute)
    python benchmarks/speed.py --models vgg16 resnet50 --parts targets studies

The weights are random (seeded), not trained. Their spectra are flat, so the
output errors are far larger than a trained network's at the same ranks: they
compare configurations with each other, they do not predict accuracy (see
``benchmarks/accuracy.py`` for a trained network).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# One BLAS thread for the factorizations (set before numpy loads its BLAS; an explicit setting wins): decompose
# already runs one spectrum per worker thread, and OpenBLAS threads on top of those oversubscribe a small machine
# (10x slower conversions were seen on 2 busy cores). What this script times is onnxruntime, which has its own threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, beside this script

from bench_common import MODELS, SPEED_MODELS, fmt, load, log, machine_info, markdown_table, results_path, write_json

from onnx_lowrank import LowRankError, decompose
from onnx_lowrank.config import DEFAULT_KINDS, DEFAULT_RANK_MULTIPLE  # what a user gets without options
from onnx_lowrank.report import Report
from onnx_lowrank.runtime import make_session
from onnx_lowrank.timing import KernelTimes, interleaved_latency, kernel_times
from onnx_lowrank.verify import compare_outputs, random_inputs

SPEEDUPS = (1.5, 2.0, 3.0)
# Tai et al. (ICLR 2016), their VGG-16 ranks: 2.94x fewer conv MACs with the spatial split alone
PAPER_RANKS = {
    "conv1_1": 5,
    "conv1_2": 24,
    "conv2_1": 64,
    "conv2_2": 64,
    "conv3_1": 64,
    "conv3_2": 128,
    "conv3_3": 160,
    "conv4_1": 192,
    "conv4_2": 192,
    "conv4_3": 256,
    "conv5_1": 320,
    "conv5_2": 320,
    "conv5_3": 320,
}
STUDY_MODELS = ("vgg16", "resnet50")
STUDY_SPEEDUP = 2.0
RANK_MULTIPLES = (1, 8, 16, 32, 64)
KIND_SETS: tuple[tuple[str, ...], ...] = (("spatial",), ("spatial", "channel"), ("channel",))
THREADS = (1, 2)
OPTIMIZATIONS = ("default", "extended")
MEASURE_SHARE = 0.95  # the latency-aware policy's target: re-measured speedup >= 0.95 * S
SEED = 0
RTOL, ATOL = 1e-3, 1e-4  # only for the pass/fail flag verify reports; the tables show the raw error statistics
PARTS = ("targets", "paper", "studies", "measure")


@dataclass(frozen=True)
class Timing:
    runs: int  # interleaved rounds; the median of each model's runs is taken
    warmup: int


@dataclass(frozen=True)
class Config:
    """One way to decompose a model."""

    label: str
    speedup: float | None
    kinds: tuple[str, ...]
    rank_multiple: int
    ranks: Mapping[str, int] | None = None
    pad_ranks: bool = False  # zero filters up to onnxruntime's kernel block (decompose's pad_ranks)

    @property
    def key(self) -> tuple[Any, ...]:
        """Configurations with equal keys give the same model: each is run once and shared by the tables."""
        ranks = tuple(sorted((self.ranks or {}).items()))
        return (self.speedup, tuple(sorted(self.kinds)), self.rank_multiple, ranks, self.pad_ranks)

    def kwargs(self) -> dict[str, Any]:
        # the plan by MAC count, which these tables compare with the measured speed; the benchmark times it itself
        args: dict[str, Any] = {"kinds": list(self.kinds), "rank_multiple": self.rank_multiple, "by": "macs", "check_runs": 0}
        if self.ranks is not None:
            args["ranks"] = dict(self.ranks)
            args["pad_ranks"] = self.pad_ranks
        else:
            args["speedup"] = self.speedup
        return args


@dataclass
class Record:
    """The result of one configuration on one model (one row of ``runs`` in the JSON)."""

    model: str
    config: str
    studies: list[str]
    speedup: float | None
    kinds: list[str]
    rank_multiple: int
    requested_ranks: dict[str, int] | None = None  # the ranks asked for (the paper configuration)
    status: str = "ok"  # "ok", "unreachable" or "error"
    best_reachable: float | None = None
    message: str | None = None
    mac_ratio: float | None = None
    conv_mac_ratio: float | None = None  # Conv layers only (how Tai et al. count: 2.94x for their VGG-16 ranks)
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int | None = None
    params_after: int | None = None
    decomposed_layers: int | None = None
    layers: int | None = None
    decompose_seconds: float | None = None
    ranks: dict[str, list[Any]] = field(default_factory=dict)  # node -> [kind, rank, full rank]
    latency: dict[str, dict[str, float]] = field(default_factory=dict)  # "1T default" -> original_ms, candidate_ms, ratio
    efficiency: dict[str, float] = field(default_factory=dict)  # measured ratio / MAC ratio, per setting
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)  # per setting: profiled kernel times (see breakdown())
    error: dict[str, Any] = field(default_factory=dict)


def setting_name(threads: int, optimization: str) -> str:
    return f"{threads}T {optimization}"


def best_reachable(message: str) -> float | None:
    """The best speedup a LowRankError says is reachable ("... the most any allocation gives is 2.53x ...")."""
    tail = message.split("cannot be reached", 1)[-1]
    found = re.search(r"(\d+(?:\.\d+)?(?:e[+-]?\d+)?)x", tail)
    return float(found.group(1)) if found else None


class Bench:
    """One model under test: its seeded input, reference outputs and the original's sessions, made once."""

    def __init__(self, name: str, model: onnx.ModelProto, timing: Timing) -> None:
        self.name = name
        self.model = model
        self.timing = timing
        self._originals: dict[tuple[int, str], Any] = {}
        first = self.original(THREADS[0], OPTIMIZATIONS[0])
        self.feeds = random_inputs(first, seed=SEED)
        self.output_names = [o.name for o in first.get_outputs()]
        self.reference = first.run(self.output_names, self.feeds)

    def original(self, threads: int, optimization: str) -> Any:
        """The original model's session for this setting; kept, since every configuration is timed against it."""
        key = (threads, optimization)
        if key not in self._originals:
            self._originals[key] = make_session(self.model, threads=threads, optimization=optimization)
        return self._originals[key]

    def error(self, session: Any) -> dict[str, Any]:
        """Error statistics of the first output (the logits) of a candidate session against the original's."""
        got = session.run(self.output_names, self.feeds)
        stats = compare_outputs(self.output_names, self.reference, got, RTOL, ATOL)
        first = asdict(stats[0])
        return {k: first[k] for k in ("name", "shape", "relative_l2", "cosine", "max_abs", "mean_abs", "max_rel", "top1_agreement")}

    def time(self, candidate: onnx.ModelProto, threads: int, optimization: str, with_error: bool = False) -> tuple[dict[str, float], Any]:
        """Interleaved median latency of original and candidate; the error statistics too when asked."""
        session = make_session(candidate, threads=threads, optimization=optimization)
        error = self.error(session) if with_error else None
        original_ms, candidate_ms = interleaved_latency(
            self.original(threads, optimization), session, self.feeds, self.timing.runs, self.timing.warmup
        )
        return {"original_ms": original_ms, "candidate_ms": candidate_ms, "ratio": original_ms / candidate_ms}, error

    def kernels(self, candidate: onnx.ModelProto, threads: int, optimization: str) -> tuple[KernelTimes, KernelTimes]:
        """Profiled kernel times of the original and the candidate, their runs interleaved."""
        original, profiled = kernel_times([self.model, candidate], self.feeds, threads, optimization, self.timing.runs, self.timing.warmup)
        return original, profiled


def breakdown(original: KernelTimes, candidate: KernelTimes, conv_macs: float, fc_macs: float) -> dict[str, float]:
    """Kernel time by class, the conv and MAC-carrying kernels' measured ratios, and the Amdahl bound.

    The bound divides the original's conv kernel time by the conv MAC ratio and its fully connected kernel
    time by theirs (a batch-1 fully connected layer is bound by memory, so it must not take the conv layers'
    ratio), and keeps the rest.
    """
    layers_before = original.conv_ms + original.fc_ms
    layers_after = candidate.conv_ms + candidate.fc_ms
    return {
        "original_conv_ms": original.conv_ms,
        "original_fc_ms": original.fc_ms,
        "original_other_ms": original.other_ms,
        "candidate_conv_ms": candidate.conv_ms,
        "candidate_fc_ms": candidate.fc_ms,
        "candidate_other_ms": candidate.other_ms,
        "other_share": original.other_ms / original.total_ms,
        "conv_ratio": original.conv_ms / candidate.conv_ms,
        "layers_ratio": layers_before / layers_after,
        "bound": original.total_ms / (original.conv_ms / conv_macs + original.fc_ms / fc_macs + original.other_ms),
    }


def mac_ratio_of(report: Report, op_types: Sequence[str]) -> float | None:
    """MACs before / after of the layers of these operator types; None when there are none."""
    layers = [layer for layer in report.layers if layer.op_type in op_types]
    after = sum(layer.macs_after for layer in layers)
    return sum(layer.macs_before for layer in layers) / after if after else None


def conv_mac_ratio(report: Report) -> float | None:
    return mac_ratio_of(report, ("Conv",))


def layer_ranks(report: Report) -> dict[str, list[Any]]:
    return {layer.node: [layer.kind, layer.rank, layer.full_rank] for layer in report.decomposed}


def run_config(bench: Bench, config: Config, studies: list[str]) -> Record:
    """Decompose by one configuration, then time it at every setting and measure its output error."""
    record = Record(
        bench.name,
        config.label,
        studies,
        config.speedup,
        list(config.kinds),
        config.rank_multiple,
        dict(config.ranks) if config.ranks else None,
    )
    start = time.perf_counter()
    try:
        candidate, report = decompose(bench.model, **config.kwargs())
    except LowRankError as exc:
        record.message = str(exc)
        record.best_reachable = best_reachable(str(exc))
        record.status = "unreachable" if "cannot be reached" in str(exc) else "error"
        return record
    record.decompose_seconds = time.perf_counter() - start
    record.mac_ratio = report.mac_ratio
    record.conv_mac_ratio = conv_mac_ratio(report)
    record.macs_before, record.macs_after = report.macs_before, report.macs_after
    record.params_before, record.params_after = report.params_before, report.params_after
    record.decomposed_layers, record.layers = len(report.decomposed), len(report.layers)
    record.ranks = layer_ranks(report)
    for threads in THREADS:
        for optimization in OPTIMIZATIONS:
            name = setting_name(threads, optimization)
            latency, error = bench.time(candidate, threads, optimization, with_error=not record.error)
            record.latency[name] = latency
            record.efficiency[name] = latency["ratio"] / report.mac_ratio
            record.breakdown[name] = breakdown(
                *bench.kernels(candidate, threads, optimization),
                mac_ratio_of(report, ("Conv", "ConvTranspose")) or 1.0,
                mac_ratio_of(report, ("Gemm", "MatMul")) or 1.0,
            )
            if error is not None:
                record.error = error
    return record


def run_measured(bench: Bench, speedup: float, threads: int) -> dict[str, Any]:
    """The latency-aware policy at one target and thread count, re-measured independently afterwards."""
    entry: dict[str, Any] = {"model": bench.name, "speedup": speedup, "threads": threads, "status": "ok"}
    start = time.perf_counter()
    try:
        candidate, report = decompose(bench.model, speedup=speedup, by="latency", threads=threads)
    except LowRankError as exc:
        entry.update(
            status="unreachable" if "cannot be reached" in str(exc) else "error", message=str(exc), best_reachable=best_reachable(str(exc))
        )
        return entry
    entry["decompose_seconds"] = time.perf_counter() - start
    latency = dict(report.latency)
    entry["predicted_speedup"] = latency.get("predicted_speedup")
    entry["measured_speedup"] = latency.get("measured_speedup")  # decompose's own whole-model check
    entry["report_latency"] = latency
    entry["mac_ratio"] = report.mac_ratio
    entry["decomposed_layers"] = len(report.decomposed)
    entry["ranks"] = layer_ranks(report)
    # the check decompose makes is at onnxruntime's default optimization, so the re-measurement is too
    remeasured, error = bench.time(candidate, threads, "default", with_error=True)
    entry["remeasured"] = remeasured
    entry["error"] = error
    entry["target_met"] = remeasured["ratio"] >= MEASURE_SHARE * speedup
    return entry


def paper_ranks(width: float) -> dict[str, int]:
    """Tai et al.'s VGG-16 ranks, scaled for a VGG-16 of ``width`` times the channels (--quick builds one).

    A pair's MACs K·(C·kh + N·kw) against N·C·kh·kw keep their ratio when K, C and N all scale by the width.
    """
    return {node: max(1, round(rank * width)) for node, rank in PAPER_RANKS.items()}


def configs_for(model: str, parts: Sequence[str], width: float = 1.0) -> list[tuple[Config, str]]:
    """The configurations of one model in run order, each with the study it serves."""
    default_kinds = tuple(DEFAULT_KINDS)
    out: list[tuple[Config, str]] = []
    if "targets" in parts:
        out += [(Config(f"speedup {s:g}", s, default_kinds, DEFAULT_RANK_MULTIPLE), "targets") for s in SPEEDUPS]
    if "paper" in parts and model == "vgg16":
        out.append((Config("paper ranks", None, ("spatial",), DEFAULT_RANK_MULTIPLE, paper_ranks(width)), "paper"))
        # the same ranks stored with zero filters up to the kernel block (conv1_1's 5 -> 8 on AVX2)
        out.append((Config("paper ranks, padded", None, ("spatial",), DEFAULT_RANK_MULTIPLE, paper_ranks(width), True), "paper"))
    if "studies" in parts and model in STUDY_MODELS:
        for multiple in RANK_MULTIPLES:
            out.append(
                (Config(f"speedup {STUDY_SPEEDUP:g}, rank multiple {multiple}", STUDY_SPEEDUP, default_kinds, multiple), "rank_multiple")
            )
        for kinds in KIND_SETS:
            out.append(
                (Config(f"speedup {STUDY_SPEEDUP:g}, kinds {'+'.join(kinds)}", STUDY_SPEEDUP, kinds, DEFAULT_RANK_MULTIPLE), "kinds")
            )
    return out


def bench_model(name: str, quick: bool, timing: Timing, parts: Sequence[str], result: dict[str, Any], out: Path) -> None:
    """Every configuration of one model, one after another; the results file is rewritten after each."""
    spec = MODELS[name]
    log(f"[{name}] loading {spec.description}")
    model, meta = load(spec, quick)
    result["models"][name] = meta
    bench = Bench(name, model, timing)
    done: dict[tuple[Any, ...], Record] = {}
    for config, study in configs_for(name, parts, float(meta.get("width", 1.0))):
        if config.key in done:  # e.g. the rank-multiple study at 1 is the plain speedup 2 row
            done[config.key].studies.append(study)
            continue
        t0 = time.perf_counter()
        record = run_config(bench, config, [study])
        done[config.key] = record
        result["runs"].append(record)
        log(f"[{name}] {config.label}: {summarize(record)} ({time.perf_counter() - t0:.0f} s)")
        write_json(out, serializable(result))
        gc.collect()  # candidates of VGG-16 hold ~0.5 GB each: free one before making the next
    if "measure" in parts:
        for speedup in SPEEDUPS:
            plain = next((r for r in done.values() if r.speedup == speedup and "targets" in r.studies), None)
            for threads in THREADS:
                if plain is not None and plain.status != "ok":  # unreachable by MACs: no latency budget can do better
                    entry = {
                        "model": name,
                        "speedup": speedup,
                        "threads": threads,
                        "status": "skipped",
                        "message": f"MAC-based: {plain.status}",
                    }
                else:
                    t0 = time.perf_counter()
                    entry = run_measured(bench, speedup, threads)
                    log(f"[{name}] measure speedup {speedup:g}, {threads}T: {summarize_measured(entry)} ({time.perf_counter() - t0:.0f} s)")
                result["measure_policy"].append(entry)
                write_json(out, serializable(result))
                gc.collect()
    del bench, model
    gc.collect()


def summarize(record: Record) -> str:
    if record.status != "ok":
        return (
            f"{record.status}: best {fmt(record.best_reachable, '.3g', 'x')}"
            if record.status == "unreachable"
            else f"error: {record.message}"
        )
    ratios = ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in record.latency.items())
    return f"MACs {record.mac_ratio:.2f}x; measured {ratios}; rel. L2 {record.error.get('relative_l2', float('nan')):.3g}"


def summarize_measured(entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        return f"{entry['status']}: {entry.get('message')}"
    return (
        f"predicted {entry['predicted_speedup']:.2f}x, measured {entry['measured_speedup']:.2f}x, "
        f"re-measured {entry['remeasured']['ratio']:.2f}x, target met: {entry['target_met']}"
    )


def serializable(result: dict[str, Any]) -> dict[str, Any]:
    return {**result, "runs": [asdict(r) if isinstance(r, Record) else r for r in result["runs"]]}


# --------------------------------------------------------------------------- Markdown


def _ratio_cells(run: Mapping[str, Any], settings: Sequence[str]) -> list[str]:
    return [fmt(run["latency"][s]["ratio"], ".2f", "x") if s in run["latency"] else "–" for s in settings]


def _error_cells(run: Mapping[str, Any]) -> list[str]:
    error = run.get("error") or {}
    return [fmt(error.get("relative_l2"), ".3g"), fmt(error.get("cosine"), ".5f"), fmt(error.get("max_abs"), ".3g")]


def _not_ok(run: Mapping[str, Any], width: int) -> list[str]:
    if run["status"] == "unreachable":
        return [f"unreachable: best {fmt(run.get('best_reachable'), '.3g', 'x')}"] + ["–"] * (width - 1)
    return [f"error: {run.get('message')}"] + ["–"] * (width - 1)


SETTINGS = [setting_name(t, o) for t in THREADS for o in OPTIMIZATIONS]
SETTING_HEADERS = [f"{t}T {'ext' if o == 'extended' else 'default'}" for t in THREADS for o in OPTIMIZATIONS]


def tables(result: Mapping[str, Any]) -> str:
    """The Markdown for the README: targets, the two studies, the latency-aware policy."""
    runs = result["runs"]
    parts: list[str] = []
    settings = result["settings"]
    parts.append(
        f"Measured: original median ms / decomposed median ms in onnxruntime {result['machine']['versions']['onnxruntime']} "
        f"(CPU: {result['machine']['cpu']}, {result['machine']['cores']} cores), {settings['runs']} interleaved runs after "
        f"{settings['warmup']} warm-up; nT = intra-op threads; default = onnxruntime's default graph optimization (all), "
        "ext = ORT_ENABLE_EXTENDED. MAC ratio: MACs of the conv and fully connected layers before / after. "
        "Efficiency = measured / MAC ratio (1T / 2T, default). Error: logits on a seeded random input, relative L2 / "
        "cosine / max abs; the weights are random, not trained (flat spectra), so errors only compare configurations."
    )
    if result.get("quick"):
        parts.append("**--quick run: small inputs and few runs, a development check — not results.**")

    headers = ["model", "config", "MAC ratio", *SETTING_HEADERS, "efficiency 1T / 2T", "rel. L2", "cosine", "max abs"]
    rows = []
    for run in runs:
        if not {"targets", "paper"} & set(run["studies"]):
            continue
        head = [run["model"], run["config"]]
        if run["status"] != "ok":
            rows.append(head + _not_ok(run, len(headers) - 2))
            continue
        eff = " / ".join(fmt(run["efficiency"].get(setting_name(t, "default")), ".2f") for t in THREADS)
        rows.append([*head, fmt(run["mac_ratio"], ".2f", "x"), *_ratio_cells(run, SETTINGS), eff, *_error_cells(run)])
    if rows:
        parts.append("**Speed by model and target**\n\n" + markdown_table(headers, rows))

    headers = [
        "model",
        "config",
        "MAC ratio",
        "conv MAC ratio",
        "measured 1T / 2T",
        "bound 1T / 2T",
        "conv kernels 1T / 2T",
        "all MAC kernels 1T / 2T",
        "non-MAC share 1T / 2T",
    ]
    rows = []
    for run in runs:
        if not {"targets", "paper"} & set(run["studies"]) or run["status"] != "ok" or not run.get("breakdown"):
            continue
        cells = [run["model"], run["config"], fmt(run["mac_ratio"], ".2f", "x"), fmt(run["conv_mac_ratio"], ".2f", "x")]
        defaults = [setting_name(t, "default") for t in THREADS]
        cells.append(" / ".join(fmt(run["latency"][s]["ratio"], ".2f", "x") for s in defaults))
        for key, spec, unit in (("bound", ".2f", "x"), ("conv_ratio", ".2f", "x"), ("layers_ratio", ".2f", "x")):
            cells.append(" / ".join(fmt(run["breakdown"][s][key], spec, unit) for s in defaults))
        cells.append(" / ".join(fmt(100 * run["breakdown"][s]["other_share"], ".0f", " %") for s in defaults))
        rows.append(cells)
    if rows:
        parts.append(
            "**Where the time goes** (default optimization; from onnxruntime's profiler: each node's median kernel time, "
            "summed by class). *bound*: the whole-model ratio if the conv kernels ran exactly at the conv MAC ratio, "
            "the fully connected ones at theirs, and everything else stayed as it was; *conv kernels* / *all MAC kernels*: "
            "measured ratio of those kernels' summed time; *non-MAC share*: the original's time outside them "
            "(pooling, elementwise, layout reorders)."
            "\n\n" + markdown_table(headers, rows)
        )

    for study, title, column in (
        ("rank_multiple", f"Rank rounding at speedup {STUDY_SPEEDUP:g}", "rank multiple"),
        ("kinds", f"Kinds at speedup {STUDY_SPEEDUP:g}", "kinds"),
    ):
        headers = ["model", column, "MAC ratio", *SETTING_HEADERS, "rel. L2", "cosine"]
        rows = []
        for run in runs:
            if study not in run["studies"]:
                continue
            value = str(run["rank_multiple"]) if study == "rank_multiple" else "+".join(run["kinds"])
            head = [run["model"], value]
            if run["status"] != "ok":
                rows.append(head + _not_ok(run, len(headers) - 2))
                continue
            rows.append([*head, fmt(run["mac_ratio"], ".2f", "x"), *_ratio_cells(run, SETTINGS), *_error_cells(run)[:2]])
        if rows:
            parts.append(f"**{title}**\n\n" + markdown_table(headers, rows))

    headers = [
        "model",
        "target",
        "threads",
        "predicted",
        "measured (decompose)",
        "re-measured",
        f"≥ {MEASURE_SHARE:g}·S",
        "MAC ratio",
        "rel. L2",
    ]
    rows = []
    for entry in result["measure_policy"]:
        head = [entry["model"], f"{entry['speedup']:g}x", str(entry["threads"])]
        if entry["status"] != "ok":
            what = (
                f"unreachable: best {fmt(entry.get('best_reachable'), '.3g', 'x')}" if entry["status"] == "unreachable" else entry["status"]
            )
            rows.append(head + [what] + ["–"] * (len(headers) - 4))
            continue
        rows.append(
            [
                *head,
                fmt(entry["predicted_speedup"], ".2f", "x"),
                fmt(entry["measured_speedup"], ".2f", "x"),
                fmt(entry["remeasured"]["ratio"], ".2f", "x"),
                "yes" if entry["target_met"] else "no",
                fmt(entry["mac_ratio"], ".2f", "x"),
                fmt(entry["error"].get("relative_l2"), ".3g"),
            ]
        )
    if rows:
        parts.append("**Latency-aware policy (`--measure`)** (re-measured at default optimization)\n\n" + markdown_table(headers, rows))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--quick", action="store_true", help="small inputs, few runs, VGG-16 and NIN: a development check, not results")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="models to run (default: all; --quick: vgg16 nin)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)")
    parser.add_argument("--runs", type=int, help="interleaved timed runs per setting (default 20; --quick 10)")
    parser.add_argument("--warmup", type=int, help="warm-up runs of each session (default 3; --quick 2)")
    parser.add_argument("--out", help="results file (default: benchmarks/results/speed.json; --quick: benchmarks/results/quick/speed.json)")
    args = parser.parse_args(argv)

    timing = Timing(
        runs=args.runs or (10 if args.quick else 20), warmup=args.warmup if args.warmup is not None else (2 if args.quick else 3)
    )
    if timing.runs < 1 or timing.warmup < 0:
        parser.error("--runs must be >= 1 and --warmup >= 0")
    models = args.models or (["vgg16", "nin"] if args.quick else list(SPEED_MODELS))
    out = results_path("speed", args.quick, args.out)
    start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "speed",
        "quick": args.quick,
        "machine": machine_info(),
        "settings": {
            "runs": timing.runs,
            "warmup": timing.warmup,
            "seed": SEED,
            "threads": list(THREADS),
            "optimizations": {"default": "onnxruntime's default (ORT_ENABLE_ALL)", "extended": "ORT_ENABLE_EXTENDED"},
            "speedups": list(SPEEDUPS),
            "default_kinds": list(DEFAULT_KINDS),
            "default_rank_multiple": DEFAULT_RANK_MULTIPLE,
            "measure_target_share": MEASURE_SHARE,
            "numpy": np.__version__,
            "blas_threads": {v: os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        },
        "models": {},
        "runs": [],
        "measure_policy": [],
    }
    if result["machine"]["load_average"] and result["machine"]["load_average"][0] > 0.5:
        log(f"warning: load average {result['machine']['load_average'][0]:.2f}: other work is running, timings will be noisy")
    for name in models:
        bench_model(name, args.quick, timing, args.parts, result, out)
    result["seconds"] = time.perf_counter() - start
    result["machine_after"] = {"load_average": machine_info()["load_average"]}
    final = serializable(result)
    write_json(out, final)
    print(tables(final))
    print()
    print(f"Wrote {out} ({result['seconds'] / 60:.1f} min).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
