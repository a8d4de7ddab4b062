"""onnxruntime sessions for every part of the tool: one place that builds them and turns their failures into one line.

Sessions run with thread spinning off (a spinning pool steals the core another
session's timing needs on a small machine), one inter-op thread, and only the
execution providers asked for: a provider the installed onnxruntime lacks is an
error naming it, never a silent fall-back to CPU.

Models timed or compared together (the original and a candidate: the check of a
result, the rounds of the plan by latency, ``verify``) share their weights
through :class:`SharedWeights`: each large initializer is written once to a
temporary file, every session of the store reads it from one memory map
(onnxruntime's ``add_initializer``, which uses the given buffer in place), and
a tensor the candidate has unchanged is the original's, not a second copy.
onnxruntime's own graph optimizations read the few weights they rewrite (the
blocked layout of convs) from the same file. Prepacking, which onnxruntime's
Python API cannot share between sessions (its prepacked-weights container is
in the C API only, and only for initializers given with ``AddInitializer``),
copies every matrix weight of Gemm/MatMul/RNN nodes per session: a store made
with ``prepack=False`` turns it off, as the check of a large model does.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import onnx
from onnx import helper

from .errors import LowRankError
from .model_io import PROTOBUF_LIMIT, ModelLike, copy_fields, load_model

__all__ = ["SHARE_MIN_BYTES", "HeldModel", "ModelLike", "SharedWeights", "first_line", "make_session", "run_session"]


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (onnxruntime's run on over many lines), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_session(
    model: ModelLike,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
    optimization: str = "default",
    profile_prefix: str | None = None,
    arena: bool = True,
) -> Any:
    """An onnxruntime session; refuses providers this build does not have instead of falling back silently.

    ``profile_prefix``: turn on onnxruntime's profiler, writing its JSON trace to a file of that prefix.
    ``arena=False`` gives each run's memory back when it ends instead of keeping it in onnxruntime's CPU
    arena, which grows with every new batch shape a long pass feeds it.
    """
    import onnxruntime as ort

    wanted = _providers(ort, providers)
    options = _options(ort, threads, optimization, profile_prefix, arena)
    if isinstance(model, onnx.ModelProto):
        try:
            small = model.ByteSize() <= PROTOBUF_LIMIT
        except (ValueError, OverflowError):
            small = False
        if small:
            source: Any = model.SerializeToString()
            return _session(ort, source, options, wanted)
        from .model_io import save_model

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            save_model(model, path, external_data=True)
            return _session(ort, str(path), options, wanted)
    return _session(ort, str(model), options, wanted)


def _providers(ort: Any, providers: Sequence[str] | None) -> list[str]:
    """The providers asked for (CPU by default), each checked to be in this onnxruntime build."""
    _quiet_default_logger(ort)
    available = ort.get_available_providers()
    wanted = list(providers) if providers else ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise LowRankError(f"execution provider(s) {', '.join(missing)} not in this onnxruntime build (has: {', '.join(available)})")
    return wanted


def _options(ort: Any, threads: int | None, optimization: str, profile_prefix: str | None, arena: bool) -> Any:
    """The session options every session of the tool runs with."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, turned into one line; the log would add more
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_cpu_mem_arena = arena
    # spinning threads steal the core the other session's timing needs
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if optimization != "default":
        options.graph_optimization_level = levels[optimization]
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


_QUIET = False


def _quiet_default_logger(ort: Any) -> None:
    """Limit onnxruntime's process-wide logger to fatal messages (once).

    Besides raising its errors, onnxruntime logs some of them (an invalid
    initializer, say) to stderr through that logger, which the session options
    do not reach; every error is reported here as an exception already.
    """
    global _QUIET
    if not _QUIET:
        ort.set_default_logger_severity(4)
        _QUIET = True


def _session(ort: Any, source: Any, options: Any, providers: list[str]) -> Any:
    try:
        return ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise LowRankError(f"onnxruntime cannot load the model: {first_line(exc)}") from None


def run_session(session: Any, feeds: Mapping[str, Any], names: Sequence[str] | None = None, what: str = "run the model") -> list[Any]:
    """``session.run``; a failure of onnxruntime becomes a one-line :class:`LowRankError` saying what was being done."""
    try:
        return list(session.run(list(names) if names is not None else None, dict(feeds)))
    except Exception as exc:  # onnxruntime raises its own exception types
        raise LowRankError(f"onnxruntime failed to {what}: {first_line(exc)}") from None


