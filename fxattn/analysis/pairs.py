"""SSIA *pairs*: which tap supervises which, and whether its map must be resized."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import SSIA
from .taps import Tap


@dataclass(frozen=True)
class Pair:
    low: int
    high: int
    resize: bool
    skipped: str | None = None  # reason, when the pair cannot be compared


def pair_taps(taps: list[Tap], ssia: SSIA) -> list[Pair]:
    pairs: list[Pair] = []
    last = len(taps) - 1
    for low in range(last):
        high = low + 1 if ssia.pairs == "next" else last
        pairs.append(_pair(taps[low], taps[high], ssia))
    return pairs


def _positions(tap: Tap) -> int:
    return math.prod(s for d, s in enumerate(tap.shape) if d not in (0, tap.channel_dim))


def _pair(low: Tap, high: Tap, ssia: SSIA) -> Pair:
    if ssia.map == "channel":
        return Pair(low.index, high.index, resize=False)
    if low.grid is not None and high.grid is not None and len(low.grid) == len(high.grid):
        return Pair(low.index, high.index, resize=low.grid != high.grid)
    low_positions, high_positions = _positions(low), _positions(high)
    if low_positions == high_positions and low.skip_tokens == high.skip_tokens:
        return Pair(low.index, high.index, resize=False)
    return Pair(
        low.index,
        high.index,
        resize=False,
        skipped=f"{low.node} ({low.layout}, map grid {_grid_text(low)}) and {high.node} "
        f"({high.layout}, map grid {_grid_text(high)}) have {low_positions} and "
        f"{high_positions} positions and no common grid to resize along",
    )


def _grid_text(tap: Tap) -> str:
    return "x".join(map(str, tap.grid)) if tap.grid else "none"
