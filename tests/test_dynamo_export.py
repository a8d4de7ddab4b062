"""Models from torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``), the default of current torch.

Its graphs differ from the TorchScript exporter's that the zoo uses: opset 18+, weights in external data by
default, and — with its optimizer off — every BatchNormalization kept and every bias-less Conv given a zero
bias computed from the weight's shape, ``Expand(CastLike(0, x), Shape(W)[:1])``. Both forms must convert
exactly at full rank, fold their BatchNormalization nodes, and leave no copy of the original weights behind.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_lowrank import decompose

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # models/ is a folder of scripts beside the package, not an installed package

torch = pytest.importorskip("torch", reason="exporting needs torch: pip install -e '.[test]'")
pytest.importorskip("onnxscript", reason="torch's dynamo exporter needs onnxscript: pip install -e '.[test]'")

from models.zoo import build  # noqa: E402

SIZE = 64


@pytest.fixture(scope="module", params=[True, False], ids=["optimized", "unoptimized"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """ResNet-18 with BatchNorm, exported by the dynamo exporter with its optimizer on or off."""
    module = build("resnet18-bnkept", SIZE).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
    path = tmp_path_factory.mktemp("dynamo") / "resnet18.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.from_numpy(x),), str(path), dynamo=True, optimize=request.param, verbose=False)
        expected = module(torch.from_numpy(x)).numpy()
    return path, x, expected


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


@pytest.mark.parametrize("kind", ["spatial", "channel"])
def test_full_rank_is_exact_and_batchnorm_folds(exported: tuple[Path, np.ndarray, np.ndarray], kind: str) -> None:
    path, x, expected = exported
    original = _run(path, x)
    scale = float(np.abs(original).max())
    assert np.abs(original - expected).max() <= 1e-4 * scale  # the export itself
    out, report = decompose(path, rank=100_000, force=True, kinds=[kind], check_runs=0)
    assert report.decomposed and not any(layer.reason and "constant" in layer.reason for layer in report.layers)
    assert len(report.folded_batchnorms) == 20 or (not report.folded_batchnorms and "BatchNormalization" not in _ops(path))
    assert not report.kept_batchnorms
    assert "BatchNormalization" not in _ops(out)
    assert np.abs(_run(out, x) - original).max() <= 1e-4 * scale


def test_speedup_leaves_no_copy_of_the_original_weights(exported: tuple[Path, np.ndarray, np.ndarray]) -> None:
    """At --speedup 2 the parameters shrink as much as the optimized export's do: no original weight is kept
    alive by a Shape node reading it."""
    path, _, _ = exported
    out, report = decompose(path, speedup=2, by="macs", check_runs=0)
    assert report.mac_ratio >= 2.0
    assert report.params_after < 0.6 * report.params_before
    decomposed_weights = {layer.weight for layer in report.decomposed}
    readers = {name for node in out.graph.node for name in node.input}
    assert not decomposed_weights & readers
    assert not decomposed_weights & {t.name for t in out.graph.initializer}


def _ops(model: onnx.ModelProto | Path) -> set[str]:
    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, Path) else model
    return {node.op_type for node in proto.graph.node}
