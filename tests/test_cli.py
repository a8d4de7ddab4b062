"""End-to-end tests of the ``onnx-lowrank`` command line.

Most runs are in this process (:func:`cli_contract.run_cli`: what reaches file descriptors 1 and 2 is captured
too, so a C++ log line is seen); the runs marked ``installed`` or ``process`` start a fresh process, the
installed console script or ``python -m onnx_lowrank``, and keep the process boundary under test: its exit
code, and that nothing is printed by imports or at exit.

Bad input must end in exit code 2 with exactly one line on stderr naming the
problem, no traceback, the input untouched and nothing left in the output
folder. The happy paths check what is written (a valid, runnable model; the
report's fields against the output graph) and what is printed.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import conv_model, run
from cli_contract import run_cli

import onnx_lowrank.cli

ROOT = Path(__file__).resolve().parent.parent
VGG = ROOT / "models" / "vgg16_small.onnx"
VGG_CONVS = [f"conv{block}_{i}" for block, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]
VGG_LAYERS = [*VGG_CONVS, "fc6", "fc7", "fc8"]  # the convs, then the fully connected Gemms
LAYER_FIELDS = {
    "node",
    "decomposed",
    "reason",
    "rank",
    "full_rank",
    "relative_error",
    "macs_before",
    "macs_after",
    "vertical_node",
    "horizontal_node",
}
# one BLAS thread per process: the machine's cores are shared, and oversubscribed BLAS threads make SVDs crawl
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
ENV.pop("ONNX_LOWRANK_DEBUG", None)


def sha256(path: Path) -> str:
    """Hex digest of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


VGG_SHA = sha256(VGG)


def script() -> str:
    """The installed ``onnx-lowrank`` console script (next to the interpreter, else on PATH)."""
    beside = Path(sys.executable).parent / "onnx-lowrank"
    found = str(beside) if beside.is_file() else shutil.which("onnx-lowrank")
    if found is None:
        pytest.fail("the onnx-lowrank console script is not installed")
    return found


