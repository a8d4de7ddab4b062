"""The activation after a decomposed layer, and the refit of the pair to that activation's output.

:mod:`onnx_lowrank.calibration.refit` fits each decomposed pair to the original layer's *linear* output. When
what the rest of the network reads is an elementwise activation of it, part of that error is invisible
downstream (a negative output where the original is negative too, behind a ``Relu``), and the fit spends the
few degrees of freedom of a rank-``K`` factor reproducing it. Zhang et al. ("Accelerating very deep
convolutional networks for classification and detection", TPAMI 2016, arXiv 1505.06798, Sec. 3.2–3.3, the
nonlinear asymmetric reconstruction) fit the activation's output instead; this module does that for the
second factor and bias the refit re-solves.

Objective
---------
With the refit's notation (per group: ``A`` the patches of ``T`` with a column of ones, ``θ = [vec H; b]``,
``Y`` the original layer's output, ``θ₀`` the factors before the refit, ``Λ`` the ridge), and ``r`` the
activation, continuous and piecewise linear (``Relu``, ``LeakyRelu``, ``Clip``):

    min_θ ||r(Aθ) − r(Y)||² + (θ − θ₀)ᵀ Λ (θ − θ₀).

It is not convex. As Zhang et al. do, it is relaxed with an auxiliary ``Z`` of the outputs' shape,

    min_{θ,Z} ||r(Z) − r(Y)||² + λ (||Z − Aθ||² + (θ − θ₀)ᵀ Λ (θ − θ₀)),

and solved by alternating two closed forms while ``λ`` grows:

* θ-step (``Z`` fixed): the refit's ridge least squares with target ``Z``,
  ``(AᵀA + Λ) θ = AᵀZ + Λ θ₀``; the matrix does not change, so it is factored once (Cholesky) and each
  step costs the product ``AᵀZ``;
* Z-step (``θ`` fixed, ``u = Aθ``, ``t = r(Y)``), per element: ``min_z (r(z) − t)² + λ (z − u)²``. On a
  piece ``[a, c]`` where ``r(z) = s·z + o`` the minimiser is ``clip((s·(t − o) + λu)/(s² + λ), a, c)``; the
  element takes the best of the (at most three) pieces. For ``Relu`` these are Zhang et al.'s
  ``min(0, u)`` and ``max(0, (t + λu)/(1 + λ))``.

At small ``λ`` the Z-step is ``Z = Y`` where the original passes through the activation and
``Z = min(u, 0)`` where a ``Relu`` cuts it: the convex fit of ``Y`` on the original's positive outputs plus
the hinge ``max(Aθ, 0)²`` elsewhere, an upper bound of the objective. As ``λ`` grows, ``Z → Aθ`` and the
fit moves to the objective itself. ``λ`` runs geometrically from :data:`LAMBDA_START` to
:data:`LAMBDA_END` over the iterations, starting from the linear refit's ``θ``. Each iterate's objective
``||r(Aθ) − r(Y)||²`` comes with its Z-step's ``Aθ``; the best of ``θ₀``, the linear refit and every
iterate is kept, so on the rows it fits the result is never worse than either.

Rows
----
The sums the linear refit accumulates do not determine the Z-step, which needs every row. The rows a
stage's streamed pass gives a layer (the same output positions its sums use) are kept in memory as
float32 ``A`` and ``r(Y)`` — all of them, or a seeded random share of at most ``activation_rows``
(:data:`DEFAULT_ACTIVATION_ROWS`) per layer and ``row_memory`` bytes (:data:`DEFAULT_ROW_MEMORY`) for a
stage's layers together (:class:`KeptRows`). No pass over the data is added: the cost is that memory and,
per iteration, two products of ``rows × F × N_g`` per group (:data:`DEFAULT_ITERATIONS` iterations).
Measured (``benchmarks/calibration.py --parts activations``, test splits, plans by MACs at 1.5–4x): against
the linear refit, the relative error of the outputs drops at every target on both trained models (text
line 0.2724 → 0.2506 at 4x, 0.0333 → 0.0323 at 1.5x) and the text line's exact strings rise by 2.7 and 6.5
points at 3x and 4x; 25 iterations on every row (138 240 per layer) lower the text line's output error by
at most another 3 % for 20–30x the fit's time, and a penalty weight kept at 0.001 (the hinge fit alone)
ends above the schedule's error in 7 of the 8 settings.

Which layers (preconditions; otherwise the linear output is fit, and the result says why):

* the second node's output is read by one node only and is not an output of its graph: another reader
  (a residual ``Add``, a second branch) sees the linear output itself;
* that node is a ``Relu``, a ``LeakyRelu``, or a ``Clip`` with constant bounds ``min < max`` — or a
  ``MaxPool`` whose indices are not read and whose output is read only by such an activation with
  non-decreasing pieces (``LeakyRelu`` with ``alpha ≥ 0``, ``Relu``, ``Clip``): a non-decreasing ``r``
  commutes with the max (``max r(u) = r(max u)``; the pool's padding is ``−∞``), so what follows depends on
  ``r(Aθ)`` alone and the same objective holds. Other activations (``Sigmoid``, ``PRelu``'s per-channel
  slopes, ``Gelu``, …) are not handled;
* every second node sharing the second factor is followed by the same activation;
* at least :data:`MIN_ROWS_PER_UNKNOWN` rows are kept per unknown of a group's ``θ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import scipy.linalg

from ..graph import Scope, attrs
from ..passes import resolve_weight
from .collect import subgraph_reads

__all__ = [
    "DEFAULT_ACTIVATION_ROWS",
    "DEFAULT_ITERATIONS",
    "DEFAULT_ROW_MEMORY",
    "LAMBDA_END",
    "LAMBDA_START",
    "MIN_ROWS_PER_UNKNOWN",
    "Activation",
    "ActivationFit",
    "KeptRows",
    "activation_after",
    "fit_activation",
]

Array = npt.NDArray[Any]
FloatArray = npt.NDArray[np.float64]
Float32Array = npt.NDArray[np.float32]

DEFAULT_ITERATIONS = 8
DEFAULT_ROW_MEMORY = 256 * 2**20  # bytes of kept rows per stage
DEFAULT_ACTIVATION_ROWS = 16384  # kept rows per layer at most
MIN_ROWS_PER_UNKNOWN = 4  # fewer kept rows per unknown of a group's θ: the linear output is fit
LAMBDA_START = 0.01
LAMBDA_END = 1.0
_ROWS_PER_BLOCK = 8192
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Activation:
    """A continuous piecewise-linear elementwise activation: ``Relu``, ``LeakyRelu(alpha)`` or ``Clip(low, high)``;
    ``through``: the ``MaxPool`` between the layer and the activation, if any."""

    op: str
    alpha: float = 0.0
    low: float = -math.inf
    high: float = math.inf
    through: str | None = None

    @property
    def label(self) -> str:
        """The objective's name in the result: the activation and its constants."""
        if self.op == "LeakyRelu":
            name = f"LeakyRelu(alpha={self.alpha:g})"
        elif self.op == "Clip":
            name = f"Clip({self.low:g}, {self.high:g})"
        else:
            name = self.op
        return f"{name} after MaxPool" if self.through is not None else name

    @property
    def pieces(self) -> tuple[tuple[float, float, float, float], ...]:
        """``(a, c, s, o)``: on ``[a, c]``, ``r(z) = s·z + o``."""
        if self.op == "Relu":
            return ((-math.inf, 0.0, 0.0, 0.0), (0.0, math.inf, 1.0, 0.0))
        if self.op == "LeakyRelu":
            return ((-math.inf, 0.0, self.alpha, 0.0), (0.0, math.inf, 1.0, 0.0))
        out: list[tuple[float, float, float, float]] = []
        if self.low > -math.inf:
            out.append((-math.inf, self.low, 0.0, self.low))
        out.append((self.low, self.high, 1.0, 0.0))
        if self.high < math.inf:
            out.append((self.high, math.inf, 0.0, self.high))
        return tuple(out)

    def same_function(self, other: Activation) -> bool:
        return (self.op, self.alpha, self.low, self.high) == (other.op, other.alpha, other.low, other.high)

    def apply(self, x: Array) -> Array:
        """``r(x)``, in ``x``'s dtype."""
        if self.op == "Relu":
            return np.maximum(x, 0)
        if self.op == "LeakyRelu":
            return np.where(x >= 0, x, x * x.dtype.type(self.alpha))
        return np.clip(x, self.low, self.high).astype(x.dtype, copy=False)

    def closest(self, t: Float32Array, u: Float32Array, lam: float) -> Float32Array:
        """The Z-step: per element, the ``z`` minimising ``(r(z) − t)² + λ (z − u)²`` (see the module docstring).

        For ``Relu`` (``t ≥ 0``) the two pieces reduce to one threshold: ``z = (t + λu)/(1 + λ)`` where
        ``u > t·(1 − √(1 + 1/λ))``, else ``z = u``."""
        if self.op == "Relu":
            z: Float32Array = t + np.float32(lam) * u
            z *= np.float32(1.0 / (1.0 + lam))
            np.copyto(z, u, where=u <= t * np.float32(1.0 - math.sqrt(1.0 + 1.0 / lam)))
            return z
        best: Float32Array | None = None
        best_cost: Float32Array | None = None
        for a, c, s, o in self.pieces:
            z = u * np.float32(lam / (s * s + lam))
            if s != 0.0:
                z += (t - np.float32(o)) * np.float32(s / (s * s + lam))
            np.clip(z, a, c, out=z)
            cost: Float32Array = z * np.float32(s)
            cost += np.float32(o)
            cost -= t
            np.square(cost, out=cost)
            step = z - u
            np.square(step, out=step)
            step *= np.float32(lam)
            cost += step
            if best is None or best_cost is None:
                best, best_cost = z, cost
            else:
                np.copyto(best, z, where=cost < best_cost)
                np.minimum(best_cost, cost, out=best_cost)
        assert best is not None
        return best


