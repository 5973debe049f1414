"""Self-Supervised Implicit Attention: the training-only loss between taps.

For a feature map ``F`` with channels on ``channel_dim`` the implicit attention map is::

    map(F) = normalize_L2( mean_over_channels(|F|^p) )        # over positions, p = 2

and each lower tap ``s`` is pulled towards its supervising (higher) tap::

    target_s = normalize_L2( resize( stopgrad(map(F_high)) ) to F_s's grid )  # (tri/bi)linear
    L_ssia   = weight * sum_s mean_b || map(F_s) - target_s ||^2

The map lives on the tap's grid: ``(L,)`` for 1-D feature maps ``(B, C, L)``, ``(H, W)`` for
images (channel-first or channels-last) and square token grids, ``(T, H, W)`` for video
``(B, C, T, H, W)``; the resize is linear, bilinear or trilinear accordingly. The target is
normalised again after the resize so both sides are unit vectors (a resize changes the number
of positions and so the norm). ``map="channel"`` compares
normalised channel descriptors ``GAP(F)`` instead, through a training-only linear projection
from the higher tap's channels to the lower's.

Two kinds of nodes carry it in the training graph: a :class:`TapMap` right after each tap
(``fxattn_ssia.maps.<i>``) reduces the tap to its small attention map at once - so an in-place
op that later reuses the tap's storage cannot corrupt it - and :class:`SSIALoss`
(``fxattn_ssia``), just before the output, compares the maps and stores the loss of the latest
forward in :attr:`SSIALoss.latest`. Eval-mode forwards never run either, and
:func:`fxattn.strip_ssia` drops both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


@dataclass(frozen=True)
class TapSpec:
    channel_dim: int
    channels: int
    grid: tuple[int, ...] | None
    skip_tokens: int


@dataclass(frozen=True)
class PairSpec:
    low: int
    high: int
    resize: bool


def attention_map(
    feature: torch.Tensor, channel_dim: int, p: float = 2.0, skip_tokens: int = 0
) -> torch.Tensor:
    """``mean_c |F|^p`` per position, ``(B, positions...)``, computed in fp32."""
    magnitude = feature.float().abs().pow(p).mean(dim=channel_dim)
    if skip_tokens:
        magnitude = magnitude[:, skip_tokens:]
    return magnitude


def channel_descriptor(feature: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """``GAP(F)``: ``(B, C)`` in fp32."""
    dims = [d for d in range(1, feature.dim()) if d != channel_dim]
    feature = feature.float()
    return feature.mean(dim=dims) if dims else feature


# How a map is resized to a lower tap's grid, by the grid's rank: (L,), (H, W), (T, H, W).
_RESIZE_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1), dim=1)


class TapMap(nn.Module):
    """Reduces one tap to what SSIA compares: its attention map (or channel descriptor)."""

    def __init__(self, tap: TapSpec, p: float = 2.0, map: str = "spatial") -> None:
        super().__init__()
        self.tap = tap
        self.p = float(p)
        self.map = map

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if self.map == "channel":
            return channel_descriptor(feature, self.tap.channel_dim)
        if ops.fused_enabled():  # one op: cast, |F|^p, channel mean, token slice, reshape
            grid = self.tap.grid
            tokens = grid is not None and feature.dim() - 2 != len(grid)
            shape = [feature.shape[0], *grid] if tokens else []
            return ops.ssia_map(feature, self.tap.channel_dim, self.p, self.tap.skip_tokens,
                                shape)
        m = attention_map(feature, self.tap.channel_dim, self.p, self.tap.skip_tokens)
        grid = self.tap.grid
        if grid is not None and m.dim() - 1 != len(grid):
            m = m.reshape(m.shape[0], *grid)  # tokens (B, N) -> their square grid (B, H, W)
        return m

    def extra_repr(self) -> str:
        return f"map={self.map}, channel_dim={self.tap.channel_dim}, grid={self.tap.grid}"


class SSIALoss(nn.Module):
    """Compares the tap maps of one training forward and keeps the weighted loss."""

    _is_impure = True  # its output is unused in the graph; keep it through dead-code passes

    def __init__(
        self,
        taps: list[TapSpec],
        pairs: list[PairSpec],
        *,
        weight: float = 1.0,
        p: float = 2.0,
        map: str = "spatial",
    ) -> None:
        super().__init__()
        self.taps = list(taps)
        self.pairs = list(pairs)
        self.weight = float(weight)
        self.map = map
        self.latest: torch.Tensor | None = None
        self.maps = nn.ModuleList(TapMap(tap, p, map) for tap in taps)
        if map == "channel":
            self.projections = nn.ModuleList(
                nn.Linear(taps[pair.high].channels, taps[pair.low].channels) for pair in pairs
            )

    def _pair_loss(self, maps: tuple[torch.Tensor, ...], i: int, pair: PairSpec) -> torch.Tensor:
        low, high = maps[pair.low], maps[pair.high].detach()
        if self.map == "channel":
            projection = self.projections[i]
            teacher = projection(high.to(projection.weight.dtype)).float()
        else:
            teacher = high
            grid = self.taps[pair.low].grid
            if pair.resize and grid is not None:
                teacher = F.interpolate(
                    teacher.unsqueeze(1), size=grid, mode=_RESIZE_MODES[len(grid)],
                    align_corners=False,
                ).squeeze(1)
        return (_unit(low) - _unit(teacher)).pow(2).sum(dim=1).mean()

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        """``maps``: the outputs of ``self.maps[i]`` for every tap, low to high."""
        if self.map == "spatial" and self.pairs and ops.fused_enabled():
            self.latest = self._fused_loss(maps)
            return self.latest
        total = maps[0].new_zeros((), dtype=torch.float32)
        for i, pair in enumerate(self.pairs):
            total = total + self._pair_loss(maps, i, pair)
        self.latest = total * self.weight
        return self.latest

    def _fused_loss(self, maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One ``fxattn::ssia_pair_loss`` per pair, each adding its weighted term to the
        running total (no zeros, no separate sum or weight multiply)."""
        total: torch.Tensor | None = None
        for pair in self.pairs:
            grid = self.taps[pair.low].grid
            resize_to = list(grid) if pair.resize and grid is not None else []
            # the deeper map is only a target: detached, so autograd never reaches its tap
            # (the op's backward gives it no gradient, but an edge would still deliver zeros)
            total = ops.ssia_pair_loss(maps[pair.low], maps[pair.high].detach(), total,
                                       resize_to, self.weight)
        assert total is not None
        return total

    def __getstate__(self) -> dict[str, Any]:
        # The latest loss holds an autograd graph: never copy or pickle it.
        state = dict(super().__getstate__())
        state["latest"] = None
        return state

    def extra_repr(self) -> str:
        return f"pairs={len(self.pairs)}, map={self.map}, weight={self.weight}"
