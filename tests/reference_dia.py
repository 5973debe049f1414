"""A hand-written DIA-ResNet, written from the paper's equations the way the official DIANet code
writes it, to check the compiler against.

Deliberately independent of :mod:`fxattn` (nothing here imports it): the structure mirrors the
official implementation (``small_cell`` MLPs, an ``LSTMCell`` with ``w_ih`` / ``w_hh`` lists, a
stage module that owns its blocks in ``ModuleList`` and one ``lstm`` shared by all of them).
Each block returns ``(branch, shortcut)``; the stage runs the shared cell on the branch, carries
``(h, c)`` from block to block, resets it to zero at the first block of the stage, multiplies
the branch by ``h`` *before* the residual add and applies the ReLU after the add::

    gates = w_ih(GAP(A_t)) + w_hh(h_{t-1});  i, f, g, o = gates.chunk(4)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g);  h_t = sigmoid(o) * sigmoid(c_t)
    y_t = ReLU(A_t * h_t + shortcut_t)

:func:`to_fxattn_state_dict` maps its weights onto a model produced by
``fxattn.transform(plain_resnet, ..., ssia=False)``: the backbone keys are the plain ResNet's
(torchvision naming), the shared cell of stage ``k`` (0-based) becomes ``fxattn_dia.g<k>``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock as PlainBasicBlock
from torchvision.models.resnet import Bottleneck as PlainBottleneck


class small_cell(nn.Module):  # noqa: N801 - the official DIANet name, kept on purpose
    """``Linear(C, C//r) -> ReLU -> Linear(C//r, 4*hidden)``: one path of the DIA-LSTM gates."""

    def __init__(self, input_size: int, hidden_size: int, reduction: int = 4) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(input_size, input_size // reduction),
            nn.ReLU(inplace=True),
            nn.Linear(input_size // reduction, 4 * hidden_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class LSTMCell(nn.Module):
    """The DIA-LSTM cell (one layer): MLP input and hidden paths, ``h = o * sigmoid(c)``."""

    def __init__(self, input_size: int, hidden_size: int, reduction: int = 4) -> None:
        super().__init__()
        self.w_ih = nn.ModuleList([small_cell(input_size, hidden_size, reduction)])
        self.w_hh = nn.ModuleList([small_cell(hidden_size, hidden_size, reduction)])

    def forward(
        self, x: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hx, cx = hidden
        gates = self.w_ih[0](x) + self.w_hh[0](hx)
        i_gate, f_gate, c_gate, o_gate = gates.chunk(4, 1)
        i_gate = torch.sigmoid(i_gate)
        f_gate = torch.sigmoid(f_gate)
        c_gate = torch.tanh(c_gate)
        o_gate = torch.sigmoid(o_gate)
        ncx = (f_gate * cx) + (i_gate * c_gate)
        nhx = o_gate * torch.sigmoid(ncx)
        return nhx, ncx


class BasicBlock(nn.Module):
    """Two 3x3 convs; returns ``(branch, shortcut)`` and leaves the add to the stage."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        org = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out, org


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, as torchvision's v1.5) -> 1x1 x4; returns ``(branch, shortcut)``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        org = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out, org


def _downsample(inplanes: int, out: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and inplanes == out:
        return None
    return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))


class Attention(nn.Module):
    """One stage: its blocks plus the single DIA-LSTM cell they all share."""

    def __init__(self, blocks: list[nn.Module], channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.ModuleList = nn.ModuleList(blocks)  # noqa: N815 - the official attribute name
        self.lstm = LSTMCell(channels, channels, reduction)
        self.GlobalAvg = nn.AdaptiveAvgPool2d((1, 1))  # noqa: N815
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ht = ct = None
        for idx, layer in enumerate(self.ModuleList):
            x, org = layer(x)
            seq = self.GlobalAvg(x).view(x.size(0), x.size(1))
            if idx == 0:  # the state is reset at the first block of every stage
                ht = torch.zeros_like(seq)
                ct = torch.zeros_like(seq)
            ht, ct = self.lstm(seq, (ht, ct))
            x = x * ht.view(x.size(0), x.size(1), 1, 1)
            x = x + org
            x = self.relu(x)
        return x


class DIAResNet(nn.Module):
    """DIA-ResNet in the ImageNet layout (7x7 stem, max pool, 4 stages) or the CIFAR layout
    (3x3 stem with 16 channels, 3 stages of widths 16, 32, 64)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        layout: str = "imagenet",
        num_classes: int = 10,
        reduction: int = 4,
    ) -> None:
        super().__init__()
        widths = _widths(layout, len(layers))
        self.inplanes = widths[0]
        if layout == "imagenet":
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.maxpool = nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        for k, (width, count) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if k == 0 else 2
            blocks: list[nn.Module] = [block(self.inplanes, width, stride)]
            self.inplanes = width * block.expansion
            blocks += [block(self.inplanes, width) for _ in range(1, count)]
            self.add_module(f"layer{k + 1}", Attention(blocks, self.inplanes, reduction))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for k in range(self.num_stages):
            x = getattr(self, f"layer{k + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _widths(layout: str, stages: int) -> list[int]:
    if layout == "imagenet":
        return [64, 128, 256, 512][:stages]
    if layout == "cifar":
        return [16, 32, 64][:stages]
    raise ValueError(f"unknown layout {layout!r}")


class PlainCifarResNet(nn.Module):
    """The plain CIFAR ResNet (3 stages) with torchvision's blocks and key names."""

    def __init__(
        self,
        block: type[PlainBasicBlock] | type[PlainBottleneck],
        layers: list[int],
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        for k, (width, count) in enumerate(zip(_widths("cifar", len(layers)), layers, strict=True)):
            stride = 1 if k == 0 else 2
            out = width * block.expansion
            down = _downsample(self.inplanes, out, stride)
            blocks = [block(self.inplanes, width, stride, down)]
            self.inplanes = out
            blocks += [block(out, width) for _ in range(1, count)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for k in range(self.num_stages):
            x = getattr(self, f"layer{k + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def reference_to_fxattn_key(key: str) -> str:
    """``layer2.ModuleList.0.conv1.weight`` -> ``layer2.0.conv1.weight``;
    ``layer2.lstm.w_ih.0.seq.2.bias`` -> ``fxattn_dia.g1.input_path.2.bias``."""
    parts = key.split(".")
    if parts[0].startswith("layer") and len(parts) > 1:
        stage = int(parts[0][len("layer"):]) - 1
        if parts[1] == "ModuleList":
            return ".".join([parts[0], *parts[2:]])
        if parts[1] == "lstm":
            path = {"w_ih": "input_path", "w_hh": "hidden_path"}[parts[2]]
            # parts[3] is the layer index (0), parts[4] == "seq", parts[5:] the Linear + field
            return ".".join(["fxattn_dia", f"g{stage}", path, *parts[5:]])
    return key


def to_fxattn_state_dict(reference: DIAResNet) -> dict[str, torch.Tensor]:
    """The reference's weights under the keys of the transformed plain ResNet."""
    return {reference_to_fxattn_key(k): v for k, v in reference.state_dict().items()}


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN affine parameters and running statistics (defaults would hide bugs)."""
    generator = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(torch.rand(m.weight.shape, generator=generator) + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=generator) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=generator) + 0.5)
        elif isinstance(m, nn.Linear):
            m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.1)
