"""Graph shapes the main-path analysis alone does not cover, each seen in a real zoo model.

* parallel streams that meet only at the head (timm CrossViT): SSIA taps fall back to evenly
  spaced residual blocks;
* windows folded into the batch dimension (timm Hiera): never a tap, since SSIA's maps are
  per sample;
* ``forward(x, mask=None)`` with ``if mask is not None:`` (Hiera, many HF models): torch.fx
  traces the branch the example takes instead of failing on a missing mask.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import fxattn
from fxattn.export import export_onnx


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                  nn.BatchNorm2d(channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class TwoStreams(nn.Module):
    """Two resolutions processed side by side, exchanging a pooled summary after each block."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.fine_stem = nn.Conv2d(3, 8, 3, padding=1)
        self.coarse_stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fine = nn.ModuleList(Block(8) for _ in range(depth))
        self.coarse = nn.ModuleList(Block(8) for _ in range(depth))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fine, coarse = self.fine_stem(x), self.coarse_stem(x)
        for f_block, c_block in zip(self.fine, self.coarse, strict=True):
            fine, coarse = f_block(fine), c_block(coarse)
            fine, coarse = (fine + coarse.mean((2, 3), keepdim=True),
                            coarse + fine.mean((2, 3), keepdim=True))
        return self.head(torch.cat([fine.mean((2, 3)), coarse.mean((2, 3))], 1))


def test_parallel_streams_get_ssia_taps_from_their_residual_blocks(tmp_path: Path) -> None:
    x = torch.randn(2, 3, 16, 16)
    model = TwoStreams()
    plan = fxattn.inspect(model, x)
    assert len(plan.taps) >= 2 and plan.active_pairs
    assert any("evenly spaced over" in note and "residual blocks" in note for note in plan.notes)
    net = fxattn.transform(model, x)
    net.train()
    net(x).pow(2).mean().backward()
    loss = fxattn.ssia_loss(net)
    assert torch.isfinite(loss) and loss.item() > 0
    lean = fxattn.strip_ssia(net.eval())
    assert export_onnx(lean, tmp_path / "m.onnx", x).verified


class Windowed(nn.Module):
    """Stages that fold 2x2 windows into the batch (B*4, C, H/2, W/2), as Hiera's unroll does."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.local = nn.Sequential(Block(8), Block(8))
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.global_ = nn.Sequential(Block(16), Block(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = self.stem(x)
        windows = x.reshape(b, 8, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5)
        windows = self.local(windows.reshape(b * 4, 8, h // 2, w // 2))
        x = windows.reshape(b, 2, 2, 8, h // 2, w // 2).permute(0, 3, 1, 4, 2, 5)
        x = self.global_(self.down(x.reshape(b, 8, h, w)))
        return self.head(x.mean((2, 3)))


def test_windows_folded_into_the_batch_are_never_taps() -> None:
    x = torch.randn(2, 3, 16, 16)
    plan = fxattn.inspect(Windowed(), x)
    assert plan.taps and all(tap.shape[0] == 2 for tap in plan.taps)
    net = fxattn.transform(Windowed(), x)
    net.train()
    net(x)
    assert torch.isfinite(fxattn.ssia_loss(net))


class OptionalMask(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8), nn.Conv2d(8, 16, 3, 2, 1), Block(16))
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                return_features: bool = False) -> torch.Tensor:
        x = self.stem(x)
        if mask is not None:  # a Python branch on an argument the example does not pass
            x = x * mask
        x = self.blocks(x)
        if return_features:
            return x
        return self.head(x.mean((2, 3)))


def test_unsupplied_optional_arguments_are_traced_at_their_defaults() -> None:
    x = torch.randn(2, 3, 16, 16)
    model = OptionalMask().eval()
    net = fxattn.transform(model, x, dia=False)
    assert net.plan.tracer == "torch.fx"  # no need for the torch.export fallback
    lean = fxattn.strip_ssia(net.eval())
    with torch.no_grad():
        torch.testing.assert_close(lean(x), model(x))


class TakesKwargs(OptionalMask):
    """``forward(self, x, **kwargs)``, as Hugging Face vision models declare it."""

    def forward(self, x: torch.Tensor, **kwargs: object) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)


def test_forward_with_var_keyword_arguments_is_traced_and_run() -> None:
    x = torch.randn(2, 3, 16, 16)
    model = TakesKwargs().eval()
    net = fxattn.transform(model, {"x": x})
    assert net.plan.tracer == "torch.fx" and net.plan.sites
    lean = fxattn.strip_ssia(net.eval())
    with torch.no_grad():
        assert lean(x=x).shape == model(x=x).shape