def cli(*args: str | Path, installed: bool = False, process: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the CLI: in this process, or in a fresh one — the installed script (``installed``) or
    ``python -m onnx_lowrank`` (``process``)."""
    if not (installed or process):
        outcome = run_cli(args)
        return subprocess.CompletedProcess(outcome.argv, outcome.code, outcome.stdout, outcome.stderr)
    launcher = [script()] if installed else [sys.executable, "-m", "onnx_lowrank"]
    return subprocess.run([*launcher, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout, check=False)


def assert_ok(proc: subprocess.CompletedProcess[str], code: int = 0) -> None:
    """The run ended with ``code`` and printed no error and no traceback."""
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr == ""


def snapshot(root: Path) -> dict[str, str]:
    """Every file and folder under ``root`` (hidden ones too) with its content hash."""
    state: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = "link -> " + os.readlink(path)
        elif path.is_dir():
            state[rel] = "dir"
        elif os.access(path, os.R_OK):
            state[rel] = sha256(path)
        else:
            state[rel] = f"unreadable, {path.stat().st_size} bytes, mode {path.stat().st_mode:o}"
    return state


@pytest.fixture(autouse=True)
def shipped_model_untouched() -> Iterator[None]:
    """No test may change the shipped model."""
    yield
    assert sha256(VGG) == VGG_SHA


# --------------------------------------------------------------------------- bad input


@dataclass
class Workspace:
    """``inp``: a copy of the VGG model and any other input files; ``out``: an empty output folder."""

    root: Path
    inp: Path
    out: Path
    model: Path

    @property
    def target(self) -> Path:
        return self.out / "decomposed.onnx"

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.inp / name
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        return path

    def npz(self, name: str, **arrays: np.ndarray) -> Path:
        path = self.inp / name
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return path


def _chmod_000(ws: Workspace) -> list[str]:
    locked = ws.write("locked.onnx", VGG.read_bytes())
    locked.chmod(0)
    return ["decompose", str(locked), str(ws.target)]


def _mkdir(ws: Workspace, name: str) -> Path:
    path = ws.inp / name
    path.mkdir()
    return path


def _symlink_to_input(ws: Workspace) -> list[str]:
    link = ws.out / "link.onnx"
    link.symlink_to(ws.model)
    return ["decompose", str(ws.model), str(link), "--rank", "2"]


def _dec(ws: Workspace, *flags: str) -> list[str]:
    return ["decompose", str(ws.model), str(ws.target), *flags]


def _ranks(ws: Workspace, text: str) -> list[str]:
    return _dec(ws, "--ranks", str(ws.write("ranks.json", text)))


def _cal(ws: Workspace, **arrays: np.ndarray) -> list[str]:
    return _dec(ws, "--speedup", "2", "--calibration", str(ws.npz("calibration.npz", **arrays)))


def _fixed_batch_calibration(ws: Workspace) -> list[str]:
    model = ws.inp / "fixed.onnx"
    onnx.save(conv_model(c=3, input_shape=(4, 3, 8, 8)), model)
    return ["decompose", str(model), str(ws.target), "--calibration", str(ws.npz("c.npz", x=np.zeros((2, 3, 8, 8), np.float32)))]


def _sample(ws: Workspace, *flags: str, **arrays: np.ndarray) -> list[str]:
    return _dec(ws, "--speedup", "2", "--by", "macs", "--sample", str(ws.npz("sample.npz", **arrays)), *flags)


def _huge_sample(ws: Workspace) -> list[str]:
    """A sample whose header declares 2^40 rows of its 1x3x64x64 array (the data stays small)."""
    member = io.BytesIO()
    np.save(member, np.zeros((1, 3, 64, 64), np.float32))
    path = ws.inp / "sample.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input.npy", member.getvalue().replace(b"'shape': (1, 3, 64, 64)", b"'shape': (1099511627776, 3, 64, 64)"))
    return _dec(ws, "--sample", str(path))


def _verify(ws: Workspace, *flags: str) -> list[str]:
    return ["verify", str(ws.model), str(ws.model), "--runs", "0", *flags]


def _truncated_npz(ws: Workspace) -> list[str]:
    good = ws.npz("good.npz", input=np.zeros((1, 3, 64, 64), np.float32))
    return _verify(ws, "--inputs", str(ws.write("half.npz", good.read_bytes()[: good.stat().st_size // 2])))


def _npy(ws: Workspace) -> list[str]:
    path = ws.inp / "inputs.npy"
    np.save(path, np.zeros((1, 3, 64, 64), np.float32))
    return _verify(ws, "--inputs", str(path))


def _sweep(ws: Workspace, *flags: str) -> list[str]:
    return ["sweep", str(ws.model), "--runs", "0", *flags]


SKIP_AS_ROOT = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads chmod 000 files; the directory case covers unreadable input"
)
RNG_BYTES = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()

BAD: list[tuple[str, Callable[[Workspace], list[str]], str]] = [
    # the input model
    ("missing-file", lambda ws: ["decompose", str(ws.inp / "absent.onnx"), str(ws.target)], "no such file"),
    ("unreadable-chmod-000", _chmod_000, "permission denied"),
    ("directory-as-input", lambda ws: ["decompose", str(_mkdir(ws, "folder.onnx")), str(ws.target)], "directory"),
    (
        "truncated-onnx",
        lambda ws: ["decompose", str(ws.write("half.onnx", VGG.read_bytes()[: VGG.stat().st_size // 2])), str(ws.target)],
        "onnx model",
    ),
    ("random-bytes", lambda ws: ["decompose", str(ws.write("random.onnx", RNG_BYTES)), str(ws.target)], "onnx model"),
    (
        "text-file",
        lambda ws: ["decompose", str(ws.write("notes.onnx", "this is a text file, not a model\n")), str(ws.target)],
        "onnx model",
    ),
    ("empty-file", lambda ws: ["decompose", str(ws.write("empty.onnx", b"")), str(ws.target)], "empty"),
    # the output
    ("output-folder-missing", lambda ws: ["decompose", str(ws.model), str(ws.out / "absent" / "decomposed.onnx")], "does not exist"),
    ("output-is-input", lambda ws: ["decompose", str(ws.model), str(ws.model), "--rank", "2"], "overwrite"),
    ("output-is-input-other-spelling", lambda ws: ["decompose", str(ws.model), str(ws.inp / ".." / "in" / "model.onnx")], "overwrite"),
    ("output-symlink-to-input", _symlink_to_input, "overwrite"),
    ("output-is-a-directory", lambda ws: ["decompose", str(ws.model), str(_mkdir(ws, "folder.onnx")), "--rank", "2"], "directory"),
    # policies
    ("rank-0", lambda ws: _dec(ws, "--rank", "0"), "--rank"),
    ("rank-negative", lambda ws: _dec(ws, "--rank", "-3"), "--rank"),
    ("rank-not-a-number", lambda ws: _dec(ws, "--rank", "abc"), "--rank"),
    ("energy-0", lambda ws: _dec(ws, "--energy", "0"), "--energy"),
    ("energy-1.5", lambda ws: _dec(ws, "--energy", "1.5"), "--energy"),
    ("energy-negative", lambda ws: _dec(ws, "--energy", "-0.1"), "--energy"),
    ("energy-nan", lambda ws: _dec(ws, "--energy", "nan"), "--energy"),
    ("speedup-0.5", lambda ws: _dec(ws, "--speedup", "0.5"), "--speedup"),
    ("speedup-0", lambda ws: _dec(ws, "--speedup", "0"), "--speedup"),
    ("speedup-not-a-number", lambda ws: _dec(ws, "--speedup", "abc"), "--speedup"),
    ("speedup-inf", lambda ws: _dec(ws, "--speedup", "inf"), "--speedup"),
    ("speedup-unreachable", lambda ws: _dec(ws, "--speedup", "1000"), "cannot be reached"),
    ("two-policies", lambda ws: _dec(ws, "--rank", "4", "--energy", "0.9"), "--energy"),
    ("include-bad-regex", lambda ws: _dec(ws, "--include", "conv(1"), "regular expression"),
    ("exclude-bad-regex", lambda ws: _dec(ws, "--exclude", "[a-"), "regular expression"),
    ("rank-multiple-0", lambda ws: _dec(ws, "--rank-multiple", "0"), "--rank-multiple"),
    ("input-shape-malformed", lambda ws: _dec(ws, "--input-shape", "input=1,three"), "--input-shape"),
    ("missing-output-argument", lambda ws: ["decompose", str(ws.model)], "required"),
    # the ranks file
    ("ranks-file-missing", lambda ws: _dec(ws, "--ranks", str(ws.inp / "absent.json")), "no such ranks file"),
    ("ranks-not-json", lambda ws: _ranks(ws, "conv1_1: 4\n"), "not a json"),
    ("ranks-file-is-a-directory", lambda ws: _dec(ws, "--ranks", str(_mkdir(ws, "ranks.json"))), "ranks"),
    ("ranks-not-an-object", lambda ws: _ranks(ws, "[4, 8]"), "json object"),
    ("ranks-unknown-node", lambda ws: _ranks(ws, '{"conv1_1": 4, "no_such_layer": 8}'), "no_such_layer"),
    ("ranks-rank-0", lambda ws: _ranks(ws, '{"conv1_1": 0}'), "rank 0"),
    ("ranks-rank-not-whole", lambda ws: _ranks(ws, '{"conv1_1": 2.5}'), "2.5"),
    # the report
    ("report-folder-missing", lambda ws: _dec(ws, "--rank", "2", "--report", str(ws.out / "absent" / "report.json")), "report folder"),
    ("report-is-input", lambda ws: _dec(ws, "--rank", "2", "--report", str(ws.model)), "input model"),
    ("report-is-output", lambda ws: _dec(ws, "--rank", "2", "--report", str(ws.target)), "output model"),
    ("report-is-ranks-file", lambda ws: [*_ranks(ws, '{"conv3_2": 8}'), "--report", str(ws.inp / "ranks.json")], "ranks file"),
    ("report-is-a-directory", lambda ws: _dec(ws, "--rank", "2", "--report", str(ws.out)), "directory"),
    # calibration data: checked before any work, one line naming the input
    ("calibration-missing", lambda ws: _dec(ws, "--calibration", str(ws.inp / "absent.npz")), "no such calibration file"),
    ("calibration-lacks-input", lambda ws: _cal(ws, image=np.zeros((4, 3, 64, 64), np.float32)), "lacks model input 'input'"),
    ("calibration-wrong-shape", lambda ws: _cal(ws, input=np.zeros((4, 3, 32, 32), np.float32)), "'input' has shape (4, 3, 32, 32)"),
    ("calibration-wrong-rank", lambda ws: _cal(ws, input=np.zeros((4, 64, 64), np.float32)), "'input' has shape"),
    ("calibration-complex", lambda ws: _cal(ws, input=np.zeros((4, 3, 64, 64), np.complex64)), "'input' has dtype complex64"),
    ("calibration-strings", lambda ws: _cal(ws, input=np.full((4, 3, 64, 64), "a")), "'input' has dtype <U1"),
    ("calibration-nan", lambda ws: _cal(ws, input=np.full((4, 3, 64, 64), np.nan, np.float32)), "'input' holds nan"),
    ("calibration-no-samples", lambda ws: _cal(ws, input=np.zeros((0, 3, 64, 64), np.float32)), "'input' has no samples"),
    ("calibration-fewer-than-a-batch", _fixed_batch_calibration, "'x' has 2 samples, fewer than the model's fixed batch of 4"),
    ("calibration-not-npz", lambda ws: _dec(ws, "--calibration", str(ws.write("c.npz", "not an archive"))), "not a readable .npz"),
    ("sensitivity-without-budget", lambda ws: _dec(ws, "--rank", "2", "--sensitivity", "--calibration", str(ws.model)), "needs --speedup"),
    ("refit-without-calibration", lambda ws: _dec(ws, "--refit"), "--refit needs --calibration"),
    ("positions-without-calibration", lambda ws: _dec(ws, "--positions", "64"), "--positions needs --calibration"),
    ("positions-negative", lambda ws: _dec(ws, "--positions", "-1", "--calibration", str(ws.model)), "whole number >= 0"),
    ("calibration-batch-zero", lambda ws: _dec(ws, "--calibration-batch", "0", "--calibration", str(ws.model)), "whole number >= 1"),
    (
        "calibration-and-input-shape-differ",
        lambda ws: [*_cal(ws, input=np.zeros((4, 3, 64, 64), np.float32)), "--input-shape", "input=1,3,32,32"],
        "differs from the calibration data",
    ),
    # the sample: one input set, checked before any work, one line naming the input
    ("sample-missing", lambda ws: _dec(ws, "--sample", str(ws.inp / "absent.npz")), "no such sample file"),
    ("sample-lacks-input", lambda ws: _sample(ws, image=np.zeros((1, 3, 64, 64), np.float32)), "lacks model input 'input'"),
    (
        "sample-extra-array",
        lambda ws: _sample(ws, input=np.zeros((1, 3, 64, 64), np.float32), labels=np.zeros(1, np.int64)),
        "holds 'labels', not an input of the model",
    ),
    ("sample-batch-axis", lambda ws: _sample(ws, input=np.zeros((1, 1, 3, 64, 64), np.float32)), "without a sample axis"),
    ("sample-wrong-shape", lambda ws: _sample(ws, input=np.zeros((1, 3, 32, 32), np.float32)), "the model expects (batch, 3, 64, 64)"),
    ("sample-wrong-rank", lambda ws: _sample(ws, input=np.zeros((3, 64, 64), np.float32)), "'input' has shape (3, 64, 64)"),
    ("sample-strings", lambda ws: _sample(ws, input=np.full((1, 3, 64, 64), "a")), "'input' has dtype <U1"),
    ("sample-complex", lambda ws: _sample(ws, input=np.zeros((1, 3, 64, 64), np.complex64)), "'input' has dtype complex64"),
    ("sample-nan", lambda ws: _sample(ws, input=np.full((1, 3, 64, 64), np.nan, np.float32)), "'input' holds nan"),
    ("sample-huge-header", _huge_sample, "declares shape (1099511627776, 3, 64, 64)"),
    ("sample-not-npz", lambda ws: _dec(ws, "--sample", str(ws.write("s.npz", "not an archive"))), "not a readable .npz"),
    (
        "sample-is-output",
        lambda ws: [
            "decompose",
            str(ws.model),
            str(ws.npz("s.npz", input=np.zeros((1, 3, 64, 64), np.float32))),
            "--sample",
            str(ws.inp / "s.npz"),
        ],
        "sample file",
    ),
    (
        "sample-and-input-shape-differ",
        lambda ws: _sample(ws, "--input-shape", "input=2,3,64,64", input=np.zeros((1, 3, 64, 64), np.float32)),
        "differs from the sample",
    ),
    (
        "sample-twice-without-branches",
        lambda ws: _dec(
            ws, "--sample", str(ws.npz("a.npz", input=np.zeros((1, 3, 64, 64), np.float32))), "--sample", str(ws.inp / "a.npz")
        ),
        "--branches all",
    ),
    ("branches-unknown", lambda ws: _dec(ws, "--branches", "some"), "--branches"),
    ("branches-all-by-latency", lambda ws: _dec(ws, "--branches", "all", "--by", "latency"), "--by latency"),
    (
        "sweep-sample-lacks-input",
        lambda ws: _sweep(ws, "--sample", str(ws.npz("s.npz", image=np.zeros((1, 3, 64, 64))))),
        "lacks model input",
    ),
    ("inspect-sample-missing", lambda ws: ["inspect", str(ws.model), "--sample", str(ws.inp / "absent.npz")], "no such sample file"),
    (
        "verify-sample-and-inputs",
        lambda ws: _verify(
            ws, "--sample", str(ws.npz("s.npz", input=np.zeros((1, 3, 64, 64), np.float32))), "--inputs", str(ws.inp / "s.npz")
        ),
        "--inputs and --sample",
    ),
    (
        "verify-sample-batch-axis",
        lambda ws: _verify(ws, "--sample", str(ws.npz("s.npz", input=np.zeros((2, 1, 3, 64, 64), np.float32)))),
        "without a sample axis",
    ),
    # verify
    ("verify-missing-candidate", lambda ws: ["verify", str(ws.model), str(ws.inp / "absent.onnx")], "no such file"),
    (
        "verify-truncated-candidate",
        lambda ws: ["verify", str(ws.model), str(ws.write("half.onnx", VGG.read_bytes()[:100_000]))],
        "onnx model",
    ),
    ("verify-inputs-missing", lambda ws: _verify(ws, "--inputs", str(ws.inp / "absent.npz")), "no such inputs file"),
    ("verify-inputs-text", lambda ws: _verify(ws, "--inputs", str(ws.write("inputs.npz", "input = zeros\n"))), "npz"),
    ("verify-inputs-empty", lambda ws: _verify(ws, "--inputs", str(ws.write("inputs.npz", b""))), "npz"),
    ("verify-inputs-truncated", _truncated_npz, "npz"),
    ("verify-inputs-npy-not-npz", _npy, "npz"),
    (
        "verify-inputs-lack-input",
        lambda ws: _verify(ws, "--inputs", str(ws.npz("x.npz", image=np.zeros((1, 3, 64, 64), np.float32)))),
        "input",
    ),
    (
        "verify-inputs-wrong-shape",
        lambda ws: _verify(ws, "--inputs", str(ws.npz("x.npz", input=np.zeros((1, 3, 5, 5), np.float32)))),
        "the model expects (batch, 3, 64, 64)",
    ),
    ("verify-unavailable-provider", lambda ws: _verify(ws, "--providers", "XnnpackExecutionProvider"), "XnnpackExecutionProvider"),
    ("verify-rtol-nan", lambda ws: _verify(ws, "--rtol", "nan"), "--rtol"),
    ("verify-atol-negative", lambda ws: _verify(ws, "--atol", "-1"), "--atol"),
    ("verify-profile-without-runs", lambda ws: _verify(ws, "--profile", "--runs", "0"), "--profile"),
    # sweep and the HTML reports
    ("sweep-speedups-not-numbers", lambda ws: _sweep(ws, "--speedups", "1.5,fast"), "--speedups"),
    ("sweep-speedups-below-1", lambda ws: _sweep(ws, "--speedups", "2,0.5"), "--speedups"),
    ("sweep-html-folder-missing", lambda ws: _sweep(ws, "--html", str(ws.out / "absent" / "report.html")), "does not exist"),
    ("sweep-html-is-input", lambda ws: _sweep(ws, "--html", str(ws.model)), "input model"),
    ("sweep-save-dir-missing", lambda ws: _sweep(ws, "--save-dir", str(ws.out / "absent")), "--save-dir"),
    (
        "sweep-eval-inputs-lack-input",
        lambda ws: _sweep(ws, "--eval-inputs", str(ws.npz("x.npz", image=np.zeros((1, 3, 64, 64), np.float32)))),
        "eval inputs file lacks model input",
    ),
    (
        "sweep-eval-inputs-wrong-shape",
        lambda ws: _sweep(
            ws, "--eval-inputs", str(ws.npz("x.npz", input=np.zeros((1, 3, 5, 5), np.float32))), "--html", str(ws.out / "r.html")
        ),
        "the model expects",
    ),
    (
        "sweep-eval-labels-wrong-count",
        lambda ws: _sweep(
            ws, "--eval-inputs", str(ws.npz("x.npz", input=np.zeros((2, 3, 64, 64), np.float32), labels=np.zeros(5, np.int64)))
        ),
        "labels",
    ),
    ("decompose-html-folder-missing", lambda ws: _dec(ws, "--html", str(ws.out / "absent" / "report.html")), "does not exist"),
    ("decompose-html-is-report", lambda ws: _dec(ws, "--report", str(ws.out / "r.json"), "--html", str(ws.out / "r.json")), "report"),
    # inspect
    ("inspect-missing-file", lambda ws: ["inspect", str(ws.inp / "absent.onnx")], "no such file"),
    ("inspect-random-bytes", lambda ws: ["inspect", str(ws.write("random.onnx", RNG_BYTES))], "onnx model"),
]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    """A fresh workspace with a copy of the shipped VGG model as input."""
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    model = inp / "model.onnx"
    shutil.copyfile(VGG, model)
    return Workspace(tmp_path, inp, out, model)


@pytest.mark.parametrize(
    ("make_argv", "keyword"),
    [pytest.param(f, k, id=i, marks=[SKIP_AS_ROOT] if i == "unreadable-chmod-000" else []) for i, f, k in BAD],
)
def test_bad_input(ws: Workspace, make_argv: Callable[[Workspace], list[str]], keyword: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback, input untouched, nothing written."""
    check_bad_input(ws, make_argv, keyword)


@pytest.mark.parametrize(
    ("make_argv", "keyword"),
    [pytest.param(f, k, id=i) for i, f, k in BAD if i in ("missing-file", "energy-1.5", "verify-unavailable-provider")],
)
def test_bad_input_installed_script(ws: Workspace, make_argv: Callable[[Workspace], list[str]], keyword: str) -> None:
    """The installed console script reports bad input the same way as ``python -m onnx_lowrank``."""
    check_bad_input(ws, make_argv, keyword, installed=True)


def check_bad_input(ws: Workspace, make_argv: Callable[[Workspace], list[str]], keyword: str, installed: bool = False) -> None:
    """Run a bad command line and check the failure is clean (see the module docstring)."""
    argv = make_argv(ws)
    before = snapshot(ws.root)
    proc = cli(*argv, installed=installed)
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("onnx-lowrank: error: ") and lines[0].removeprefix("onnx-lowrank: error: ").strip()
    assert keyword.lower() in lines[0].lower(), lines[0]
    assert proc.stdout == ""
    assert sha256(ws.model) == VGG_SHA
    assert snapshot(ws.root) == before  # no output, no temp file or folder, nothing changed


def test_version() -> None:
    """--version prints the package version and exits 0."""
    proc = cli("--version", installed=True)
    assert_ok(proc)
    assert proc.stdout.strip() == f"onnx-lowrank {onnx_lowrank.__version__}"


# --------------------------------------------------------------------------- atomic writes


def _partial_then_fail(model: onnx.ModelProto, f: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
    """Stand-in for ``onnx.save_model``: half the bytes reach the disk, then the disk is full."""
    data = model.SerializeToString()
    Path(f).write_bytes(data[: len(data) // 2])
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("external", [False, True], ids=["single-file", "external-data"])
def test_failed_save_leaves_nothing(
    ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], external: bool
) -> None:
    """A save that fails mid-way: exit 2, one line, no output or temp file, input untouched."""
    monkeypatch.setattr(onnx, "save_model", _partial_then_fail)  # the external-data writer
    monkeypatch.setattr(onnx_lowrank.model_io, "write_model", _partial_then_fail)  # the single-file writer
    report = ws.out / "report.json"
    argv = ["decompose", str(ws.model), str(ws.target), "--rank", "2", "--report", str(report)]
    code = onnx_lowrank.cli.main([*argv, "--external-data"] if external else argv)
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], captured.err
    assert "cannot write" in lines[0]
    assert list(ws.out.iterdir()) == []
    assert sorted(p.name for p in ws.inp.iterdir()) == ["model.onnx"]
    assert sha256(ws.model) == VGG_SHA


def test_failed_final_rename_leaves_nothing(ws: Workspace, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """With external data, a failure at the last step (renaming the model into place) leaves no stray .data file."""
    real_replace = os.replace

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == ws.target:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    code = onnx_lowrank.cli.main(["decompose", str(ws.model), str(ws.target), "--rank", "2", "--external-data"])
    captured = capsys.readouterr()
    assert code == 2
    assert len(captured.err.splitlines()) == 1 and "Input/output error" in captured.err
    assert list(ws.out.iterdir()) == []
    assert sha256(ws.model) == VGG_SHA


# --------------------------------------------------------------------------- happy paths


def tensor_params(model: onnx.ModelProto) -> int:
    """Elements of every initializer and Constant tensor of the main graph."""
    total = sum(math.prod(t.dims) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            total += sum(math.prod(a.t.dims) for a in node.attribute if a.name == "value")
    return total


def vgg_input(batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random images for the VGG model."""
    return {"input": np.random.default_rng(seed).standard_normal((batch, 3, 64, 64)).astype(np.float32)}


def parse_count(text: str) -> float:
    """``79.63M`` -> 79.63e6 (the CLI's short counts)."""
    scale = {"G": 1e9, "M": 1e6, "k": 1e3}
    return float(text[:-1]) * scale[text[-1]] if text[-1] in scale else float(text)


def check_report(report: dict[str, Any], out: onnx.ModelProto, stdout: str) -> None:
    """The report's fields, against the input and output graphs and the printed totals."""
    assert {"macs_before", "macs_after", "params_before", "params_after", "layers"} <= set(report)
    layers = report["layers"]
    assert [layer["node"] for layer in layers] == VGG_LAYERS
    original = {n.name: n for n in onnx.load(VGG).graph.node}
    nodes = {n.name: n for n in out.graph.node}
    shapes = {init.name: list(init.dims) for init in out.graph.initializer}
    for layer in layers:
        assert set(layer) >= LAYER_FIELDS, sorted(LAYER_FIELDS - set(layer))
        old = original[layer["node"]]
        if layer["decomposed"]:
            assert layer["reason"] is None
            first, second = nodes[layer["vertical_node"]], nodes[layer["horizontal_node"]]
            assert first.op_type == second.op_type == old.op_type
            assert first.input[0] == old.input[0] and second.input[0] == first.output[0]
            assert list(second.output) == list(old.output)  # consumers and graph outputs untouched
            assert layer["node"] not in nodes
            assert 1 <= layer["rank"] <= layer["full_rank"]
            assert 0.0 <= layer["relative_error"] < 1.0
            assert layer["macs_after"] < layer["macs_before"]
            assert shapes[first.input[1]][0] == layer["rank"] and shapes[second.input[1]][1] == layer["rank"]
            if old.op_type == "Conv":  # spatial: (3x1, 1x3); channel: (3x3, 1x1)
                expected = ([3, 1], [1, 3]) if layer["kind"] == "spatial" else ([3, 3], [1, 1])
                assert (shapes[first.input[1]][2:], shapes[second.input[1]][2:]) == expected
        else:
            assert isinstance(layer["reason"], str) and layer["reason"].strip()
            assert layer["vertical_node"] is None and layer["horizontal_node"] is None
            assert layer["macs_after"] == layer["macs_before"]
            assert nodes[layer["node"]] == old
    assert report["macs_before"] == sum(layer["macs_before"] for layer in layers)
    assert report["macs_after"] == sum(layer["macs_after"] for layer in layers)
    assert report["params_before"] == tensor_params(onnx.load(VGG))
    assert report["params_after"] == tensor_params(out)
    # the printed table: one row per layer, then the totals
    for name in VGG_LAYERS:
        assert re.search(rf"^{name}\s", stdout, re.MULTILINE), name
    totals = re.search(r"decomposed (\d+) of (\d+) (?:conv )?layers; (?:Conv )?MACs (\S+) -> (\S+) .*parameters (\S+) -> ([^\s;]+)", stdout)
    assert totals, stdout
    assert int(totals[1]) == sum(bool(layer["decomposed"]) for layer in layers)
    assert int(totals[2]) == len(layers)
    for group, key in ((3, "macs_before"), (4, "macs_after"), (5, "params_before"), (6, "params_after")):
        assert parse_count(totals[group]) == pytest.approx(report[key], rel=0.01)


def _ranks_policy(tmp: Path) -> list[str]:
    path = tmp / "ranks.json"
    path.write_text(json.dumps({"conv3_2": 8, "conv4_2": 16, "conv5_1": 32}))
    return ["--ranks", str(path)]


POLICIES: dict[str, Callable[[Path], list[str]]] = {
    "rank": lambda tmp: ["--rank", "4"],
    "energy": lambda tmp: ["--energy", "0.5"],
    "speedup": lambda tmp: ["--speedup", "2", "--by", "macs"],
    "ranks": _ranks_policy,
    "default-by-macs": lambda tmp: ["--by", "macs"],
}


@pytest.mark.parametrize("policy", POLICIES)
def test_decompose_policy(tmp_path: Path, policy: str) -> None:
    """Each policy writes a valid, runnable model and a report that matches it."""
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = cli("decompose", VGG, out, *POLICIES[policy](tmp_path), "--report", report_path)
    assert_ok(proc)
    assert f"wrote {out}" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out.onnx", "report.json", *(["ranks.json"] if policy == "ranks" else [])])
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    (logits,) = run(model, vgg_input())
    assert logits.shape == (1, 100) and np.all(np.isfinite(logits))
    report = json.loads(report_path.read_text())
    check_report(report, model, proc.stdout)
    decomposed = {layer["node"]: layer for layer in report["layers"] if layer["decomposed"]}
    assert decomposed, "the policy decomposed nothing"
    if policy == "rank":
        assert all(layer["rank"] == 4 for layer in decomposed.values())
    elif policy == "energy":  # kept energy >= 0.5: relative Frobenius error <= sqrt(0.5)
        assert all(layer["relative_error"] <= math.sqrt(0.5) + 1e-5 for layer in decomposed.values())
    elif policy in ("speedup", "default-by-macs"):
        assert report["macs_before"] / report["macs_after"] >= 2.0 * (1 - 1e-9)
    else:
        assert {k: v["rank"] for k, v in decomposed.items()} == {"conv3_2": 8, "conv4_2": 16, "conv5_1": 32}
        assert all(layer["reason"] for layer in report["layers"] if layer["node"] not in decomposed)


def test_decompose_include_exclude_report_reasons(tmp_path: Path) -> None:
    """--include/--exclude pick the layers; the others are reported with their reason."""
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    proc = cli("decompose", VGG, out, "--rank", "8", "--include", "^conv[45]_", "--exclude", "_3$", "--report", report_path)
    assert_ok(proc)
    report = json.loads(report_path.read_text())
    check_report(report, onnx.load(out), proc.stdout)
    by_node = {layer["node"]: layer for layer in report["layers"]}
    assert sorted(k for k, v in by_node.items() if v["decomposed"]) == ["conv4_1", "conv4_2", "conv5_1", "conv5_2"]
    assert "--include" in by_node["conv1_1"]["reason"]
    assert "--exclude" in by_node["conv4_3"]["reason"]
    assert "skipped: matched by --exclude" in proc.stdout


def test_decompose_external_data_and_quiet(tmp_path: Path) -> None:
    """--external-data writes OUTPUT.data beside the model; --quiet prints only the totals (run as ``python -m``)."""
    out = tmp_path / "out.onnx"
    proc = cli("decompose", VGG, out, "--rank", "4", "--external-data", "--quiet", process=True)  # the process boundary too
    assert_ok(proc)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    assert "conv1_1" not in proc.stdout
    assert re.search(rf"^decomposed {len(VGG_LAYERS)} of {len(VGG_LAYERS)} (conv )?layers;", proc.stdout, re.MULTILINE)
    onnx.checker.check_model(str(out), full_check=True)
    (logits,) = run(onnx.load(out), vgg_input())
    assert logits.shape == (1, 100)


def test_decompose_verify(tmp_path: Path) -> None:
    """`decompose --verify` prints the error statistics and the latency."""
    proc = cli("decompose", VGG, tmp_path / "out.onnx", "--rank", "8", "--verify")
    assert_ok(proc)
    for label in ("max abs", "max rel", "mean abs", "p99 abs", "rel L2", "cosine"):
        assert label in proc.stdout, label
    assert re.search(
        r"latency \(median of \d+ interleaved runs, CPUExecutionProvider\): original [\d.]+ ms, candidate [\d.]+ ms", proc.stdout
    )
    assert re.search(r"^logits\s+1x100\s", proc.stdout, re.MULTILINE)


def test_unknown_input_size(tmp_path: Path) -> None:
    """Symbolic H/W: a warning line; --input-shape sizes the plan and the --verify inputs."""
    src = tmp_path / "symbolic.onnx"
    onnx.save(conv_model(n=8, c=6, input_shape=("n", 6, "h", "w")), src)
    plain = cli("decompose", src, tmp_path / "a.onnx", "--rank", "2")
    assert_ok(plain)
    assert re.search(r"^warning: 1 layer\(s\) have an input of unknown size .*--input-shape x=1,6,H,W", plain.stdout, re.MULTILINE)
    sized = cli("decompose", src, tmp_path / "b.onnx", "--rank", "2", "--input-shape", "x=1,6,20,20", "--verify")
    assert_ok(sized)
    assert "warning" not in sized.stdout and re.search(r"^y\s+1x8x18x18\s", sized.stdout, re.MULTILINE)
    for extra, warned in (([], True), (["--input-shape", "x=1,6,20,20"], False)):
        inspected = cli("inspect", src, *extra)
        assert_ok(inspected)
        assert ("warning: 1 layer(s) have an input of unknown size" in inspected.stdout) == warned


INSPECT_CELL = re.compile(r"(\d+)/(\d+) \((\d+\.\d+)x\)")


def test_inspect_text_and_json() -> None:
    """Text and JSON list every conv with its ranks at 90/99/99.9 % energy, and agree."""
    text = cli("inspect", VGG)
    assert_ok(text)
    for header in ("90% energy", "99% energy", "99.9% energy"):
        assert header in text.stdout
    as_json = cli("inspect", VGG, "--json", installed=True)
    assert_ok(as_json)
    layers = json.loads(as_json.stdout)
    assert [layer["node"] for layer in layers] == VGG_LAYERS
    for layer in layers:
        assert layer["eligible"] is True and layer["reason"] is None
        assert set(layer["energy_ranks"]) == {"0.9", "0.99", "0.999"}
        ranks = [layer["energy_ranks"][e][0] for e in ("0.9", "0.99", "0.999")]
        assert 1 <= ranks[0] <= ranks[1] <= ranks[2] <= layer["full_rank"]
        row = next(line for line in text.stdout.splitlines() if line.startswith(layer["node"] + " "))
        cells = INSPECT_CELL.findall(row)
        assert [int(c[0]) for c in cells] == ranks
        assert all(int(c[1]) == layer["full_rank"] for c in cells)
    assert re.search(rf"^{len(VGG_LAYERS)} (conv )?layers, [\d.]+M (Conv )?MACs$", text.stdout, re.MULTILINE)


@pytest.fixture(scope="module")
def decomposed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The VGG model at rank 1 and at full rank (forced), written once for the verify tests."""
    folder = tmp_path_factory.mktemp("decomposed")
    made = {"rank1": folder / "rank1.onnx", "full": folder / "full.onnx"}
    assert_ok(cli("decompose", VGG, made["rank1"], "--rank", "1", "--quiet"))
    assert_ok(cli("decompose", VGG, made["full"], "--rank", "100000", "--force", "--quiet"))
    return made


def test_verify_self() -> None:
    """A model against itself: exit 0, zero error, every statistic printed."""
    proc = cli("verify", VGG, VGG, "--runs", "3")
    assert_ok(proc)
    for label in ("max abs", "max rel", "mean abs", "p99 abs", "rel L2", "cosine", "req. atol", "PASS", "outputs match", "latency"):
        assert label in proc.stdout, label
    row = re.search(r"^logits\s+1x100\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", proc.stdout, re.MULTILINE)
    assert row and [float(v) for v in row.groups()] == [0, 0, 0, 0, 0, 1.0]


def test_verify_self_json() -> None:
    """--json prints one parseable object with the statistics."""
    proc = cli("verify", VGG, VGG, "--runs", "2", "--json")
    assert_ok(proc)
    data = json.loads(proc.stdout)
    assert data["passed"] is True and data["providers"] == ["CPUExecutionProvider"]
    (out,) = data["outputs"]
    assert out["name"] == "logits" and out["shape"] == [1, 100]
    assert out["max_abs"] == 0.0 and out["p99_abs"] == 0.0 and out["cosine"] == pytest.approx(1.0)
    assert data["original_ms"] > 0 and data["candidate_ms"] > 0 and data["runs"] == 2


def test_verify_profile(decomposed: dict[str, Path]) -> None:
    """--profile adds each operator type's kernel time in both models, the class totals and their ratios."""
    proc = cli("verify", VGG, decomposed["rank1"], "--runs", "3", "--profile")
    assert_ok(proc, code=1)
    _, _, table = proc.stdout.partition("kernel time per run")
    assert table, proc.stdout
    rows = {m[1]: (float(m[2]), float(m[3])) for m in re.finditer(r"^(\w[\w ]*?)\s{2,}([\d.]+)\s+([\d.]+)\s", table, re.MULTILINE)}
    classes = ("conv kernels", "fully connected kernels", "other kernels", "all")
    assert all(label in rows for label in classes) and "Conv" in rows
    assert rows["conv kernels"][0] > 0 and rows["conv kernels"][1] > 0
    for side in (0, 1):  # every operator type is counted once in "all"
        assert rows["all"][side] == pytest.approx(sum(v[side] for k, v in rows.items() if k not in classes), abs=0.01)
    as_json = cli("verify", VGG, decomposed["rank1"], "--runs", "2", "--profile", "--json")
    kernels = json.loads(as_json.stdout)["kernels"]
    assert set(kernels) == {"original", "candidate"} and kernels["original"] and all(v >= 0 for v in kernels["candidate"].values())


def test_verify_full_rank_passes(decomposed: dict[str, Path]) -> None:
    """The forced full-rank decomposition computes the same function: passes at rtol 1e-4."""
    proc = cli("verify", VGG, decomposed["full"], "--rtol", "1e-4", "--runs", "2")
    assert_ok(proc)
    assert "outputs match" in proc.stdout and "FAIL" not in proc.stdout


def test_verify_rank_1_differs(decomposed: dict[str, Path]) -> None:
    """Rank 1 everywhere changes the outputs: exit 1, FAIL, no error line."""
    proc = cli("verify", VGG, decomposed["rank1"], "--runs", "0", installed=True)
    assert_ok(proc, code=1)
    assert "outputs DIFFER beyond tolerance" in proc.stdout and "FAIL" in proc.stdout
    assert "latency" not in proc.stdout  # --runs 0 skips timing
    as_json = cli("verify", VGG, decomposed["rank1"], "--runs", "0", "--json")
    assert_ok(as_json, code=1)
    data = json.loads(as_json.stdout)
    assert data["passed"] is False and data["outputs"][0]["max_abs"] > 1e-3


def test_verify_inputs_with_labels(tmp_path: Path, decomposed: dict[str, Path]) -> None:
    """An .npz with inputs and labels gives accuracy and top-1 agreement."""
    feeds = vgg_input(batch=6, seed=3)
    (logits,) = run(onnx.load(VGG), feeds)
    labels = logits.argmax(axis=1)  # the original is right on every sample by construction
    npz = tmp_path / "samples.npz"
    np.savez(npz, input=feeds["input"], labels=labels)
    proc = cli("verify", VGG, decomposed["rank1"], "--inputs", npz, "--runs", "0")
    assert_ok(proc, code=1)
    assert re.search(r"logits: top-1 agreement [\d.]+% over 6 samples; accuracy original 100\.00%, candidate [\d.]+%", proc.stdout), (
        proc.stdout
    )
    as_json = cli("verify", VGG, decomposed["rank1"], "--inputs", npz, "--runs", "0", "--json")
    assert_ok(as_json, code=1)
    data = json.loads(as_json.stdout)
    (out,) = data["outputs"]
    assert data["samples"] == 6 and out["shape"] == [6, 100]
    assert out["accuracy_original"] == 1.0
    (rank1_logits,) = run(onnx.load(decomposed["rank1"]), feeds)
    agreement = float(np.mean(rank1_logits.argmax(axis=1) == labels))
    assert out["top1_agreement"] == pytest.approx(agreement)
    assert out["accuracy_candidate"] == pytest.approx(agreement)  # labels are the original's choices


# --------------------------------------------------------------------------- sweep and HTML reports

DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"


def test_sweep_json_html_and_models(tmp_path: Path) -> None:
    """`sweep --json` prints only the rows (one per target, the unreachable one with its reason); --html and
    --save-dir write the page and one model per reached target, with plain file modes."""
    page, models = tmp_path / "sweep.html", tmp_path / "models"
    models.mkdir()
    before = sha256(DIGITS)
    proc = cli(
        "sweep",
        DIGITS,
        "--speedups",
        "2,1.5,1000",
        "--eval-inputs",
        DIGITS_TEST,
        "--runs",
        "2",
        "--by",
        "macs",
        "--json",
        "--html",
        page,
        "--save-dir",
        models,
    )
    assert_ok(proc)
    data = json.loads(proc.stdout)
    rows = data["rows"]
    assert [row["target"] for row in rows] == [1.5, 2.0, 1000.0]
    for row in rows[:2]:
        assert row["reached"] and row["mac_ratio"] >= row["target"]
        assert row["latency_ratio"] > 0 and row["accuracy"] is not None and row["top1_agreement"] is not None
    assert not rows[2]["reached"] and "cannot be reached" in rows[2]["reason"]
    assert data["labelled"] and data["samples"] == 450
    assert sorted(p.name for p in models.iterdir()) == ["digits_cnn-x1.5.onnx", "digits_cnn-x2.onnx"]
    umask = os.umask(0)
    os.umask(umask)
    for path in [page, *models.iterdir()]:
        assert (path.stat().st_mode & 0o777) == 0o666 & ~umask, path
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "not reached" in text
    assert sha256(DIGITS) == before


def test_sweep_table(tmp_path: Path) -> None:
    """The printed table: one row per target with its MAC ratio, measured speedup and accuracy; no file written."""
    proc = cli("sweep", DIGITS, "--speedups", "1.5,3", "--eval-inputs", DIGITS_TEST, "--runs", "2", "--by", "macs")
    assert_ok(proc)
    for target in ("1.5x", "3x"):
        row = rf"^{re.escape(target)}\s+macs\s+[\d.]+x\s+[\d.]+x(?: \([\d.]+-[\d.]+\))?\s+[\d.]+ -> [\d.]+\s"
        assert re.search(row, proc.stdout, re.MULTILINE), proc.stdout
    assert "original accuracy" in proc.stdout and "accuracy" in proc.stdout.splitlines()[0]
    assert "wrote" not in proc.stdout


def test_decompose_html(tmp_path: Path) -> None:
    """`decompose --html` writes the page beside the model; without --verify it still shows the output error."""
    page = tmp_path / "report.html"
    proc = cli("decompose", DIGITS, tmp_path / "out.onnx", "--by", "macs", "--html", page)
    assert_ok(proc)
    assert f"wrote {page}" in proc.stdout
    text = page.read_text()
    assert "Output error statistics" in text and "Spectra and chosen ranks" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "report.html"]


def test_calibration_tuning_flags_reach_the_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--positions and --calibration-batch are what the statistics pass is given (0 positions: all of them)."""
    import onnx_lowrank.calibration as calibration

    seen: list[Any] = []
    plan = calibration.data_aware_plan

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[3])
        return plan(*args, **kwargs)

    monkeypatch.setattr(calibration, "data_aware_plan", recording)
    digits = ROOT / "models" / "digits_cnn.onnx"
    data = ROOT / "models" / "digits_calibration.npz"
    for flags, positions, batch in ((["--positions", "32", "--calibration-batch", "16"], 32, 16), (["--positions", "0"], None, 64)):
        argv = ["decompose", str(digits), str(tmp_path / "out.onnx"), "--speedup", "2", "--by", "macs", "--calibration", str(data)]
        assert onnx_lowrank.cli.main([*argv, "--check-runs", "0", "--quiet", *flags]) == 0
        assert seen[-1].positions == positions and seen[-1].batch_size == batch
