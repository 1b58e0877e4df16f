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
levit_block         LeViT block: MatMul -> Reshape -> BN1d -> Reshape; BN1d -> Gemm head
iresnet_head        IResNet blocks; face head BN2d -> Dropout -> Flatten -> Linear -> BN1d
tf_conv_bias        Conv -> Add/Mul/Sub(per-channel constant) -> BN; BN -> Mul; BN -> BN
channels_last_mlp   BN (NCHW) -> Transpose to NHWC (-> Reshape) -> MatMul
repvgg_small        RepVGG-A0 blocks: 3x3 Conv+BN + 1x1 Conv+BN (+ BN on x), summed
mobileone_small     MobileOne: 3 kxk Conv+BN + 1x1 scale Conv+BN (+ BN on x); depthwise, pointwise
repghost_small      RepGhost: depthwise 3x3 Conv+BN + BN on the same input, in ghost bottlenecks
acnet_small         ACNet: 3x3 + 1x3 + 3x1 Conv+BN, summed; dense, strided, depthwise
repvit_block        RepViT token mixer: BN(depthwise 3x3 Conv+BN + depthwise 1x1 Conv + x)
NAME_deploy         each of the five above re-parameterized in torch: one Conv per block, no BN
==================  =====================================================================

``SAMPLES`` maps each name to a :class:`Sample` (factory, default input shapes, description), in the
order above. Weights come from torch's default initialisation: seed the RNG before calling a factory
for reproducible weights (``bnfold export`` does).

The re-parameterizable samples train with parallel branches that are meant to ship as one Conv; each
carries its own deploy-time merge in torch, as the papers' code does (:class:`RepBlock`,
:func:`deploy`), so that its deploy twin ``NAME_deploy`` is what the model's authors would export.
``bnfold export`` makes a twin from the train form's seeded weights and randomized BNs.

This module imports torch: only bnfold.export imports it, lazily; the committed exports of these
models are in the checkout's sample_models/.
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


# ------------------------------------------------------------------- BN one or more ops from its linear op
class LinearBN(nn.Module):
    """LeViT's Linear_BN: bias-free Linear on [B, T, C] tokens, BatchNorm1d over the flattened tokens.

    The BN sees [B*T, C] (channels on axis 1) and the result is reshaped back: in ONNX a MatMul, a
    Reshape to 2-D, the BN and a Reshape back to 3-D.
    """

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return self.bn(y.flatten(0, 1)).reshape_as(y)