# initializers of at least this many bytes are held once in a store's file; smaller ones stay in the model
SHARE_MIN_BYTES = 64 * 1024
_ALIGN = 4096  # offsets in the file: page-aligned, so onnxruntime maps what its optimizations read instead of copying it
_WEIGHTS_FILE = "onnx-lowrank-shared-weights.bin"
# element types whose raw_data is a plain little-endian array numpy maps as it is
_MAPPABLE: dict[int, np.dtype[Any]] = {
    t: np.dtype(helper.tensor_dtype_to_np_dtype(t))
    for t in (
        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8,
        onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
        onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL,
    )
}  # fmt: skip
_COMPARE_CHUNK = 1 << 24


def _held_bytes(tensor: onnx.TensorProto) -> int:
    """The bytes of ``tensor`` a store would hold (its raw data), or 0 when it stays in the model."""
    dtype = _MAPPABLE.get(tensor.data_type)
    if dtype is None or not tensor.HasField("raw_data") or tensor.data_location == onnx.TensorProto.EXTERNAL:
        return 0
    nbytes = math.prod(tensor.dims) * dtype.itemsize
    return nbytes if nbytes >= SHARE_MIN_BYTES else 0


@dataclass
class _Slot:
    name: str
    offset: int
    length: int
    dtype: np.dtype[Any]
    dims: tuple[int, ...]
    value: Any = None  # the OrtValue over the memory map, made when a session first needs it


@dataclass
class HeldModel:
    """A model whose large weights a :class:`SharedWeights` store holds: its graph, whose held initializers point
    at the store's file, and the slot each of them reads."""

    proto: onnx.ModelProto
    slots: dict[str, int] = field(default_factory=dict)  # initializer name -> slot
    shared: int = 0  # bytes of it already held for an earlier model (one copy for both)


