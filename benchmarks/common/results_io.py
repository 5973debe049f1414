"""How a benchmark script records a run: the command that reproduces it, and its two files.

Every result under ``benchmarks/results/`` is a pair: ``<stem>.json`` (the data, samples
included) and ``<stem>.md`` (the table docs/results.md quotes), and both name the command that made
them, so that a reader can rerun it.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any


def command_line(script: str, argv: list[str] | None = None) -> str:
    """``python benchmarks/<script>`` and the arguments it ran with (``sys.argv`` by default)."""
    args = argv if argv is not None else sys.argv[1:]
    return f"python benchmarks/{script}" + "".join(f" {shlex.quote(a)}" for a in args)


def write_results(out: Path, stem: str, results: dict[str, Any], text: str) -> None:
    """Write ``out/<stem>.json`` and ``out/<stem>.md``, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(text)
    print(text)
