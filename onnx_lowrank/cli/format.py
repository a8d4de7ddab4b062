"""What the commands print: the per-layer table and summary of a conversion, the comparison of two models,
the kernel-time breakdown, the layers ``inspect`` sees, mobile coverage and the sweep's table.

Plain text, one table per result; every figure printed is one the result holds (a ratio that was not
measured says why instead).
"""

from __future__ import annotations

from typing import Any

from ..agreement import OutputAgreement, summary_measure
from ..mobile import EP_NAMES, MobileCoverage
from ..report import InspectLayer, LayerReport, Report, unsized_warning
from ..sweep import SweepResult
from ..timing import KernelTimes
from ..verify import VerifyResult

__all__ = [
    "format_inspect",
    "format_kernels",
    "format_mobile",
    "format_mobile_summary",
    "format_report",
    "format_sweep",
    "format_verify",
]


def count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=False)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=False)).rstrip() for r in rows]
    return "\n".join(lines)


def shape(weight_shape: list[int] | None, groups: int | None) -> str:
    text = "x".join(map(str, weight_shape)) if weight_shape else "?"
    return text + (f" g{groups}" if groups and groups > 1 else "")


def format_report(report: Report, quiet: bool = False) -> str:
    out = []
    if not quiet:
        rows = []
        quantized = bool(report.quantization)
        for layer in report.layers:
            cells = [layer.node, layer.op_type, shape(layer.weight_shape, layer.groups)]
            macs = [count(layer.macs_before), count(layer.macs_after)] if layer.counted else ["?", "?"]
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
        out.append(table(rows, [*header, *(["int8"] if quantized else []), "note"]))
    out += _latency_lines(report.latency)
    out += _answers_lines(report.answers)
    out += _finetune_lines(report.finetune)
    out += _search_lines(report.search)
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
            to_activation = sum(1 for layer in refit["layers"] if layer["refit"] and layer.get("objective") not in (None, "output"))
            fitted = f" ({to_activation} to their activation's output)" if to_activation else ""
            line += (
                f"; refit {done} of {len(refit['layers'])} layers{fitted} in {refit.get('stages', 0)} stage(s), {refit['seconds']:.1f} s"
            )
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
        totals = f"MACs {count(report.macs_before)} -> {count(report.macs_after)} ({report.mac_ratio:.2f}x fewer"
        if report.shapes.get("branch_runs"):
            totals += ", every If branch counted at its own sizes"
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
        f"decomposed {len(report.decomposed)} of {len(report.layers)} layers; {totals}; parameters {count(report.params_before)} -> "
        f"{count(report.params_after)} ({report.params_after / max(report.params_before, 1):.2f}x); {report.seconds:.2f} s"
    )
    return "\n".join(out)


def speedup_text(data: dict[str, Any]) -> str:
    """``2.08x (95 % CI 1.96-2.21, 24 paired runs)``: a measured ratio with its interval and the pairs it rests on."""
    text = f"{data['measured_speedup']:.2f}x"
    low, high = data.get("speedup_low"), data.get("speedup_high")
    interval = f"95 % CI {low:.2f}-{high:.2f}, " if low is not None and high is not None else ""
    return f"{text} ({interval}{data['runs']} paired runs)"


def _cache_text(cache: dict[str, Any] | None) -> str:
    """What the timing cache answered and what it lost, for the latency line."""
    if not cache:
        return ""
    parts = [f"{cache['hits']} from the timing cache"] if cache.get("hits") else []
    if cache.get("stale"):
        parts.append(f"{cache['stale']} cached timings taken on a busier machine timed again")
    if cache.get("discarded"):
        parts.append(f"{cache['discarded']} timings the whole model contradicted discarded and taken again")
    if cache.get("not_kept"):
        parts.append(f"this run's timings not kept: {cache['not_kept']}")
    return "".join(f", {part}" for part in parts)


