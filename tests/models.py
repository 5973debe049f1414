"""Small hand-written models used by the tests (no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class CifarBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of the DIA paper: 3 stages of bottlenecks (ResNet-164: depth 164)."""

    def __init__(self, depth: int = 164, num_classes: int = 100) -> None:
        super().__init__()
        blocks = (depth - 2) // 9
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, blocks, 1)
        self.layer2 = self._make_layer(32, blocks, 2)
        self.layer3 = self._make_layer(64, blocks, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * CifarBottleneck.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [CifarBottleneck(self.inplanes, planes, stride)]
        self.inplanes = planes * CifarBottleneck.expansion
        layers += [CifarBottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_dia_lean(random_norms: bool = False) -> nn.Module:
    """The lean DIA model (no SSIA) of a seeded CifarResNet-20: 6 sites, groups of 64, 128 and
    256 channels, 32x32 input. ``random_norms``: batch norms that are not the identity, so that
    the exported (folded) convolutions have biases."""
    import fxattn

    torch.manual_seed(0)
    model = CifarResNet(depth=20, num_classes=10).eval()
    lean = fxattn.strip_ssia(fxattn.transform(model, torch.randn(2, 3, 32, 32), ssia=False))
    generator = torch.Generator().manual_seed(1)
    for module in lean.modules() if random_norms else ():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low, high in ((module.running_mean, -0.5, 0.5),
                                      (module.running_var, 0.5, 2.0),
                                      (module.weight.data, 0.5, 1.5),
                                      (module.bias.data, -0.5, 0.5)):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return lean


class DataDependent(nn.Module):
    """Branches on a tensor value inside a submodule: symbolic tracing cannot follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.stem(x))
        return self.head(x.mean((2, 3)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return x


class LayerDrop(nn.Module):
    """Skips each block on a coin flip in training (HF's LayerDrop): structure drawn at random."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            if self.training and torch.rand([], device=x.device) < self.p:
                continue
            x = x + block(x)
        return self.head(x.mean((2, 3)))


class PlainMLP(nn.Module):
    """No residual addition and no spatial stage: nothing for DIA or SSIA to attach to."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class _ResidualBlock(nn.Module):
    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        self.conv = _CONV[dims](channels, channels, 3, padding=1, bias=False)
        self.bn = _NORM[dims](channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class ResidualCNN(nn.Module):
    """A tiny residual CNN over ``dims`` spatial dims: ``(B, C, L)`` signals (dims=1) or
    ``(B, C, T, H, W)`` clips (dims=3). Three stages, each halving every spatial dim."""

    def __init__(self, dims: int, width: int = 8, num_classes: int = 5) -> None:
        super().__init__()
        conv = _CONV[dims]
        self.stem = conv(2, width, 3, padding=1)
        stages = []
        for i in range(3):
            c_in, c_out = width * 2 ** max(i - 1, 0), width * 2**i
            down = conv(c_in, c_out, 3, stride=2 if i else 1, padding=1)
            stages.append(nn.Sequential(down, _ResidualBlock(dims, c_out)))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(torch.relu(self.stem(x)))
        return self.head(features.flatten(2).mean(-1))


class TwoViews(nn.Module):
    """RAFT's pattern: both images through one encoder (``cat`` on the batch), then ``chunk``.

    The shape check makes ``torch.fx`` fail (a Python ``if`` on sizes), so it is captured with
    ``torch.export``, whose symbolic solver cannot prove the guard ``chunk`` emits for a shared
    batch: its ONNX export comes out with a static batch.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(_ResidualBlock(2, width), _ResidualBlock(2, width))
        self.head = nn.Conv2d(2 * width, 2, 1)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        if image1.shape[-2:] != image2.shape[-2:]:
            raise ValueError("the two images differ in size")
        features = self.blocks(self.stem(torch.cat([image1, image2], 0)))
        first, second = torch.chunk(features, 2, dim=0)
        return self.head(torch.cat([first, second], 1))


class PinnedBatch(nn.Module):
    """A residual CNN that checks its batch size in Python (``torch.fx`` cannot trace the
    check; ``torch.export`` specialises the batch to the checked value)."""

    def __init__(self, batch: int, width: int = 8) -> None:
        super().__init__()
        self.batch = batch
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(_ResidualBlock(2, width), _ResidualBlock(2, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != self.batch:
            raise ValueError(f"this model takes batches of {self.batch}")
        return self.blocks(self.stem(x)).mean((2, 3))


class _InPlaceBlock(nn.Module):
    def __init__(self, channels: int, inplace: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv(x))


class ConstantResolution(nn.Module):
    """Six residual blocks at one resolution, each ending in ``ReLU(inplace=...)`` right after
    its add: SSIA taps the adds, which the in-place ReLU then overwrites (timm's byobnet)."""

    def __init__(self, inplace: bool = True, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.blocks = nn.Sequential(*[_InPlaceBlock(width, inplace) for _ in range(6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean((2, 3))


class TokenResidual(nn.Module):
    """Residual linear blocks over ``(B, N, 8)`` tokens (a ViT's shape, no attention): its own
    linear layers export as ``MatMul``; DIA pools over the tokens."""

    def __init__(self, width: int = 32, blocks: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return x.mean(1)



class SplitResidual(nn.Module):
    """A Res2Net-like residual add on a 14-channel split: the shortcut is one half of a split
    tensor (onnxruntime keeps it in NCHW) and 14 is not a multiple of 4."""

    def __init__(self, channels: int = 14) -> None:
        super().__init__()
        self.channels = channels
        self.stem = nn.Conv2d(3, 2 * channels, 3, padding=1)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.head = nn.Linear(2 * channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(torch.relu(self.stem(x)), self.channels, dim=1)
        y = torch.relu(self.conv(a) + b)
        return self.head(torch.cat([y, a], 1).mean((2, 3)))
