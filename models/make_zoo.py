"""Export the model zoo of ``models/zoo.py`` to ONNX (needs torch: the ``models`` extra).

    python models/make_zoo.py OUTDIR                    # published input sizes (224; AlexNet 227; NIN 32)
    python models/make_zoo.py OUTDIR --size 64          # the ImageNet networks at 64x64 (NIN stays 32)
    python models/make_zoo.py OUTDIR --small            # the sizes the tests use
    python models/make_zoo.py OUTDIR --only resnet50-bnkept vgg16-bnfolded

Each variant becomes ``OUTDIR/<variant>.onnx`` (the external-data one also
``<variant>.onnx.data``) and ``OUTDIR/<variant>.reference.npz``: a seeded
``input`` and the ``expected`` output of the torch module run in float64 (the
exact result the float32 graph approximates).

Two forms per architecture, both from torch's legacy TorchScript exporter
(``dynamo=False``), opset 17, input ``input`` with a symbolic batch dim, output
``logits``:

* ``bnfolded``: eval mode, ``training=TrainingMode.EVAL, do_constant_folding=True``:
  the exporter's eval peephole fuses every Conv -> BatchNorm pair, so no
  BatchNormalization is left after a Conv (DenseNet keeps its pre-activation
  BNs, which read a Concat and cannot be fused into anything).
* ``bnkept``: the same eval-mode module exported with
  ``training=TrainingMode.PRESERVE, do_constant_folding=False``: the fusion
  pass only runs for EVAL, so Conv -> BatchNormalization(training_mode=0) stays.

Plus ``resnet18-fp16`` (the module cast with ``.half()`` before export: fp16
weights, input, activations and output) and ``resnet50-external`` (the
``bnfolded`` graph saved with ``save_as_external_data=True``). Every export is
checked: BatchNormalization nodes counted against the form, and onnxruntime's
output compared with the float64 one. The exporter settings are recorded in the
model's ``metadata_props`` (``zoo.exporter``); torch sets ``producer_name``
and ``producer_version``.

The tests and ``zoo_table.py`` go through :func:`cached`, which exports a
variant once into ``<repo>/.zoo-cache/`` (or ``$ONNX_LOWRANK_ZOO_CACHE``), in a
folder keyed by a hash of this file, ``zoo.py``, the torch and onnx versions and
the input size.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx

if __package__ in (None, ""):  # run as a script: make `models` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.zoo import VARIANTS, Arch, Variant, build, variant

__all__ = ["CACHE_ENV", "OPSET", "cache_dir", "cached", "export", "input_size", "reference_path", "sample_input"]

OPSET = 17
ROOT = Path(__file__).resolve().parents[1]
CACHE_ENV = "ONNX_LOWRANK_ZOO_CACHE"


def input_size(arch: Arch, size: int | None = None, small: bool = False) -> int:
    """The input size a variant is exported at: test size, published size, or ``size`` (ImageNet networks only)."""
    if small:
        return arch.test_size
    if size is None or arch.cifar:
        return arch.size
    return max(size, arch.min_size)


def sample_input(shape: tuple[int, ...], dtype: type[np.floating] = np.float32, seed: int = 0) -> np.ndarray:
    """A seeded standard-normal batch (what the export check and the tests feed)."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _exporter_settings(v: Variant) -> dict[str, object]:
    import torch

    if v.form == "bnkept":
        return {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
    return {"training": torch.onnx.TrainingMode.EVAL, "do_constant_folding": True}


def _bn_after_conv(model: onnx.ModelProto) -> int:
    producers = {o: n for n in model.graph.node for o in n.output}
    return sum(
        1 for n in model.graph.node if n.op_type == "BatchNormalization" and getattr(producers.get(n.input[0]), "op_type", None) == "Conv"
    )


def _check_export(v: Variant, model: onnx.ModelProto, bn_modules: int) -> None:
    """BN nodes as the form demands (raises ``RuntimeError`` otherwise)."""
    bn_nodes = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
    if v.form == "bnfolded":
        if _bn_after_conv(model):
            raise RuntimeError(f"{v.name}: {_bn_after_conv(model)} Conv -> BatchNormalization pairs were not fused by the exporter")
        if bn_nodes and not v.arch.unfoldable_bn:
            raise RuntimeError(f"{v.name}: {bn_nodes} BatchNormalization nodes left in the folded form")
    elif bn_nodes != bn_modules or bn_nodes == 0:
        raise RuntimeError(f"{v.name}: {bn_nodes} BatchNormalization nodes exported for {bn_modules} BatchNorm2d layers")


def reference_path(model_path: str | os.PathLike[str]) -> Path:
    """``<variant>.reference.npz`` beside ``<variant>.onnx``: the seeded ``input`` and torch's float64 ``expected`` output."""
    return Path(model_path).with_suffix(".reference.npz")


def export(v: Variant | str, path: str | os.PathLike[str], size: int | None = None) -> onnx.ModelProto:
    """Export one variant to ``path`` at input ``size`` (default: its test size), with its reference outputs.

    Returns the model (with its weights, also for the external-data variant).
    """
    import torch

    v = variant(v) if isinstance(v, str) else v
    size = size or v.arch.test_size
    module = build(v, size)
    if v.fp16:
        module = module.half()
    dtype = np.float16 if v.fp16 else np.float32
    x = sample_input((1, 3, size, size), dtype, seed=1)
    settings = _exporter_settings(v)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the legacy exporter announces its deprecation and, for PRESERVE, advises against constant
        # folding (which is off there anyway); neither is actionable here
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.from_numpy(x),),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            **settings,  # type: ignore[arg-type]
        )
    model = onnx.load_from_string(buffer.getvalue())
    described = ", ".join(f"{k}={getattr(val, 'name', val)}" for k, val in settings.items())
    meta = {
        "zoo.variant": v.name,
        "zoo.input_size": str(size),
        "zoo.exporter": f"torch.onnx.export(dynamo=False, opset_version={OPSET}, {described})",
        "zoo.torch": torch.__version__,
    }
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, **meta})
    _check_export(v, model, sum(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules()))

    # the exact result: the same weights (fp16 ones as they are) in float64 arithmetic
    with torch.no_grad():
        expected = module.double()(torch.from_numpy(x).double()).numpy()
    _check_outputs(v, model, x, expected)

    path = Path(path)
    np.savez(reference_path(path), input=x, expected=expected)
    if v.external_data:
        onnx.save_model(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024
        )
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))  # the caller gets the full model back
    else:
        onnx.save_model(model, str(path))
    return model


