"""Video models: SSIA taps on ``(B, C, T, H, W)`` clips and ``(B, T, H, W, C)`` Swin grids.

Each torchvision video network gets one tap per stage with a ``(T, H, W)`` grid and a
trilinear resize between them. ``swin3d_t`` calls ``shifted_window_attention_3d``, which
adjusts its ``window_size`` list in place: shape propagation must hand it a mutable list, as
the generated ``forward`` does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import fxattn
from fxattn.export import export_onnx

CLIP = (1, 3, 4, 32, 32)


@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_resnet3d_family_taps_every_stage_on_its_clip_grid(name: str) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None)
    plan = fxattn.inspect(model, torch.randn(CLIP))
    assert [t.module_path for t in plan.taps] == [f"layer{i}.1.relu" for i in range(1, 5)]
    assert {t.layout for t in plan.taps} == {"NCDHW"}
    assert [t.grid[1:] for t in plan.taps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert len(plan.active_pairs) == 3 and all(p.resize for p in plan.active_pairs)


def test_s3d_taps_its_clip_grid() -> None:
    torch.manual_seed(0)
    model = torchvision.models.video.s3d(weights=None)
    # S3D's final pool is 2x7x7 at stride 8x32x32: the smallest clip it accepts
    plan = fxattn.inspect(model, torch.randn(1, 3, 16, 224, 224))
    assert {t.layout for t in plan.taps} == {"NCDHW"}
    assert all(len(t.grid) == 3 for t in plan.taps)
    assert len(plan.active_pairs) >= 2


def test_r3d_18_trains_strips_and_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(weights=None, num_classes=4)
    x = torch.randn(2, *CLIP[1:])
    net = fxattn.transform(model, x)
    loss = F.cross_entropy(net(x), torch.tensor([0, 3])) + fxattn.ssia_loss(net)
    assert torch.isfinite(fxattn.ssia_loss(net)) and fxattn.ssia_loss(net) > 0
    loss.backward()
    assert net.get_submodule("stem.0").weight.grad.abs().sum() > 0
    lean = fxattn.strip_ssia(net)
    report = export_onnx(lean, tmp_path / "r3d.onnx", x)
    assert report.verified


def test_swin3d_t_propagates_shapes_and_taps_channels_last_grids() -> None:
    torch.manual_seed(0)
    model = torchvision.models.video.swin3d_t(weights=None)
    plan = fxattn.inspect(model, torch.randn(1, 3, 4, 64, 64))
    assert [t.layout for t in plan.taps[:3]] == ["NDHWC"] * 3
    assert [t.grid for t in plan.taps[:3]] == [(2, 16, 16), (2, 8, 8), (2, 4, 4)]
    assert len(plan.active_pairs) >= 2


def _pad_to(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    size[0] = min(size[0], x.shape[-1])  # mutates its list argument, like torchvision's
    return x[..., : size[0]]


fx.wrap("_pad_to")


class _MutatesItsListArgument(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _pad_to(self.conv(x), [64])
        return self.down(x).mean((2, 3))


def test_a_callee_may_mutate_a_list_literal_of_the_graph() -> None:
    model = _MutatesItsListArgument()
    x = torch.randn(2, 3, 16, 16)
    net = fxattn.transform(model, x, dia=False)
    assert [t.grid for t in net.plan.taps] == [(16, 16), (8, 8)]
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), atol=0, rtol=0)
