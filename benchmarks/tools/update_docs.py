"""Copy the committed results into the generated blocks of ``docs/results.md``.

Usage, from the repository root, after committing a new results file (the provenance table
names the commit that last changed each file)::

    python benchmarks/tools/update_docs.py           # rewrite the blocks
    python benchmarks/tools/update_docs.py --check   # exit 1 if a block is not what it would write

Two blocks, each between its markers:

* ``<!-- results:begin -->`` ... ``<!-- results:end -->``: for each entry of ``SECTIONS`` whose
  file exists, the named part of ``benchmarks/results/<file>.md`` (a whole file, or one
  heading's section) under its own heading, followed by a link to the full file;
* ``<!-- provenance:begin -->`` ... ``<!-- provenance:end -->``: one row per results file: the
  command that made it, when (``machine.time_utc`` of its JSON, where recorded), on what
  machine, and the commit that last changed its data (the JSON, else the Markdown file).
  Commit hashes change when a branch is rebased: run the script again after a rebase.

Everything outside the markers is written by hand and left as it is.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "results.md"
LINK_PREFIX = "../benchmarks/results/"  # results files seen from docs/

# (heading in docs/results.md, results file, heading of the part to copy or None for the whole)
SECTIONS: list[tuple[str, str, str | None]] = [
    ("Deployed DIA against a hand-written DIA-ResNet-50 (target 1; onnxruntime CPU, no "
     "spinning)", "dia_vs_handwritten.md", None),
    ("The same with onnxruntime's default spinning threads", "dia_vs_handwritten_spinning.md",
     None),
    ("Low-precision DIA weights, compiled (target 2; onnxruntime CPU, no spinning)",
     "dia_lowp.md", None),
    ("Low-precision DIA weights, compiled, with onnxruntime's default spinning threads",
     "dia_lowp_spinning.md", None),
    ("DIA's deployed cost against its lower bound (target 3)", "dia_cost.md", None),
    ("Low-precision DIA weights: accuracy effect of the block size (MNIST-1D, wider models)",
     "lowp_blocks.md", None),
    ("Evidence: DIA and SSIA on tasks with headroom (cluttered digits, MNIST-1D)",
     "evidence.md", None),
    ("Accuracy: ResNet-20 on scikit-learn digits", "accuracy.md", None),
    ("First latency, transform and training criteria (ResNet-50, onnxruntime CPU, 2 threads)",
     "latency_notes.md", "Verdicts at a glance"),
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


def relink(body: str) -> str:
    """Links in a results file are relative to ``benchmarks/results/``; make them so from
    ``docs/`` (``../../docs/x.md`` from a results file is ``x.md`` here)."""
    def fix(match: re.Match[str]) -> str:
        target = match.group(1)
        if target.startswith("../../docs/"):
            return f"]({target[len('../../docs/'):]})"
        return f"]({LINK_PREFIX}{target})"
    return re.sub(r"\]\((?!https?://|/|#)([^)]+)\)", fix, body)


def render_results() -> str:
    parts = []
    for title, name, heading in SECTIONS:
        path = RESULTS / name
        if not path.exists():
            continue
        body = relink(extract(path.read_text(), heading))
        # the file's own headings go below this block's (### title): at least ####
        body = re.sub(r"(?m)^#{1,3} ", "#### ", body)
        parts.append(f"### {title}\n\n{body}\n\nFull results: "
                     f"[benchmarks/results/{name}]({LINK_PREFIX}{name})")
    return "\n\n".join(parts)


def _last_commit(path: Path) -> str:
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%h (%cs)", "--", str(path)],
                             cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "-"
    return out.strip() or "not committed"


#: commands of results files that do not record their own
COMMANDS = {"accuracy.md": "python benchmarks/accuracy.py"}


def _command(name: str, data: dict, text: str) -> str:
    if name in COMMANDS:
        return COMMANDS[name]
    if isinstance(data.get("command"), str):
        return data["command"].strip()
    match = re.search(r"(?:Command|Generated by):?\s*`([^`]+)`", text)
    return match.group(1).strip() if match else "-"


def _machine(data: dict) -> tuple[str, str]:
    machine = data.get("machine")
    if not isinstance(machine, dict):
        return "-", "-"
    when = str(machine.get("time_utc") or machine.get("when_utc") or "-")
    when = when.replace("T", " ").removesuffix("+00:00")  # ISO times as the others are written
    cpus = machine.get("cpu_count", machine.get("cpus", machine.get("cores")))
    what = machine.get("cpu", "")
    what = f"{what}, {cpus} CPUs" if what else (f"{cpus} CPUs" if cpus else "-")
    if "onnxruntime" in machine:
        what += f"; onnxruntime {machine['onnxruntime']}"
    if "torch" in machine:
        what += f"; torch {machine['torch']}"
    return (f"{when} UTC" if when != "-" else "-"), what


def render_provenance() -> str:
    rows = ["| results file | command | measured | machine | data committed in |",
            "|---|---|---|---|---|"]
    for md in sorted(RESULTS.glob("*.md")):
        if md.stem.endswith("_notes"):  # written by hand about other files, not a measurement
            continue
        source = md.with_suffix(".json")
        data = json.loads(source.read_text()) if source.exists() else {}
        data = data if isinstance(data, dict) else {}
        when, machine = _machine(data)
        command = _command(md.name, data, md.read_text())
        command = f"`{command}`" if command != "-" else command
        changed = _last_commit(source if source.exists() else md)
        rows.append(f"| [{md.name}]({LINK_PREFIX}{md.name}) | {command} | {when} | {machine} "
                    f"| {changed} |")
    return "\n".join(rows)


BLOCKS = {"results": render_results, "provenance": render_provenance}


def rewrite(text: str) -> str:
    for name, render in BLOCKS.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{render()}\n{end}{tail}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that the generated blocks are up to date")
    args = parser.parse_args()
    text = DOC.read_text()
    new = rewrite(text)
    if args.check:
        if new != text:
            print(f"{DOC.relative_to(ROOT)}: generated blocks are out of date; run "
                  "python benchmarks/tools/update_docs.py", file=sys.stderr)
            raise SystemExit(1)
        return
    DOC.write_text(new)


if __name__ == "__main__":
    main()
