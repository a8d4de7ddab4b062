"""Property tests of the Conv decomposition pass: the rewritten graph computes the same function.

Random Conv layers (channels, groups, kernel, strides, dilations, pads, every
``auto_pad``, bias, batch, non-square inputs) are decomposed with each kind of
split and run in onnxruntime. The references are the original model (at rank
K: with the truncated kernel ``W_K``) in onnxruntime and a float64 numpy conv
with the pads the ONNX spec prescribes; the latter also covers dilation with
``SAME_*``, which onnxruntime refuses to run. ConvTranspose layers (spatial
split; explicit pads, SAME_*, VALID, output_padding, output_shape) are checked
against the original ConvTranspose with ``W_K`` in onnxruntime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from builders import conv_model, run
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from onnx_lowrank.api import decompose
from onnx_lowrank.factorization import Kind, factorize, reconstruct, relative_error, singular_values
from onnx_lowrank.report import LayerReport

FloatArray = npt.NDArray[np.float64]
AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
KINDS: tuple[Kind, ...] = ("spatial", "channel")
SETTINGS = settings(max_examples=80, deadline=None, derandomize=True)
FULL = 10**6  # a rank every layer clips to its full rank


@dataclass
class ConvCase:
    """One Conv layer and the input it runs on."""

    n: int
    c: int
    groups: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    auto_pad: str
    pads: tuple[int, int, int, int] | None  # (top, left, bottom, right) when auto_pad is NOTSET
    bias: bool
    batch: int
    size: tuple[int, int]  # input (H, W)
    kernel_shape_attr: bool
    seed: int
    attrs: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.attrs = {"strides": list(self.strides), "dilations": list(self.dilations)}
        if self.auto_pad == "NOTSET":
            assert self.pads is not None
            self.attrs["pads"] = list(self.pads)
        else:
            self.attrs["auto_pad"] = self.auto_pad
        if self.kernel_shape_attr:
            self.attrs["kernel_shape"] = list(self.kernel)

    @property
    def decomposable(self) -> bool:
        return self.kernel[0] >= 2 and self.kernel[1] >= 2

    def model(self, input_shape: list[Any] | None = None) -> onnx.ModelProto:
        shape = input_shape if input_shape is not None else [self.batch, self.c, *self.size]
        return conv_model(
            n=self.n, c=self.c, kernel=self.kernel, group=self.groups, bias=self.bias, input_shape=shape, attrs=self.attrs, seed=self.seed
        )

    def input(self, size: tuple[int, int] | None = None) -> npt.NDArray[np.float32]:
        rng = np.random.default_rng(self.seed + 1)
        return rng.standard_normal((self.batch, self.c, *(size or self.size))).astype(np.float32)


@st.composite
def conv_cases(draw: st.DrawFn, auto_pads: tuple[str, ...] = AUTO_PADS, min_kernel: int = 1) -> ConvCase:
    """A Conv with N, C, kh, kw in 1..5, groups dividing both, and an input large enough for an output."""
    g = draw(st.integers(1, 5))
    n, c = g * draw(st.integers(1, 5 // g)), g * draw(st.integers(1, 5 // g))
    kernel = (draw(st.integers(min_kernel, 5)), draw(st.integers(min_kernel, 5)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    auto_pad = draw(st.sampled_from(auto_pads))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(4)) if auto_pad == "NOTSET" else None
    size = []
    for axis in range(2):
        span = (kernel[axis] - 1) * dilations[axis] + 1
        if auto_pad == "NOTSET":
            assert pads is not None
            least = max(1, span - pads[axis] - pads[axis + 2])
        elif auto_pad == "VALID":
            least = span
        else:
            least = 1
        size.append(least + draw(st.integers(0, 6)))
    return ConvCase(
        n=n,
        c=c,
        groups=g,
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        auto_pad=auto_pad,
        pads=pads,  # type: ignore[arg-type]
        bias=draw(st.booleans()),
        batch=draw(st.integers(1, 3)),
        size=(size[0], size[1]),
        kernel_shape_attr=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
    )


# --------------------------------------------------------------------------- references


def spec_pads(case: ConvCase, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Explicit (top, left, bottom, right) pads of ``case`` per the ONNX Conv spec."""
    if case.auto_pad == "NOTSET":
        assert case.pads is not None
        return case.pads
    if case.auto_pad == "VALID":
        return (0, 0, 0, 0)
    begins, ends = [], []
    for n, k, s, d in zip(size, case.kernel, case.strides, case.dilations, strict=True):
        out = math.ceil(n / s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        # SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning
        small, large = total // 2, total - total // 2
        begins.append(small if case.auto_pad == "SAME_UPPER" else large)
        ends.append(large if case.auto_pad == "SAME_UPPER" else small)
    return (begins[0], begins[1], ends[0], ends[1])


def numpy_conv(x: npt.NDArray[np.generic], w: npt.NDArray[np.generic], b: npt.NDArray[np.generic] | None, case: ConvCase) -> FloatArray:
    """Grouped, strided, dilated, padded 2-D convolution (cross-correlation) in float64."""
    size = (x.shape[2], x.shape[3])
    top, left, bottom, right = spec_pads(case, size)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    w = w.astype(np.float64)
    n, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = case.strides, case.dilations
    oh = (xp.shape[2] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[3] - (kw - 1) * dw - 1) // sw + 1
    if case.auto_pad.startswith("SAME"):
        assert (oh, ow) == (math.ceil(size[0] / sh), math.ceil(size[1] / sw))
    ng = n // case.groups
    y = np.zeros((x.shape[0], n, oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh : i * dh + (oh - 1) * sh + 1 : sh, j * dw : j * dw + (ow - 1) * sw + 1 : sw]
            for g in range(case.groups):
                taps = w[g * ng : (g + 1) * ng, :, i, j]
                y[:, g * ng : (g + 1) * ng] += np.einsum("bchw,nc->bnhw", patch[:, g * cg : (g + 1) * cg], taps)
    if b is not None:
        y += b.astype(np.float64)[None, :, None, None]
    return y


def ort_accepts(case: ConvCase) -> bool:
    """onnxruntime refuses dilation together with SAME_UPPER/SAME_LOWER."""
    return not (case.auto_pad.startswith("SAME") and max(case.dilations) > 1)


def initializer(model: onnx.ModelProto, name: str) -> npt.NDArray[np.generic] | None:
    return next((numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name), None)


def with_weight(model: onnx.ModelProto, w: npt.NDArray[np.generic]) -> onnx.ModelProto:
    """A copy of a ``conv_model`` whose kernel ``W`` is replaced by ``w``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for t in copy.graph.initializer:
        if t.name == "W":
            t.CopyFrom(numpy_helper.from_array(w.astype(np.float32), "W"))
    return copy


def assert_close(actual: npt.NDArray[np.generic], expected: npt.NDArray[np.generic]) -> None:
    """rtol 1e-4 and an atol scaled to the output magnitude (fp32 sums of up to a few hundred terms)."""
    assert actual.shape == expected.shape
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * max(scale, 1e-30))


def check_references(case: ConvCase, model: onnx.ModelProto, out: onnx.ModelProto, w: npt.NDArray[np.generic], decomposed: bool) -> None:
    """``out`` on ``case``'s input matches a conv with kernel ``w`` (numpy, and onnxruntime where it runs)."""
    x = case.input()
    # a decomposed pair has explicit pads, which onnxruntime always runs; a dilated SAME conv left as is
    # runs only in the ONNX reference evaluator
    runs_in_ort = decomposed or ort_accepts(case)
    actual = run(out, {"x": x})[0] if runs_in_ort else ReferenceEvaluator(out).run(None, {"x": x})[0]
    b = initializer(model, "B")
    assert_close(actual, numpy_conv(x, w, b, case).astype(np.float32))
    if ort_accepts(case):
        assert_close(actual, run(with_weight(model, w), {"x": x})[0])


def the_layer(report_layers: list[LayerReport]) -> LayerReport:
    assert len(report_layers) == 1
    return report_layers[0]


def conv_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "Conv"]


def attr(node: onnx.NodeProto, name: str) -> Any:
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), None)