def _latency_lines(lat: dict[str, Any]) -> list[str]:
    """What the plan was made by and the measured ratio with its interval, the thread count and the runs."""
    if not lat:
        return []
    if lat.get("by") == "latency":
        predicted = f"predicted {lat['predicted_speedup']:.2f}x, " if lat.get("predicted_speedup") else ""
        retimed = f", {lat['layers_retimed']} re-timed" if lat.get("layers_retimed") else ""
        lines = [
            f"planned by latency measured here: {lat['original_ms']:.3f} ms -> {lat['candidate_ms']:.3f} ms, "
            f"{speedup_text(lat)} faster in onnxruntime ({lat['threads']} thread(s); {predicted}target {lat['target']:g}x "
            f"within {lat['tolerance']:.0%}, {len(lat['rounds'])} round(s), {lat['layers_timed']} layer models timed{retimed}"
            f"{_cache_text(lat.get('timing_cache'))})"
        ]
        if not lat["met"]:
            lines.append(
                f"warning: measured {lat['measured_speedup']:.2f}x does not meet the target {lat['target']:g}x (no round's "
                "interval lay above it); the fastest round is kept"
            )
        return lines
    lines = []
    if lat.get("by") == "macs":
        lines.append(
            f"planned by MACs: {lat['why_macs']}" if lat.get("why_macs") else "planned by MACs (--by macs): a plan for any hardware"
        )
    if "measured_speedup" in lat:
        lines.append(
            f"measured in onnxruntime ({lat['threads']} thread(s)): {lat['original_ms']:.3f} ms -> {lat['candidate_ms']:.3f} ms, "
            f"{speedup_text(lat)} faster"
        )
    elif lat.get("not_timed"):
        lines.append(f"not timed: {lat['not_timed']}")
    check = lat.get("check")
    if check is not None:
        runs = f": {lat['runs']} interleaved runs" if "measured_speedup" in lat else ""
        line = f"checked in {check['seconds']:.1f} s{runs}"
        if check["weights_file_bytes"] >= 2**20:
            line += f"; both sessions read one copy of the weights, {check['weights_file_bytes'] / 2**20:,.0f} MiB"
        if not check["prepacking"]:
            line += ", without onnxruntime's prepacking"
        lines.append(line)
    return lines


def _search_lines(search: dict[str, Any]) -> list[str]:
    """The targets an accuracy budget searched: MACs cut, measured speedup, drop; the one kept starred."""
    if not search:
        return []
    rows = []
    for point in search["points"]:
        star = "*" if point["target"] == search["chosen"] else ""
        if not point["reached"]:
            rows.append([f"{point['target']:g}x{star}", "-", "-", "-", f"not reached: {point['reason']}"])
            continue
        measured = "-"
        if point["speedup"] is not None:
            measured = f"{point['speedup']:.2f}x"
            if point["speedup_low"] is not None:
                measured += f" ({point['speedup_low']:.2f}-{point['speedup_high']:.2f})"
        drop = f"{point['drop']:.2f}" if point["drop"] is not None else "-"
        verdict = "within" if point["within"] else "beyond"
        rows.append([f"{point['target']:g}x{star}", f"{point['mac_ratio']:.2f}x", measured, drop, verdict])
    measure = next((p["measure"] for p in search["points"] if p["measure"]), "agreement")
    head = (
        f"accuracy budget: at most {search['max_drop']:g} points of {measure} on {search['samples']} samples of "
        f"{search['inputs']}; kept the fastest measured within it ({search['chosen']:g}x, starred)"
    )
    return [head, table(rows, ["target", "MACs cut", "measured (95 % CI)", "drop (points)", "budget"])]


def _answers_lines(answers: dict[str, Any]) -> list[str]:
    """What the conversion did to the answers, measured on held-back samples, or why it was not measured."""
    if not answers:
        return []
    if "not_measured" in answers:
        return [f"answers: not measured ({answers['not_measured']})"]
    parts = [f"{output['measure']} {_value(output)} ({output['output']})" for output in answers["outputs"]]
    return [f"answers on {answers['samples']} held-back {answers['data'].removeprefix('held-back ')}: {'; '.join(parts)}"]


def _value(output: dict[str, Any]) -> str:
    return f"{output['value']:.1%}" if output["higher_is_better"] else f"{output['value']:.3g}"


