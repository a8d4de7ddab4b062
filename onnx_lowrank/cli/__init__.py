"""The command line, one module per command; :func:`main` is the ``onnx-lowrank`` entry point."""

from __future__ import annotations

from .main import main

__all__ = ["main"]