# --------------------------------------------------------------------------- graph side


def _scope_outputs(scope: Scope) -> set[str]:
    if scope.graph is not None:
        return {v.name for v in scope.graph.output}
    if scope.function is not None:
        return set(scope.function.output)
    return set()


def _only_reader(name: str, scope: Scope) -> onnx.NodeProto | str:
    """The one node that reads ``name`` in ``scope``, or why there is not exactly one."""
    if name in _scope_outputs(scope):
        return "its output is an output of the graph, which sees the linear output"
    readers = [n for n in scope.nodes if name in n.input]
    inside = [n for n in scope.nodes if name in subgraph_reads(n)]
    if inside:
        return f"its output is read inside the subgraph of a {inside[0].op_type}"
    if not readers:
        return "nothing reads its output"
    if len(readers) > 1:
        ops = ", ".join(sorted({n.op_type for n in readers}))
        return f"its output is read by {len(readers)} nodes ({ops}); the linear output matters to them"
    only: onnx.NodeProto = readers[0]
    return only


def _bound(node: onnx.NodeProto, scope: Scope, index: int, attribute: str, default: float) -> float | str:
    """A ``Clip`` bound: its input ``index`` (a constant scalar) or, before opset 11, its attribute."""
    values = attrs(node)
    if attribute in values:
        return float(values[attribute])  # type: ignore[arg-type]
    if len(node.input) <= index or not node.input[index]:
        return default
    source = resolve_weight(node.input[index], scope)
    if isinstance(source, str):
        return f"its Clip's {attribute} bound is not a constant ({source})"
    try:
        value = np.asarray(source.values, dtype=np.float64)
    except ValueError as exc:
        return f"its Clip's {attribute} bound cannot be read: {exc}"
    if value.size != 1:
        return f"its Clip's {attribute} bound holds {value.size} values, not one"
    return float(value.reshape(-1)[0])


