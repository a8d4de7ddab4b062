"""Fine-tuning of a converted model by distillation toward the original (Tai et al. 2016, Sec. 3.3's last step).

The closed-form factors of a decomposition are fitted layer by layer; the network they form has not seen
the error of the layers before it as a whole. This subpackage trains the converted ONNX model's weights
(by default only the decomposed layers' factors and biases) so that its outputs match the original
model's on unlabelled inputs, and writes the trained values back into the same initializers: every other
byte of the model stays as the converter wrote it. torch is needed (the ``finetune`` extra) and imported
only when :func:`finetune` runs.

Modules, each one job:

* :mod:`.distill` — :func:`finetune`, the entry point: checks the inputs and the trainable names;
* :mod:`.conversion` — :func:`finetune_conversion`, the step of a conversion: what trains, the report's entry;
* :mod:`.options` — :class:`FinetuneOptions` and :class:`FinetuneResult` (no torch);
* :mod:`.targets` — which initializers train: :func:`decomposed_weights`, :func:`float_weights`;
* :mod:`.outputs` — per output, the loss (KL for class scores, MSE otherwise) and the held-back metric;
* :mod:`.segment` — what torch evaluates: the whole graph, or the segment around the trained weights;
* :mod:`.ops`, :mod:`.interpreter` — the ONNX graph evaluated node by node with torch ops;
* :mod:`.training` — the loop, the equivalence check before and the write-back check after;
* :mod:`.writeback` — the trained tensors into the initializers, in their own dtypes.

This package does not import :mod:`onnx_lowrank.api` or the CLI; the API calls :func:`finetune_conversion`.
"""

from __future__ import annotations

from ._torch import EXTRA, MISSING_TORCH, check_torch, require_torch
from .conversion import NOTHING_DECOMPOSED, PHASE, finetune_conversion, finetune_options
from .distill import finetune
from .options import CheckResult, FinetuneOptions, FinetuneResult, HeldBackMetric, OutputLossResult
from .targets import DecomposedWeights, decomposed_weights, float_weights

__all__ = [
    "EXTRA",
    "MISSING_TORCH",
    "NOTHING_DECOMPOSED",
    "PHASE",
    "CheckResult",
    "DecomposedWeights",
    "FinetuneOptions",
    "FinetuneResult",
    "HeldBackMetric",
    "OutputLossResult",
    "check_torch",
    "decomposed_weights",
    "finetune",
    "finetune_conversion",
    "finetune_options",
    "float_weights",
    "require_torch",
]
