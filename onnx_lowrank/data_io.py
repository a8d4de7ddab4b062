"""The user's array files (``.npz``, ``.npy``) read safely, and allocations sized against this machine's memory.

* An array file is checked before any array is read: it is a zip archive of
  ``.npy`` members (or one ``.npy``), no member needs pickle, and the shape each
  header declares fits both the bytes the file holds and this machine's memory —
  a corrupt header claiming ``2^40`` elements is refused with its size named,
  never allocated.
* :func:`check_samples` checks arrays against a model's inputs: present,
  numeric, not scalar, of the declared rank and fixed dims (axis 0, the samples,
  excepted), at least one sample, the same count for every input; they are cast
  to each input's element type.
* :func:`load_sample` reads *one* input set as the model takes it (``--sample``:
  no sample axis, a scalar input as a 0-d array) and checks it: every input
  present and no other array, the declared rank and every fixed dim (a sample
  axis the model does not have is named as such), a dtype that converts without
  changing its meaning (:func:`convert_dtype`, shared with calibration data),
  finite floats (:func:`check_finite`).
* :func:`check_allocation` refuses a size that cannot fit in memory
  (``LowRankError`` naming it) before numpy or onnxruntime try and fail with an
  out-of-memory error.

Every failure is a :class:`~onnx_lowrank.errors.LowRankError` of one line.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from .errors import LowRankError

__all__ = [
    "InputSpec",
    "check_allocation",
    "check_finite",
    "check_sample",
    "check_samples",
    "convert_dtype",
    "format_bytes",
    "format_dims",
    "load_npy",
    "load_npz",
    "load_sample",
    "memory_budget",
    "model_input_specs",
]

Array = npt.NDArray[Any]


class InputSpec(NamedTuple):
    """A model input as data is checked against it and random inputs are made for it: its name, numpy dtype
    (None: one the tool cannot make values of), and dims (an int, a symbolic name or None per axis; None when
    the rank is not declared)."""

    name: str
    dtype: np.dtype[Any] | None
    dims: tuple[int | str | None, ...] | None
    type_name: str = ""  # the element type as declared (for messages about a dtype the tool cannot handle)

    def show(self) -> str:
        return "(rank unknown)" if self.dims is None else format_dims(self.dims)


_NPY_MAGIC = b"\x93NUMPY"


def memory_budget() -> int:
    """Bytes of physical memory of this machine (a size above it cannot be allocated and used)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # not POSIX: no cheap way to ask; only absurd sizes are refused
        return 1 << 46


def format_bytes(n: int) -> str:
    """``1.5 GiB (1,610,612,736 bytes)``: the unit a person reads, and the exact count."""
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def check_allocation(nbytes: int, what: str) -> None:
    """Refuse ``what`` when its ``nbytes`` exceed this machine's memory."""
    budget = memory_budget()
    if nbytes > budget:
        raise LowRankError(f"{what} needs {format_bytes(nbytes)}, more than this machine's memory ({format_bytes(budget)})")


