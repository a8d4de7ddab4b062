"""ONNX operators as torch functions: what :mod:`onnx_lowrank.finetune.interpreter` evaluates a graph with.

Each supported operator has a *compiler* that reads the node's attributes once (with the defaults of the
opset the model imports) and returns a *kernel*: a function from the node's input tensors (``None`` for an
omitted optional input) to its output tensors. A compiler raises :class:`Unsupported` with a one-line
reason for an attribute value it does not implement, so a model is refused before it runs, never evaluated
by a guess. Kernels compute with the tensors' own dtypes (fp16 stays fp16) and only differentiable torch
operations where gradients are needed (weights, activations); indices, shapes and masks are integer
tensors computed as ONNX defines them.

Semantics follow the ONNX operator specification; where it leaves a choice to the runtime, onnxruntime's
CPU kernels are the reference:

* convolution and pooling pads may be asymmetric: the input is padded explicitly (``F.pad``) and the torch
  op runs without padding; ``auto_pad`` is resolved from the run's input size;
* pooling in ``ceil_mode`` makes as many windows as ONNX does (one fewer when the last one would start in
  the end padding) and counts an average over the elements inside the input and, with
  ``count_include_pad``, the pads, never the extension;
* ``BatchNormalization`` has its inference semantics: it uses the stored mean and variance and updates
  nothing, so a graph computes the same function whether torch is in train or eval mode;
* ``Resize`` computes each output coordinate's source position by the node's
  ``coordinate_transformation_mode`` in float32 (as onnxruntime does) and gathers (``nearest``, by its
  ``nearest_mode``) or interpolates (``linear``, source positions clamped to the input) axis by axis;
* ``LSTM``/``GRU``/``RNN``: ONNX gate orders (LSTM ``i o f c``, GRU ``z r h``), ``B`` = input bias ‖
  recurrent bias, forward, reverse or bidirectional, ``layout`` 0 or 1, peepholes and ``clip``; the input
  projection of every time step is one product, the recurrence a loop over time steps.

``If`` is handled by the interpreter itself (it evaluates the branch its condition picks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

__all__ = [
    "COMPILERS",
    "Kernel",
    "KernelFailure",
    "NodeSpec",
    "Unsupported",
    "onnx_to_torch_dtype",
    "tensor_from_proto",
    "tensor_to_array",
]

Tensor = torch.Tensor
Inputs = Sequence[Tensor | None]
Kernel = Callable[[Inputs], list[Tensor]]


class Unsupported(Exception):
    """A node the interpreter cannot evaluate; the message is the one-line reason."""


class KernelFailure(Unsupported):
    """A kernel that torch failed to run on the tensors it was given (a case the compiler did not foresee)."""


_DTYPES: dict[int, torch.dtype] = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def onnx_to_torch_dtype(elem_type: int) -> torch.dtype:
    """The torch dtype of an ONNX element type; :class:`Unsupported` for one torch cannot compute with."""
    try:
        return _DTYPES[elem_type]
    except KeyError:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else str(elem_type)
        raise Unsupported(f"element type {name.lower()}") from None


def tensor_from_proto(tensor: onnx.TensorProto) -> Tensor:
    """A constant as a torch tensor of its own dtype (a copy: numpy's array may be read-only)."""
    onnx_to_torch_dtype(tensor.data_type)
    array = numpy_helper.to_array(tensor)
    if tensor.data_type == onnx.TensorProto.BFLOAT16:  # numpy has no bfloat16: through its bit patterns
        bits = np.ascontiguousarray(array).view(np.uint16).astype(np.int16, copy=False)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def tensor_to_array(value: Tensor) -> np.ndarray:
    """A tensor as numpy (bfloat16 as its uint16 bit patterns, which is how ONNX stores it)."""
    value = value.detach()
    if value.dtype == torch.bfloat16:
        return value.view(torch.int16).numpy().view(np.uint16).copy()
    return value.numpy().copy()


@dataclass
class NodeSpec:
    """A node, the opset of its domain, and its attributes as Python values (strings decoded)."""

    node: onnx.NodeProto
    opset: int
    attrs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, node: onnx.NodeProto, opset: int) -> NodeSpec:
        attrs: dict[str, Any] = {}
        for attr in node.attribute:
            if attr.ref_attr_name:
                raise Unsupported(f"attribute {attr.name!r} refers to a function attribute")
            value = helper.get_attribute_value(attr)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, list) and value and isinstance(value[0], bytes):
                value = [v.decode("utf-8", "replace") for v in value]
            attrs[attr.name] = value
        return cls(node, opset, attrs)

    def get(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def ints(self, name: str) -> list[int] | None:
        value = self.attrs.get(name)
        return None if value is None else [int(v) for v in value]

    @property
    def outputs(self) -> int:
        """Outputs the graph reads (an empty name is an omitted optional output)."""
        return sum(1 for o in self.node.output if o)


Compiler = Callable[[NodeSpec], Kernel]
COMPILERS: dict[str, Compiler] = {}


def _op(*names: str) -> Callable[[Compiler], Compiler]:
    def register(compiler: Compiler) -> Compiler:
        for name in names:
            COMPILERS[name] = compiler
        return compiler

    return register


def _need(value: Tensor | None, what: str) -> Tensor:
    if value is None:
        raise Unsupported(f"missing input {what}")
    return value


def _ints(value: Tensor | None) -> list[int]:
    """An integer tensor (a shape, axes, pads) as a list."""
    return [] if value is None else [int(v) for v in value.reshape(-1).tolist()]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _only_first_output(spec: NodeSpec, what: str = "") -> None:
    if any(o for o in spec.node.output[1:]):
        raise Unsupported(f"{spec.node.op_type} with its optional outputs{what}")


# --------------------------------------------------------------------------- element-wise


def _unary(fn: Callable[[Tensor], Tensor]) -> Compiler:
    def compile_unary(spec: NodeSpec) -> Kernel:
        return lambda inputs: [fn(_need(inputs[0], "X"))]

    return compile_unary


_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": torch.sqrt,
    "Abs": torch.abs,
    "Neg": torch.neg,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Sign": torch.sign,
    "Erf": torch.erf,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Tan": torch.tan,
    "Atan": torch.atan,
    "Softsign": F.softsign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Identity": lambda x: x,
    "HardSwish": F.hardswish,  # x · max(0, min(1, x/6 + 1/2)): ONNX's alpha 1/6, beta 1/2
    "Mish": lambda x: x * torch.tanh(F.softplus(x)),
    "Softplus": lambda x: torch.log1p(torch.exp(-x.abs())) + torch.clamp(x, min=0),  # log(1 + eˣ) without overflow
}
for _name, _fn in _UNARY.items():
    COMPILERS[_name] = _unary(_fn)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Compiler:
    def compile_binary(spec: NodeSpec) -> Kernel:
        return lambda inputs: [fn(_need(inputs[0], "A"), _need(inputs[1], "B"))]

    return compile_binary


def _divide(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # integer Div truncates, as in C


def _power(a: Tensor, b: Tensor) -> Tensor:
    return torch.pow(a, b).to(a.dtype)


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _divide,
    "Pow": _power,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}
for _name, _fn2 in _BINARY.items():
    COMPILERS[_name] = _binary(_fn2)


