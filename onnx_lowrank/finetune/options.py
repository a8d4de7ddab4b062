"""What a fine-tune is asked to do (:class:`FinetuneOptions`) and what it did (:class:`FinetuneResult`).

Both are plain data: no torch, so a caller can build, check and print them where torch is not installed.
Every option is checked when the object is made; a bad value is a :class:`LowRankError` of one line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..errors import LowRankError

__all__ = ["CheckResult", "FinetuneOptions", "FinetuneResult", "HeldBackMetric", "LossKindName", "OutputLossResult"]

LossKindName = Literal["kl", "mse"]


@dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune.

    Args:
        steps: optimiser steps at most (``None``: only the time budget bounds them).
        minutes: wall-clock budget of the training loop (``None``: only ``steps`` bounds it); the checks and
            the teacher's pass over the data come on top.
        lr: Adam's peak learning rate. The default suits a conversion that kept most of the answers (calibrated):
            on the text line at 2x MACs, 1e-3 lost test strings (89.0 → 88.2 %) where 3e-4 and 1e-4 gained
            (90.8 %, 91.0 %); a model the conversion broke (data-free at 4x) wants more (the digits CNN: 3e-3).
        schedule: ``"cosine"`` (linear warm-up over ``warmup`` steps, then a cosine decay to 0 at the step
            budget, or at the time budget when no step budget is set) or ``"constant"``.
        warmup: warm-up steps of the cosine schedule.
        batch_size: samples per step (a model whose inputs fix the batch trains at that batch instead).
        held_back: fraction of the samples kept out of training for early stopping and the before/after metric.
        min_held_back: at least this many samples are held back.
        seed: the held-back split, the order of the batches and torch's generator all derive from it.
        mixup: ``α`` of input mixing (0: off). Each training batch's inputs are blended pairwise,
            ``λ·x_i + (1 − λ)·x_j`` with ``λ ~ Beta(α, α)``, and the teacher (and the fixed upstream part of a
            segment) is run by onnxruntime on the blend: more distinct inputs to match than the data holds,
            at the price of one pass of the original per step. Needs floating-point inputs.
        sequence_weight: weight of a CTC term for ``[N, T, C]`` per-position class scores (0: off): the
            student's scores against the teacher's greedy decoding (arg-max per position, repeats merged,
            class 0 the blank), so the strings the student decodes are fitted, not only each position.
        temperature: of the KL term (both distributions are softened by it; the term is scaled by T²).
        feature_weight: weight of the feature term (0: off).
        features: ``(converted tensor, original tensor)`` pairs the feature term compares (MSE over the
            original's variance, averaged over the pairs); typically the decomposed layers' outputs.
        loss_kinds: per graph output, ``"kl"`` or ``"mse"`` instead of the kind chosen from the teacher's values.
        eval_every: steps between two evaluations on the held-back slice.
        patience: stop after this many evaluations without a better held-back metric (``None``: never early).
        threads: torch's and onnxruntime's intra-op threads (``None``: the physical cores).
        tolerance: largest ``max|a − b| / max|b|`` allowed between the interpreter and onnxruntime, per
            float32/float64 output, before training (the same function?) and after writing back.
        tolerance_16bit: the same for fp16/bf16 outputs (onnxruntime rounds fp16 at other places than torch).
        eval_batch_size: samples per forward pass when evaluating and running onnxruntime.
    """

    steps: int | None = 300
    minutes: float | None = 10.0
    lr: float = 3e-4
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: int = 20
    batch_size: int = 32
    held_back: float = 0.15
    min_held_back: int = 4
    seed: int = 0
    mixup: float = 0.0
    sequence_weight: float = 0.0
    temperature: float = 1.0
    feature_weight: float = 0.0
    features: tuple[tuple[str, str], ...] = ()
    loss_kinds: Mapping[str, LossKindName] = field(default_factory=dict)
    eval_every: int = 25
    patience: int | None = 8
    threads: int | None = None
    tolerance: float = 1e-4
    tolerance_16bit: float = 1e-2
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise LowRankError("fine-tune budget: give steps, minutes or both")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise LowRankError(f"fine-tune steps must be a positive integer, got {self.steps!r}")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and math.isfinite(self.minutes) and self.minutes > 0):
            raise LowRankError(f"fine-tune minutes must be a positive number, got {self.minutes!r}")
        for name in ("lr", "temperature", "tolerance", "tolerance_16bit"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise LowRankError(f"fine-tune {name} must be a positive number, got {value!r}")
        if self.schedule not in ("cosine", "constant"):
            raise LowRankError(f"fine-tune schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        for name in ("batch_size", "min_held_back", "eval_every", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LowRankError(f"fine-tune {name} must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise LowRankError(f"fine-tune warmup must be an integer >= 0, got {self.warmup!r}")
        if not (isinstance(self.held_back, (int, float)) and 0 < self.held_back < 1):
            raise LowRankError(f"fine-tune held_back must be a fraction in (0, 1), got {self.held_back!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise LowRankError(f"fine-tune seed must be an integer >= 0, got {self.seed!r}")
        for name in ("mixup", "sequence_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise LowRankError(f"fine-tune {name} must be a number >= 0, got {value!r}")
        if not (isinstance(self.feature_weight, (int, float)) and math.isfinite(self.feature_weight) and self.feature_weight >= 0):
            raise LowRankError(f"fine-tune feature_weight must be a number >= 0, got {self.feature_weight!r}")
        if self.feature_weight > 0 and not self.features:
            raise LowRankError("fine-tune feature_weight is set but no feature tensors are given")
        for pair in self.features:
            if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(n, str) and n for n in pair)):
                raise LowRankError(f"fine-tune features must be (converted tensor, original tensor) name pairs, got {pair!r}")
        for output, kind in self.loss_kinds.items():
            if kind not in ("kl", "mse"):
                raise LowRankError(f"fine-tune loss kind of {output!r} must be 'kl' or 'mse', got {kind!r}")
        if self.patience is not None and (not isinstance(self.patience, int) or self.patience < 1):
            raise LowRankError(f"fine-tune patience must be a positive integer or None, got {self.patience!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise LowRankError(f"fine-tune threads must be a positive integer or None, got {self.threads!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["features"] = [list(p) for p in self.features]
        out["loss_kinds"] = dict(self.loss_kinds)
        return out


@dataclass
class CheckResult:
    """One comparison of the torch network with onnxruntime on the held-back inputs.

    ``max_abs``: largest absolute difference over every compared tensor; ``max_relative``: the largest
    ``max|a − b| / max|b|`` of one tensor; ``tolerance``: what ``max_relative`` had to stay within
    (per tensor: ``tolerances``).
    """

    what: str
    samples: int
    max_abs: float
    max_relative: float
    tolerance: float
    tolerances: dict[str, float] = field(default_factory=dict)
    per_tensor: dict[str, float] = field(default_factory=dict)


@dataclass
class HeldBackMetric:
    """Agreement with the original on the held-back slice, before and after fine-tuning (onnxruntime's outputs).

    ``name``: ``top-1 agreement``, ``string agreement (greedy CTC, blank 0)``, ``per-position top-1
    agreement`` or ``relative L2`` (``higher_is_better`` false).
    """

    output: str
    name: str
    before: float
    after: float
    higher_is_better: bool


@dataclass
class OutputLossResult:
    """One output's loss: its kind (``"kl"`` or ``"mse"``), how it reads the output, and its value on the
    held-back slice before and after fine-tuning."""

    kind: str
    description: str
    before: float
    after: float


@dataclass
class FinetuneResult:
    """What a fine-tune did; ``to_dict()`` is JSON-able."""

    mode: str  # "whole graph", or the segment trained and why
    trained: list[str]
    trained_elements: int
    loss_kinds: dict[str, str]
    samples_train: int
    samples_held_back: int
    batch_size: int
    seed: int
    threads: int
    steps: int = 0
    best_step: int = 0
    seconds: float = 0.0
    train_seconds: float = 0.0
    stopped_early: bool = False
    stop_reason: str = ""
    train_loss_start: float | None = None
    train_loss_end: float | None = None
    held_back_loss_before: float | None = None
    held_back_loss_after: float | None = None
    metric: HeldBackMetric | None = None
    metrics: list[HeldBackMetric] = field(default_factory=list)
    output_losses: dict[str, OutputLossResult] = field(default_factory=dict)  # per trained output, on the held-back slice
    equivalence: CheckResult | None = None
    write_back: CheckResult | None = None
    features: list[list[str]] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)  # per evaluation: step, held-back loss and metric
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def trained_count(self) -> int:
        return len(self.trained)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["trained_count"] = self.trained_count
        return out
