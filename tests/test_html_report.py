"""The HTML reports: self-contained (no network, no script), the figures present, readable without matplotlib,
written atomically; and, where Chromium is installed, rendered in a real headless browser without errors."""

from __future__ import annotations

import base64
import html
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnx_lowrank.model_io
from onnx_lowrank import LowRankError, decompose, verify
from onnx_lowrank.html_report import PLOTS_HINT, decompose_html, plots_available, sweep_html
from onnx_lowrank.model_io import StagedOutputs
from onnx_lowrank.sweep import SweepResult, report_spectra, sweep

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits_cnn.onnx"
DIGITS_TEST = ROOT / "models" / "digits_test.npz"
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the browser check is a benchmark script, shared with this test

from html_check import check_page, chromium  # noqa: E402

needs_plots = pytest.mark.skipif(not plots_available(), reason="matplotlib is not installed (pip install 'onnx-lowrank[plots]')")
needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="chromium is not installed (Debian: apt-get install chromium): the pages are not opened in a browser"
)
IMG = re.compile(r'<img src="([^"]*)"')


@pytest.fixture(scope="module")
def profiled_sweep() -> SweepResult:
    """A sweep of the digits model on its labelled test set, kernel times profiled, one target unreachable."""
    return sweep(DIGITS, [1.5, 2, 3, 1000], eval_inputs=DIGITS_TEST, runs=3, by="macs", profile=True)


