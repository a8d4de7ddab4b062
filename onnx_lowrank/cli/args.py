"""The command line's argument groups, shared by the commands that use them.

Each group adds its flags to one argparse group (its title and description
are the group's header in ``--help``) and turns the parsed flags into the
library's option group (:mod:`onnx_lowrank.config`): ``parse(args)`` builds a
:class:`~onnx_lowrank.config.PolicyConfig`, a
:class:`~onnx_lowrank.config.ShapeConfig`, … A command lists the groups it
uses; a group's constructor arguments adapt it to the command (``sweep``
takes ``--speedups`` where ``decompose`` takes one policy).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from ..config import (
    BRANCH_CHOICES,
    BY_CHOICES,
    CHECK_RUNS,
    DEFAULT_KINDS,
    DEFAULT_RANK_MULTIPLE,
    DEFAULT_SPEEDUP,
    FINETUNE_MINUTES,
    FINETUNE_STEPS,
    LARGE_MODEL_MIB,
    QUANTIZE_MODES,
    CalibrationConfig,
    FinetuneConfig,
    MobileConfig,
    PolicyConfig,
    ShapeConfig,
    SpeedConfig,
)
from ..errors import LowRankError
from ..sweep import DEFAULT_SPEEDUPS, parse_speedups
from ..threads import default_threads
from ..timing_cache import CACHE_ENV

__all__ = [
    "ArgGroup",
    "CalibrationArgs",
    "FinetuneArgs",
    "MobileArgs",
    "Parser",
    "PolicyArgs",
    "ShapeArgs",
    "SpeedArgs",
    "add_sample",
    "input_shapes",
    "non_negative",
    "sample_files",
    "whole_number",
]


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        raise LowRankError(message)


def whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


def number_in(description: str, accept: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse type: a finite number that ``accept`` takes; ``description`` says which in the error."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
        if not (math.isfinite(value) and accept(value)):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value

    return parse


unit_interval = number_in("a number in (0, 1]", lambda value: 0.0 < value <= 1.0)
non_negative = number_in("a number >= 0", lambda value: value >= 0.0)
at_least_one = number_in("a number >= 1", lambda value: value >= 1.0)
positive = number_in("a number > 0", lambda value: value > 0.0)


def tolerance(text: str) -> float:
    """An argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def input_shape(text: str) -> tuple[str, list[int]]:
    """An argparse type: ``NAME=D1,D2,...`` (``x`` also separates dims)."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = [int(d) for d in dims.replace("x", ",").split(",")]
    except ValueError:
        shape = []
    if not sep or not name or not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NAME=D1,D2,... with whole dims >= 1, got {text!r}")
    return name, shape


def add_input_shape(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str) -> None:
    parser.add_argument("--input-shape", type=input_shape, action="append", default=[], metavar="NAME=1,3,224,224", help=help_text)


def input_shapes(args: argparse.Namespace) -> dict[str, list[int]]:
    return dict(args.input_shape)


def speedups(text: str) -> list[float]:
    try:
        return parse_speedups(text)
    except LowRankError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--speedups: ")) from None


class _Removed(argparse.Action):
    """A flag that no longer exists: one line naming what replaced it."""

    def __init__(self, option_strings: Sequence[str], dest: str, replacement: str = "", **kwargs: Any) -> None:
        self.replacement = replacement
        super().__init__(option_strings, dest, nargs=0, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        raise LowRankError(f"{option_string} was removed: use {self.replacement}")


def read_ranks(path: str) -> dict[str, Any]:
    """A ranks file: a non-empty JSON object of node name → rank (or ``{"rank": K, "kind": ...}``)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise LowRankError(f"{p}: no such ranks file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LowRankError(f"{p}: not a JSON ranks file ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise LowRankError(f"{p}: ranks file must be a non-empty JSON object of node name -> rank")
    return data


class ArgGroup:
    """One argparse group: ``title``/``description`` head it in ``--help``; :meth:`add_arguments` adds its flags."""

    title = ""
    description = ""

    def add(self, parser: argparse.ArgumentParser) -> None:
        self.add_arguments(parser.add_argument_group(self.title, self.description))

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        raise NotImplementedError


def _kinds(text: str) -> list[str]:
    return [k.strip() for k in text.split(",") if k.strip()]


class PolicyArgs(ArgGroup):
    """Policy: which layers are decomposed and at which ranks. ``targets``: the sweep's ``--speedups`` in place of one policy."""

    title = "policy"

    def __init__(self, targets: bool = False) -> None:
        self.targets = targets
        self.description = (
            "the targets, and which layers are decomposed"
            if targets
            else "which layers are decomposed and at which ranks (one policy; --speedup combines with --params-ratio)"
        )

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        kinds = ",".join(DEFAULT_KINDS)
        if self.targets:
            group.add_argument(
                "--speedups",
                type=speedups,
                default=list(DEFAULT_SPEEDUPS),
                metavar="S1,S2,...",
                help=f"--speedup targets, numbers >= 1 (default {','.join(f'{t:g}' for t in DEFAULT_SPEEDUPS)})",
            )
        else:
            # the policies exclude each other except --speedup with --params-ratio; the library says which clash
            group.add_argument("--rank", type=whole_number(1), help="every layer at this rank (clipped to its full rank)")
            group.add_argument(
                "--energy",
                type=unit_interval,
                help="per layer, the least rank keeping this share of the squared singular values, in (0, 1]",
            )
            group.add_argument(
                "--speedup",
                type=at_least_one,
                help=f"this much faster with the least error: by latency measured here, or by MACs (see --by) "
                f"(default when no policy is given: {DEFAULT_SPEEDUP:g})",
            )
            group.add_argument(
                "--params-ratio",
                type=unit_interval,
                metavar="R",
                help="parameters after/before at most R, in (0, 1]; combines with --speedup",
            )
            group.add_argument(
                "--ranks",
                metavar="FILE.json",
                help='JSON object: node name -> rank (or {"rank": K, "kind": "channel"}); others are left alone',
            )
        group.add_argument("--kinds", default=kinds, help=f"splits to offer, comma-separated (default {kinds})")
        group.add_argument("--include", metavar="REGEX", help="only layers whose node name matches")
        group.add_argument("--exclude", metavar="REGEX", help="leave layers whose node name matches")
        if not self.targets:
            group.add_argument(
                "--force",
                action="store_true",
                help="decompose eligible layers even where the pair costs more MACs (full rank: an exactness check)",
            )
        group.add_argument(
            "--rank-multiple",
            type=whole_number(1),
            metavar="M",
            help=f"round ranks up to a multiple of M (default {DEFAULT_RANK_MULTIPLE} for --speedup/--params-ratio, "
            "measured fastest in onnxruntime; 1 for --rank/--energy/--ranks)",
        )
        group.add_argument(
            "--no-fold-bn", action="store_true", help="keep BatchNormalization nodes (default: fold them into the Conv first)"
        )
        if not self.targets:
            group.add_argument(
                "--pad-ranks",
                action="store_true",
                help="with --rank/--energy/--ranks: store a rank that does not fill whole channel blocks of onnxruntime's "
                "blocked CPU convolution here (8, or 16 with AVX-512) with zero filters up to the next block: more MACs, faster here",
            )

    def parse(self, args: argparse.Namespace) -> PolicyConfig:
        common: dict[str, Any] = dict(
            kinds=_kinds(args.kinds),
            include=args.include,
            exclude=args.exclude,
            rank_multiple=args.rank_multiple,
            fold_bn=not args.no_fold_bn,
        )
        if self.targets:
            return PolicyConfig(speedup=args.speedups[0], **common)
        ranks = read_ranks(args.ranks) if args.ranks else None
        return PolicyConfig(
            rank=args.rank,
            energy=args.energy,
            speedup=args.speedup,
            params_ratio=args.params_ratio,
            ranks=ranks,
            force=args.force,
            pad_ranks=args.pad_ranks,
            **common,
        )


def add_sample(parser: argparse.ArgumentParser | argparse._ArgumentGroup, help_text: str, repeat: bool = True) -> None:
    parser.add_argument("--sample", action="append" if repeat else "store", metavar="FILE.npz", help=help_text)


def sample_files(args: argparse.Namespace) -> list[str]:
    """The ``--sample`` files given, checked to exist before the model is read."""
    given = args.sample if isinstance(args.sample, list) else [args.sample] if args.sample else []
    for path in given:
        if not Path(path).exists():
            raise LowRankError(f"{path}: no such sample file")
    return given


class ShapeArgs(ArgGroup):
    """Shapes: the input the plan is sized on and its branches; ``help_text`` says what ``--input-shape`` fixes
    for the command, ``sample_use`` what else runs on the sample."""

    title = "shapes"
    description = "the input the sizes come from: a sample, or random values of sizes fixed for the sizing run, the timing and the checks"

    def __init__(self, help_text: str, plan: bool = True, sample_use: str = "") -> None:
        self.help_text, self.plan, self.sample_use = help_text, plan, sample_use

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        add_sample(
            group,
            "one input set as the model takes it (arrays keyed by input name, no sample axis; a scalar as a 0-d array): it sizes "
            "every layer and picks the If branches that count"
            + (f"; {self.sample_use}" if self.sample_use else "")
            + (" (default: the first calibration sample, else random values)" if self.plan else " (default: random values)")
            + ". With --branches all, a further --sample sizes the branches the first does not take",
        )
        group.add_argument(
            "--branches",
            choices=BRANCH_CHOICES,
            default="run",
            help="'run': size the If branches the sample runs (the others have no size"
            + ("; --speedup leaves them whole" if self.plan else "")
            + "); 'all': size every branch by a run of its own, a further --sample that takes it or the sample with the If's "
            "condition forced"
            + (", and plan every path through the branches to the --speedup by MACs" if self.plan else "")
            + " (default run)",
        )
        add_input_shape(group, self.help_text)
        if self.plan:
            group.add_argument(
                "--allow-unknown-shapes",
                action="store_true",
                help="plan even when an input has a symbolic dim and no --input-shape: layers of unknown size count at one output pixel",
            )

    def parse(self, args: argparse.Namespace) -> ShapeConfig:
        return ShapeConfig(
            input_shapes=input_shapes(args),
            allow_unknown_shapes=bool(getattr(args, "allow_unknown_shapes", False)),
            sample=sample_files(args) or None,
            branches=args.branches,
        )


class CalibrationArgs(ArgGroup):
    """Calibration: data-aware ranks and factors from the model's own inputs."""

    title = "calibration"

    def __init__(self, shared: bool = False) -> None:
        self.shared = shared
        self.description = (
            "data-aware ranks and factors; the statistics are measured once for all targets"
            if shared
            else "data-aware ranks and factors from the model's own inputs"
        )

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--calibration",
            metavar="FILE.npz|FOLDER",
            help="calibration inputs (arrays keyed by input name, samples on axis 0; or a folder of <input>.npy): "
            "every factor minimises its layer's output error on them, ranks minimise the predicted damage to the outputs, "
            "and each layer's second factor is refit to the original outputs",
        )
        group.add_argument(
            "--refit",
            action=argparse.BooleanOptionalAction,
            help="with --calibration: refit the second factor and bias of decomposed layers to the original outputs, "
            "in a few passes by depth (default: on)",
        )
        group.add_argument(
            "--sensitivity",
            action=argparse.BooleanOptionalAction,
            help="with --calibration and --speedup/--params-ratio: weigh each layer's output error by its gain to the model's "
            "outputs, measured once on a few samples (default: on)",
        )
        group.add_argument(
            "--activation-refit",
            action=argparse.BooleanOptionalAction,
            help="with --calibration: refit a decomposed layer read only by a Relu, LeakyRelu or Clip to that activation's "
            "output, not its linear output (Zhang et al.'s nonlinear reconstruction; default: on)",
        )
        group.add_argument(
            "--positions",
            type=whole_number(0),
            metavar="N",
            help="with --calibration: output positions per sample and layer, drawn at random, that the statistics and the "
            "refit use (default 256; 0: all of them, slower on large inputs)",
        )
        group.add_argument(
            "--calibration-batch",
            type=whole_number(1),
            metavar="N",
            help="with --calibration: samples per onnxruntime run at most (default 64; a pass sizes its batches to its memory budget)",
        )

    def parse(self, args: argparse.Namespace) -> CalibrationConfig:
        """The group, checked before the model is read: the flags that tune calibration need it, and the data must exist."""
        if args.calibration is None:
            for flag in ("refit", "sensitivity", "activation_refit", "positions", "calibration_batch"):
                if getattr(args, flag) not in (None, False):
                    raise LowRankError(f"--{flag.replace('_', '-')} needs --calibration")
            return CalibrationConfig()
        if not Path(args.calibration).exists():
            raise LowRankError(f"{args.calibration}: no such calibration file or folder")
        options = None
        if args.positions is not None or args.calibration_batch is not None or args.activation_refit is not None:
            from ..calibration import CalibrationOptions

            options = CalibrationOptions()
            if args.activation_refit is not None:
                options = replace(options, activation_refit=args.activation_refit)
            if args.positions is not None:
                options = replace(options, positions=args.positions or None)
            if args.calibration_batch is not None:
                options = replace(options, batch_size=args.calibration_batch)
        return CalibrationConfig(data=args.calibration, refit=args.refit, sensitivity=args.sensitivity, options=options)


