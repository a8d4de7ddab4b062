"""Loading and saving models safely.

* Loading checks that the file exists, is readable and parses as an ONNX model,
  and that every external-data reference stays inside the model's folder and
  inside its data file, before any weight is read.
* Saving is atomic: the model (and its external data file, if any) is written
  into a temporary folder beside the destination and renamed into place, the
  model file last; a failure leaves nothing behind. The input is never opened
  for writing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from .errors import LowRankError

__all__ = ["PROTOBUF_LIMIT", "load_model", "load_model_with_layout", "save_model", "uses_external_data"]

PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto cannot exceed 2 GiB


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in external_data_helper._get_all_tensors(model)
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
    ]


def uses_external_data(model: onnx.ModelProto) -> bool:
    return bool(_external_tensors(model))


def _check_external(model: onnx.ModelProto, base: Path) -> None:
    root = base.resolve()
    for tensor in _external_tensors(model):
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or os.path.isabs(location) or Path(location).drive:
            raise LowRankError(f"tensor {tensor.name!r}: external data location {location!r} is not a relative path")
        target = (root / location).resolve()
        if root not in target.parents:
            raise LowRankError(f"tensor {tensor.name!r}: external data location {location!r} points outside {root}")
        if not target.is_file():
            raise LowRankError(f"tensor {tensor.name!r}: external data file {target} is missing")
        end = int(info.get("offset", 0) or 0) + int(info.get("length", 0) or 0)
        if end > target.stat().st_size:
            raise LowRankError(f"tensor {tensor.name!r}: external data file {target} is truncated")


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model with its external data, or raise :class:`LowRankError`."""
    return load_model_with_layout(path)[0]


def load_model_with_layout(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, bool]:
    """:func:`load_model`, and whether the file kept its weights as external data."""
    p = Path(path)
    if not p.exists():
        raise LowRankError(f"{p}: no such file")
    if p.is_dir():
        raise LowRankError(f"{p}: is a directory, not an ONNX file")
    if not os.access(p, os.R_OK):
        raise LowRankError(f"{p}: permission denied")
    if p.stat().st_size == 0:
        raise LowRankError(f"{p}: empty file, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise LowRankError(
            f"{p}: not a valid ONNX model ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'parse failed'})"
        ) from None
    except OSError as exc:
        raise LowRankError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if model.ir_version <= 0 or not model.HasField("graph") or not model.graph.node:
        raise LowRankError(f"{p}: not an ONNX model (no IR version or empty graph)")
    _check_external(model, p.parent)
    external = uses_external_data(model)
    if external:
        external_data_helper.load_external_data_for_model(model, str(p.parent))
    return model, external


def _check_destination(path: Path, sources: tuple[Path, ...]) -> None:
    if not path.parent.is_dir():
        raise LowRankError(f"{path}: output folder {path.parent} does not exist")
    if path.is_dir():
        raise LowRankError(f"{path}: is a directory")
    for src in sources:
        if src.exists() and path.exists() and path.resolve() == src.resolve():
            raise LowRankError(f"{path}: output would overwrite the input model")


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool = False,
    inputs: tuple[str | os.PathLike[str], ...] = (),
) -> None:
    """Write ``model`` to ``path`` atomically; external data goes to ``<name>.data`` beside it.

    A model whose serialized size would exceed 2 GiB is always written with
    external data. ``inputs`` are paths that must not be overwritten.
    """
    dest = Path(path)
    _check_destination(dest, tuple(Path(s) for s in inputs))
    if not external_data:
        try:
            external_data = model.ByteSize() > PROTOBUF_LIMIT
        except (ValueError, OverflowError):  # some protobuf builds refuse to size a >2 GiB message
            external_data = True
    data_name = dest.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    moved: Path | None = None  # the data file once renamed into place: removed again if the model's rename fails
    try:
        staged = staging / dest.name
        if external_data:
            onnx.save_model(
                model,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            # save_model moved the tensors out of `model`; bring them back so the caller's object is unchanged
            external_data_helper.load_external_data_for_model(model, str(staging))
            if (staging / data_name).exists():  # absent when every tensor is under the size threshold
                moved = dest.parent / data_name
                os.replace(staging / data_name, moved)
        else:
            onnx.save_model(model, str(staged))
        os.replace(staged, dest)
    except OSError as exc:
        if moved is not None:
            moved.unlink(missing_ok=True)
        raise LowRankError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