# --------------------------------------------------------------------------- the pair's expected form


def full_rank_of(case: ConvCase, kind: Kind) -> int:
    """``min`` of the dims of the kernel matrix the split truncates."""
    cg, ng = case.c // case.groups, case.n // case.groups
    kh, kw = case.kernel
    return min(cg * kh, ng * kw) if kind == "spatial" else min(ng, cg * kh * kw)


def splits(case: ConvCase, kind: Kind) -> bool:
    """The spatial split needs a kernel of at least 2 in both dims; the channel split takes any kernel."""
    return case.decomposable if kind == "spatial" else True


def check_pair(case: ConvCase, out: onnx.ModelProto, rank: int, kind: Kind) -> None:
    """Two Convs in sequence with the kernels and the geometry of the split (pads made explicit: the size is known)."""
    assert [n.op_type for n in out.graph.node] == ["Conv", "Conv"]
    first, second = conv_nodes(out)
    assert first.input[0] == "x" and second.input[0] == first.output[0] and list(second.output) == ["y"]
    weights = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    assert "W" not in weights  # the original kernel is no longer used
    assert list(second.input[2:]) == (["B"] if case.bias else [])
    assert attr(first, "group") == attr(second, "group") == case.groups
    assert attr(first, "auto_pad") in (None, b"NOTSET") and attr(second, "auto_pad") in (None, b"NOTSET")
    top, left, bottom, right = spec_pads(case, case.size)
    cg, (kh, kw) = case.c // case.groups, case.kernel
    if kind == "spatial":
        assert weights[first.input[1]].shape == (case.groups * rank, cg, kh, 1)
        assert weights[second.input[1]].shape == (case.n, rank, 1, kw)
        assert list(attr(first, "strides")) == [case.strides[0], 1]
        assert list(attr(second, "strides")) == [1, case.strides[1]]
        assert list(attr(first, "dilations")) == [case.dilations[0], 1]
        assert list(attr(second, "dilations")) == [1, case.dilations[1]]
        assert list(attr(first, "pads") or [0] * 4) == [top, 0, bottom, 0]
        assert list(attr(second, "pads") or [0] * 4) == [0, left, 0, right]
    else:
        assert weights[first.input[1]].shape == (case.groups * rank, cg, kh, kw)
        assert weights[second.input[1]].shape == (case.n, rank, 1, 1)
        assert list(attr(first, "strides")) == list(case.strides)
        assert list(attr(first, "dilations")) == list(case.dilations)
        assert list(attr(first, "pads") or [0] * 4) == [top, left, bottom, right]
        assert list(attr(second, "strides") or [1, 1]) == [1, 1]
        assert list(attr(second, "pads") or [0] * 4) == [0] * 4


