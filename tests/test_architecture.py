"""The package's imports run one way, from the command line down to the math (ARCHITECTURE.md draws the layers).

Each module has a layer; a module may import modules of a lower layer, and modules of its own package at any
layer (a package keeps its own order). No module imports a private (``_``-prefixed) module of another package:
what is shared is the package's public interface.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onnx_lowrank"

# bottom (0) to top; a package's modules share its layer
LAYERS: dict[str, int] = {
    "errors": 0,
    "agreement": 0,
    "stats": 0,
    "threads": 0,
    "factorization": 0,
    "report": 0,
    "graph": 0,
    "timing_cache": 0,
    "ranks": 1,
    "cost": 1,
    "data_io": 1,
    "model_io": 1,
    "value_flow": 1,
    "runtime": 2,
    "shapes": 2,
    "config": 2,
    "run_shapes": 3,
    "passes": 4,
    "timing": 4,
    "mobile": 4,
    "layer_timing": 5,
    "verify": 5,
    "calibration": 5,
    "planning": 6,
    "finetune": 6,
    "quantize": 6,
    "layers": 7,
    "answers": 7,
    "api": 8,
    "inspection": 8,
    "sweep": 9,
    "accuracy_budget": 10,
    "html_report": 10,
    "cli": 11,
    "__main__": 12,
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """The package modules ``name`` imports (relative imports resolved), with the line of each."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            target = [*base, *(node.module.split(".") if node.module else [])]
            out.append((".".join(target), node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name.removeprefix("onnx_lowrank."), node.lineno) for a in node.names if a.name.startswith("onnx_lowrank.")]
    return out


def _layer(name: str) -> int | None:
    return LAYERS.get(name.split(".")[0]) if name else None


MODULES = _modules()


def test_every_module_has_a_layer() -> None:
    missing = sorted({name.split(".")[0] for name in MODULES if name and _layer(name) is None})
    assert not missing, f"give these modules a layer in LAYERS (and in ARCHITECTURE.md): {missing}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n))
def test_imports_run_downwards(name: str) -> None:
    """A module imports only lower layers, or its own package."""
    own = _layer(name)
    assert own is not None
    for target, line in _imports(name, MODULES[name]):
        if not target or target.split(".")[0] == name.split(".")[0]:
            continue  # the package root (__version__), or within one package
        layer = _layer(target)
        assert layer is not None and layer < own, f"{name} (layer {own}) imports {target} (layer {layer}) at line {line}: upwards"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n))
def test_no_private_module_of_another_package(name: str) -> None:
    for target, line in _imports(name, MODULES[name]):
        parts = target.split(".")
        private = [i for i, part in enumerate(parts) if part.startswith("_") and part != "__init__"]
        for i in private:
            owner = ".".join(parts[:i])
            here = ".".join(name.split(".")[:i]) if name.count(".") >= i else name
            assert owner == here, f"{name} imports the private module {target} of package {owner or 'onnx_lowrank'} (line {line})"


# the optional extra: torch is imported by these modules of the fine-tune alone, which the package imports only
# once it has checked that torch is there (finetune._torch.require_torch)
TORCH_MODULES = {"finetune.interpreter", "finetune.ops", "finetune.training"}


def _imports_torch(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        else:
            continue
        if any(n.split(".")[0] == "torch" for n in names):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n))
def test_torch_is_imported_only_by_the_fine_tune(name: str) -> None:
    lines = _imports_torch(MODULES[name])
    assert name in TORCH_MODULES or not lines, f"{name} imports torch (line {lines[0] if lines else 0}): only {sorted(TORCH_MODULES)} may"


def test_the_fine_tune_imports_its_torch_modules_lazily() -> None:
    """What ``import onnx_lowrank.finetune`` runs does not import the modules that import torch."""
    for name in ("finetune", "finetune.distill", "finetune.options", "finetune.targets", "finetune.outputs", "finetune._torch"):
        for node in ast.parse(MODULES[name].read_text()).body:  # module level only: a function's import is lazy
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # a module of the fine-tune package
                targets = [f"finetune.{node.module}"] if node.module else [f"finetune.{a.name}" for a in node.names]
                for target in targets:
                    assert target not in TORCH_MODULES, f"{name} imports {target} at module level (line {node.lineno})"


# options travel in groups (frozen dataclasses checked once), not as long argument lists
MAX_PARAMETERS = 10


def _parameter_counts(path: Path) -> list[tuple[str, int, int]]:
    """(function, parameters, line) of every function in ``path``; ``self``/``cls`` not counted, ``*args`` and
    ``**keywords`` counted once each."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
            if (a.posonlyargs or a.args) and (a.posonlyargs or a.args)[0].arg in ("self", "cls"):
                count -= 1
            out.append((node.name, count, node.lineno))
    return out


def test_the_parameter_counter_counts_what_it_should(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text("class A:\n    def m(self, a, /, b, *c, d, **e): ...\ndef f(a, b=1, *, c): ...\n")
    assert sorted(_parameter_counts(source)) == [("f", 3, 3), ("m", 5, 2)]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n))
def test_no_function_takes_more_than_ten_parameters(name: str) -> None:
    wide = [(f, n, line) for f, n, line in _parameter_counts(MODULES[name]) if n > MAX_PARAMETERS]
    assert not wide, f"{name}: {wide[0][0]} takes {wide[0][1]} parameters (line {wide[0][2]}); group its options in a dataclass"