def _finetune_lines(tune: dict[str, Any]) -> list[str]:
    """What the fine-tune trained, how long, the answers before and after it, and how closely onnxruntime follows it."""
    if not tune:
        return []
    if "skipped" in tune:
        return [f"fine-tune: skipped ({tune['skipped']})"]
    what = "the decomposed layers' factors and biases" if tune["trainable"] == "factors" else "every float weight"
    losses = ", ".join(f"{loss['kind'].upper()} on {name}" for name, loss in tune["output_losses"].items())
    best = f"; best at step {tune['best_step']}" if tune["best_step"] != tune["steps"] else ""
    lines = [
        f"fine-tune: {tune['steps']} steps in {tune['seconds']:.1f} s ({tune['stop_reason']}{best}); trained {what}, "
        f"{tune['trained_count']} tensors of {count(tune['trained_elements'])} values; {losses}"
    ]
    check = tune["write_back"]
    line = (
        f"onnxruntime runs the trained network within {check['max_relative']:.1e} of each output's magnitude "
        f"(tolerance {check['tolerance']:g})"
    )
    answers = tune.get("answers")  # measured by decompose on its held-back samples (a --max-drop search measures its own)
    if answers is not None:
        pairs = list(zip(answers.get("before") or [], answers.get("after") or [], strict=False))
        if pairs:
            said = "; ".join(f"{after['measure']} {_value(before)} -> {_value(after)} ({after['output']})" for before, after in pairs)
            line = f"answers on {answers['samples']} held-back samples (never trained on): {said}; {line}"
        else:
            line = f"answers not measured ({answers.get('not_measured', 'no held-back samples')}); {line}"
    lines.append(f"fine-tune: {line}")
    return lines


def _layer_note(layer: LayerReport) -> str:
    """Where a layer in a subgraph sits and how often it ran, and a rank stored wider with zero filters, for the table."""
    padded = f"stored as {layer.stored_rank} channels (zero filters fill the kernel block)" if layer.stored_rank else ""
    if layer.scope == "the main graph":
        return padded
    runs = f", ran {layer.executions}x" if layer.shape_known and layer.executions > 1 else ""
    return f"in {layer.scope}{runs}" + (f"; {padded}" if padded else "")


