"""The progress bar of long conversions, on stderr; tqdm draws it when installed, else one line rewritten in place."""

from __future__ import annotations

import sys
import time
from typing import Any

__all__ = ["ProgressBar"]

FINETUNE = "fine-tune"  # the names of the fine-tune's steps start with it (onnx_lowrank.finetune.PHASE)


class ProgressBar:
    """A bar on stderr for conversions that take more than a moment; silent when stderr is not a terminal.

    The library reports ``(done, total, name)``: layers analysed (``name`` the layer), the samples of a
    pass over the calibration data (``name`` "calibration <pass>"), or the steps of a fine-tune (``name``
    "fine-tune <loss and held-back agreement>"; ``total`` 0 when only a time budget bounds them); each pass
    and the fine-tune get a bar of their own. tqdm draws it when installed; otherwise one line is rewritten
    in place.
    """

    DELAY = 1.0  # seconds before anything is drawn: quick conversions stay quiet

    def __init__(self, enabled: bool, what: str = "analysing layers", unit: str = "layer") -> None:
        self.what, self.unit = what, unit
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.perf_counter()
        self.bar: Any = None
        self.phase = ""
        self.drawn = False

    def __call__(self, done: int, total: int, name: str) -> None:
        if not self.enabled or time.perf_counter() - self.start < self.DELAY:
            return
        passes = name.startswith("calibration ")
        tuning = name.startswith(f"{FINETUNE} ")
        if passes:
            phase, unit, detail = name, "sample", ""
        elif tuning:
            phase, unit, detail = FINETUNE, "step", name.removeprefix(f"{FINETUNE} ")
        else:
            phase, unit, detail = self.what, self.unit, name
        if self.bar is not None and phase != self.phase:
            self.close()
            self.bar, self.drawn = None, False
        self.phase = phase
        if self.bar is None:
            try:
                from tqdm import tqdm  # optional; imported only when a bar is due

                self.bar = tqdm(total=total or None, desc=phase, unit=unit, file=sys.stderr, leave=False)
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.n = done
            self.bar.total = total or None
            if passes:
                self.bar.refresh()
            else:
                self.bar.set_postfix_str(detail if tuning else detail[-30:], refresh=True)
        else:
            of = f"/{total}" if total else ""
            shown = "" if passes else f" {detail[-40:]:<40}"
            print(f"\r{phase} {done}{of}{shown}".ljust(70), end="", file=sys.stderr, flush=True)
            self.drawn = True

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        elif self.drawn:
            print("\r" + " " * 70 + "\r", end="", file=sys.stderr, flush=True)