def _activation(node: onnx.NodeProto, scope: Scope) -> Activation | str:
    op = node.op_type
    if node.domain not in _DEFAULT_DOMAINS:
        return f"its output is read by a {op} of domain {node.domain!r}, not an activation handled here"
    if op == "Relu":
        return Activation("Relu")
    if op == "LeakyRelu":
        alpha = float(attrs(node).get("alpha", 0.01))  # type: ignore[arg-type]
        if not math.isfinite(alpha):
            return f"its LeakyRelu's alpha is {alpha}"
        return Activation("LeakyRelu", alpha=alpha)
    if op == "Clip":
        low = _bound(node, scope, 1, "min", -math.inf)
        if isinstance(low, str):
            return low
        high = _bound(node, scope, 2, "max", math.inf)
        if isinstance(high, str):
            return high
        if math.isnan(low) or math.isnan(high) or not low < high:
            return f"its Clip's bounds [{low:g}, {high:g}] leave at most one value: the output does not follow the layer"
        return Activation("Clip", low=low, high=high)
    return f"its output is read by a {op}; the activation-aware refit handles Relu, LeakyRelu and Clip"


def activation_after(node: onnx.NodeProto, scope: Scope) -> Activation | str:
    """The activation that alone reads what ``node`` writes (maybe through a ``MaxPool``), or why there is none
    whose output the refit can fit (see the module docstring)."""
    if not node.output or not node.output[0]:
        return "the second node has no output"
    reader = _only_reader(node.output[0], scope)
    if isinstance(reader, str):
        return reader
    through: str | None = None
    if reader.op_type == "MaxPool" and reader.domain in _DEFAULT_DOMAINS:
        if len(reader.output) > 1 and reader.output[1]:
            return "its output goes through a MaxPool whose indices are read"
        if not reader.output or not reader.output[0]:
            return "its MaxPool has no output"
        through = reader.name or reader.output[0]
        after = _only_reader(reader.output[0], scope)
        if isinstance(after, str):
            return after.replace("its output", "its MaxPool's output", 1)
        reader = after
    found = _activation(reader, scope)
    if isinstance(found, str):
        return found.replace("its output", "its MaxPool's output", 1) if through is not None else found
    if through is not None:
        if found.op == "LeakyRelu" and found.alpha < 0:
            return "its MaxPool is followed by a LeakyRelu with alpha < 0, which does not commute with the max"
        found = Activation(found.op, found.alpha, found.low, found.high, through)
    return found


