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
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from ._threads import default_threads
from .api import DEFAULT_KINDS, DEFAULT_RANK_MULTIPLE, DEFAULT_SPEEDUP, decompose, inspect
from .data_io import model_input_specs
from .errors import LowRankError
from .latency_plan import BY_CHOICES, CHECK_RUNS
from .mobile import EP_NAMES, MobileCoverage
from .model_io import StagedOutputs, load_model_files, save_model
from .report import InspectLayer, LayerReport, Report, unsized_warning
from .sweep import DEFAULT_SPEEDUPS, SweepResult, parse_speedups
from .timing_cache import CACHE_ENV
from .verify import KernelTimes, VerifyResult, check_random_inputs, load_inputs, verify

__all__ = ["main"]

PROG = "onnx-lowrank"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise LowRankError(message)


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


_positive_int = _whole_number(1)
_runs = _whole_number(0)


def _add_calibration_tuning(group: Any) -> None:
    """The calibration passes' knobs, shared by decompose and sweep."""
    group.add_argument(
        "--positions",
        type=_whole_number(0),
        metavar="N",
        help="with --calibration: output positions per sample and layer, drawn at random, that the statistics and the "
        "refit use (default 256; 0: all of them, slower on large inputs)",
    )
    group.add_argument(
        "--calibration-batch",
        type=_whole_number(1),
        metavar="N",
        help="with --calibration: samples per onnxruntime run at most (default 64; a pass sizes its batches to its memory budget)",
    )


def _calibration_options(args: argparse.Namespace) -> Any:
    """The :class:`~onnx_lowrank.calibration.CalibrationOptions` the flags ask for (None: the defaults)."""
    if args.positions is None and args.calibration_batch is None:
        return None
    from .calibration import CalibrationOptions

    options = CalibrationOptions()
    if args.positions is not None:
        options = replace(options, positions=args.positions or None)
    if args.calibration_batch is not None:
        options = replace(options, batch_size=args.calibration_batch)
    return options


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
    policy.add_argument(
        "--pad-ranks",
        action="store_true",
        help="with --rank/--energy/--ranks: store a rank that does not fill whole channel blocks of onnxruntime's blocked "
        "CPU convolution here (8, or 16 with AVX-512) with zero filters up to the next block: more MACs, faster here",
    )
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
        "every factor minimises its layer's output error on them, ranks minimise the predicted damage to the outputs, "
        "and each layer's second factor is refit to the original outputs",
    )
    calibration.add_argument(
        "--refit",
        action=argparse.BooleanOptionalAction,
        help="with --calibration: refit the second factor and bias of decomposed layers to the original outputs, "
        "in a few passes by depth (default: on)",
    )
    calibration.add_argument(
        "--sensitivity",
        action=argparse.BooleanOptionalAction,
        help="with --calibration and --speedup/--params-ratio: weigh each layer's output error by its gain to the model's "
        "outputs, measured once on a few samples (default: on)",
    )
    _add_calibration_tuning(calibration)

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
    output.add_argument(
        "--ort",
        action="store_true",
        help="also write OUTPUT as NAME.ort (onnxruntime's ORT format, which minimal and mobile builds load) and "
        "NAME.required_operators.config for a reduced build, with onnxruntime's converter",
    )
    output.add_argument(
        "--html",
        metavar="FILE.html",
        help="also write a self-contained HTML report: spectra and chosen ranks, MACs per layer, output error "
        "(with --verify: latency and kernel time per operator type); plots need onnx-lowrank[plots]",
    )

    mobile = d.add_argument_group("mobile", "mobile execution providers and INT8 (onnxruntime's own tools)")
    mobile.add_argument(
        "--mobile-safe",
        action="store_true",
        help="keep whole every layer whose pair NNAPI or CoreML would refuse where they take the original (it would add a partition)",
    )
    mobile.add_argument(
        "--quantize",
        choices=("dynamic", "static"),
        help="after the low-rank step, quantize to INT8 with onnxruntime.quantization: dynamic, or static QDQ calibrated on --calibration",
    )

    checks = d.add_argument_group("checks", "compare the result with the original in onnxruntime")
    checks.add_argument("--verify", action="store_true", help="run `verify` on the result")
    checks.add_argument("--verify-inputs", metavar="FILE.npz", help="inputs (and `labels`) for --verify, which it implies")

    i = sub.add_parser("inspect", help="per Conv: shape, MACs and the ranks that keep 90/99/99.9%% of the energy")
    i.add_argument("input")
    i.add_argument("--json", action="store_true", help="print JSON")
    _add_input_shape(i, "fix an input's shape for the MAC model (and the --mobile check)")
    i.add_argument("--mobile", action="store_true", help="also estimate NNAPI/CoreML coverage with onnxruntime's mobile usability checker")

    v = sub.add_parser("verify", help="compare a candidate with the original in onnxruntime")
    v.add_argument("original", help="an .onnx or .ort model")
    v.add_argument("candidate", help="an .onnx or .ort model")
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
    mobile_v = v.add_argument_group("mobile", "mobile execution providers this onnxruntime lacks")
    mobile_v.add_argument(
        "--mobile",
        action="store_true",
        help="also estimate NNAPI/CoreML coverage of both models side by side (onnxruntime's mobile usability checker)",
    )
    v.add_argument("--json", action="store_true", help="print JSON")
    _add_sweep(sub)
    return parser


