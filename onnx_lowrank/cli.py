"""``onnx-lowrank``: a thin command line over :mod:`onnx_lowrank.api` and :mod:`onnx_lowrank.verify`.

It parses, calls the library and prints. Bad input ends in one line on stderr
and exit code 2; outputs that differ beyond tolerance in ``verify`` exit 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from ._threads import default_threads
from .api import DEFAULT_KINDS, DEFAULT_RANK_MULTIPLE, DEFAULT_SPEEDUP, decompose, inspect
from .errors import LowRankError
from .latency_plan import BY_CHOICES, CHECK_RUNS
from .model_io import load_model_with_layout, plain_mode, save_model
from .report import InspectLayer, LayerReport, Report, unsized_warning
from .timing_cache import CACHE_ENV
from .verify import KernelTimes, VerifyResult, verify

__all__ = ["main"]

PROG = "onnx-lowrank"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise LowRankError(message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _energy(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _speedup(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1.0):
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}")
    return value


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _add_input_shape(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str) -> None:
    parser.add_argument("--input-shape", type=_input_shape, action="append", default=[], metavar="NAME=1,3,224,224", help=help_text)


def _input_shape(text: str) -> tuple[str, list[int]]:
    name, sep, dims = text.rpartition("=")
    try:
        shape = [int(d) for d in dims.replace("x", ",").split(",")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,... with whole dims >= 1, got {text!r}")
    return name, shape


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Speed up ONNX CNNs by low-rank decomposition of their convolutions (Tai et al., ICLR 2016).")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser(
        "decompose", help="write a decomposed copy of a model", description="Replace each Conv by a vertical and a horizontal conv."
    )
    d.add_argument("input", help="the ONNX model to read (never modified)")
    d.add_argument("output", help="where to write the decomposed model (written atomically)")

    policy = d.add_argument_group(
        "policy", "which layers are decomposed and at which ranks (one policy; --speedup combines with --params-ratio)"
    )
    # the policies exclude each other except --speedup with --params-ratio; the library says which clash
    policy.add_argument("--rank", type=_positive_int, help="every layer at this rank (clipped to its full rank)")
    policy.add_argument(
        "--energy", type=_energy, help="per layer, the least rank keeping this share of the squared singular values, in (0, 1]"
    )
    policy.add_argument(
        "--speedup",
        type=_speedup,
        help=f"this much faster with the least error: by latency measured here, or by MACs (see --by) "
        f"(default when no policy is given: {DEFAULT_SPEEDUP:g})",
    )
    policy.add_argument(
        "--params-ratio", type=_energy, metavar="R", help="parameters after/before at most R, in (0, 1]; combines with --speedup"
    )
    policy.add_argument(
        "--ranks", metavar="FILE.json", help='JSON object: node name -> rank (or {"rank": K, "kind": "channel"}); others are left alone'
    )
    policy.add_argument(
        "--kinds", default=",".join(DEFAULT_KINDS), help=f"splits to offer, comma-separated (default {','.join(DEFAULT_KINDS)})"
    )
    policy.add_argument("--include", metavar="REGEX", help="only layers whose node name matches")
    policy.add_argument("--exclude", metavar="REGEX", help="leave layers whose node name matches")
    policy.add_argument(
        "--force", action="store_true", help="decompose eligible layers even where the pair costs more MACs (full rank: an exactness check)"
    )
    policy.add_argument(
        "--rank-multiple",
        type=_positive_int,
        metavar="M",
        help=f"round ranks up to a multiple of M (default {DEFAULT_RANK_MULTIPLE} for --speedup/--params-ratio, "
        "measured fastest in onnxruntime; 1 for --rank/--energy/--ranks)",
    )
    policy.add_argument("--no-fold-bn", action="store_true", help="keep BatchNormalization nodes (default: fold them into the Conv first)")
    _add_input_shape(
        policy,
        "the input size to plan by: MACs are those of one onnxruntime run on an input of this shape (and the --verify inputs)",
    )
    policy.add_argument(
        "--allow-unknown-shapes",
        action="store_true",
        help="plan even when an input has a symbolic dim and no --input-shape: layers of unknown size count at one output pixel",
    )

    calibration = d.add_argument_group("calibration", "data-aware ranks and factors from the model's own inputs")
    calibration.add_argument(
        "--calibration",
        metavar="FILE.npz|FOLDER",
        help="calibration inputs (arrays keyed by input name, samples on axis 0; or a folder of <input>.npy): "
        "sensitivity-aware ranks for --speedup and a closed-form refit of each decomposed layer",
    )
    calibration.add_argument(
        "--refit", action=argparse.BooleanOptionalAction, help="with --calibration: refit each decomposed layer (default: on)"
    )
    calibration.add_argument(
        "--sensitivity",
        action=argparse.BooleanOptionalAction,
        help="with --calibration and --speedup: allocate ranks by measured damage to the outputs (default: on)",
    )

    speed = d.add_argument_group(
        "speed",
        "latency measured in onnxruntime on this machine; the result is always timed against the original "
        "(both ratios, MACs and measured, are printed)",
    )
    speed.add_argument(
        "--by",
        choices=BY_CHOICES,
        help="what --speedup plans by: 'latency' times each layer's splits in onnxruntime on this machine and re-times "
        "the whole model until it is S times faster here (default whenever every layer has a known size on the "
        "reference input); 'macs' cuts the MAC count S times, a portable plan: use it to convert here and deploy "
        "on other hardware (default when the model cannot be timed)",
    )
    speed.add_argument("--measure", action="store_true", help="the same as --by latency (kept for compatibility)")
    speed.add_argument(
        "--threads",
        type=_positive_int,
        help=f"onnxruntime intra-op threads to time and plan with, and for --verify (default: onnxruntime's default here, "
        f"the physical cores: {default_threads()}); plans for 1 and for 2+ threads differ",
    )
    speed.add_argument(
        "--no-timing-cache",
        action="store_true",
        help=f"time every layer afresh and keep no timings (default: layer timings are kept per CPU, onnxruntime "
        f"version and thread count in ${CACHE_ENV}, else $XDG_CACHE_HOME/onnx-lowrank or ~/.cache/onnx-lowrank)",
    )
    speed.add_argument(
        "--check-runs",
        type=_non_negative_int,
        metavar="N",
        help=f"interleaved runs of the final timing of a plan not made by latency against the original (default {CHECK_RUNS}; 0 skips it)",
    )

    output = d.add_argument_group("output", "what is written besides the model")
    output.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.data beside the model")
    output.add_argument("--report", metavar="FILE.json", help="write the per-layer report as JSON")
    output.add_argument("--quiet", action="store_true", help="print only the totals")

    checks = d.add_argument_group("checks", "compare the result with the original in onnxruntime")
    checks.add_argument("--verify", action="store_true", help="run `verify` on the result")
    checks.add_argument("--verify-inputs", metavar="FILE.npz", help="inputs (and `labels`) for --verify, which it implies")

    i = sub.add_parser("inspect", help="per Conv: shape, MACs and the ranks that keep 90/99/99.9%% of the energy")
    i.add_argument("input")
    i.add_argument("--json", action="store_true", help="print JSON")
    _add_input_shape(i, "fix an input's shape for the MAC model")

    v = sub.add_parser("verify", help="compare a candidate with the original in onnxruntime")
    v.add_argument("original")
    v.add_argument("candidate")
    data = v.add_argument_group("inputs", "what both models are run on")
    data.add_argument("--inputs", metavar="FILE.npz", help="inputs keyed by input name (first axis: samples); `labels` gives accuracy")
    _add_input_shape(data, "shape of the random input NAME where the model leaves dims symbolic (default: 1)")
    data.add_argument("--providers", help="comma-separated execution providers (default CPUExecutionProvider)")
    checks_v = v.add_argument_group("checks", "when the outputs count as matching")
    checks_v.add_argument("--rtol", type=_tolerance, default=1e-3, help="relative tolerance (default 1e-3)")
    checks_v.add_argument("--atol", type=_tolerance, default=1e-4, help="absolute tolerance (default 1e-4)")
    speed_v = v.add_argument_group("speed", "latency of both models, interleaved")
    speed_v.add_argument("--runs", type=int, default=20, help="timed runs of each model, interleaved (default 20; 0 skips timing)")
    speed_v.add_argument("--threads", type=_positive_int, help="onnxruntime intra-op threads")
    speed_v.add_argument("--profile", action="store_true", help="also time each operator type of both models (onnxruntime's profiler)")
    v.add_argument("--json", action="store_true", help="print JSON")
    return parser


# --------------------------------------------------------------------------- printing


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=False)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    return "\n".join(lines)


def _shape(weight_shape: list[int] | None, groups: int | None) -> str:
    text = "x".join(map(str, weight_shape)) if weight_shape else "?"
    return text + (f" g{groups}" if groups and groups > 1 else "")


def format_report(report: Report, quiet: bool = False) -> str:
    out = []
    if not quiet:
        rows = []
        for layer in report.layers:
            cells = [layer.node, layer.op_type, _shape(layer.weight_shape, layer.groups)]
            macs = [_count(layer.macs_before), _count(layer.macs_after)] if layer.counted else ["?", "?"]
            note = _layer_note(layer) if layer.ran is not False else ""  # the reason already says where it is
            if layer.decomposed:
                cells += [str(layer.kind), f"{layer.rank}/{layer.full_rank}", f"{layer.relative_error:.4f}"]
                cells += [*macs, f"{layer.mac_ratio:.2f}x" if layer.counted and layer.macs_after else "-", note]
            else:
                skipped = f"skipped: {layer.reason}" + (f"; {note}" if note else "")
                cells += ["-", "-", "-", *macs, "1.00x" if layer.counted and layer.macs_before else "-", skipped]
            rows.append(cells)
        out.append(_table(rows, ["node", "op", "weight", "kind", "rank", "rel.err", "MACs", "MACs after", "ratio", "note"]))
    out += _latency_lines(report.latency)
    if report.calibration:
        cal = report.calibration
        line = f"calibration: {cal.get('samples', 0)} samples; ranks by {report.policy.get('allocation', 'kernel error')}"
        if "sensitivity" in cal:
            line += f" (measured in {cal['sensitivity']['seconds']:.1f} s)"
        if "refit" in cal:
            refit = cal["refit"]
            done = sum(1 for layer in refit["layers"] if layer["refit"])
            line += f"; refit {done} of {len(refit['layers'])} layers in {refit['seconds']:.1f} s"
        out.append(line)
    out += _sizes_lines(report)
    out += [f"warning: {warning}" for warning in report.warnings]
    if report.folded_batchnorms:
        out.append(f"folded {len(report.folded_batchnorms)} BatchNormalization nodes into their Conv")
    if report.kept_batchnorms:
        by_reason: dict[str, list[str]] = {}
        for bn, reason in report.kept_batchnorms.items():
            by_reason.setdefault(reason, []).append(bn)
        kept = "; ".join(f"{len(bns)} {reason} ({', '.join(bns[:3])}{', …' if len(bns) > 3 else ''})" for reason, bns in by_reason.items())
        out.append(f"kept {len(report.kept_batchnorms)} BatchNormalization nodes unfolded: {kept}")
    if report.macs_after:
        totals = f"MACs {_count(report.macs_before)} -> {_count(report.macs_after)} ({report.mac_ratio:.2f}x fewer"
        totals += ", counting layers of unknown size at one output pixel)" if not report.macs_exact else ")"
    else:
        totals = "MACs not known (no layer's size is known)"
    idle = sum(1 for layer in report.layers if layer.ran is False)
    unsized = sum(1 for layer in report.layers if not layer.counted and layer.ran is not False)
    if idle:
        totals += f", {idle} layer(s) that did not run on the reference input not counted"
    if unsized and report.macs_after:
        totals += f", {unsized} layer(s) of unknown size not counted"
    if report.notice is not None:  # no ratio of nothing over nothing
        out.append(report.notice)
        return "\n".join(out)
    out.append(
        f"decomposed {len(report.decomposed)} of {len(report.layers)} layers; {totals}; parameters {_count(report.params_before)} -> "
        f"{_count(report.params_after)} ({report.params_after / max(report.params_before, 1):.2f}x); {report.seconds:.2f} s"
    )
    return "\n".join(out)


def _latency_lines(lat: dict[str, Any]) -> list[str]:
    """What the plan was made by and the measured ratio, with the thread count and the number of runs."""
    if not lat:
        return []
    if lat.get("by") == "latency":
        cache = lat.get("timing_cache") or {}
        from_cache = f", {cache['hits']} from the timing cache" if cache.get("hits") else ""
        lines = [
            f"planned by latency measured here: {lat['original_ms']:.3f} ms -> {lat['candidate_ms']:.3f} ms, "
            f"{lat['measured_speedup']:.2f}x faster in onnxruntime ({lat['threads']} thread(s), median of {lat['runs']} "
            f"interleaved runs; predicted {lat['predicted_speedup']:.2f}x, target {lat['target']:g}x, {len(lat['rounds'])} "
            f"round(s), {lat['layers_timed']} layer models timed{from_cache})"
        ]
        if not lat["met"]:
            lines.append(
                f"warning: measured {lat['measured_speedup']:.2f}x is below the target {lat['target']:g}x; the fastest round is kept"
            )
        return lines
    lines = []
    if lat.get("by") == "macs":
        lines.append(
            f"planned by MACs: {lat['why_macs']}" if lat.get("why_macs") else "planned by MACs (--by macs): a plan for any hardware"
        )
    if "measured_speedup" in lat:
        lines.append(
            f"measured in onnxruntime ({lat['threads']} thread(s), median of {lat['runs']} interleaved runs): "
            f"{lat['original_ms']:.3f} ms -> {lat['candidate_ms']:.3f} ms, {lat['measured_speedup']:.2f}x faster"
        )
    elif lat.get("not_timed"):
        lines.append(f"not timed: {lat['not_timed']}")
    return lines


def _layer_note(layer: LayerReport) -> str:
    """Where a layer in a subgraph sits and how often it ran, for the table."""
    if layer.scope == "the main graph":
        return ""
    runs = f", ran {layer.executions}x" if layer.shape_known and layer.executions > 1 else ""
    return f"in {layer.scope}{runs}"


def _sizes_lines(report: Report) -> list[str]:
    """Where the sizes came from, and the MACs of each If/Loop/Scan subgraph on the reference input."""
    lines = []
    sizes = report.shapes
    if sizes.get("source") == "run":
        shown = ", ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in sizes.get("reference_input", {}).items())
        lines.append(f"sizes: from one onnxruntime run on {sizes.get('reference_from')} {shown} ({sizes.get('seconds', 0):.2f} s)")
    for flow in report.control_flow:
        parts = []
        for label, sub in flow["subgraphs"].items():
            if sub["ran"]:
                ratio = f", {sub['macs_before'] / sub['macs_after']:.2f}x" if sub["macs_after"] else ""
                parts.append(f"{label}: {_count(sub['macs_before'])} -> {_count(sub['macs_after'])} MACs{ratio}")
            else:
                parts.append(f"{label}: did not run ({sub['layers']} layer(s) left as they are)")
        runs = ", ".join(f"{k} {v}x" for k, v in flow["runs"].items())
        lines.append(f"{flow['op_type']} {flow['node']!r} ({runs} on the reference input; per-subgraph figures): {'; '.join(parts)}")
    return lines


def format_verify(result: VerifyResult, gate: bool = True) -> str:
    rows = []
    for o in result.outputs:
        rows.append(
            [
                o.name,
                "x".join(map(str, o.shape)),
                f"{o.max_abs:.3g}",
                f"{o.max_rel:.3g}",
                f"{o.mean_abs:.3g}",
                f"{o.p99_abs:.3g}",
                f"{o.relative_l2:.3g}",
                f"{o.cosine:.6f}",
                f"{o.required_atol:.3g}",
                *(["PASS" if o.passed else "FAIL"] if gate else []),
            ]
        )
    lines = [
        _table(
            rows,
            [
                "output",
                "shape",
                "max abs",
                "max rel",
                "mean abs",
                "p99 abs",
                "rel L2",
                "cosine",
                "req. atol",
                *([f"rtol={result.rtol:g} atol={result.atol:g}"] if gate else []),
            ],
        )
    ]
    for o in result.outputs:
        if o.top1_agreement is not None:
            line = f"{o.name}: top-1 agreement {o.top1_agreement:.2%} over {o.shape[0]} samples"
            if o.accuracy_original is not None and o.accuracy_candidate is not None:
                line += f"; accuracy original {o.accuracy_original:.2%}, candidate {o.accuracy_candidate:.2%}"
            lines.append(line)
    if result.latency_ratio is not None:
        lines.append(
            f"latency (median of {result.runs} interleaved runs, {', '.join(result.providers)}): original {result.original_ms:.3f} ms, "
            f"candidate {result.candidate_ms:.3f} ms, {result.latency_ratio:.2f}x faster"
        )
    if result.kernels:
        lines.append(format_kernels(result.kernels["original"], result.kernels["candidate"]))
    if gate:
        lines.append("outputs match" if result.passed else "outputs DIFFER beyond tolerance")
    return "\n".join(lines)


def format_kernels(original: dict[str, float], candidate: dict[str, float]) -> str:
    """Per operator type and per class: kernel ms of both models (onnxruntime's profiler) and their ratio."""

    def ratio(before: float, after: float) -> str:
        return f"{before / after:.2f}x" if after > 0 else "-"

    rows = [
        [op, f"{original.get(op, 0.0):.3f}", f"{candidate.get(op, 0.0):.3f}", ratio(original.get(op, 0.0), candidate.get(op, 0.0))]
        for op in sorted(set(original) | set(candidate), key=lambda op: -max(original.get(op, 0.0), candidate.get(op, 0.0)))
    ]
    before, after = KernelTimes(original), KernelTimes(candidate)
    for label, attr in (
        ("conv kernels", "conv_ms"),
        ("fully connected kernels", "fc_ms"),
        ("other kernels", "other_ms"),
        ("all", "total_ms"),
    ):
        b, a = getattr(before, attr), getattr(after, attr)
        rows.append([label, f"{b:.3f}", f"{a:.3f}", ratio(b, a)])
    return "kernel time per run (onnxruntime profiler, median per node):\n" + _table(
        rows, ["operator", "original ms", "candidate ms", "ratio"]
    )


def format_inspect(layers: list[InspectLayer]) -> str:
    rows = []
    for layer in layers:
        cells = [layer.node, layer.op_type, _shape(layer.weight_shape, layer.groups), _count(layer.macs)]
        if layer.eligible:
            cells.append(str(layer.kind))
            for e in ("0.9", "0.99", "0.999"):
                r, speedup = layer.energy_ranks[e]
                cells.append(f"{int(r)}/{layer.full_rank} ({speedup:.2f}x)")
            cells.append("")
        else:
            cells += ["-", "-", "-", "-", f"skipped: {layer.reason}"]
        rows.append(cells)
    total = sum(layer.macs for layer in layers)
    table = _table(rows, ["node", "op", "weight", "MACs", "kind", "90% energy", "99% energy", "99.9% energy", "note"])
    unsized = [layer for layer in layers if not layer.shape_known]
    if unsized:
        table += f"\nwarning: {unsized_warning([layer.node for layer in unsized], unsized[0].size_note or 'size unknown')}"
    return table + f"\n{len(layers)} layers, {_count(total)} MACs"


# --------------------------------------------------------------------------- commands


def _write_text_atomic(path: Path, text: str) -> None:
    if not path.parent.is_dir():
        raise LowRankError(f"{path}: folder {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        plain_mode(Path(tmp))  # mkstemp makes the file 0600; a report is a plain file others may read
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise LowRankError(f"{path}: cannot write ({exc.strerror or exc})") from None


def _read_ranks(path: str) -> dict[str, int]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise LowRankError(f"{p}: no such ranks file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowRankError(f"{p}: not a JSON ranks file ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise LowRankError(f"{p}: ranks file must be a non-empty JSON object of node name -> rank")
    return data


def _decompose(args: argparse.Namespace) -> int:
    src, dst = Path(args.input), Path(args.output)
    if not dst.parent.is_dir():  # fail before any work
        raise LowRankError(f"{dst}: output folder {dst.parent} does not exist")
    if src.exists() and dst.exists() and src.resolve() == dst.resolve():
        raise LowRankError(f"{dst}: output would overwrite the input model")
    if args.report and not Path(args.report).parent.is_dir():
        raise LowRankError(f"{args.report}: report folder does not exist")
    if args.report and Path(args.report).is_dir():
        raise LowRankError(f"{args.report}: report path is a directory")
    protected = {src.resolve(): "input model", dst.resolve(): "output model"}
    if args.ranks:
        protected.setdefault(Path(args.ranks).resolve(), "ranks file")
    if args.report and Path(args.report).resolve() in protected:  # the report must not replace a file this run reads or writes
        raise LowRankError(f"{args.report}: the report would overwrite the {protected[Path(args.report).resolve()]}")
    if args.verify_inputs and not Path(args.verify_inputs).is_file():
        raise LowRankError(f"{args.verify_inputs}: no such inputs file")
    ranks = _read_ranks(args.ranks) if args.ranks else None
    start = time.perf_counter()
    model, was_external = load_model_with_layout(src)
    external = args.external_data or was_external
    _progress(args, f"loaded {src} in {time.perf_counter() - start:.2f} s")
    bar = _ProgressBar(not args.quiet)
    try:
        new, report = decompose(
            model,
            rank=args.rank,
            energy=args.energy,
            speedup=args.speedup,
            params_ratio=args.params_ratio,
            ranks=ranks,
            kinds=[k.strip() for k in args.kinds.split(",") if k.strip()],
            include=args.include,
            exclude=args.exclude,
            force=args.force,
            input_shapes=dict(args.input_shape),
            allow_unknown_shapes=args.allow_unknown_shapes,
            rank_multiple=args.rank_multiple,
            fold_bn=not args.no_fold_bn,
            progress=bar,
            measure=args.measure,
            by=args.by,
            threads=args.threads,
            timing_cache=not args.no_timing_cache,
            check_runs=args.check_runs,
            calibration=args.calibration,
            refit=args.refit,
            sensitivity=args.sensitivity,
            inplace=True,  # the loaded copy is ours: rewriting it saves a copy of the weights
        )
    finally:
        bar.close()
    del model
    save_model(new, dst, external_data=external, inputs=(src,))
    report.seconds = time.perf_counter() - start
    if args.report:
        _write_text_atomic(Path(args.report), report.to_json() + "\n")
    print(format_report(report, args.quiet))
    print(f"wrote {dst}" + (f" (+ {dst.name}.data)" if external else ""))
    if args.verify or args.verify_inputs:
        del new
        result = verify(src, dst, inputs=args.verify_inputs, threads=args.threads, input_shapes=dict(args.input_shape))
        # a low-rank model approximates by design: report the error, leave gating to `verify --rtol/--atol`
        print(format_verify(result, gate=False))
    return 0


def _progress(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False) and sys.stderr.isatty():
        print(message, file=sys.stderr)


class _ProgressBar:
    """A bar on stderr for conversions that take more than a moment; silent when stderr is not a terminal.

    tqdm draws it when installed; otherwise one line is rewritten in place.
    """

    DELAY = 1.0  # seconds before anything is drawn: quick conversions stay quiet

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.bar: Any = None
        self.drawn = False

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled or time.perf_counter() - self.start < self.DELAY:
            return
        if self.bar is None:
            try:
                from tqdm import tqdm  # optional; imported only when a bar is due

                self.bar = tqdm(total=total, desc="analysing layers", unit="layer", file=sys.stderr, leave=False)
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.n = done
            self.bar.set_postfix_str(name[-30:], refresh=True)
        else:
            print(f"\ranalysing layers {done}/{total} {name[-40:]:<40}", end="", file=sys.stderr, flush=True)
            self.drawn = True

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        elif self.drawn:
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)


def _inspect(args: argparse.Namespace) -> int:
    layers = inspect(args.input, input_shapes=dict(args.input_shape))
    if args.json:
        from dataclasses import asdict

        print(json.dumps([asdict(layer) for layer in layers], indent=2))
    else:
        print(format_inspect(layers))
    return 0


def _verify(args: argparse.Namespace) -> int:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if args.runs < 0:
        raise LowRankError(f"--runs must be >= 0, got {args.runs}")
    if args.profile and args.runs == 0:
        raise LowRankError("--profile times the models: it needs --runs > 0")
    result = verify(
        args.original,
        args.candidate,
        inputs=args.inputs,
        providers=providers,
        rtol=args.rtol,
        atol=args.atol,
        runs=args.runs,
        threads=args.threads,
        profile=args.profile,
        input_shapes=dict(args.input_shape),
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_verify(result))
    return 0 if result.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        handler = {"decompose": _decompose, "inspect": _inspect, "verify": _verify}[args.command]
        return handler(args)
    except LowRankError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader (head, less) went away: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"{PROG}: error: out of memory", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug of ours: one line unless asked for the traceback
        if os.environ.get("ONNX_LOWRANK_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc} (set ONNX_LOWRANK_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
