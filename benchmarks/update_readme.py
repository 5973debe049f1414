"""Copy the committed results tables into the README's results section.

Usage: ``python benchmarks/update_readme.py``. Each ``benchmarks/results/<name>.md`` listed in
``SECTIONS`` that exists is inserted, in order, between the README's
``<!-- results:begin -->`` and ``<!-- results:end -->`` markers.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ["latency", "training", "scaling", "accuracy", "families", "zoo"]
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def render() -> str:
    parts = []
    for name in SECTIONS:
        path = RESULTS / f"{name}.md"
        if path.exists():
            text = path.read_text().strip()
            # Demote headings by one level so they nest under "## Results".
            lines = [("#" + line) if line.startswith("#") else line for line in text.splitlines()]
            parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render()}\n{END}{tail}")


if __name__ == "__main__":
    main()
