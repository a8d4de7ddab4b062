"""Models with run-time shapes and control flow, exported from torch with dynamic axes, for the sizing tests.

* ``crnn``: an OCR text recogniser — a conv stack, the features reshaped into a sequence at run time, a
  bidirectional LSTM and a per-time-step Linear (a MatMul over T rows), dynamic batch and width;
* ``audio``: a Conv1d stack behind a Pad whose amount is computed from the input length (an STFT-like strided
  conv), and a Conv2d behind a run-time Reshape, dynamic batch and length;
* ``branchy``: convs in both branches of an If on the input width (torch.jit.script), dynamic H/W;
* ``yolo``: a YOLO-style detector — stride-2 backbone, nearest upsampling and Concat, two heads decoded with
  grids built from run-time shapes — dynamic batch, H and W.

Each entry gives the exported file's input name, the reference input shape the tests size it by, and the
dynamic axes of the export.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class CRNN(nn.Module):
    def __init__(self, classes: int = 37) -> None:
        super().__init__()

        def block(i: int, o: int, pool: Any) -> list[nn.Module]:
            return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), *([nn.MaxPool2d(pool)] if pool else [])]

        self.cnn = nn.Sequential(
            *block(1, 32, 2), *block(32, 64, 2), *block(64, 128, None), *block(128, 128, (2, 1)),
            *block(128, 256, None), *block(256, 256, (2, 1)), nn.Conv2d(256, 256, (2, 1)),
        )  # fmt: skip
        self.rnn = nn.LSTM(256, 128, bidirectional=True)
        self.fc = nn.Linear(256, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.cnn(x)  # (B, 256, 1, W/4)
        b, c, h, w = f.shape
        seq = f.reshape(b, c * h, w).permute(2, 0, 1)  # (T, B, C)
        y, _ = self.rnn(seq)
        return self.fc(y)  # (T, B, classes)


class Audio1d(nn.Module):
    def __init__(self, hop: int = 64) -> None:
        super().__init__()
        self.hop = hop
        self.stft = nn.Conv1d(1, 130, 256, stride=hop)
        self.body = nn.Sequential(nn.Conv1d(130, 128, 5, padding=2), nn.ReLU(), nn.Conv1d(128, 128, 5, padding=2), nn.ReLU())
        self.conv2d = nn.Conv2d(1, 16, 3, padding=1)
        self.head = nn.Conv1d(128, 64, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L)
        b, n = x.shape
        pad = (self.hop - n % self.hop) % self.hop + 192
        x = F.pad(x.reshape(b, 1, n), (96, pad - 96), mode="reflect")
        h = self.body(self.stft(x).abs())
        y = self.conv2d(h.reshape(b, 1, h.shape[1], h.shape[2])).mean(1)
        return self.head(y)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.b = nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.Conv2d(32, 32, 5, padding=2), nn.Conv2d(32, 32, 3, padding=1))
        self.post = nn.Conv2d(32, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] > 48:
            y = self.a(x)
        else:
            y = self.b(x)
        return self.post(y)


class YOLOish(nn.Module):
    def __init__(self, classes: int = 8, anchors: int = 3) -> None:
        super().__init__()

        def conv(i: int, o: int, s: int = 1) -> nn.Module:
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.SiLU())

        self.s1 = nn.Sequential(conv(3, 16, 2), conv(16, 32, 2), conv(32, 32))
        self.s2 = nn.Sequential(conv(32, 64, 2), conv(64, 64))
        self.s3 = nn.Sequential(conv(64, 128, 2), conv(128, 128))
        self.lateral = conv(128 + 64, 64)
        self.no, self.na = classes + 5, anchors
        self.h2 = nn.Conv2d(64, anchors * self.no, 1)
        self.h3 = nn.Conv2d(128, anchors * self.no, 1)

    def decode(self, p: torch.Tensor, stride: int) -> torch.Tensor:
        b, _, h, w = p.shape
        p = p.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2)
        gy, gx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        grid = torch.stack((gx, gy), -1).view(1, 1, h, w, 2).float()
        xy = (p[..., :2].sigmoid() + grid) * stride
        return torch.cat((xy, p[..., 2:]), -1).reshape(b, -1, self.no)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = self.s2(self.s1(x))
        x3 = self.s3(x2)
        merged = self.lateral(torch.cat([F.interpolate(x3, scale_factor=2.0, mode="nearest"), x2], 1))
        return torch.cat([self.decode(self.h2(merged), 16), self.decode(self.h3(x3), 32)], 1)


# name -> (module factory, input name, reference shape, dynamic axes of the input, output name, dynamic axes of the output)
MODELS: dict[str, tuple[Any, str, tuple[int, ...], dict[int, str], str, dict[int, str]]] = {
    "crnn": (CRNN, "image", (1, 1, 32, 256), {0: "batch", 3: "width"}, "logits", {0: "steps", 1: "batch"}),
    "audio": (Audio1d, "audio", (1, 16000), {0: "batch", 1: "samples"}, "features", {0: "batch", 2: "frames"}),
    "branchy": (Branchy, "x", (1, 3, 64, 64), {0: "batch", 2: "height", 3: "width"}, "y", {0: "batch", 2: "height", 3: "width"}),
    "yolo": (YOLOish, "images", (1, 3, 320, 320), {0: "batch", 2: "height", 3: "width"}, "pred", {0: "batch", 1: "boxes"}),
}


def export(name: str, path: Path) -> Path:
    """Export model ``name`` (seeded weights, eval mode) with the TorchScript exporter and its dynamic axes."""
    factory, input_name, shape, in_axes, output_name, out_axes = MODELS[name]
    torch.manual_seed(0)
    module = factory().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter and torch.jit.script announce their deprecation
        if name == "branchy":
            module = torch.jit.script(module)  # the data-dependent branch becomes an If
        torch.onnx.export(
            module,
            (torch.randn(*shape),),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: in_axes, output_name: out_axes},
            opset_version=17,
            dynamo=False,
        )
    return path
