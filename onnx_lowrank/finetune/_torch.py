"""torch, imported only when fine-tuning runs: without it, one line naming the extra to install.

The rest of ``onnx_lowrank`` never imports torch; inside this subpackage only the modules that train or
interpret a graph do, and they are imported after :func:`require_torch` has succeeded.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from types import ModuleType

from ..errors import LowRankError

__all__ = ["EXTRA", "MISSING_TORCH", "Importer", "check_torch", "import_module", "require_torch"]

EXTRA = "finetune"
MISSING_TORCH = f"fine-tuning needs torch, which is not installed: pip install 'onnx-lowrank[{EXTRA}]'"

Importer = Callable[[str], ModuleType]

# how torch is imported; the tests put an importer that fails here to see the refusal without torch
import_module: Importer = importlib.import_module


def require_torch(importer: Importer | None = None) -> ModuleType:
    """The torch module, or :class:`LowRankError` with :data:`MISSING_TORCH`.

    ``importer`` imports a module by name (default: this module's :data:`import_module`).
    """
    try:
        return (importer or import_module)("torch")
    except ImportError:
        raise LowRankError(MISSING_TORCH) from None


def check_torch() -> None:
    """:class:`LowRankError` with :data:`MISSING_TORCH` when torch is not installed, found without importing it:
    a conversion asked to fine-tune refuses before any work, and imports torch only when the fine-tune starts."""
    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # a broken entry in sys.modules
        found = False
    if not found:
        raise LowRankError(MISSING_TORCH)
