"""The sample architectures: small torch models with the BatchNorm patterns of real networks.

Each network is written here from the published architecture (not copied from torchvision or timm)
and kept small, so that its ONNX export is a few hundred kilobytes and runs in milliseconds, while its
structure — which op precedes and follows every BatchNorm — is the one of the full-size model. That
structure is what decides whether bnfold can fold a BatchNorm, so each sample exercises one or more
folding rules or refusal reasons:

==================  =====================================================================
resnet_small        ResNet-18 layout (basic blocks): Conv+BN everywhere, 1x1 downsample
resnet50_small      ResNet-50 layout (bottleneck blocks) at 1/16 width
resnet50            ResNet-50 at full width (~25.6M parameters, ~100 MB): benchmarks only
mobilenetv2_small   depthwise Conv+BN, inverted residuals, ReLU6
efficientnet_block  MBConv blocks with squeeze-excitation and SiLU
densenet_small      BN-ReLU-Conv after Concat: most BNs have no foldable neighbour
unet_small          encoder Conv+BN, decoder ConvTranspose+BN with groups 1 and 2
audio_conv1d        Conv1d+BatchNorm1d: strided, dilated, depthwise
video_conv3d        Conv3d+BatchNorm3d: spatial, temporal depthwise
mlp_bn1d            Linear+BatchNorm1d (Gemm + BN), with and without bias
preact_block        BN that feeds a Conv or Linear directly (BN before the linear op)
shared_conv         one Conv module applied to two inputs, each path with its own BN
==================  =====================================================================

``SAMPLES`` maps each name to a :class:`Sample` (factory, default input shapes, description), in the
order above. Weights come from torch's default initialisation: seed the RNG before calling a factory
for reproducible weights (``bnfold export`` does). This module imports torch: only bnfold.export
imports it, lazily; the committed exports of these models are in the checkout's sample_models/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU, dims: int = 2) -> nn.Sequential:
    """Conv (no bias, 'same' padding) + BatchNorm (+ activation): the unit of most CNNs."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    norm = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims - 1]
    layers: list[nn.Module] = [conv(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               norm(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


# ------------------------------------------------------------------------------------------ ResNet
class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 Conv+BN, identity or 1x1 Conv+BN shortcut, ReLU after the add."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, width, 3, stride), conv_bn(width, width, 3, act=None))
        self.shortcut = _shortcut(cin, width * self.expansion, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet-50 block: 1x1 reduce, 3x3 (stride here, as in ResNet v1.5), 1x1 expand x4, each + BN."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(cin, width, 1), conv_bn(width, width, 3, stride),
                                  conv_bn(width, width * self.expansion, 1, act=None))
        self.shortcut = _shortcut(cin, width * self.expansion, stride)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity when shapes agree, else the 1x1 strided Conv+BN projection."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return conv_bn(cin, cout, 1, stride, act=None)


class ResNet(nn.Module):
    """7x7/2 stem + max pool, four stages of blocks (stride 1, 2, 2, 2), global pool, Linear."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: tuple[int, ...],
                 widths: tuple[int, ...], num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        stages, cin = [], widths[0]
        for index, (depth, width) in enumerate(zip(depths, widths)):
            for i in range(depth):
                stages.append(block(cin, width, 2 if i == 0 and index > 0 else 1))
                cin = width * block.expansion
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


# ------------------------------------------------------------------------------ MobileNet, EfficientNet
class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand + BN + ReLU6, 3x3 depthwise + BN + ReLU6, 1x1 project + BN."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
                   conv_bn(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    """Stem, inverted residual stages given as (expand, channels, repeats, stride), 1x1 head."""

    def __init__(self, config=((1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 2, 2), (6, 24, 1, 1)),
                 stem: int = 16, last: int = 64, num_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(3, stem, 3, 2, act=nn.ReLU6)]
        cin = stem
        for expand, cout, repeats, stride in config:
            for i in range(repeats):
                layers.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers.append(conv_bn(cin, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                                  nn.Linear(last, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SqueezeExcite(nn.Module):
    """Channel attention: global pool, 1x1 reduce + SiLU, 1x1 expand + sigmoid, rescale (no BN)."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, reduced, 1), nn.SiLU(),
                                  nn.Conv2d(reduced, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class MBConv(nn.Module):
    """EfficientNet block: expand + BN + SiLU, depthwise kxk + BN + SiLU, SE, project + BN."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(conv_bn(cin, hidden, 1, act=nn.SiLU),
                                  conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
                                  SqueezeExcite(hidden, max(1, cin // 4)),
                                  conv_bn(hidden, cout, 1, act=None))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def efficientnet_block() -> nn.Module:
    """An EfficientNet-B0-like stem, three MBConv blocks (one residual), 1x1 head."""
    return nn.Sequential(conv_bn(3, 16, 3, 2, act=nn.SiLU),
                         MBConv(16, 24, 3, 2, 4), MBConv(24, 24, 5, 1, 4), MBConv(24, 40, 5, 2, 4),
                         conv_bn(40, 96, 1, act=nn.SiLU),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))


# ------------------------------------------------------------------------------------------ DenseNet
class DenseLayer(nn.Module):
    """BN-ReLU-Conv1x1 (bottleneck), BN-ReLU-Conv3x3; the output is concatenated to the input."""

    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 4 * growth, 1, bias=False),
                                  nn.BatchNorm2d(4 * growth), nn.ReLU(),
                                  nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


def densenet_small(growth: int = 8, layers: tuple[int, ...] = (3, 3)) -> nn.Module:
    """Stem, dense blocks separated by BN-ReLU-Conv1x1-AvgPool transitions, final BN-ReLU."""
    modules: list[nn.Module] = [conv_bn(3, 2 * growth, 3)]
    channels = 2 * growth
    for index, count in enumerate(layers):
        for _ in range(count):
            modules.append(DenseLayer(channels, growth))
            channels += growth
        if index < len(layers) - 1:
            modules += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, channels // 2, 1, bias=False),
                        nn.AvgPool2d(2)]
            channels //= 2
    modules += [nn.BatchNorm2d(channels), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                nn.Linear(channels, 10)]
    return nn.Sequential(*modules)


# ---------------------------------------------------------------------------------------------- UNet
class UNet(nn.Module):
    """Two-level UNet; the decoder upsamples with ConvTranspose+BN+ReLU, groups=1 then groups=2.

    The first ConvTranspose has a bias and output_padding (k3, s2, p1, op1); the second is grouped,
    bias-free, k2 s2 — the weight layouts that differ between Conv and ConvTranspose folding.
    """

    def __init__(self, base: int = 8, classes: int = 2):
        super().__init__()
        self.enc1 = nn.Sequential(conv_bn(3, base), conv_bn(base, base))
        self.enc2 = nn.Sequential(conv_bn(base, 2 * base), conv_bn(2 * base, 2 * base))
        self.mid = conv_bn(2 * base, 4 * base)
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.Sequential(nn.ConvTranspose2d(4 * base, 2 * base, 3, 2, 1, output_padding=1),
                                 nn.BatchNorm2d(2 * base), nn.ReLU())
        self.dec2 = conv_bn(4 * base, 2 * base)
        self.up1 = nn.Sequential(nn.ConvTranspose2d(2 * base, base, 2, 2, groups=2, bias=False),
                                 nn.BatchNorm2d(base), nn.ReLU())
        self.dec1 = conv_bn(2 * base, base)
        self.head = nn.Conv2d(base, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        m = self.mid(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


# ----------------------------------------------------------------------------------- audio and video
def audio_conv1d() -> nn.Module:
    """Raw-waveform classifier: strided Conv1d (with bias), dilated, depthwise and pointwise Conv1d+BN."""
    return nn.Sequential(nn.Conv1d(1, 16, 9, stride=4, padding=4), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Conv1d(16, 32, 3, padding=2, dilation=2, bias=False), nn.BatchNorm1d(32), nn.ReLU(),
                         conv_bn(32, 32, 5, groups=32, act=None, dims=1),
                         conv_bn(32, 32, 1, dims=1),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(32, 10))


def video_conv3d() -> nn.Module:
    """Clip classifier: (2+1)D-style Conv3d+BN: spatio-temporal stem, spatial 1x3x3, temporal depthwise."""
    return nn.Sequential(nn.Conv3d(3, 8, 3, stride=(1, 2, 2), padding=1, bias=False), nn.BatchNorm3d(8), nn.ReLU(),
                         nn.Conv3d(8, 16, (1, 3, 3), padding=(0, 1, 1)), nn.BatchNorm3d(16), nn.ReLU(),
                         nn.Conv3d(16, 16, (3, 1, 1), padding=(1, 0, 0), groups=16, bias=False),
                         nn.BatchNorm3d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(16, 5))


# ----------------------------------------------------------------------------------------------- MLP
def mlp_bn1d() -> nn.Module:
    """Tabular MLP: Linear+BatchNorm1d+ReLU twice (second Linear without bias), Linear head."""
    return nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                         nn.Linear(128, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 10))


# ------------------------------------------------------------------------------ BN before the linear op
class PreActBlock(nn.Module):
    """BatchNorms that feed a linear op directly, as in pre-activation nets and classifier heads.

    `bn_in` feeds a bias-free 1x1 Conv (no padding: foldable forward into the Conv, which gains a
    bias); `bn_pad` feeds a padded 3x3 Conv (the zero padding is applied after BN's shift, so folding
    forward is not exact); `bn_fc` feeds the Linear head. Each BN sits after a ReLU, so none can fold
    backwards. The Convs are bias-free as in pre-activation ResNets, so the dynamo exporter gives
    them its zero-bias expression, which reads the BN's output for its dtype (CastLike).
    """

    def __init__(self, cin: int = 3, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(cin, width, 3, padding=1)
        self.relu = nn.ReLU()
        self.bn_in = nn.BatchNorm2d(width)
        self.expand = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.bn_pad = nn.BatchNorm2d(2 * width)
        self.spatial = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.bn_fc = nn.BatchNorm1d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(self.bn_in(self.relu(self.stem(x))))
        y = self.spatial(self.bn_pad(self.relu(y)))
        return self.fc(self.bn_fc(self.relu(self.pool(y))))


class SharedConv(nn.Module):
    """One Conv module applied to two inputs; each result has its own BN (one weight, two folds).

    A correct fold must give each Conv node its own copy of the shared weight: scaling the shared
    initializer in place for the first BN corrupts the second path.
    """

    def __init__(self, cin: int = 3, width: int = 8, classes: int = 4):
        super().__init__()
        self.shared = nn.Conv2d(cin, width, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(width)
        self.bn_b = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.Conv2d(width, classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn_a(self.shared(first)))
        b = self.relu(self.bn_b(self.shared(second)))
        return self.head(a + b)


# -------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Sample:
    """A sample architecture: how to build it, the input shapes it is exported with, what it shows."""

    factory: Callable[[], nn.Module]
    input_shapes: tuple[tuple[int, ...], ...]
    description: str


SAMPLES: dict[str, Sample] = {
    "resnet_small": Sample(lambda: ResNet(BasicBlock, (2, 2, 2, 2), (8, 16, 32, 64)), ((1, 3, 64, 64),),
                           "ResNet-18 layout, basic blocks, width 1/8"),
    "resnet50_small": Sample(lambda: ResNet(Bottleneck, (3, 4, 6, 3), (4, 8, 16, 32)), ((1, 3, 64, 64),),
                             "ResNet-50 layout, bottleneck blocks, width 1/16"),
    "resnet50": Sample(lambda: ResNet(Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 1000),
                       ((1, 3, 224, 224),), "ResNet-50 at full width (~100 MB), for benchmarks"),
    "mobilenetv2_small": Sample(MobileNetV2, ((1, 3, 64, 64),), "depthwise Conv+BN, inverted residuals"),
    "efficientnet_block": Sample(efficientnet_block, ((1, 3, 64, 64),), "MBConv with squeeze-excitation"),
    "densenet_small": Sample(densenet_small, ((1, 3, 32, 32),), "BN-ReLU-Conv after Concat"),
    "unet_small": Sample(UNet, ((1, 3, 32, 32),), "ConvTranspose+BN decoder, groups 1 and 2"),
    "audio_conv1d": Sample(audio_conv1d, ((1, 1, 4000),), "Conv1d+BatchNorm1d, dilated, depthwise"),
    "video_conv3d": Sample(video_conv3d, ((1, 3, 8, 32, 32),), "Conv3d+BatchNorm3d, temporal depthwise"),
    "mlp_bn1d": Sample(mlp_bn1d, ((4, 64),), "Linear+BatchNorm1d, with and without bias"),
    "preact_block": Sample(PreActBlock, ((1, 3, 32, 32),), "BN feeding a Conv or Linear directly"),
    "shared_conv": Sample(SharedConv, ((1, 3, 16, 16), (1, 3, 16, 16)),
                          "one Conv on two inputs, a BN on each path"),
}