def check_macs(case: ConvCase, layer: LayerReport, rank: int, kind: Kind) -> None:
    """The report's MACs are those of the convs as they run (batch 1)."""
    top, left, bottom, right = spec_pads(case, case.size)
    (kh, kw), (sh, sw), (dh, dw) = case.kernel, case.strides, case.dilations
    oh = (case.size[0] + top + bottom - (kh - 1) * dh - 1) // sh + 1
    ow = (case.size[1] + left + right - (kw - 1) * dw - 1) // sw + 1
    cg = case.c // case.groups
    assert layer.macs_before == case.n * cg * kh * kw * oh * ow
    if kind == "spatial":
        # the vertical conv runs at the unpadded input width; the horizontal one pads and strides it
        assert layer.macs_after == case.groups * rank * cg * kh * oh * case.size[1] + case.n * rank * kw * oh * ow
    else:
        assert layer.macs_after == case.groups * rank * cg * kh * kw * oh * ow + case.n * rank * oh * ow


# --------------------------------------------------------------------------- full rank


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(case=conv_cases())
def test_full_rank_pair_computes_the_original_conv(kind: Kind, case: ConvCase) -> None:
    """Full-rank decomposition is exact; a kernel the split cannot take is left alone with a reason."""
    model = case.model()
    w = initializer(model, "W")
    assert w is not None
    out, report = decompose(model, rank=FULL, force=True, kinds=[kind])
    layer = the_layer(report.layers)
    onnx.checker.check_model(out, full_check=True)
    if not splits(case, kind):
        assert not layer.decomposed
        assert isinstance(layer.reason, str) and layer.reason
        assert list(out.graph.node) == list(model.graph.node)
        assert list(out.graph.initializer) == list(model.graph.initializer)
    else:
        assert layer.decomposed, layer.reason
        assert layer.kind == kind
        full = full_rank_of(case, kind)
        assert layer.rank == layer.full_rank == full
        check_pair(case, out, full, kind)
        check_macs(case, layer, full, kind)
    check_references(case, model, out, w, layer.decomposed)


