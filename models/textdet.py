"""The text detector's pages and task metric: a seeded renderer of synthetic document pages, text-mask IoU.

The detector of ``models/train_textdet.py`` (``textdet.onnx``) marks where
printed text is on a grey page: input ``input`` (batch, 1, height, width)
float32 holding raw grey pixel values 0..255 (the normalisation is inside the
graph; batch, height and width are dynamic axes, 256×256 for the shipped
data), output ``probability`` (batch, 1, height, width) float32 in [0, 1]: for
each pixel, the probability that it lies inside a text box. The network is
fully convolutional with an output stride of 1 (its internal strides go down
to 1/32; other sizes than multiples of 32 run too, the top-down merge resizes
to the finer map's size).

Ground truth: the text mask, 1 inside the box of each run of text (a line of
a paragraph, a heading, a table cell, a caption, a form label), 0 elsewhere.
A box is the tight bounding box of the run's ink (the glyphs' anti-aliased
coverage ≥ 96 / 255), the spaces between its words included, grown by
``max(1, round(0.08 × font size))`` pixels on each side; then turned with the
page. Lines, boxes, tables' rules, figures, underlines, scribbles and specks
are not text.

Pages (:func:`render_page`, :func:`render_pages`): any height and width; the
same seed draws the same page (Pillow's built-in fonts only, no system fonts,
so the pages depend on the Pillow and FreeType versions alone). Each page has
one to three columns of blocks — paragraphs (font size 8 to 22 px, ragged
right, leading 1.25–1.8), headings (14 to 34 px), tables with rules,
light-on-dark banners, text on shaded panels, form labels with fill-in rules,
figures (plots, bars, shapes, hatching, gradients) with captions — starting
anywhere, so text may be cut at the page's edges. Type: Pillow's scalable
Aileron (``ImageFont.load_default(size)``), sometimes bold (stroked), slanted
(sheared), condensed or widened, or Pillow's bitmap font scaled 1–2× (a
second, blocky face). Then, each drawn from the page's seed: paper and ink
grey levels (contrast down to 45 grey levels), scribbles, specks, rules and
borders, rotation of the whole page by up to ±3°, Gaussian blur (radius ≤ 1.1),
a linear illumination ramp (±30) and, on half the pages, Gaussian pixel
noise (σ 1 to 6).

Metric over a set of pages (:func:`score`): the predicted probability map is
binarised at :data:`THRESHOLD` (0.5: text where ``p > 0.5``); per page, the IoU
|pred ∩ truth| / |pred ∪ truth| (1 when both are empty); ``iou`` is the mean
over pages, ``worst_iou`` the least; pixel precision and recall are pooled over
all pages (1 when nothing is marked, or nothing is text). Agreement between two models (a converted model and its original,
:func:`agreement`): the same page IoU between their two binarised maps.

The shipped splits (``textdet_test.npz``, ``textdet_calibration.npz``) hold
``input`` as uint8 (N, 1, 256, 256); the test split also holds ``masks``,
uint8 (N, 256, 256) in {0, 1} (the key is not ``labels``: that name means
class indices to ``onnx-lowrank verify``). The metric needs numpy and
onnxruntime only; rendering also needs Pillow::

    from models.textdet import evaluate, load_split
    x, masks = load_split("models/textdet_test.npz")
    print(evaluate("models/textdet.onnx", x, masks))
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # Pillow is needed to render pages only, not to score them
    from PIL import Image as PILImage
    from PIL import ImageFont

__all__ = [
    "HEIGHT",
    "THRESHOLD",
    "WIDTH",
    "agreement",
    "binarize",
    "evaluate",
    "load_split",
    "page_iou",
    "predict",
    "render_page",
    "render_pages",
    "score",
]

HEIGHT = WIDTH = 256  # size of the shipped pages (the model takes any size)
THRESHOLD = 0.5  # a pixel is text where the predicted probability exceeds this
INK_LEVEL = 96  # glyph coverage (of 255) that counts as ink for a text box

Array = npt.NDArray[Any]


# --------------------------------------------------------------------------- metric


def binarize(probability: Array, threshold: float = THRESHOLD) -> npt.NDArray[np.bool_]:
    """(N, H, W) text / not text from probability maps (N, 1, H, W) or (N, H, W): ``p > threshold``."""
    return _pages(probability) > threshold


def page_iou(predicted: Array, truth: Array) -> npt.NDArray[np.float64]:
    """IoU of two sets of binary masks, one value per page ((N, H, W) or (N, 1, H, W); nonzero is text).

    A page where both masks are empty scores 1: nothing to find, nothing found."""
    a, b = _pages(predicted).astype(bool), _pages(truth).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"masks of shape {a.shape} against {b.shape}")
    inter = np.logical_and(a, b).sum(axis=(1, 2), dtype=np.int64)
    union = np.logical_or(a, b).sum(axis=(1, 2), dtype=np.int64)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def score(probability: Array, masks: Array, threshold: float = THRESHOLD) -> dict[str, float]:
    """Mean and least page IoU of the binarised maps against the true masks; pixel precision and recall over all pages."""
    pred, truth = binarize(probability, threshold), _pages(masks).astype(bool)
    iou = page_iou(pred, truth)
    hits = int(np.logical_and(pred, truth).sum(dtype=np.int64))
    marked, text = int(pred.sum(dtype=np.int64)), int(truth.sum(dtype=np.int64))
    return {
        "iou": float(iou.mean()),
        "worst_iou": float(iou.min()),
        "precision": hits / marked if marked else 1.0,
        "recall": hits / text if text else 1.0,
    }


def agreement(probability: Array, original: Array, threshold: float = THRESHOLD) -> dict[str, float]:
    """How closely a converted model marks text like its original: mean and least page IoU of the two binarised maps."""
    iou = page_iou(binarize(probability, threshold), binarize(original, threshold))
    return {"mask_agreement": float(iou.mean()), "worst_agreement": float(iou.min())}


def load_split(path: str | Path) -> tuple[Array, Array | None]:
    """The pages (uint8, (N, 1, H, W)) of a shipped split and their text masks (uint8 (N, H, W); ``None`` for calibration)."""
    with np.load(path, allow_pickle=False) as data:
        x = data["input"]
        masks = data.get("masks")
    return x, masks


def predict(model: Any, x: Array, batch: int = 16, threads: int = 0) -> npt.NDArray[np.float32]:
    """Text probability maps (N, H, W) of pages (N, 1, H, W): ``model`` is an ONNX path, a ``ModelProto`` or an onnxruntime session."""
    import onnxruntime as ort

    if isinstance(model, ort.InferenceSession):
        session = model
    else:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        source = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
        session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = np.empty((len(x), x.shape[2], x.shape[3]), dtype=np.float32)
    for start in range(0, len(x), batch):
        feed = np.ascontiguousarray(x[start : start + batch], dtype=np.float32)
        out[start : start + len(feed)] = _pages(np.asarray(session.run(None, {name: feed})[0]))
    return out


def evaluate(model: Any, x: Array, masks: Array, batch: int = 16, threads: int = 0) -> dict[str, float]:
    """:func:`score` of a model's maps of the pages ``x`` against ``masks``."""
    return score(predict(model, x, batch, threads), masks)


