"""Per output: which loss fits it (numpy only). How agreement is measured is :mod:`onnx_lowrank.agreement`'s.

An output is fitted by what its measure says it is (:func:`onnx_lowrank.agreement.measure_of`, read from the
teacher's — the original model's — values on the training samples, samples on axis 0):

* **KL over the last axis** for class scores, the outputs measured by top-1, string or per-position top-1
  agreement: a rank-2 ``[N, C]`` output with ``C ≥ 2``, and a rank ≥ 3 output whose last axis holds
  log-probabilities, probabilities, or the scores of a linear layer over it (the per-time-step scores of a
  sequence recogniser). The scores are read as log-probabilities, probabilities or logits accordingly
  (:func:`onnx_lowrank.agreement.score_kind`) and turned into log-probabilities (softened by the temperature
  ``T``): ``KL = T² · mean over positions of Σ_c p_teacher,c (log p_teacher,c − log p_student,c)``.
* **MSE over the teacher's variance** for the outputs measured by relative L2 (box regressions, masks,
  embeddings): ``mean((student − teacher)²) / var(teacher)``, a number that does not depend on the output's scale.
* integer and boolean outputs are not trained on (nothing to differentiate).

The held-back metric of an output is its measure (``OutputLoss.metric``), computed by
:func:`onnx_lowrank.agreement.agreement` — the same numbers the conversion reports as its answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx

from ..agreement import POSITIONS, RELATIVE_L2, STRINGS, TOP1, Scores, higher_is_better, measure_of, score_kind
from ..errors import LowRankError

__all__ = ["NOT_TRAINED", "OutputLoss", "choose_loss", "primary"]

Array = npt.NDArray[Any]
NOT_TRAINED = "none"  # the metric of an output that is not trained on
_CLASS_MEASURES = (TOP1, STRINGS, POSITIONS)


@dataclass(frozen=True)
class OutputLoss:
    """How one output (or cut tensor) is fitted, and its measure (an :mod:`onnx_lowrank.agreement` name)."""

    name: str
    kind: Literal["kl", "mse", "none"]
    scores: Scores | None = None  # for "kl": how the values are read
    metric: str = RELATIVE_L2
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
        return higher_is_better(self.metric)


def _class_measure(rank: int) -> str:
    return TOP1 if rank == 2 else STRINGS if rank == 3 else POSITIONS


def choose_loss(name: str, teacher: Array, model: onnx.ModelProto | None = None, override: str | None = None) -> OutputLoss:
    """The loss of output ``name`` from the teacher's values (samples on axis 0); see the module docstring.

    ``override``: ``"kl"`` or ``"mse"`` instead of the kind the measure calls for; ``model`` (the graph that
    writes ``name``) tells the scores of a linear layer from other rank ≥ 3 outputs."""
    if not np.issubdtype(teacher.dtype, np.floating):
        return OutputLoss(name, "none", metric=NOT_TRAINED)
    if override == "kl":
        if teacher.ndim < 2 or teacher.shape[-1] < 2:
            raise LowRankError(f"output {name!r} of shape {teacher.shape[1:]} has no class axis for a KL loss")
        return OutputLoss(name, "kl", score_kind(teacher), _class_measure(teacher.ndim))
    measure = measure_of(name, teacher, model)
    if override != "mse" and measure in _CLASS_MEASURES:
        return OutputLoss(name, "kl", score_kind(teacher), measure)
    finite = teacher[np.isfinite(teacher)] if teacher.size else teacher
    variance = float(np.var(finite.astype(np.float64))) if finite.size else 0.0
    return OutputLoss(name, "mse", None, RELATIVE_L2, variance if variance > 0 else 1.0)


def primary(losses: Sequence[OutputLoss]) -> OutputLoss:
    """The output early stopping watches: the first with class scores, else the first trained on."""
    trained = [loss for loss in losses if loss.kind != "none"]
    return next((loss for loss in trained if loss.kind == "kl"), trained[0])