@_op("Mod")
def _mod(spec: NodeSpec) -> Kernel:
    fn = torch.fmod if int(spec.get("fmod", 0)) else torch.remainder  # fmod=0: the result takes the divisor's sign
    return lambda inputs: [fn(_need(inputs[0], "A"), _need(inputs[1], "B"))]


def _variadic(fn: Callable[[Tensor, Tensor], Tensor], mean: bool = False) -> Compiler:
    def compile_variadic(spec: NodeSpec) -> Kernel:
        def run(inputs: Inputs) -> list[Tensor]:
            values = [v for v in inputs if v is not None]
            out = values[0]
            for v in values[1:]:
                out = fn(out, v)
            return [out / len(values) if mean else out]

        return run

    return compile_variadic


COMPILERS["Max"] = _variadic(torch.maximum)
COMPILERS["Min"] = _variadic(torch.minimum)
COMPILERS["Sum"] = _variadic(torch.add)
COMPILERS["Mean"] = _variadic(torch.add, mean=True)


@_op("Where")
def _where(spec: NodeSpec) -> Kernel:
    return lambda inputs: [torch.where(_need(inputs[0], "condition"), _need(inputs[1], "X"), _need(inputs[2], "Y"))]


@_op("IsInf")
def _isinf(spec: NodeSpec) -> Kernel:
    positive, negative = int(spec.get("detect_positive", 1)), int(spec.get("detect_negative", 1))

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "X")
        return [torch.isinf(x) & (((x > 0) & bool(positive)) | ((x < 0) & bool(negative)))]

    return run


@_op("LeakyRelu")
def _leaky_relu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.get("alpha", 0.01))
    return lambda inputs: [F.leaky_relu(_need(inputs[0], "X"), alpha)]


@_op("Elu")
def _elu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.get("alpha", 1.0))
    return lambda inputs: [F.elu(_need(inputs[0], "X"), alpha)]


@_op("Celu")
def _celu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.get("alpha", 1.0))
    return lambda inputs: [F.celu(_need(inputs[0], "X"), alpha)]


@_op("Selu")
def _selu(spec: NodeSpec) -> Kernel:
    alpha, gamma = float(spec.get("alpha", 1.67326319217681884765625)), float(spec.get("gamma", 1.05070102214813232421875))

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "X")
        return [gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))]

    return run


@_op("ThresholdedRelu")
def _thresholded_relu(spec: NodeSpec) -> Kernel:
    alpha = float(spec.get("alpha", 1.0))

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "X")
        return [torch.where(x > alpha, x, torch.zeros_like(x))]

    return run


@_op("HardSigmoid")
def _hard_sigmoid(spec: NodeSpec) -> Kernel:
    alpha, beta = float(spec.get("alpha", 0.2)), float(spec.get("beta", 0.5))
    return lambda inputs: [torch.clamp(alpha * _need(inputs[0], "X") + beta, 0.0, 1.0)]


@_op("PRelu")
def _prelu(spec: NodeSpec) -> Kernel:
    def run(inputs: Inputs) -> list[Tensor]:
        x, slope = _need(inputs[0], "X"), _need(inputs[1], "slope")
        if spec.opset < 7 and slope.dim() == 1 and x.dim() > 2 and slope.shape[0] == x.shape[1] != x.shape[-1]:
            slope = _channel_view(slope, x.dim())  # before opset 7 a 1-D slope is per channel
        return [torch.where(x < 0, x * slope, x)]

    return run


@_op("Gelu")
def _gelu(spec: NodeSpec) -> Kernel:
    approximate = str(spec.get("approximate", "none"))
    if approximate not in ("none", "tanh"):
        raise Unsupported(f"Gelu approximate={approximate!r}")
    return lambda inputs: [F.gelu(_need(inputs[0], "X"), approximate=approximate)]


@_op("Clip")
def _clip(spec: NodeSpec) -> Kernel:
    if spec.opset < 11:
        low, high = spec.get("min"), spec.get("max")
        return lambda inputs: [torch.clamp(_need(inputs[0], "input"), low, high)]

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "input")
        low = inputs[1] if len(inputs) > 1 else None
        high = inputs[2] if len(inputs) > 2 else None
        if low is not None:
            x = torch.maximum(x, low.to(x.dtype))
        if high is not None:
            x = torch.minimum(x, high.to(x.dtype))
        return [x]

    return run


@_op("Cast")
def _cast(spec: NodeSpec) -> Kernel:
    dtype = onnx_to_torch_dtype(int(spec.get("to", 0)))
    if spec.get("saturate", 1) != 1:
        raise Unsupported("Cast with saturate=0")
    return lambda inputs: [_need(inputs[0], "input").to(dtype)]


@_op("CastLike")
def _cast_like(spec: NodeSpec) -> Kernel:
    return lambda inputs: [_need(inputs[0], "input").to(_need(inputs[1], "target_type").dtype)]


@_op("Dropout")
def _dropout(spec: NodeSpec) -> Kernel:
    # inference: the identity (a training_mode input of true would sample a mask; onnxruntime's inference
    # sessions do not either unless asked, and no exporter sets it)
    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "data")
        if len(inputs) > 2 and inputs[2] is not None and bool(inputs[2].reshape(-1)[0]):
            raise Unsupported("Dropout with training_mode true")
        outs = [x]
        if spec.outputs > 1:
            outs.append(torch.ones_like(x, dtype=torch.bool))
        return outs

    return run


# --------------------------------------------------------------------------- geometry shared by conv and pooling


def _explicit_pads(
    spec: NodeSpec, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    """``[b₁..bₙ, e₁..eₙ]`` from ``pads`` or ``auto_pad`` (SAME_* pads from the run's input size)."""
    auto = str(spec.get("auto_pad", "NOTSET"))
    rank = len(kernel)
    if auto in ("NOTSET", ""):
        pads = spec.ints("pads") or [0] * (2 * rank)
        if len(pads) != 2 * rank:
            raise Unsupported(f"pads {pads} for a {rank}-D kernel")
        return pads
    if auto == "VALID":
        return [0] * (2 * rank)
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad {auto!r}")
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
        total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)
        ends.append(large if auto == "SAME_UPPER" else small)
    return begins + ends


def _torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b₁..bₙ, e₁..eₙ]`` to ``F.pad``'s order (last axis first)."""
    rank = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(rank)):
        out += [pads[i], pads[i + rank]]
    return out


def _geometry(spec: NodeSpec, rank: int) -> tuple[list[int], list[int]]:
    strides = spec.ints("strides") or [1] * rank
    dilations = spec.ints("dilations") or [1] * rank
    if len(strides) != rank or len(dilations) != rank:
        raise Unsupported(f"strides {strides} / dilations {dilations} for a {rank}-D kernel")
    return strides, dilations


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


@_op("Conv")
def _conv(spec: NodeSpec) -> Kernel:
    group = int(spec.get("group", 1))

    def run(inputs: Inputs) -> list[Tensor]:
        x, w = _need(inputs[0], "X"), _need(inputs[1], "W")
        bias = inputs[2] if len(inputs) > 2 else None
        rank = w.dim() - 2
        if rank not in _CONV:
            raise Unsupported(f"Conv with a {rank}-D kernel")
        kernel = list(w.shape[2:])
        strides, dilations = _geometry(spec, rank)
        pads = _explicit_pads(spec, list(x.shape[2:]), kernel, strides, dilations)
        symmetric = pads[:rank] == pads[rank:]
        if not symmetric:
            x = F.pad(x, _torch_pads(pads))
        padding = pads[:rank] if symmetric else [0] * rank
        return [_CONV[rank](x, w, bias, strides, padding, dilations, group)]

    return run