def _pages(a: Array) -> Array:
    """(N, H, W) from (N, 1, H, W) or (N, H, W)."""
    a = np.asarray(a)
    if a.ndim == 4 and a.shape[1] == 1:
        return a[:, 0]
    if a.ndim != 3:
        raise ValueError(f"expected maps (N, 1, H, W) or (N, H, W), got shape {a.shape}")
    return a


# --------------------------------------------------------------------------- page renderer

SIZES = (8, 22)  # body text font sizes in px, inclusive
HEADING_SIZES = (14, 34)
BITMAP_HEIGHT = 11  # Pillow's bitmap font: its line height in px at scale 1
LOWER = "abcdefghijklmnopqrstuvwxyz"
UPPER = LOWER.upper()
DIGITS = "0123456789"
TRAILING = ".,;:!?)"  # punctuation that may end a word
_INK_LUT = [255 if v >= INK_LEVEL else 0 for v in range(256)]  # glyph coverage -> ink or not
_MASK_LUT = [255 if v else 0 for v in range(256)]  # the mask drawn as {0, 1} -> {0, 255}, so that it can be resampled


@cache
def _scalable(size: int) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    font = ImageFont.load_default(size=size)
    assert isinstance(font, ImageFont.FreeTypeFont), "Pillow was built without FreeType: load_default(size) needs it"
    return font


