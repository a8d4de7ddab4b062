"""Calibration: data-aware conversion from a few streamed passes over the model's own inputs.

Modules, each one job:

* :mod:`.data` — calibration data: read, checked against the model's inputs, cut into batches;
* :mod:`.collect` — the one mechanism that gets intermediate tensors out of onnxruntime (extra graph outputs
  of one pruned session, streamed batch by batch to a callback);
* :mod:`.statistics` — second moments of each layer's input patches, accumulated batch by batch (numpy);
* :mod:`.layers` — what each decomposable layer reads, and the statistics pass;
* :mod:`.data_aware` — data-aware factorizations and every rank's output error from the moments (numpy);
* :mod:`.sensitivity` — per-layer gains from the layer's output error to the model's outputs;
* :mod:`.plan` — the three above, as :func:`onnx_lowrank.decompose` uses them before it chooses ranks;
* :mod:`.refit` — the asymmetric refit of every decomposed layer's second factor, stage by stage;
* :mod:`.activation` — the activation read after a decomposed layer, and the refit fit to its output.

This package does not import :mod:`onnx_lowrank.api`; the API imports it.
"""

from __future__ import annotations

from .data import CalibrationSource, hold_back, iter_batches, load_calibration
from .plan import CalibrationOptions, DataAwarePlan, data_aware_plan
from .refit import LayerRefit, RefitOptions, RefitResult, refit, refit_layers

__all__ = [
    "CalibrationOptions",
    "CalibrationSource",
    "DataAwarePlan",
    "LayerRefit",
    "RefitOptions",
    "RefitResult",
    "data_aware_plan",
    "hold_back",
    "iter_batches",
    "load_calibration",
    "refit",
    "refit_layers",
]
