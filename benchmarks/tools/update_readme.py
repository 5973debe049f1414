"""Copy the committed results tables into the README's results section.

Usage: ``python benchmarks/tools/update_readme.py``. For each entry of ``SECTIONS`` whose file
exists, the named part of ``benchmarks/results/<file>.md`` (a whole file, or one heading's
section) is inserted, under its own heading, between the README's ``<!-- results:begin -->``
and ``<!-- results:end -->`` markers, followed by a link to the full file.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# (README heading, results file, heading of the part to copy or None for the whole file)
SECTIONS: list[tuple[str, str, str | None]] = [
    ("Latency and training targets (ResNet-50, onnxruntime CPU, 2 threads)",
     "latency_notes.md", "Verdicts at a glance"),
    ("Accuracy: ResNet-20 on scikit-learn digits", "accuracy.md", None),
    ("Evidence: DIA and SSIA on tasks with headroom (cluttered digits, MNIST-1D)",
     "evidence.md", None),
    ("Deployed DIA against a hand-written DIA-ResNet-50 (onnxruntime CPU, no spinning)",
     "dia_vs_handwritten.md", None),
    ("The same with onnxruntime's default spinning threads", "dia_vs_handwritten_spinning.md",
     None),
    ("Low-precision DIA weights, compiled (target 2; onnxruntime CPU, no spinning)",
     "dia_lowp.md", None),
    ("Low-precision DIA weights, compiled, with onnxruntime's default spinning threads",
     "dia_lowp_spinning.md", None),
    ("Low-precision DIA weights: accuracy effect of the block size (MNIST-1D, wider models)",
     "lowp_blocks.md", None),
    ("DIA across backbone families", "families.md", None),
    ("Whole lean DIA detectors: the exact DIA rewrites on and off (onnxruntime CPU)",
     "detector_rewrites.md", None),
    ("Zoo coverage", "zoo.md", "Summary"),
]


def extract(text: str, heading: str | None) -> str:
    """The body of ``heading``'s section (up to the next heading of the same or higher level)."""
    lines = text.strip().splitlines()
    if heading is None:
        return "\n".join(lines[1:] if lines and lines[0].startswith("#") else lines).strip()
    for i, line in enumerate(lines):
        match = re.match(r"^(#+)\s+(.*)$", line)
        if match and match.group(2).strip() == heading:
            level = len(match.group(1))
            body = []
            for following in lines[i + 1:]:
                nxt = re.match(r"^(#+)\s", following)
                if nxt and len(nxt.group(1)) <= level:
                    break
                body.append(following)
            return "\n".join(body).strip()
    raise SystemExit(f"heading {heading!r} not found")


def render() -> str:
    parts = []
    for title, name, heading in SECTIONS:
        path = RESULTS / name
        if not path.exists():
            continue
        body = extract(path.read_text(), heading)
        # Images and links in results files are relative to benchmarks/results/.
        body = re.sub(r"\]\((?!https?://|/|#)([^)]+)\)", r"](benchmarks/results/\1)", body)
        parts.append(f"### {title}\n\n{body}\n\nFull results: "
                     f"[benchmarks/results/{name}](benchmarks/results/{name})")
    return "\n\n".join(parts)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{render()}\n{END}{tail}")


if __name__ == "__main__":
    main()
