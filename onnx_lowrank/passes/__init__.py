"""The graph passes: rewrites of the ``ModelProto`` in place, and what they offer the rest of the package.

Each pass edits the model it is given rather than rebuilding it through a
separate IR (onnx-graphsurgeon's export drops model and node metadata): every
field the user had — metadata, doc strings, value_info, node order, functions —
is kept, and the weights are held once.

* :func:`fold_batchnorm` — BatchNormalization folded into the Conv before it;
* :func:`find_sites` — every MAC-carrying node, as a :class:`Site` that says
  which splits it allows (or why none), its cost and its weight in conv layout;
* :func:`apply_factors` — each planned site replaced by its two nodes;
* :func:`resolve_weight` / :func:`add_constant` — reading a layer's constant
  weight (through Identity/Cast and constant expressions) and storing a new one
  where a node can read it, for the passes that rewrite weights after the fact
  (calibration's refit).

Other packages import these names from here, never from the private modules.
"""

from __future__ import annotations

from ._graph import WeightSource, add_constant, resolve_weight
from ._rewrite import FLOAT_TYPES, NewNodes, Site, apply_factors, node_key, scope_label
from .fold_batchnorm import FoldResult, fold_batchnorm
from .sites import find_sites

__all__ = [
    "FLOAT_TYPES",
    "FoldResult",
    "NewNodes",
    "Site",
    "WeightSource",
    "add_constant",
    "apply_factors",
    "find_sites",
    "fold_batchnorm",
    "node_key",
    "resolve_weight",
    "scope_label",
]