class SpeedArgs(ArgGroup):
    """Speed: what ``--speedup`` plans by, the threads, the timing of the result. ``runs``: the sweep's own timing flags."""

    title = "speed"

    def __init__(self, runs: bool = False) -> None:
        self.runs = runs
        self.description = (
            "latency measured in onnxruntime on this machine, original and converted interleaved"
            if runs
            else "latency measured in onnxruntime on this machine; the result is always timed against the original "
            "(both ratios, MACs and measured, are printed)"
        )

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--by",
            choices=BY_CHOICES,
            help="what --speedup plans by: 'latency' times each layer's splits in onnxruntime on this machine and re-times "
            "the whole model until it is S times faster here (default whenever every layer has a known size on the "
            "reference input); 'macs' cuts the MAC count S times, a portable plan: use it to convert here and deploy "
            "on other hardware (default when the model cannot be timed)",
        )
        group.add_argument("--measure", action=_Removed, replacement="--by latency")
        group.add_argument(
            "--threads",
            type=whole_number(1),
            help=f"onnxruntime intra-op threads to time and plan with (default: onnxruntime's default here, "
            f"the physical cores: {default_threads()}); plans for 1 and for 2+ threads differ",
        )
        group.add_argument(
            "--no-timing-cache",
            action="store_true",
            help=f"time every layer afresh and keep no timings (default: layer timings are kept per CPU, onnxruntime "
            f"version and thread count in ${CACHE_ENV}, else $XDG_CACHE_HOME/onnx-lowrank or ~/.cache/onnx-lowrank)",
        )
        if self.runs:
            group.add_argument(
                "--runs",
                type=whole_number(0),
                default=20,
                help="timed runs of each model per target, interleaved (default 20; 0 skips timing)",
            )
            group.add_argument("--profile", action="store_true", help="also time each operator type (onnxruntime's profiler)")
        else:
            group.add_argument(
                "--check-runs",
                type=whole_number(0),
                metavar="N",
                help=f"interleaved runs of the final timing of a plan not made by latency against the original "
                f"(default {CHECK_RUNS}; 0 skips it)",
            )
            group.add_argument(
                "--large-model",
                type=whole_number(0),
                metavar="MIB",
                help=f"MiB of weights above which a model's check (and the plan's timed rounds) run without onnxruntime's "
                f"weight prepacking, which copies every matrix weight per session, and the check first says what it will "
                f"cost (default {LARGE_MODEL_MIB})",
            )

    def parse(self, args: argparse.Namespace) -> SpeedConfig:
        check_runs = getattr(args, "check_runs", None)
        large_model = getattr(args, "large_model", None)
        return SpeedConfig(
            by=args.by,
            threads=args.threads,
            timing_cache=not args.no_timing_cache,
            check_runs=CHECK_RUNS if check_runs is None else check_runs,
            large_model=LARGE_MODEL_MIB if large_model is None else large_model,
        )


