"""The fine-tune as a step of the conversion: ``decompose(..., finetune=True)`` and ``decompose --finetune``.

What it trains on (the calibration samples, never those held back to measure the answers), what it may change
(the trained initializers' values alone: every other byte as converted), the same file from the same inputs,
the report's entry and the summary's lines, and the refusals: no calibration data, no torch, tuning flags
without ``--finetune``. The models are tiny and the fine-tunes a few steps long.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from builders import run, tiny_cnn
from cli_contract import run_cli

from onnx_lowrank import decompose
from onnx_lowrank.calibration import hold_back
from onnx_lowrank.cli import progress as progress_module
from onnx_lowrank.cli.progress import ProgressBar
from onnx_lowrank.config import FINETUNE_MINUTES, FINETUNE_STEPS, DecomposeConfig, FinetuneConfig
from onnx_lowrank.errors import LowRankError

EXTRA = "pip install 'onnx-lowrank[finetune]'"
needs_torch = pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the fine-tune needs torch (the finetune extra)")


def calibration(count: int = 48, seed: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((count, 3, 8, 8)).astype(np.float32)}


# a few steps of a tiny fine-tune: rank 1 leaves much to recover, the large step makes each step count
CONVERSION: dict[str, Any] = dict(rank=1, include="conv", kinds=["spatial"], check_runs=0, threads=1)


def options() -> Any:
    from onnx_lowrank.finetune import FinetuneOptions

    return FinetuneOptions(lr=1e-2, batch_size=8, eval_every=2, warmup=0)


def tuned(**extra: Any) -> tuple[onnx.ModelProto, Any]:
    keywords = {**CONVERSION, "calibration": calibration(), "finetune": True, "finetune_steps": 6, "finetune_options": options()}
    return decompose(tiny_cnn(), **{**keywords, **extra})


def initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: t.SerializeToString() for t in model.graph.initializer}


# --------------------------------------------------------------------------- what a fine-tune of a conversion changes


@needs_torch
def test_only_the_trained_initializers_change_and_the_report_says_what_ran() -> None:
    plain, _ = decompose(tiny_cnn(), **CONVERSION, calibration=calibration())
    new, report = tuned()
    entry = report.finetune
    assert entry["trainable"] == "factors" and entry["steps"] == 6 and entry["stop_reason"] == "step budget reached"
    before, after = initializers(plain), initializers(new)
    assert list(before) == list(after)
    changed = {name for name in before if before[name] != after[name]}
    assert changed and changed <= set(entry["trained"]) and entry["trained_count"] == len(entry["trained"])
    # the factors and biases of both pairs, nothing of the layers left whole
    assert not {"fc", "fcb"} & set(entry["trained"])
    assert [n.SerializeToString() for n in new.graph.node] == [n.SerializeToString() for n in plain.graph.node]
    for field in ("input", "output", "value_info"):
        assert getattr(new.graph, field) == getattr(plain.graph, field)
    assert new.opset_import == plain.opset_import and new.metadata_props == plain.metadata_props
    # each output's loss and which, the checks with their tolerance, JSON-able
    as_json = json.loads(report.to_json())["finetune"]
    assert as_json["output_losses"]["logits"]["kind"] == "kl"
    assert as_json["write_back"]["max_relative"] <= as_json["write_back"]["tolerance"] == options().tolerance
    assert as_json["equivalence"]["max_relative"] <= as_json["equivalence"]["tolerance"]
    assert as_json["seconds"] > 0 and as_json["trained_elements"] > 0 and as_json["not_trained"] == []


@needs_torch
def test_trains_on_the_calibration_samples_the_answers_are_not_measured_on() -> None:
    data = calibration()
    used, held = hold_back(data, tiny_cnn())
    new, report = tuned()
    entry = report.finetune
    assert entry["samples_train"] + entry["samples_early_stopping"] == len(used["x"]) == 40
    answers = entry["answers"]
    assert answers["samples"] == report.answers["samples"] == len(held["x"]) == 8
    assert answers["after"] == report.answers["outputs"]
    # the answers after the fine-tune are those of the written model on the held-back samples
    (want,) = run(tiny_cnn(), {"x": held["x"]})
    (got,) = run(new, {"x": held["x"]})
    assert answers["after"][0]["value"] == pytest.approx(float(np.mean(got.argmax(1) == want.argmax(1))))
    plain, _ = decompose(tiny_cnn(), **CONVERSION, calibration=data)
    (was,) = run(plain, {"x": held["x"]})
    assert answers["before"][0]["value"] == pytest.approx(float(np.mean(was.argmax(1) == want.argmax(1))))


@needs_torch
def test_same_inputs_same_bytes() -> None:
    first, _ = tuned()
    second, _ = tuned()
    assert first.SerializeToString() == second.SerializeToString()
    other, _ = tuned(finetune_seed=1)
    assert other.SerializeToString() != first.SerializeToString()


@needs_torch
def test_every_float_weight_and_the_feature_term() -> None:
    new, report = tuned(finetune_all=True, finetune_features=True)
    entry = report.finetune
    assert entry["trainable"] == "all" and {"fc", "fcb"} <= set(entry["trained"])
    plain, _ = decompose(tiny_cnn(), **CONVERSION, calibration=calibration())
    assert initializers(new)["fc"] != initializers(plain)["fc"]
    assert entry["options"]["feature_weight"] > 0 and entry["features"]  # the decomposed layers' outputs
    assert {pair[0] for pair in entry["features"]} == {"c1", "c2"}


@needs_torch
def test_nothing_decomposed_nothing_tuned() -> None:
    _, report = decompose(tiny_cnn(), **{**CONVERSION, "include": "nothing"}, calibration=calibration(), finetune=True)
    assert report.finetune == {"trainable": "factors", "skipped": report.finetune["skipped"]}
    assert "no layer was decomposed" in report.finetune["skipped"]


# --------------------------------------------------------------------------- options and refusals


def test_finetune_needs_calibration_data() -> None:
    with pytest.raises(LowRankError, match="--finetune needs --calibration"):
        decompose(tiny_cnn(), **CONVERSION, finetune=True)


def test_tuning_without_finetune_is_refused() -> None:
    for keywords in ({"finetune_all": True}, {"finetune_steps": 5}, {"finetune_minutes": 1.0}, {"finetune_features": True}):
        with pytest.raises(LowRankError, match="needs --finetune"):
            DecomposeConfig.from_keywords(**keywords)  # type: ignore[arg-type]
    for bad in ({"steps": 0}, {"minutes": -1.0}, {"minutes": float("nan")}, {"trainable": "some"}, {"seed": -1}):
        with pytest.raises(LowRankError):
            FinetuneConfig(enabled=True, **bad)


def test_budget_defaults_and_one_bound_alone() -> None:
    assert FinetuneConfig(enabled=True).budget == (FINETUNE_STEPS, FINETUNE_MINUTES)
    assert FinetuneConfig(enabled=True, steps=10).budget == (10, None)
    assert FinetuneConfig(enabled=True, minutes=0.5).budget == (None, 0.5)
    config = DecomposeConfig.from_keywords(calibration="c.npz", finetune=FinetuneConfig(enabled=True, trainable="all"), finetune_steps=3)
    assert config.finetune == FinetuneConfig(enabled=True, trainable="all", steps=3)


def test_without_torch_one_line_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch fails, as where it is not installed
    with pytest.raises(LowRankError) as caught:
        decompose(tiny_cnn(), **CONVERSION, calibration=calibration(), finetune=True)
    assert EXTRA in str(caught.value) and "\n" not in str(caught.value)


def test_cli_refusals_are_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, data = tmp_path / "m.onnx", tmp_path / "cal.npz"
    onnx.save(tiny_cnn(), source)
    np.savez(data, **calibration())
    out = tmp_path / "out.onnx"
    common = [source, out, "--rank", "1", "--check-runs", "0"]
    cases = {
        "--finetune needs --calibration": ["--finetune"],
        "--finetune-all needs --finetune": ["--calibration", data, "--finetune-all"],
        "--finetune-steps needs --finetune": ["--calibration", data, "--finetune-steps", "3"],
        "--finetune-minutes": ["--calibration", data, "--finetune", "--finetune-minutes", "0"],
    }
    for message, flags in cases.items():
        outcome = run_cli(["decompose", *common, *flags])
        assert outcome.code == 2 and message in outcome.error and not outcome.stdout, (flags, outcome.stderr)
        assert not out.exists()
    monkeypatch.setitem(sys.modules, "torch", None)
    outcome = run_cli(["decompose", *common, "--calibration", data, "--finetune"])
    assert outcome.code == 2 and EXTRA in outcome.error and not out.exists()
    from onnx_lowrank.sweep import sweep

    with pytest.raises(LowRankError, match=r"onnx-lowrank\[finetune\]"):
        sweep(tiny_cnn(), [2], calibration=calibration(), finetune=True, runs=0)


@needs_torch
def test_cli_fine_tunes_writes_and_says_so(tmp_path: Path) -> None:
    source, data, out, report = tmp_path / "m.onnx", tmp_path / "cal.npz", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(tiny_cnn(), source)
    np.savez(data, **calibration())
    flags = ["--rank", "1", "--kinds", "spatial", "--check-runs", "0", "--threads", "1", "--calibration", data]
    outcome = run_cli(["decompose", source, out, *flags, "--finetune", "--finetune-steps", "2", "--quiet", "--report", report])
    assert outcome.code == 0, outcome.stderr
    lines = [line for line in outcome.stdout.splitlines() if line.startswith("fine-tune: ")]
    assert len(lines) == 2
    assert lines[0].startswith("fine-tune: 2 steps in ") and "KL on logits" in lines[0]
    assert "trained the decomposed layers' factors and biases" in lines[0]
    assert "answers on 8 held-back samples (never trained on): top-1 agreement" in lines[1] and "(tolerance 0.0001)" in lines[1]
    entry = json.loads(report.read_text())["finetune"]
    assert entry["steps"] == 2 and entry["options"]["steps"] == 2 and entry["options"]["minutes"] is None


def test_progress_bar_draws_the_fine_tune_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without tqdm, one line rewritten in place: the steps and the loss; a time budget alone has no total."""
    err = io.StringIO()
    err.isatty = lambda: True  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(progress_module.ProgressBar, "DELAY", 0.0)
    bar = ProgressBar(True)
    bar(3, 10, "conv1")
    bar(4, 600, "fine-tune loss 0.0123 held-back agree 97.5%")
    bar(5, 0, "fine-tune loss 0.0120")
    bar.close()
    text = err.getvalue()
    assert "analysing layers 3/10" in text
    assert "fine-tune 4/600 loss 0.0123 held-back agree 97.5%" in text and "fine-tune 5 loss 0.0120" in text


