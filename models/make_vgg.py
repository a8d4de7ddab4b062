"""Build a VGG-16-shaped ONNX model with seeded random (He-initialised) weights.

No torch needed: the graph is written with onnx.helper. The full-size model
(224x224 input, 138 M parameters, ~528 MB) is what the closing notes and the
benchmarks use; ``--width`` and ``--size`` make the small copy shipped in
``models/``:

    python models/make_vgg.py models/vgg16_small.onnx --width 0.25 --size 64 --fc 256
    python models/make_vgg.py /tmp/vgg16.onnx            # full VGG-16
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# conv1_1 ... conv5_3 output channels; "M" = 2x2 max pool
VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
NAMES = [
    "conv1_1",
    "conv1_2",
    "conv2_1",
    "conv2_2",
    "conv3_1",
    "conv3_2",
    "conv3_3",
    "conv4_1",
    "conv4_2",
    "conv4_3",
    "conv5_1",
    "conv5_2",
    "conv5_3",
]


def build(width: float = 1.0, size: int = 224, fc: int = 4096, classes: int = 1000, seed: int = 0, opset: int = 17) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x, channels, spatial, conv_i, pool_i = "input", 3, size, 0, 0
    for item in VGG16:
        if item == "M":
            pool_i += 1
            out = f"pool{pool_i}"
            nodes.append(helper.make_node("MaxPool", [x], [out], name=out, kernel_shape=[2, 2], strides=[2, 2]))
            x, spatial = out, spatial // 2
            continue
        n = max(1, round(int(item) * width))
        name = NAMES[conv_i]
        conv_i += 1
        w = (rng.standard_normal((n, channels, 3, 3)) * np.sqrt(2.0 / (channels * 9))).astype(np.float32)
        b = (rng.standard_normal(n) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
        nodes.append(
            helper.make_node(
                "Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}_out"], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            )
        )
        nodes.append(helper.make_node("Relu", [f"{name}_out"], [f"{name}_relu"], name=f"{name}_relu"))
        x, channels = f"{name}_relu", n
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    x, features = "flat", channels * spatial * spatial
    for i, out_features in enumerate([fc, fc, classes]):
        name = f"fc{6 + i}"
        w = (rng.standard_normal((out_features, features)) * np.sqrt(2.0 / features)).astype(np.float32)
        b = np.zeros(out_features, np.float32)
        inits += [numpy_helper.from_array(w, f"{name}.weight"), numpy_helper.from_array(b, f"{name}.bias")]
        out = "logits" if i == 2 else f"{name}_out"
        nodes.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [out], name=name, transB=1))
        if i < 2:
            nodes.append(helper.make_node("Relu", [out], [f"{name}_relu"], name=f"{name}_relu"))
            out = f"{name}_relu"
        x, features = out, out_features
    graph = helper.make_graph(
        nodes,
        "vgg16",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx-lowrank models/make_vgg.py")
    model.ir_version = 8
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--width", type=float, default=1.0, help="channel multiplier")
    parser.add_argument("--size", type=int, default=224, help="input height and width")
    parser.add_argument("--fc", type=int, default=4096, help="hidden fully connected width")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = build(args.width, args.size, args.fc, args.classes, args.seed)
    onnx.save_model(model, args.output, save_as_external_data=model.ByteSize() > 2**31 - 1)


if __name__ == "__main__":
    main()
