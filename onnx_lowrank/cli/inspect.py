"""``onnx-lowrank inspect``: per layer, its shape, MACs and the ranks that keep 90/99/99.9 % of the energy."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ..config import DecomposeConfig
from ..inspection import inspect
from .args import ArgGroup, ShapeArgs
from .command import Command
from .format import format_inspect, format_mobile

__all__ = ["Inspect"]


class Inspect(Command):
    name = "inspect"
    help = "per Conv: shape, MACs and the ranks that keep 90/99/99.9%% of the energy"

    def __init__(self) -> None:
        self.shapes = ShapeArgs(
            "fix an input's shape for the MAC model (and the --mobile check)", plan=False, sample_use="the --mobile check takes its shapes"
        )

    def groups(self) -> list[ArgGroup]:
        return [self.shapes]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("input")
        parser.add_argument("--json", action="store_true", help="print JSON")
        parser.add_argument(
            "--mobile", action="store_true", help="also estimate NNAPI/CoreML coverage with onnxruntime's mobile usability checker"
        )

    def run(self, args: argparse.Namespace) -> int:
        shapes = self.shapes.parse(args)
        config = DecomposeConfig(shapes=shapes)
        layers = inspect(args.input, config)
        mobile = None
        if args.mobile:
            from ..layers import mobile_input_shapes
            from ..mobile import coverage
            from ..model_io import load_model

            fixed = mobile_input_shapes(load_model(args.input), shapes) if shapes.samples else shapes.input_shapes
            mobile = coverage(args.input, input_shapes=fixed)
        if args.json:
            listed = [asdict(layer) for layer in layers]
            print(json.dumps({"layers": listed, "mobile": mobile.to_dict()} if mobile is not None else listed, indent=2))
        else:
            print(format_inspect(layers))
            if mobile is not None:
                print(format_mobile(mobile))
        return 0