class LeViTAttention(nn.Module):
    """LeViT attention: qkv Linear_BN, softmax(q k^T / sqrt(d) + positional bias) v, Hardswish, projection Linear_BN.

    The bias is a learned value per head and per relative offset (|dx|, |dy|) between two tokens of
    the side x side grid, gathered into a [heads, T, T] table as LeViT does.
    """

    def __init__(self, dim: int, key_dim: int, heads: int, value_dim: int, side: int):
        super().__init__()
        self.heads, self.key_dim, self.value_dim = heads, key_dim, value_dim
        self.scale = key_dim ** -0.5
        self.qkv = LinearBN(dim, heads * (2 * key_dim + value_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(heads * value_dim, dim))
        points = [(i, j) for i in range(side) for j in range(side)]
        offsets = sorted({(abs(a[0] - b[0]), abs(a[1] - b[1])) for a in points for b in points})
        lookup = {offset: k for k, offset in enumerate(offsets)}
        index = [[lookup[(abs(a[0] - b[0]), abs(a[1] - b[1]))] for b in points] for a in points]
        self.bias = nn.Parameter(0.1 * torch.randn(heads, len(offsets)))
        self.register_buffer("bias_index", torch.tensor(index, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, self.heads, -1).split(
            [self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        attention = (q @ k.transpose(-2, -1)) * self.scale + self.bias[:, self.bias_index]
        y = (attention.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        return self.proj(y)


class LeViTBlock(nn.Module):
    """A LeViT stage block on tokens: residual attention, then residual MLP (Linear_BN, Hardswish, Linear_BN)."""

    def __init__(self, dim: int, key_dim: int, heads: int, side: int, mlp_ratio: int = 2):
        super().__init__()
        self.attention = LeViTAttention(dim, key_dim, heads, 2 * key_dim, side)
        self.mlp = nn.Sequential(LinearBN(dim, mlp_ratio * dim), nn.Hardswish(), LinearBN(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(x)
        return x + self.mlp(x)


class LeViT(nn.Module):
    """Conv+BN+Hardswish patch stem (/4), tokens by flatten(2).transpose(1, 2), a block, BN+Linear head.

    The four Linear_BN BNs each sit between Reshapes after a MatMul: they fold into the weight's columns
    only through the Reshapes. The head's BatchNorm1d on the token mean feeds a Linear (Gemm).
    """

    def __init__(self, dim: int = 32, key_dim: int = 8, heads: int = 2, side: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, dim // 2, 3, 2, act=nn.Hardswish), conv_bn(dim // 2, dim, 3, 2, act=None))
        self.block = LeViTBlock(dim, key_dim, heads, side)
        self.head = nn.Sequential(nn.BatchNorm1d(dim), nn.Linear(dim, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.block(tokens).mean(1))


class IBasicBlock(nn.Module):
    """InsightFace IResNet block: BN, 3x3 Conv, BN, PReLU, 3x3 Conv (stride), BN; + 1x1 Conv+BN shortcut.

    The first BN reads the block input (a PReLU or a residual Add) and feeds a padded Conv: it has
    no exact fold.
    """

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.PReLU(width),
                                  nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width))
        self.shortcut = conv_bn(cin, width, 1, stride, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def iresnet_head(widths: tuple[int, int, int] = (16, 32, 32), features: int = 16) -> nn.Module:
    """Conv+BN+PReLU stem, two strided IBasicBlocks, face-embedding head BN2d-Dropout-Flatten-Linear-BN1d.

    The head's BN2d follows the last residual Add: it folds only forward, through Flatten into the
    Linear (feature c*H*W + i carries channel c). Input 32x32 ends at 8x8.
    """
    stem, first, second = widths
    return nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.PReLU(stem),
                         IBasicBlock(stem, first, 2), IBasicBlock(first, second, 2),
                         nn.BatchNorm2d(second), nn.Dropout(0.4), nn.Flatten(),
                         nn.Linear(second * 8 * 8, features), nn.BatchNorm1d(features))


class BiasAddConv(nn.Module):
    """Bias-free Conv, then its bias as an explicit per-channel Add, as TF/Keras exports write BiasAdd."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bias = nn.Parameter(0.5 * torch.randn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias.view(1, -1, 1, 1)


class TFConvBias(nn.Module):
    """Per-channel affine ops between Conv and BN, and after BN, as converted TF/Keras models hold them.

    Conv -> Add(bias) -> BN; Conv -> Mul(learned scale) -> BN; Conv -> Sub(constant) -> BN;
    Conv -> BN -> Mul(layer scale) into a residual Add; Conv -> BN -> BN. Each chain is per-channel
    affine along the Conv's output channels, so all of it can fold into the Conv.
    """

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        wide = 2 * width
        self.stem = nn.Sequential(BiasAddConv(3, width, 2), nn.BatchNorm2d(width), nn.ReLU())
        self.scaled_conv = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.scale = nn.Parameter(0.5 + torch.rand(1, width, 1, 1))
        self.scaled_bn = nn.BatchNorm2d(width)
        self.centred_conv = nn.Conv2d(width, wide, 3, 2, 1, bias=False)
        self.register_buffer("offset", 0.5 * torch.randn(1, wide, 1, 1))
        self.centred_bn = nn.BatchNorm2d(wide)
        self.residual = conv_bn(wide, wide, 3, act=None)
        self.layer_scale = nn.Parameter(0.1 + 0.5 * torch.rand(1, wide, 1, 1))
        self.double_bn = nn.Sequential(nn.Conv2d(wide, wide, 3, 1, 1, bias=False), nn.BatchNorm2d(wide),
                                       nn.BatchNorm2d(wide), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(wide, classes))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.relu(self.scaled_bn(self.scaled_conv(x) * self.scale))
        x = self.relu(self.centred_bn(self.centred_conv(x) - self.offset))
        x = self.relu(x + self.residual(x) * self.layer_scale)
        return self.head(self.double_bn(x))


class ChannelsLastBlock(nn.Module):
    """ConvNeXt/MLP-Mixer-style block with BatchNorm: BN (NCHW), to NHWC, Linear 4x, GELU, Linear, back, + x.

    The BN reads the residual stream, which the Add reads too: it can fold only forward, through the
    Transpose, into the rows of the first Linear's weight.
    """

    def __init__(self, dim: int, ratio: int = 4):
        super().__init__()
        self.bn = nn.BatchNorm2d(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.bn(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelsLastMLP(nn.Module):
    """Patchify Conv stem (/4), two channels-last blocks, and a per-token MLP head.

    The head: BN (NCHW), to NHWC, tokens [B, H*W, C], Linear + GELU per token, mean over tokens, Linear.
    """

    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, 4)
        self.blocks = nn.Sequential(ChannelsLastBlock(dim), ChannelsLastBlock(dim))
        self.head_bn = nn.BatchNorm2d(dim)
        self.token_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU())
        self.classifier = nn.Linear(2 * dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        tokens = self.head_bn(x).permute(0, 2, 3, 1).flatten(1, 2)
        return self.classifier(self.token_mlp(tokens).mean(1))


# ---------------------------------------------------------------------- structural re-parameterization
def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN as per-channel (scale, shift) in float64: bn(x) = scale * x + shift."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    return scale, bn.bias.double() - bn.running_mean.double() * scale


def _identity_kernel(channels: int, in_per_group: int) -> torch.Tensor:
    """The 1x1 kernel of x itself: 1 in each output channel's own input slot of its group."""
    kernel = torch.zeros(channels, in_per_group, 1, 1, dtype=torch.float64)
    index = torch.arange(channels)
    kernel[index, index % in_per_group] = 1.0
    return kernel


def _centred(kernel: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad an odd kernel to `size` around its centre: with 'same' padding it computes the same grid."""
    rows, cols = size[0] - kernel.shape[2], size[1] - kernel.shape[3]
    return nn.functional.pad(kernel, (cols // 2, cols // 2, rows // 2, rows // 2))


class RepBlock(nn.Module):
    """Parallel branches over one input, summed (then, optionally, one BN): deploys as a single Conv.

    Subclasses name their branches in `branch_names` (a Conv+BN, a plain Conv, a BN on x, x itself as
    nn.Identity, a ModuleList of those, or None when absent) and the BN applied to the sum in `after_sum`,
    and compute the train form in `branch_sum`. `reparameterize()` does what the papers' deploy code
    does: each branch becomes a kernel and a bias (BN folded, small kernels zero-padded to the block's
    size around their centre, an identity as a centre-1 kernel), all are summed in float64 and the
    result, rounded once to the block's dtype, is one Conv with a bias that replaces the branches.
    """

    branch_names: tuple[str, ...] = ()
    after_sum: str | None = None

    def __init__(self, cin: int, cout: int, size: tuple[int, int], stride: int, groups: int):
        super().__init__()
        self.cin, self.cout, self.size, self.stride, self.groups = cin, cout, size, stride, groups
        self.fused: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch_sum(x) if self.fused is None else self.fused(x)

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The train form's computation (each subclass writes it as its paper's code does)."""
        raise NotImplementedError

    def branches(self) -> list[nn.Module]:
        """The branches present, ModuleLists flattened."""
        found: list[nn.Module] = []
        for name in self.branch_names:
            branch = getattr(self, name)
            if isinstance(branch, nn.ModuleList):
                found.extend(branch)
            elif branch is not None:
                found.append(branch)
        return found

    def kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The one Conv's kernel and bias, in float64."""
        kernel = torch.zeros(self.cout, self.cin // self.groups, *self.size, dtype=torch.float64)
        bias = torch.zeros(self.cout, dtype=torch.float64)
        for branch in self.branches():
            k, b = self._branch_kernel_bias(branch)
            kernel, bias = kernel + _centred(k, self.size), bias + b
        if self.after_sum is not None:
            scale, shift = _bn_affine(getattr(self, self.after_sum))
            kernel, bias = kernel * scale.view(-1, 1, 1, 1), bias * scale + shift
        return kernel, bias

    def _branch_kernel_bias(self, branch: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(branch, RepBlock):
            return branch.kernel_bias()
        if isinstance(branch, nn.Conv2d):
            bias = torch.zeros(self.cout, dtype=torch.float64) if branch.bias is None else branch.bias.double()
            return branch.weight.double(), bias
        identity = _identity_kernel(self.cout, self.cin // self.groups)
        if isinstance(branch, nn.BatchNorm2d):
            scale, shift = _bn_affine(branch)
            return identity * scale.view(-1, 1, 1, 1), shift
        if isinstance(branch, nn.Identity):
            return identity, torch.zeros(self.cout, dtype=torch.float64)
        raise TypeError(f"{type(self).__name__} cannot merge a {type(branch).__name__} branch")

    def reparameterize(self) -> None:
        """Replace the branches (and the BN after their sum) by one Conv with a bias."""
        kernel, bias = self.kernel_bias()
        dtype = next(self.parameters()).dtype
        fused = nn.Conv2d(self.cin, self.cout, self.size, self.stride, (self.size[0] // 2, self.size[1] // 2),
                          groups=self.groups, bias=True).to(dtype)
        with torch.no_grad():
            fused.weight.copy_(kernel)
            fused.bias.copy_(bias)
        for name in (*self.branch_names, *([self.after_sum] if self.after_sum else [])):
            setattr(self, name, None)
        self.fused = fused


def deploy(model: nn.Module) -> nn.Module:
    """Re-parameterize a model in place, as the papers' code does before export: every RepBlock (each
    Conv+BN pair included) becomes one Conv, so no BN is left. Returns the model."""
    if isinstance(model, RepBlock):
        model.reparameterize()
    else:
        for child in model.children():
            deploy(child)
    return model


class ConvBN(RepBlock):
    """Conv (no bias, 'same' padding) + BatchNorm2d; deploys as a Conv with a bias."""

    branch_names = ("conv",)
    after_sum = "bn"

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1, groups: int = 1):
        size = (kernel, kernel) if isinstance(kernel, int) else kernel
        super().__init__(cin, cout, size, stride, groups)
        self.conv = nn.Conv2d(cin, cout, size, stride, (size[0] // 2, size[1] // 2), groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class RepVGGBlock(RepBlock):
    """RepVGG block: 3x3 Conv+BN + 1x1 Conv+BN (+ BN on x when the shapes agree); ReLU follows it.

    Written as the RepVGG paper's code writes it: the missing identity branch is the number 0.
    """

    branch_names = ("dense", "pointwise", "identity")

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, (3, 3), stride, 1)
        self.dense = ConvBN(cin, cout, 3, stride)
        self.pointwise = ConvBN(cin, cout, 1, stride)
        self.identity = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        identity = 0 if self.identity is None else self.identity(x)
        return self.dense(x) + self.pointwise(x) + identity


def repvgg_small(depths: tuple[int, ...] = (1, 2, 4, 1), widths: tuple[int, ...] = (8, 16, 32, 64),
                 classes: int = 10) -> nn.Module:
    """RepVGG-A0's layout (first block of each stage strided), shortened and narrow, global pool + Linear."""
    layers: list[nn.Module] = []
    cin = 3
    for depth, width in zip(depths, widths):
        for i in range(depth):
            layers += [RepVGGBlock(cin, width, 2 if i == 0 else 1), nn.ReLU()]
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))


class MobileOneBlock(RepBlock):
    """MobileOne block: `count` parallel kxk Conv+BN (over-parameterization), a 1x1 Conv+BN scale branch
    when k > 1, a BN on x when the shapes agree; ReLU follows it.

    Written as MobileOne's published code writes it: the sum starts from the scale and skip outputs,
    each the number 0 when absent, and adds the kxk branches one by one.
    """

    branch_names = ("skip", "scale", "convs")

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, groups: int, count: int):
        super().__init__(cin, cout, (kernel, kernel), stride, groups)
        self.convs = nn.ModuleList(ConvBN(cin, cout, kernel, stride, groups) for _ in range(count))
        self.scale = ConvBN(cin, cout, 1, stride, groups) if kernel > 1 else None
        self.skip = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        scale = 0 if self.scale is None else self.scale(x)
        skip = 0 if self.skip is None else self.skip(x)
        out = scale + skip
        for conv in self.convs:
            out = out + conv(x)
        return out


def mobileone_small(count: int = 3, classes: int = 10) -> nn.Module:
    """MobileOne-S0-like: a 3x3/2 MobileOne stem, then units of a depthwise 3x3 block and a pointwise
    1x1 block (each block `count` branches wide), strides 2, 2, 1; global pool + Linear."""
    layers: list[nn.Module] = [MobileOneBlock(3, 16, 3, 2, 1, count), nn.ReLU()]
    for cin, cout, stride in ((16, 32, 2), (32, 48, 2), (48, 48, 1)):
        layers += [MobileOneBlock(cin, cin, 3, stride, cin, count), nn.ReLU(),
                   MobileOneBlock(cin, cout, 1, 1, 1, count), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, classes))


class GhostCheap(RepBlock):
    """RepGhost's cheap operation: a depthwise 3x3 Conv+BN on x plus a BN on x itself (the identity that
    re-parameterizes, where GhostNet concatenates)."""

    branch_names = ("cheap", "fusion")

    def __init__(self, channels: int):
        super().__init__(channels, channels, (3, 3), 1, channels)
        self.cheap = ConvBN(channels, channels, 3, groups=channels)
        self.fusion = nn.BatchNorm2d(channels)

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.cheap(x) + self.fusion(x)


def repghost_module(cin: int, cout: int, relu: bool) -> nn.Sequential:
    """RepGhost module: 1x1 Conv+BN (+ ReLU), then the cheap operation on its output (+ ReLU)."""
    act = nn.ReLU if relu else nn.Identity
    return nn.Sequential(ConvBN(cin, cout, 1), act(), GhostCheap(cout), act())


class RepGhostBottleneck(nn.Module):
    """RepGhost bottleneck: ghost module (ReLU), depthwise 3x3/2 Conv+BN when strided, ghost module
    (no ReLU), plus the shortcut: x, or a depthwise 3x3 Conv+BN then a 1x1 Conv+BN."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        layers = [repghost_module(cin, mid, relu=True)]
        if stride > 1:
            layers.append(ConvBN(mid, mid, 3, stride, groups=mid))
        self.body = nn.Sequential(*layers, repghost_module(mid, cout, relu=False))
        self.shortcut: nn.Module = nn.Identity()
        if stride > 1 or cin != cout:
            self.shortcut = nn.Sequential(ConvBN(cin, cin, 3, stride, groups=cin), ConvBN(cin, cout, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def repghost_small(classes: int = 10) -> nn.Module:
    """RepGhostNet-like: 3x3/2 Conv+BN+ReLU stem, three bottlenecks (the second strided), 1x1 Conv+BN+ReLU,
    global pool + Linear."""
    return nn.Sequential(ConvBN(3, 8, 3, 2), nn.ReLU(),
                         RepGhostBottleneck(8, 16, 8, 1), RepGhostBottleneck(8, 24, 16, 2),
                         RepGhostBottleneck(16, 32, 16, 1),
                         ConvBN(16, 64, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


class ACBlock(RepBlock):
    """ACNet's asymmetric convolution block: 3x3 Conv+BN + 1x3 Conv+BN + 3x1 Conv+BN, each padded so
    that its kernel centre sits on the same output grid."""

    branch_names = ("square", "horizontal", "vertical")

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, (3, 3), stride, groups)
        self.square = ConvBN(cin, cout, 3, stride, groups)
        self.horizontal = ConvBN(cin, cout, (1, 3), stride, groups)
        self.vertical = ConvBN(cin, cout, (3, 1), stride, groups)

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.square(x) + self.vertical(x) + self.horizontal(x)


def acnet_small(classes: int = 10) -> nn.Module:
    """A small CNN whose every Conv is an ACBlock + ReLU: dense, strided, depthwise; global pool + Linear."""
    layers: list[nn.Module] = []
    for cin, cout, stride, groups in ((3, 16, 1, 1), (16, 32, 2, 1), (32, 32, 1, 32), (32, 64, 2, 1)):
        layers += [ACBlock(cin, cout, stride, groups), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


class RepViTMixer(RepBlock):
    """RepViT's token mixer (RepVGGDW): BN(depthwise 3x3 Conv+BN + depthwise 1x1 Conv with a bias + x),
    a BN after the sum of the branches."""

    branch_names = ("conv", "conv1", "skip")
    after_sum = "bn"

    def __init__(self, channels: int):
        super().__init__(channels, channels, (3, 3), 1, channels)
        self.conv = ConvBN(channels, channels, 3, groups=channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.skip = nn.Identity()
        self.bn = nn.BatchNorm2d(channels)

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + self.skip(x))


class RepViTBlock(nn.Module):
    """RepViT block: the token mixer, then a residual channel mixer 1x1 Conv+BN, GELU, 1x1 Conv+BN."""

    def __init__(self, dim: int, ratio: int = 2):
        super().__init__()
        self.mixer = RepViTMixer(dim)
        self.ffn = nn.Sequential(ConvBN(dim, ratio * dim, 1), nn.GELU(), ConvBN(ratio * dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mixer(x)
        return x + self.ffn(x)


def repvit_block(dim: int = 16, classes: int = 10) -> nn.Module:
    """RepViT's stem (two 3x3/2 Conv+BN, GELU between), one RepViT block, global pool + Linear."""
    return nn.Sequential(ConvBN(3, dim // 2, 3, 2), nn.GELU(), ConvBN(dim // 2, dim, 3, 2),
                         RepViTBlock(dim), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dim, classes))


# -------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Sample:
    """A sample architecture: how to build it, the input shapes it is exported with, what it shows."""

    factory: Callable[[], nn.Module]
    input_shapes: tuple[tuple[int, ...], ...]
    description: str
    # A deploy twin's train form: export builds it, randomizes its BNs, then deploys it, so that both
    # forms hold the same weights and statistics (`factory` deploys the unrandomized train form).
    train_form: Callable[[], nn.Module] | None = None


def _deploy_twin(name: str, train: Sample) -> Sample:
    """The sample re-parameterized in torch (one Conv per block, no BN), from the same train form."""
    return Sample(lambda: deploy(train.factory()), train.input_shapes,
                  f"{name} deployed in torch: one Conv per block, no BN", train.factory)


_REPARAMETERIZABLE = {
    "repvgg_small": Sample(repvgg_small, ((1, 3, 32, 32),), "RepVGG-A0 blocks: 3x3, 1x1 and identity-BN branches"),
    "mobileone_small": Sample(mobileone_small, ((1, 3, 32, 32),),
                              "MobileOne: 3 kxk branches, 1x1 scale, identity BN; depthwise + pointwise"),
    "repghost_small": Sample(repghost_small, ((1, 3, 32, 32),), "RepGhost: depthwise Conv+BN + BN on the same input"),
    "acnet_small": Sample(acnet_small, ((1, 3, 32, 32),), "ACNet: 3x3 + 1x3 + 3x1 Conv+BN branches"),
    "repvit_block": Sample(repvit_block, ((1, 3, 32, 32),), "RepViT mixer: BN(Conv+BN + Conv + x)"),
}


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
    "levit_block": Sample(LeViT, ((1, 3, 32, 32),), "LeViT block: MatMul -> Reshape -> BN1d -> Reshape on tokens"),
    "iresnet_head": Sample(iresnet_head, ((1, 3, 32, 32),), "IResNet blocks, BN2d -> Flatten -> Linear -> BN1d head"),
    "tf_conv_bias": Sample(TFConvBias, ((1, 3, 32, 32),), "per-channel Add/Mul/Sub between Conv and BN, BN -> BN"),
    "channels_last_mlp": Sample(ChannelsLastMLP, ((1, 3, 32, 32),), "BN (NCHW) -> Transpose to NHWC -> MatMul"),
    **{key: value for name, train in _REPARAMETERIZABLE.items()
       for key, value in ((name, train), (f"{name}_deploy", _deploy_twin(name, train)))},
}
