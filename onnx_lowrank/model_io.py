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

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError, Message
from onnx import external_data_helper, helper

from .errors import LowRankError

__all__ = [
    "PROTOBUF_LIMIT",
    "copy_fields",
    "estimated_size",
    "load_model",
    "load_model_with_layout",
    "plain_mode",
    "save_model",
    "uses_external_data",
    "write_model",
]

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


def plain_mode(path: Path) -> None:
    """The mode a plainly created file gets (0666 less the umask): onnx writes external data 0600, which
    would leave the weights unreadable to the other users of a model the model file itself is shared with."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def estimated_size(model: onnx.ModelProto) -> int:
    """Bytes of the weights plus the rest: close to ``ByteSize()`` without a pass over every weight byte."""
    weights = 0
    for tensor in external_data_helper._get_all_tensors(model):
        itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 1
        weights += math.prod(tensor.dims) * itemsize
    return weights + 1_000_000 * (1 + len(model.graph.node) // 1000)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


_GRAPH_FIELD = 7  # ModelProto.graph
_INITIALIZER_FIELD = 5  # GraphProto.initializer
_LENGTH_DELIMITED = 2


def _tag(field: int) -> bytes:
    return _varint((field << 3) | _LENGTH_DELIMITED)


def copy_fields(source: Message, target: Message, skip: tuple[str, ...] = ()) -> None:
    """Every set field of ``source`` but those named in ``skip``, copied into ``target``."""
    for descriptor, value in source.ListFields():
        if descriptor.name in skip:
            continue
        repeated = getattr(descriptor, "is_repeated", None)  # protobuf >= 6; `label` before
        if repeated is None:
            repeated = descriptor.label == descriptor.LABEL_REPEATED
        if repeated:
            getattr(target, descriptor.name).extend(value)
        elif descriptor.message_type is not None:
            getattr(target, descriptor.name).CopyFrom(value)
        else:
            setattr(target, descriptor.name, value)


def write_model(model: onnx.ModelProto, path: str | os.PathLike[str], initializers: Sequence[onnx.TensorProto] | None = None) -> None:
    """Serialize ``model`` to ``path`` one initializer at a time (``initializers`` in place of the graph's own).

    ``onnx.save_model`` serializes the whole model into one bytes object first,
    a second copy of every weight. The protobuf wire format is a concatenation
    of fields, in any order: the model without its graph, then the graph field
    written as its length, the graph without initializers, and each initializer
    as its own length-delimited field. Readers see the same message.
    """
    head = onnx.ModelProto()
    copy_fields(model, head, skip=("graph",))
    graph = onnx.GraphProto()
    copy_fields(model.graph, graph, skip=("initializer",))
    graph_bytes = graph.SerializeToString()
    tensors = model.graph.initializer if initializers is None else initializers
    pieces = [_tensor_pieces(tensor) for tensor in tensors]
    graph_length = len(graph_bytes) + sum(len(_tag(_INITIALIZER_FIELD)) + len(_varint(n)) + n for n, _ in pieces)
    with open(path, "wb") as f:
        f.write(head.SerializeToString())
        if model.HasField("graph"):
            f.write(_tag(_GRAPH_FIELD) + _varint(graph_length))
            f.write(graph_bytes)
            for tensor, (size, write) in zip(tensors, pieces, strict=True):
                f.write(_tag(_INITIALIZER_FIELD) + _varint(size))
                write(f, tensor)


_RAW_DATA_FIELD = 9  # TensorProto.raw_data
_WHOLE_BYTE_TYPES: dict[int, int] = {  # element types stored a whole number of bytes per element in raw_data
    t: helper.tensor_dtype_to_np_dtype(t).itemsize
    for t in (
        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE,
        onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
        onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
        onnx.TensorProto.BOOL,
    )
}  # fmt: skip


def _tensor_pieces(tensor: onnx.TensorProto) -> tuple[int, Callable[[BinaryIO, onnx.TensorProto], object]]:
    """The serialized size of ``tensor`` and a writer for it.

    A tensor with ``raw_data`` is written as its other fields, then the raw
    bytes as their own field: ``SerializeToString`` of a large tensor would
    hold the bytes twice (its buffer and the Python copy).
    """
    itemsize = _WHOLE_BYTE_TYPES.get(tensor.data_type)
    if itemsize is None or not tensor.HasField("raw_data") or math.prod(tensor.dims) < 1 << 16:
        return tensor.ByteSize(), lambda f, t: f.write(t.SerializeToString())
    meta = onnx.TensorProto()
    copy_fields(tensor, meta, skip=("raw_data",))
    meta_bytes = meta.SerializeToString()
    raw_length = math.prod(tensor.dims) * itemsize  # raw_data holds exactly the elements, little-endian
    size = len(meta_bytes) + len(_tag(_RAW_DATA_FIELD)) + len(_varint(raw_length)) + raw_length

    def write(f: BinaryIO, t: onnx.TensorProto) -> None:
        f.write(meta_bytes)
        f.write(_tag(_RAW_DATA_FIELD) + _varint(raw_length))
        f.write(t.raw_data)

    return size, write


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
        external_data = estimated_size(model) > PROTOBUF_LIMIT
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
                plain_mode(staging / data_name)
                moved = dest.parent / data_name
                os.replace(staging / data_name, moved)
        else:
            write_model(model, staged)
        plain_mode(staged)
        os.replace(staged, dest)
    except OSError as exc:
        if moved is not None:
            moved.unlink(missing_ok=True)
        raise LowRankError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
