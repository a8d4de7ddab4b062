"""INT8 quantization of a (decomposed) model with onnxruntime's own tools.

Two modes, both ``onnxruntime.quantization``:

* ``dynamic``: ``quantize_dynamic``. Weights become int8 constants; activations
  are quantized at run time per tensor (``DynamicQuantizeLinear``), convs become
  ``ConvInteger`` and fully connected layers ``MatMulInteger``/
  ``DynamicQuantizeMatMul``. No data needed.
* ``static``: ``quantize_static`` in the QDQ format (QuantizeLinear/
  DequantizeLinear pairs around each quantized node, which onnxruntime fuses
  into QLinearConv/QLinearMatMul kernels and mobile EPs read as quantized node
  units), activation ranges calibrated (MinMax) on the calibration data, read
  through a ``CalibrationDataReader`` over
  :func:`onnx_lowrank.calibration.load_calibration`/``iter_batches``.

Types follow onnxruntime's guidance for CPU inference: int8 weights, per
output channel (the thin factors of a low-rank pair differ a lot between
channels), uint8 activations, and weights on 7 bits (``reduce_range``) so
that the u8×s8 products cannot saturate on x86 cores without VNNI (this
machine's); ``reduce_range=False`` and int8 activations suit ARM cores better.

:func:`quantize_model` returns the quantized model and, per node of the input,
the form it now runs in (:func:`quantized_forms`), which the per-layer report
shows for each decomposed pair.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import onnx

from .errors import LowRankError
from .model_io import ModelLike
from .report import Report

__all__ = ["MODES", "QuantizeResult", "quantize_conversion", "quantize_model", "quantized_forms"]

MODES = ("dynamic", "static")
Mode = Literal["dynamic", "static"]

_INTEGER_OPS = {"ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QLinearConv", "QLinearMatMul"}
_QUANTIZABLE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass
class QuantizeResult:
    model: onnx.ModelProto
    mode: str
    settings: dict[str, Any]
    forms: dict[str, str]  # node name of the input model -> the form it runs in after quantization
    samples: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, for the report."""
        return {
            "mode": self.mode,
            **self.settings,
            "samples": self.samples,
            "seconds": self.seconds,
            "quantized_nodes": sum(1 for f in self.forms.values() if f != "float"),
            "warnings": list(self.warnings),
        }


def quantized_forms(original: onnx.ModelProto, quantized: onnx.ModelProto) -> dict[str, str]:
    """Per Conv/ConvTranspose/Gemm/MatMul node of ``original`` (by name): how it runs in ``quantized``.

    ``"int8 (QDQ)"``: the node reads a DequantizeLinear weight (static QDQ); ``"ConvInteger"``, ``"MatMulInteger"``,
    …: replaced by that integer operator (dynamic; onnxruntime names it after the node, ``NAME_quant``,
    ``NAME_MatMul_quant``); ``"float"``: left as it was.
    """
    by_name = {n.name: n for n in quantized.graph.node if n.name}
    dequantized = {out for n in quantized.graph.node if n.op_type == "DequantizeLinear" for out in n.output}
    integer = [n for n in quantized.graph.node if n.op_type in _INTEGER_OPS and n.name]
    forms: dict[str, str] = {}
    for node in original.graph.node:
        if node.op_type not in _QUANTIZABLE or not node.name:
            continue
        now = by_name.get(node.name)
        if now is not None and now.op_type == node.op_type:
            weight_quantized = len(now.input) > 1 and now.input[1] in dequantized
            forms[node.name] = "int8 (QDQ)" if weight_quantized else "float"
            continue
        replaced = next((n for n in integer if n.name.startswith(node.name + "_")), None)
        forms[node.name] = replaced.op_type if replaced is not None else "float"
    return forms


class _Reader:
    """A ``CalibrationDataReader`` (which it satisfies by ``get_next``): one feed per call, ``None`` at the end."""

    def __init__(self, feeds: Iterator[dict[str, Any]]) -> None:
        self._feeds = feeds
        self.samples = 0

    def get_next(self) -> dict[str, Any] | None:
        feed = next(self._feeds, None)
        if feed is not None:
            self.samples += len(next(iter(feed.values()))) if feed else 0
        return feed