def _speedups(text: str) -> list[float]:
    try:
        return parse_speedups(text)
    except LowRankError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--speedups: ")) from None


def _add_sweep(sub: Any) -> None:
    s = sub.add_parser(
        "sweep",
        help="convert at several --speedup targets and measure each against the original",
        description="Convert at each target (one shared factorization) and compare each result with the original in onnxruntime.",
    )
    s.add_argument("input", help="the ONNX model to read (never modified)")
    policy = s.add_argument_group("policy", "the targets, and which layers are decomposed")
    policy.add_argument(
        "--speedups",
        type=_speedups,
        default=list(DEFAULT_SPEEDUPS),
        metavar="S1,S2,...",
        help=f"--speedup targets, numbers >= 1 (default {','.join(f'{t:g}' for t in DEFAULT_SPEEDUPS)})",
    )
    policy.add_argument(
        "--kinds", default=",".join(DEFAULT_KINDS), help=f"splits to offer, comma-separated (default {','.join(DEFAULT_KINDS)})"
    )
    policy.add_argument("--include", metavar="REGEX", help="only layers whose node name matches")
    policy.add_argument("--exclude", metavar="REGEX", help="leave layers whose node name matches")
    policy.add_argument(
        "--rank-multiple", type=_positive_int, metavar="M", help=f"round ranks up to a multiple of M (default {DEFAULT_RANK_MULTIPLE})"
    )
    policy.add_argument("--no-fold-bn", action="store_true", help="keep BatchNormalization nodes (default: fold them into the Conv first)")
    _add_input_shape(
        policy, "the input size to plan by (MACs of one onnxruntime run on an input of this shape) and of the random eval inputs"
    )
    policy.add_argument(
        "--allow-unknown-shapes",
        action="store_true",
        help="plan even when an input has a symbolic dim and no --input-shape: layers of unknown size count at one output pixel",
    )
    calibration = s.add_argument_group("calibration", "data-aware ranks and factors; the statistics are measured once for all targets")
    calibration.add_argument("--calibration", metavar="FILE.npz|FOLDER", help="calibration inputs, as for decompose")
    calibration.add_argument(
        "--refit", action=argparse.BooleanOptionalAction, help="with --calibration: refit each decomposed layer (default: on)"
    )
    calibration.add_argument(
        "--sensitivity",
        action=argparse.BooleanOptionalAction,
        help="with --calibration: weigh each layer's output error by its gain to the outputs (default: on)",
    )
    _add_calibration_tuning(calibration)
    speed = s.add_argument_group("speed", "latency measured in onnxruntime on this machine, original and converted interleaved")
    speed.add_argument(
        "--measure", action="store_true", help="choose ranks by latency timed in onnxruntime, not MACs (as decompose --measure)"
    )
    speed.add_argument("--threads", type=_positive_int, default=1, help="onnxruntime intra-op threads (default 1)")
    speed.add_argument(
        "--runs", type=_runs, default=20, help="timed runs of each model per target, interleaved (default 20; 0 skips timing)"
    )
    speed.add_argument("--profile", action="store_true", help="also time each operator type (onnxruntime's profiler)")
    checks = s.add_argument_group("checks", "what each converted model is compared on")
    checks.add_argument(
        "--eval-inputs",
        metavar="FILE.npz",
        help="inputs keyed by input name (samples on axis 0), `labels` for accuracy (default: random inputs)",
    )
    output = s.add_argument_group("output", "what is printed and written (no model unless --save-dir)")
    output.add_argument("--json", action="store_true", help="print the rows as JSON")
    output.add_argument("--html", metavar="FILE.html", help="write a self-contained HTML report with the trade-off plots")
    output.add_argument("--save-dir", metavar="DIR", help="write each converted model there as <model>-x<S>.onnx")


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
        quantized = bool(report.quantization)
        for layer in report.layers:
            cells = [layer.node, layer.op_type, _shape(layer.weight_shape, layer.groups)]
            macs = [_count(layer.macs_before), _count(layer.macs_after)] if layer.counted else ["?", "?"]
            note = _layer_note(layer) if layer.ran is not False else ""  # the reason already says where it is
            if layer.decomposed:
                cells += [str(layer.kind), f"{layer.rank}/{layer.full_rank}", f"{layer.relative_error:.4f}"]
                cells += [*macs, f"{layer.mac_ratio:.2f}x" if layer.counted and layer.macs_after else "-"]
                cells += [layer.quantized or "-", note] if quantized else [note]
            else:
                skipped = f"skipped: {layer.reason}" + (f"; {note}" if note else "")
                cells += ["-", "-", "-", *macs, "1.00x" if layer.counted and layer.macs_before else "-"]
                cells += [layer.quantized or "-"] if quantized else []
                cells.append(skipped)
            rows.append(cells)
        header = ["node", "op", "weight", "kind", "rank", "rel.err", "MACs", "MACs after", "ratio"]
        out.append(_table(rows, [*header, *(["int8"] if quantized else []), "note"]))
    out += _latency_lines(report.latency)
    if report.calibration:
        cal = report.calibration
        line = f"calibration: {cal.get('samples', 0)} samples; ranks by {report.policy.get('allocation', 'kernel error')}"
        if "statistics_seconds" in cal:
            line += f"; statistics {cal['statistics_seconds']:.1f} s, data-aware factors {cal.get('factor_seconds', 0.0):.1f} s"
        if "sensitivity" in cal:
            sens = cal["sensitivity"]
            line += f"; gains on {sens['samples']} sample(s) in {sens['seconds']:.1f} s"
        if "refit" in cal:
            refit = cal["refit"]
            done = sum(1 for layer in refit["layers"] if layer["refit"])
            line += f"; refit {done} of {len(refit['layers'])} layers in {refit.get('stages', 0)} stage(s), {refit['seconds']:.1f} s"
        out.append(line)
        missing = cal.get("without_statistics") or {}
        if missing:
            shown = "; ".join(f"{node}: {why}" for node, why in list(missing.items())[:3])
            out.append(f"calibration: {len(missing)} layer(s) kept data-free factors ({shown}{'; …' if len(missing) > 3 else ''})")
    out += _sizes_lines(report)
    if report.mobile:
        out.append(format_mobile_summary(report.mobile))
    if report.quantization:
        quant = report.quantization
        line = f"quantized to INT8 ({quant['mode']}, {quant['format']}, int8 weights"
        line += f"{' per channel' if quant['per_channel'] else ''}{', 7-bit' if quant['reduce_range'] else ''}, activations "
        line += f"{quant['activation_type']}): {quant['quantized_nodes']} nodes in {quant['seconds']:.1f} s"
        if quant.get("samples"):
            line += f", ranges from {quant['samples']} calibration samples"
        out.append(line)
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
    """Where a layer in a subgraph sits and how often it ran, and a rank stored wider with zero filters, for the table."""
    padded = f"stored as {layer.stored_rank} channels (zero filters fill the kernel block)" if layer.stored_rank else ""
    if layer.scope == "the main graph":
        return padded
    runs = f", ran {layer.executions}x" if layer.shape_known and layer.executions > 1 else ""
    return f"in {layer.scope}{runs}" + (f"; {padded}" if padded else "")


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
        if o.nonfinite_original or o.nonfinite_candidate:
            agreement = "at the same positions" if not o.nonfinite_mismatch else f"{o.nonfinite_mismatch} positions differ in finiteness"
            lines.append(
                f"{o.name}: non-finite values (NaN/Inf): {o.nonfinite_original} in the original, {o.nonfinite_candidate} in the "
                f"candidate, {agreement}; the statistics are over the values finite in both"
            )
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