@_op("ConvTranspose")
def _conv_transpose(spec: NodeSpec) -> Kernel:
    group = int(spec.get("group", 1))
    auto = str(spec.get("auto_pad", "NOTSET"))
    if auto not in ("NOTSET", "", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise Unsupported(f"auto_pad {auto!r}")

    def run(inputs: Inputs) -> list[Tensor]:
        x, w = _need(inputs[0], "X"), _need(inputs[1], "W")
        bias = inputs[2] if len(inputs) > 2 else None
        rank = w.dim() - 2
        if rank not in _CONV_T:
            raise Unsupported(f"ConvTranspose with a {rank}-D kernel")
        kernel = list(w.shape[2:])
        strides, dilations = _geometry(spec, rank)
        extra = spec.ints("output_padding") or [0] * rank
        in_sizes = list(x.shape[2:])
        # the full transposed convolution, then the ONNX pads cropped and output_padding appended
        full = [s * (n - 1) + (k - 1) * d + 1 for n, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True)]
        shape = spec.ints("output_shape")
        if shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
            wanted = shape[-rank:] if shape is not None else [n * s for n, s in zip(in_sizes, strides, strict=True)]
            # as onnxruntime: the total padding is never negative (a larger output is filled at the end), and
            # SAME_UPPER puts the smaller half of an odd total at the start, the others the larger half
            totals = [max(0, f + e - o) for f, e, o in zip(full, extra, wanted, strict=True)]
            begins = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in totals]
            ends = [f + e - o - b for f, e, o, b in zip(full, extra, wanted, begins, strict=True)]
            pads = begins + ends
        elif auto == "VALID":
            pads = [0] * (2 * rank)
        else:
            pads = spec.ints("pads") or [0] * (2 * rank)
        y = _CONV_T[rank](x, w, None, strides, 0, 0, group, dilations)
        crop: list[int] = []
        for i in reversed(range(rank)):
            crop += [-pads[i], extra[i] - pads[i + rank]]
        if any(crop):
            y = F.pad(y, crop)
        if bias is not None:
            y = y + bias.reshape(1, -1, *([1] * rank))
        return [y]

    return run


def _pool_windows(
    spec: NodeSpec, x: Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> tuple[list[int], list[int], list[int]]:
    """ONNX pads, the end extension ceil_mode adds, and the output sizes of a pooling node."""
    rank = len(kernel)
    in_sizes = list(x.shape[2:])
    pads = _explicit_pads(spec, in_sizes, kernel, strides, dilations)
    ceil_mode = int(spec.get("ceil_mode", 0))
    outs, extension = [], []
    for i, (n, k, s, d) in enumerate(zip(in_sizes, kernel, strides, dilations, strict=True)):
        span = n + pads[i] + pads[i + rank] - (k - 1) * d - 1
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= n + pads[i]:
            out -= 1  # the last window would start in the end padding
        outs.append(out)
        extension.append(max(0, (out - 1) * s + (k - 1) * d + 1 - (n + pads[i] + pads[i + rank])))
    return pads, extension, outs


def _crop_to(y: Tensor, sizes: Sequence[int]) -> Tensor:
    for axis, size in enumerate(sizes, start=2):
        if y.shape[axis] != size:
            y = y.narrow(axis, 0, size)
    return y


@_op("MaxPool")
def _max_pool(spec: NodeSpec) -> Kernel:
    _only_first_output(spec, " (indices)")
    kernel = spec.ints("kernel_shape")
    if not kernel:
        raise Unsupported("MaxPool without kernel_shape")
    rank = len(kernel)
    if rank not in _MAX_POOL:
        raise Unsupported(f"MaxPool over {rank} axes")
    strides, dilations = _geometry(spec, rank)

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "X")
        pads, extension, outs = _pool_windows(spec, x, kernel, strides, dilations)
        full = [pads[i] for i in range(rank)] + [pads[i + rank] + extension[i] for i in range(rank)]
        if any(full):
            low = -math.inf if x.is_floating_point() else int(torch.iinfo(x.dtype).min)
            x = F.pad(x, _torch_pads(full), value=low)
        y = _MAX_POOL[rank](x, kernel, strides, 0, dilations)
        return [_crop_to(y, outs)]

    return run


@_op("AveragePool")
def _average_pool(spec: NodeSpec) -> Kernel:
    kernel = spec.ints("kernel_shape")
    if not kernel:
        raise Unsupported("AveragePool without kernel_shape")
    rank = len(kernel)
    if rank not in _CONV:
        raise Unsupported(f"AveragePool over {rank} axes")
    strides, dilations = _geometry(spec, rank)
    include_pad = int(spec.get("count_include_pad", 0))

    def run(inputs: Inputs) -> list[Tensor]:
        # sums and counts as depthwise convs with a kernel of ones: pads, dilations and ceil_mode in one form
        x = _need(inputs[0], "X")
        pads, extension, outs = _pool_windows(spec, x, kernel, strides, dilations)
        full = [pads[i] for i in range(rank)] + [pads[i + rank] + extension[i] for i in range(rank)]
        channels = x.shape[1]
        ones = torch.ones((channels, 1, *kernel), dtype=x.dtype)
        total = _CONV[rank](F.pad(x, _torch_pads(full)), ones, None, strides, 0, dilations, channels)
        mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
        if include_pad:
            mask = F.pad(mask, _torch_pads(pads), value=1.0)
            mask = F.pad(mask, _torch_pads([0] * rank + extension))
        else:
            mask = F.pad(mask, _torch_pads(full))
        count = _CONV[rank](mask, torch.ones((1, 1, *kernel), dtype=x.dtype), None, strides, 0, dilations)
        return [_crop_to(total / count, outs)]

    return run


@_op("GlobalAveragePool")
def _global_average_pool(spec: NodeSpec) -> Kernel:
    return lambda inputs: [_need(inputs[0], "X").mean(dim=tuple(range(2, _need(inputs[0], "X").dim())), keepdim=True)]


@_op("GlobalMaxPool")
def _global_max_pool(spec: NodeSpec) -> Kernel:
    return lambda inputs: [_need(inputs[0], "X").amax(dim=tuple(range(2, _need(inputs[0], "X").dim())), keepdim=True)]


@_op("LRN")
def _lrn(spec: NodeSpec) -> Kernel:
    size = int(spec.get("size", 0))
    alpha, beta, bias = float(spec.get("alpha", 1e-4)), float(spec.get("beta", 0.75)), float(spec.get("bias", 1.0))
    if size < 1:
        raise Unsupported("LRN without size")
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "X")
        n, c = x.shape[0], x.shape[1]
        square = (x * x).reshape(n, 1, c, -1)
        square = F.pad(square, [0, 0, before, after])
        sums = F.avg_pool2d(square, (size, 1), stride=1) * size
        return [x / (bias + alpha / size * sums.reshape(x.shape)) ** beta]

    return run


# --------------------------------------------------------------------------- linear algebra and normalisation


