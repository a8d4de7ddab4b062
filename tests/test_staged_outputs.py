"""The outputs of one command appear together or not at all (``model_io.StagedOutputs``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_model
from cli_contract import run_cli, snapshot, violations

from onnx_lowrank.errors import LowRankError
from onnx_lowrank.model_io import StagedOutputs, load_model, save_model


def failing_replace(monkeypatch: pytest.MonkeyPatch, target: Path) -> list[tuple[str, str]]:
    """Make ``os.replace`` fail when it would move a file onto ``target``; returns the renames that ran."""
    real = os.replace
    done: list[tuple[str, str]] = []

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if Path(dst) == target:
            raise OSError(28, "No space left on device")
        real(src, dst)
        done.append((str(src), str(dst)))

    monkeypatch.setattr(os, "replace", replace)
    return done


def test_commit_renames_everything_in_order(tmp_path: Path) -> None:
    with StagedOutputs() as outputs:
        for name in ("a", "b", "c"):
            outputs.stage(tmp_path / name, name).write_text(name)
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []  # nothing until the commit
        outputs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]
    assert (tmp_path / "b").read_text() == "b"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_commit_undoes_the_renames_and_restores_replaced_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The third rename fails: the first two are undone — a new file removed, a replaced one put back."""
    (tmp_path / "b").write_text("old b")
    (tmp_path / "c").write_text("old c")
    before = snapshot(tmp_path)
    failing_replace(monkeypatch, tmp_path / "c")
    with StagedOutputs() as outputs:
        for name in ("a", "b", "c"):
            outputs.stage(tmp_path / name, name).write_text(f"new {name}")
        with pytest.raises(LowRankError, match="No space left"):
            outputs.commit()
    assert snapshot(tmp_path) == before


def test_failed_commit_without_hard_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a file system without hard links the replaced file is moved aside, and still put back."""
    (tmp_path / "a").write_text("old a")
    before = snapshot(tmp_path)

    def no_link(*args: object, **kwargs: object) -> None:
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    failing_replace(monkeypatch, tmp_path / "b")
    with StagedOutputs() as outputs:
        outputs.stage(tmp_path / "a", "a").write_text("new a")
        outputs.stage(tmp_path / "b", "b").write_text("new b")
        with pytest.raises(LowRankError):
            outputs.commit()
    assert snapshot(tmp_path) == before


def test_leaving_the_block_without_commit_discards(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), StagedOutputs() as outputs:
        outputs.stage(tmp_path / "a", "a").write_text("a")
        raise RuntimeError("a failure after staging")
    assert list(tmp_path.iterdir()) == []


def test_destinations_are_checked_when_staged(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_text("input")
    (tmp_path / "link.onnx").symlink_to(source)
    with StagedOutputs({source: "input model"}) as outputs:
        for dest, word in (
            (source, "input model"),
            (tmp_path / "link.onnx", "input model"),
            (tmp_path / "absent" / "x", "does not exist"),
            (tmp_path, "directory"),
        ):
            with pytest.raises(LowRankError, match=word):
                outputs.stage(dest, "output model")
        outputs.stage(tmp_path / "out.onnx", "output model")
        assert outputs.stage(tmp_path / "out.onnx", "output model") == outputs.staged(tmp_path / "out.onnx")
        with pytest.raises(LowRankError, match="would overwrite the output model"):
            outputs.stage(tmp_path / "out.onnx", "report")
        with pytest.raises(LowRankError, match="would overwrite the external data"):
            outputs.protect(tmp_path / "out.onnx", "external data of the input model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "model.onnx"]


def test_save_model_commits_the_data_file_before_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model is never in place without its external data; a failure on the model's rename removes the data file."""
    model = conv_model(n=64, c=32)
    renames = failing_replace(monkeypatch, tmp_path / "m.onnx")
    with pytest.raises(LowRankError, match="No space left"):
        save_model(model, tmp_path / "m.onnx", external_data=True)
    assert [Path(dst).name for _, dst in renames] == ["m.onnx.data"]  # renamed first, then removed again
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    save_model(model, tmp_path / "m.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert load_model(tmp_path / "m.onnx").SerializeToString() == model.SerializeToString()


def test_decompose_outputs_appear_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """decompose --external-data --report: the report's rename fails last; the model and its data file are undone,
    an earlier run's outputs are put back as they were."""
    src = tmp_path / "in.onnx"
    src.write_bytes(conv_model(n=64, c=32, input_shape=("n", 32, 12, 12)).SerializeToString())
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    argv = ["decompose", src, out, "--rank", "4", "--external-data", "--report", report]
    assert run_cli(argv).code == 0
    before = snapshot(tmp_path)
    failing_replace(monkeypatch, report)
    outcome = run_cli([*argv[:4], "8", *argv[5:]])
    assert outcome.code == 2 and "No space left" in outcome.error, outcome
    assert violations(outcome, before, snapshot(tmp_path)) == []


def test_decompose_checks_every_destination_before_any_work(tmp_path: Path) -> None:
    """A report that would replace the input's external data file is refused before the model is even read."""
    src = tmp_path / "in.onnx"
    onnx.save_model(conv_model(), str(src), save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    before = snapshot(tmp_path)
    outcome = run_cli(["decompose", src, tmp_path / "out.onnx", "--rank", "2", "--report", tmp_path / "in.onnx.data"])
    assert outcome.code == 2 and "external data of the input model" in outcome.error, outcome
    assert violations(outcome, before, snapshot(tmp_path)) == []
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, x=np.zeros((1, 6, 12, 12), np.float32))
    before = snapshot(tmp_path)
    outcome = run_cli(["decompose", src, inputs, "--rank", "2", "--verify-inputs", inputs])
    assert outcome.code == 2 and "inputs file" in outcome.error, outcome
    assert violations(outcome, before, snapshot(tmp_path)) == []