class SharedWeights:
    """The large weights of models run side by side, held once: in a file every session of the store maps.

    :meth:`hold` takes a model (a ``ModelProto``, which it does not change, or a path), writes each initializer of
    its main graph of at least :data:`SHARE_MIN_BYTES` to the file — unless an earlier model of the store has the
    same tensor, same name and same bytes, which it then shares — and returns the model without them.
    :meth:`session` builds an onnxruntime session of a held model whose initializers are the store's memory maps,
    one map per tensor whatever the number of sessions. The file lives in a temporary folder removed by
    :meth:`close` (or when the store is collected, or at exit); a session keeps its maps alive after that.
    ``prepack=False`` turns onnxruntime's prepacking off in the sessions (see the module docstring).
    """

    def __init__(self, *, prepack: bool = True, folder: str | os.PathLike[str] | None = None) -> None:
        self.prepack = prepack
        self._parent = Path(folder) if folder is not None else None
        self._dir: Path | None = None
        self._file: Any = None
        self._slots: list[_Slot] = []
        self._by_name: dict[str, list[int]] = {}
        self._models = 0
        self._finalizer: weakref.finalize[Any, SharedWeights] | None = None

    def __enter__(self) -> SharedWeights:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    @property
    def folder(self) -> Path | None:
        """The temporary folder of the file (None before anything is held, and after :meth:`close`)."""
        return self._dir

    @property
    def held_bytes(self) -> int:
        """Bytes of the weights held: each tensor once, whatever the number of models that have it."""
        return sum(slot.length for slot in self._slots)

    @property
    def file_bytes(self) -> int:
        """Bytes of the weights held (the file's size, alignment included)."""
        return self._slots[-1].offset + self._slots[-1].length if self._slots else 0

    def _open(self) -> Any:
        if self._file is None:
            try:
                self._dir = Path(tempfile.mkdtemp(prefix="onnx-lowrank-weights-", dir=self._parent))
                self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._dir), True)
                self._file = open(self._dir / _WEIGHTS_FILE, "w+b")  # noqa: SIM115 - open until close()
            except OSError as exc:
                self.close()
                raise LowRankError(
                    f"cannot write the shared weights in {self._parent or tempfile.gettempdir()} ({exc.strerror or exc})"
                ) from None
        return self._file

    def _same(self, slot: _Slot, raw: bytes) -> bool:
        """Whether the slot holds exactly ``raw`` (read back in chunks, never mapped: no memory held)."""
        if slot.length != len(raw):
            return False
        f, view = self._open(), memoryview(raw)
        f.seek(slot.offset)
        for start in range(0, slot.length, _COMPARE_CHUNK):
            if f.read(min(_COMPARE_CHUNK, slot.length - start)) != view[start : start + _COMPARE_CHUNK]:
                return False
        return True

    def _write(self, tensor: onnx.TensorProto, raw: bytes, dtype: np.dtype[Any]) -> int:
        f = self._open()
        end = self.file_bytes
        offset = end + (-end) % _ALIGN
        try:
            f.seek(end)
            f.write(b"\0" * (offset - end))
            f.write(raw)
        except OSError as exc:
            raise LowRankError(f"cannot write the shared weights in {self._dir} ({exc.strerror or exc})") from None
        self._slots.append(_Slot(tensor.name, offset, len(raw), dtype, tuple(int(d) for d in tensor.dims)))
        self._by_name.setdefault(tensor.name, []).append(len(self._slots) - 1)
        return len(self._slots) - 1

    def hold(self, model: onnx.ModelProto | str | os.PathLike[str]) -> HeldModel:
        """The model with its large initializers held by the store (written once, or shared with an earlier model)."""
        if not isinstance(model, onnx.ModelProto):
            return self.hold(load_model(model))
        head = onnx.ModelProto()
        copy_fields(model, head, skip=("graph",))
        if not model.HasField("graph"):
            return HeldModel(head)
        graph = onnx.GraphProto()
        copy_fields(model.graph, graph, skip=("initializer",))
        held = HeldModel(head)
        for tensor in model.graph.initializer:
            own = self._own_stub(tensor)
            if own is not None:  # a tensor of a model held before (a candidate made from its held graph): shared
                held.slots[tensor.name] = own
                held.shared += self._slots[own].length
                graph.initializer.append(tensor)
                continue
            nbytes = _held_bytes(tensor)
            raw = tensor.raw_data if nbytes else b""
            if not nbytes or len(raw) != nbytes:  # small, or data that contradicts its dims: onnxruntime reads it as it is
                graph.initializer.append(tensor)
                continue
            dtype = _MAPPABLE[tensor.data_type]
            dims = tuple(int(d) for d in tensor.dims)
            match = next(
                (
                    i
                    for i in self._by_name.get(tensor.name, [])
                    if self._slots[i].dtype == dtype and self._slots[i].dims == dims and self._same(self._slots[i], raw)
                ),
                None,
            )
            if match is None:
                match = self._write(tensor, raw, dtype)
            else:
                held.shared += nbytes
            del raw
            held.slots[tensor.name] = match
            slot = self._slots[match]
            stub = graph.initializer.add()
            copy_fields(tensor, stub, skip=("raw_data", "data_location", "external_data"))
            stub.data_location = onnx.TensorProto.EXTERNAL
            stub.external_data.add(key="location", value=_WEIGHTS_FILE)
            stub.external_data.add(key="offset", value=str(slot.offset))
            stub.external_data.add(key="length", value=str(slot.length))
        head.graph.CopyFrom(graph)
        self._models += 1
        return held

    def _own_stub(self, tensor: onnx.TensorProto) -> int | None:
        """The slot ``tensor`` points at when it is a held tensor of this store (as :meth:`hold` leaves it), else None."""
        if tensor.data_location != onnx.TensorProto.EXTERNAL or self._dir is None:
            return None
        entries = {entry.key: entry.value for entry in tensor.external_data}
        if entries.get("location") != _WEIGHTS_FILE:
            return None
        for index in self._by_name.get(tensor.name, []):
            slot = self._slots[index]
            if entries.get("offset") == str(slot.offset) and entries.get("length") == str(slot.length) and slot.dims == tuple(tensor.dims):
                return index
        return None

    def _value(self, index: int) -> Any:
        import onnxruntime as ort

        slot = self._slots[index]
        if slot.value is None:
            assert self._dir is not None and self._file is not None
            self._file.flush()
            array = np.memmap(self._dir / _WEIGHTS_FILE, dtype=slot.dtype, mode="r", offset=slot.offset, shape=slot.dims)
            slot.value = ort.OrtValue.ortvalue_from_numpy(array)
        return slot.value

    def session(
        self,
        held: HeldModel,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        optimization: str = "default",
        arena: bool = True,
    ) -> Any:
        """An onnxruntime session of ``held``: its held initializers are the store's maps, shared with every other
        session of the store that holds the same tensors."""
        import onnxruntime as ort

        wanted = _providers(ort, providers)
        options = _options(ort, threads, optimization, None, arena)
        if not self.prepack:
            options.add_session_config_entry("session.disable_prepacking", "1")
        if not held.slots:
            return _session(ort, held.proto.SerializeToString(), options, wanted)
        values = {name: self._value(index) for name, index in held.slots.items()}
        for name, value in values.items():
            options.add_initializer(name, value)
        assert self._dir is not None
        # onnxruntime reads external data beside the model file: the graph goes in the store's folder for the load
        path = self._dir / f"model{self._models}-{id(held)}.onnx"
        try:
            path.write_bytes(held.proto.SerializeToString())
            session = _session(ort, str(path), options, wanted)
        except OSError as exc:
            raise LowRankError(f"cannot write the shared weights in {self._dir} ({exc.strerror or exc})") from None
        finally:
            path.unlink(missing_ok=True)
        session._onnx_lowrank_weights = list(values.values())  # the maps live as long as the session reads them
        return session

    def close(self) -> None:
        """Remove the file and its folder (sessions made from it keep their maps until they are dropped)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for slot in self._slots:
            slot.value = None
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._dir = None
