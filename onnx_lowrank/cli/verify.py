"""``onnx-lowrank verify``: compare a candidate with the original in onnxruntime; exit 1 when outputs differ beyond tolerance."""

from __future__ import annotations

import argparse
import json

from ..errors import LowRankError
from ..verify import verify
from .args import add_input_shape, add_sample, input_shapes, sample_files, tolerance, whole_number
from .command import Command
from .format import format_mobile, format_verify

__all__ = ["Verify"]


class Verify(Command):
    name = "verify"
    help = "compare a candidate with the original in onnxruntime"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("original", help="an .onnx or .ort model")
        parser.add_argument("candidate", help="an .onnx or .ort model")
        data = parser.add_argument_group("inputs", "what both models are run on")
        data.add_argument("--inputs", metavar="FILE.npz", help="inputs keyed by input name (first axis: samples); `labels` gives accuracy")
        add_sample(
            data,
            "instead of --inputs, one input set as the model takes it (arrays keyed by input name, no sample axis; a scalar as "
            "a 0-d array)",
            repeat=False,
        )
        add_input_shape(data, "shape of the random input NAME where the model leaves dims symbolic (default: 1)")
        data.add_argument("--providers", help="comma-separated execution providers (default CPUExecutionProvider)")
        checks = parser.add_argument_group("checks", "when the outputs count as matching")
        checks.add_argument("--rtol", type=tolerance, default=1e-3, help="relative tolerance (default 1e-3)")
        checks.add_argument("--atol", type=tolerance, default=1e-4, help="absolute tolerance (default 1e-4)")
        speed = parser.add_argument_group("speed", "latency of both models, interleaved")
        speed.add_argument("--runs", type=int, default=20, help="timed runs of each model, interleaved (default 20; 0 skips timing)")
        speed.add_argument("--threads", type=whole_number(1), help="onnxruntime intra-op threads")
        speed.add_argument("--profile", action="store_true", help="also time each operator type of both models (onnxruntime's profiler)")
        mobile = parser.add_argument_group("mobile", "mobile execution providers this onnxruntime lacks")
        mobile.add_argument(
            "--mobile",
            action="store_true",
            help="also estimate NNAPI/CoreML coverage of both models side by side (onnxruntime's mobile usability checker)",
        )
        parser.add_argument("--json", action="store_true", help="print JSON")

    def run(self, args: argparse.Namespace) -> int:
        providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
        if args.runs < 0:
            raise LowRankError(f"--runs must be >= 0, got {args.runs}")
        if args.profile and args.runs == 0:
            raise LowRankError("--profile times the models: it needs --runs > 0")
        shapes = input_shapes(args)
        if args.sample and args.inputs:
            raise LowRankError("--inputs and --sample: give one (--inputs holds samples on axis 0, --sample one input set)")
        samples = sample_files(args)
        sample = samples[0] if samples else None
        mobile = None
        if args.mobile:  # first: a model the checker cannot read fails before anything runs
            from ..mobile import coverage

            mobile = (coverage(args.original, input_shapes=shapes), coverage(args.candidate, input_shapes=shapes))
        result = verify(
            args.original,
            args.candidate,
            inputs=args.inputs,
            providers=providers,
            rtol=args.rtol,
            atol=args.atol,
            runs=args.runs,
            threads=args.threads,
            profile=args.profile,
            input_shapes=shapes,
            sample=sample,
        )
        if args.json:
            data = result.to_dict()
            if mobile is not None:
                data["mobile"] = {"original": mobile[0].to_dict(), "candidate": mobile[1].to_dict()}
            print(json.dumps(data, indent=2))
        else:
            print(format_verify(result))
            if mobile is not None:
                print(format_mobile(*mobile))
        return 0 if result.passed else 1
