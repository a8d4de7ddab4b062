"""The text-line recogniser's task metric: greedy CTC decoding, exact-string accuracy, character error rate.

The recogniser of ``models/train_textline.py`` (``textline_crnn.onnx``) reads one
line of printed text: input ``input`` (batch, 1, 32, width) float32 holding raw
grey pixel values 0..255 (the normalisation is inside the graph; width is a
dynamic axis, 256 for the shipped data), output ``logits`` (batch, width / 4,
classes): one score vector per 4-pixel column. Class 0 is the CTC blank, class
``i`` >= 1 is ``ALPHABET[i - 1]``.

Greedy (best-path) CTC decoding takes the arg-max class of each time step,
merges runs of the same class and drops blanks: ``a a - a b b`` reads ``aab``.

Metrics over a set of lines, against the reference strings:

* exact-string accuracy: the share of lines read exactly;
* character error rate (CER): Σ edit distance(read, reference) / Σ len(reference),
  with the Levenshtein distance (insertions, deletions, substitutions each cost 1);
* agreement between two models (a converted model and its original): the share
  of lines both read identically, right or wrong, and the CER of one against the other.

The shipped splits (``textline_test.npz``, ``textline_calibration.npz``) hold
``input`` as uint8 (N, 1, 32, 256); the test split also holds ``labels_text``,
a numpy unicode array (N,) of the reference strings (the key is not ``labels``:
that name means class indices to ``onnx-lowrank verify``). Needs numpy and
onnxruntime only::

    from models.textline import load_split, read_lines, score
    x, labels = load_split("models/textline_test.npz")
    print(score(read_lines("models/textline_crnn.onnx", x), labels))
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "ALPHABET",
    "BLANK",
    "HEIGHT",
    "STRIDE",
    "WIDTH",
    "agreement",
    "character_error_rate",
    "edit_distance",
    "encode_labels",
    "exact_accuracy",
    "greedy_decode",
    "load_split",
    "read_lines",
    "score",
]

# digits, letters, the punctuation of ordinary printed text, and the space
ALPHABET = string.digits + string.ascii_letters + " !\"#%&'()*+,-./:;?@"
BLANK = 0  # class 0; class i >= 1 is ALPHABET[i - 1]
HEIGHT = 32  # input height in pixels
WIDTH = 256  # width of the shipped lines (the model accepts any multiple of 4)
STRIDE = 4  # input columns per output time step


def encode_labels(texts: list[str], alphabet: str = ALPHABET) -> npt.NDArray[np.int64]:
    """Strings as ``(N, longest)`` class sequences padded with -1: the ``labels`` of onnx-lowrank's evaluation inputs."""
    longest = max((len(t) for t in texts), default=0)
    out = np.full((len(texts), longest), -1, dtype=np.int64)
    for row, text in enumerate(texts):
        out[row, : len(text)] = [alphabet.index(c) + 1 for c in text]
    return out


def greedy_decode(logits: npt.NDArray[Any], alphabet: str = ALPHABET) -> list[str]:
    """Best-path CTC decoding of (batch, time, classes) scores: arg-max per step, merge repeats, drop blanks."""
    if logits.ndim != 3 or logits.shape[2] != len(alphabet) + 1:
        raise ValueError(f"expected logits (batch, time, {len(alphabet) + 1}), got shape {logits.shape}")
    best = logits.argmax(axis=2)
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]  # a class repeated on consecutive steps is one character
    return ["".join(alphabet[c - 1] for c in row[mask]) for row, mask in zip(best, keep, strict=True)]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``a`` into ``b``."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def exact_accuracy(read: Sequence[str], reference: Sequence[str]) -> float:
    """Share of lines read exactly."""
    _same_length(read, reference)
    return float(np.mean([a == b for a, b in zip(read, reference, strict=True)]))


def character_error_rate(read: Sequence[str], reference: Sequence[str]) -> float:
    """Σ edit distance / Σ reference length (0 is perfect; can exceed 1 when much extra text is read)."""
    _same_length(read, reference)
    total = sum(len(b) for b in reference)
    if total == 0:
        raise ValueError("the reference strings are all empty: the character error rate is undefined")
    return sum(edit_distance(a, b) for a, b in zip(read, reference, strict=True)) / total


def agreement(read: Sequence[str], original: Sequence[str]) -> dict[str, float]:
    """How closely a converted model reads like its original: identical strings, and the CER against the original's strings."""
    _same_length(read, original)
    same = float(np.mean([a == b for a, b in zip(read, original, strict=True)]))
    total = sum(len(b) for b in original)
    cer = sum(edit_distance(a, b) for a, b in zip(read, original, strict=True)) / total if total else float("nan")
    return {"string_agreement": same, "cer_vs_original": cer}


def score(read: Sequence[str], reference: Sequence[str]) -> dict[str, float]:
    """Exact-string accuracy and character error rate of the read strings."""
    return {"exact_accuracy": exact_accuracy(read, reference), "cer": character_error_rate(read, reference)}


def load_split(path: str | Path) -> tuple[npt.NDArray[Any], list[str] | None]:
    """The lines (uint8, (N, 1, 32, W)) of a shipped split and its reference strings (``None`` for the calibration split)."""
    with np.load(path, allow_pickle=False) as data:
        x = data["input"]
        labels = [str(s) for s in data["labels_text"]] if "labels_text" in data else None
    return x, labels


def read_lines(model: Any, x: npt.NDArray[Any], batch: int = 64, threads: int = 0) -> list[str]:
    """The strings a model reads: ``model`` is an ONNX path, a ``ModelProto`` or an onnxruntime session."""
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
    out: list[str] = []
    for start in range(0, len(x), batch):
        feed = np.ascontiguousarray(x[start : start + batch], dtype=np.float32)
        out += greedy_decode(np.asarray(session.run(None, {name: feed})[0]))
    return out


def _same_length(a: Sequence[str], b: Sequence[str]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} read strings against {len(b)} references")
