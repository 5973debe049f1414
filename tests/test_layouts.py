"""SSIA on every feature layout: 1-D ``(B, C, L)`` signals and ``(B, C, T, H, W)`` video.

Each tap's attention map lives on its grid (``(L,)`` or ``(T, H, W)``) and a higher tap's map
is resized to a lower tap's grid linearly or trilinearly. The loss is checked against an
independent computation from forward hooks, trained one step, stripped and exported.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from models import ResidualCNN
from torch import nn

import fxattn
from fxattn.export import export_onnx

CASES = {
    "1d": (1, (2, 2, 32), "NCL", "linear"),
    "3d": (3, (2, 2, 4, 16, 16), "NCDHW", "trilinear"),
}


def _model(dims: int) -> nn.Module:
    torch.manual_seed(0)
    return ResidualCNN(dims)


def _reference_ssia(model: ResidualCNN, pairs: list[tuple[int, int]], x: torch.Tensor,
                    mode: str) -> torch.Tensor:
    """The SSIA formula written out on the three stage outputs, computed by hand."""
    features, h = [], torch.relu(model.stem(x))
    for stage in model.stages:
        h = stage(h)
        features.append(h)
    maps = [f.pow(2).mean(dim=1) for f in features]
    total = torch.zeros(())
    for low_index, high_index in pairs:
        low, high = maps[low_index], maps[high_index].detach()
        target = F.interpolate(high[:, None], size=low.shape[1:], mode=mode)[:, 0]
        diff = F.normalize(low.flatten(1), dim=1) - F.normalize(target.flatten(1), dim=1)
        total = total + diff.pow(2).sum(dim=1).mean()
    return total


@pytest.mark.parametrize("case", list(CASES))
def test_taps_on_the_feature_grid_pair_and_resize(case: str) -> None:
    dims, shape, layout, _ = CASES[case]
    plan = fxattn.inspect(_model(dims), torch.randn(shape))
    spatial = shape[2:]
    assert [t.layout for t in plan.taps] == [layout] * 3
    assert [t.grid for t in plan.taps] == [
        tuple(s // 2**i for s in spatial) for i in range(3)
    ]
    assert [(p.low, p.high, p.resize) for p in plan.active_pairs] == [
        (0, 1, True), (1, 2, True)
    ]


@pytest.mark.parametrize("case", list(CASES))
def test_ssia_loss_matches_the_formula_and_descends(case: str) -> None:
    dims, shape, _, mode = CASES[case]
    model = _model(dims).train()
    x = torch.randn(shape)
    net = fxattn.transform(model, x, dia=False)
    net(x)
    loss = fxattn.ssia_loss(net)
    expected = _reference_ssia(model, [(0, 1), (1, 2)], x, mode)
    # the same fp32 ops in the same order: measured difference 0.0; the tolerance allows a
    # reassociated reduction
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-5)

    loss.backward()
    stem = net.get_submodule("stem").weight.grad
    assert stem is not None and stem.abs().sum() > 0  # the lowest layers are supervised
    before = loss.item()
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.grad is not None:
                parameter -= 1e-2 * parameter.grad
    net(x)
    assert fxattn.ssia_loss(net).item() < before


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_strip_and_export_parity(case: str, tmp_path: Path) -> None:
    dims, shape, _, _ = CASES[case]
    model = _model(dims).train()
    x = torch.randn(shape)
    net = fxattn.transform(model, x)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = F.cross_entropy(net(x), torch.tensor([0, 1])) + fxattn.ssia_loss(net)
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()

    lean = fxattn.strip_ssia(net)
    assert not any("fxattn_ssia" in name for name, _ in lean.named_modules())
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(lean(x), net(x), atol=0, rtol=0)
    report = export_onnx(lean, tmp_path / f"{case}.onnx", x)
    assert report.verified and report.max_abs_error <= report.atol


class _ShrinkingTokens(nn.Module):
    """Token stages of 3 then 2 tokens: two taps, and no grid a resize could map between."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.mlp1 = nn.Linear(16, 16)
        self.mlp2 = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        x = x + self.mlp1(x)
        x = x[:, :2]
        x = x + self.mlp2(x)
        return x.mean(1)


def test_taps_without_a_common_grid_say_why_no_pair_is_compared() -> None:
    with pytest.raises(fxattn.AnalysisError) as info:
        fxattn.transform(_ShrinkingTokens(), torch.randn(2, 3, 8), dia=False)
    message = str(info.value)
    assert "found 2 taps" in message
    assert "3 and 2 positions" in message and "no common grid" in message
    assert "ssia=False" in message