@_op("Gemm")
def _gemm(spec: NodeSpec) -> Kernel:
    alpha, beta = float(spec.get("alpha", 1.0)), float(spec.get("beta", 1.0))
    trans_a, trans_b = int(spec.get("transA", 0)), int(spec.get("transB", 0))

    def run(inputs: Inputs) -> list[Tensor]:
        a, b = _need(inputs[0], "A"), _need(inputs[1], "B")
        c = inputs[2] if len(inputs) > 2 else None
        y = (a.t() if trans_a else a) @ (b.t() if trans_b else b)
        if alpha != 1.0:
            y = alpha * y
        if c is not None:
            y = y + (beta * c if beta != 1.0 else c)
        return [y]

    return run


@_op("MatMul")
def _matmul(spec: NodeSpec) -> Kernel:
    return lambda inputs: [torch.matmul(_need(inputs[0], "A"), _need(inputs[1], "B"))]


@_op("Einsum")
def _einsum(spec: NodeSpec) -> Kernel:
    equation = str(spec.get("equation", ""))
    return lambda inputs: [torch.einsum(equation, *[v for v in inputs if v is not None])]


def _channel_view(v: Tensor, rank: int) -> Tensor:
    return v.reshape(1, -1, *([1] * (rank - 2)))


@_op("BatchNormalization")
def _batch_norm(spec: NodeSpec) -> Kernel:
    if int(spec.get("training_mode", 0)):
        raise Unsupported("BatchNormalization with training_mode=1")
    _only_first_output(spec, " (running statistics)")
    eps = float(spec.get("epsilon", 1e-5))

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "X")
        scale, bias, mean, var = (_need(v, "statistics") for v in inputs[1:5])
        rank = x.dim()
        factor = scale / torch.sqrt(var + eps)
        return [(x - _channel_view(mean, rank)) * _channel_view(factor, rank) + _channel_view(bias, rank)]

    return run


@_op("InstanceNormalization")
def _instance_norm(spec: NodeSpec) -> Kernel:
    eps = float(spec.get("epsilon", 1e-5))

    def run(inputs: Inputs) -> list[Tensor]:
        x, scale, bias = _need(inputs[0], "input"), _need(inputs[1], "scale"), _need(inputs[2], "B")
        axes = tuple(range(2, x.dim()))
        mean = x.mean(dim=axes, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=axes, keepdim=True)
        rank = x.dim()
        return [(x - mean) / torch.sqrt(var + eps) * _channel_view(scale, rank) + _channel_view(bias, rank)]

    return run


@_op("LayerNormalization")
def _layer_norm(spec: NodeSpec) -> Kernel:
    eps, axis = float(spec.get("epsilon", 1e-5)), int(spec.get("axis", -1))
    stash = onnx_to_torch_dtype(int(spec.get("stash_type", onnx.TensorProto.FLOAT)))

    def run(inputs: Inputs) -> list[Tensor]:
        x, scale = _need(inputs[0], "X"), _need(inputs[1], "Scale")
        bias = inputs[2] if len(inputs) > 2 else None
        axes = tuple(range(_axis(axis, x.dim()), x.dim()))
        wide = x.to(stash)  # mean and variance in stash_type, as ONNX defines them
        mean = wide.mean(dim=axes, keepdim=True)
        inverse = torch.rsqrt(((wide - mean) ** 2).mean(dim=axes, keepdim=True) + eps)
        y = ((wide - mean) * inverse).to(x.dtype) * scale
        return [y + bias if bias is not None else y, mean, inverse]

    return run


def _softmax_family(fn: Callable[[Tensor, int], Tensor]) -> Compiler:
    def compile_softmax(spec: NodeSpec) -> Kernel:
        legacy = spec.opset < 13
        axis = int(spec.get("axis", 1 if legacy else -1))

        def run(inputs: Inputs) -> list[Tensor]:
            x = _need(inputs[0], "input")
            a = _axis(axis, x.dim())
            if legacy:  # before opset 13 the input is seen as a matrix: axes before ``axis`` × axes from it
                flat = x.reshape(int(np.prod(x.shape[:a], dtype=np.int64)), -1)
                return [fn(flat, 1).reshape(x.shape)]
            return [fn(x, a)]

        return run

    return compile_softmax


def _hardmax(x: Tensor, axis: int) -> Tensor:
    return F.one_hot(x.argmax(dim=axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)


COMPILERS["Softmax"] = _softmax_family(lambda x, a: torch.softmax(x, dim=a))
COMPILERS["LogSoftmax"] = _softmax_family(lambda x, a: torch.log_softmax(x, dim=a))
COMPILERS["Hardmax"] = _softmax_family(_hardmax)


# --------------------------------------------------------------------------- reductions


def _reduction(fn: Callable[[Tensor, tuple[int, ...], bool], Tensor], axes_input_from: int) -> Compiler:
    def compile_reduce(spec: NodeSpec) -> Kernel:
        keep = bool(int(spec.get("keepdims", 1)))
        noop = bool(int(spec.get("noop_with_empty_axes", 0)))
        attr_axes = spec.ints("axes")

        def run(inputs: Inputs) -> list[Tensor]:
            x = _need(inputs[0], "data")
            if spec.opset >= axes_input_from:
                axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else []
            else:
                axes = attr_axes or []
            if not axes:
                if noop:
                    return [x]
                axes = list(range(x.dim()))
            dims = tuple(sorted(_axis(a, x.dim()) for a in axes))
            return [fn(x, dims, keep)]

        return run

    return compile_reduce


COMPILERS["ReduceMean"] = _reduction(lambda x, d, k: x.mean(dim=d, keepdim=k), 18)
COMPILERS["ReduceSum"] = _reduction(lambda x, d, k: x.sum(dim=d, keepdim=k), 13)


def _extreme(x: Tensor, dims: tuple[int, ...], keep: bool, largest: bool) -> Tensor:
    if all(x.shape[d] for d in dims):
        return x.amax(dim=dims, keepdim=keep) if largest else x.amin(dim=dims, keepdim=keep)
    # over an empty set: the identity of the reduction (-inf for max, +inf for min; the type's bound for integers)
    shape = [1 if i in dims else n for i, n in enumerate(x.shape) if keep or i not in dims]
    if x.dtype == torch.bool:
        fill: float | int | bool = not largest
    elif x.is_floating_point():
        fill = -math.inf if largest else math.inf
    else:
        info = torch.iinfo(x.dtype)
        fill = info.min if largest else info.max
    return torch.full(shape, fill, dtype=x.dtype)


COMPILERS["ReduceMax"] = _reduction(lambda x, d, k: _extreme(x, d, k, True), 18)
COMPILERS["ReduceMin"] = _reduction(lambda x, d, k: _extreme(x, d, k, False), 18)
COMPILERS["ReduceProd"] = _reduction(lambda x, d, k: _prod(x, d, k), 18)
COMPILERS["ReduceL1"] = _reduction(lambda x, d, k: x.abs().sum(dim=d, keepdim=k), 18)
COMPILERS["ReduceL2"] = _reduction(lambda x, d, k: torch.sqrt((x * x).sum(dim=d, keepdim=k)), 18)
COMPILERS["ReduceSumSquare"] = _reduction(lambda x, d, k: (x * x).sum(dim=d, keepdim=k), 18)
COMPILERS["ReduceLogSumExp"] = _reduction(lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k), 18)