# --------------------------------------------------------------------------- rows


class KeptRows:
    """The rows of one layer's fit kept for the activation-aware refit: ``A`` as ``(g, P, F)`` and ``r(Y)`` as
    ``(g, P, N_g)``, float32. ``limit`` rows at most; when the whole stage would yield more (``samples``
    samples at the rows per sample of the first batch), each row is kept with the probability that fills
    ``limit`` on average (seeded ``rng``), and rows beyond ``limit`` are dropped."""

    def __init__(self, activation: Activation, limit: int, samples: int, rng: np.random.Generator) -> None:
        self.activation = activation
        self.limit, self.samples, self.rng = max(1, limit), max(1, samples), rng
        self.share: float | None = None
        self.seen = 0
        self._a: list[Float32Array] = []
        self._t: list[Float32Array] = []
        self.rows = 0

    def add(self, a: Array, y: Array, batch: int) -> None:
        """``a``: ``(g, P, F)`` features, ``y``: ``(g, P, N_g)`` the targets (the original layer's output) of the
        same rows, from ``batch`` samples."""
        n = a.shape[1]
        self.seen += n
        if self.share is None:
            expected = n / max(1, batch) * self.samples
            self.share = min(1.0, self.limit / max(1.0, expected))
        room = self.limit - self.rows
        if room <= 0 or n == 0:
            return
        keep = np.arange(n) if self.share >= 1.0 else np.flatnonzero(self.rng.random(n) < self.share)
        keep = keep[:room]
        if keep.size == 0:
            return
        self._a.append(np.ascontiguousarray(a[:, keep], dtype=np.float32))
        self._t.append(self.activation.apply(np.ascontiguousarray(y[:, keep], dtype=np.float32)))
        self.rows += int(keep.size)

    def residual(self, theta: FloatArray, bias: bool) -> float:
        """``||r([A 1]θ) − r(Y)||²`` over the kept rows, ``θ`` per group ``(g, F(+1), N_g)``."""
        return _residual(*self.arrays(), theta, self.activation, bias) if self.rows else 0.0

    def arrays(self) -> tuple[Float32Array, Float32Array]:
        """The kept rows, ``A`` and ``r(Y)``, in one array each (the pieces are let go)."""
        if len(self._a) != 1:
            self._a = [np.concatenate(self._a, axis=1)]
            self._t = [np.concatenate(self._t, axis=1)]
        return self._a[0], self._t[0]


# --------------------------------------------------------------------------- the fit


@dataclass
class ActivationFit:
    """The outcome of :func:`fit_activation`. Objectives are ``||r(Aθ) − r(Y)||²`` summed over the kept rows
    and groups; ``target`` is ``||r(Y)||²``."""

    theta: FloatArray
    before: float  # at θ₀
    linear: float  # at the linear refit's θ
    after: float  # at the θ returned
    target: float
    iterations: int
    rows: int