def _header(f: IO[bytes], label: str) -> tuple[tuple[int, ...], np.dtype[Any]]:
    """Shape and dtype from an ``.npy`` header, without reading the data."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    except (ValueError, OSError, EOFError, SyntaxError, TypeError, zipfile.BadZipFile, zlib.error) as exc:
        raise LowRankError(f"{label}: not a readable .npy array ({_first_line(exc)})") from None
    if any(d < 0 for d in shape):
        raise LowRankError(f"{label}: declares the negative shape {tuple(shape)}")
    if dtype.hasobject:
        raise LowRankError(f"{label}: holds Python objects (dtype {dtype}), not numbers")
    return tuple(int(d) for d in shape), dtype


def _check_declared(shape: tuple[int, ...], dtype: np.dtype[Any], stored: int, label: str) -> None:
    """The data a header declares must be in the file (``stored`` bytes after the header) and fit in memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > stored:
        raise LowRankError(
            f"{label}: declares shape {shape} of {dtype} ({format_bytes(nbytes)}) but holds {format_bytes(stored)}: truncated or corrupt"
        )
    check_allocation(nbytes, f"{label} (shape {shape} of {dtype})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_npz(path: str | os.PathLike[str], what: str = "inputs file") -> dict[str, Array]:
    """The arrays of an ``.npz`` keyed by name (members that are not ``.npy`` arrays are ignored)."""
    p = Path(path)
    if not p.exists():
        raise LowRankError(f"{p}: no such {what}")
    if p.is_dir():
        raise LowRankError(f"{p}: is a directory, not an .npz {what}")
    try:
        with open(p, "rb") as f:
            if f.read(len(_NPY_MAGIC)) == _NPY_MAGIC:
                raise LowRankError(f"{p}: a single .npy array, not an .npz of arrays named after the model's inputs")
        arrays: dict[str, Array] = {}
        with zipfile.ZipFile(p) as archive:
            for info in archive.infolist():
                if not info.filename.endswith(".npy") or info.is_dir():
                    continue
                name = info.filename.removesuffix(".npy")
                label = f"{p}: array {name!r}"
                with archive.open(info) as member:
                    shape, dtype = _header(member, label)
                    _check_declared(shape, dtype, info.file_size - member.tell(), label)
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
        return arrays
    except LowRankError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as exc:
        # NotImplementedError: a compression method zipfile lacks; RuntimeError: an encrypted member
        raise LowRankError(f"{p}: not a readable .npz ({_first_line(exc)})") from None


def load_npy(path: str | os.PathLike[str], *, mmap: bool = False) -> Array:
    """One ``.npy`` array, its header checked against the file size before the data is read.

    ``mmap``: map the file read-only instead of reading it (a large calibration set stays on disk).
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            shape, dtype = _header(f, str(p))
            _check_declared(shape, dtype, p.stat().st_size - f.tell(), str(p))
            if mmap:
                mapped: Array = np.load(p, mmap_mode="r", allow_pickle=False)
                return mapped
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
    except LowRankError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise LowRankError(f"{p}: not a readable .npy ({_first_line(exc)})") from None


def format_dims(dims: Sequence[int | str | None]) -> str:
    """Declared dims as ``(n, 3, ?, 224)``: a symbolic dim by its name, an unknown one as ``?``."""
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def check_samples(arrays: Mapping[str, Array], inputs: Sequence[InputSpec], label: str, source: str) -> dict[str, Array]:
    """``arrays`` for each of ``inputs``, checked (see the module docstring) and cast to the input's dtype.

    ``label`` names one array in messages (``"calibration input"``), ``source``
    the whole (``"calibration data"``). Extra arrays are left out of the result.
    """
    out: dict[str, Array] = {}
    for name, dtype, dims, _ in inputs:
        if name not in arrays:
            raise LowRankError(f"{source} lacks model input {name!r} (has: {', '.join(sorted(arrays)) or 'nothing'})")
        data = np.asarray(arrays[name])
        if data.ndim == 0:
            raise LowRankError(f"{label} {name!r} is a scalar; samples must be on axis 0")
        if dims is not None:
            fixed = [(d, n) for d, n in zip(dims[1:], data.shape[1:], strict=False) if isinstance(d, int) and d > 0]
            if data.ndim != len(dims) or any(d != n for d, n in fixed):
                raise LowRankError(f"{label} {name!r} has shape {tuple(data.shape)}; the model expects {format_dims(dims)}")
        if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
            raise LowRankError(f"{label} {name!r} has non-numeric dtype {data.dtype}")
        if np.issubdtype(data.dtype, np.complexfloating) and not (dtype is not None and np.issubdtype(dtype, np.complexfloating)):
            raise LowRankError(f"{label} {name!r} has complex dtype {data.dtype}; the model takes {dtype or 'real values'}")
        if len(data) == 0:
            raise LowRankError(f"{label} {name!r} has no samples (axis 0 is empty)")
        if dtype is not None and data.dtype != dtype:
            with np.errstate(all="ignore"):  # NaN or out-of-range values cast as numpy casts them, without a warning
                data = data.astype(dtype)
        out[name] = data
    counts = {name: len(v) for name, v in out.items()}
    if len(set(counts.values())) > 1:
        raise LowRankError(f"{label}s differ in sample count: {counts}")
    return out


def convert_dtype(data: Array, spec: InputSpec, label: str) -> Array:
    """``data`` as the input's element type, or a one-line refusal when the conversion would change its meaning:
    numbers to a floating input, integers (or bools) to an integer input within its range, bools to a bool
    input. ``label`` names the array in messages (``"calibration input 'x'"``)."""
    kind = data.dtype.kind
    if kind not in "biuf":
        raise LowRankError(f"{label} has dtype {data.dtype}; the model reads numbers")
    if spec.dtype is None:
        return data
    target, wanted = spec.dtype, spec.type_name
    if target.kind in "iu" and kind == "f":
        raise LowRankError(f"{label} has floating dtype {data.dtype}; the model's input is {wanted} (integers)")
    if target.kind == "b" and kind != "b":
        raise LowRankError(f"{label} has dtype {data.dtype}; the model's input is bool")
    if target.kind not in "biuf":
        raise LowRankError(f"{label}: the model's input type {wanted} is not supported")
    if target.kind in "iu" and kind in "iu" and data.size:
        info = np.iinfo(target)
        low, high = int(data.min()), int(data.max())
        if low < info.min or high > info.max:
            raise LowRankError(f"{label} has values {low}..{high}, outside the model's {wanted}")
    return data.astype(target, copy=False)


_CHECK_ELEMENTS = 8_000_000  # elements checked for finiteness at a time


def check_finite(data: Array, label: str, samples: bool = True) -> None:
    """Refuse floating ``data`` holding NaN or infinity; with ``samples`` (axis 0 holds samples) the first
    sample that does is named, a block of samples at a time (a memory-mapped set is not read at once)."""
    if data.dtype.kind != "f" or data.size == 0:
        return
    if not samples or data.ndim == 0:
        if not np.isfinite(data).all():
            raise LowRankError(f"{label} holds NaN or infinite values")
        return
    per_sample = max(1, data.size // max(1, len(data)))
    step = max(1, _CHECK_ELEMENTS // per_sample)
    for start in range(0, len(data), step):
        block = np.asarray(data[start : start + step])
        finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if not finite.all():
            first = start + int(np.argmin(finite))
            raise LowRankError(f"{label} holds NaN or infinite values (first in sample {first})")


def _fits(dims: Sequence[int | str | None], shape: Sequence[int]) -> bool:
    """``shape`` has the rank of ``dims`` and each of its fixed dims."""
    return len(dims) == len(shape) and all(not (isinstance(d, int) and d > 0) or d == n for d, n in zip(dims, shape, strict=True))


def check_sample(arrays: Mapping[str, Array], inputs: Sequence[InputSpec], source: str) -> dict[str, Array]:
    """One input set (see the module docstring) checked against ``inputs`` and cast to their element types.

    ``source`` names the set in messages (a path, or ``"the sample"``)."""
    names = [spec.name for spec in inputs]
    for name in names:
        if name not in arrays:
            raise LowRankError(f"{source} lacks model input {name!r} (has: {', '.join(sorted(arrays)) or 'nothing'})")
    extra = sorted(set(arrays) - set(names))
    if extra:
        raise LowRankError(
            f"{source} holds {', '.join(map(repr, extra[:3]))}{', …' if len(extra) > 3 else ''}, not an input of the model "
            f"(its inputs: {', '.join(names)}); a sample holds the model's inputs and nothing else"
        )
    out: dict[str, Array] = {}
    for spec in inputs:
        label = f"sample input {spec.name!r}"
        data = np.asarray(arrays[spec.name])
        if spec.dims is not None and not _fits(spec.dims, data.shape):
            expects = format_dims(spec.dims) + (" (a scalar: a 0-d array)" if not spec.dims else "")
            if data.ndim == len(spec.dims) + 1 and _fits(spec.dims, data.shape[1:]):
                raise LowRankError(
                    f"{label} has shape {tuple(data.shape)}, one axis more than the model's {expects}: a sample is one input "
                    "set as the model takes it, without a sample axis"
                )
            raise LowRankError(f"{label} has shape {tuple(data.shape)}; the model expects {expects}")
        if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_) or data.dtype.kind == "c":
            raise LowRankError(f"{label} has dtype {data.dtype}; the model reads real numbers")
        data = convert_dtype(data, spec, label)
        check_finite(data, label, samples=False)
        out[spec.name] = np.require(data, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
    return out


def load_sample(
    source: str | os.PathLike[str] | Mapping[str, npt.ArrayLike], model: onnx.ModelProto | Sequence[InputSpec]
) -> dict[str, Array]:
    """One input set of ``model`` (or of the inputs ``model`` lists) from an ``.npz`` or a mapping, checked
    (:func:`check_sample`)."""
    if isinstance(source, (str, os.PathLike)):
        arrays = load_npz(source, "sample file")
        where = f"sample {os.fspath(source)}"
    elif isinstance(source, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in source.items()}
        where = "the sample"
    else:
        raise LowRankError(f"a sample is a path to an .npz or a mapping of input name to array, not a {type(source).__name__}")
    return check_sample(arrays, model_input_specs(model) if isinstance(model, onnx.ModelProto) else model, where)


def model_input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a model must be fed (initializers listed as graph inputs, as IR 3 requires, are not), with
    the numpy dtype and dims each declares."""
    constants = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    specs: list[InputSpec] = []
    for value in model.graph.input:
        if value.name in constants:
            continue
        t = value.type.tensor_type if value.type.HasField("tensor_type") else None
        dtype: np.dtype[Any] | None = None
        dims: tuple[int | str | None, ...] | None = None
        if t is not None:
            try:
                dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)) if t.elem_type else None
            except (KeyError, TypeError, ValueError):
                dtype = None
            if t.HasField("shape"):
                dims = tuple(
                    int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in t.shape.dim
                )
        elem = (
            onnx.TensorProto.DataType.Name(t.elem_type).lower()
            if t is not None and t.elem_type in onnx.TensorProto.DataType.values()
            else ""
        )
        specs.append(InputSpec(value.name, dtype, dims, elem or ("not a tensor" if t is None else "")))
    return specs
