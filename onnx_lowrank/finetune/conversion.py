"""The fine-tune step of a conversion: what trains, with which options, and the report's ``finetune`` entry.

:func:`finetune_conversion` is what :func:`onnx_lowrank.decompose` runs after the rewrite and the refit when
:class:`onnx_lowrank.config.FinetuneConfig` is enabled: the decomposed layers named by the report
(``vertical_node``/``horizontal_node``) give the trained initializers (:func:`.targets.decomposed_weights`,
or every float weight), the config gives the budget, the seed and the feature term, and the report's entry
says what ran — the steps, the seconds, each output's loss, the trained tensors, the metrics of the early
stopping (on a slice of the samples it is given, ``samples_early_stopping``) and the tolerance within which
onnxruntime computes what the trained network computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy.typing as npt
import onnx

from ..config import FinetuneConfig
from ..errors import LowRankError
from ..report import Report
from .distill import finetune
from .options import FinetuneOptions
from .targets import decomposed_weights

__all__ = ["NOTHING_DECOMPOSED", "PHASE", "finetune_conversion", "finetune_options"]

PHASE = "fine-tune"  # the progress callback's names start with it: "fine-tune loss 0.0123 held-back agree 97.5%"
NOTHING_DECOMPOSED = "no layer was decomposed: the converted model computes what the original does"

Progress = Callable[[int, int, str], None]


def finetune_options(config: FinetuneConfig, threads: int | None, features: tuple[tuple[str, str], ...]) -> FinetuneOptions:
    """The loop's options: ``config.options`` (or the defaults) with the budget, seed and feature term of ``config``;
    ``threads`` where the options name none."""
    base = config.options if config.options is not None else FinetuneOptions()
    if not isinstance(base, FinetuneOptions):
        raise LowRankError(f"finetune_options must be a FinetuneOptions, not a {type(base).__name__}")
    steps, minutes = config.budget
    return replace(
        base,
        steps=steps,
        minutes=minutes,
        seed=config.seed,
        threads=base.threads if base.threads is not None else threads,
        feature_weight=(base.feature_weight or 1.0) if config.features else 0.0,
        features=features if config.features else (),
    )


def finetune_conversion(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    report: Report,
    data: Mapping[str, npt.ArrayLike],
    config: FinetuneConfig,
    threads: int | None = None,
    progress: Progress | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """``converted`` (the conversion of ``original`` that ``report`` describes) distilled toward ``original`` on
    ``data``, and the report's ``finetune`` entry. Neither model is changed; with no layer decomposed the
    converted model is returned as it is, and the entry says why."""
    pairs = [(layer.vertical_node, layer.horizontal_node) for layer in report.decomposed if layer.vertical_node and layer.horizontal_node]
    if not pairs:
        return converted, {"trainable": config.trainable, "skipped": NOTHING_DECOMPOSED}
    weights = decomposed_weights(converted, pairs)
    options = finetune_options(config, threads, weights.features)
    trainable = weights.initializers if config.trainable == "factors" else None
    step: Progress | None = None
    if progress is not None:
        told = progress

        def step(done: int, total: int, text: str) -> None:
            told(done, total, f"{PHASE} {text}")

    tuned, result = finetune(original, converted, data, trainable=trainable, options=options, progress=step)
    entry: dict[str, Any] = {"trainable": config.trainable, **result.to_dict()}
    entry["not_trained"] = [list(s) for s in weights.skipped] if config.trainable == "factors" else []
    # in a conversion "held back" names the samples the answers are measured on: the fine-tune's own slice is the early stopping's
    for old, new in _RENAMED.items():
        entry[new] = entry.pop(old)
    return tuned, entry


_RENAMED = {
    "samples_held_back": "samples_early_stopping",
    "held_back_loss_before": "early_stopping_loss_before",
    "held_back_loss_after": "early_stopping_loss_after",
}
