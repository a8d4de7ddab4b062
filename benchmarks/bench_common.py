"""What the benchmark scripts share: the models they load, the machine they ran on, results files, Markdown tables.

Models: ``vgg16`` is the VGG-16 of ``models/make_vgg.py`` (node names
``conv1_1`` … ``conv5_3``, which the paper-rank configuration refers to); the
others come from the torch model zoo (``models/zoo.py``), exported once through
``models.make_zoo.cached`` into the zoo cache (``.zoo-cache/`` or
``$ONNX_LOWRANK_ZOO_CACHE``), in their ``bnfolded`` form (Conv+BN fused by the
exporter, as models are usually deployed).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = RESULTS / "quick"  # development runs: never the project's published numbers

if str(ROOT) not in sys.path:  # `models` is a folder of scripts, not an installed package
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: where it comes from and the input size of the full and the quick run."""

    name: str
    source: str  # "make_vgg" or the zoo variant name
    size: int  # full run: the published input size
    quick_size: int  # --quick: a small input size
    description: str
    input_shapes: Mapping[str, tuple[int, ...]] | None = None  # sizes for inputs with symbolic dims (--input-shape)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("vgg16", "make_vgg", 224, 64, "VGG-16 (models/make_vgg.py)"),
        ModelSpec("resnet50", "resnet50-bnfolded", 224, 64, "ResNet-50 v1.5 (zoo)"),
        ModelSpec("googlenet", "googlenet-bnfolded", 224, 64, "GoogLeNet (zoo)"),
        # the zoo's AlexNet is Caffe's, whose published input is 227x227 (at 224 its fc6 would be narrower)
        ModelSpec("alexnet", "alexnet-bnfolded", 227, 67, "AlexNet, Caffe layout (zoo)"),
        ModelSpec("nin", "nin-bnfolded", 32, 32, "CIFAR-10 Network in Network (zoo)"),
        ModelSpec("resnet18", "resnet18-bnfolded", 224, 64, "ResNet-18 (zoo)"),
        ModelSpec("mobilenetv2", "mobilenetv2-bnfolded", 224, 64, "MobileNetV2 (zoo)"),
        ModelSpec("densenet121", "densenet121-bnfolded", 224, 64, "DenseNet-121 (zoo)"),
        # trained models shipped in models/: their own input size
        ModelSpec("digits", "file:models/digits_cnn.onnx", 32, 32, "digits CNN, trained (models/digits_cnn.onnx)"),
        ModelSpec(
            "textline",
            "file:models/textline_crnn.onnx",
            32,
            32,
            "CRNN text-line recogniser, trained (models/textline_crnn.onnx), lines of 32x256",
            {"input": (1, 1, 32, 256)},
        ),
        ModelSpec(
            "textdet",
            "file:models/textdet.onnx",
            320,
            320,
            "DB-style text detector, trained (models/textdet.onnx), pages of 320x320",
            {"input": (1, 1, 320, 320)},
        ),
    ]
}
# the models speed.py runs by default (the others through --models): the published speed tables
SPEED_MODELS = ("vgg16", "resnet50", "googlenet", "alexnet", "nin")

# --quick builds VGG-16 at a quarter of its width with a narrow classifier, as models/vgg16_small.onnx is
QUICK_VGG = {"width": 0.25, "fc": 256}


def load(spec: ModelSpec, quick: bool) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The model in memory and a description of how it was made (recorded in the results)."""
    size = spec.quick_size if quick else spec.size
    if spec.source.startswith("file:"):
        path = ROOT / spec.source.removeprefix("file:")
        return onnx.load(str(path)), {"source": str(path.relative_to(ROOT)), "input_size": size}
    if spec.source == "make_vgg":
        from models.make_vgg import build

        shape = QUICK_VGG if quick else {"width": 1.0, "fc": 4096}
        model = build(width=float(shape["width"]), size=size, fc=int(shape["fc"]))
        return model, {"source": "models/make_vgg.py build()", "input_size": size, **shape}
    # models/make_zoo.py is the zoo's export and cache; its `cached(variant, size) -> Path` is the entry point used here
    from models.make_zoo import cached

    path = cached(spec.source, size)
    return onnx.load(str(path)), {"source": f"models/make_zoo.py cached({spec.source!r}, {size})", "input_size": size, "path": str(path)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory, library versions, date and load: enough to tell whether two results files compare."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("onnx-lowrank", "onnxruntime", "onnx", "numpy", "scipy", "torch")},
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # timings are only worth something on a quiet machine: the load average says whether it was
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def results_path(name: str, quick: bool, out: str | None = None) -> Path:
    """``benchmarks/results/<name>.json``, or under ``results/quick/`` for --quick runs."""
    if out:
        return Path(out)
    if quick:
        # quick numbers are development checks: keep them out of version control altogether
        QUICK_RESULTS.mkdir(parents=True, exist_ok=True)
        ignore = QUICK_RESULTS / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# --quick runs: development checks, not results\n*\n")
        return QUICK_RESULTS / f"{name}.json"
    return RESULTS / f"{name}.json"


def write_json(path: Path, data: Any) -> None:
    """Write through a temporary file and a rename, so an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    """A number for a table cell; missing values print as a dash."""
    return "–" if value is None else f"{value:{spec}}{suffix}"


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only the Markdown."""
    print(message, file=sys.stderr, flush=True)
