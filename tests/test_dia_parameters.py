"""DIA parameter counts: the plan's numbers, the real ``numel`` of the inserted modules and the
closed-form formulas agree, for every ``module`` / ``share`` / ``reduction`` option.

Formulas (C channels of a group, r the reduction, h = C // r):

* ``module="lstm"``: ``2 * (C*h + h + h*4C + 4C)`` per module (input and hidden paths);
* ``module="se"``: ``C*h + h + h*C + C`` per module;
* ``share="stage"``: one module per group (maximal run of consecutive sites with equal C),
  ``"channels"``: one per distinct channel count, ``"none"``: one per site.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import fxattn
from fxattn.names import DIA_ROOT
from tests.models import CifarResNet


def lstm_params(c: int, r: int = 4) -> int:
    h = c // r
    return 2 * (c * h + h + h * 4 * c + 4 * c)


def se_params(c: int, r: int = 4) -> int:
    h = c // r
    return c * h + h + h * c + c


def dia_numel(net: nn.Module) -> int:
    return sum(p.numel() for n, p in net.named_parameters() if n.startswith(f"{DIA_ROOT}."))


def test_cifar_resnet164_adds_218848() -> None:
    """The paper's CIFAR ResNet-164: groups of 64, 128, 256 channels, 18 blocks each."""
    torch.manual_seed(0)
    model, x = CifarResNet(depth=164, num_classes=100), torch.randn(2, 3, 16, 16)
    net = fxattn.transform(model, x, ssia=False)
    plan = net.plan
    assert plan.model_parameters == 1_727_284
    assert [(m.channels, len(m.sites)) for m in plan.dia_modules] == [(64, 18), (128, 18),
                                                                      (256, 18)]
    assert lstm_params(64) + lstm_params(128) + lstm_params(256) == 218_848
    assert plan.dia_parameters == dia_numel(net) == 218_848
    assert sum(p.numel() for p in net.parameters()) == 1_946_132


def test_resnet50_four_stages_adds_13959040() -> None:
    """torchvision ResNet-50 (ImageNet layout, groups of 256, 512, 1024, 2048 channels):
    2 * sum(1.25 C^2 + 4.25 C) = 13,959,040 parameters at r=4 (the SPEC's 13.96 M)."""
    model = torchvision.models.resnet50(weights=None)
    net = fxattn.transform(model, torch.randn(2, 3, 64, 64), ssia=False)
    plan = net.plan
    assert [(m.channels, len(m.sites)) for m in plan.dia_modules] == [
        (256, 3), (512, 4), (1024, 6), (2048, 3)
    ]
    expected = sum(lstm_params(c) for c in (256, 512, 1024, 2048))
    assert expected == 13_959_040
    assert plan.dia_parameters == dia_numel(net) == 13_959_040


@pytest.mark.parametrize("reduction", [1, 2, 8, 16])
@pytest.mark.parametrize("module", ["lstm", "se"])
def test_module_and_reduction(module: str, reduction: int) -> None:
    """Same channel layout as ResNet-164 at depth 29 (3 blocks per stage), to keep CI short."""
    torch.manual_seed(0)
    model, x = CifarResNet(depth=29, num_classes=100), torch.randn(2, 3, 16, 16)
    formula = lstm_params if module == "lstm" else se_params
    net = fxattn.transform(model, x, dia=fxattn.DIA(module=module, reduction=reduction),
                           ssia=False)
    expected = sum(formula(c, reduction) for c in (64, 128, 256))
    assert net.plan.dia_parameters == dia_numel(net) == expected
    hidden = {m.out_features for n, m in net.named_modules()
              if n.startswith(DIA_ROOT) and isinstance(m, nn.Linear) and n.endswith(".0")}
    assert hidden == {64 // reduction, 128 // reduction, 256 // reduction}


def test_share_none_is_one_module_per_site() -> None:
    """CIFAR ResNet-29 (3 bottlenecks per stage): 9 sites, 9 modules."""
    torch.manual_seed(0)
    model, x = CifarResNet(depth=29, num_classes=100), torch.randn(2, 3, 16, 16)
    net = fxattn.transform(model, x, dia=fxattn.DIA(share="none"), ssia=False)
    plan = net.plan
    assert len(plan.dia_modules) == len(plan.sites) == 9
    assert all(len(m.sites) == 1 for m in plan.dia_modules)
    expected = 3 * (lstm_params(64) + lstm_params(128) + lstm_params(256))
    assert plan.dia_parameters == dia_numel(net) == expected == 656_544
    # The state still runs through each stage (groups are unchanged), one module per site.
    assert [len(g) for g in plan.groups] == [3, 3, 3]


class Hourglass(nn.Module):
    """Residual blocks at 16, then 32, then 16 channels again: 3 groups, 2 channel counts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.ModuleList([_Res(16), _Res(16)])
        self.widen = nn.Conv2d(16, 32, 1)
        self.mid = nn.ModuleList([_Res(32)])
        self.narrow = nn.Conv2d(32, 16, 1)
        self.up = nn.ModuleList([_Res(16), _Res(16), _Res(16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.down:
            x = block(x)
        x = self.widen(x)
        for block in self.mid:
            x = block(x)
        x = self.narrow(x)
        for block in self.up:
            x = block(x)
        return x.mean((2, 3))


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


@pytest.mark.parametrize(
    ("share", "names", "expected"),
    [
        ("stage", ["g0", "g1", "g2"], 2 * lstm_params(16) + lstm_params(32)),
        ("channels", ["c16_nchw", "c32_nchw"], lstm_params(16) + lstm_params(32)),
        ("none", [f"s{i}" for i in range(6)], 5 * lstm_params(16) + lstm_params(32)),
    ],
)
def test_share_modes_on_repeated_channel_counts(
    share: str, names: list[str], expected: int
) -> None:
    x = torch.randn(2, 3, 8, 8)
    net = fxattn.transform(Hourglass(), x, dia=fxattn.DIA(share=share), ssia=False)
    plan = net.plan
    assert [m.name for m in plan.dia_modules] == names
    assert [len(g) for g in plan.groups] == [2, 1, 3]  # state resets are independent of sharing
    assert plan.dia_parameters == dia_numel(net) == expected
    assert torch.isfinite(net.eval()(x)).all()


def test_share_channels_threads_state_per_group_not_per_module() -> None:
    """With one module shared by the 16-channel groups before and after the 32-channel one,
    the second 16-channel group still starts from a zero state: its first cell call has only
    the block's branch as input."""
    x = torch.randn(2, 3, 8, 8)
    net = fxattn.transform(Hourglass(), x, dia=fxattn.DIA(share="channels"), ssia=False)
    calls = [n for n in net.eval_graph.nodes if str(n.target).startswith(DIA_ROOT)]
    assert [len(n.args) for n in calls] == [1, 3, 1, 1, 3, 3]
    assert [str(n.target) for n in calls] == [f"{DIA_ROOT}.c16_nchw"] * 2 + [
        f"{DIA_ROOT}.c32_nchw"] + [f"{DIA_ROOT}.c16_nchw"] * 3