@pytest.mark.parametrize(
    ("kernel", "kind"), [((3, 3), "spatial"), ((2, 5), "spatial"), ((1, 3), "channel"), ((3, 1), "channel"), ((1, 1), "channel")]
)
def test_default_kinds_split_spatially_where_the_kernel_allows(kernel: tuple[int, int], kind: Kind) -> None:
    """With both kinds allowed, ``rank`` takes the spatial split and falls back to the channel split for 1-wide kernels."""
    model = conv_model(n=4, c=4, kernel=kernel, input_shape=(1, 4, 9, 7), attrs={"pads": [1, 1, 1, 1]})
    out, report = decompose(model, rank=FULL, force=True)
    layer = the_layer(report.layers)
    assert layer.decomposed and layer.kind == kind
    x = np.random.default_rng(3).standard_normal((1, 4, 9, 7)).astype(np.float32)
    assert_close(run(out, {"x": x})[0], run(model, {"x": x})[0])


# --------------------------------------------------------------------------- symbolic sizes


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(
    case=conv_cases(auto_pads=("SAME_UPPER", "SAME_LOWER")),
    sizes=st.lists(st.tuples(st.integers(1, 11), st.integers(1, 11)), min_size=2, max_size=2, unique=True),
)
def test_symbolic_sizes_keep_auto_pad(kind: Kind, case: ConvCase, sizes: list[tuple[int, int]]) -> None:
    """With unknown H and W the convs keep SAME_*, and the pair matches the original at any input size."""
    model = case.model(["N", case.c, "H", "W"])
    w = initializer(model, "W")
    assert w is not None
    out, report = decompose(model, rank=FULL, force=True, kinds=[kind])
    layer = the_layer(report.layers)
    onnx.checker.check_model(out, full_check=True)
    assert layer.decomposed == splits(case, kind), layer.reason
    if layer.decomposed:
        first, second = conv_nodes(out)
        assert attr(first, "auto_pad") == case.auto_pad.encode() and attr(first, "pads") is None
        # the spatial split pads the width on the second conv; the channel split's second conv is pointwise
        assert attr(second, "auto_pad") == (case.auto_pad.encode() if kind == "spatial" else None)
        assert attr(second, "pads") is None
    b = initializer(model, "B")
    for size in sizes:
        x = case.input(size)
        expected = numpy_conv(x, w, b, case).astype(np.float32)
        if ort_accepts(case):
            actual = run(out, {"x": x})[0]
            assert_close(run(model, {"x": x})[0], expected)
        else:  # onnxruntime refuses dilated SAME convs; the ONNX reference evaluator runs them
            actual = ReferenceEvaluator(out).run(None, {"x": x})[0]
        assert_close(actual, expected)


# --------------------------------------------------------------------------- low rank


