"""The uncertainty of a measured speedup: a confidence interval from paired, interleaved runs (pure numpy).

Two models timed alternately give pairs ``(o_i, c_i)`` of milliseconds taken at
the same moments of the machine. The speedup is the ratio of the medians,
``median(o) / median(c)``. Its 95 % interval comes from the bootstrap over
pairs: resample the pairs with replacement ``B`` times, take the ratio of the
medians of each resample, and keep the 2.5th and 97.5th percentiles (the
percentile bootstrap; resampling whole pairs keeps what the two runs of a
round share — a busy moment slows both). The resampling is seeded, so the
same times give the same interval.

A median of a handful of runs has a coarse bootstrap distribution: with fewer
than :data:`MIN_PAIRS` pairs the interval is not computed (``None``), and the
caller takes more runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["MIN_PAIRS", "SpeedupEstimate", "speedup_estimate"]

MIN_PAIRS = 5
RESAMPLES = 2000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class SpeedupEstimate:
    """Original / candidate milliseconds over paired runs: medians, their ratio and its interval."""

    original_ms: float
    candidate_ms: float
    low: float | None  # the interval's ends; None with too few pairs
    high: float | None
    runs: int  # pairs
    confidence: float = CONFIDENCE

    @property
    def ratio(self) -> float:
        return self.original_ms / self.candidate_ms

    @property
    def relative_width(self) -> float:
        """``(high − low) / ratio``: infinite when no interval could be computed."""
        if self.low is None or self.high is None:
            return float("inf")
        return (self.high - self.low) / self.ratio

    @property
    def lower(self) -> float:
        """The interval's lower end, or the ratio itself when there is no interval."""
        return self.low if self.low is not None else self.ratio

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "original_ms": self.original_ms,
            "candidate_ms": self.candidate_ms,
            "measured_speedup": self.ratio,
            "speedup_low": self.low,
            "speedup_high": self.high,
            "confidence": self.confidence,
            "runs": self.runs,
        }


def speedup_estimate(
    original: Sequence[float], candidate: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0
) -> SpeedupEstimate:
    """The ratio of the medians of paired times and its percentile-bootstrap interval over pairs."""
    o = np.asarray(original, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if o.shape != c.shape or o.ndim != 1 or o.size == 0:
        raise ValueError(f"paired times of the same length are needed, got {o.shape} and {c.shape}")
    o_med, c_med = float(np.median(o)), float(np.median(c))
    if o.size < MIN_PAIRS:
        return SpeedupEstimate(o_med, c_med, None, None, int(o.size), confidence)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, o.size, size=(resamples, o.size))
    ratios = np.median(o[picks], axis=1) / np.median(c[picks], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return SpeedupEstimate(o_med, c_med, float(low), float(high), int(o.size), confidence)