def _dims(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _sizes_lines(report: Report) -> list[str]:
    """Where the sizes came from, and the MACs of each If/Loop/Scan subgraph on the reference input (with
    ``--branches all``, what sized each branch and the MACs of each path through them)."""
    lines = []
    sizes = report.shapes
    if sizes.get("source") == "run":
        shown = ", ".join(f"{name}={_dims(shape)}" for name, shape in sizes.get("reference_input", {}).items())
        lines.append(f"sizes: from one onnxruntime run on {sizes.get('reference_from')} {shown} ({sizes.get('seconds', 0):.2f} s)")
    further = sizes.get("branch_runs") or []
    if further:
        lines.append(f"sizes: --branches all sized the branches it does not run by {len(further)} further run(s): {'; '.join(further)}")
    for flow in report.control_flow:
        parts = []
        for label, sub in flow["subgraphs"].items():
            ratio = f", {sub['macs_before'] / sub['macs_after']:.2f}x" if sub["macs_after"] else ""
            macs = f"{count(sub['macs_before'])} -> {count(sub['macs_after'])} MACs{ratio}"
            if further and "path_macs_before" in sub and sub["path_macs_after"]:
                macs += f" (its path {count(sub['path_macs_before'])} -> {count(sub['path_macs_after'])}, "
                macs += f"{sub['path_macs_before'] / sub['path_macs_after']:.2f}x)"
            if sub["ran"]:
                parts.append(f"{label}: {macs}")
            elif sub.get("sized_by"):
                parts.append(f"{label}: sized by {sub['sized_by']}: {macs}")
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
        table(
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
        interval = (
            f" (95 % CI {result.speedup_low:.2f}-{result.speedup_high:.2f})"
            if result.speedup_low is not None and result.speedup_high is not None
            else ""
        )
        lines.append(
            f"latency (median of {result.runs} interleaved runs, {', '.join(result.providers)}): original {result.original_ms:.3f} ms, "
            f"candidate {result.candidate_ms:.3f} ms, {result.latency_ratio:.2f}x faster{interval}"
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
    return "kernel time per run (onnxruntime profiler, median per node):\n" + table(
        rows, ["operator", "original ms", "candidate ms", "ratio"]
    )


def format_inspect(layers: list[InspectLayer]) -> str:
    rows = []
    for layer in layers:
        cells = [layer.node, layer.op_type, shape(layer.weight_shape, layer.groups), count(layer.macs)]
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
    text = table(rows, ["node", "op", "weight", "MACs", "kind", "90% energy", "99% energy", "99.9% energy", "note"])
    unsized = [layer for layer in layers if not layer.shape_known]
    if unsized:
        text += f"\nwarning: {unsized_warning([layer.node for layer in unsized], unsized[0].size_note or 'size unknown')}"
    return text + f"\n{len(layers)} layers, {count(total)} MACs"


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
    lines.append(table(rows, header))
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


def _ratio_with_interval(ratio: float | None, low: float | None, high: float | None) -> str:
    """``2.08x (1.96-2.21)``, or the ratio alone where no interval was computed."""
    text = f"{ratio:.2f}x" if ratio is not None else "-"
    return text + (f" ({low:.2f}-{high:.2f})" if low is not None and high is not None else "")


def _answers_cell(before: OutputAgreement | None, after: OutputAgreement | None) -> str:
    """The summary measure's value (a share, or a relative L2), ``before -> after`` a fine-tune."""
    if after is None:
        return "-"
    spec = ".1%" if after.higher_is_better else ".3g"
    return _tuned(before.value if before is not None else None, after.value, spec)


def _tuned(before: float | None, after: float | None, spec: str) -> str:
    """``after``, or ``before -> after`` when a fine-tune came between them."""
    if after is None:
        return "-"
    return f"{before:{spec}} -> {after:{spec}}" if before is not None else f"{after:{spec}}"


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
        before = row.untuned
        cells = [
            f"{row.target:g}x",
            row.planned_by or "-",
            f"{row.mac_ratio:.2f}x",
            (f"{row.latency_ratio:.2f}x" + (f" ({row.speedup_low:.2f}-{row.speedup_high:.2f})" if row.speedup_low else ""))
            if timed
            else "not timed",
            f"{row.original_ms:.3f} -> {row.candidate_ms:.3f}" if timed else "-",
            _tuned(before.relative_l2 if before else None, row.relative_l2, ".3g"),
            f"{row.max_abs:.3g}" if row.max_abs is not None else "-",
            _tuned(before.top1_agreement if before else None, row.top1_agreement, ".2%"),
            _answers_cell(summary_measure(before.answers) if before else None, row.answer),
        ]
        if result.labelled:
            cells.append(_tuned(before.accuracy if before else None, row.accuracy, ".2%"))
        cells += [f"{row.decomposed}/{row.layers}", f"{row.convert_seconds:.2f}", "; ".join(row.notes)]
        rows.append(cells)
    header = ["target", "plan", "MACs", "speedup", "ms (orig -> conv)", "rel L2", "max abs", "top-1 agree", "answers"]
    header += ["accuracy"] if result.labelled else []
    header += ["layers", "convert s", "note"]
    lines = [table(rows, header)]
    speaker = next((r.answer for r in result.rows if r.answer is not None), None)
    if speaker is not None:
        lines.append(f"answers: {speaker.measure} of output {speaker.output!r} with the original's")
    tuned = [r for r in result.rows if r.untuned is not None]
    if tuned:
        seconds = [r.finetune_seconds or 0.0 for r in tuned]
        lines.append(
            f"fine-tuned: {len(tuned)} of {len(result.rows)} targets, {min(seconds):.0f}-{max(seconds):.0f} s each; "
            "before -> after the fine-tune (its speed is the converted model's)"
        )
    accuracy = next((r.accuracy_original for r in result.rows if r.accuracy_original is not None), None)
    if accuracy is not None:
        lines.append(f"original accuracy {accuracy:.2%} on {result.samples} labelled samples")
    lines.append(
        f"speedup: original / converted latency, median of {result.runs} interleaved runs, {result.threads} thread(s), "
        "with its 95 % interval; "
        f"MACs: decomposable layers before / after; evaluated on {result.samples} sample(s) ({result.inputs} inputs); "
        f"shared preparation {result.prepare_seconds:.2f} s (the first target's time also holds the spectra the others reuse); "
        f"plan: what each target was planned by, as `decompose --speedup S` with the same options plans it"
    )
    cal = result.calibration
    if "statistics_seconds" in cal:
        line = f"calibration: statistics of {cal['samples']} samples in {cal['statistics_seconds']:.1f} s"
        if cal.get("sensitivity"):
            line += f", gains on {cal['sensitivity']['samples']} sample(s) in {cal['sensitivity']['seconds']:.1f} s"
        lines.append(line + ", measured once and shared by every target")
    return "\n".join(lines)