def _gram(a: Float32Array, bias: bool) -> FloatArray:
    """``[A 1]ᵀ[A 1]`` per group (float64); no ones column without a bias."""
    g, _, f = a.shape
    size = f + (1 if bias else 0)
    out = np.zeros((g, size, size))
    for start in range(0, a.shape[1], _ROWS_PER_BLOCK):
        for i in range(g):
            x = a[i, start : start + _ROWS_PER_BLOCK].astype(np.float64)
            out[i, :f, :f] += x.T @ x
            if bias:
                column = x.sum(axis=0)
                out[i, :f, f] += column
                out[i, f, :f] += column
                out[i, f, f] += x.shape[0]
    return out


def _outputs(a: Float32Array, theta: Float32Array, bias: bool) -> Float32Array:
    """``[A 1] θ`` for one group's block of rows."""
    f = a.shape[1]
    u: Float32Array = a @ theta[:f]
    if bias:
        u += theta[f]
    return u


def _residual(a: Float32Array, t: Float32Array, theta: FloatArray, activation: Activation, bias: bool) -> float:
    """``||r([A 1]θ) − r(Y)||²`` over every group and row (``t = r(Y)``)."""
    total = 0.0
    for i in range(a.shape[0]):
        th = theta[i].astype(np.float32)
        for start in range(0, a.shape[1], _ROWS_PER_BLOCK):
            u = _outputs(a[i, start : start + _ROWS_PER_BLOCK], th, bias)
            total += float(np.square(activation.apply(u) - t[i, start : start + _ROWS_PER_BLOCK], dtype=np.float64).sum())
    return total


def fit_activation(
    rows: KeptRows,
    bias: bool,
    prior: FloatArray,
    linear: FloatArray,
    penalty: Callable[[FloatArray], FloatArray],
    *,
    iterations: int = DEFAULT_ITERATIONS,
    lambdas: tuple[float, float] = (LAMBDA_START, LAMBDA_END),
) -> ActivationFit:
    """The second factor and bias fit to the activation's output on the kept rows (module docstring).

    ``prior``: ``θ₀`` per group ``(g, F(+1), N_g)``; ``linear``: the linear refit's ``θ`` (the start);
    ``penalty``: the ridge ``Λ``'s diagonal from a group's ``[A 1]ᵀ[A 1]``, as the linear refit forms it;
    ``lambdas``: the penalty weight of the first and the last iteration (geometric in between).
    """
    a, t = rows.arrays()
    activation = rows.activation
    groups = a.shape[0]
    target = float(np.square(t, dtype=np.float64).sum())
    before = _residual(a, t, prior, activation, bias)
    normal = _gram(a, bias)
    factors = []
    for i in range(groups):
        lam = penalty(normal[i])
        system = normal[i] + np.diag(lam)
        try:
            factors.append(("cho", scipy.linalg.cho_factor(system, check_finite=False), lam))
        except (np.linalg.LinAlgError, ValueError):
            factors.append(("lstsq", system, lam))
    weights = np.geomspace(lambdas[0], lambdas[1], iterations) if iterations > 0 else np.zeros(0)
    theta = linear.copy()
    best, best_value = linear.copy(), math.inf
    linear_value = math.inf
    f = a.shape[2]
    for k in range(iterations + 1):
        value = 0.0
        cross = np.zeros_like(theta)
        for i in range(groups):
            th = theta[i].astype(np.float32)
            for start in range(0, a.shape[1], _ROWS_PER_BLOCK):
                block, goal = a[i, start : start + _ROWS_PER_BLOCK], t[i, start : start + _ROWS_PER_BLOCK]
                u = _outputs(block, th, bias)
                value += float(np.square(activation.apply(u) - goal, dtype=np.float64).sum())
                if k < iterations:
                    z = activation.closest(goal, u, float(weights[k]))
                    cross[i, :f] += (block.T @ z).astype(np.float64)
                    if bias:
                        cross[i, f] += z.sum(axis=0, dtype=np.float64)
        if k == 0:
            linear_value = value
        if value < best_value:
            best, best_value = theta.copy(), value
        if k == iterations:
            break
        for i, (how, factor, lam) in enumerate(factors):
            rhs = cross[i] + lam[:, None] * prior[i]
            if how == "cho":
                theta[i] = scipy.linalg.cho_solve(factor, rhs, check_finite=False)
            else:
                theta[i] = scipy.linalg.lstsq(factor, rhs, check_finite=False)[0]
    if before <= best_value:
        best, best_value = prior.copy(), before
    return ActivationFit(best, before, linear_value, best_value, target, iterations, rows.rows)