@pytest.mark.parametrize("kind", KINDS)
@SETTINGS
@given(case=conv_cases(min_kernel=2), data=st.data())
def test_low_rank_pair_runs_the_truncated_kernel(kind: Kind, case: ConvCase, data: st.DataObject) -> None:
    """At K < full the report gives the optimal error and the graph computes a Conv with ``W_K``."""
    full = full_rank_of(case, kind)
    assume(full >= 2)  # full rank 1 has no lower rank
    k = data.draw(st.integers(1, full - 1), label="rank")
    model = case.model()
    w = initializer(model, "W")
    assert w is not None
    out, report = decompose(model, rank=k, force=True, kinds=[kind])
    layer = the_layer(report.layers)
    onnx.checker.check_model(out, full_check=True)
    assert layer.decomposed and layer.kind == kind and layer.rank == k and layer.full_rank == full
    s = singular_values(w.astype(np.float64), case.groups, kind)
    optimum = relative_error(s, k)
    assert layer.optimal_error == pytest.approx(optimum, rel=1e-9, abs=1e-12)
    assert layer.relative_error is not None and abs(layer.relative_error - optimum) <= 1e-5
    check_pair(case, out, k, kind)
    check_macs(case, layer, k, kind)
    w_k = reconstruct(factorize(w.astype(np.float64), case.groups, k, kind), case.groups)
    assert np.linalg.norm(w_k - w) / np.linalg.norm(w) == pytest.approx(optimum, rel=1e-6, abs=1e-9)
    check_references(case, model, out, w_k, layer.decomposed)


# --------------------------------------------------------------------------- ConvTranspose

CT_MODES = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID", "output_shape")


