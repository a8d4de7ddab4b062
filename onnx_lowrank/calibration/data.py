"""Calibration data: read, checked against the model's inputs, and cut into batches.

A calibration set is ``{input name: array}`` with the samples on axis 0. It comes from an ``.npz`` keyed by
input name, a folder of ``<input>.npy`` files (memory-mapped, so a large set is not read into memory at
once), a mapping of arrays, or an iterable of such mappings (batches, joined along axis 0).

Checked against the model (:func:`load_calibration` with ``model``), each failure a one-line
:class:`~onnx_lowrank.errors.LowRankError` naming the input:

* every graph input the model needs is present (extra keys such as ``labels`` are dropped);
* the rank and every fixed dim but the first (the samples) match the declared input;
* the dtype converts without loss of meaning: numbers to a floating input, integers (or bools) to an integer
  input, bools to a bool input; floating data for an integer input, complex or non-numeric data are refused;
* floating data is finite (no NaN, no infinity);
* all inputs have the same number of samples, at least one — and at least the model's batch size when its
  first dim is fixed (the model is then fed in batches of exactly that size).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx

from ..data_io import check_finite, convert_dtype, format_dims, load_npy, load_npz, model_input_specs
from ..errors import LowRankError
from ..model_io import ModelLike, load_model

__all__ = [
    "HELD_BACK_MIN_SAMPLES",
    "Batches",
    "CalibrationSource",
    "batch_size_of",
    "hold_back",
    "iter_batches",
    "load_calibration",
    "sample_count",
]

Array = npt.NDArray[Any]
CalibrationSource = str | os.PathLike[str] | Mapping[str, npt.ArrayLike] | Iterable[Mapping[str, npt.ArrayLike]]


def _read_folder(path: Path) -> dict[str, Array]:
    files = sorted(p for p in path.iterdir() if p.suffix == ".npy" and p.is_file())
    if not files:
        raise LowRankError(f"{path}: folder holds no .npy files (one per model input, named after the input)")
    return {f.stem: load_npy(f, mmap=True) for f in files}


def _concat_batches(batches: Iterable[Mapping[str, npt.ArrayLike]]) -> dict[str, Array]:
    parts: dict[str, list[Array]] = {}
    keys: set[str] | None = None
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise LowRankError(f"calibration batch {i} is a {type(batch).__name__}, not a mapping of input name to array")
        if keys is None:
            keys = set(batch)
        elif set(batch) != keys:
            raise LowRankError(f"calibration batch {i} has inputs {sorted(batch)}, batch 0 has {sorted(keys)}")
        for name, value in batch.items():
            parts.setdefault(name, []).append(np.asarray(value))
    if not parts:
        raise LowRankError("calibration data is empty (the iterator gave no batches)")
    out = {}
    for name, arrays in parts.items():
        try:
            out[name] = np.concatenate(arrays, axis=0) if len(arrays) > 1 else arrays[0]
        except ValueError as exc:
            raise LowRankError(f"calibration input {name!r}: batches do not stack along axis 0 ({exc})") from None
    return out


def batch_size_of(model: onnx.ModelProto) -> int | None:
    """The model's batch size when every input fixes its first dim (the smallest of them), else None."""
    fixed = {d[0] for spec in model_input_specs(model) if (d := spec.dims) and isinstance(d[0], int) and d[0] > 0}
    return min(fixed) if fixed else None


def sample_count(data: Mapping[str, Array]) -> int:
    """Samples in a checked calibration set (0 when it is empty)."""
    return min((len(v) for v in data.values()), default=0)


# what a conversion with calibration data holds back to measure its answers on: an eighth of the samples, between
# HELD_BACK_LEAST and HELD_BACK_MOST, and none when fewer than HELD_BACK_MIN_SAMPLES are given (the statistics and the
# refit need the rest more than the measurement needs a few)
HELD_BACK_SHARE = 8
HELD_BACK_LEAST = 8
HELD_BACK_MOST = 64
HELD_BACK_MIN_SAMPLES = 32