# --------------------------------------------------------------------------- sweep --finetune, --max-drop with a fine-tune


def evaluation() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(9).standard_normal((16, 3, 8, 8)).astype(np.float32)}


SWEEP: dict[str, Any] = dict(by="macs", runs=0, rank_multiple=1, threads=1, kinds=["spatial"])


@needs_torch
def test_sweep_fine_tunes_every_target_and_keeps_both_measures(tmp_path: Path) -> None:
    from onnx_lowrank.cli.format import format_sweep
    from onnx_lowrank.finetune import FinetuneOptions
    from onnx_lowrank.html_report import sweep_html
    from onnx_lowrank.sweep import sweep

    slow = FinetuneOptions(lr=1e-3, batch_size=8, eval_every=2, warmup=0)
    plain = sweep(tiny_cnn(), [1.5, 3], calibration=calibration(), eval_inputs=evaluation(), **SWEEP)
    result = sweep(
        tiny_cnn(), [1.5, 3], calibration=calibration(), eval_inputs=evaluation(), save_dir=tmp_path,
        finetune=True, finetune_steps=6, finetune_options=slow, **SWEEP,
    )  # fmt: skip
    (want,) = run(tiny_cnn(), evaluation())
    for row, without in zip(result.rows, plain.rows, strict=True):
        assert row.untuned is not None and row.report is not None and row.report.finetune["steps"] == 6
        # before: the converted model the sweep without a fine-tune measures; after: the model the row saved
        assert row.untuned.relative_l2 == pytest.approx(without.relative_l2)
        assert [a.value for a in row.untuned.answers] == [a.value for a in without.answers]
        assert row.saved is not None
        (got,) = run(onnx.load(row.saved), evaluation())
        assert row.relative_l2 == pytest.approx(float(np.linalg.norm(got - want) / np.linalg.norm(want)), rel=1e-5)
    assert any(r.relative_l2 != r.untuned.relative_l2 for r in result.rows if r.untuned is not None)  # some target gained
    text = format_sweep(result)
    assert "fine-tuned: 2 of 2 targets" in text and " -> " in text
    assert "before → after the fine-tune" in sweep_html(result, plots=False)
    assert json.loads(json.dumps(result.to_dict()))["rows"][0]["untuned"]["answers"]


@needs_torch
def test_max_drop_searches_fine_tuned_conversions() -> None:
    from onnx_lowrank.accuracy_budget import fastest_within_drop

    config = DecomposeConfig.from_keywords(
        calibration=calibration(), finetune=True, finetune_steps=2, finetune_options=options(), by="macs", rank_multiple=1, threads=1
    )
    _, report, search = fastest_within_drop(tiny_cnn(), 100.0, evaluation(), config, runs=0)
    assert search.chosen is not None and report.finetune["steps"] == 2 and "answers" not in report.finetune


def test_sweep_finetune_needs_calibration(tmp_path: Path) -> None:
    source = tmp_path / "m.onnx"
    onnx.save(tiny_cnn(), source)
    outcome = run_cli(["sweep", source, "--speedups", "2", "--runs", "0", "--finetune"])
    assert outcome.code == 2 and "--finetune needs --calibration" in outcome.error