@dataclass
class ConvTransposeCase:
    """One ConvTranspose layer (weight ``(C, N/g, kh, kw)``) and the input it runs on."""

    c: int
    n: int
    groups: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    output_padding: tuple[int, int]
    mode: str  # an auto_pad value, or "output_shape"
    pads: tuple[int, int, int, int]  # used when mode is NOTSET
    output_shape: tuple[int, int]  # used when mode is output_shape
    bias: bool
    batch: int
    size: tuple[int, int]
    symbolic: bool
    seed: int

    @property
    def attrs(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {"group": self.groups, "strides": list(self.strides), "dilations": list(self.dilations)}
        if any(self.output_padding):
            attrs["output_padding"] = list(self.output_padding)
        if self.mode == "NOTSET":
            attrs["pads"] = list(self.pads)
        elif self.mode == "output_shape":
            attrs["output_shape"] = list(self.output_shape)
        else:
            attrs["auto_pad"] = self.mode
        return attrs

    def natural(self, axis: int) -> int:
        """The output size before any padding is cut: ``s·(in−1) + output_padding + (k−1)·d + 1``."""
        k, s, d = self.kernel[axis], self.strides[axis], self.dilations[axis]
        return s * (self.size[axis] - 1) + self.output_padding[axis] + (k - 1) * d + 1

    def weight(self) -> npt.NDArray[np.float32]:
        rng = np.random.default_rng(self.seed)
        return rng.standard_normal((self.c, self.n // self.groups, *self.kernel)).astype(np.float32)

    def model(self, w: npt.NDArray[np.generic] | None = None) -> onnx.ModelProto:
        rng = np.random.default_rng(self.seed + 1)
        inits = [numpy_helper.from_array((self.weight() if w is None else w).astype(np.float32), "W")]
        inputs = ["x", "W"]
        if self.bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(self.n).astype(np.float32), "B"))
            inputs.append("B")
        node = onnx.helper.make_node("ConvTranspose", inputs, ["y"], name="deconv", **self.attrs)
        shape: list[Any] = ["N", self.c, "H", "W"] if self.symbolic else [self.batch, self.c, *self.size]
        graph = onnx.helper.make_graph(
            [node],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", "c", "h", "w"])],
            inits,
        )
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    def input(self) -> npt.NDArray[np.float32]:
        return np.random.default_rng(self.seed + 2).standard_normal((self.batch, self.c, *self.size)).astype(np.float32)


@st.composite
def conv_transpose_cases(draw: st.DrawFn) -> ConvTransposeCase:
    g = draw(st.integers(1, 3))
    c, n = g * draw(st.integers(1, 5 // g)), g * draw(st.integers(1, 5 // g))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    strides = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilations = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    # the spec allows output_padding below the stride or the dilation; onnxruntime only below the stride
    output_padding = tuple(draw(st.integers(0, s - 1)) for s in strides)
    mode = draw(st.sampled_from(CT_MODES))
    size = (draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    naturals = [s * (i - 1) + p + (k - 1) * d + 1 for i, k, s, d, p in zip(size, kernel, strides, dilations, output_padding, strict=True)]
    # explicit pads leave at least one output pixel; an output_shape cuts any number of pixels, even below the
    # input size (onnxruntime refuses one larger than the unpadded output)
    pads = [draw(st.integers(0, 2)) for _ in range(4)]
    for axis in range(2):
        while pads[axis] + pads[axis + 2] >= naturals[axis]:
            pads[axis + 2 if pads[axis + 2] else axis] -= 1
    output_shape = tuple(draw(st.integers(1, nat)) for nat in naturals)
    return ConvTransposeCase(
        c=c,
        n=n,
        groups=g,
        kernel=kernel,
        strides=strides,
        dilations=dilations,
        output_padding=output_padding,  # type: ignore[arg-type]
        mode=mode,
        pads=tuple(pads),  # type: ignore[arg-type]
        output_shape=output_shape,  # type: ignore[arg-type]
        bias=draw(st.booleans()),
        batch=draw(st.integers(1, 2)),
        size=size,
        symbolic=mode != "output_shape" and draw(st.booleans()),
        seed=draw(st.integers(0, 2**31)),
    )


def conv_layout(w: npt.NDArray[np.generic], groups: int) -> FloatArray:
    """``(C, N_g, ...)`` → ``(N, C_g, ...)`` per group: the ConvTranspose kernel as the conv kernel the theorem factors."""
    c, n_g = w.shape[:2]
    per_group = w.astype(np.float64).reshape(groups, c // groups, n_g, *w.shape[2:]).swapaxes(1, 2)
    return per_group.reshape(groups * n_g, c // groups, *w.shape[2:])


def transpose_layout(w: FloatArray, groups: int) -> FloatArray:
    """The inverse of :func:`conv_layout`."""
    n, c_g = w.shape[:2]
    return w.reshape(groups, n // groups, c_g, *w.shape[2:]).swapaxes(1, 2).reshape(groups * c_g, n // groups, *w.shape[2:])


@pytest.mark.parametrize("low_rank", [False, True], ids=["full_rank", "low_rank"])
@SETTINGS
@given(case=conv_transpose_cases(), data=st.data())
def test_conv_transpose_pair_computes_the_original(low_rank: bool, case: ConvTransposeCase, data: st.DataObject) -> None:
    """The ConvTranspose split computes a ConvTranspose with ``W_K`` (``W`` at full rank), for every padding mode."""
    model = case.model()
    w = case.weight()
    kernel = conv_layout(w, case.groups)
    full = min((case.c // case.groups) * case.kernel[0], (case.n // case.groups) * case.kernel[1])
    splittable = min(case.kernel) >= 2
    k = data.draw(st.integers(1, full), label="rank") if low_rank and splittable else FULL
    out, report = decompose(model, rank=k, force=True, kinds=["spatial"])
    layer = the_layer(report.layers)
    # onnx's shape inference gives up (leaves a rank-2 shape) when an output_shape is below the input size,
    # so the strict check cannot run on such models, the original included
    onnx.checker.check_model(out, full_check=case.mode != "output_shape")
    x = case.input()
    if not splittable:
        assert not layer.decomposed and layer.reason
        assert list(out.graph.node) == list(model.graph.node)
        return
    assert layer.decomposed, layer.reason
    assert layer.rank == min(k, full) and layer.full_rank == full
    assert [n.op_type for n in out.graph.node] == ["ConvTranspose", "ConvTranspose"]
    s = singular_values(kernel, case.groups)
    assert layer.relative_error is not None and abs(layer.relative_error - relative_error(s, layer.rank)) <= 1e-5
    w_k = transpose_layout(reconstruct(factorize(kernel, case.groups, layer.rank), case.groups), case.groups)
    assert_close(run(out, {"x": x})[0], run(case.model(w_k), {"x": x})[0])
