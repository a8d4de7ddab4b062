"""Loading and saving models safely.

* Loading checks that the file exists, is readable and parses as an ONNX model,
  that every text field is valid UTF-8 (protobuf checks them only when read, so
  a corrupt name would otherwise fail deep inside a pass), and that every
  external-data reference stays inside the model's folder and inside its data
  file, before any weight is read.
* Writing goes through :class:`StagedOutputs`, one transaction per command: every
  file (the model, its external data, a report, …) is written into a hidden
  staging folder beside its destination and renamed into place by ``commit``, so
  the outputs of one command appear together or not at all; a failure leaves
  nothing behind and puts back any file a rename had replaced. Destinations are
  checked when staged — before any work — against each other and against the
  command's inputs, which are never opened for writing.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import onnx
from google.protobuf.message import DecodeError, Message
from onnx import external_data_helper, helper

from .errors import LowRankError

__all__ = [
    "PROTOBUF_LIMIT",
    "ModelLike",
    "StagedOutputs",
    "as_model",
    "copy_fields",
    "count_params",
    "estimated_size",
    "load_model",
    "load_model_files",
    "load_model_with_layout",
    "plain_mode",
    "save_model",
    "uses_external_data",
    "write_model",
]

ModelLike = str | os.PathLike[str] | onnx.ModelProto  # a path, or a model in memory


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant tensor, in all graphs and functions."""
    return sum(math.prod(t.dims) for t in external_data_helper._get_all_tensors(model))


PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto cannot exceed 2 GiB


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in external_data_helper._get_all_tensors(model)
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
    ]


def uses_external_data(model: onnx.ModelProto) -> bool:
    return bool(_external_tensors(model))


def _check_external(model: onnx.ModelProto, base: Path) -> list[Path]:
    """The external data files ``model`` reads, each checked to be inside ``base`` and long enough."""
    root = base.resolve()
    files: list[Path] = []
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
        try:
            offset, length = int(info.get("offset", 0) or 0), int(info.get("length", 0) or 0)
        except ValueError:
            raise LowRankError(f"tensor {tensor.name!r}: external data offset/length are not whole numbers") from None
        if offset < 0 or length < 0:
            raise LowRankError(f"tensor {tensor.name!r}: external data offset/length are negative")
        itemsize = _WHOLE_BYTE_TYPES.get(tensor.data_type)
        if itemsize is not None and min(tensor.dims, default=0) >= 0:
            expected = math.prod(tensor.dims) * itemsize
            if length and length != expected:
                raise LowRankError(
                    f"tensor {tensor.name!r}: external data length {length} does not match its dims {list(tensor.dims)} ({expected} bytes)"
                )
            if not length:
                # no length (or 0): the dims say how much to read, as onnxruntime reads it; onnx's loader would
                # read to the end of the file instead
                length = expected
                entry = next((e for e in tensor.external_data if e.key == "length"), None) or tensor.external_data.add(key="length")
                entry.value = str(expected)
        if offset + length > target.stat().st_size:
            raise LowRankError(f"tensor {tensor.name!r}: external data file {target} is truncated")
        if target not in files:
            files.append(target)
    return files


_TENSOR = onnx.TensorProto.DESCRIPTOR
_TENSOR_TEXT = ("name", "doc_string", "external_data", "metadata_props")  # a tensor's fields that hold text