def format_mobile_summary(mobile: dict[str, Any]) -> str:
    """Per EP: partitions of the original and the decomposed model; the layers kept whole; the nodes that split."""
    parts, splits = [], []
    for key, name in EP_NAMES.items():
        before, after = mobile["original"][key], mobile["candidate"][key]
        b = before.get("if_shapes_fixed", before)["partitions"]
        a = after.get("if_shapes_fixed", after)["partitions"]
        parts.append(f"{name} {b} -> {a}")
        nodes = after["splitting_nodes"]
        if nodes:
            shown = ", ".join(f"{n['op']} {n['node']}" for n in nodes[:3]) + (", …" if len(nodes) > 3 else "")
            splits.append(f"{name} at {shown}")
    kept = mobile.get("kept_whole", {})
    line = f"mobile partitions (onnxruntime's checker): {', '.join(parts)}; {len(kept)} layer(s) kept whole by --mobile-safe"
    return line + (f"\nmobile partitions split (result): {'; '.join(splits)}" if splits else "")


def format_mobile(original: MobileCoverage, candidate: MobileCoverage | None = None) -> str:
    """Coverage per mobile EP (onnxruntime's usability checker); with ``candidate``, original and candidate side by side."""
    sides = [("original", original)] + ([("candidate", candidate)] if candidate is not None else [])
    dynamic = bool(original.dynamic_inputs) or (candidate is not None and bool(candidate.dynamic_inputs))
    header = ["EP"]
    for label, _ in sides:
        prefix = f"{label} " if candidate is not None else ""
        header += [f"{prefix}partitions", f"{prefix}nodes"] + ([f"{prefix}if shapes fixed"] if dynamic else [])
    header.append("unsupported ops")
    rows = []
    for key, name in EP_NAMES.items():
        row = [name]
        ops: list[str] = []
        for _, cov in sides:
            ep = cov.eps[key]
            row += [str(ep.partitions), f"{ep.supported_nodes}/{ep.total_nodes}"]
            if dynamic:
                fixed = ep.if_shapes_fixed
                row.append(f"{fixed['partitions']}, {fixed['supported_nodes']}/{fixed['total_nodes']}" if fixed else "-")
            ops += [op for op in ep.unsupported_ops if op not in ops]
        row.append(", ".join(op.removeprefix("ai.onnx:") for op in ops) or "-")
        rows.append(row)
    lines = ["mobile execution providers (onnxruntime's mobile usability checker; partitions, nodes supported/total):"]
    lines.append(_table(rows, header))
    for label, cov in sides:
        for key, name in EP_NAMES.items():
            ep = cov.eps[key]
            where = f"{label}, {name}" if candidate is not None else name
            if ep.splitting_nodes:
                shown = "; ".join(f"{n['op']} {n['node']} ({n['reason']})" for n in ep.splitting_nodes[:5])
                more = f"; and {len(ep.splitting_nodes) - 5} more" if len(ep.splitting_nodes) > 5 else ""
                lines.append(f"{where}: partitions split at {shown}{more}")
            if ep.refused_nodes:
                shown = "; ".join(f"{n['op']} {n['node']} ({n['reason']})" for n in ep.refused_nodes[:5])
                lines.append(f"{where}: the EP refuses {shown}")
    if dynamic:
        names = sorted(set(original.dynamic_inputs) | set(candidate.dynamic_inputs if candidate is not None else []))
        lines.append(
            f"inputs of dynamic shape ({', '.join(names)}): NNAPI and the checker take fixed shapes only; 'if shapes fixed' "
            "counts as if they were (--input-shape NAME=D1,D2,... fixes them)"
        )
    lines.append("an estimate by operator type, shape and (for Conv) the EP builders' limits; no mobile EP runs on this machine")
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands


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
    # what this run reads must not be replaced by what it writes
    protected: dict[str | os.PathLike[str], str] = {args.input: "input model"}
    for flag, what in ((args.ranks, "ranks file"), (args.verify_inputs, "inputs file"), (args.calibration, "calibration data")):
        if flag:
            protected.setdefault(flag, what)
    with StagedOutputs(protected) as outputs:  # on any failure, everything staged is removed
        return _decompose_into(args, outputs)


