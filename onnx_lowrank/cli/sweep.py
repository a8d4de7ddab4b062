"""``onnx-lowrank sweep``: convert at several ``--speedup`` targets, planned as ``decompose`` plans them, and
measure each result against the original."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..config import DecomposeConfig
from ..errors import LowRankError
from ..model_io import StagedOutputs
from ..sweep import sweep
from .args import ArgGroup, CalibrationArgs, FinetuneArgs, PolicyArgs, ShapeArgs, SpeedArgs
from .command import Command
from .format import format_sweep
from .progress import ProgressBar

__all__ = ["Sweep"]


class SweepOutputArgs(ArgGroup):
    title = "output"
    description = "what is printed and written (no model unless --save-dir)"

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--json", action="store_true", help="print the rows as JSON")
        group.add_argument("--html", metavar="FILE.html", help="write a self-contained HTML report with the trade-off plots")
        group.add_argument("--save-dir", metavar="DIR", help="write each converted model there as <model>-x<S>.onnx")


class EvalArgs(ArgGroup):
    title = "checks"
    description = "what each converted model is compared on"

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--eval-inputs",
            metavar="FILE.npz",
            help="inputs keyed by input name (samples on axis 0), `labels` for accuracy (default: the --sample, else random inputs)",
        )


class Sweep(Command):
    name = "sweep"
    help = "convert at several --speedup targets and measure each against the original"
    description = (
        "Convert at each target (one shared factorization), planned as `decompose --speedup S` plans it with the same "
        "options, and compare each result with the original in onnxruntime."
    )

    def __init__(self) -> None:
        self.policy = PolicyArgs(targets=True)
        self.shapes = ShapeArgs(
            "the input size to plan by (MACs of one onnxruntime run on an input of this shape) and of the random eval inputs",
            sample_use="the latency plans time it, and without --eval-inputs every target is evaluated on it",
        )
        self.calibration = CalibrationArgs(shared=True)
        self.finetune = FinetuneArgs()
        self.speed = SpeedArgs(runs=True)

    def groups(self) -> list[ArgGroup]:
        return [self.policy, self.shapes, self.calibration, self.finetune, self.speed, EvalArgs(), SweepOutputArgs()]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("input", help="the ONNX model to read (never modified)")

    def run(self, args: argparse.Namespace) -> int:
        src = Path(args.input)
        protected: dict[str | os.PathLike[str], str] = {src: "input model"}
        for sample in args.sample or []:
            protected.setdefault(sample, "sample file")
        with StagedOutputs(protected) as outputs:  # the page is checked before any work, written after
            if args.html:
                outputs.stage(args.html, "HTML report")
            if args.save_dir and not Path(args.save_dir).is_dir():
                raise LowRankError(f"{args.save_dir}: --save-dir folder does not exist")
            if args.eval_inputs and not Path(args.eval_inputs).is_file():
                raise LowRankError(f"{args.eval_inputs}: no such eval inputs file")
            if args.profile and args.runs == 0:
                raise LowRankError("--profile times the models: it needs --runs > 0")
            config = DecomposeConfig(
                policy=self.policy.parse(args),
                shapes=self.shapes.parse(args),
                calibration=self.calibration.parse(args),
                speed=self.speed.parse(args),
                finetune=self.finetune.parse(args),
            )
            bar = ProgressBar(True, "converting and measuring targets", "target")
            try:
                result = sweep(
                    src,
                    args.speedups,
                    config,
                    eval_inputs=args.eval_inputs,
                    runs=args.runs,
                    profile=args.profile,
                    save_dir=args.save_dir,
                    progress=bar,
                )
            finally:
                bar.close()
            note = ""
            if args.html:
                from ..html_report import PLOTS_HINT, plots_available, sweep_html

                outputs.write_text(args.html, sweep_html(result), "HTML report")
                outputs.commit()
                note = "" if plots_available() else f" (tables only; for the plots: {PLOTS_HINT})"
        print(json.dumps(result.to_dict(), indent=2) if args.json else format_sweep(result))
        if args.html and not args.json:
            print(f"wrote {args.html}{note}")
        return 0
