"""A hand-written DIA-ResNet: the reference fxattn's compiled model is measured against.

This is what a person writes without fxattn: torchvision's ResNet blocks, and one explicit
DIA-LSTM cell per stage shared by every block of the stage (the official DIANet layout), with
the math of docs/how-it-works.md (DIA)::

    x_t   = GAP(branch_t)
    gates = Wx2 ReLU(Wx1 x_t + bx1) + bx2 + Wh2 ReLU(Wh1 h_{t-1} + bh1) + bh2
    c_t   = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g);   h_t = sigmoid(o) sigmoid(c_t)
    out   = relu(shortcut + branch_t * h_t)

It deliberately does not import fxattn's DIA modules, so that a parity test between the two
(``tests/test_bench.py``) checks fxattn's graph rewrite against independent code. The state
starts at zero at every stage and the cell is run in full there too (as the official code does),
so the two models do the same arithmetic.

``load_fxattn_dia(hand, lean)`` copies a lean fxattn model's weights (torchvision keys plus
``fxattn_dia.g<k>``) into the hand-written model, which is how the tests prove equality.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck


class HandDIACell(nn.Module):
    """The DIA-LSTM cell (input and hidden paths are Linear -> ReLU -> Linear(4C))."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = channels // reduction
        self.input_path = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 4 * channels)
        )
        self.hidden_path = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, 4 * channels)
        )

    def forward(
        self, descriptor: torch.Tensor, h: torch.Tensor, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gates = self.input_path(descriptor) + self.hidden_path(h)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.sigmoid(c)
        return h, c


def _branch(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual branch of a torchvision block, up to (not including) the addition."""
    out = block.relu(block.bn1(block.conv1(x)))
    if isinstance(block, Bottleneck):
        out = block.relu(block.bn2(block.conv2(out)))
        return block.bn3(block.conv3(out))
    return block.bn2(block.conv2(out))


class HandDIAResNet(nn.Module):
    """torchvision ResNet with one shared DIA-LSTM cell per stage, written by hand."""

    def __init__(self, resnet: nn.Module, reduction: int = 4) -> None:
        super().__init__()
        self.resnet = resnet
        stages = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
        channels = []
        for stage in stages:
            last = stage[-1]
            if not isinstance(last, (Bottleneck, BasicBlock)):
                raise TypeError(f"expected torchvision ResNet blocks, got {type(last).__name__}")
            out_conv = last.conv3 if isinstance(last, Bottleneck) else last.conv2
            channels.append(out_conv.out_channels)
        self.dia = nn.ModuleList(HandDIACell(c, reduction) for c in channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
        for stage, cell in zip((r.layer1, r.layer2, r.layer3, r.layer4), self.dia, strict=True):
            h = c = None
            for block in stage:
                branch = _branch(block, x)
                shortcut = x if block.downsample is None else block.downsample(x)
                descriptor = branch.mean(dim=(2, 3))
                if h is None or c is None:
                    h = torch.zeros_like(descriptor)
                    c = torch.zeros_like(descriptor)
                h, c = cell(descriptor, h, c)
                x = block.relu(shortcut + branch * h[:, :, None, None])
        x = torch.flatten(r.avgpool(x), 1)
        return r.fc(x)


def hand_dia_resnet(name: str = "resnet50", reduction: int = 4, **kwargs: object) -> HandDIAResNet:
    """A hand-written DIA version of ``torchvision.models.<name>`` with random weights."""
    resnet = torchvision.models.get_model(name, weights=None, **kwargs)
    return HandDIAResNet(resnet, reduction)


def load_fxattn_dia(hand: HandDIAResNet, lean: nn.Module) -> None:
    """Copy a lean fxattn model's weights (``fxattn_dia.g<k>`` = stage k) into ``hand``."""
    state = {}
    for key, value in lean.state_dict().items():
        if key.startswith("fxattn_dia.g"):
            group, _, rest = key[len("fxattn_dia.g"):].partition(".")
            state[f"dia.{group}.{rest}"] = value
        else:
            state[f"resnet.{key}"] = value
    hand.load_state_dict(state, strict=True)


def matched_hand_dia(lean: nn.Module, example: torch.Tensor, name: str = "resnet50"
                     ) -> tuple[HandDIAResNet, float]:
    """The hand-written DIA model with ``lean``'s weights, in eval mode, and the largest
    difference of their outputs on ``example``; stops the benchmark if they disagree."""
    hand = hand_dia_resnet(name).eval()
    load_fxattn_dia(hand, lean)
    with torch.no_grad():
        gap = (hand(example) - lean(example)).abs().max().item()
    if gap > 1e-4:
        raise SystemExit(f"hand-written DIA-{name} differs from fxattn's by {gap:.2e}")
    return hand, gap
