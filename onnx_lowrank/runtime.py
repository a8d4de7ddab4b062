"""onnxruntime sessions for every part of the tool: one place that builds them and turns their failures into one line.

Sessions run with thread spinning off (a spinning pool steals the core another
session's timing needs on a small machine), one inter-op thread, and only the
execution providers asked for: a provider the installed onnxruntime lacks is an
error naming it, never a silent fall-back to CPU.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx

from .errors import LowRankError
from .model_io import PROTOBUF_LIMIT

__all__ = ["ModelLike", "first_line", "make_session", "run_session"]

ModelLike = str | os.PathLike[str] | onnx.ModelProto


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

    _quiet_default_logger(ort)
    available = ort.get_available_providers()
    wanted = list(providers) if providers else ["CPUExecutionProvider"]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise LowRankError(f"execution provider(s) {', '.join(missing)} not in this onnxruntime build (has: {', '.join(available)})")
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
