"""Reference CNNs in plain torch.nn, with seeded random weights, for conversion tests and benchmarks.

The layer configurations (channel counts, kernel sizes, strides, padding,
groups) are the published ones; only the weights are random. Every network
takes its input size as an argument, because the first fully connected layer
of AlexNet and VGG-16 reads the flattened feature map: at the real input size
this is exactly the published layer (torchvision's ``AdaptiveAvgPool2d`` is the
identity there), and at the small sizes the tests use it is narrower. The
architectures, from Tai et al.'s benchmarks and the usual deployment zoo:

============  ===========================================================  ==========  =====
name          configuration                                                real input  BN
============  ===========================================================  ==========  =====
alexnet       Krizhevsky et al. 2012 as in Caffe's BVLC model: 96-256-384-  227         no
              384-256, groups of 2 in conv2/4/5, LRN, 4096-4096-1000
vgg16         Simonyan & Zisserman 2015, configuration D                   224         no
resnet18      He et al. 2016, torchvision layout (stride on the 3x3)       224         yes
resnet50      He et al. 2016, bottleneck v1.5 as in torchvision            224         yes
googlenet     Szegedy et al. 2015 (Inception v1) channel table; convs      224         yes
              with BN as torchvision's, but 5x5 branches as in the paper
mobilenetv2   Sandler et al. 2018, width 1.0, as torchvision               224         yes
densenet121   Huang et al. 2017, growth 32, blocks (6, 12, 24, 16)         224         yes
nin           Lin et al. 2014, the CIFAR-10 network (192-160-96, ...)      32          no
============  ===========================================================  ==========  =====

For the three networks without BatchNorm, ``bn=True`` gives the usual BN
variant (a BatchNorm after every conv, replacing LRN where there is one), used
for the "BN kept" exports; ``bn`` is ignored by the others, which always have it.

Weights (:func:`randomize`): He-normal convs (fan-in, so activations keep their
scale through 50+ layers without BN), small random biases, BN scale and shift
drawn at random, and BN running mean/variance measured on a seeded random batch
(so they are far from 0/1 and folding them changes every kernel, while the
activations stay well scaled, which matters for the fp16 variant).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["ARCHS", "VARIANTS", "Arch", "Variant", "build", "randomize", "variant"]

SEED = 0


def _conv(
    cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, groups: int = 1, *, bn: bool, eps: float = 1e-5
) -> list[nn.Module]:
    """Conv (bias only without BN) [+ BN]; the activation is left to the caller."""
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, padding, groups=groups, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(cout, eps=eps))
    return layers


def _flat_features(features: nn.Module, size: int) -> int:
    """Width of the flattened feature map at this input size (the first FC layer's input)."""
    with torch.no_grad():
        out = features(torch.zeros(1, 3, size, size))
    if out.numel() == 0:
        raise ValueError(f"input size {size} is too small for this network")
    return int(out.numel())


# --------------------------------------------------------------------------- AlexNet


class _LRNFunction(torch.autograd.Function):
    """``F.local_response_norm`` that exports as one ONNX ``LRN`` node (the traced form is ~100 shape ops)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
        return nn.functional.local_response_norm(x, size, alpha, beta, k)

    @staticmethod
    def symbolic(g: Any, x: Any, size: int, alpha: float, beta: float, k: float) -> Any:
        # same formula: x / (k + alpha / size * sum of squares over `size` channels) ** beta
        return g.op("LRN", x, size_i=size, alpha_f=alpha, beta_f=beta, bias_f=k)


class LRN(nn.Module):
    """Caffe's cross-channel local response normalisation (AlexNet: 5 channels, 1e-4, 0.75, 1)."""

    def __init__(self, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> None:
        super().__init__()
        self.size, self.alpha, self.beta, self.k = size, alpha, beta, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LRNFunction.apply(x, self.size, self.alpha, self.beta, self.k)  # type: ignore[no-any-return]


class AlexNet(nn.Module):
    """Caffe's BVLC AlexNet (groups of 2, LRN); with ``bn`` a BN after each conv instead of LRN."""

    def __init__(self, size: int = 227, bn: bool = False, classes: int = 1000) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nn.Identity() if bn else LRN()

        relu = nn.ReLU
        self.features = nn.Sequential(
            *_conv(3, 96, 11, 4, 0, bn=bn), relu(), norm(), nn.MaxPool2d(3, 2),
            *_conv(96, 256, 5, 1, 2, groups=2, bn=bn), relu(), norm(), nn.MaxPool2d(3, 2),
            *_conv(256, 384, 3, 1, 1, bn=bn), relu(),
            *_conv(384, 384, 3, 1, 1, groups=2, bn=bn), relu(),
            *_conv(384, 256, 3, 1, 1, groups=2, bn=bn), relu(), nn.MaxPool2d(3, 2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.5), nn.Linear(_flat_features(self.features, size), 4096), nn.ReLU(),
            nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- VGG-16

VGG16_D: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    """Configuration D; ``bn`` gives VGG-16-BN."""

    def __init__(self, size: int = 224, bn: bool = False, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 3
        for item in VGG16_D:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [*_conv(cin, int(item), 3, 1, 1, bn=bn), nn.ReLU()]
                cin = int(item)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(_flat_features(self.features, size), 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(4096, classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(*_conv(cin, width, 3, stride, 1, bn=True), nn.ReLU(), *_conv(width, cout, 3, 1, 1, bn=True))
        self.shortcut = nn.Sequential(*_conv(cin, cout, 1, stride, bn=True)) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """v1.5: the stride sits on the 3x3 conv, as in torchvision."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            *_conv(cin, width, 1, bn=True), nn.ReLU(),
            *_conv(width, width, 3, stride, 1, bn=True), nn.ReLU(),
            *_conv(width, cout, 1, bn=True),
        )  # fmt: skip
        self.shortcut = nn.Sequential(*_conv(cin, cout, 1, stride, bn=True)) if stride != 1 or cin != cout else nn.Identity()
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock | Bottleneck], blocks: Sequence[int], classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv(3, 64, 7, 2, 3, bn=True), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        stages: list[nn.Module] = []
        cin = 64
        for i, (width, count) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            for j in range(count):
                stages.append(block(cin, width, 2 if i > 0 and j == 0 else 1))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# --------------------------------------------------------------------------- GoogLeNet


def _basic(cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> nn.Sequential:
    """torchvision's BasicConv2d: conv without bias, BN (eps 1e-3), ReLU."""
    return nn.Sequential(*_conv(cin, cout, k, stride, padding, bn=True, eps=1e-3), nn.ReLU())


class Inception(nn.Module):
    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, pool: int) -> None:
        super().__init__()
        self.b1 = _basic(cin, c1, 1)
        self.b3 = nn.Sequential(_basic(cin, c3r, 1), _basic(c3r, c3, 3, padding=1))
        # the paper's 5x5 (torchvision has a 3x3 here by an old mistake)
        self.b5 = nn.Sequential(_basic(cin, c5r, 1), _basic(c5r, c5, 5, padding=2))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1, ceil_mode=True), _basic(cin, pool, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


# Szegedy et al. 2015, Table 1: in, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj
GOOGLENET_TABLE: dict[str, tuple[int, ...]] = {
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
    """Inception v1 without the auxiliary classifiers (they only run in training)."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()

        def pool() -> nn.Module:
            return nn.MaxPool2d(3, 2, ceil_mode=True)

        t = GOOGLENET_TABLE
        self.features = nn.Sequential(
            _basic(3, 64, 7, 2, 3), pool(),
            _basic(64, 64, 1), _basic(64, 192, 3, padding=1), pool(),
            Inception(*t["3a"]), Inception(*t["3b"]), pool(),
            Inception(*t["4a"]), Inception(*t["4b"]), Inception(*t["4c"]), Inception(*t["4d"]), Inception(*t["4e"]), pool(),
            Inception(*t["5a"]), Inception(*t["5b"]),
        )  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.4), nn.Linear(1024, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- MobileNetV2


def _conv_bn_relu6(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [*_conv(cin, cout, k, stride, (k - 1) // 2, groups, bn=True), nn.ReLU6()]


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = _conv_bn_relu6(cin, hidden, 1) if expand != 1 else []
        layers += _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)  # depthwise
        layers += _conv(hidden, cout, 1, bn=True)  # linear bottleneck: no activation
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


# expansion t, channels c, repeats n, first stride s (Sandler et al. 2018, Table 2)
MOBILENETV2_TABLE = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class MobileNetV2(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = _conv_bn_relu6(3, 32, 3, 2)
        cin = 32
        for t, c, n, s in MOBILENETV2_TABLE:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += _conv_bn_relu6(cin, 1280, 1)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- DenseNet-121


class DenseLayer(nn.Module):
    """Pre-activation BN-ReLU-Conv1x1-BN-ReLU-Conv3x3; the first BN reads a Concat, not a Conv."""

    def __init__(self, cin: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, bn_size * growth, 1, bias=False),
            nn.BatchNorm2d(bn_size * growth), nn.ReLU(), nn.Conv2d(bn_size * growth, growth, 3, padding=1, bias=False),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNet(nn.Module):
    def __init__(
        self, blocks: Sequence[int] = (6, 12, 24, 16), growth: int = 32, init: int = 64, bn_size: int = 4, classes: int = 1000
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, init, 7, 2, 3, bias=False), nn.BatchNorm2d(init), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        c = init
        for i, count in enumerate(blocks):
            for _ in range(count):
                layers.append(DenseLayer(c, growth, bn_size))
                c += growth
            if i < len(blocks) - 1:  # transition: halve channels and resolution
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2, 2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


# --------------------------------------------------------------------------- Network in Network


class NIN(nn.Module):
    """The CIFAR-10 NIN (conv + two 1x1 "cccp" layers per block); ``bn`` adds BN after each conv.

    Caffe pools with ceil rounding (32 -> 16 -> 8); the dropout layers are no-ops in inference.
    """

    def __init__(self, bn: bool = False, classes: int = 10) -> None:
        super().__init__()

        def mlpconv(cin: int, widths: tuple[int, int, int], k: int) -> list[nn.Module]:
            c0, c1, c2 = widths
            return [
                *_conv(cin, c0, k, 1, k // 2, bn=bn), nn.ReLU(),
                *_conv(c0, c1, 1, bn=bn), nn.ReLU(),
                *_conv(c1, c2, 1, bn=bn), nn.ReLU(),
            ]  # fmt: skip

        self.features = nn.Sequential(
            *mlpconv(3, (192, 160, 96), 5), nn.MaxPool2d(3, 2, ceil_mode=True), nn.Dropout(0.5),
            *mlpconv(96, (192, 192, 192), 5), nn.AvgPool2d(3, 2, ceil_mode=True), nn.Dropout(0.5),
            *mlpconv(192, (192, 192, classes), 3),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Arch:
    """An architecture: how to build it and at which input sizes it runs."""

    name: str
    make: Callable[[int, bool], nn.Module]  # (input size, bn) -> module
    has_bn: bool  # the published network has BatchNorm (else ``bn=True`` is a variant)
    size: int  # the published input size
    test_size: int  # the small size the tests use (the architecture's minimum where that is larger)
    min_size: int = 32  # the least input size the layers accept
    # BNs reading something other than a Conv (DenseNet's pre-activation BNs): no exporter can fold them
    unfoldable_bn: bool = False
    cifar: bool = False  # a 32x32 CIFAR network: its input size is fixed, ``--size`` is for the ImageNet ones


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in [
        # 67 is the least size AlexNet takes: conv1 (11/4, no pad) and three 3/2 pools must leave 1 pixel
        Arch("alexnet", lambda s, bn: AlexNet(s, bn), False, 227, 67, min_size=67),
        Arch("vgg16", lambda s, bn: VGG16(s, bn), False, 224, 64),
        Arch("resnet18", lambda s, bn: ResNet(BasicBlock, (2, 2, 2, 2)), True, 224, 64),
        Arch("resnet50", lambda s, bn: ResNet(Bottleneck, (3, 4, 6, 3)), True, 224, 64),
        Arch("googlenet", lambda s, bn: GoogLeNet(), True, 224, 64),
        Arch("mobilenetv2", lambda s, bn: MobileNetV2(), True, 224, 64),
        Arch("densenet121", lambda s, bn: DenseNet(), True, 224, 64, unfoldable_bn=True),
        Arch("nin", lambda s, bn: NIN(bn), False, 32, 32, cifar=True),
    ]
}


@dataclass(frozen=True)
class Variant:
    """One exported file: an architecture in one form.

    ``form`` is ``"bnfolded"`` (Conv+BN fused by the exporter; for the networks
    without BN, the published BN-free network) or ``"bnkept"`` (Conv ->
    BatchNormalization left in the graph; the BN variant for networks without BN).
    """

    name: str
    arch: Arch
    form: str
    fp16: bool = False
    external_data: bool = False

    @property
    def bn(self) -> bool:
        """Whether the torch module has BatchNorm layers."""
        return self.arch.has_bn or self.form == "bnkept"


VARIANTS: list[Variant] = [
    *(Variant(f"{a.name}-{form}", a, form) for a in ARCHS.values() for form in ("bnfolded", "bnkept")),
    Variant("resnet18-fp16", ARCHS["resnet18"], "bnfolded", fp16=True),
    Variant("resnet50-external", ARCHS["resnet50"], "bnfolded", external_data=True),
]


def variant(name: str) -> Variant:
    for v in VARIANTS:
        if v.name == name:
            return v
    raise KeyError(f"no zoo variant {name!r}; known: {', '.join(v.name for v in VARIANTS)}")


def randomize(model: nn.Module, seed: int = SEED, calibration_size: int = 64, batch: int = 4) -> nn.Module:
    """Seeded random weights, BN statistics measured on a random batch; returns ``model`` in eval mode."""
    torch.manual_seed(seed)
    bns: list[nn.BatchNorm2d] = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.in_channels // m.groups * math.prod(m.kernel_size)
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_in))
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.1)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, math.sqrt(1.0 / m.in_features))
            nn.init.normal_(m.bias, 0.0, 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0.0, 0.2)
            bns.append(m)
    if bns:
        # one training-mode pass with momentum None sets each running mean/var to the batch's own
        # statistics, measured downstream of the random affine params above
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        # a generator of its own: the batch must not depend on how many weights were drawn before it
        data = torch.randn(batch, 3, calibration_size, calibration_size, generator=torch.Generator().manual_seed(seed + 1))
        with torch.no_grad():
            model(data)
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def build(v: Variant | str, size: int | None = None) -> nn.Module:
    """The variant's torch module (float32, eval mode) at ``size`` (default: its test size)."""
    v = variant(v) if isinstance(v, str) else v
    size = size or v.arch.test_size
    # conv weights are the same at every size; BN statistics are measured at the size the module is for
    return randomize(v.arch.make(size, v.bn), calibration_size=size)
