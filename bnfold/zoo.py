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
    "levit_block": Sample(LeViT, ((1, 3, 32, 32),), "LeViT block: MatMul -> Reshape -> BN1d -> Reshape on tokens"),
    "iresnet_head": Sample(iresnet_head, ((1, 3, 32, 32),), "IResNet blocks, BN2d -> Flatten -> Linear -> BN1d head"),
    "tf_conv_bias": Sample(TFConvBias, ((1, 3, 32, 32),), "per-channel Add/Mul/Sub between Conv and BN, BN -> BN"),
    "channels_last_mlp": Sample(ChannelsLastMLP, ((1, 3, 32, 32),), "BN (NCHW) -> Transpose to NHWC -> MatMul"),
}