def hold_back(data: Mapping[str, Array], model: onnx.ModelProto) -> tuple[dict[str, Array], dict[str, Array]]:
    """``data`` split into the samples the conversion uses and the last few, held back to measure its answers on
    (an eighth, 8 to 64, a whole number of the model's fixed batch; none below 32 samples: ``held`` is empty)."""
    count = sample_count(data)
    batch = batch_size_of(model) or 1
    held = min(HELD_BACK_MOST, max(HELD_BACK_LEAST, count // HELD_BACK_SHARE)) // batch * batch
    if count < HELD_BACK_MIN_SAMPLES or held == 0 or count - held < batch:
        return dict(data), {}
    used = count - held
    return {k: v[:used] for k, v in data.items()}, {k: v[used:count] for k, v in data.items()}


def load_calibration(source: CalibrationSource, model: ModelLike | None = None) -> dict[str, Array]:
    """Calibration inputs as ``{input name: array}``, samples on axis 0 (see the module docstring).

    Without ``model`` every array is returned as stored; with it the data is checked against the model's
    inputs, converted to their element types and reduced to them. Raises :class:`LowRankError` with a
    one-line message for a missing or unreadable file, a missing input, a wrong shape or dtype, NaNs,
    or too few samples.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise LowRankError(f"{path}: no such calibration file or folder")
        arrays = _read_folder(path) if path.is_dir() else load_npz(path, "calibration file")
    elif isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
    elif isinstance(source, Iterable):
        arrays = _concat_batches(source)
    else:
        raise LowRankError(f"calibration data must be a path, a mapping or an iterable of mappings, got {type(source).__name__}")
    if not arrays:
        raise LowRankError("calibration data holds no arrays")
    for name, value in arrays.items():
        if value.ndim == 0:
            raise LowRankError(f"calibration input {name!r} is a scalar; samples must be on axis 0")
    if model is None:
        counts = {name: len(v) for name, v in arrays.items()}
        if len(set(counts.values())) > 1:
            raise LowRankError(f"calibration inputs differ in sample count: {counts}")
        if min(counts.values()) == 0:
            raise LowRankError("calibration data has no samples")
        return arrays
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    out: dict[str, Array] = {}
    for spec in model_input_specs(proto):
        name, dims = spec.name, spec.dims
        if name not in arrays:
            raise LowRankError(f"calibration data lacks model input {name!r} (has: {', '.join(sorted(arrays)) or 'nothing'})")
        data = arrays[name]
        pairs = zip(dims[1:], data.shape[1:], strict=False) if dims is not None else ()
        fixed_dims = [(d, n) for d, n in pairs if isinstance(d, int) and d > 0]
        if dims is not None and (data.ndim != len(dims) or any(d != n for d, n in fixed_dims)):
            raise LowRankError(f"calibration input {name!r} has shape {tuple(data.shape)}; the model expects {format_dims(dims)}")
        data = convert_dtype(data, spec, f"calibration input {name!r}")
        check_finite(data, f"calibration input {name!r}")
        out[name] = data
    counts = {name: len(v) for name, v in out.items()}
    if len(set(counts.values())) > 1:
        raise LowRankError(f"calibration inputs differ in sample count: {counts}")
    if counts and min(counts.values()) == 0:
        raise LowRankError(f"calibration input {next(iter(counts))!r} has no samples")
    batch = batch_size_of(proto)
    if batch is not None and counts and min(counts.values()) < batch:
        name = min(counts, key=lambda k: counts[k])
        raise LowRankError(f"calibration input {name!r} has {counts[name]} samples, fewer than the model's fixed batch of {batch}")
    return out


class Batches:
    """The calibration set as feeds of ``size`` samples, a size that may change between batches (a model whose
    batch is fixed is always fed exactly that; left-over samples that do not fill one are dropped).

    The passes start with one sample, see how many bytes of tensors it yields, and :meth:`resize` to what
    fits their memory budget, so the memory a pass holds does not grow with the batch size asked for.
    """

    def __init__(self, model: onnx.ModelProto, data: Mapping[str, Array], size: int, limit: int | None = None) -> None:
        self.inputs = [spec.name for spec in model_input_specs(model)]
        self.data = data
        count = min(len(data[name]) for name in self.inputs) if self.inputs else 0
        if limit is not None:
            count = min(count, limit)
        self.fixed = batch_size_of(model)
        if self.fixed is not None:
            if count < self.fixed:
                raise LowRankError(f"the model's batch size is fixed at {self.fixed}, but the calibration data has only {count} samples")
            count -= count % self.fixed
        self.count = count
        self.size = self.fixed or max(1, size)

    def resize(self, size: int) -> None:
        if self.fixed is None:
            self.size = max(1, size)

    def __iter__(self) -> Iterator[dict[str, Array]]:
        start = 0
        while start < self.count:
            stop = min(self.count, start + self.size)
            yield {name: np.ascontiguousarray(self.data[name][start:stop]) for name in self.inputs}
            start = stop


def iter_batches(
    model: onnx.ModelProto, data: Mapping[str, Array], batch_size: int, limit: int | None = None
) -> Iterator[dict[str, Array]]:
    """Feeds of at most ``batch_size`` samples (exactly the model's batch when it is fixed; left-over samples
    that do not fill one are dropped). ``limit`` caps the samples used."""
    return iter(Batches(model, data, batch_size, limit))