def _decompose_into(args: argparse.Namespace, outputs: StagedOutputs) -> int:
    """The conversion; its files are staged in ``outputs`` and appear together at the commit, before anything is printed."""
    src, dst = Path(args.input), Path(args.output)
    outputs.stage(dst, "output model")  # every destination is checked (and its staging folder made) before any work
    if args.report:
        outputs.stage(args.report, "report")
    if args.quantize == "static" and not args.calibration:
        raise LowRankError("--quantize static needs calibration data (--calibration FILE.npz|FOLDER)")
    ort_dst: Path | None = None
    if args.ort:
        from .mobile import ort_config_path, ort_path_for

        ort_dst = ort_path_for(dst)
        outputs.stage(ort_dst, "ORT model")
        outputs.stage(ort_config_path(ort_dst), "ORT required-operators config")
    if args.html:
        outputs.stage(args.html, "HTML report")
    _check_calibration_flags(args)
    ranks = _read_ranks(args.ranks) if args.ranks else None
    start = time.perf_counter()
    model, data_files = load_model_files(src)
    for data_file in data_files:
        outputs.protect(data_file, "external data of the input model")
    external = args.external_data or bool(data_files)
    _progress(args, f"loaded {src} in {time.perf_counter() - start:.2f} s")
    verify_data: dict[str, Any] | None = None
    if args.verify_inputs:  # read and checked against the model now, not after the conversion
        arrays, labels = load_inputs(args.verify_inputs, model_input_specs(model))
        verify_data = {**arrays, **({"labels": labels} if labels is not None else {})}
    elif args.verify:
        check_random_inputs(model, dict(args.input_shape))
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
            pad_ranks=args.pad_ranks,
            calibration=args.calibration,
            refit=args.refit,
            sensitivity=args.sensitivity,
            calibration_options=_calibration_options(args),
            inplace=True,  # the loaded copy is ours: rewriting it saves a copy of the weights
            mobile_safe=args.mobile_safe,
            quantize=args.quantize,
        )
    finally:
        bar.close()
    del model
    save_model(new, dst, external_data=external, outputs=outputs)
    ort_files = None
    if ort_dst is not None:
        ort_files = _stage_ort(new, ort_dst, outputs)
    report.seconds = time.perf_counter() - start
    if args.report:
        outputs.write_text(args.report, report.to_json() + "\n", "report")
    result = None
    if args.verify or args.verify_inputs:
        del new
        # on the staged files: a model that fails to load or run is never committed
        result = verify(
            src,
            outputs.staged(dst),
            inputs=verify_data,
            threads=args.threads,
            input_shapes=dict(args.input_shape),
            profile=bool(args.html),
        )
    html_note = None
    if args.html:
        page, html_note = _decompose_html(args, src, outputs.staged(dst), report, result)
        outputs.write_text(args.html, page, "HTML report")
    outputs.commit()
    print(format_report(report, args.quiet))
    print(f"wrote {dst}" + (f" (+ {dst.name}.data)" if external else ""))
    if ort_files is not None:
        print(f"wrote {ort_files.model} and {ort_files.config.name} (onnxruntime's ORT format, optimization {ort_files.optimization})")
    if result is not None:
        # a low-rank model approximates by design: report the error, leave gating to `verify --rtol/--atol`
        print(format_verify(result, gate=False))
    if html_note is not None:
        print(html_note)
    return 0


