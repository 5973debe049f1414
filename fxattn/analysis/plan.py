"""The :class:`Plan` (what :func:`fxattn.inspect` found) and :func:`analyze`, which builds
it from the sites, groups, taps and pairs of a shape-propagated graph."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch.fx as fx

from ..config import DIA, SSIA
from ..report import Table, to_text
from .graph import count_parameters
from .groups import DIAModuleSpec, assign_groups
from .layouts import infer_channel_dims
from .ops import OpInfo
from .pairs import Pair, pair_taps
from .sites import Site, find_residual_sites, select_sites
from .taps import Tap, find_taps


@dataclass
class Plan:
    """What :func:`fxattn.inspect` found; ``print(plan)`` shows it as tables."""

    model_name: str
    tracer: str
    model_parameters: int
    sites: list[Site]
    dia_modules: list[DIAModuleSpec]
    taps: list[Tap]
    pairs: list[Pair]
    dia: DIA | None
    ssia: SSIA | None
    ssia_parameters: int = 0
    notes: list[str] = field(default_factory=list)
    # set when torch.export could only capture the model at this batch size (see
    # fxattn.capture.DualGraphs.fixed_batch): the transformed model and its export take it only
    fixed_batch: int | None = None
    # forward() arguments the capture fixed (``{"use_cache": False}`` for a language model whose
    # example leaves the cache out, see fxattn.capture.signature); the model refuses others
    fixed_arguments: dict[str, Any] = field(default_factory=dict)

    @property
    def dia_parameters(self) -> int:
        return sum(module.parameters for module in self.dia_modules)

    @property
    def groups(self) -> list[list[Site]]:
        runs: dict[int, list[Site]] = {}
        for site in self.sites:
            runs.setdefault(site.group, []).append(site)
        return list(runs.values())

    @property
    def active_pairs(self) -> list[Pair]:
        return [pair for pair in self.pairs if pair.skipped is None]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dia"] = self.dia.to_dict() if self.dia else None
        data["ssia"] = self.ssia.to_dict() if self.ssia else None
        data["dia_parameters"] = self.dia_parameters
        return data

    def __str__(self) -> str:
        return render_plan(self)


def analyze(
    gm: fx.GraphModule,
    dia: DIA | None,
    ssia: SSIA | None,
    *,
    tracer: str = "torch.fx",
    model_name: str | None = None,
) -> Plan:
    """Build the :class:`Plan` of a shape-propagated graph. Pure: ``gm`` is not modified."""
    info = OpInfo(gm)
    dims = infer_channel_dims(gm, info)
    residual, notes = find_residual_sites(gm, dims, info)
    token_taps = ssia.token_taps if ssia else SSIA().token_taps
    taps, tap_notes = find_taps(gm, dims, {s.node for s in residual}, token_taps)
    notes += tap_notes

    sites: list[Site] = []
    modules: list[DIAModuleSpec] = []
    if dia is not None:
        candidates = residual
        if not residual:
            candidates = [
                Site(
                    index=i,
                    node=tap.node,
                    branch=tap.node,
                    shortcut=None,
                    module_path=tap.module_path,
                    key=tap.key,
                    channels=tap.shape[tap.channel_dim],
                    channel_dim=tap.channel_dim,
                    ndim=len(tap.shape),
                    layout=tap.layout,
                    kind="stage_output",
                )
                for i, tap in enumerate(taps)
            ]
            if candidates:
                notes.append("no residual additions: DIA multiplies the stage outputs instead")
        selected = select_sites(candidates, dia)
        narrow = [s for s in selected if s.channels // dia.reduction < 1]
        if narrow and len(narrow) < len(selected):
            # e.g. a segmentation head adding two num_classes-wide maps: too narrow for DIA.
            # Only when every site is that narrow is the reduction itself wrong (ConfigError).
            notes.append(
                f"skipped {len(narrow)} site(s) narrower than the DIA reduction "
                f"{dia.reduction}: " + ", ".join(f"{s.node} ({s.channels})" for s in narrow)
            )
            selected = [s for s in selected if s.channels // dia.reduction >= 1]
        sites, modules = assign_groups(selected, dia)

    pairs = pair_taps(taps, ssia) if ssia is not None else []
    for pair in pairs:
        if pair.skipped:
            notes.append(f"SSIA pair {pair.low}->{pair.high} skipped: {pair.skipped}")
    ssia_params = 0
    if ssia is not None and ssia.map == "channel":
        for pair in pairs:
            low, high = taps[pair.low], taps[pair.high]
            c_low, c_high = low.shape[low.channel_dim], high.shape[high.channel_dim]
            ssia_params += c_high * c_low + c_low
    return Plan(
        model_name=model_name or type(gm).__name__,
        tracer=tracer,
        model_parameters=count_parameters(gm),
        sites=sites,
        dia_modules=modules,
        taps=taps,
        pairs=pairs,
        dia=dia,
        ssia=ssia,
        ssia_parameters=ssia_params,
        notes=notes,
    )


def render_plan(plan: Plan) -> str:
    head = (
        f"fxattn plan for {plan.model_name} (traced with {plan.tracer}): "
        f"{len(plan.sites)} DIA sites in {len(plan.groups)} groups, {len(plan.taps)} taps, "
        f"{len(plan.active_pairs)} SSIA pairs"
    )
    parts: list[object] = [head]
    if plan.dia is not None:
        sites = Table(title="DIA sites", title_justify="left")
        columns = ("site", "node", "module path", "kind", "DIA multiplies", "shortcut",
                   "channels", "layout", "group", "module")
        for column in columns:
            sites.add_column(column, overflow="fold")  # long node names wrap, never elide
        for site in plan.sites:
            sites.add_row(
                str(site.index),
                site.node,
                site.module_path or "<root>",
                site.kind,
                site.branch,
                site.shortcut or "-",
                str(site.channels),
                site.layout,
                str(site.group),
                site.module,
            )
        modules = Table(title=f"DIA modules ({plan.dia.module}, r={plan.dia.reduction}, "
                              f"share={plan.dia.share}, init={plan.dia.init})",
                        title_justify="left")
        for column in ("module", "channels", "sites", "parameters"):
            modules.add_column(column)
        for spec in plan.dia_modules:
            modules.add_row(spec.name, str(spec.channels), str(len(spec.sites)),
                            f"{spec.parameters:,}")
        share = 100.0 * plan.dia_parameters / max(plan.model_parameters, 1)
        total = f"{plan.dia_parameters:,} (+{share:.2f}%)"
        modules.add_row("total", "", str(len(plan.sites)), total)
        parts += [sites, modules]
    taps = Table(title="Taps (stage outputs, low to high)", title_justify="left")
    for column in ("tap", "node", "module path", "shape", "layout", "map grid"):
        taps.add_column(column)
    for tap in plan.taps:
        grid = "x".join(map(str, tap.grid)) if tap.grid else "-"
        if tap.skip_tokens:
            grid += f" (+{tap.skip_tokens} tokens dropped)"
        taps.add_row(str(tap.index), tap.node, tap.module_path or "<root>",
                     str(tuple(tap.shape)), tap.layout, grid)
    parts.append(taps)
    if plan.ssia is not None:
        pairs = Table(title=f"SSIA pairs (map={plan.ssia.map}, weight={plan.ssia.weight})",
                      title_justify="left")
        for column in ("low tap", "supervised by", "resize", "status"):
            pairs.add_column(column)
        for pair in plan.pairs:
            pairs.add_row(str(pair.low), str(pair.high), "yes" if pair.resize else "no",
                          pair.skipped or "ok")
        parts.append(pairs)
    summary = f"model parameters: {plan.model_parameters:,}"
    if plan.dia is not None:
        summary += f"; DIA adds {plan.dia_parameters:,}"
    if plan.ssia_parameters:
        summary += f"; SSIA (training only) adds {plan.ssia_parameters:,}"
    parts.append(summary)
    if plan.dia is not None:
        parts.append(f"DIA init: {plan.dia.init} ({_INIT_MEANING[plan.dia.init]})")
    parts += [f"note: {note}" for note in plan.notes]
    return to_text(*parts)


#: what each ``DIA(init=...)`` means, for the plan's text
_INIT_MEANING = {
    "paper": "branches multiplied by h in (0, 1) from the start; for training from scratch",
    "identity": "per-channel gate at 0, the model computes exactly what the original does; "
                "for trained weights",
}
