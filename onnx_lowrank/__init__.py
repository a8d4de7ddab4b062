"""onnx-lowrank: faster ONNX CNNs by low-rank decomposition of their convolutions.

Each Conv with a kh×kw kernel becomes a vertical (kh×1) conv followed by a
horizontal (1×kw) conv, the globally optimal pair of Tai et al., "Convolutional
neural networks with low-rank regularization" (ICLR 2016), Theorem 1.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import decompose
from .config import CalibrationConfig, DecomposeConfig, FinetuneConfig, MobileConfig, PolicyConfig, ShapeConfig, SpeedConfig
from .errors import LowRankError
from .inspection import inspect
from .mobile import save_ort
from .model_io import count_params, load_model, save_model
from .quantize import quantize_model
from .report import InspectLayer, LayerReport, Report
from .verify import OutputStats, VerifyOptions, VerifyResult, verify

__all__ = [
    "CalibrationConfig",
    "DecomposeConfig",
    "FinetuneConfig",
    "InspectLayer",
    "LayerReport",
    "LowRankError",
    "MobileConfig",
    "OutputStats",
    "PolicyConfig",
    "Report",
    "ShapeConfig",
    "SpeedConfig",
    "VerifyOptions",
    "VerifyResult",
    "__version__",
    "count_params",
    "decompose",
    "inspect",
    "load_model",
    "quantize_model",
    "save_model",
    "save_ort",
    "verify",
]