def _stage_ort(model: Any, ort_dst: Path, outputs: StagedOutputs) -> Any:
    """The ORT model and its required-operators config, converted by onnxruntime and staged with the other outputs."""
    from .mobile import ort_config_path, staged_ort

    with staged_ort(model, ort_dst) as staged:
        try:
            os.replace(staged.staged_model, outputs.staged(ort_dst))
            os.replace(staged.staged_config, outputs.staged(ort_config_path(ort_dst)))
        except OSError as exc:
            raise LowRankError(f"{ort_dst}: cannot write ({exc.strerror or exc})") from None
        return staged.files


def _decompose_html(args: argparse.Namespace, src: Path, converted: Path, report: Report, result: VerifyResult | None) -> tuple[str, str]:
    """The HTML report of one conversion, and the line that says it was written."""
    from .html_report import PLOTS_HINT, decompose_html, plots_available
    from .sweep import report_spectra

    notes = []
    if result is None:  # the page shows the output error: compared here, without timing
        try:
            result = verify(src, converted, runs=0, input_shapes=dict(args.input_shape))
        except LowRankError as exc:  # the model is written: the page says why its error is missing
            notes.append(f"output error not measured: {exc}")
    plots = plots_available()
    spectra = report_spectra(src, report, dict(args.input_shape)) if plots else []
    page = decompose_html(src.name, report, spectra, result, plots=plots, notes=notes)
    return page, f"wrote {args.html}" + ("" if plots else f" (tables only; for the plots: {PLOTS_HINT})")


