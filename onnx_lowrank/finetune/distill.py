"""``finetune``: distil a converted model toward its original on unlabelled inputs, and write the result back.

The student is the converted model, evaluated in torch by :mod:`.interpreter`; the teacher is the original
model in onnxruntime, run once over the data. Only the initializers named ``trainable`` change (``None``:
every float weight, :func:`.targets.float_weights`); the result is a copy of the converted model that
differs from it in those initializers' values alone. :mod:`.training` describes the loop and its checks;
:mod:`.outputs` the loss and the held-back metric of each output.

Preconditions, each refused with a one-line :class:`LowRankError`:

* torch is installed (the ``finetune`` extra);
* both models are in memory (external data loaded) and take the same inputs and give the same outputs;
* the data holds every input of the model, samples on axis 0, more samples than the held-back slice;
* every trainable name is a floating-point initializer of the converted model's main graph;
* the interpreter can run every node that reads a trained weight, and agrees with onnxruntime on the
  converted model within the tolerance (before training) and on the written model (after).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from ..data_io import check_samples, model_input_specs
from ..errors import LowRankError
from . import _torch
from .options import FinetuneOptions, FinetuneResult
from .targets import FLOAT_TYPES, float_weights
from .writeback import check_in_memory

__all__ = ["finetune"]


def _trainable(converted: onnx.ModelProto, trainable: Collection[str] | None) -> list[str]:
    if trainable is None:
        names = list(float_weights(converted))
        if not names:
            raise LowRankError("the converted model has no floating-point weight to fine-tune")
        return names
    if isinstance(trainable, str):
        raise LowRankError("trainable must be a collection of initializer names, not one string")
    tensors = {t.name: t for t in converted.graph.initializer}
    wanted = list(dict.fromkeys(trainable))
    if not wanted:
        raise LowRankError("no initializer to fine-tune was given")
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise LowRankError(f"{len(missing)} trainable name(s) are not initializers of the converted model's main graph: {missing[0]!r}")
    not_float = [n for n in wanted if tensors[n].data_type not in FLOAT_TYPES]
    if not_float:
        raise LowRankError(f"trainable initializer {not_float[0]!r} is not floating point")
    return wanted


def finetune(
    original: onnx.ModelProto,
    converted: onnx.ModelProto,
    data: Mapping[str, npt.ArrayLike],
    *,
    trainable: Collection[str] | None,
    options: FinetuneOptions | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> tuple[onnx.ModelProto, FinetuneResult]:
    """Distil ``converted`` toward ``original`` on the inputs ``data`` (no labels) and return the written model.

    ``trainable``: initializer names to train (the decomposed layers' factors and biases:
    :func:`~onnx_lowrank.finetune.decomposed_weights`), or ``None`` for every float weight.
    ``progress(step, total, text)`` is called after every step (``total`` 0 when only a time budget is set;
    ``text`` like ``"loss 0.0123 held-back agree 97.5%"``). Neither model is changed.
    """
    options = options if options is not None else FinetuneOptions()
    _torch.require_torch()
    check_in_memory(original, "original")
    check_in_memory(converted, "converted")
    specs = model_input_specs(converted)
    original_inputs = {s.name for s in model_input_specs(original)}
    if {s.name for s in specs} != original_inputs:
        raise LowRankError(f"the original model takes inputs {sorted(original_inputs)}, the converted one {sorted(s.name for s in specs)}")
    original_outputs = [o.name for o in original.graph.output]
    converted_outputs = [o.name for o in converted.graph.output]
    if original_outputs != converted_outputs:
        raise LowRankError(f"the original model's outputs {original_outputs} are not the converted model's {converted_outputs}")
    arrays: dict[str, Any] = {str(k): np.asarray(v) for k, v in data.items()}
    inputs = check_samples(arrays, specs, "fine-tune input", "fine-tune data")
    for name, values in inputs.items():
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            raise LowRankError(f"fine-tune input {name!r} holds NaN or infinite values")
    names = _trainable(converted, trainable)
    from .training import train  # torch is imported from here on

    return train(original, converted, inputs, names, options, progress)
