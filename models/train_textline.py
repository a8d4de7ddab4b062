"""Train the CRNN text-line recogniser the calibration, speed and sweep benchmarks convert, and export it to ONNX.

Data: lines of random text rendered with Pillow in its built-in scalable font
(``ImageFont.load_default(size)``, Aileron; no system fonts): 1 to 20
characters drawn uniformly from :data:`models.textline.ALPHABET` (81: digits,
letters, punctuation, space; no leading, trailing or double spaces), font size
17 to 23 px (a line cropped and scaled to height 32, as a detector's crops are;
the range is narrower than the cap-height / x-height ratio, so that ``o`` and
``O`` differ in height even alone), random horizontal and vertical offsets,
grey levels of ink and paper, a linear illumination ramp, rotation by up to
±1.5°, Gaussian blur (radius up to 1 px) and Gaussian pixel noise (σ up to 8
grey levels), on a 32×256 canvas stored as uint8. Training lines are drawn afresh for every batch
(no line is seen twice); the calibration and test lines come from their own
seeds and are never trained on.

Network (a CRNN as deployed recognisers are built, Shi et al. 2015)::

    x / 127.5 - 1                                   normalisation inside the graph: the input is raw 0..255 pixels
    conv3x3  1->32,  BN, ReLU, maxpool 2x2          32x256 -> 16x128
    conv3x3 32->64,  BN, ReLU, maxpool 2x2          -> 8x64
    conv3x3 64->128, BN, ReLU
    conv3x3 128->128, BN, ReLU, maxpool (2,1)       -> 4x64
    conv3x3 128->192, BN, ReLU
    conv3x3 192->192, BN, ReLU, maxpool (2,1)       -> 2x64
    (N, C, 2, W/4) -> (N, W/4, 2C)                  permute + reshape, shapes computed at run time
    BiLSTM, 128 per direction                       over the W/4 time steps
    Linear 256 -> 82 per time step                  logits; class 0 is the CTC blank

CTC loss, AdamW with a one-cycle schedule. BatchNorm is folded into the convs
by the exporter. The ONNX model has a dynamic batch axis and a dynamic width
axis (any multiple of 4 columns): input ``input`` (batch, 1, 32, width) float32
0..255, output ``logits`` (batch, width/4, 82). Its output is checked against
torch's (and its test accuracy in onnxruntime) before the script ends.

Writes (into the folder given, default: this script's folder)::

    textline_crnn.onnx            the recogniser
    textline_calibration.npz      input (512, 1, 32, 256) uint8
    textline_test.npz             input (600, 1, 32, 256) uint8, labels_text (600,) unicode,
                                  labels (600, 20) int64 class sequences padded with -1

Seeded (the same seeds draw the same lines). Needs torch and Pillow
(``pip install -e '.[models]'``)::

    python models/train_textline.py             # or: python models/train_textline.py OUT_DIR [--steps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import cache
from pathlib import Path

# OpenMP threads that sleep when idle instead of spinning: on a machine whose cores other jobs share,
# spinning threads were measured to make a training step 3x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `models` is a folder of scripts beside the package

from models.textline import ALPHABET, HEIGHT, STRIDE, WIDTH, encode_labels, greedy_decode, read_lines, score

SEED = 0
TEST_SEED, CALIBRATION_SEED = 1, 2
TEST_LINES, CALIBRATION_LINES = 600, 512
STEPS = 1800
BATCH = 32
MAX_LENGTH = 20
FONT_SIZES = (17, 23)  # inclusive; less than the cap/x-height ratio apart, so that 'o' and 'O' differ in height
CLASSES = len(ALPHABET) + 1
# channels of the 3x3 convs; "M" halves height and width, "H" halves the height only
LAYOUT: list[int | str] = [16, "M", 48, "M", 96, 96, "H", 128, 128, "H"]
HIDDEN = 128


# --------------------------------------------------------------------------- data


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    font = ImageFont.load_default(size=size)
    assert isinstance(font, ImageFont.FreeTypeFont), "Pillow was built without FreeType: load_default(size) needs it"
    return font


def random_text(rng: np.random.Generator) -> str:
    """1..MAX_LENGTH characters from the alphabet: no leading, trailing or doubled spaces (a line as it is cropped)."""
    length = int(rng.integers(1, MAX_LENGTH + 1))
    chars = [ALPHABET[i] for i in rng.integers(0, len(ALPHABET), size=length)]
    text = "".join(chars)
    while "  " in text:
        text = text.replace("  ", " ")
    text = text.strip()
    return text or ALPHABET[int(rng.integers(0, 62))]


def render(text: str, rng: np.random.Generator, width: int = WIDTH) -> tuple[np.ndarray, str]:
    """One line of ``text`` as a (32, width) uint8 image; the text is cut at the end if it cannot fit at the least font size."""
    size = int(rng.integers(FONT_SIZES[0], FONT_SIZES[1] + 1))
    while True:
        font = _font(size)
        left, _, right, _ = font.getbbox(text)
        if right - left <= width - 4 or size <= FONT_SIZES[0]:
            break
        size -= 1
    while right - left > width - 4:  # at the least size and still too wide: drop characters from the end
        text = text[:-1].rstrip()
        left, _, right, _ = font.getbbox(text)
    paper = int(rng.integers(150, 256))
    ink = int(rng.integers(0, max(1, paper - 90)))
    image = Image.new("L", (width, HEIGHT), paper)
    ascent, descent = font.getmetrics()
    x = int(rng.integers(2, max(3, width - 2 - (right - left)))) - left
    # vertical: the font's line box (ascent + descent) centred, jittered by a few pixels
    y = (HEIGHT - (ascent + descent)) // 2 + int(rng.integers(-2, 3))
    ImageDraw.Draw(image).text((x, y), text, font=font, fill=ink)
    angle = float(rng.uniform(-1.5, 1.5))
    image = image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=paper)
    radius = float(rng.uniform(0.0, 1.0))
    if radius > 0.2:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    pixels = np.asarray(image, dtype=np.float32)
    ramp = np.linspace(-1.0, 1.0, width, dtype=np.float32) * float(rng.uniform(-25, 25))
    pixels = pixels + ramp[None, :] + rng.normal(0.0, float(rng.uniform(0, 8)), pixels.shape).astype(np.float32)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), text


def make_lines(count: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``count`` rendered lines as uint8 (count, 1, 32, 256) and their strings."""
    images = np.empty((count, 1, HEIGHT, WIDTH), dtype=np.uint8)
    texts = []
    for i in range(count):
        images[i, 0], text = render(random_text(rng), rng)
        texts.append(text)
    return images, texts