class MobileArgs(ArgGroup):
    """Mobile: execution providers and INT8."""

    title = "mobile"
    description = "mobile execution providers and INT8 (onnxruntime's own tools)"

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--mobile-safe",
            action="store_true",
            help="keep whole every layer whose pair NNAPI or CoreML would refuse where they take the original (it would add a partition)",
        )
        group.add_argument(
            "--quantize",
            choices=QUANTIZE_MODES,
            help="after the low-rank step, quantize to INT8 with onnxruntime.quantization: dynamic, or static QDQ calibrated "
            "on --calibration",
        )

    def parse(self, args: argparse.Namespace) -> MobileConfig:
        return MobileConfig(mobile_safe=args.mobile_safe, quantize=args.quantize)


class FinetuneArgs(ArgGroup):
    """Fine-tune: distil the converted model toward the original on the calibration samples (torch, the ``finetune`` extra)."""

    title = "fine-tune"
    description = (
        "distil the converted model toward the original on the calibration samples, no labels (needs --calibration, "
        "and torch: pip install 'onnx-lowrank[finetune]'); the samples held back to measure the answers are never trained on"
    )

    def add_arguments(self, group: argparse._ArgumentGroup) -> None:
        group.add_argument(
            "--finetune",
            action="store_true",
            help="after the conversion, train the decomposed layers' factors and biases so that the outputs match the original's "
            "(KL for class scores, MSE otherwise); every other weight and the graph stay as converted",
        )
        group.add_argument("--finetune-all", action="store_true", help="with --finetune: train every float weight instead")
        group.add_argument(
            "--finetune-steps",
            type=whole_number(1),
            metavar="N",
            help=f"with --finetune: optimiser steps at most (default {FINETUNE_STEPS}, or {FINETUNE_MINUTES:g} minutes, "
            "whichever ends first; given alone, the only bound)",
        )
        group.add_argument(
            "--finetune-minutes",
            type=positive,
            metavar="M",
            help="with --finetune: minutes of training at most (given alone, the only bound; the same inputs give the same "
            "file only when the steps end the run)",
        )
        group.add_argument(
            "--finetune-features",
            action="store_true",
            help="with --finetune: also fit each decomposed layer's output to the original layer's (the feature term)",
        )
        group.add_argument("--finetune-seed", type=whole_number(0), metavar="S", help="with --finetune: the seed (default 0)")

    def parse(self, args: argparse.Namespace) -> FinetuneConfig:
        """The group, checked before the model is read: its flags need --finetune, which needs --calibration and torch."""
        if not args.finetune:
            for flag in ("finetune_all", "finetune_steps", "finetune_minutes", "finetune_features", "finetune_seed"):
                if getattr(args, flag) not in (None, False):
                    raise LowRankError(f"--{flag.replace('_', '-')} needs --finetune")
            return FinetuneConfig()
        if getattr(args, "calibration", None) is None:
            raise LowRankError(
                "--finetune needs --calibration FILE.npz|FOLDER: it trains on the calibration samples (no labels), "
                "those held back to measure the answers excepted"
            )
        from ..finetune import check_torch

        check_torch()
        return FinetuneConfig(
            enabled=True,
            trainable="all" if args.finetune_all else "factors",
            steps=args.finetune_steps,
            minutes=args.finetune_minutes,
            seed=args.finetune_seed or 0,
            features=args.finetune_features,
        )