def _invalid_text(message: Message) -> str | None:
    """The path of the first text field under ``message`` that is not valid UTF-8, or None.

    Only the fields that are set are visited, and a tensor's data is never read
    (``ListFields`` would copy ``raw_data``): a walk over the messages, not a copy
    of the weights.
    """
    if message.DESCRIPTOR is _TENSOR:
        by_name = _TENSOR.fields_by_name
        fields = [(by_name[n], getattr(message, n)) for n in _TENSOR_TEXT if len(getattr(message, n))]
    else:
        fields = message.ListFields()
    for descriptor, value in fields:
        if descriptor.type == descriptor.TYPE_STRING:
            # protobuf's C implementation hands back the bytes of a string that is not UTF-8; others raise on access
            if isinstance(value, bytes) or (not isinstance(value, str) and any(isinstance(v, bytes) for v in value)):
                return str(descriptor.name)
        elif descriptor.type == descriptor.TYPE_MESSAGE:
            if isinstance(value, Message):
                found = _invalid_text(value)
                if found:
                    return f"{descriptor.name}.{found}"
            else:
                for i, item in enumerate(value):
                    found = _invalid_text(item)
                    if found:
                        return f"{descriptor.name}[{i}].{found}"
    return None


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX model with its external data, or raise :class:`LowRankError`."""
    return load_model_with_layout(path)[0]


def load_model_with_layout(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, bool]:
    """:func:`load_model`, and whether the file kept its weights as external data."""
    model, data_files = load_model_files(path)
    return model, bool(data_files)


def load_model_files(path: str | os.PathLike[str]) -> tuple[onnx.ModelProto, list[Path]]:
    """:func:`load_model`, and the external data files it was read from (none for a single-file model)."""
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
    try:
        bad_text = _invalid_text(model)
    except UnicodeDecodeError:  # a protobuf implementation that raises on reading such a field
        bad_text = "(unknown)"
    if bad_text:
        raise LowRankError(f"{p}: not a valid ONNX model (text field {bad_text} is not valid UTF-8)")
    data_files = _check_external(model, p.parent)
    if data_files:
        try:
            external_data_helper.load_external_data_for_model(model, str(p.parent))
        except OSError as exc:
            raise LowRankError(f"{p}: cannot read its external data ({exc.strerror or exc})") from None
    return model, data_files


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
        itemsize = _WHOLE_BYTE_TYPES.get(tensor.data_type, 1)  # 1 for the rest (strings, 4-bit types, unknown numbers)
        weights += max(math.prod(tensor.dims), 0) * itemsize
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
        raw = t.raw_data  # the one copy of the bytes, needed to write them anyway
        if len(raw) != raw_length:  # the length prefix written above would not match: refuse, not corrupt
            raise ValueError(f"tensor {t.name!r} declares dims {list(t.dims)} ({raw_length} bytes), its data holds {len(raw)} bytes")
        f.write(meta_bytes)
        f.write(_tag(_RAW_DATA_FIELD) + _varint(raw_length))
        f.write(raw)

    return size, write


@dataclass
class _Staged:
    dest: Path
    staged: Path
    what: str
    optional: bool


class StagedOutputs:
    """The files one command writes, made to appear together or not at all.

    :meth:`stage` checks a destination (its folder exists and is writable, it is
    not a folder, not an input of the command, not another output) and returns
    the path in a hidden staging folder beside it where the caller writes the
    file. :meth:`commit` renames every staged file into place, in the order
    staged; an existing destination is kept (hard-linked, else renamed aside) in
    the staging folder until the commit is done, so a failed commit puts back what
    was there and removes what was new. Leaving the ``with`` block without a
    commit (an exception, a refused check) removes everything staged::

        with StagedOutputs({"model.onnx": "input model"}) as outputs:
            save_model(decomposed, "out.onnx", outputs=outputs)   # stages out.onnx (and out.onnx.data)
            outputs.write_text("report.json", text, "report")
            verify("model.onnx", outputs.staged("out.onnx"))      # runs on the staged files
            outputs.commit()

    Failures are :class:`LowRankError` of one line.
    """

    def __init__(self, protect: Mapping[str | os.PathLike[str], str] | None = None) -> None:
        self._protected: dict[Path, str] = {}
        self._entries: list[_Staged] = []
        self._folders: dict[Path, Path] = {}  # destination folder -> its staging folder
        self._done = False
        for path, what in (protect or {}).items():
            self.protect(path, what)

    def __enter__(self) -> StagedOutputs:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()

    def protect(self, path: str | os.PathLike[str], what: str) -> None:
        """Refuse any output that would replace ``path`` (an input of the command, named ``what`` in the message)."""
        p = Path(path)
        self._protected[p] = what
        for entry in self._entries:
            if _same_file(entry.dest, p):
                raise LowRankError(f"{entry.dest}: the {entry.what} would overwrite the {what}")

    def stage(self, dest: str | os.PathLike[str], what: str, *, optional: bool = False) -> Path:
        """Check ``dest`` and return where to write it; ``optional``: the writer may leave it unwritten.

        Staging the same destination again as the same ``what`` returns the same path.
        """
        path = Path(dest)
        for entry in self._entries:
            if _same_file(entry.dest, path) or entry.dest == path:
                if entry.what == what:
                    return entry.staged
                raise LowRankError(f"{path}: the {what} would overwrite the {entry.what}")
        for protected, other in self._protected.items():
            if _same_file(path, protected):
                raise LowRankError(f"{path}: the {what} would overwrite the {other}")
        if not path.parent.is_dir():
            raise LowRankError(f"{path}: {what} folder {path.parent} does not exist")
        if path.is_dir():
            raise LowRankError(f"{path}: is a directory")
        entry = _Staged(path, self._folder(path) / path.name, what, optional)
        self._entries.append(entry)
        return entry.staged

    def staged(self, dest: str | os.PathLike[str]) -> Path:
        """Where ``dest`` (already staged) is written until the commit."""
        path = Path(dest)
        for entry in self._entries:
            if entry.dest == path or _same_file(entry.dest, path):
                return entry.staged
        raise KeyError(f"{path} is not staged")

    def write_text(self, dest: str | os.PathLike[str], text: str, what: str) -> None:
        """Stage ``dest`` and write ``text`` to it (UTF-8)."""
        staged = self.stage(dest, what)
        try:
            staged.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise LowRankError(f"{dest}: cannot write ({exc.strerror or exc})") from None

    def _folder(self, dest: Path) -> Path:
        parent = dest.parent
        key = parent.resolve()
        if key not in self._folders:
            try:
                self._folders[key] = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=parent))
            except OSError as exc:
                raise LowRankError(f"{dest}: cannot write in {parent} ({exc.strerror or exc})") from None
        return self._folders[key]

    def _move_before(self, entry_path: Path, anchor: Path) -> None:
        """Commit ``entry_path`` before ``anchor`` (a model's data file before the model that reads it)."""
        entries = self._entries
        moving = next(e for e in entries if e.staged == entry_path)
        entries.remove(moving)
        index = next(i for i, e in enumerate(entries) if e.staged == anchor)
        entries.insert(index, moving)

    def commit(self) -> None:
        """Rename every staged file into place; on any failure, undo the renames done and raise."""
        if self._done:
            raise RuntimeError("StagedOutputs already committed or discarded")
        done: list[tuple[Path, Path | None]] = []  # destination, where its previous file was kept
        entry: _Staged | None = None
        kept: Path | None = None
        try:
            for entry in self._entries:
                kept = None
                if not entry.staged.exists():
                    if entry.optional:
                        continue
                    raise RuntimeError(f"{entry.dest}: staged but never written")
                plain_mode(entry.staged)
                if os.path.lexists(entry.dest):
                    kept = entry.staged.with_name(f"{entry.staged.name}.previous~")
                    try:
                        os.link(entry.dest, kept, follow_symlinks=False)
                    except OSError:  # no hard links on this file system: move it aside (briefly absent)
                        os.replace(entry.dest, kept)
                os.replace(entry.staged, entry.dest)
                done.append((entry.dest, kept))
                kept = None
        except BaseException as exc:
            if entry is not None and kept is not None and not os.path.lexists(entry.dest):
                os.replace(kept, entry.dest)  # moved aside, then the rename failed
            for dest, previous in reversed(done):
                try:
                    if previous is not None:
                        os.replace(previous, dest)
                    else:
                        dest.unlink(missing_ok=True)
                except OSError:
                    pass  # the original error is the one to report
            self.discard()
            if isinstance(exc, OSError) and entry is not None:
                raise LowRankError(f"{entry.dest}: cannot write ({exc.strerror or exc})") from None
            raise
        self.discard()
        self._done = True

    def discard(self) -> None:
        """Remove the staging folders and everything in them (a no-op after a commit)."""
        for folder in self._folders.values():
            shutil.rmtree(folder, ignore_errors=True)
        self._folders.clear()
        if not self._done:
            self._entries.clear()
        self._done = True


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (another spelling, a symlink or a hard link)."""
    try:
        if a.resolve() == b.resolve():
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    outputs: StagedOutputs | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically; external data goes to ``<name>.data`` beside it.

    A model whose serialized size would exceed 2 GiB is always written with
    external data. ``inputs`` are paths that must not be overwritten. With
    ``outputs`` the files are only staged in that transaction (the caller
    commits them together with its other outputs); without, they are committed
    at once.
    """
    if outputs is None:
        with StagedOutputs() as own:
            save_model(model, path, external_data=external_data, inputs=inputs, outputs=own)
            own.commit()
        return
    for source in inputs:
        outputs.protect(source, "input model")
    dest = Path(path)
    staged = outputs.stage(dest, "output model")
    if not external_data:
        external_data = estimated_size(model) > PROTOBUF_LIMIT
    data_name = dest.name + ".data"
    try:
        if external_data:
            staged_data = outputs.stage(dest.parent / data_name, "external data of the output model", optional=True)
            outputs._move_before(staged_data, staged)
            onnx.save_model(
                model,
                str(staged),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            # save_model moved the tensors out of `model`; bring them back so the caller's object is unchanged
            external_data_helper.load_external_data_for_model(model, str(staged.parent))
        else:
            write_model(model, staged)
    except OSError as exc:
        raise LowRankError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    except ValueError as exc:  # a tensor whose data contradicts its dims
        raise LowRankError(f"{dest}: cannot write the model: {exc}") from None


def as_model(model: ModelLike, inplace: bool = False) -> onnx.ModelProto:
    """The model to work on: a copy of a given ``ModelProto`` (the caller's is never changed) unless
    ``inplace``, or the file read."""
    if isinstance(model, onnx.ModelProto):
        if inplace:
            return model
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    return load_model(model)