def encode(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CTC targets: the concatenated class indices (1-based) and each line's length."""
    index = {c: i + 1 for i, c in enumerate(ALPHABET)}
    flat = [index[c] for t in texts for c in t]
    return torch.tensor(flat, dtype=torch.long), torch.tensor([len(t) for t in texts], dtype=torch.long)


# --------------------------------------------------------------------------- model


class CRNN(nn.Module):
    """3x3 conv-BN-ReLU stack (VGG style), BiLSTM over the columns, a linear classifier per time step."""

    def __init__(self, layout: list[int | str] = LAYOUT, hidden: int = HIDDEN, classes: int = CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels, height = 1, HEIGHT
        for item in layout:
            if item in ("M", "H"):
                layers.append(nn.MaxPool2d(2) if item == "M" else nn.MaxPool2d((2, 1)))
                height //= 2
                continue
            out = int(item)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.rnn = nn.LSTM(channels * height, hidden, bidirectional=True, batch_first=True)
        self.classifier = nn.Linear(2 * hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x / 127.5 - 1.0)  # (N, C, H, T)
        x = x.permute(0, 3, 1, 2).flatten(2)  # (N, T, C*H)
        x, _ = self.rnn(x)
        return self.classifier(x)  # (N, T, classes)


# --------------------------------------------------------------------------- training


@torch.no_grad()
def read(model: nn.Module, x: np.ndarray, batch: int = 128) -> list[str]:
    model.eval()
    out: list[str] = []
    for start in range(0, len(x), batch):
        logits = model(torch.from_numpy(x[start : start + batch].astype(np.float32)))
        out += greedy_decode(logits.numpy())
    return out


def train(model: nn.Module, steps: int, valid: tuple[np.ndarray, list[str]]) -> None:
    rng = np.random.default_rng(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    ctc = nn.CTCLoss(blank=0, zero_infinity=True)
    total, start = 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        model.train()
        images, texts = make_lines(BATCH, rng)
        targets, lengths = encode(texts)
        logits = model(torch.from_numpy(images.astype(np.float32)))  # (N, T, C)
        log_probs = F.log_softmax(logits, dim=2).transpose(0, 1)  # (T, N, C), as CTCLoss wants
        steps_per_line = torch.full((len(texts),), logits.shape[1], dtype=torch.long)
        loss = ctc(log_probs, targets, steps_per_line, lengths)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        schedule.step()
        total += float(loss.detach())
        if step % 250 == 0 or step == steps:
            since = step - (step - 1) // 250 * 250  # steps since the last printout
            metrics = score(read(model, valid[0]), valid[1])
            print(
                f"step {step:5d}  loss {total / since:.4f}  valid exact {metrics['exact_accuracy']:.4f} cer {metrics['cer']:.4f}"
                f"  {time.perf_counter() - start:.0f} s",
                flush=True,
            )
            total = 0.0


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(1, 1, HEIGHT, WIDTH)
    # the TorchScript exporter folds eval-mode BatchNorm into the convs and exports the LSTM as one ONNX LSTM node
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch", 3: "width"}, "logits": {0: "batch", 1: "steps"}},
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(
        proto, {"alphabet": ALPHABET, "blank": "0", "stride": str(STRIDE), "input": "grey pixels 0..255, height 32"}
    )
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def check_export(model: nn.Module, path: Path, x: np.ndarray) -> float:
    """Largest |onnxruntime - torch| logit difference over ``x`` at its own width and at two other widths."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    model.eval()
    for width in (x.shape[3], 128, 320):
        batch = np.zeros((len(x), 1, HEIGHT, width), dtype=np.float32) + 255.0
        w = min(width, x.shape[3])
        batch[..., :w] = x[..., :w]
        with torch.no_grad():
            expected = model(torch.from_numpy(batch)).numpy()
        got = session.run(["logits"], {"input": batch})[0]
        assert got.shape == expected.shape, (got.shape, expected.shape)
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).resolve().parent), help="output folder")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps of {BATCH} lines (default {STEPS})")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)

    t0 = time.perf_counter()
    test_x, test_y = make_lines(TEST_LINES, np.random.default_rng(TEST_SEED))
    calib_x, _ = make_lines(CALIBRATION_LINES, np.random.default_rng(CALIBRATION_SEED))
    valid = make_lines(256, np.random.default_rng(SEED + 100))  # progress printouts only
    print(f"rendered the fixed splits in {time.perf_counter() - t0:.1f} s", flush=True)

    model = CRNN()
    start = time.perf_counter()
    train(model, args.steps, valid)
    seconds = time.perf_counter() - start
    torch_metrics = score(read(model, test_x), test_y)

    onnx_path = out / "textline_crnn.onnx"
    export(model, onnx_path)
    worst = check_export(model, onnx_path, test_x[:16].astype(np.float32))
    labels = encode_labels(list(test_y))  # the class sequences `decompose --max-drop --eval-inputs` scores strings by
    np.savez_compressed(out / "textline_test.npz", input=test_x, labels_text=np.array(test_y), labels=labels)
    np.savez_compressed(out / "textline_calibration.npz", input=calib_x)
    ort_metrics = score(read_lines(onnx_path, test_x), test_y)

    params = sum(p.numel() for p in model.parameters())
    print(f"trained {args.steps} steps x {BATCH} lines in {seconds:.1f} s; {params / 1e6:.2f} M parameters")
    print(f"test ({len(test_y)} lines): torch {torch_metrics}; onnxruntime {ort_metrics}")
    print(f"largest |onnxruntime - torch| logit difference (widths {WIDTH}, 128, 320): {worst:.2e}")
    for name in ("textline_crnn.onnx", "textline_test.npz", "textline_calibration.npz"):
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