def _prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keep)
    return x


def _arg(largest: bool) -> Compiler:
    def compile_arg(spec: NodeSpec) -> Kernel:
        axis, keep, last = int(spec.get("axis", 0)), bool(int(spec.get("keepdims", 1))), int(spec.get("select_last_index", 0))

        def run(inputs: Inputs) -> list[Tensor]:
            x = _need(inputs[0], "data")
            a = _axis(axis, x.dim())
            source = x.flip(a) if last else x
            index = source.argmax(dim=a, keepdim=keep) if largest else source.argmin(dim=a, keepdim=keep)
            if last:
                index = x.shape[a] - 1 - index
            return [index]

        return run

    return compile_arg


COMPILERS["ArgMax"] = _arg(True)
COMPILERS["ArgMin"] = _arg(False)


@_op("TopK")
def _topk(spec: NodeSpec) -> Kernel:
    axis, largest = int(spec.get("axis", -1)), bool(int(spec.get("largest", 1)))
    if spec.opset < 10:
        raise Unsupported("TopK before opset 10")

    def run(inputs: Inputs) -> list[Tensor]:
        x, k = _need(inputs[0], "X"), _ints(inputs[1])[0]
        a = _axis(axis, x.dim())
        # a stable sort: of equal values the lower index comes first, as ONNX specifies
        values, indices = torch.sort(x, dim=a, descending=largest, stable=True)
        return [values.narrow(a, 0, k), indices.narrow(a, 0, k)]

    return run


@_op("CumSum")
def _cumsum(spec: NodeSpec) -> Kernel:
    exclusive, reverse = int(spec.get("exclusive", 0)), int(spec.get("reverse", 0))

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "x")
        a = _axis(_ints(inputs[1])[0], x.dim())
        source = x.flip(a) if reverse else x
        y = source.cumsum(dim=a).to(x.dtype)  # torch sums small integer types as int64
        if exclusive:
            y = y - source
        return [y.flip(a) if reverse else y]

    return run


# --------------------------------------------------------------------------- shapes and indexing


@_op("Shape")
def _shape(spec: NodeSpec) -> Kernel:
    start, end = spec.get("start", 0), spec.get("end")

    def run(inputs: Inputs) -> list[Tensor]:
        dims = list(_need(inputs[0], "data").shape)
        return [torch.tensor(dims[int(start) : None if end is None else int(end)], dtype=torch.int64)]

    return run


@_op("Size")
def _size(spec: NodeSpec) -> Kernel:
    return lambda inputs: [torch.tensor(_need(inputs[0], "data").numel(), dtype=torch.int64)]


@_op("Reshape")
def _reshape(spec: NodeSpec) -> Kernel:
    if spec.opset < 5:
        raise Unsupported("Reshape before opset 5 (shape as an attribute)")
    allow_zero = int(spec.get("allowzero", 0))

    def run(inputs: Inputs) -> list[Tensor]:
        x, shape = _need(inputs[0], "data"), _ints(inputs[1])
        if not allow_zero:
            shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return [x.reshape(shape)]

    return run


@_op("Flatten")
def _flatten(spec: NodeSpec) -> Kernel:
    axis = int(spec.get("axis", 1))

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "input")
        a = _axis(axis, x.dim())
        return [x.reshape(int(np.prod(x.shape[:a], dtype=np.int64)), int(np.prod(x.shape[a:], dtype=np.int64)))]

    return run


@_op("Transpose")
def _transpose(spec: NodeSpec) -> Kernel:
    perm = spec.ints("perm")

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "data")
        return [x.permute(perm if perm is not None else list(reversed(range(x.dim()))))]

    return run


@_op("Squeeze")
def _squeeze(spec: NodeSpec) -> Kernel:
    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "data")
        axes = (spec.ints("axes") or []) if spec.opset < 13 else _ints(inputs[1] if len(inputs) > 1 else None)
        if not axes:
            return [x.reshape([d for d in x.shape if d != 1])]
        drop = {_axis(a, x.dim()) for a in axes}
        return [x.reshape([d for i, d in enumerate(x.shape) if i not in drop])]

    return run


@_op("Unsqueeze")
def _unsqueeze(spec: NodeSpec) -> Kernel:
    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "data")
        axes = (spec.ints("axes") or []) if spec.opset < 13 else _ints(inputs[1] if len(inputs) > 1 else None)
        rank = x.dim() + len(axes)
        inserted = {_axis(a, rank) for a in axes}
        dims = iter(x.shape)
        return [x.reshape([1 if i in inserted else next(dims) for i in range(rank)])]

    return run


@_op("Concat")
def _concat(spec: NodeSpec) -> Kernel:
    axis = int(spec.get("axis", 0))

    def run(inputs: Inputs) -> list[Tensor]:
        values = [v for v in inputs if v is not None]
        return [torch.cat(values, dim=_axis(axis, values[0].dim()))]

    return run


@_op("Split")
def _split(spec: NodeSpec) -> Kernel:
    axis = int(spec.get("axis", 0))
    count = len(spec.node.output)

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "input")
        a = _axis(axis, x.dim())
        if spec.opset < 13:
            sizes = spec.ints("split")
        else:
            sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else None
        if not sizes:
            chunk = -(-x.shape[a] // count)
            sizes = [min(chunk, max(0, x.shape[a] - i * chunk)) for i in range(count)]
        starts = np.cumsum([0, *sizes[:-1]])
        return [x.narrow(a, int(start), int(size)) for start, size in zip(starts, sizes, strict=True)]

    return run


def _slice_indices(size: int, start: int, end: int, step: int) -> tuple[int, int]:
    """ONNX Slice's clamping of ``start``/``end`` on an axis of ``size``."""
    if start < 0:
        start += size
    if end < 0:
        end += size
    if step > 0:
        return min(max(start, 0), size), min(max(end, 0), size)
    return min(max(start, -1), size - 1), min(max(end, -1), size - 1)


@_op("Slice")
def _slice(spec: NodeSpec) -> Kernel:
    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "data")
        if spec.opset < 10:
            starts, ends = spec.ints("starts") or [], spec.ints("ends") or []
            axes = spec.ints("axes") or list(range(len(starts)))
            steps = [1] * len(starts)
        else:
            starts, ends = _ints(inputs[1]), _ints(inputs[2])
            axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
            steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
        for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
            a = _axis(axis, x.dim())
            size = x.shape[a]
            begin, stop = _slice_indices(size, start, end, step)
            if step > 0:
                index: list[Any] = [slice(None)] * x.dim()
                index[a] = slice(begin, stop, step)
                x = x[tuple(index)]
            else:
                positions = torch.arange(begin, stop, step, dtype=torch.int64)
                x = x.index_select(a, positions)
        return [x]

    return run


@_op("Gather")
def _gather(spec: NodeSpec) -> Kernel:
    axis = int(spec.get("axis", 0))

    def run(inputs: Inputs) -> list[Tensor]:
        data, indices = _need(inputs[0], "data"), _need(inputs[1], "indices").to(torch.int64)
        a = _axis(axis, data.dim())
        indices = torch.where(indices < 0, indices + data.shape[a], indices)
        picked = data.index_select(a, indices.reshape(-1))
        return [picked.reshape((*data.shape[:a], *indices.shape, *data.shape[a + 1 :]))]

    return run