def quantize_model(
    model: ModelLike,
    mode: str,
    *,
    calibration: Any = None,
    samples: int = 128,
    batch_size: int = 16,
    per_channel: bool = True,
    reduce_range: bool = True,
    activation_type: Literal["uint8", "int8"] = "uint8",
    nodes_to_exclude: Sequence[str] = (),
) -> QuantizeResult:
    """Quantize ``model`` to INT8 with onnxruntime.quantization (module docstring); the model is not changed.

    ``mode`` is ``"dynamic"`` or ``"static"``; ``static`` needs ``calibration`` (what
    :func:`onnx_lowrank.calibration.load_calibration` reads), of which at most ``samples`` are used in batches of
    ``batch_size``. Raises :class:`LowRankError` for a bad mode, missing or unreadable data, or a model onnxruntime's
    quantizer cannot handle.
    """
    if mode not in MODES:
        raise LowRankError(f"quantization mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "static" and calibration is None:
        raise LowRankError("--quantize static needs calibration data (--calibration FILE.npz|FOLDER)")
    try:
        from onnxruntime import quantization as q
    except ImportError as exc:
        raise LowRankError(f"this onnxruntime has no quantization tools ({exc})") from None
    from .mobile import captured_logs
    from .model_io import load_model, save_model

    start = time.perf_counter()
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    weight_type = q.QuantType.QInt8
    act_type = q.QuantType.QUInt8 if activation_type == "uint8" else q.QuantType.QInt8
    settings: dict[str, Any] = {
        "weight_type": "int8",
        "per_channel": per_channel,
        "reduce_range": reduce_range,
    }
    reader: _Reader | None = None
    with tempfile.TemporaryDirectory() as tmp, captured_logs() as logged:
        raw, source, target = Path(tmp) / "model.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "quantized.onnx"
        big = proto.ByteSize() > (1 << 30) if _small_enough(proto) else True
        save_model(proto, raw, external_data=big)
        settings["pre_processing"] = _pre_process(q, raw, source, big)
        try:
            if mode == "dynamic":
                settings.update(format="dynamic (integer operators)", activation_type="uint8, per tensor at run time")
                q.quantize_dynamic(
                    source,
                    target,
                    weight_type=weight_type,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    nodes_to_exclude=list(nodes_to_exclude),
                    use_external_data_format=big,
                )
            else:
                from .calibration import iter_batches, load_calibration

                data = load_calibration(calibration, proto)
                reader = _Reader(iter_batches(proto, data, batch_size, limit=samples))
                settings.update(format="QDQ", activation_type=activation_type, calibration="MinMax")
                q.quantize_static(
                    source,
                    target,
                    reader,
                    quant_format=q.QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=act_type,
                    weight_type=weight_type,
                    nodes_to_exclude=list(nodes_to_exclude),
                    use_external_data_format=big,
                    # MinMax keeps one min and max per tensor and batch (ReduceMin/ReduceMax outputs): small whatever
                    # the model. (Its CalibMaxIntermediateOutputs option drops batches unreduced in onnxruntime 1.32.)
                    calibrate_method=q.CalibrationMethod.MinMax,
                )
        except LowRankError:
            raise
        except Exception as exc:  # onnxruntime's quantizer raises many exception types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LowRankError(f"onnxruntime's {mode} quantization failed: {first}") from None
        quantized = load_model(target)
    forms = quantized_forms(proto, quantized)
    notes = sorted(set(logged))
    return QuantizeResult(
        quantized,
        mode,
        settings,
        forms,
        samples=reader.samples if reader is not None else 0,
        seconds=time.perf_counter() - start,
        warnings=notes,
    )


def _pre_process(q: Any, raw: Path, prepared: Path, big: bool) -> str:
    """onnxruntime's quantization pre-processing (shape inference, basic graph optimization), as its docs advise;
    where it fails (symbolic shape inference does on some graphs) the model is quantized as it is, and the report says so."""
    try:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        quant_pre_process(raw, prepared, save_as_external_data=big, all_tensors_to_one_file=True)
        return "onnxruntime quant_pre_process"
    except Exception as exc:  # onnxruntime raises many exception types here
        import shutil

        shutil.copyfile(raw, prepared)
        if big:
            shutil.copyfile(raw.with_name(raw.name + ".data"), prepared.with_name(raw.name + ".data"))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"skipped: quant_pre_process failed ({first})"


def _small_enough(proto: onnx.ModelProto) -> bool:
    try:
        proto.ByteSize()
    except (ValueError, OverflowError):
        return False
    return True


def layer_forms(forms: Mapping[str, str], nodes: Sequence[str]) -> str:
    """One cell for a layer made of ``nodes``: their common form, or the forms joined by ``/``."""
    found = [forms.get(n, "float") for n in nodes]
    return found[0] if len(set(found)) == 1 else "/".join(found)


def quantize_conversion(model: onnx.ModelProto, report: Report, mode: str, calibration: Any = None) -> onnx.ModelProto:
    """``decompose(quantize=...)``: the converted ``model`` quantized to INT8; ``report`` gains each layer's form,
    the quantization's settings and its warnings."""
    result = quantize_model(model, mode, calibration=calibration)
    for layer in report.layers:
        nodes = [layer.vertical_node or "", layer.horizontal_node or ""] if layer.decomposed else [layer.node]
        layer.quantized = layer_forms(result.forms, nodes)
    report.quantization = result.to_dict()
    report.warnings.extend(result.warnings)
    return result.model