def format_sweep(result: SweepResult) -> str:
    """One row per target: MAC ratio, measured speedup, output error, agreement, accuracy, conversion time."""
    rows = []
    for row in result.rows:
        if not row.reached:
            rows.append(
                [
                    f"{row.target:g}x",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    *(["-"] if result.labelled else []),
                    "-",
                    "-",
                    f"not reached: {row.reason}",
                ]
            )
            continue
        timed = row.latency_ratio is not None
        cells = [
            f"{row.target:g}x",
            f"{row.mac_ratio:.2f}x",
            f"{row.latency_ratio:.2f}x" if timed else "not timed",
            f"{row.original_ms:.3f} -> {row.candidate_ms:.3f}" if timed else "-",
            f"{row.relative_l2:.3g}" if row.relative_l2 is not None else "-",
            f"{row.max_abs:.3g}" if row.max_abs is not None else "-",
            f"{row.top1_agreement:.2%}" if row.top1_agreement is not None else "-",
        ]
        if result.labelled:
            cells.append(f"{row.accuracy:.2%}" if row.accuracy is not None else "-")
        cells += [f"{row.decomposed}/{row.layers}", f"{row.convert_seconds:.2f}", "; ".join(row.notes)]
        rows.append(cells)
    header = ["target", "MACs", "speedup", "ms (orig -> conv)", "rel L2", "max abs", "top-1 agree"]
    header += ["accuracy"] if result.labelled else []
    header += ["layers", "convert s", "note"]
    lines = [_table(rows, header)]
    accuracy = next((r.accuracy_original for r in result.rows if r.accuracy_original is not None), None)
    if accuracy is not None:
        lines.append(f"original accuracy {accuracy:.2%} on {result.samples} labelled samples")
    lines.append(
        f"speedup: original / converted latency, median of {result.runs} interleaved runs, {result.threads} thread(s); "
        f"MACs: decomposable layers before / after; evaluated on {result.samples} sample(s) ({result.inputs} inputs); "
        f"shared preparation {result.prepare_seconds:.2f} s (the first target's time also holds the spectra the others reuse)"
    )
    cal = result.calibration
    if "statistics_seconds" in cal:
        line = f"calibration: statistics of {cal['samples']} samples in {cal['statistics_seconds']:.1f} s"
        if cal.get("sensitivity"):
            line += f", gains on {cal['sensitivity']['samples']} sample(s) in {cal['sensitivity']['seconds']:.1f} s"
        lines.append(line + ", measured once and shared by every target")
    return "\n".join(lines)