def _check_outputs(v: Variant, model: onnx.ModelProto, x: np.ndarray, expected: np.ndarray) -> None:
    """onnxruntime must reproduce torch (catches exporter mistakes, e.g. in ceil-mode pooling or LRN)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x})[0].astype(np.float64)
    scale = float(np.abs(expected).max())
    # float32 rounding through 50+ layers reaches ~2e-5 of the largest logit (ResNet-50); fp16 ~3e-3
    tolerance = (2e-2 if v.fp16 else 1e-4) * scale
    error = float(np.abs(got - expected).max())
    if not np.isfinite(error) or error > tolerance:
        raise RuntimeError(f"{v.name}: onnxruntime differs from torch by {error:.3g} (max |y| {scale:.3g})")


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or ROOT / ".zoo-cache")


def _key(v: Variant, size: int) -> str:
    digest = hashlib.sha256()
    for source in (ROOT / "models" / "zoo.py", Path(__file__)):
        digest.update(source.read_bytes())
    for package in ("torch", "onnx"):
        try:
            digest.update(metadata.version(package).encode())
        except metadata.PackageNotFoundError:
            digest.update(b"-")
    digest.update(f"{v.name}:{size}:{OPSET}".encode())
    return digest.hexdigest()[:12]


def cached(v: Variant | str, size: int | None = None, cache: Path | None = None) -> Path:
    """Path of the variant's ONNX file in the cache, exported first if it is not there.

    Safe with several processes: each exports into a private folder and renames
    it into place; a process that loses the race drops its copy.
    """
    v = variant(v) if isinstance(v, str) else v
    size = size or v.arch.test_size
    root = cache or cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    prefix = f"{v.name}-{size}-"
    folder = root / f"{prefix}{_key(v, size)}"
    target = folder / f"{v.name}.onnx"
    if target.is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".{v.name}.", dir=root))
    try:
        export(v, staging / target.name, size)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is not
        try:
            staging.rename(folder)
        except OSError:  # another process got there first
            if not target.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for stale in root.glob(f"{prefix}*"):  # exports of other sources (older ones, in a per-checkout cache)
        if stale != folder and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--size", type=int, help="input size of the ImageNet networks (default: the published one)")
    sizes.add_argument("--small", action="store_true", help="the small sizes the tests use")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=[v.name for v in VARIANTS], help="variants to export")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    for v in VARIANTS:
        if args.only and v.name not in args.only:
            continue
        size = input_size(v.arch, args.size, args.small)
        start = time.perf_counter()
        path = args.outdir / f"{v.name}.onnx"
        model = export(v, path, size)
        convs = sum(n.op_type == "Conv" for n in model.graph.node)
        bns = sum(n.op_type == "BatchNormalization" for n in model.graph.node)
        print(f"{path}  {size}x{size}  {convs} Conv, {bns} BatchNormalization  {time.perf_counter() - start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
