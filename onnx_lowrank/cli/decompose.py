"""``onnx-lowrank decompose``: write a decomposed copy of a model, and print what was done."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import onnx

from ..api import Conversion, convert
from ..config import DecomposeConfig
from ..data_io import model_input_specs
from ..errors import LowRankError
from ..model_io import StagedOutputs, load_model_files, save_model
from ..report import Report
from ..verify import VerifyResult, check_random_inputs, load_inputs, verify
from .args import ArgGroup, CalibrationArgs, FinetuneArgs, MobileArgs, PolicyArgs, ShapeArgs, SpeedArgs, non_negative
from .command import Command
from .format import format_report, format_verify
from .progress import ProgressBar

__all__ = ["Decompose"]

SEARCH_RUNS = 20  # interleaved runs per target --max-drop times (--check-runs sets them; 0: the fastest by MACs)


class OutputArgs(ArgGroup):
    title = "output"
    description = "what is written besides the model"

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--external-data", action="store_true", help="write weights to OUTPUT.data beside the model")
        group.add_argument("--report", metavar="FILE.json", help="write the per-layer report as JSON")
        group.add_argument("--quiet", action="store_true", help="print only the totals")
        group.add_argument(
            "--ort",
            action="store_true",
            help="also write OUTPUT as NAME.ort (onnxruntime's ORT format, which minimal and mobile builds load) and "
            "NAME.required_operators.config for a reduced build, with onnxruntime's converter",
        )
        group.add_argument(
            "--html",
            metavar="FILE.html",
            help="also write a self-contained HTML report: spectra and chosen ranks, MACs per layer, output error "
            "(with --verify: latency and kernel time per operator type); plots need onnx-lowrank[plots]",
        )


class CheckArgs(ArgGroup):
    title = "checks"
    description = "compare the result with the original in onnxruntime"

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument("--verify", action="store_true", help="run `verify` on the result (on the --sample when given)")
        group.add_argument("--verify-inputs", metavar="FILE.npz", help="inputs (and `labels`) for --verify, which it implies")


class BudgetArgs(ArgGroup):
    title = "accuracy budget"
    description = "instead of --speedup: the fastest conversion whose answers drop at most P points on your data"

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--max-drop",
            type=non_negative,
            metavar="P",
            help="search --speedup targets as `sweep` does and keep the fastest measured result whose drop on "
            "--eval-inputs is at most P points: accuracy lost with `labels`, else 100 x (1 - agreement with the "
            "original's answers); the summary shows every target searched; each is timed in --check-runs "
            f"interleaved runs (default {SEARCH_RUNS}; 0: the fastest by MACs)",
        )
        group.add_argument(
            "--eval-inputs",
            metavar="FILE.npz",
            help="the data --max-drop measures on: inputs keyed by name (samples on axis 0), optionally `labels` "
            "(a class index per sample, or per sample a class sequence padded with -1 for per-position scores)",
        )

    @staticmethod
    def check(args: argparse.Namespace) -> None:
        if args.max_drop is None:
            if args.eval_inputs:
                raise LowRankError("--eval-inputs is the data of --max-drop: give --max-drop P too")
            return
        if not args.eval_inputs:
            raise LowRankError("--max-drop measures the drop on your data: give --eval-inputs FILE.npz")
        chosen = [
            flag
            for flag, value in (
                ("--speedup", args.speedup),
                ("--rank", args.rank),
                ("--energy", args.energy),
                ("--ranks", args.ranks),
                ("--params-ratio", args.params_ratio),
            )
            if value is not None
        ]
        if chosen:
            raise LowRankError(f"--max-drop chooses the speedup itself: drop {' and '.join(chosen)}")
        if args.mobile_safe or args.quantize:
            raise LowRankError("--max-drop searches plain conversions: --mobile-safe and --quantize are not searched")


class Decompose(Command):
    name = "decompose"
    help = "write a decomposed copy of a model"
    description = "Replace each Conv by a vertical and a horizontal conv."

    def __init__(self) -> None:
        self.policy = PolicyArgs()
        self.shapes = ShapeArgs(
            "the input size to plan by: MACs are those of one onnxruntime run on an input of this shape (and the --verify inputs)",
            sample_use="the latency plan, the result check and --verify run on it, the --mobile-safe check takes its shapes",
        )
        self.calibration = CalibrationArgs()
        self.finetune = FinetuneArgs()
        self.speed = SpeedArgs()
        self.mobile = MobileArgs()

    def groups(self) -> list[ArgGroup]:
        return [self.policy, BudgetArgs(), self.shapes, self.calibration, self.finetune, self.speed, OutputArgs(), self.mobile, CheckArgs()]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("input", help="the ONNX model to read (never modified)")
        parser.add_argument("output", help="where to write the decomposed model (written atomically)")

    def config(self, args: argparse.Namespace) -> DecomposeConfig:
        return DecomposeConfig(
            policy=self.policy.parse(args),
            shapes=self.shapes.parse(args),
            calibration=self.calibration.parse(args),
            speed=self.speed.parse(args),
            mobile=self.mobile.parse(args),
            finetune=self.finetune.parse(args),
        )

    def run(self, args: argparse.Namespace) -> int:
        # what this run reads must not be replaced by what it writes
        protected: dict[str | os.PathLike[str], str] = {args.input: "input model"}
        for flag, what in (
            (args.ranks, "ranks file"),
            (args.verify_inputs, "inputs file"),
            (args.calibration, "calibration data"),
            (args.eval_inputs, "eval inputs file"),
        ):
            if flag:
                protected.setdefault(flag, what)
        for sample in args.sample or []:
            protected.setdefault(sample, "sample file")
        with StagedOutputs(protected) as outputs:  # on any failure, everything staged is removed
            return self._into(args, outputs)

    def _into(self, args: argparse.Namespace, outputs: StagedOutputs) -> int:
        """The conversion; its files are staged in ``outputs`` and appear together at the commit, before anything is printed."""
        src, dst = Path(args.input), Path(args.output)
        outputs.stage(dst, "output model")  # every destination is checked (and its staging folder made) before any work
        if args.report:
            outputs.stage(args.report, "report")
        ort_dst: Path | None = None
        if args.ort:
            from ..mobile import ort_config_path, ort_path_for

            ort_dst = ort_path_for(dst)
            outputs.stage(ort_dst, "ORT model")
            outputs.stage(ort_config_path(ort_dst), "ORT required-operators config")
        if args.html:
            outputs.stage(args.html, "HTML report")
        BudgetArgs.check(args)
        config = self.config(args)  # every flag checked before the model is read
        start = time.perf_counter()
        model, data_files = load_model_files(src)
        for data_file in data_files:
            outputs.protect(data_file, "external data of the input model")
        external = args.external_data or bool(data_files)
        if not args.quiet and sys.stderr.isatty():
            print(f"loaded {src} in {time.perf_counter() - start:.2f} s", file=sys.stderr)
        verify_data: dict[str, Any] | None = None
        if args.verify_inputs:  # read and checked against the model now, not after the conversion
            arrays, labels = load_inputs(args.verify_inputs, model_input_specs(model))
            verify_data = {**arrays, **({"labels": labels} if labels is not None else {})}
        elif args.verify and not config.shapes.samples:
            check_random_inputs(model, config.shapes.input_shapes)
        bar = ProgressBar(not args.quiet)
        try:
            # the loaded copy is ours: rewriting it in place saves a copy of the weights
            if args.max_drop is not None:
                from ..accuracy_budget import fastest_within_drop

                runs = args.check_runs if args.check_runs is not None else SEARCH_RUNS
                # each target searched is timed as it is converted: no check is left to run
                conversion = Conversion(*fastest_within_drop(model, args.max_drop, args.eval_inputs, config, runs=runs, progress=bar)[:2])
            else:
                conversion = convert(model, config, progress=bar, inplace=True)
        finally:
            bar.close()
        del model
        try:
            report = conversion.report
            save_model(conversion.model, dst, external_data=external, outputs=outputs)
            ort_files = _stage_ort(conversion.model, ort_dst, outputs) if ort_dst is not None else None
            held = conversion.check.seconds if conversion.check is not None else 0.0  # the check's, not the conversion's
            report.seconds = time.perf_counter() - start - held
            # the model is written: the check's sessions are built once it is out of memory (the check holds its weights)
            conversion.model = onnx.ModelProto()
            # what a large model's check costs, said before it runs: the summary's first line
            conversion.finish(notice=None if args.quiet else _notice)
        finally:
            conversion.discard()
        if args.report:
            outputs.write_text(args.report, report.to_json() + "\n", "report")
        result = None
        if args.verify or args.verify_inputs:
            # on the staged files: a model that fails to load or run is never committed
            shapes = config.shapes.input_shapes
            sample = _verify_sample(args) if verify_data is None else None
            result = verify(
                src,
                outputs.staged(dst),
                inputs=verify_data,
                threads=args.threads,
                input_shapes=shapes,
                profile=bool(args.html),
                sample=sample,
                large_model=config.speed.large_model_bytes,
            )
        html_note = None
        if args.html:
            page, html_note = _decompose_html(args, src, outputs.staged(dst), report, result)
            outputs.write_text(args.html, page, "HTML report")
        outputs.commit()
        print(format_report(report, args.quiet))
        print(f"wrote {dst}" + (f" (+ {dst.name}.data)" if external else ""))
        if ort_files is not None:
            print(f"wrote {ort_files.model} and {ort_files.config.name} (onnxruntime's ORT format, optimization {ort_files.optimization})")
        if result is not None:
            # a low-rank model approximates by design: report the error, leave gating to `verify --rtol/--atol`
            print(format_verify(result, gate=False))
        if html_note is not None:
            print(html_note)
        return 0


def _verify_sample(args: argparse.Namespace) -> str | None:
    """What ``--verify`` runs on without ``--verify-inputs``: the (first) ``--sample``, else random inputs (None)."""
    return args.sample[0] if args.sample else None


def _notice(text: str) -> None:
    """A line the user reads before a long step (what a large model's check will cost), printed at once."""
    print(f"note: {text}", flush=True)


def _stage_ort(model: Any, ort_dst: Path, outputs: StagedOutputs) -> Any:
    """The ORT model and its required-operators config, converted by onnxruntime and staged with the other outputs."""
    from ..mobile import ort_config_path, staged_ort

    with staged_ort(model, ort_dst) as staged:
        try:
            os.replace(staged.staged_model, outputs.staged(ort_dst))
            os.replace(staged.staged_config, outputs.staged(ort_config_path(ort_dst)))
        except OSError as exc:
            raise LowRankError(f"{ort_dst}: cannot write ({exc.strerror or exc})") from None
        return staged.files


def _decompose_html(args: argparse.Namespace, src: Path, converted: Path, report: Report, result: VerifyResult | None) -> tuple[str, str]:
    """The HTML report of one conversion, and the line that says it was written."""
    from ..html_report import PLOTS_HINT, decompose_html, plots_available
    from ..sweep import report_spectra

    notes = []
    shapes = dict(args.input_shape)
    if result is None:  # the page shows the output error: compared here, without timing
        try:
            result = verify(src, converted, runs=0, input_shapes=shapes, sample=_verify_sample(args))
        except LowRankError as exc:  # the model is written: the page says why its error is missing
            notes.append(f"output error not measured: {exc}")
    plots = plots_available()
    spectra = report_spectra(src, report, shapes, sample=args.sample or None, branches=args.branches) if plots else []
    page = decompose_html(src.name, report, spectra, result, plots=plots, notes=notes)
    return page, f"wrote {args.html}" + ("" if plots else f" (tables only; for the plots: {PLOTS_HINT})")
