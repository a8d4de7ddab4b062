"""One self-contained HTML page for a conversion or a sweep: tables, and plots when matplotlib is installed.

The page needs no network: plots are PNG images inside the file (``data:``
URIs), styles are inline, there is no script, and its Content-Security-Policy
forbids loading anything else. Without matplotlib (the optional extra
``onnx-lowrank[plots]``) the page holds the same tables and says how to get the
plots. matplotlib is imported only here, when a page is drawn, and used through
its object API (no pyplot): drawing changes no global state of the caller.

Figures
-------
* **Accuracy against speed** (sweep): top-1 accuracy — or, without labels, the
  relative L2 error of the outputs — against the measured speedup (original /
  converted latency) and against the MAC ratio; the default target is marked.
* **Spectra**: per decomposed layer, its singular values ``σ_k / σ_1`` against
  the rank ``k`` (log scale), with the chosen rank marked; the kernel error at
  that rank is in the title (one conversion) or the per-layer table (sweep).
* **MACs per layer**: before, and after each conversion.
* **Kernel time per operator type** (when profiled): milliseconds per run in
  onnxruntime's kernels, original and converted.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import __version__
from .agreement import OutputAgreement, summary_measure
from .report import LayerReport, Report
from .verify import OutputStats, VerifyResult

if TYPE_CHECKING:
    from .sweep import LayerSpectrum, SweepResult

__all__ = ["PLOTS_HINT", "decompose_html", "plots_available", "sweep_html"]

PLOTS_HINT = "pip install 'onnx-lowrank[plots]'"
SPECTRA_COLUMNS = 4
NAME_CHARS = 34  # layer names longer than this are shown by their end, where exporters put what differs


def plots_available() -> bool:
    """Whether matplotlib can be imported (the ``plots`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- formatting


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _short(name: str, chars: int = NAME_CHARS) -> str:
    """``name``, or its end cut at a ``/`` or ``.`` where one is near, so that no word is split."""
    if len(name) <= chars:
        return name
    tail = name[-(chars - 1) :]
    for separator in ("/", ".", "_"):
        cut = tail.find(separator)
        if 0 <= cut < chars // 2:
            return "…" + tail[cut:]
    return "…" + tail


def _count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f}"


def _num(value: float | None, fmt: str = ".3g", missing: str = "–") -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f} %"


def _before_after(before: float | None, after: float | None, show: Callable[[float | None], str]) -> str:
    """``after``, or ``before → after`` where a fine-tune came between them."""
    return f"{show(before)} → {show(after)}" if before is not None and after is not None else show(after)


def _answers_cell(before: OutputAgreement | None, after: OutputAgreement | None) -> str:
    """The summary measure (a share, or a relative L2) with its name, before → after a fine-tune."""
    if after is None:
        return "–"

    def show(value: float | None) -> str:
        return _pct(value) if after.higher_is_better else _num(value, ".3g")

    value = _before_after(before.value if before is not None else None, after.value, show)
    return f'{value}<br><span class="why">{_e(after.measure)}</span>'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool] | None = None, caption: str = "") -> str:
    """An HTML table of already-escaped cells; ``numeric`` columns are right-aligned."""
    numeric = numeric or [False] * len(header)
    cls = ['class="num"' if n else "" for n in numeric]
    head = "".join(f"<th {c}>{h}</th>" for h, c in zip(header, cls, strict=True))
    body = "".join("<tr>" + "".join(f"<td {c}>{v}</td>" for v, c in zip(row, cls, strict=True)) + "</tr>" for row in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _figure(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption>{caption}</figcaption></figure>'


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; font-size: 15px; line-height: 1.45;
       color: #1b1b1b; background: #fff; margin: 0 auto; padding: 24px 32px 64px; max-width: 1180px; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { font-size: 1.25em; margin: 36px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
p.meta { color: #555; margin: 0 0 16px; } p.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; }
code { font-family: "DejaVu Sans Mono", monospace; font-size: 0.92em; background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
.scroll { overflow-x: auto; } table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.92em; }
caption { text-align: left; color: #555; padding: 4px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f6f8; vertical-align: bottom; } td.num { white-space: nowrap; }
tbody tr:nth-child(even) { background: #fafafa; } td.num, th.num { text-align: right; }
span.err { color: #666; font-size: 0.9em; }
.why { color: #8a4b00; }
figure { margin: 12px 0 24px; } figure img { width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.93em; margin-top: 4px; }
"""


def _page(title: str, meta: str, sections: Sequence[str]) -> str:
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{_e(title)}</h1><p class="meta">{meta}</p>' + "".join(sections) + "</body></html>\n"
    )


def _generated() -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"onnx-lowrank {_e(__version__)}, {stamp}"


def _no_plots() -> str:
    return f'<p class="note">The plots need matplotlib, which is not installed: <code>{_e(PLOTS_HINT)}</code>, then run again.</p>'


# --------------------------------------------------------------------------- figures (matplotlib)


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    return fig


def _png(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _style_axes(ax: Any) -> None:
    ax.grid(True, color="#e3e3e3", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _target_colors(targets: Sequence[float]) -> dict[float, Any]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n = len(targets)
    return {t: cmap(0.05 + 0.8 * (i / max(n - 1, 1))) for i, t in enumerate(targets)}


def _tradeoff_figure(result: SweepResult) -> tuple[str, str] | None:
    rows = [r for r in result.rows if r.reached and r.outputs]
    if not rows:
        return None
    from matplotlib.lines import Line2D

    labelled = result.labelled and all(r.accuracy is not None for r in rows)
    fig = _new_figure(11.5, 5.0)
    axes = fig.subplots(1, 2, sharey=True)
    if labelled:
        ys = [100 * float(r.accuracy) for r in rows]  # type: ignore[arg-type]
        original_y = 100 * float(rows[0].accuracy_original)  # type: ignore[arg-type]
        ylabel = "top-1 accuracy (%)"
    else:
        ys = [100 * float(r.relative_l2) for r in rows]  # type: ignore[arg-type]
        original_y = 0.0
        ylabel = "output error: relative L2 (%), lower is better"
    # with a fine-tune, the converted models before it (the row's own values are after it)
    before = [r.untuned.accuracy if labelled else r.untuned.relative_l2 for r in rows if r.untuned is not None]
    untuned = [100 * float(v) if v is not None else None for v in before] if len(before) == len(rows) else []
    panels = [
        ([r.latency_ratio for r in rows], f"measured speedup (×): original / converted latency,\nmedian of {result.runs} interleaved runs"),
        ([r.mac_ratio for r in rows], "MAC ratio (×): MACs of the decomposable layers\nbefore / after"),
    ]
    for ax, (xs, xlabel) in zip(axes, panels, strict=True):
        _style_axes(ax)
        ax.set_xlabel(xlabel, fontsize=10.5)
        points = [(float(x), y, r) for x, y, r in zip(xs, ys, rows, strict=True) if x is not None]
        if not points:
            ax.text(0.5, 0.5, "not timed (--runs 0)", ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#777")
            continue
        ax.axhline(original_y, color="#888", linestyle="--", linewidth=1.2)
        if untuned:
            pairs = [(float(x), y) for x, y in zip(xs, untuned, strict=True) if x is not None and y is not None]
            ax.plot(
                [1.0] + [p[0] for p in pairs], [original_y] + [p[1] for p in pairs], color="#9db4cf", linestyle=":", linewidth=1.6,
                marker="o", markersize=4, zorder=1,
            )  # fmt: skip
        ax.plot([1.0] + [p[0] for p in points], [original_y] + [p[1] for p in points], color="#3b6ea8", linewidth=1.6, marker="o", zorder=2)
        for i, (x, y, row) in enumerate(points):
            # neighbouring targets often land close together: their labels go alternately above and below
            offset = (5, 8) if i % 2 == 0 else (5, -16)
            ax.annotate(f"{row.target:g}×", (x, y), textcoords="offset points", xytext=offset, fontsize=10, color="#222")
            if row.target == result.default_target:
                ax.plot([x], [y], marker="*", markersize=17, color="#d62728", linestyle="none", zorder=3)
        ax.set_xlim(left=min(0.95, min(p[0] for p in points) - 0.05), right=max(p[0] for p in points) * 1.06)
        ax.tick_params(labelsize=10)
    axes[0].set_ylabel(ylabel, fontsize=10.5)
    values = [*ys, original_y, *(y for y in untuned if y is not None)]
    low, high = min(values), max(values)
    if labelled:  # a drop of a few tenths of a point must not fill the whole height
        low = min(low, high - 5.0)
        pad = max(0.5, 0.06 * (high - low))
        axes[0].set_ylim(max(low - pad, 0.0), min(high + pad + 0.04 * (high - low), 100.5))
    else:
        axes[0].set_ylim(0.0, high * 1.15 if high > 0 else 1.0)
    handles = [
        Line2D([], [], color="#888", linestyle="--", label="original model"),
        Line2D([], [], color="#3b6ea8", marker="o", label=f"{'fine-tuned' if untuned else 'converted'} at each --speedup target"),
    ]
    if untuned:
        handles.append(Line2D([], [], color="#9db4cf", linestyle=":", marker="o", markersize=4, label="before the fine-tune"))
    if any(r.target == result.default_target for r in rows):
        star = f"what decompose --speedup {result.default_target:g} writes"
        handles.append(Line2D([], [], color="#d62728", marker="*", markersize=13, linestyle="none", label=star))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=10, frameon=False, bbox_to_anchor=(0.5, 0.93))
    fig.suptitle("Accuracy against speed" if labelled else "Output error against speed", fontsize=12.5)
    fig.tight_layout(rect=(0, 0, 1, 0.88))
    what = "top-1 accuracy on the labelled eval inputs" if labelled else "relative L2 error of the outputs"
    caption = (
        f"{_e(what[0].upper() + what[1:])} of the model converted at each target (labelled), against the measured speedup in onnxruntime "
        f"({result.threads} thread(s)) on the left and against the MAC ratio on the right. The dashed line and the point at 1× are "
        f"the original model."
        + (" The dotted line: each target's converted model before its fine-tune (same speed, other weights)." if untuned else "")
    )
    return _png(fig), caption


def _spectra_figure(spectra: Sequence[LayerSpectrum], marks: dict[str, list[tuple[str, int, Any, str]]], single: bool) -> str:
    """Small multiples, one panel per layer; ``marks[node]``: (kind, rank, color, label) per conversion."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    nodes = list(dict.fromkeys(s.node for s in spectra))
    cols = min(SPECTRA_COLUMNS, len(nodes))
    rows = math.ceil(len(nodes) / cols)
    fig = _new_figure(11.5, 0.9 + 2.35 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    styles: dict[str, tuple[Any, str]] = {"spatial": ("-", "#1f4e79"), "channel": ("--", "#b35900")}
    # one y range for every panel, so that spectra compare at a glance
    floor = max(min((min(s.curve) for s in spectra if s.curve), default=1e-3), 1e-5)
    for i, node in enumerate(nodes):
        ax = axes[i // cols][i % cols]
        _style_axes(ax)
        title = _short(node, 30)
        for spectrum in (s for s in spectra if s.node == node):
            style, color = styles.get(spectrum.kind, ("-", "#333"))
            ks = list(range(1, len(spectrum.curve) + 1))
            curve = [max(v, 1e-6) for v in spectrum.curve]
            ax.plot(ks, curve, linestyle=style, color=color, linewidth=1.4, label=spectrum.kind)
            for kind, rank, mark_color, _ in marks.get(node, []):
                if kind == spectrum.kind and 1 <= rank <= len(curve):
                    ax.axvline(rank, color=mark_color, linewidth=1.6, alpha=0.9)
                    ax.plot([rank], [curve[rank - 1]], marker="o", color=mark_color, markersize=5)
                    if single:
                        title += f"\n{kind} rank {rank}/{len(curve)}, kernel error {spectrum.errors[rank]:.3f}"
        ax.set_yscale("log")
        ax.set_ylim(floor / 1.5, 1.5)
        ax.yaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks crowd a short log axis
        ax.set_title(title, fontsize=9.5)
        ax.tick_params(labelsize=8.5)
        if i % cols == 0:
            ax.set_ylabel(r"$\sigma_k\, /\, \sigma_1$", fontsize=10.5)
        if i // cols == rows - 1 or i + cols >= len(nodes):
            ax.set_xlabel("rank k", fontsize=9.5)
    for j in range(len(nodes), rows * cols):
        axes[j // cols][j % cols].set_visible(False)
    handles = []

    kinds = sorted({s.kind for s in spectra})
    handles += [Line2D([], [], linestyle=styles[k][0], color=styles[k][1], label=f"{k} split spectrum") for k in kinds if k in styles]
    seen: dict[str, Any] = {}
    for node_marks in marks.values():
        for _, _, color, label in node_marks:
            seen.setdefault(label, color)
    handles += [Line2D([], [], color=c, linewidth=2, marker="o", label=label) for label, c in seen.items()]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=9.5, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / (0.9 + 2.35 * rows)))
    return _png(fig)


def _macs_figure(layers: Sequence[LayerReport], after: Sequence[tuple[str, Any, dict[str, int]]]) -> str:
    """Horizontal bars per layer: MACs before (grey) and after each conversion (``after``: label, color, node → MACs)."""
    shown = [layer for layer in layers if layer.macs_before > 0]
    height = 1.3 + 0.27 * len(shown)
    fig = _new_figure(11.5, height)
    ax = fig.subplots()
    _style_axes(ax)
    ys = list(range(len(shown)))
    before = [layer.macs_before / 1e6 for layer in shown]
    ax.barh(ys, before, height=0.75, color="#cfd4da", label="original")
    if len(after) == 1:
        label, color, macs = after[0]
        ax.barh(ys, [macs.get(layer.node, layer.macs_before) / 1e6 for layer in shown], height=0.42, color=color, label=label)
    else:
        for label, color, macs in after:
            ax.plot([macs.get(layer.node, layer.macs_before) / 1e6 for layer in shown], ys, "o", color=color, markersize=5, label=label)
    ax.set_yticks(ys, [_short(layer.node, 40) for layer in shown], fontsize=8.5 if len(shown) > 30 else 9.5)
    ax.invert_yaxis()
    ax.set_xlabel("MACs per inference at batch 1 (millions)", fontsize=10.5)
    ax.set_xlim(left=0)
    ax.tick_params(axis="x", labelsize=10)
    ax.legend(fontsize=9.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(after) + 1, 6), frameon=False)
    fig.tight_layout()
    return _png(fig)


KERNEL_CLASSES: tuple[tuple[str, str], ...] = (
    ("convolutions", "#3b6ea8"),
    ("fully connected", "#8c6bb1"),
    ("layout reorders", "#e6a23c"),
    ("everything else", "#b8bec5"),
)


def _kernel_classes(by_op: dict[str, float]) -> list[float]:
    """Milliseconds in convolutions, fully connected layers, NCHWc layout reorders and the rest."""
    from .timing import CONV_OPS, FC_OPS

    conv = sum(ms for op, ms in by_op.items() if op in CONV_OPS)
    fc = sum(ms for op, ms in by_op.items() if op in FC_OPS)
    reorder = sum(ms for op, ms in by_op.items() if op.startswith("Reorder"))
    return [conv, fc, reorder, sum(by_op.values()) - conv - fc - reorder]


def _kernels_section(series: list[tuple[str, str, Any]], note: str) -> str:
    """The kernel-time figure of a page: one stacked bar per model of ``series`` (label, colour, kernel times)."""
    return "<h2>Kernel time per operator type</h2>" + _figure(
        _kernels_figure(series),
        "kernel time per operator type",
        "Where each model's kernel time goes, in milliseconds per run (onnxruntime profiler, median per node): "
        "convolutions, fully connected layers, the NCHWc layout reorders onnxruntime inserts around its blocked "
        f"convolutions, and everything else. {note}",
    )


def _kernels_figure(series: Sequence[tuple[str, Any, dict[str, float]]]) -> str:
    """One stacked bar per model (``series``: label, colour, operator type → ms): where its kernel time goes."""
    fig = _new_figure(11.5, 1.6 + 0.45 * len(series))
    ax = fig.subplots()
    _style_axes(ax)
    ys = list(range(len(series)))
    left = [0.0] * len(series)
    parts = [_kernel_classes(by_op) for _, _, by_op in series]
    for j, (name, color) in enumerate(KERNEL_CLASSES):
        widths = [p[j] for p in parts]
        if not any(widths):
            continue
        ax.barh(ys, widths, left=left, height=0.62, color=color, label=name)
        left = [a + b for a, b in zip(left, widths, strict=True)]
    for y, total in zip(ys, left, strict=True):
        ax.annotate(f"{total:.3f} ms", (total, y), textcoords="offset points", xytext=(4, -4), fontsize=9.5)
    ax.set_yticks(ys, [label for label, _, _ in series], fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.12 if max(left) > 0 else 1.0)
    ax.set_xlabel("kernel time per run (ms): onnxruntime profiler, median per node, summed", fontsize=10.5)
    ax.tick_params(axis="x", labelsize=10)
    ax.legend(fontsize=9.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(KERNEL_CLASSES), frameon=False)
    fig.tight_layout()
    return _png(fig)


# --------------------------------------------------------------------------- tables


def _layer_rows(layer: LayerReport) -> list[str]:
    shape = "×".join(map(str, layer.weight_shape)) if layer.weight_shape else "?"
    if layer.groups and layer.groups > 1:
        shape += f" g{layer.groups}"
    cells = [f"<code>{_e(layer.node)}</code>", _e(layer.op_type), _e(shape)]
    if layer.decomposed:
        cells += [_e(layer.kind), f"{layer.rank}/{layer.full_rank}", _num(layer.relative_error, ".4f")]
        cells += [_count(layer.macs_before), _count(layer.macs_after), f"{layer.mac_ratio:.2f}×", ""]
    else:
        cells += [
            "–",
            "–",
            "–",
            _count(layer.macs_before),
            _count(layer.macs_after),
            "1.00×",
            f'<span class="why">{_e(layer.reason)}</span>',
        ]
    return cells


def _error_rows(outputs: Sequence[OutputStats], prefix: Sequence[str] = ()) -> list[list[str]]:
    return [
        [
            *prefix,
            f"<code>{_e(o.name)}</code>",
            _e("×".join(map(str, o.shape))),
            _num(o.max_abs),
            _num(o.max_rel),
            _num(o.mean_abs),
            _num(o.p99_abs),
            _num(o.relative_l2),
            _num(o.cosine, ".6f"),
            _pct(o.top1_agreement),
        ]
        for o in outputs
    ]


ERROR_HEADER = ["output", "shape", "max abs", "max rel", "mean abs", "p99 abs", "rel. L2", "cosine", "top-1 agreement"]
ERROR_NUMERIC = [False, False, True, True, True, True, True, True, True]


def _kernel_table(series: Sequence[tuple[str, dict[str, float]]]) -> str:
    ops = sorted({op for _, by_op in series for op in by_op}, key=lambda op: -max(s[1].get(op, 0.0) for s in series))
    rows = [[_e(op), *[f"{by_op.get(op, 0.0):.3f}" for _, by_op in series]] for op in ops]
    rows.append(["<b>all</b>", *[f"<b>{sum(by_op.values()):.3f}</b>" for _, by_op in series]])
    return _table(["operator type", *[f"{_e(label)} ms" for label, _ in series]], rows, [False] + [True] * len(series))


# --------------------------------------------------------------------------- pages


def sweep_html(result: SweepResult, plots: bool | None = None) -> str:
    """The page for a sweep (see the module docstring); ``plots=False`` leaves the figures out."""
    plots = plots_available() if plots is None else plots
    reached = [r for r in result.rows if r.reached and r.report is not None]
    meta = (
        f"{len(result.rows)} targets; evaluated on {result.samples} {'labelled ' if result.labelled else ''}sample(s) "
        f"({_e(result.inputs)} inputs); latency: median of {result.runs} interleaved runs, {result.threads} onnxruntime thread(s); "
        f"shared preparation {result.prepare_seconds:.2f} s. {_generated()}"
    )
    sections = [_sweep_targets(result)]
    if result.calibration:
        sections.append(f"<p>{_e(_sweep_calibration(result.calibration))}.</p>")
    sections += _sweep_figures(result, reached) if plots else [_no_plots()]
    if reached:
        sections.append(_sweep_layer_table(reached, refit=bool(result.calibration.get("refit"))))
        error_rows = []
        for row in reached:
            error_rows += _error_rows(row.outputs, [f"{row.target:g}×"])
        sections.append("<h2>Output error statistics</h2>" + _table(["target", *ERROR_HEADER], error_rows, [True, *ERROR_NUMERIC]))
        profiled = [r for r in reached if r.kernels]
        if profiled:
            series_t = [("original", profiled[0].kernels["original"])]  # type: ignore[index]
            series_t += [(f"{r.target:g}×", r.kernels["candidate"]) for r in profiled]  # type: ignore[index]
            sections.append("<h3>Kernel time per operator type (ms per run)</h3>" + _kernel_table(series_t))
    return _page(f"onnx-lowrank sweep: {result.model}", meta, sections)


def _sweep_targets(result: SweepResult) -> str:
    """The table of targets (a row each: plan, MACs, measured speed, answers) and what it means."""
    header = ["target", "plan", "MAC ratio", "measured speedup", "latency ms<br>original → converted", "output rel. L2", "top-1 agreement"]
    numeric = [True, False, *[True] * 5]
    tuned = any(r.untuned is not None for r in result.rows)
    show_answers = any(r.answers for r in result.rows)
    if show_answers:
        header.append("answers<br>before → after the fine-tune" if tuned else "answers")
        numeric.append(True)
    if result.labelled:
        header.append("accuracy")
        numeric.append(True)
    header += ["layers decomposed", "convert s", "notes"]
    numeric += [True, True, False]
    rows = []
    for row in result.rows:
        cells = [f"{row.target:g}×"]
        if not row.reached:
            cells += ["–"] * (len(header) - 2) + [f'<span class="why">not reached: {_e(row.reason)}</span>']
            rows.append(cells)
            continue
        ms = f"{row.original_ms:.3f} → {row.candidate_ms:.3f}" if row.original_ms and row.candidate_ms else "not timed"
        cells += [
            _e(row.planned_by or "–"),
            _num(row.mac_ratio, ".2f") + "×",
            _num(row.latency_ratio, ".2f") + ("×" if row.latency_ratio else ""),
            ms,
        ]
        before = row.untuned
        cells += [
            _before_after(before.relative_l2 if before else None, row.relative_l2, lambda v: _num(v, ".3g")),
            _before_after(before.top1_agreement if before else None, row.top1_agreement, _pct),
        ]
        if show_answers:
            cells.append(_answers_cell(summary_measure(before.answers) if before else None, row.answer))
        if result.labelled:
            cells.append(_before_after(before.accuracy if before else None, row.accuracy, _pct))
        cells += [f"{row.decomposed}/{row.layers}", f"{row.convert_seconds:.2f}", _e("; ".join(row.notes))]
        rows.append(cells)
    if not any(row.notes or not row.reached for row in result.rows):  # no notes: no empty column
        header, numeric, rows = header[:-1], numeric[:-1], [cells[:-1] for cells in rows]
    table = _table(header, rows, numeric)
    accuracy = next((r.accuracy_original for r in result.rows if r.accuracy_original is not None), None)
    default_note = (
        (f"<p>The original model's accuracy: {_pct(accuracy)}.</p>" if accuracy is not None else "")
        + f"<p>The default <code>--speedup</code> is {result.default_target:g}; each target is planned as "
        "<code>decompose --speedup S</code> plans it with the same options (the plan column says by what), so the starred "
        f"target is the model <code>decompose --speedup {result.default_target:g}</code> writes. "
        "MAC ratio: MACs of the decomposable layers (Conv, ConvTranspose, Gemm, MatMul) before / after. "
        "Measured speedup: original / converted latency in onnxruntime on this machine.</p>"
    )
    return "<h2>Targets</h2>" + table + default_note


def _sweep_calibration(cal: Mapping[str, Any]) -> str:
    """One sentence on what calibration measured once for every target."""
    text = f"Calibration: {cal.get('samples', 0)} samples"
    if "statistics_seconds" in cal:
        text += f"; the layers' input statistics gathered once in {cal['statistics_seconds']:.1f} s"
    if "sensitivity" in cal:
        sens = cal["sensitivity"]
        text += f", their gains measured once on {sens['samples']} samples in {sens['seconds']:.1f} s"
    if "statistics_seconds" in cal:
        text += ", shared by every target"
    return text + ("; each target's factors refit on its own" if cal.get("refit") else "; no refit")


def _sweep_figures(result: SweepResult, reached: Sequence[Any]) -> list[str]:
    """The figures: accuracy against speed, the spectra with each target's ranks, MACs and kernel time per layer."""
    sections = []
    colors = _target_colors([r.target for r in result.rows])
    tradeoff = _tradeoff_figure(result)
    if tradeoff is not None:
        sections.append("<h2>Accuracy against speed</h2>" + _figure(tradeoff[0], "accuracy or output error against speedup", tradeoff[1]))
    if not reached:
        return sections
    marks: dict[str, list[tuple[str, int, Any, str]]] = {}
    for row in reached:
        for layer in row.report.decomposed:
            marks.setdefault(layer.node, []).append((str(layer.kind), int(layer.rank or 0), colors[row.target], f"rank at {row.target:g}×"))
    if result.spectra:
        uri = _spectra_figure(result.spectra, marks, single=False)
        caption = (
            "Each decomposed layer's singular values σ<sub>k</sub>/σ<sub>1</sub> (log scale) against the rank k, for the split "
            "used; the vertical lines mark the rank chosen at each target (colour). The kernel error at each rank is in the "
            "per-layer table below."
        )
        sections.append("<h2>Spectra and chosen ranks</h2>" + _figure(uri, "per-layer singular value spectra", caption))
    after = [
        (f"after, {row.target:g}×", colors[row.target], {layer.node: layer.macs_after for layer in row.report.layers}) for row in reached
    ]
    uri = _macs_figure(reached[0].report.layers, after)
    sections.append(
        "<h2>MACs per layer</h2>"
        + _figure(uri, "MACs per layer before and after", "Grey bars: each layer's MACs in the original; dots: after each target.")
    )
    profiled = [r for r in reached if r.kernels]
    if profiled:
        series = [("original", "#9aa3ad", profiled[0].kernels["original"])]
        series += [(f"{r.target:g}×", colors[r.target], r.kernels["candidate"]) for r in profiled]
        sections.append(_kernels_section(series, "The table below has every operator type."))
    return sections


def _sweep_layer_table(rows: Sequence[Any], refit: bool) -> str:
    reports = [(row.target, row.report) for row in rows]
    layers = reports[0][1].layers
    body = []
    for i, layer in enumerate(layers):
        cells = [f"<code>{_e(layer.node)}</code>", _e(layer.op_type), _count(layer.macs_before)]
        for _, report in reports:
            other = report.layers[i]
            if other.decomposed:
                kind = "" if other.kind == "spatial" else f"{_e(other.kind)} "
                cells.append(f'{kind}{other.rank}/{other.full_rank} <span class="err">{_num(other.relative_error, ".3f")}</span>')
            else:
                cells.append("–")
        body.append(cells)
    header = ["layer", "op", "MACs", *[f"{t:g}×" for t, _ in reports]]
    return (
        "<h2>Ranks per layer</h2><p>Per target: the rank out of the full rank (spatial split unless marked channel), then in grey "
        "the relative kernel error ‖W − W<sub>K</sub>‖/‖W‖ of the factors as stored"
        + (" before the refit (which fits the outputs, not the kernel)" if refit else "")
        + "; – : left as is.</p>"
        + _table(header, body, [False, False, True, *[True] * len(reports)])
    )


def _describe_policy(policy: dict[str, Any]) -> str:
    """``--speedup 2, kinds spatial+channel, ...`` from the report's policy."""
    parts = [f"--{k.replace('_', '-')} {v:g}" for k, v in policy.items() if k in ("speedup", "params_ratio", "energy", "rank")]
    if policy.get("name") == "ranks":
        parts.append("ranks from a file")
    if policy.get("kinds"):
        parts.append("splits " + "+".join(policy["kinds"]))
    if policy.get("rank_multiple", 1) > 1:
        parts.append(f"ranks multiples of {policy['rank_multiple']}")
    parts.append("BatchNormalization folded" if policy.get("fold_bn") else "BatchNormalization kept")
    if policy.get("measure"):
        parts.append("ranks by measured latency")
    if policy.get("allocation"):
        parts.append(f"allocation by {policy['allocation']}")
    return ", ".join(parts)


def decompose_html(
    model_name: str,
    report: Report,
    spectra: Sequence[LayerSpectrum],
    verify: VerifyResult | None = None,
    plots: bool | None = None,
    notes: Sequence[str] = (),
) -> str:
    """The page for one conversion: totals, spectra, MACs per layer, and the error statistics of ``verify``."""
    plots = plots_available() if plots is None else plots
    meta = f"{_e(_describe_policy(report.policy))}. {_generated()}"
    totals = [
        ["MACs (decomposable layers)", f"{_count(report.macs_before)} → {_count(report.macs_after)}", f"{report.mac_ratio:.2f}× fewer"],
        [
            "parameters",
            f"{_count(report.params_before)} → {_count(report.params_after)}",
            f"{report.params_after / max(report.params_before, 1):.2f}× as many",
        ],
        ["layers decomposed", f"{len(report.decomposed)} of {len(report.layers)}", ""],
        ["conversion time", f"{report.seconds:.2f} s", ""],
    ]
    lat = report.latency
    if lat and "measured_speedup" in lat:
        runs = f"{lat['threads']} thread(s), median of {lat['runs']} interleaved runs"
        if lat.get("by") == "latency":
            label, note = "latency (planned by it)", f" (target {lat['target']:g}×{'' if lat['met'] else ', not met'}; {runs})"
        else:
            label, note = "latency (timed after planning)", f" ({runs})"
        totals.append([label, f"{lat['original_ms']:.3f} → {lat['candidate_ms']:.3f} ms", f"{lat['measured_speedup']:.2f}×{note}"])
    if verify is not None and verify.latency_ratio is not None:
        totals.append(
            [
                "verify latency",
                f"{verify.original_ms:.3f} → {verify.candidate_ms:.3f} ms",
                f"{verify.latency_ratio:.2f}× (median of {verify.runs} interleaved runs)",
            ]
        )
    sections = [
        "<h2>Summary</h2>" + _table(["", "original → converted", "ratio"], [[_e(c) for c in r] for r in totals], [False, True, True])
    ]
    if report.warnings or notes:
        sections.append("".join(f'<p class="note">{_e(w)}</p>' for w in [*report.warnings, *notes]))
    if verify is not None:
        rows = _error_rows(verify.outputs)
        text = "<h2>Output error statistics</h2>"
        text += f"<p>Converted against original in onnxruntime on {verify.samples} sample(s).</p>"
        text += _table(ERROR_HEADER, rows, ERROR_NUMERIC)
        for o in verify.outputs:
            if o.accuracy_original is not None and o.accuracy_candidate is not None:
                text += f"<p>{_e(o.name)}: accuracy {_pct(o.accuracy_original)} (original) → {_pct(o.accuracy_candidate)} (converted).</p>"
        sections.append(text)
    if not plots:
        sections.append(_no_plots())
    decomposed = report.decomposed
    if plots and decomposed and spectra:
        marks = {layer.node: [(str(layer.kind), int(layer.rank or 0), "#d62728", "chosen rank")] for layer in decomposed}
        caption = (
            "Each decomposed layer's singular values σ<sub>k</sub>/σ<sub>1</sub> (log scale) against the rank k; the red line "
            "marks the chosen rank, and the title gives the split, the rank out of the full rank and the relative kernel error "
            "‖W − W<sub>K</sub>‖/‖W‖ there (Eckart–Young optimum)."
        )
        sections.append("<h2>Spectra and chosen ranks</h2>" + _figure(_spectra_figure(spectra, marks, single=True), "spectra", caption))
    if plots and report.layers:
        uri = _macs_figure(report.layers, [("converted", "#3b6ea8", {layer.node: layer.macs_after for layer in report.layers})])
        sections.append(
            "<h2>MACs per layer</h2>" + _figure(uri, "MACs per layer", "Grey: each layer's MACs in the original; blue: after conversion.")
        )
    if plots and verify is not None and verify.kernels:
        series = [("original", "#9aa3ad", verify.kernels["original"]), ("converted", "#3b6ea8", verify.kernels["candidate"])]
        sections.append(_kernels_section(series, "Timed on the first batch of the verify inputs."))
    if verify is not None and verify.kernels:
        sections.append(_kernel_table([("original", verify.kernels["original"]), ("converted", verify.kernels["candidate"])]))
    header = ["layer", "op", "weight", "kind", "rank", "kernel error", "MACs", "MACs after", "ratio", "note"]
    sections.append("<h2>Layers</h2>" + _table(header, [_layer_rows(layer) for layer in report.layers], [False] * 4 + [True] * 5 + [False]))
    return _page(f"onnx-lowrank: {model_name}", meta, sections)