def _sweep(args: argparse.Namespace) -> int:

    src = Path(args.input)
    with StagedOutputs({src: "input model"}) as outputs:  # the page is checked before any work, written after
        if args.html:
            outputs.stage(args.html, "HTML report")
        return _sweep_into(args, src, outputs)


def _sweep_into(args: argparse.Namespace, src: Path, outputs: StagedOutputs) -> int:
    from .sweep import sweep

    if args.save_dir and not Path(args.save_dir).is_dir():
        raise LowRankError(f"{args.save_dir}: --save-dir folder does not exist")
    if args.eval_inputs and not Path(args.eval_inputs).is_file():
        raise LowRankError(f"{args.eval_inputs}: no such eval inputs file")
    if args.profile and args.runs == 0:
        raise LowRankError("--profile times the models: it needs --runs > 0")
    if args.calibration is None:
        _refuse_calibration_flags(args)
    bar = _ProgressBar(True, "converting and measuring targets", "target")
    try:
        result = sweep(
            src,
            args.speedups,
            eval_inputs=args.eval_inputs,
            calibration=args.calibration,
            refit=args.refit,
            sensitivity=args.sensitivity,
            calibration_options=_calibration_options(args),
            measure=args.measure,
            threads=args.threads,
            runs=args.runs,
            profile=args.profile,
            input_shapes=dict(args.input_shape),
            allow_unknown_shapes=args.allow_unknown_shapes,
            kinds=[k.strip() for k in args.kinds.split(",") if k.strip()],
            include=args.include,
            exclude=args.exclude,
            rank_multiple=args.rank_multiple,
            fold_bn=not args.no_fold_bn,
            save_dir=args.save_dir,
            progress=bar,
        )
    finally:
        bar.close()
    if args.html:
        from .html_report import PLOTS_HINT, plots_available, sweep_html

        outputs.write_text(args.html, sweep_html(result), "HTML report")
        outputs.commit()
        note = "" if plots_available() else f" (tables only; for the plots: {PLOTS_HINT})"
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_sweep(result))
    if args.html and not args.json:
        print(f"wrote {args.html}{note}")
    return 0


def _refuse_calibration_flags(args: argparse.Namespace) -> None:
    """Without --calibration, the flags that tune it are a mistake: one line naming the first given."""
    for flag in ("refit", "sensitivity", "positions", "calibration_batch"):
        if getattr(args, flag) not in (None, False):
            raise LowRankError(f"--{flag.replace('_', '-')} needs --calibration")


def _check_calibration_flags(args: argparse.Namespace) -> None:
    """What calibration cannot do with these flags, said before the model is even read."""
    if args.calibration is None:
        _refuse_calibration_flags(args)
        return
    if not Path(args.calibration).exists():
        raise LowRankError(f"{args.calibration}: no such calibration file or folder")
    if args.sensitivity and args.speedup is None and args.params_ratio is None:
        policy = next((f"--{name}" for name in ("rank", "energy", "ranks") if getattr(args, name) is not None), "this policy")
        raise LowRankError(f"--sensitivity allocates ranks under a budget: it needs --speedup or --params-ratio, not {policy}")


