"""Human-readable rendering of plans and reports (rich tables, exported as plain text)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.table import Table as _RichTable

if TYPE_CHECKING:
    from .analysis import Plan


def to_text(*renderables: object, width: int = 120) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return buffer.getvalue().rstrip("\n")


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
                              f"share={plan.dia.share})", title_justify="left")
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
    parts += [f"note: {note}" for note in plan.notes]
    return to_text(*parts)


def Table(**kwargs: object) -> _RichTable:  # noqa: N802 - a plain-text friendly rich Table
    return _RichTable(box=box.SIMPLE_HEAD, **kwargs)
