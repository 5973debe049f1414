"""Self-Supervised Implicit Attention: the training-only loss between taps.

For a feature map ``F`` with channels on ``channel_dim`` the implicit attention map is::

    map(F) = normalize_L2( mean_over_channels(|F|^p) )        # over positions, p = 2

and each lower tap ``s`` is pulled towards its supervising (higher) tap::

    target_s = normalize_L2( resize( stopgrad(map(F_high)) ) to F_s's grid )
    L_ssia   = weight * sum_s mean_b || map(F_s) - target_s ||^2

The target is normalised again after the bilinear resize so both sides are unit vectors (a
resize changes the number of positions and so the norm). ``map="channel"`` compares
normalised channel descriptors ``GAP(F)`` instead, through a training-only linear projection
from the higher tap's channels to the lower's.

The module stores the loss of the latest forward in :attr:`latest`; it exists only in the
training graph, so eval-mode forwards never run it and :func:`fxattn.strip_ssia` drops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.flatten(1), dim=1)


class SSIALoss(nn.Module):
    """Computes the SSIA loss of one training forward from the tap features."""

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
        self.p = float(p)
        self.map = map
        self.latest: torch.Tensor | None = None
        if map == "channel":
            self.projections = nn.ModuleList(
                nn.Linear(taps[pair.high].channels, taps[pair.low].channels) for pair in pairs
            )

    def _spatial_map(self, feature: torch.Tensor, tap: TapSpec) -> torch.Tensor:
        m = attention_map(feature, tap.channel_dim, self.p, tap.skip_tokens)
        if tap.grid is not None and m.dim() == 2 and len(tap.grid) == 2:
            m = m.reshape(m.shape[0], *tap.grid)
        return m

    def _pair_loss(
        self, features: tuple[torch.Tensor, ...], i: int, pair: PairSpec
    ) -> torch.Tensor:
        low_tap, high_tap = self.taps[pair.low], self.taps[pair.high]
        low, high = features[pair.low], features[pair.high]
        if self.map == "channel":
            student = _unit(low.float().mean(dim=[d for d in range(1, low.dim())
                                                   if d != low_tap.channel_dim]))
            descriptor = high.detach().float().mean(
                dim=[d for d in range(1, high.dim()) if d != high_tap.channel_dim]
            )
            teacher = _unit(self.projections[i](descriptor.to(self.projections[i].weight.dtype))
                            .float())
        else:
            student = _unit(self._spatial_map(low, low_tap))
            target = self._spatial_map(high.detach(), high_tap)
            if pair.resize and low_tap.grid is not None:
                target = F.interpolate(
                    target.unsqueeze(1), size=low_tap.grid, mode="bilinear", align_corners=False
                ).squeeze(1)
            teacher = _unit(target)
        return (student - teacher).pow(2).sum(dim=1).mean()

    def forward(self, *features: torch.Tensor) -> torch.Tensor:
        total = features[0].new_zeros((), dtype=torch.float32)
        for i, pair in enumerate(self.pairs):
            total = total + self._pair_loss(features, i, pair)
        self.latest = total * self.weight
        return self.latest

    def __getstate__(self) -> dict[str, Any]:
        # The latest loss holds an autograd graph: never copy or pickle it.
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state["latest"] = None
        return state

    def extra_repr(self) -> str:
        return (
            f"taps={len(self.taps)}, pairs={len(self.pairs)}, map={self.map}, "
            f"weight={self.weight}"
        )
