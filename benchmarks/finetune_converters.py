"""ONNX → torch for fine-tuning: which converter runs which model, and how close it stays to onnxruntime.

Models: the digits CNN and the CRNN text-line recogniser of ``models/`` (and the text line converted at 2x
MACs, the model a fine-tune trains), ResNet-18 and MobileNetV2 of the zoo at 224x224 (``bnfolded``, and
ResNet-18 ``bnkept`` with its BatchNormalization nodes), and the YOLO-style detector of
``tests/dynamic_models.py``. Converters: this project's interpreter (``onnx_lowrank.finetune``), and
``onnx2torch`` and ``onnx2pytorch`` when ``--other-python`` names a Python that has them (they need
torchvision, whose registry build needs CUDA libraries next to torch, so they live in a separate
throwaway venv, never in this project's)::

    python3 -m venv /tmp/conv-venv
    /tmp/conv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 onnx2torch onnx2pytorch onnxruntime onnx
    python benchmarks/finetune_converters.py --other-python /tmp/conv-venv/bin/python

Per model and converter: whether it converts (else the error, which names the missing ops), and the max
absolute difference of the outputs against onnxruntime on the same seeded inputs: in eval mode at batch 2
and at another batch size (3), in train mode (what a fine-tune runs: BatchNormalization must keep its
inference semantics), and in eval mode again after that train-mode pass (a module whose train mode updates
its running statistics computes another function from then on).

Part two (``--node-cases``, about a minute to build the cases): the interpreter on every node case ONNX's
generators make (``onnx.backend.test.case.node.collect_testcases``) whose ops all have a kernel, compared
with onnxruntime's output (with the stored output where onnxruntime cannot run the case): matched, refused
(:class:`Unsupported`, the reasons counted) or wrong. Results: ``benchmarks/results/finetune_converters.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONVERTERS = ("ours", "onnx2torch", "onnx2pytorch")


# --------------------------------------------------------------------------- one converter on one model (any venv)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _convert(converter: str, path: str) -> Any:
    import onnx

    model = onnx.load(path)
    if converter == "ours":
        from onnx_lowrank.finetune.interpreter import GraphModule

        return GraphModule(model)
    if converter == "onnx2torch":
        from onnx2torch import convert

        return convert(model)
    if converter == "onnx2pytorch":
        from onnx2pytorch import ConvertModel

        return ConvertModel(model, experimental=True)
    raise ValueError(converter)


def _run(converter: str, module: Any, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    tensors = [torch.from_numpy(feeds[n]) for n in names]
    with torch.no_grad():
        if converter == "ours":
            out = module(dict(zip(names, tensors, strict=True)))
        else:
            out = module(*tensors)
    if isinstance(out, torch.Tensor):
        out = [out]
    return [o.numpy() for o in out]


def measure(converter: str, path: str, inputs: str) -> dict[str, Any]:
    """Convert ``path`` with ``converter`` and compare with onnxruntime on the arrays of ``inputs`` (an .npz)."""
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = dict(np.load(inputs))
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    row: dict[str, Any] = {"converter": converter}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = _convert(converter, path)
    except Exception as exc:  # each converter raises its own types
        row.update(converts=False, error=_first_line(exc))
        return row
    row.update(converts=True, convert_seconds=round(time.perf_counter() - start, 2))
    # eval first (also at another batch size), then one pass in train mode, then eval again: a module whose
    # train mode updates state (BatchNorm running statistics) computes another function afterwards
    for mode, batch in (("eval", 2), ("eval_batch3", 3), ("train", 2), ("eval_after_train", 2)):
        feeds = {n: data[n][:batch] for n in names}
        expected = session.run(None, feeds)
        try:
            module.train(mode == "train")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = _run(converter, module, names, feeds)
            diffs = [float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) for a, b in zip(got, expected, strict=False)]
            if len(got) != len(expected) or any(a.shape != b.shape for a, b in zip(got, expected, strict=False)):
                row[mode] = {"error": f"outputs {[a.shape for a in got]} against onnxruntime's {[b.shape for b in expected]}"}
            else:
                scale = max(float(np.max(np.abs(b))) for b in expected)
                row[mode] = {"max_abs": max(diffs), "max_relative": max(diffs) / scale if scale else max(diffs)}
        except Exception as exc:  # a converted module failing at run time
            row[mode] = {"error": _first_line(exc)}
    return row


# --------------------------------------------------------------------------- the models


def _models(work: Path) -> dict[str, tuple[Path, Path, str]]:
    """name → (model path, inputs .npz, description); builds the zoo and YOLO exports once."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from models.make_zoo import cached

    rng = np.random.default_rng(0)
    out: dict[str, tuple[Path, Path, str]] = {}

    def inputs(name: str, arrays: dict[str, np.ndarray]) -> Path:
        path = work / f"{name}.inputs.npz"
        np.savez(path, **arrays)
        return path

    digits = np.load(ROOT / "models" / "digits_calibration.npz")["input"][:3]
    out["digits"] = (ROOT / "models" / "digits_cnn.onnx", inputs("digits", {"input": digits}), "digits CNN (models/)")
    lines = np.load(ROOT / "models" / "textline_calibration.npz")["input"][:3].astype(np.float32)
    out["textline"] = (
        ROOT / "models" / "textline_crnn.onnx",
        inputs("textline", {"input": lines}),
        "CRNN text line: convs, BiLSTM, MatMul",
    )
    converted = work / "textline_2x.onnx"
    if not converted.exists():
        subprocess.run(
            [sys.executable, "-m", "onnx_lowrank", "decompose", str(ROOT / "models" / "textline_crnn.onnx"), str(converted),
             "--speedup", "2", "--by", "macs", "--calibration", str(ROOT / "models" / "textline_calibration.npz"), "--check-runs", "0"],
            check=True, capture_output=True,
        )  # fmt: skip
    out["textline-2x"] = (converted, out["textline"][1], "the text line decomposed at 2x MACs (calibrated)")
    images = rng.standard_normal((3, 3, 224, 224)).astype(np.float32)
    for variant in ("resnet18-bnfolded", "resnet18-bnkept", "mobilenetv2-bnfolded"):
        out[variant] = (cached(variant, 224), inputs("zoo", {"input": images}), f"zoo {variant}, 224x224, random weights")
    from dynamic_models import export

    yolo = work / "yolo.onnx"
    if not yolo.exists():
        export("yolo", yolo)
    out["yolo"] = (
        yolo,
        inputs("yolo", {"images": rng.standard_normal((3, 3, 320, 320)).astype(np.float32)}),
        "YOLO-style detector (tests/)",
    )
    return out


