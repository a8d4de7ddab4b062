"""A DB-style text detector at 640x640 for the cost benchmarks, exported from torch with seeded random weights.

The shape of a light scene-text detector (differentiable binarization, Liao et al., AAAI 2020): a
MobileNetV2-style backbone at width 0.5 (51 convs: the stem, then expand 1x1 / depthwise 3x3 / project 1x1
blocks), a feature pyramid over strides 4, 8, 16 and 32 (a 1x1 lateral and a 3x3 smoothing conv per level,
upsampled to stride 4 and concatenated) and the two DB heads (probability and threshold: a 3x3 conv, then two
stride-2 ConvTranspose back to full size). 61 Conv and 4 ConvTranspose nodes, 1.6 GMACs per 640x640 page,
BatchNormalization folded by the exporter (eval mode). Input ``images`` (batch, 3, 640, 640), symbolic batch;
outputs ``probability`` and ``threshold`` (batch, 1, 640, 640).

The weights are random: the benchmarks that use it measure cost (time, memory, passes), not accuracy.
``tests/dynamic_models.py``'s YOLO-style model (10 convs, dynamic H/W) is the other detector they take at 640x640.

    python benchmarks/detector.py OUT.onnx
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 640
WIDTH = 0.5
# MobileNetV2's inverted residual settings: expansion, output channels, repeats, first stride
SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
FPN_INNER = 64


def _width(channels: int) -> int:
    return max(8, int(channels * WIDTH + 4) // 8 * 8)


def _conv(i: int, o: int, k: int, s: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(i, o, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(o)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, i: int, o: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = i * expand
        layers = [_conv(i, hidden, 1)] if expand != 1 else []
        layers += [_conv(hidden, hidden, 3, stride, groups=hidden), _conv(hidden, o, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and i == o

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class DBDetector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        channels = _width(32)
        self.stem = _conv(3, channels, 3, 2)
        blocks: list[nn.Module] = []
        self.taps: list[int] = []  # block indices whose outputs feed the pyramid (strides 4, 8, 16, 32)
        tapped: list[int] = []
        for expand, out, repeats, stride in SETTINGS:
            out = _width(out)
            for r in range(repeats):
                blocks.append(InvertedResidual(channels, out, stride if r == 0 else 1, expand))
                channels = out
            if out in (_width(24), _width(32), _width(96), _width(320)):
                self.taps.append(len(blocks) - 1)
                tapped.append(out)
        self.blocks = nn.ModuleList(blocks)
        self.lateral = nn.ModuleList(nn.Conv2d(c, FPN_INNER, 1, bias=False) for c in tapped)
        self.smooth = nn.ModuleList(nn.Conv2d(FPN_INNER, FPN_INNER // 4, 3, padding=1, bias=False) for _ in tapped)
        self.probability = self._head()
        self.threshold = self._head()

    @staticmethod
    def _head() -> nn.Sequential:
        inner = FPN_INNER // 4
        return nn.Sequential(
            nn.Conv2d(FPN_INNER, inner, 3, padding=1, bias=False),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(inner, inner, 2, 2),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(inner, 1, 2, 2),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = []
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                features.append(x)
        laterals = [lat(f) for lat, f in zip(self.lateral, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        size = laterals[0].shape[2:]
        fused = torch.cat([F.interpolate(s(f), size=size, mode="nearest") for s, f in zip(self.smooth, laterals, strict=True)], 1)
        return self.probability(fused), self.threshold(fused)


def export(path: str | Path, seed: int = 0) -> Path:
    """Export the detector (seeded weights and BatchNorm statistics, eval mode) to ``path``."""
    torch.manual_seed(seed)
    module = DBDetector()
    with torch.no_grad():  # BatchNorm statistics of a trained model rather than the identity
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    module.eval()
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(1, 3, SIZE, SIZE),),
            str(path),
            input_names=["images"],
            output_names=["probability", "threshold"],
            dynamic_axes={"images": {0: "batch"}, "probability": {0: "batch"}, "threshold": {0: "batch"}},
            opset_version=17,
            dynamo=False,
            do_constant_folding=True,
        )
    return path


def export_yolo(path: str | Path) -> Path:
    """``tests/dynamic_models.py``'s YOLO-style detector (dynamic batch, H and W), exported as the tests export it."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from dynamic_models import export as export_dynamic

    return export_dynamic("yolo", Path(path))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--yolo", action="store_true", help="export tests/dynamic_models.py's YOLO-style model instead")
    args = parser.parse_args()
    print(export_yolo(args.out) if args.yolo else export(args.out))
