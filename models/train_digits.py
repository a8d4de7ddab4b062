"""Train the small digits CNN the accuracy benchmark decomposes, and export it to ONNX.

A VGG/NIN-style network on scikit-learn's bundled digits data set (1,797 8x8
grey images of the digits 0-9, no download): the images are scaled to [-1, 1]
and upsampled to 32x32 (bilinear), so the 3x3 convs see real spatial
structure. Six 3x3 convs (32-64 channels, BatchNorm, ReLU, three 2x2 max
pools), global average pooling and one linear layer; about 140 k parameters.
BatchNorm is folded into the convs by the exporter, so every conv of the ONNX
model carries a bias.

Split (stratified, seed 0): 60 % train, 15 % calibration, 25 % test. The
calibration samples are never trained on and never tested on; they are what a
data-aware refit may look at.

Writes (into the folder given, default: this script's folder)::

    digits_cnn.onnx           input "input" (batch, 1, 32, 32) float32 -> "logits" (batch, 10)
    digits_test.npz           input (450, 1, 32, 32) float32, labels (450,) int64
    digits_calibration.npz    input (270, 1, 32, 32) float32

Seeded and deterministic on CPU (two runs write byte-identical files); trains in
about a minute on two idle cores (test accuracy 100 %, 450/450)::

    python models/train_digits.py            # or: python models/train_digits.py OUT_DIR
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
SIZE = 32
EPOCHS = 14
BATCH = 64
# channels of the six 3x3 convs; "M" is a 2x2 max pool
LAYOUT: list[int | str] = [32, 32, "M", 64, 64, "M", 64, 64, "M"]


class DigitsCNN(nn.Module):
    """Six 3x3 conv-BN-ReLU blocks with three max pools, global average pooling, one linear layer."""

    def __init__(self, layout: list[int | str] = LAYOUT, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            out = int(item)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(x.mean(dim=(2, 3)))


def load_splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Preprocessed (N, 1, 32, 32) float32 images and int64 labels for train / calibration / test."""
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0 * 2.0 - 1.0)[:, None]  # [-1, 1]
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()
    labels = digits.target.astype(np.int64)
    index = np.arange(len(labels))
    rest, test = train_test_split(index, test_size=0.25, random_state=SEED, stratify=labels)
    # 15 % of the whole set = 20 % of the remaining 75 %
    train, calib = train_test_split(rest, test_size=0.20, random_state=SEED, stratify=labels[rest])
    return {name: (images[idx], labels[idx]) for name, idx in (("train", train), ("calibration", calib), ("test", test))}


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 3) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (background -1 fills the gap): cheap augmentation."""
    n = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + SIZE, dx[i] : dx[i] + SIZE]
    return out


def train(model: nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    generator = torch.Generator().manual_seed(SEED)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    steps = EPOCHS * -(-len(xs) // BATCH)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    model.train()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(xs), generator=generator)
        total = 0.0
        for start in range(0, len(xs), BATCH):
            idx = order[start : start + BATCH]
            loss = F.cross_entropy(model(_shift(xs[idx], generator)), ys[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        print(f"epoch {epoch + 1:2d}  loss {total / len(xs):.4f}")


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    dummy = torch.zeros(1, 1, SIZE, SIZE)
    # the TorchScript exporter folds eval-mode BatchNorm into the convs and names I/O as asked
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).resolve().parent), help="output folder")
    args = parser.parse_args()
    out = Path(args.out)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    splits = load_splits()
    model = DigitsCNN()
    start = time.perf_counter()
    train(model, *splits["train"])
    seconds = time.perf_counter() - start
    test_acc = accuracy(model, *splits["test"])
    calib_acc = accuracy(model, *splits["calibration"])
    export(model, out / "digits_cnn.onnx")
    np.savez_compressed(out / "digits_test.npz", input=splits["test"][0], labels=splits["test"][1])
    np.savez_compressed(out / "digits_calibration.npz", input=splits["calibration"][0])

    # the exported model must agree with torch: check test accuracy in onnxruntime
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "digits_cnn.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"input": splits["test"][0]})[0]
    ort_acc = float((logits.argmax(1) == splits["test"][1]).mean())
    sizes = {k: len(v[1]) for k, v in splits.items()}
    print(f"samples: {sizes}")
    print(f"trained in {seconds:.1f} s; test accuracy {test_acc:.4f} (onnxruntime {ort_acc:.4f}), calibration accuracy {calib_acc:.4f}")
    print(f"wrote {out / 'digits_cnn.onnx'} ({(out / 'digits_cnn.onnx').stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
