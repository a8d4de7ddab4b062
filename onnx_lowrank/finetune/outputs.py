"""Per output: which loss fits it, and how agreement with the original is measured (numpy only).

Loss kinds, chosen from the teacher's (original model's) values on the training samples, samples on axis 0:

* **KL over the last axis** for class scores: a rank-2 ``[N, C]`` output with ``C ≥ 2``, and a rank ≥ 3
  output whose last axis is a class axis — its values are log-probabilities (every ``logsumexp`` over the
  last axis ≈ 0) or probabilities (in [0, 1], summing to 1), or it is written by a linear layer over that
  axis (``MatMul``/``Gemm``/``Einsum``, maybe plus a bias ``Add``), as the per-time-step scores of a
  sequence recogniser are. The scores are read as log-probabilities, probabilities or logits accordingly
  and turned into log-probabilities (softened by the temperature ``T``):
  ``KL = T² · mean over positions of Σ_c p_teacher,c (log p_teacher,c − log p_student,c)``.
* **MSE over the teacher's variance** otherwise (box regressions, masks, embeddings):
  ``mean((student − teacher)²) / var(teacher)``, a number that does not depend on the output's scale.
* integer and boolean outputs are not trained on (nothing to differentiate).

Held-back metrics, comparing the student's outputs with the teacher's on samples it never trained on:

* top-1 agreement for ``[N, C]`` scores (the same arg-max);
* string agreement for ``[N, T, C]`` scores: greedy CTC decoding (arg-max per position, repeats merged,
  class 0 dropped as the blank), the share of samples decoded to the same sequence;
* per-position top-1 agreement for class scores of rank ≥ 4;
* relative L2 ``||student − teacher|| / ||teacher||`` for MSE outputs (lower is better).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx

from ..errors import LowRankError

__all__ = ["BLANK", "OutputLoss", "agreement", "choose_loss", "greedy_ctc", "primary"]

Array = npt.NDArray[Any]
Scores = Literal["logits", "log-probabilities", "probabilities"]
BLANK = 0  # the CTC blank of greedy decoding
_LINEAR = {"MatMul", "Gemm", "Einsum"}


@dataclass(frozen=True)
class OutputLoss:
    """How one output (or cut tensor) is fitted and measured."""

    name: str
    kind: Literal["kl", "mse", "none"]
    scores: Scores | None = None  # for "kl": how the values are read
    metric: str = "relative L2"
    variance: float = 1.0  # for "mse": the teacher's variance over the training samples

    @property
    def description(self) -> str:
        if self.kind == "kl":
            return f"KL over the last axis ({self.scores})"
        if self.kind == "mse":
            return "MSE / teacher variance"
        return "not trained on (not floating point)"

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "relative L2"


def _linear_producer(model: onnx.ModelProto | None, name: str) -> bool:
    """Whether ``name`` is written by a linear layer over its last axis (through a bias Add)."""
    if model is None:
        return False
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(name)
    if node is None:
        return False
    if node.op_type in _LINEAR:
        return True
    if node.op_type == "Add":
        return any(producers.get(i) is not None and producers[i].op_type in _LINEAR for i in node.input)
    return False


def _score_kind(values: Array) -> Scores:
    flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
    if np.all(flat <= 1e-6):
        peak = flat.max(axis=1, keepdims=True)
        lse = peak[:, 0] + np.log(np.exp(flat - peak).sum(axis=1))
        if np.all(np.abs(lse) < 1e-3):
            return "log-probabilities"
    if np.all((flat >= 0) & (flat <= 1)) and np.all(np.abs(flat.sum(axis=1) - 1) < 1e-3):
        return "probabilities"
    return "logits"


def _class_metric(rank: int) -> str:
    if rank == 2:
        return "top-1 agreement"
    if rank == 3:
        return "string agreement (greedy CTC, blank 0)"
    return "per-position top-1 agreement"


def choose_loss(name: str, teacher: Array, model: onnx.ModelProto | None = None, override: str | None = None) -> OutputLoss:
    """The loss of output ``name`` from the teacher's values (samples on axis 0); see the module docstring."""
    if not np.issubdtype(teacher.dtype, np.floating):
        return OutputLoss(name, "none", metric="none")
    rank, classes = teacher.ndim, teacher.shape[-1] if teacher.ndim else 0
    finite = teacher[np.isfinite(teacher)] if teacher.size else teacher
    if override == "kl":
        if rank < 2 or classes < 2:
            raise LowRankError(f"output {name!r} of shape {teacher.shape[1:]} has no class axis for a KL loss")
        return OutputLoss(name, "kl", _score_kind(teacher), _class_metric(rank))
    if override != "mse" and rank >= 2 and classes >= 2:
        kind = _score_kind(teacher)
        if rank == 2 or kind != "logits" or _linear_producer(model, name):
            return OutputLoss(name, "kl", kind, _class_metric(rank))
    variance = float(np.var(finite.astype(np.float64))) if finite.size else 0.0
    return OutputLoss(name, "mse", None, "relative L2", variance if variance > 0 else 1.0)


def greedy_ctc(scores: Array) -> list[tuple[int, ...]]:
    """Best-path CTC decoding of ``[N, T, C]`` scores: arg-max per position, repeats merged, blanks dropped."""
    best = scores.argmax(axis=-1)
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return [tuple(int(c) for c in row[mask]) for row, mask in zip(best, keep, strict=True)]


def agreement(loss: OutputLoss, student: Array, teacher: Array) -> float:
    """The held-back metric of one output (see the module docstring)."""
    if loss.metric == "top-1 agreement":
        return float(np.mean(student.argmax(axis=-1) == teacher.argmax(axis=-1)))
    if loss.metric.startswith("string agreement"):
        return float(np.mean([a == b for a, b in zip(greedy_ctc(student), greedy_ctc(teacher), strict=True)]))
    if loss.metric == "per-position top-1 agreement":
        return float(np.mean(student.argmax(axis=-1) == teacher.argmax(axis=-1)))
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    norm = float(np.linalg.norm(t))
    return float(np.linalg.norm(s - t) / norm) if norm > 0 else float(np.linalg.norm(s - t))


def primary(losses: Sequence[OutputLoss]) -> OutputLoss:
    """The output early stopping watches: the first with class scores, else the first trained on."""
    trained = [loss for loss in losses if loss.kind != "none"]
    return next((loss for loss in trained if loss.kind == "kl"), trained[0])
