"""The shipped text-line recogniser and its metric module (``models/textline.py``): decoding, metrics, model and splits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # models/ is a folder of scripts beside the package, not an installed package

from models.textline import (  # noqa: E402
    ALPHABET,
    BLANK,
    STRIDE,
    agreement,
    character_error_rate,
    edit_distance,
    exact_accuracy,
    greedy_decode,
    load_split,
    read_lines,
    score,
)

MODEL = ROOT / "models" / "textline_crnn.onnx"
TEST = ROOT / "models" / "textline_test.npz"
CALIBRATION = ROOT / "models" / "textline_calibration.npz"


def _one_hot(paths: list[list[int]]) -> np.ndarray:
    """(batch, time, classes) scores whose arg-max per step is the given class path."""
    logits = np.zeros((len(paths), len(paths[0]), len(ALPHABET) + 1), dtype=np.float32)
    for n, path in enumerate(paths):
        logits[n, np.arange(len(path)), path] = 1.0
    return logits


def _cls(c: str) -> int:
    return ALPHABET.index(c) + 1


def test_greedy_decode_merges_repeats_and_drops_blanks() -> None:
    a, b, space = _cls("a"), _cls("b"), _cls(" ")
    paths = [
        [a, a, BLANK, a, b, b, BLANK, BLANK],  # a blank between two a's keeps both
        [BLANK] * 8,
        [b, space, space, BLANK, a, BLANK, BLANK, a],
    ]
    assert greedy_decode(_one_hot(paths)) == ["aab", "", "b aa"]


def test_greedy_decode_rejects_a_wrong_class_count() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        greedy_decode(np.zeros((1, 4, 5), dtype=np.float32))


def test_edit_distance_and_rates() -> None:
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == edit_distance("abc", "") == 3
    assert edit_distance("same", "same") == 0
    read, reference = ["abc", "abd", ""], ["abc", "abc", "xy"]
    assert exact_accuracy(read, reference) == pytest.approx(1 / 3)
    assert character_error_rate(read, reference) == pytest.approx((0 + 1 + 2) / 8)
    assert score(read, reference) == {"exact_accuracy": pytest.approx(1 / 3), "cer": pytest.approx(3 / 8)}
    assert agreement(["abc", "x"], ["abc", "y"]) == {"string_agreement": 0.5, "cer_vs_original": 0.25}
    with pytest.raises(ValueError, match="references"):
        exact_accuracy(["a"], ["a", "b"])


def test_shipped_splits_are_uint8_lines_with_labels() -> None:
    x, labels = load_split(TEST)
    calibration, none = load_split(CALIBRATION)
    assert x.dtype == calibration.dtype == np.uint8
    assert x.shape[1:] == calibration.shape[1:] == (1, 32, 256)
    assert len(x) >= 500 and len(calibration) >= 512
    assert labels is not None and none is None and len(labels) == len(x)
    assert all(labels) and set("".join(labels)) <= set(ALPHABET)


def test_shipped_model_reads_its_test_lines_at_any_batch_and_width() -> None:
    model = onnx.load(str(MODEL))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, 32, "width"]
    assert {p.key: p.value for p in model.metadata_props}["alphabet"] == ALPHABET
    x, labels = load_split(TEST)
    assert labels is not None
    read = read_lines(MODEL, x[:48], batch=16, threads=1)
    # the full test split scores far higher (see models/train_textline.py); 48 lines must still mostly read right
    assert exact_accuracy(read, labels[:48]) >= 0.75
    # the width is a run-time axis: lines padded with paper to 320 columns read the same, with 320 / STRIDE steps
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    wide = np.full((8, 1, 32, 320), 255, dtype=np.float32)
    wide[..., :256] = x[:8]
    wide[..., 256:] = x[:8, :, :, 255:256]  # continue each line's own right edge, not plain white
    logits = session.run(None, {"input": wide})[0]
    assert logits.shape == (8, 320 // STRIDE, len(ALPHABET) + 1)
    assert exact_accuracy(greedy_decode(logits), read[:8]) >= 0.75