@cache
def _bitmap() -> ImageFont.ImageFont:
    from PIL import ImageFont

    return ImageFont.load_default_imagefont()


@dataclass(frozen=True)
class _Type:
    """How a run of text is set: size in px, face, stroke (bold), horizontal scale, slant (shear)."""

    size: int
    bitmap: int = 0  # 0: Aileron at ``size``; k >= 1: the bitmap font scaled k times
    stroke: int = 0
    scale_x: float = 1.0
    slant: float = 0.0

    @property
    def font(self) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
        return _bitmap() if self.bitmap else _scalable(self.size)

    @property
    def height(self) -> int:
        return BITMAP_HEIGHT * self.bitmap if self.bitmap else self.size

    def length(self, text: str) -> float:
        """Advance width of ``text`` in page pixels."""
        return float(self.font.getlength(text)) * (self.bitmap or 1) * self.scale_x + 2 * self.stroke


def _type(rng: np.random.Generator, size: int, bitmap_share: float = 0.12) -> _Type:
    if rng.random() < bitmap_share:
        scale = 1 if size < 16 else 2
        return _Type(size=BITMAP_HEIGHT * scale, bitmap=scale)
    stroke = 1 if size >= 12 and rng.random() < 0.2 else 0
    scale_x = float(rng.uniform(0.8, 1.2)) if rng.random() < 0.25 else 1.0
    slant = float(rng.uniform(0.15, 0.3)) if rng.random() < 0.15 else 0.0
    return _Type(size=size, stroke=stroke, scale_x=scale_x, slant=slant)


def _word(rng: np.random.Generator) -> str:
    kind = rng.random()
    length = int(min(12, 1 + rng.geometric(0.22)))
    if kind < 0.1:  # a number: 7, 2024, 3.14, 12,5 %
        text = "".join(DIGITS[i] for i in rng.integers(0, 10, size=min(length, 6)))
        if len(text) > 2 and rng.random() < 0.3:
            cut = int(rng.integers(1, len(text)))
            text = text[:cut] + ".,"[int(rng.integers(0, 2))] + text[cut:]
        return text + ("%" if rng.random() < 0.1 else "")
    text = "".join(LOWER[i] for i in rng.integers(0, 26, size=length))
    if kind < 0.2:
        text = text.upper()
    elif kind < 0.4:
        text = text[0].upper() + text[1:]
    if rng.random() < 0.12:
        text += TRAILING[int(rng.integers(0, len(TRAILING)))]
    elif rng.random() < 0.03:
        text = "(" + text + ")"
    return text


def _words_to_fit(rng: np.random.Generator, kind: _Type, width: float, most: int = 40) -> str:
    """Words drawn until the next one would not fit in ``width`` pixels (at least one word)."""
    text = _word(rng)
    # the widths add up word by word (kerning across a space is negligible), not re-measured for the whole line
    length = kind.length(text)
    for _ in range(most):
        word = " " + _word(rng)
        length += kind.length(word) - 2 * kind.stroke
        if length > width:
            break
        text += word
    return text