@_op("GatherElements")
def _gather_elements(spec: NodeSpec) -> Kernel:
    axis = int(spec.get("axis", 0))

    def run(inputs: Inputs) -> list[Tensor]:
        data, indices = _need(inputs[0], "data"), _need(inputs[1], "indices").to(torch.int64)
        a = _axis(axis, data.dim())
        indices = torch.where(indices < 0, indices + data.shape[a], indices)
        return [torch.gather(data, a, indices)]

    return run


@_op("Expand")
def _expand(spec: NodeSpec) -> Kernel:
    def run(inputs: Inputs) -> list[Tensor]:
        x, shape = _need(inputs[0], "input"), _ints(inputs[1])
        return [x.expand(np.broadcast_shapes(tuple(x.shape), tuple(shape)))]

    return run


@_op("Tile")
def _tile(spec: NodeSpec) -> Kernel:
    return lambda inputs: [_need(inputs[0], "input").repeat(*_ints(inputs[1]))]


@_op("Range")
def _range(spec: NodeSpec) -> Kernel:
    def run(inputs: Inputs) -> list[Tensor]:
        start, limit, delta = (_need(v, "start/limit/delta") for v in inputs[:3])
        count = max(math.ceil((float(limit) - float(start)) / float(delta)), 0)
        steps = torch.arange(count, dtype=start.dtype if start.is_floating_point() else torch.int64)
        return [(start + steps.to(start.dtype) * delta).to(start.dtype)]

    return run


@_op("ConstantOfShape")
def _constant_of_shape(spec: NodeSpec) -> Kernel:
    value = spec.get("value")
    fill = tensor_from_proto(value).reshape(-1)[:1] if value is not None else torch.zeros(1, dtype=torch.float32)

    def run(inputs: Inputs) -> list[Tensor]:
        return [fill.expand(_ints(inputs[0])).clone() if inputs[0] is not None and inputs[0].numel() else fill.reshape(()).clone()]

    return run


@_op("Constant")
def _constant(spec: NodeSpec) -> Kernel:
    attrs = spec.attrs
    if "value" in attrs:
        value = tensor_from_proto(attrs["value"])
    elif "value_float" in attrs:
        value = torch.tensor(float(attrs["value_float"]), dtype=torch.float32)
    elif "value_floats" in attrs:
        value = torch.tensor([float(v) for v in attrs["value_floats"]], dtype=torch.float32)
    elif "value_int" in attrs:
        value = torch.tensor(int(attrs["value_int"]), dtype=torch.int64)
    elif "value_ints" in attrs:
        value = torch.tensor([int(v) for v in attrs["value_ints"]], dtype=torch.int64)
    else:
        raise Unsupported(f"Constant with {', '.join(attrs) or 'no value'}")
    return lambda inputs: [value]


@_op("NonZero")
def _nonzero(spec: NodeSpec) -> Kernel:
    return lambda inputs: [torch.nonzero(_need(inputs[0], "X")).t().contiguous()]


@_op("Pad")
def _pad(spec: NodeSpec) -> Kernel:
    mode = str(spec.get("mode", "constant"))
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise Unsupported(f"Pad mode {mode!r}")

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "data")
        if spec.opset < 11:
            pads, value, axes = spec.ints("pads") or [], float(spec.get("value", 0.0)), list(range(x.dim()))
        else:
            pads = _ints(inputs[1])
            constant = inputs[2] if len(inputs) > 2 else None
            value = float(constant.reshape(-1)[0]) if constant is not None and constant.numel() else 0.0
            given = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
            axes = [_axis(a, x.dim()) for a in given] if given is not None else list(range(x.dim()))
        count = len(axes)
        begins = dict(zip(axes, pads[:count], strict=True))
        ends = dict(zip(axes, pads[count:], strict=True))
        if mode == "constant":
            full = [begins.get(i, 0) for i in range(x.dim())] + [ends.get(i, 0) for i in range(x.dim())]
            return [F.pad(x, _torch_pads(full), value=value)]
        for axis in axes:
            b, e = begins[axis], ends[axis]
            if b == 0 and e == 0:
                continue
            size = x.shape[axis]
            positions = np.arange(-b, size + e)
            if mode == "edge":
                positions = np.clip(positions, 0, size - 1)
            elif mode == "wrap":
                positions = np.mod(positions, size)
            else:  # reflect: mirror about the first and last element, without repeating them
                period = 2 * (size - 1) if size > 1 else 1
                positions = np.mod(positions, period)
                positions = np.where(positions >= size, period - positions, positions)
            x = x.index_select(axis, torch.from_numpy(positions.astype(np.int64)))
        return [x]

    return run


