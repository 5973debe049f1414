"""DIA *groups*: maximal runs of consecutive sites with the same channel count and layout,
and the DIA modules they share (``DIA.share``). The DIA state is reset at the first site of
every group."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..config import DIA
from ..errors import ConfigError
from .sites import Site


@dataclass(frozen=True)
class DIAModuleSpec:
    name: str
    channels: int
    channel_dim: int
    sites: tuple[int, ...]
    parameters: int


def dia_module_parameters(kind: str, channels: int, reduction: int, init: str = "paper") -> int:
    """Parameter count of one DIA module (the formula of the README / SPEC); ``init="identity"``
    adds the ``C`` gate."""
    hidden = channels // reduction
    gate = channels if init == "identity" else 0
    if kind == "lstm":
        return 2 * (channels * hidden + hidden + hidden * 4 * channels + 4 * channels) + gate
    return channels * hidden + hidden + hidden * channels + channels + gate


CHANNELS_LAST = "channels_last"


def _group_layout(site: Site) -> str:
    """What must agree for sites to share a DIA cell: channel-first sites by their exact layout,
    channels-last sites (tokens ``(B, N, C)`` or grids ``(B, H, W, C)``) as one kind.

    timm's Swin adds its attention branch on a ``(B, H, W, C)`` grid and its MLP branch on
    ``(B, H*W, C)`` tokens: both are the same C channels on the last axis, and the descriptor
    (mean over every other axis) is the same, so one cell serves the stage as in the paper.
    """
    if site.ndim >= 3 and site.channel_dim == site.ndim - 1:
        return CHANNELS_LAST
    return site.layout


def assign_groups(sites: list[Site], dia: DIA) -> tuple[list[Site], list[DIAModuleSpec]]:
    """Runs of consecutive sites (state resets) and the DIA modules shared per ``dia.share``."""
    assigned: list[Site] = []
    module_sites: dict[str, list[int]] = {}
    module_shape: dict[str, tuple[int, int]] = {}
    group, previous = -1, None
    for i, site in enumerate(sites):
        signature = (site.channels, _group_layout(site))
        if signature != previous:
            group += 1
            previous = signature
        if site.channels // dia.reduction < 1:
            raise ConfigError(
                f"DIA reduction {dia.reduction} exceeds the {site.channels} channels of site "
                f"'{site.node}' ({site.module_path or 'root'}); use a reduction <= "
                f"{site.channels} or exclude that site"
            )
        if dia.share == "stage":
            name = f"g{group}"
        elif dia.share == "channels":
            name = f"c{site.channels}_{_group_layout(site).lower().replace('/', '_')}"
        else:
            name = f"s{i}"
        module_sites.setdefault(name, []).append(i)
        channels_last = _group_layout(site) == CHANNELS_LAST
        module_shape[name] = (site.channels, -1 if channels_last else site.channel_dim)
        assigned.append(_replace(site, index=i, group=group, module=name))
    specs = [
        DIAModuleSpec(
            name=name,
            channels=module_shape[name][0],
            channel_dim=module_shape[name][1],
            sites=tuple(indices),
            parameters=dia_module_parameters(dia.module, module_shape[name][0], dia.reduction,
                                             dia.init),
        )
        for name, indices in module_sites.items()
    ]
    return assigned, specs


def _replace(site: Site, **changes: Any) -> Site:
    values = asdict(site)
    values.update(changes)
    return Site(**values)