def node_cases() -> dict[str, Any]:
    """The interpreter on ONNX's generated node cases (see the module docstring)."""
    import onnxruntime as ort
    import torch
    from onnx.backend.test.case import node

    from onnx_lowrank.finetune.interpreter import GraphModule
    from onnx_lowrank.finetune.ops import COMPILERS, KernelFailure, Unsupported

    ort.set_default_logger_severity(4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = node.collect_testcases()
    runnable = [c for c in cases if all(n.op_type in COMPILERS or n.op_type == "If" for n in c.model.graph.node)]

    def tensor(value: Any) -> Any:
        array = np.asarray(value)
        if array.dtype.name == "bfloat16":
            return torch.from_numpy(array.view(np.uint16).astype(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(np.array(array))

    matched: list[str] = []
    refused: Counter[str] = Counter()
    wrong: list[str] = []
    against = Counter[str]()
    for case in runnable:
        names = [v.name for v in case.model.graph.input]
        try:
            try:
                session = ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"])
            except Exception:  # onnxruntime lacks the case's op or type
                session = None
            module = GraphModule(case.model)
            for given, stored in case.data_sets:
                if any(np.asarray(v).dtype == object for v in [*given, *stored]):
                    raise Unsupported("string or object tensors")
                reference, source = list(stored), "stored"
                if session is not None:
                    with contextlib.suppress(Exception):  # onnxruntime refuses the inputs: the stored outputs stand
                        feeds = {n: np.asarray(v) for n, v in zip(names, given, strict=False)}
                        reference, source = session.run(None, feeds), "onnxruntime"
                against[source] += 1
                with torch.no_grad():
                    got = module({n: tensor(v) for n, v in zip(names, given, strict=False)})
                for a, b in zip(got, reference, strict=False):
                    ours = a.float().numpy() if a.dtype == torch.bfloat16 else a.numpy()
                    theirs = np.asarray(b)
                    bf16 = theirs.dtype.name == "bfloat16" or a.dtype == torch.bfloat16
                    theirs = theirs.astype(np.float32) if theirs.dtype.name == "bfloat16" else theirs
                    rtol = 1e-2 if bf16 else 1e-3
                    if ours.shape != theirs.shape or ours.dtype != theirs.dtype:
                        raise AssertionError(f"{ours.shape} {ours.dtype} against {theirs.shape} {theirs.dtype}")
                    if not np.allclose(ours.astype(np.float64), theirs.astype(np.float64), rtol=rtol, atol=rtol / 10, equal_nan=True):
                        raise AssertionError("values differ")
            matched.append(case.name)
        except KernelFailure as exc:
            wrong.append(f"{case.name}: {exc}")
        except Unsupported as exc:
            reason = str(exc).split(" (")[0]
            refused[reason] += 1
        except AssertionError as exc:
            wrong.append(f"{case.name}: {exc}")
    return {
        "cases": len(cases),
        "with_kernels": len(runnable),
        "matched": len(matched),
        "refused": sum(refused.values()),
        "wrong": wrong,
        "refusal_reasons": dict(refused.most_common()),
        "compared_with": dict(against),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-python", help="a Python with onnx2torch and onnx2pytorch installed (a separate venv)")
    parser.add_argument("--node-cases", action="store_true", help="also run the generated ONNX node cases")
    parser.add_argument("--worker", nargs=3, metavar=("CONVERTER", "MODEL", "INPUTS"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune_converters.json"))
    parser.add_argument("--work", default=None, help="folder for the exported models (default: a temporary one)")
    parser.add_argument("--table", action="store_true", help="only print the table of the results file --out")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.out).read_text())))
        return
    if args.worker:
        print(json.dumps(measure(*args.worker)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import log, machine_info, write_json

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        models = _models(work)
        rows: list[dict[str, Any]] = []
        other = {"onnx2torch": None, "onnx2pytorch": None}
        if args.other_python:
            code = "import onnx2torch, onnx2pytorch, torch, torchvision; print(torch.__version__, torchvision.__version__)"
            probe = subprocess.run([args.other_python, "-c", code], capture_output=True, text=True, check=False)
            versions = probe.stdout.strip() or probe.stderr.strip().splitlines()[-1:]
            other = {"onnx2torch": versions, "onnx2pytorch": versions}
        for name, (path, inputs, description) in models.items():
            for converter in CONVERTERS:
                if converter == "ours":
                    row = measure("ours", str(path), str(inputs))
                elif args.other_python:
                    done = subprocess.run(
                        [args.other_python, __file__, "--worker", converter, str(path), str(inputs)],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                    row = (
                        json.loads(lines[-1])
                        if lines
                        else {"converter": converter, "converts": False, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
                    )
                else:
                    continue
                row.update(model=name, description=description)
                rows.append(row)
                shown = {k: row.get(k) for k in ("converts", "eval", "eval_batch3", "train", "eval_after_train", "error")}
                log(f"{name:22s} {converter:13s} {json.dumps(shown)[:300]}")
        results: dict[str, Any] = {"machine": machine_info(), "other_converters": other, "rows": rows}
        if args.node_cases:
            results["node_cases"] = node_cases()
            log(f"node cases: {json.dumps({k: v for k, v in results['node_cases'].items() if k != 'refusal_reasons'})[:500]}")
    write_json(Path(args.out), results)

    print(table(results))


def table(results: dict[str, Any]) -> str:
    """The coverage table in Markdown."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import markdown_table

    def cell(row: dict[str, Any], mode: str) -> str:
        if not row.get("converts"):
            return "–"
        value = row.get(mode, {})
        return f"{value['max_abs']:.1e}" if "max_abs" in value else f"fails: {value.get('error', '?')[:60]}"

    modes = ("eval", "eval_batch3", "train", "eval_after_train")
    rows = [
        [r["model"], r["converter"], "yes" if r.get("converts") else f"no: {r.get('error', '')[:80]}", *(cell(r, m) for m in modes)]
        for r in results["rows"]
    ]
    headers = ["model", "converter", "converts", "max abs diff, eval", "eval, batch 3", "train mode", "eval after a train pass"]
    return markdown_table(headers, rows)


if __name__ == "__main__":
    main()
