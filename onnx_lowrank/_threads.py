"""Keeping numpy's BLAS threads from fighting other threads for the cores."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from threadpoolctl import threadpool_limits

__all__ = ["single_threaded_blas"]


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's BLAS on one thread inside the block.

    Used where our own threads (layers factored in parallel) or onnxruntime's
    already occupy the cores: a multi-threaded OpenBLAS keeps its threads
    spinning after each product, and on a 2-core machine a job of 1 s was seen
    to take 10-40 s when both kinds of threads competed.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield
