"""Plain-text rendering with rich: tables and their text, for plans and reports.

A leaf of the package: it knows nothing of plans or passes (those render themselves with it),
so imports point one way, from the pipeline to here.
"""

from __future__ import annotations

import io

from rich import box
from rich.console import Console
from rich.table import Table as _RichTable


def to_text(*renderables: object, width: int = 120) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    for renderable in renderables:
        console.print(renderable)
    return buffer.getvalue().rstrip("\n")


def Table(**kwargs: object) -> _RichTable:  # noqa: N802 - a plain-text friendly rich Table
    return _RichTable(box=box.SIMPLE_HEAD, **kwargs)