@_op("DepthToSpace")
def _depth_to_space(spec: NodeSpec) -> Kernel:
    block, mode = int(spec.get("blocksize", 0)), str(spec.get("mode", "DCR"))

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "input")
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // block**2, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
        return [y.reshape(n, c // block**2, h * block, w * block)]

    return run


@_op("SpaceToDepth")
def _space_to_depth(spec: NodeSpec) -> Kernel:
    block, mode = int(spec.get("blocksize", 0)), str(spec.get("mode", "DCR"))

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "input")
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // block, block, w // block, block)
        y = y.permute(0, 3, 5, 1, 2, 4) if mode == "DCR" else y.permute(0, 1, 3, 5, 2, 4)
        return [y.reshape(n, c * block**2, h // block, w // block)]

    return run


# --------------------------------------------------------------------------- Resize


_TRANSFORMS = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "tf_half_pixel_for_nn")
_NEAREST = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")


def _source_positions(transform: str, out: int, size: int, scale: np.float32) -> np.ndarray:
    """Each output index's position in the input, in float32 as onnxruntime computes it."""
    x = np.arange(out, dtype=np.float32)
    half = np.float32(0.5)
    if transform == "half_pixel":
        return (x + half) / scale - half
    if transform == "pytorch_half_pixel":
        return (x + half) / scale - half if out > 1 else np.zeros_like(x)
    if transform == "align_corners":
        return x * np.float32(size - 1) / np.float32(out - 1) if out > 1 else np.zeros_like(x)
    if transform == "tf_half_pixel_for_nn":
        return (x + half) / scale
    return x / scale  # asymmetric


def _nearest_index(position: np.ndarray, mode: str, downsampling: bool) -> np.ndarray:
    if mode == "round_prefer_floor":
        index = np.where(position - np.floor(position) == 0.5, np.floor(position), np.round(position))
    elif mode == "round_prefer_ceil":
        index = np.where(position - np.floor(position) == 0.5, np.ceil(position), np.round(position))
    elif mode == "floor":
        index = np.floor(position)
    elif mode == "ceil":
        index = np.ceil(position)
    else:  # "simple": opset 10 Resize and Upsample in onnxruntime
        index = np.ceil(position) if downsampling else np.trunc(position)
    return index.astype(np.int64)


def _resize(x: Tensor, out_sizes: Sequence[int], scales: Sequence[float], mode: str, transform: str, nearest: str) -> Tensor:
    for axis in range(x.dim()):
        size, out = int(x.shape[axis]), int(out_sizes[axis])
        scale = np.float32(scales[axis])
        if out == size and scale == 1:
            continue
        position = _source_positions(transform, out, size, scale)
        if mode == "nearest":
            index = np.clip(_nearest_index(position, nearest, bool(scale < 1)), 0, size - 1)
            x = x.index_select(axis, torch.from_numpy(index))
            continue
        position = np.clip(position, 0, size - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, size - 1)
        weight = torch.from_numpy((position - low).astype(np.float32)).to(x.dtype)
        view = [1] * x.dim()
        view[axis] = out
        a, b = x.index_select(axis, torch.from_numpy(low)), x.index_select(axis, torch.from_numpy(high))
        x = a + (b - a) * weight.reshape(view)
    return x


def _check_resize_mode(spec: NodeSpec, mode: str, transform: str, nearest: str) -> None:
    if mode not in ("nearest", "linear", "bilinear", "trilinear"):
        raise Unsupported(f"{spec.node.op_type} mode {mode!r}")
    if transform not in _TRANSFORMS:
        raise Unsupported(f"{spec.node.op_type} coordinate_transformation_mode {transform!r}")
    if nearest not in _NEAREST:
        raise Unsupported(f"{spec.node.op_type} nearest_mode {nearest!r}")
    if int(spec.get("antialias", 0)):
        raise Unsupported(f"{spec.node.op_type} with antialias")
    if str(spec.get("keep_aspect_ratio_policy", "stretch")) != "stretch":
        raise Unsupported(f"{spec.node.op_type} keep_aspect_ratio_policy {spec.get('keep_aspect_ratio_policy')!r}")


@_op("Resize")
def _resize_op(spec: NodeSpec) -> Kernel:
    legacy = spec.opset < 11
    mode = str(spec.get("mode", "nearest"))
    transform = "asymmetric" if legacy else str(spec.get("coordinate_transformation_mode", "half_pixel"))
    nearest = "simple" if legacy else str(spec.get("nearest_mode", "round_prefer_floor"))
    _check_resize_mode(spec, mode, transform, nearest)
    mode = "nearest" if mode == "nearest" else "linear"
    attr_axes = spec.ints("axes")

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "X")
        rank = x.dim()
        axes = [_axis(a, rank) for a in attr_axes] if attr_axes else list(range(rank))
        scales_in = inputs[1] if legacy else (inputs[2] if len(inputs) > 2 else None)
        sizes_in = None if legacy else (inputs[3] if len(inputs) > 3 else None)
        scales = [1.0] * rank
        sizes = list(x.shape)
        if sizes_in is not None and sizes_in.numel():
            for axis, size in zip(axes, _ints(sizes_in), strict=True):
                sizes[axis] = size
                scales[axis] = float(np.float32(size) / np.float32(x.shape[axis]))
        elif scales_in is not None and scales_in.numel():
            for axis, scale in zip(axes, scales_in.reshape(-1).tolist(), strict=True):
                scales[axis] = float(scale)
                sizes[axis] = math.floor(x.shape[axis] * np.float32(scale))
        else:
            raise Unsupported("Resize without scales or sizes")
        return [_resize(x, sizes, scales, mode, transform, nearest)]

    return run


@_op("Upsample")
def _upsample(spec: NodeSpec) -> Kernel:
    mode = str(spec.get("mode", "nearest"))
    _check_resize_mode(spec, mode, "asymmetric", "simple")
    mode = "nearest" if mode == "nearest" else "linear"
    attr_scales = spec.get("scales")

    def run(inputs: Inputs) -> list[Tensor]:
        x = _need(inputs[0], "X")
        scales = [float(s) for s in attr_scales] if attr_scales is not None else _need(inputs[1], "scales").reshape(-1).tolist()
        sizes = [math.floor(n * np.float32(s)) for n, s in zip(x.shape, scales, strict=True)]
        return [_resize(x, sizes, scales, mode, "asymmetric", "simple")]

    return run


# --------------------------------------------------------------------------- recurrent layers


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}


