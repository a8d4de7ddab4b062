"""Voice-activity models whose path depends on an input's value, exported from torch, for the ``--sample`` tests.

Both take a float chunk of audio ``input`` (batch, 576), a float recurrent ``state`` (2, batch, 128) and an
int64 scalar ``sr``, the sample rate, whose *value* picks the path (as the VAD models shipped in audio
packages do):

* ``vad16`` (opset 16): an ``If`` on ``sr == 16000`` selects a 16 kHz front end (an STFT-like strided conv over
  256 samples and a conv over its 129 bins) or, on ``sr == 8000``, an 8 kHz one (128 samples, 65 bins); any
  other rate yields no frames, and the shared encoder after it cannot run (onnxruntime refuses a 1-D input to
  its Conv) — a random ``sr`` sends the run down that path;
* ``vad18`` (opset 18): two whole sub-networks (front end, encoder, LSTM cell, decoder), one per rate, selected
  by ``sr == 16000`` — a random ``sr`` runs the 8 kHz one.

Weights are seeded; the export is the TorchScript exporter's, the branches scripted (``torch.jit.script``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLES = 576
HIDDEN = 128


class FrontEnd(nn.Module):
    """An STFT-like strided conv (``bins`` * 2 filters over ``window`` samples), the magnitude, a conv over the bins."""

    def __init__(self, window: int, hop: int, kernel: int) -> None:
        super().__init__()
        self.bins = window // 2 + 1
        self.pad = window // 4
        self.stft = nn.Conv1d(1, 2 * self.bins, window, stride=hop, bias=False)
        self.conv = nn.Conv1d(self.bins, HIDDEN, kernel, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, HIDDEN, frames)
        x = F.pad(x.unsqueeze(1), (0, self.pad), mode="reflect")
        spec = self.stft(x)
        real, imag = spec[:, : self.bins], spec[:, self.bins :]
        return F.relu(self.conv(torch.sqrt(real * real + imag * imag + 1e-6)))


class Encoder(nn.Module):
    """Two convs, the mean over time, an LSTM cell on the state, a 1x1 decoder: (features, state) -> (prob, state)."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv1d(HIDDEN, HIDDEN, 3, padding=1), nn.ReLU(), nn.Conv1d(HIDDEN, HIDDEN, 3, padding=1), nn.ReLU())
        self.cell = nn.LSTMCell(HIDDEN, HIDDEN)
        self.decoder = nn.Conv1d(HIDDEN, 1, 1)

    def forward(self, features: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.convs(features).mean(-1)
        h, c = self.cell(pooled, (state[0], state[1]))
        prob = torch.sigmoid(self.decoder(h.unsqueeze(-1))).squeeze(-1)
        return prob, torch.stack([h, c])


class Vad16(nn.Module):
    """One encoder behind a front end per rate; an unsupported rate yields no frames."""

    def __init__(self) -> None:
        super().__init__()
        self.front16 = FrontEnd(256, 64, 3)
        self.front8 = FrontEnd(128, 32, 5)
        self.encoder = Encoder()

    def forward(self, x: torch.Tensor, state: torch.Tensor, sr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bool(sr == 16000):
            features = self.front16(x)
        elif bool(sr == 8000):
            features = self.front8(x)
        else:
            features = torch.zeros(0)  # no frames at a rate the model was not trained for
        return self.encoder(features, state)


class Vad18(nn.Module):
    """Two whole sub-networks, one per rate."""

    def __init__(self) -> None:
        super().__init__()
        self.front16, self.encoder16 = FrontEnd(256, 64, 3), Encoder()
        self.front8, self.encoder8 = FrontEnd(128, 32, 5), Encoder()

    def forward(self, x: torch.Tensor, state: torch.Tensor, sr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if bool(sr == 16000):
            prob, new_state = self.encoder16(self.front16(x), state)
        else:
            prob, new_state = self.encoder8(self.front8(x), state)
        return prob, new_state


MODELS = {"vad16": (Vad16, 16), "vad18": (Vad18, 18)}


def export(name: str, path: Path) -> Path:
    """Export ``name`` (seeded weights, eval mode) with dynamic batch; the path is scripted so the branch on
    ``sr`` becomes an If."""
    factory, opset = MODELS[name]
    torch.manual_seed(0)
    x, state, sr = torch.randn(1, SAMPLES), torch.zeros(2, 1, HIDDEN), torch.tensor(16000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter and torch.jit.script announce their deprecation
        module = torch.jit.script(factory().eval())
        torch.onnx.export(
            module,
            (x, state, sr),
            str(path),
            input_names=["input", "state", "sr"],
            output_names=["output", "stateN"],
            dynamic_axes={"input": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def sample(rate: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One input set as the model takes it: a chunk of audio, a zero state, the rate as a 0-d int64 array."""
    rng = np.random.default_rng(seed)
    return {
        "input": rng.standard_normal((1, SAMPLES)).astype(np.float32),
        "state": np.zeros((2, 1, HIDDEN), np.float32),
        "sr": np.array(rate, np.int64),
    }