def _progress(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False) and sys.stderr.isatty():
        print(message, file=sys.stderr)


class _ProgressBar:
    """A bar on stderr for conversions that take more than a moment; silent when stderr is not a terminal.

    The library reports ``(done, total, name)``: layers analysed (``name`` the layer), or the samples of a
    pass over the calibration data (``name`` "calibration <pass>"); each pass gets a bar of its own.
    tqdm draws it when installed; otherwise one line is rewritten in place.
    """

    DELAY = 1.0  # seconds before anything is drawn: quick conversions stay quiet

    def __init__(self, enabled: bool, what: str = "analysing layers", unit: str = "layer") -> None:
        self.what, self.unit = what, unit
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.bar: Any = None
        self.phase = ""
        self.drawn = False

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled or time.perf_counter() - self.start < self.DELAY:
            return
        passes = name.startswith("calibration ")
        phase, unit = (name, "sample") if passes else (self.what, self.unit)
        if self.bar is not None and phase != self.phase:
            self.close()
            self.bar, self.drawn = None, False
        self.phase = phase
        if self.bar is None:
            try:
                from tqdm import tqdm  # optional; imported only when a bar is due

                self.bar = tqdm(total=total, desc=phase, unit=unit, file=sys.stderr, leave=False)
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.n = done
            self.bar.total = total
            if passes:
                self.bar.refresh()
            else:
                self.bar.set_postfix_str(name[-30:], refresh=True)
        else:
            detail = "" if passes else f" {name[-40:]:<40}"
            print(f"\r{phase} {done}/{total}{detail}".ljust(70), end="", file=sys.stderr, flush=True)
            self.drawn = True

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        elif self.drawn:
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)


def _inspect(args: argparse.Namespace) -> int:
    layers = inspect(args.input, input_shapes=dict(args.input_shape))
    mobile = None
    if args.mobile:
        from .mobile import coverage

        mobile = coverage(args.input, input_shapes=dict(args.input_shape))
    if args.json:
        from dataclasses import asdict

        listed = [asdict(layer) for layer in layers]
        print(json.dumps({"layers": listed, "mobile": mobile.to_dict()} if mobile is not None else listed, indent=2))
    else:
        print(format_inspect(layers))
        if mobile is not None:
            print(format_mobile(mobile))
    return 0


def _verify(args: argparse.Namespace) -> int:
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if args.runs < 0:
        raise LowRankError(f"--runs must be >= 0, got {args.runs}")
    if args.profile and args.runs == 0:
        raise LowRankError("--profile times the models: it needs --runs > 0")
    mobile = None
    if args.mobile:  # first: a model the checker cannot read fails before anything runs
        from .mobile import coverage

        shapes = dict(args.input_shape)
        mobile = (coverage(args.original, input_shapes=shapes), coverage(args.candidate, input_shapes=shapes))
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
    if args.json:
        data = result.to_dict()
        if mobile is not None:
            data["mobile"] = {"original": mobile[0].to_dict(), "candidate": mobile[1].to_dict()}
        print(json.dumps(data, indent=2))
    else:
        print(format_verify(result))
        if mobile is not None:
            print(format_mobile(*mobile))
    return 0 if result.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        handler = {"decompose": _decompose, "inspect": _inspect, "verify": _verify, "sweep": _sweep}[args.command]
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
    except MemoryError:  # a size no check foresaw: still the input's size, not a bug
        print(f"{PROG}: error: out of memory (the model or its data is too large for this machine)", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug of ours: one line unless asked for the traceback
        if os.environ.get("ONNX_LOWRANK_DEBUG"):
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc} (set ONNX_LOWRANK_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