def assert_self_contained(page: str) -> None:
    """No script, no external reference, a policy that forbids loading anything but data: images."""
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.IGNORECASE)
    assert "default-src 'none'; img-src data:" in page
    for uri in IMG.findall(page):
        assert uri.startswith("data:image/png;base64,")
        assert base64.b64decode(uri.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"


@needs_plots
def test_sweep_page_has_every_figure(profiled_sweep: SweepResult) -> None:
    """Trade-off, spectra, MACs per layer and kernel time: four embedded PNGs, and the tables."""
    page = sweep_html(profiled_sweep)
    assert_self_contained(page)
    assert len(IMG.findall(page)) == 4
    for heading in (
        "Accuracy against speed",
        "Spectra and chosen ranks",
        "MACs per layer",
        "Kernel time per operator type",
        "Ranks per layer",
    ):
        assert heading in page, heading
    assert "not reached" in page and "cannot be reached" in page  # the unreachable target's row says why
    assert "1.5×" in page and "3×" in page
    assert html.escape(PLOTS_HINT) not in page


@needs_plots
def test_sweep_page_without_timing_or_labels() -> None:
    """Without labels the trade-off plots the output error; without profiling there is no kernel figure."""
    result = sweep(DIGITS, [2, 3], runs=0, by="macs")
    page = sweep_html(result)
    assert_self_contained(page)
    assert len(IMG.findall(page)) == 3
    assert "Relative L2 error of the outputs of the model converted at each target" in page  # the trade-off's caption
    assert "Kernel time per operator type" not in page


def test_sweep_page_without_matplotlib(profiled_sweep: SweepResult, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without matplotlib the page holds the tables and says how to get the plots."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    assert not plots_available()
    page = sweep_html(profiled_sweep)
    assert_self_contained(page)
    assert IMG.findall(page) == []
    assert html.escape(PLOTS_HINT) in page
    assert "Ranks per layer" in page and "Output error statistics" in page


@needs_plots
def test_decompose_page(tmp_path: Path) -> None:
    """One conversion: spectra (with the kernel error in each title), MACs per layer, error statistics; kernel time when profiled."""
    model, report = decompose(DIGITS, speedup=2, by="macs")
    out = tmp_path / "out.onnx"
    onnx.save(model, out)
    with np.load(DIGITS_TEST) as data:  # a part of the test set keeps the profiled runs short
        inputs = {"input": data["input"][:64], "labels": data["labels"][:64]}
    result = verify(DIGITS, out, inputs=inputs, runs=2, profile=True)
    spectra = report_spectra(DIGITS, report)
    assert {s.node for s in spectra} == {layer.node for layer in report.decomposed}
    for spectrum in spectra:
        layer = next(layer for layer in report.decomposed if layer.node == spectrum.node)
        assert spectrum.curve[0] == pytest.approx(1.0) and spectrum.curve == sorted(spectrum.curve, reverse=True)
        assert spectrum.errors[layer.rank] == pytest.approx(layer.optimal_error, rel=1e-6)  # the title's kernel error
    page = decompose_html("digits_cnn.onnx", report, spectra, result)
    assert_self_contained(page)
    assert len(IMG.findall(page)) == 3
    assert "Output error statistics" in page and "accuracy" in page
    page = decompose_html("digits_cnn.onnx", report, spectra, verify(DIGITS, out, runs=0))
    assert len(IMG.findall(page)) == 2


def test_html_written_through_the_staged_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page is written with the plain file mode; a failed write leaves nothing, a missing folder is one clear error."""
    old = os.umask(0o022)
    try:
        with StagedOutputs() as outputs:
            outputs.write_text(tmp_path / "page.html", "<p>x</p>", "HTML report")
            outputs.commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "page.html").stat().st_mode) == 0o644
    assert (tmp_path / "page.html").read_text() == "<p>x</p>"

    def failing_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_lowrank.model_io.os, "replace", failing_replace)
    with pytest.raises(LowRankError, match="No space left"), StagedOutputs() as outputs:
        outputs.write_text(tmp_path / "other.html", "<p>y</p>", "HTML report")
        outputs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]
    with pytest.raises(LowRankError, match="does not exist"), StagedOutputs() as outputs:
        outputs.write_text(tmp_path / "absent" / "page.html", "", "HTML report")


# --------------------------------------------------------------------------- in a real browser


@needs_chromium
@needs_plots
def test_pages_render_in_chromium(profiled_sweep: SweepResult, tmp_path: Path) -> None:
    """Both pages open in headless Chromium with every image decoded, no console message and no sideways scrolling."""
    sweep_page = tmp_path / "sweep.html"
    sweep_page.write_text(sweep_html(profiled_sweep))
    check = check_page(sweep_page, tmp_path)
    assert check.images == check.decoded == 4, check
    assert check.console == [], check.console
    assert check.width <= 1280 and check.height > 1000
    assert check.screenshots and all(Path(p).stat().st_size > 10_000 for p in check.screenshots)

    _, report = decompose(DIGITS, speedup=2, by="macs")
    plain = tmp_path / "plain.html"
    plain.write_text(decompose_html("digits_cnn.onnx", report, report_spectra(DIGITS, report), None))
    check = check_page(plain)
    assert check.images == check.decoded == 2 and check.console == []


@needs_chromium
def test_browser_check_sees_broken_pages(tmp_path: Path) -> None:
    """The check can fail: a broken image and a blocked network load are seen."""
    page = tmp_path / "bad.html"
    good = sweep_html(sweep(DIGITS, [2], runs=0, by="macs"), plots=False)
    page.write_text(good.replace("<h1>", '<img src="data:image/png;base64,AAAA"><img src="https://example.invalid/x.png"><h1>', 1))
    check = check_page(page)
    assert check.images == 2 and check.decoded == 0
    assert any("Content Security Policy" in line for line in check.console), check.console


def test_decompose_html_when_no_inputs_can_be_made(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model whose input cannot be drawn at random: the model and the page are written, the page says why the error is missing."""
    from builders import make_model
    from onnx import TensorProto, helper

    import onnx_lowrank.cli

    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),  # a string input: no random values of it
        helper.make_node("Conv", ["xf", "W"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    weight = np.random.default_rng(0).standard_normal((32, 16, 3, 3)).astype(np.float32)
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.STRING, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        {"W": weight},
    )
    onnx.save(model, tmp_path / "u16.onnx")
    code = onnx_lowrank.cli.main(
        [
            "decompose",
            str(tmp_path / "u16.onnx"),
            str(tmp_path / "out.onnx"),
            "--speedup",
            "1.5",
            "--by",
            "macs",
            "--html",
            str(tmp_path / "r.html"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    page = (tmp_path / "r.html").read_text()
    assert "output error not measured" in page and "string" in page
    assert "Output error statistics" not in page
