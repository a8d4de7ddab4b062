"""The shipped text detector and its module (``models/textdet.py``): the metric, the page renderer, model and splits."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # models/ is a folder of scripts beside the package, not an installed package

from models.textdet import (  # noqa: E402
    THRESHOLD,
    agreement,
    binarize,
    evaluate,
    load_split,
    page_iou,
    predict,
    render_page,
    render_pages,
    score,
)

MODEL = ROOT / "models" / "textdet.onnx"
TEST = ROOT / "models" / "textdet_test.npz"
CALIBRATION = ROOT / "models" / "textdet_calibration.npz"


def _square(top: int, left: int, side: int, size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top : top + side, left : left + side] = 1
    return mask


def test_page_iou_on_hand_made_masks() -> None:
    truth = np.stack([_square(0, 0, 4), _square(0, 0, 4), _square(2, 2, 2), np.zeros((8, 8), np.uint8)])
    pred = np.stack([_square(0, 0, 4), _square(0, 2, 4), np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)])
    # same square; shifted by half (8 shared of 24 marked); nothing found; nothing there and nothing found
    assert page_iou(pred, truth).tolist() == pytest.approx([1.0, 8 / 24, 0.0, 1.0])
    # (N, 1, H, W) and (N, H, W) are the same pages
    assert page_iou(pred[:, None], truth).tolist() == pytest.approx([1.0, 8 / 24, 0.0, 1.0])
    with pytest.raises(ValueError, match="masks of shape"):
        page_iou(pred[:, :4], truth)
    with pytest.raises(ValueError, match="expected maps"):
        page_iou(pred[0], truth[0])


def test_score_binarises_above_the_threshold() -> None:
    truth = np.stack([_square(0, 0, 4), _square(4, 4, 4)])
    probability = truth.astype(np.float32) * 0.9
    probability[0, 0, :4] = THRESHOLD  # exactly at the threshold is not text: 4 of 16 pixels lost
    probability[1, 0, 0] = 0.6  # one pixel marked outside the box
    assert binarize(probability).sum() == 12 + 17
    metrics = score(probability[:, None], truth)
    assert metrics["iou"] == pytest.approx((12 / 16 + 16 / 17) / 2)
    assert metrics["worst_iou"] == pytest.approx(12 / 16)
    assert metrics["precision"] == pytest.approx(28 / 29)
    assert metrics["recall"] == pytest.approx(28 / 32)
    # a map marking everything agrees with the first only where the first marks text
    everything = np.ones_like(probability)
    assert agreement(everything, probability) == {
        "mask_agreement": pytest.approx((12 + 17) / 128),
        "worst_agreement": pytest.approx(12 / 64),
    }
    assert agreement(probability, probability) == {"mask_agreement": 1.0, "worst_agreement": 1.0}


def test_renderer_is_deterministic_at_any_size() -> None:
    pytest.importorskip("PIL")
    image, mask = render_page(7)
    again, mask_again = render_page(np.random.default_rng(7))
    assert image.dtype == mask.dtype == np.uint8 and image.shape == mask.shape == (256, 256)
    assert np.array_equal(image, again) and np.array_equal(mask, mask_again)
    assert set(np.unique(mask).tolist()) == {0, 1}
    other, _ = render_page(8)
    assert not np.array_equal(image, other)
    images, masks = render_pages(3, seed=5, height=97, width=131, start=10)
    assert images.shape == (3, 1, 97, 131) and masks.shape == (3, 97, 131)
    single, single_mask = render_page([5, 11], height=97, width=131)  # page 11 of set 5, drawn alone
    assert np.array_equal(images[1, 0], single) and np.array_equal(masks[1], single_mask)


def test_rendered_text_is_darker_or_lighter_than_its_paper() -> None:
    """The mask marks ink: inside text boxes the pixels spread far wider than on the bare paper around them."""
    pytest.importorskip("PIL")
    images, masks = render_pages(24, seed=9)
    text_share = masks.mean(axis=(1, 2))
    assert 0.02 < float(np.median(text_share)) < 0.6
    inside = [img[0][m > 0].std() for img, m in zip(images, masks, strict=True) if m.sum() > 200]
    assert len(inside) >= 16 and float(np.median(inside)) > 20


def test_shipped_splits_are_uint8_pages_with_masks() -> None:
    x, masks = load_split(TEST)
    calibration, none = load_split(CALIBRATION)
    assert x.dtype == calibration.dtype == np.uint8
    assert x.shape[1:] == calibration.shape[1:] == (1, 256, 256)
    assert len(x) >= 100 and len(calibration) >= 128
    assert none is None and masks is not None and masks.dtype == np.uint8 and masks.shape == (len(x), 256, 256)
    assert set(np.unique(masks).tolist()) == {0, 1}
    with np.load(TEST) as data:
        assert "labels" not in data  # that key means class indices to `onnx-lowrank verify`


def test_shipped_model_finds_text_at_any_batch_and_size() -> None:
    model = onnx.load(str(MODEL))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, "height", "width"]
    assert model.opset_import[0].version >= 17
    x, masks = load_split(TEST)
    assert masks is not None
    # the full test split scores higher (see models/train_textdet.py); 32 pages must still mostly match
    metrics = evaluate(MODEL, x[:32], masks[:32], batch=8, threads=1)
    assert metrics["iou"] >= 0.85, metrics
    # fully convolutional: a 640x640 page and an odd-sized one give maps of their own size that find their text
    import onnxruntime as ort

    pytest.importorskip("PIL")
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    for height, width in ((640, 640), (200, 328)):
        pages, truth = render_pages(1, seed=4, height=height, width=width)
        probability = predict(session, pages)
        assert probability.shape == (1, height, width)
        assert score(probability, truth)["iou"] >= 0.8