def _recurrent_setup(
    spec: NodeSpec, gates: int, defaults: list[str]
) -> tuple[int, int, float | None, list[list[Callable[[Tensor], Tensor]]]]:
    """(directions, layout, clip, activations per direction) of an LSTM, GRU or RNN node."""
    direction = str(spec.get("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise Unsupported(f"{spec.node.op_type} direction {direction!r}")
    directions = 2 if direction == "bidirectional" else 1
    names = list(spec.get("activations") or defaults * directions)
    if spec.get("activation_alpha") or spec.get("activation_beta"):
        raise Unsupported(f"{spec.node.op_type} with activation_alpha/beta")
    unknown = sorted({n for n in names if n not in _ACTIVATIONS})
    if unknown:
        raise Unsupported(f"{spec.node.op_type} activation {', '.join(unknown)}")
    per = len(defaults)
    if len(names) != per * directions:
        raise Unsupported(f"{spec.node.op_type} with {len(names)} activations for {directions} direction(s)")
    functions = [[_ACTIVATIONS[n] for n in names[d * per : (d + 1) * per]] for d in range(directions)]
    clip = spec.get("clip")
    layout = int(spec.get("layout", 0))
    del gates
    return directions, layout, None if clip is None else float(clip), functions


def _steps(direction: int, reverse_only: bool, count: int) -> range:
    backwards = reverse_only or direction == 1
    return range(count - 1, -1, -1) if backwards else range(count)


def _check_lengths(lengths: Tensor | None, steps: int) -> None:
    if lengths is not None and lengths.numel() and bool((lengths != steps).any()):
        raise Unsupported("a recurrent layer with sequence_lens shorter than the sequence")


def _parts(x: Tensor, size: int, dim: int) -> list[Tensor]:
    """``x`` cut into consecutive blocks of ``size`` along ``dim`` (gate blocks of a recurrent layer)."""
    return [x.narrow(dim, start, size) for start in range(0, x.shape[dim], size)]


def _clip_gate(x: Tensor, clip: float | None) -> Tensor:
    return x if clip is None else torch.clamp(x, -clip, clip)


@_op("LSTM")
def _lstm(spec: NodeSpec) -> Kernel:
    directions, layout, clip, functions = _recurrent_setup(spec, 4, ["Sigmoid", "Tanh", "Tanh"])
    reverse_only = str(spec.get("direction", "forward")) == "reverse"
    coupled = int(spec.get("input_forget", 0))
    defaults = all(fs[0] is torch.sigmoid and fs[1] is torch.tanh and fs[2] is torch.tanh for fs in functions)
    fused = defaults and clip is None and not coupled

    def run(inputs: Inputs) -> list[Tensor]:
        x, w, r = _need(inputs[0], "X"), _need(inputs[1], "W"), _need(inputs[2], "R")
        b, lengths, h0, c0, peep = (inputs[i] if len(inputs) > i else None for i in range(3, 8))
        if layout:  # batch-first: the input and the initial states
            x = x.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
            c0 = c0.transpose(0, 1) if c0 is not None else None
        _check_lengths(lengths, x.shape[0])
        if fused and peep is None:
            y, y_h, y_c = _fused_lstm(x, w, r, b, h0, c0, directions, reverse_only)
        else:
            y, y_h, y_c = _looped_lstm(x, w, r, b, h0, c0, peep)
        if layout:
            y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
        return [y, y_h, y_c]

    def _looped_lstm(
        x: Tensor, w: Tensor, r: Tensor, b: Tensor | None, h0: Tensor | None, c0: Tensor | None, peep: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        steps, batch, hidden = x.shape[0], x.shape[1], r.shape[-1]
        ys, hs, cs = [], [], []
        for d in range(directions):
            f, g, h = functions[d]
            projected = torch.matmul(x, w[d].t())  # (steps, batch, 4·hidden), gates i o f c
            if b is not None:
                projected = projected + b[d, : 4 * hidden] + b[d, 4 * hidden :]
            per_step = projected.unbind(0)  # one view per step (indexing in the loop would cost a full-size gradient each)
            state_h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
            state_c = c0[d] if c0 is not None else x.new_zeros(batch, hidden)
            p_i, p_o, p_f = (peep[d, k * hidden : (k + 1) * hidden] for k in range(3)) if peep is not None else (None, None, None)
            out: list[Tensor | None] = [None] * steps
            for t in _steps(d, reverse_only, steps):
                z = per_step[t] + state_h @ r[d].t()
                zi, zo, zf, zc = _parts(z, hidden, -1)
                if p_i is not None and p_f is not None:
                    zi, zf = zi + p_i * state_c, zf + p_f * state_c
                gate_i = f(_clip_gate(zi, clip))
                gate_f = 1 - gate_i if coupled else f(_clip_gate(zf, clip))
                candidate = g(_clip_gate(zc, clip))
                state_c = gate_f * state_c + gate_i * candidate
                if p_o is not None:
                    zo = zo + p_o * state_c
                gate_o = f(_clip_gate(zo, clip))
                state_h = gate_o * h(state_c)
                out[t] = state_h
            ys.append(torch.stack([o for o in out if o is not None]))
            hs.append(state_h)
            cs.append(state_c)
        return torch.stack(ys, dim=1), torch.stack(hs), torch.stack(cs)  # Y: (steps, directions, batch, hidden)

    return run


_TORCH_GATES = [0, 2, 3, 1]  # torch's LSTM gate order i f g o, as blocks of ONNX's i o f c


def _torch_gates(value: Tensor, hidden: int) -> Tensor:
    """Gate blocks along axis 0 (or the last axis of a bias) from ONNX's order to torch's."""
    return torch.cat([value.narrow(0, k * hidden, hidden) for k in _TORCH_GATES])


def _fused_lstm(
    x: Tensor, w: Tensor, r: Tensor, b: Tensor | None, h0: Tensor | None, c0: Tensor | None, directions: int, reverse_only: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The default-activation LSTM without peepholes or clip through torch's own fused kernel (same equations)."""
    batch, hidden = x.shape[1], r.shape[-1]
    params: list[Tensor] = []
    for d in range(directions):
        params += [_torch_gates(w[d], hidden), _torch_gates(r[d], hidden)]
        if b is not None:
            params += [_torch_gates(b[d, : 4 * hidden], hidden), _torch_gates(b[d, 4 * hidden :], hidden)]
    zeros = x.new_zeros(directions, batch, hidden)
    states = (h0 if h0 is not None else zeros, c0 if c0 is not None else zeros)
    source = x.flip(0) if reverse_only else x
    y, y_h, y_c = torch.lstm(source, states, params, b is not None, 1, 0.0, False, directions == 2, False)
    if reverse_only:
        y = y.flip(0)
    return y.reshape(x.shape[0], batch, directions, hidden).transpose(1, 2), y_h, y_c


@_op("GRU")
def _gru(spec: NodeSpec) -> Kernel:
    directions, layout, clip, functions = _recurrent_setup(spec, 3, ["Sigmoid", "Tanh"])
    reverse_only = str(spec.get("direction", "forward")) == "reverse"
    before_reset = int(spec.get("linear_before_reset", 0))

    def run(inputs: Inputs) -> list[Tensor]:
        x, w, r = _need(inputs[0], "X"), _need(inputs[1], "W"), _need(inputs[2], "R")
        b, lengths, h0 = (inputs[i] if len(inputs) > i else None for i in range(3, 6))
        if layout:  # batch-first: the input and the initial state
            x = x.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
        steps, batch = x.shape[0], x.shape[1]
        _check_lengths(lengths, steps)
        hidden = r.shape[-1]
        ys, hs = [], []
        for d in range(directions):
            f, g = functions[d]
            projected = torch.matmul(x, w[d].t())  # gates z r h
            wb = b[d, : 3 * hidden] if b is not None else None
            rb = b[d, 3 * hidden :] if b is not None else None
            if wb is not None:
                projected = projected + wb
            rz, rr, rh = _parts(r[d], hidden, 0)
            state = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
            out: list[Tensor | None] = [None] * steps
            for t in _steps(d, reverse_only, steps):
                xz, xr, xh = _parts(projected[t], hidden, -1)
                hz, hr = state @ rz.t(), state @ rr.t()
                if rb is not None:
                    hz, hr = hz + rb[:hidden], hr + rb[hidden : 2 * hidden]
                gate_z, gate_r = f(_clip_gate(xz + hz, clip)), f(_clip_gate(xr + hr, clip))
                rbh = rb[2 * hidden :] if rb is not None else 0
                if before_reset:
                    candidate = g(_clip_gate(xh + gate_r * (state @ rh.t() + rbh), clip))
                else:
                    candidate = g(_clip_gate(xh + (gate_r * state) @ rh.t() + rbh, clip))
                state = (1 - gate_z) * candidate + gate_z * state
                out[t] = state
            ys.append(torch.stack([o for o in out if o is not None]))
            hs.append(state)
        y, y_h = torch.stack(ys, dim=1), torch.stack(hs)
        if layout:
            y, y_h = y.permute(2, 0, 1, 3), y_h.transpose(0, 1)
        return [y, y_h]

    return run


@_op("RNN")
def _rnn(spec: NodeSpec) -> Kernel:
    directions, layout, clip, functions = _recurrent_setup(spec, 1, ["Tanh"])
    reverse_only = str(spec.get("direction", "forward")) == "reverse"

    def run(inputs: Inputs) -> list[Tensor]:
        x, w, r = _need(inputs[0], "X"), _need(inputs[1], "W"), _need(inputs[2], "R")
        b, lengths, h0 = (inputs[i] if len(inputs) > i else None for i in range(3, 6))
        if layout:  # batch-first: the input and the initial state
            x = x.transpose(0, 1)
            h0 = h0.transpose(0, 1) if h0 is not None else None
        steps, batch = x.shape[0], x.shape[1]
        _check_lengths(lengths, steps)
        hidden = r.shape[-1]
        ys, hs = [], []
        for d in range(directions):
            (f,) = functions[d]
            projected = torch.matmul(x, w[d].t())
            if b is not None:
                projected = projected + b[d, :hidden] + b[d, hidden:]
            state = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
            out: list[Tensor | None] = [None] * steps
            for t in _steps(d, reverse_only, steps):
                state = f(_clip_gate(projected[t] + state @ r[d].t(), clip))
                out[t] = state
            ys.append(torch.stack([o for o in out if o is not None]))
            hs.append(state)
        y, y_h = torch.stack(ys, dim=1), torch.stack(hs)
        if layout:
            y, y_h = y.permute(2, 0, 1, 3), y_h.transpose(0, 1)
        return [y, y_h]

    return run