@dataclass
class _Page:
    """A page being drawn: the image, the text mask, and the paper's grey level."""

    image: PILImage.Image
    mask: PILImage.Image
    paper: int
    width: int
    height: int

    def ink(self, rng: np.random.Generator) -> int:
        """A grey level for ink on this page's paper, at least 45 levels darker."""
        return int(rng.integers(0, max(1, self.paper - 45)))

    def text(self, x: float, y: float, text: str, kind: _Type, ink: int) -> tuple[int, int, int, int] | None:
        """Draw ``text`` with its top-left near (x, y) and mark its box as text; returns the box (None if no ink)."""
        from PIL import Image, ImageDraw

        font = kind.font
        left, top, right, bottom = (int(v) for v in font.getbbox(text))
        pad = 2 + kind.stroke
        layer = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
        ImageDraw.Draw(layer).text((pad - left, pad - top), text, font=font, fill=255, stroke_width=kind.stroke, stroke_fill=255)
        scale = kind.bitmap or 1
        if scale != 1 or kind.scale_x != 1.0:
            size = (max(1, round(layer.width * scale * kind.scale_x)), layer.height * scale)
            resample = Image.Resampling.NEAREST if kind.bitmap else Image.Resampling.BILINEAR
            layer = layer.resize(size, resample)
        if kind.slant:
            # input x = output x − slant·(h − y): the bottom row stays, the top leans right
            extra = math.ceil(kind.slant * layer.height)
            coeffs = (1.0, kind.slant, -kind.slant * layer.height, 0.0, 1.0, 0.0)
            layer = layer.transform((layer.width + extra, layer.height), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
        ox, oy = round(x) - pad * scale, round(y + top * scale) - pad * scale
        self.image.paste(ink, (ox, oy), layer)
        box = layer.point(_INK_LUT).getbbox()
        if box is None:
            return None
        grow = max(1, round(0.08 * kind.height))
        marked = (ox + box[0] - grow, oy + box[1] - grow, ox + box[2] - 1 + grow, oy + box[3] - 1 + grow)
        ImageDraw.Draw(self.mask).rectangle(marked, fill=1)
        return marked


def _paragraph(page: _Page, rng: np.random.Generator, x0: int, x1: int, y: float, size: int | None = None) -> float:
    size = size or int(rng.integers(SIZES[0], SIZES[1] + 1))
    kind = _type(rng, size)
    ink = page.ink(rng)
    leading = kind.height * float(rng.uniform(1.25, 1.8))
    lines = int(rng.integers(1, 9))
    centred = rng.random() < 0.1
    for i in range(lines):
        indent = kind.height * 1.5 if i == 0 and rng.random() < 0.3 else 0.0
        room = (x1 - x0 - indent) * (float(rng.uniform(0.2, 1.0)) if i == lines - 1 else float(rng.uniform(0.85, 1.0)))
        text = _words_to_fit(rng, kind, max(room, kind.height))
        x = x0 + indent
        if centred:
            x = x0 + max(0.0, (x1 - x0 - kind.length(text)) / 2)
        page.text(x, y, text, kind, ink)
        y += leading
        if y > page.height:
            break
    return y


def _heading(page: _Page, rng: np.random.Generator, x0: int, x1: int, y: float) -> float:
    size = int(rng.integers(HEADING_SIZES[0], HEADING_SIZES[1] + 1))
    kind = _type(rng, size, bitmap_share=0.08)
    if kind.stroke == 0 and not kind.bitmap and rng.random() < 0.4:
        kind = _Type(size=size, stroke=1, scale_x=kind.scale_x, slant=kind.slant)
    text = _words_to_fit(rng, kind, (x1 - x0) * float(rng.uniform(0.3, 1.0)), most=int(rng.integers(0, 5)))
    x = x0 if rng.random() < 0.7 else x0 + max(0.0, (x1 - x0 - kind.length(text)) / 2)
    page.text(x, y, text, kind, page.ink(rng))
    return y + kind.height * float(rng.uniform(1.4, 2.0))


def _banner(page: _Page, rng: np.random.Generator, x0: int, x1: int, y: float) -> float:
    """Light text on a dark bar: the bar is not text, the text on it is."""
    from PIL import ImageDraw

    size = int(rng.integers(10, HEADING_SIZES[1] - 6))
    kind = _type(rng, size, bitmap_share=0.05)
    dark = int(rng.integers(0, max(1, page.paper - 90)))
    light = int(rng.integers(min(255, dark + 70), 256))
    height = kind.height * float(rng.uniform(1.5, 2.2))
    ImageDraw.Draw(page.image).rectangle((x0, round(y), x1, round(y + height)), fill=dark)
    text = _words_to_fit(rng, kind, (x1 - x0) * float(rng.uniform(0.3, 0.9)), most=4)
    page.text(x0 + kind.height * 0.4, y + (height - kind.height * 1.1) / 2, text, kind, light)
    return y + height + kind.height * 0.6


def _panel(page: _Page, rng: np.random.Generator, x0: int, x1: int, y: float) -> float:
    """A paragraph on a shaded (or outlined) panel."""
    from PIL import ImageDraw

    size = int(rng.integers(SIZES[0], SIZES[1] - 4))
    shade = int(np.clip(page.paper - rng.integers(15, 60), 60, 255))
    top = round(y)
    # the shade is drawn first over a guessed height, so that the text lands on it; then trimmed below
    guess = max(size, 2 * BITMAP_HEIGHT) * 2 * 9
    draw = ImageDraw.Draw(page.image)
    draw.rectangle((x0, top, x1, round(top + guess)), fill=shade)
    saved = page.paper
    page.paper = shade  # ink must stay dark enough against the shade
    end = _paragraph(page, rng, x0 + size // 2, x1 - size // 2, y + size * 0.6, size)
    page.paper = saved
    bottom = round(end)
    draw.rectangle((x0, bottom, x1, round(top + guess)), fill=saved)
    if rng.random() < 0.5:
        draw.rectangle((x0, top, x1, bottom), outline=page.ink(rng), width=int(rng.integers(1, 3)))
    return end + size


def _table(page: _Page, rng: np.random.Generator, x0: int, x1: int, y: float) -> float:
    from PIL import ImageDraw

    size = int(rng.integers(SIZES[0], 16))
    kind = _type(rng, size, bitmap_share=0.1)
    ink = page.ink(rng)
    rows, cols = int(rng.integers(2, 7)), int(rng.integers(2, 5))
    row_height = round(kind.height * float(rng.uniform(1.6, 2.2)))
    cuts = np.sort(rng.uniform(0.15, 0.85, size=cols - 1))
    edges = [x0, *[round(x0 + c * (x1 - x0)) for c in cuts], x1]
    draw = ImageDraw.Draw(page.image)
    rule = int(rng.integers(1, 3))
    full_grid = rng.random() < 0.6
    for r in range(rows + 1):
        if full_grid or r in (0, 1, rows):
            yy = round(y + r * row_height)
            draw.line((x0, yy, x1, yy), fill=ink, width=rule)
    if full_grid:
        for e in edges:
            draw.line((e, round(y), e, round(y + rows * row_height)), fill=ink, width=rule)
    for r in range(rows):
        for c in range(cols):
            if rng.random() < 0.15:
                continue  # an empty cell
            room = edges[c + 1] - edges[c] - kind.height
            if room < kind.height:
                continue
            text = _words_to_fit(rng, kind, room * float(rng.uniform(0.3, 1.0)), most=int(rng.integers(0, 3)))
            if kind.length(text) > room:
                continue
            page.text(edges[c] + kind.height * 0.45, y + r * row_height + (row_height - kind.height * 1.05) / 2, text, kind, ink)
    return y + rows * row_height + kind.height


def _form(page: _Page, rng: np.random.Generator, x0: int, x1: int, y: float) -> float:
    """Labels followed by fill-in rules or boxes (the rules and boxes are not text)."""
    from PIL import ImageDraw

    size = int(rng.integers(SIZES[0], 16))
    kind = _type(rng, size, bitmap_share=0.1)
    ink = page.ink(rng)
    draw = ImageDraw.Draw(page.image)
    for _ in range(int(rng.integers(1, 5))):
        label = _words_to_fit(rng, kind, (x1 - x0) * 0.4, most=int(rng.integers(0, 2))) + ":"
        box = page.text(x0, y, label, kind, ink)
        end = box[2] if box else x0
        start = end + 3 + kind.height // 3
        base = round(y + kind.height * 1.05)
        if rng.random() < 0.7:
            draw.line((start, base, x1, base), fill=ink, width=1)
        else:
            side = round(kind.height * 0.9)
            for i in range(int(rng.integers(1, 8))):
                left = start + i * (side + 3)
                draw.rectangle((left, base - side, left + side, base), outline=ink)
        y += kind.height * float(rng.uniform(1.8, 2.6))
    return y


def _figure(page: _Page, rng: np.random.Generator, x0: int, x1: int, y: float) -> float:
    """A box of drawings that are not text: plots, bars, shapes, hatching, a gradient; maybe a caption below."""
    from PIL import Image, ImageDraw

    w = x1 - x0
    h = round(min(page.height * float(rng.uniform(0.12, 0.4)), w * float(rng.uniform(0.3, 1.0))))
    if h < 8 or w < 8:
        return y + 8
    top = round(y)
    ink = page.ink(rng)
    # drawn on a crop of the page and pasted back, so that nothing reaches outside the box, where text goes
    figure = page.image.crop((x0, top, x1, top + h))
    if rng.random() < 0.3:  # a photo-like gradient
        ramp = np.linspace(float(rng.integers(0, 256)), float(rng.integers(0, 256)), w)[None, :] + np.zeros((h, 1))
        ramp += rng.normal(0, 12, (h, w))
        figure = Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(figure)
    for _ in range(int(rng.integers(2, 8))):
        kind = rng.random()
        a, b = rng.uniform(0, 1, 2) * (w, h), rng.uniform(0, 1, 2) * (w, h)
        box = (min(a[0], b[0]), min(a[1], b[1]), max(a[0], b[0]), max(a[1], b[1]))
        shade = page.ink(rng) if rng.random() < 0.7 else int(rng.integers(0, 256))
        width = int(rng.integers(1, 4))
        if kind < 0.2:  # a plotted curve on axes
            xs = np.linspace(4, w - 4, 40)
            ys = np.clip(h / 2 + np.cumsum(rng.normal(0, h / 20, 40)), 0, h)
            draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill=shade, width=width)
            draw.line((3, 2, 3, h - 3, w - 2, h - 3), fill=ink, width=1)
        elif kind < 0.35:  # bars
            bars = int(rng.integers(3, 12))
            step = w / bars
            for i in range(bars):
                draw.rectangle((i * step + step * 0.2, h * float(rng.uniform(0.1, 0.9)), (i + 1) * step - step * 0.2, h - 1), fill=shade)
        elif kind < 0.55:
            draw.ellipse(box, outline=shade, width=width, fill=shade if rng.random() < 0.3 else None)
        elif kind < 0.7:
            draw.rectangle(box, outline=shade, width=width, fill=shade if rng.random() < 0.3 else None)
        elif kind < 0.85:  # hatching
            gap = int(rng.integers(3, 8))
            for offset in range(-h, w, gap):
                draw.line((offset, h, offset + h, 0), fill=shade, width=1)
        else:
            points = list(zip(rng.uniform(0, w, 6).tolist(), rng.uniform(0, h, 6).tolist(), strict=True))
            draw.line(points, fill=shade, width=width, joint="curve")
    if rng.random() < 0.6:
        draw.rectangle((0, 0, w - 1, h - 1), outline=ink, width=1)
    page.image.paste(figure, (x0, top))
    y = top + h + 4
    if rng.random() < 0.5:
        size = int(rng.integers(SIZES[0], 14))
        kind_ = _type(rng, size)
        text = _words_to_fit(rng, kind_, w * float(rng.uniform(0.3, 1.0)), most=int(rng.integers(1, 10)))
        page.text(x0, y, text, kind_, page.ink(rng))
        y += kind_.height * 1.8
    return y


def _clutter(page: _Page, rng: np.random.Generator) -> None:
    """Marks anywhere on the page that are not text: rules, a border, scribbles, specks, punch holes."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(page.image)
    w, h = page.width, page.height
    if rng.random() < 0.25:
        inset = int(rng.integers(1, 12))
        draw.rectangle((inset, inset, w - 1 - inset, h - 1 - inset), outline=page.ink(rng), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.poisson(0.8))):
        if rng.random() < 0.5:
            yy = float(rng.uniform(0, h))
            draw.line((rng.uniform(0, w / 3), yy, rng.uniform(2 * w / 3, w), yy), fill=page.ink(rng), width=int(rng.integers(1, 4)))
        else:
            xx = float(rng.uniform(0, w))
            draw.line((xx, rng.uniform(0, h / 3), xx, rng.uniform(2 * h / 3, h)), fill=page.ink(rng), width=int(rng.integers(1, 3)))
    for _ in range(int(rng.poisson(0.5))):  # a scribble, a signature, a pen stroke across anything
        start = rng.uniform(0, 1, 2) * (w, h)
        steps = np.cumsum(rng.normal(0, max(w, h) / 25, (int(rng.integers(4, 12)), 2)), axis=0) + start
        draw.line([tuple(p) for p in steps.tolist()], fill=page.ink(rng), width=int(rng.integers(1, 4)), joint="curve")
    specks = int(rng.poisson(max(w * h / 4000, 1.0))) if rng.random() < 0.5 else 0
    for _ in range(specks):
        cx, cy, r = float(rng.uniform(0, w)), float(rng.uniform(0, h)), float(rng.uniform(0.5, 2.0))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=page.ink(rng))
    if rng.random() < 0.1:  # punch holes down one margin
        cx = float(rng.choice([rng.uniform(4, 12), rng.uniform(w - 12, w - 4)]))
        r = float(rng.uniform(3, 7))
        for cy in np.linspace(h * 0.2, h * 0.8, int(rng.integers(2, 4))):
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=int(rng.integers(0, 80)))


BLOCKS = (  # (kind, weight)
    (_paragraph, 0.42),
    (_heading, 0.12),
    (_table, 0.09),
    (_figure, 0.1),
    (_banner, 0.05),
    (_panel, 0.08),
    (_form, 0.07),
    (None, 0.07),  # a rule across the column, or empty space
)


def render_page(rng: np.random.Generator | int | Sequence[int], height: int = HEIGHT, width: int = WIDTH) -> tuple[Array, Array]:
    """One synthetic page: the grey image uint8 (height, width) and its text mask uint8 (height, width) in {0, 1}.

    ``rng`` is a numpy generator or a seed for one; the same seed draws the same page."""
    from PIL import Image, ImageDraw, ImageFilter

    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    paper = int(rng.integers(120, 256)) if rng.random() < 0.15 else int(rng.integers(185, 256))
    page = _Page(Image.new("L", (width, height), paper), Image.new("L", (width, height), 0), paper, width, height)

    columns = 1
    if width >= 160 and rng.random() < 0.35:
        columns = 2
    if width >= 400 and rng.random() < 0.3:
        columns = 3
    margin = int(rng.integers(-4, max(1, width // 10)))  # negative: the page is a crop, text cut at the edge
    gutter = int(rng.integers(8, 24))
    span = (width - 2 * margin - (columns - 1) * gutter) / columns
    y0 = float(rng.integers(-12, max(1, height // 10)))
    if columns > 1 and rng.random() < 0.4:  # a title across the columns
        y0 = _heading(page, rng, margin, width - margin, y0)
    kinds, weights = zip(*BLOCKS, strict=True)
    p = np.asarray(weights) / sum(weights)
    for c in range(columns):
        x0 = round(margin + c * (span + gutter))
        x1 = round(x0 + span)
        y = y0
        while y < height:
            block = kinds[int(rng.choice(len(kinds), p=p))]
            if block is None:
                if rng.random() < 0.5:
                    yy = round(y + 3)
                    ImageDraw.Draw(page.image).line((x0, yy, x1, yy), fill=page.ink(rng), width=int(rng.integers(1, 3)))
                y += float(rng.integers(6, 20))
                continue
            y = block(page, rng, x0, x1, y) + float(rng.integers(2, 14))
    _clutter(page, rng)

    image, mask = page.image, page.mask.point(_MASK_LUT)
    if rng.random() < 0.6:  # a page scanned askew
        angle = float(rng.uniform(-3.0, 3.0))
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=paper)
        mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    radius = float(rng.uniform(0.0, 1.1))
    if radius > 0.3:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    pixels = np.asarray(image, dtype=np.float32)
    ys, xs = np.linspace(-1.0, 1.0, height, dtype=np.float32), np.linspace(-1.0, 1.0, width, dtype=np.float32)
    pixels = pixels + ys[:, None] * float(rng.uniform(-30, 30)) + xs[None, :] * float(rng.uniform(-30, 30))
    if rng.random() < 0.5:  # sensor noise on half the pages (noisy pixels are most of what the shipped splits weigh)
        pixels += rng.normal(0.0, float(rng.uniform(1.0, 6.0)), pixels.shape).astype(np.float32)
    out = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    return out, (np.asarray(mask) >= 128).astype(np.uint8)


def render_pages(count: int, seed: int, height: int = HEIGHT, width: int = WIDTH, start: int = 0) -> tuple[Array, Array]:
    """Pages ``start`` .. ``start + count - 1`` of the set ``seed``: uint8 images (count, 1, H, W) and masks (count, H, W).

    Page ``i`` is drawn from its own generator (seeded ``[seed, i]``), so any page can be drawn alone."""
    images = np.empty((count, 1, height, width), dtype=np.uint8)
    masks = np.empty((count, height, width), dtype=np.uint8)
    for i in range(count):
        images[i, 0], masks[i] = render_page(np.random.default_rng([seed, start + i]), height, width)
    return images, masks
