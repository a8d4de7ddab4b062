"""How close a converted model's answers are to the original's, per output, in the measure that fits it (numpy only).

Each output is measured by what a user of it reads, decided from the original's values (samples on axis 0):

* **top-1 agreement** for ``[N, C]`` class scores (``C ≥ 2``): the share of samples with the same arg-max;
* **string agreement** for ``[N, T, C]`` per-position class scores — the values are log-probabilities or
  probabilities over the last axis, or the output is written by a linear layer over it (``MatMul``, ``Gemm``,
  ``Einsum``, maybe plus a bias ``Add``), as the per-time-step scores of a sequence recogniser are: greedy
  CTC decoding (arg-max per position, repeats merged, class 0 dropped as the blank), the share of samples
  decoded to the same sequence;
* **per-position top-1 agreement** for class scores of rank ≥ 4 (a segmenter's per-pixel classes);
* **relative L2** ``||candidate − original|| / ||original||`` otherwise (boxes, masks, embeddings; lower is
  better); integer and boolean outputs are compared for equality.

With labels a ``[N, C]`` output also gives both models' accuracy (one class index per sample), and so does a
string output (a ``[N, L]`` array per sample of class indices, padded with -1: its decoded string must be exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx

__all__ = [
    "BLANK",
    "OutputAgreement",
    "Scores",
    "agreement",
    "greedy_ctc",
    "label_sequences",
    "measure_of",
    "score_kind",
    "summary_measure",
]

Array = npt.NDArray[Any]
Scores = Literal["logits", "log-probabilities", "probabilities"]
BLANK = 0  # the CTC blank of greedy decoding
_LINEAR = {"MatMul", "Gemm", "Einsum"}
TOP1 = "top-1 agreement"
STRINGS = "string agreement (greedy CTC, blank 0)"
POSITIONS = "per-position top-1 agreement"
RELATIVE_L2 = "relative L2"
EQUAL = "equal values"


def linear_producer(model: onnx.ModelProto | None, name: str) -> bool:
    """Whether ``name`` is written by a linear layer over its last axis (maybe through a bias Add)."""
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


def score_kind(values: Array) -> Scores:
    """How class scores over the last axis read: log-probabilities, probabilities, or logits."""
    flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
    if np.all(flat <= 1e-6):
        peak = flat.max(axis=1, keepdims=True)
        lse = peak[:, 0] + np.log(np.exp(flat - peak).sum(axis=1))
        if np.all(np.abs(lse) < 1e-3):
            return "log-probabilities"
    if np.all((flat >= 0) & (flat <= 1)) and np.all(np.abs(flat.sum(axis=1) - 1) < 1e-3):
        return "probabilities"
    return "logits"


def measure_of(name: str, original: Array, model: onnx.ModelProto | None = None) -> str:
    """The measure of output ``name`` (see the module docstring), from the original's values on a few samples."""
    if not np.issubdtype(original.dtype, np.floating):
        return EQUAL
    rank = original.ndim
    classes = original.shape[-1] if rank else 0
    if rank >= 2 and classes >= 2 and original.size:
        if rank == 2:
            return TOP1
        if score_kind(original) != "logits" or linear_producer(model, name):
            return STRINGS if rank == 3 else POSITIONS
    return RELATIVE_L2


def greedy_ctc(scores: Array) -> list[tuple[int, ...]]:
    """Best-path CTC decoding of ``[N, T, C]`` scores: arg-max per position, repeats merged, blanks dropped."""
    best = scores.argmax(axis=-1)
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    return [tuple(int(c) for c in row[mask]) for row, mask in zip(best, keep, strict=True)]


def label_sequences(labels: Array) -> list[tuple[int, ...]]:
    """``[N, L]`` class indices padded with negative values → each sample's sequence."""
    return [tuple(int(c) for c in row if c >= 0) for row in labels]


def agreement(measure: str, candidate: Array, original: Array) -> float:
    """The value of ``measure`` between the candidate's and the original's outputs (samples on axis 0)."""
    if measure in (TOP1, POSITIONS):
        return float(np.mean(candidate.argmax(axis=-1) == original.argmax(axis=-1)))
    if measure == STRINGS:
        return float(np.mean([a == b for a, b in zip(greedy_ctc(candidate), greedy_ctc(original), strict=True)]))
    if measure == EQUAL:
        return float(np.mean(candidate == original))
    c, o = candidate.astype(np.float64), original.astype(np.float64)
    norm = float(np.linalg.norm(o))
    return float(np.linalg.norm(c - o) / norm) if norm > 0 else float(np.linalg.norm(c - o))


def higher_is_better(measure: str) -> bool:
    return measure != RELATIVE_L2


@dataclass
class OutputAgreement:
    """One output's measure and value; with labels, both models' accuracy."""

    output: str
    measure: str
    value: float
    samples: int
    accuracy_original: float | None = None
    accuracy_candidate: float | None = None

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.measure)

    @property
    def drop(self) -> float:
        """What the conversion cost, in points: accuracy lost with labels, else 100 × (1 − agreement), or for a
        relative L2 the error itself in percent."""
        if self.accuracy_original is not None and self.accuracy_candidate is not None:
            return 100.0 * (self.accuracy_original - self.accuracy_candidate)
        return 100.0 * (1.0 - self.value) if self.higher_is_better else 100.0 * self.value

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "higher_is_better": self.higher_is_better, "drop": self.drop}


def compare(
    names: Sequence[str],
    original: Sequence[Array],
    candidate: Sequence[Array],
    model: onnx.ModelProto | None = None,
    labels: Array | None = None,
) -> list[OutputAgreement]:
    """Every output's agreement (samples on axis 0); ``labels`` give accuracy on ``[N, C]`` outputs."""
    out = []
    for name, o, c in zip(names, original, candidate, strict=True):
        measure = measure_of(name, o, model)
        entry = OutputAgreement(name, measure, agreement(measure, c, o), int(o.shape[0]) if o.ndim else 1)
        if labels is not None and len(labels) == o.shape[0]:
            if measure == TOP1 and labels.ndim == 1:
                entry.accuracy_original = float(np.mean(o.argmax(axis=-1) == labels))
                entry.accuracy_candidate = float(np.mean(c.argmax(axis=-1) == labels))
            elif measure == STRINGS and labels.ndim == 2:
                truth = label_sequences(labels)
                entry.accuracy_original = float(np.mean([a == b for a, b in zip(greedy_ctc(o), truth, strict=True)]))
                entry.accuracy_candidate = float(np.mean([a == b for a, b in zip(greedy_ctc(c), truth, strict=True)]))
        out.append(entry)
    return out


def summary_measure(outputs: Sequence[OutputAgreement]) -> OutputAgreement | None:
    """The output that speaks for the model: the first with class scores (accuracy or agreement), else the first."""
    ranked = [o for o in outputs if o.measure in (TOP1, STRINGS, POSITIONS)]
    return ranked[0] if ranked else (outputs[0] if outputs else None)


def as_dicts(outputs: Sequence[OutputAgreement]) -> list[Mapping[str, Any]]:
    return [o.to_dict() for o in outputs]
