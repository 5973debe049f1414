"""No dead relative link in the README, docs/ and benchmarks/README.md.

A relative link must name a file or folder of the repository; a ``#anchor`` must be a heading
of the target Markdown file, by GitHub's rule for heading anchors (lower case, punctuation
dropped, spaces to hyphens, ``-1``, ``-2`` ... for repeats). Links inside code blocks and
inline code are not links. Reads files only: fast.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", ROOT / "benchmarks" / "README.md",
                *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose(text: str) -> str:
    """``text`` without fenced code blocks, inline code and HTML comments."""
    text = re.sub(r"(?ms)^(```|~~~).*?^\1[^\n]*$", "", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"<[^>]+>", "", heading)  # inline HTML
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep their text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # keeps letters, digits, _, - and spaces
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^(```|~~~).*?^\1[^\n]*$", "", path.read_text())
    seen: dict[str, int] = {}
    found = set()
    for match in re.finditer(r"(?m)^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", text):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return found


def test_slug_follows_github() -> None:
    assert slug("Low-precision DIA weights, compiled (target 2; onnxruntime CPU)") == \
        "low-precision-dia-weights-compiled-target-2-onnxruntime-cpu"
    assert slug("What `strip_ssia` returns") == "what-strip_ssia-returns"
    assert slug("Pretrained weights [`tests/test_training.py`]") == \
        "pretrained-weights-teststest_trainingpy"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert page.exists(), page
    dead = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        path = (page.parent / file_part).resolve() if file_part else page
        if not path.is_relative_to(ROOT):
            dead.append(f"{target}: outside the repository")
            continue
        if not path.exists():
            dead.append(f"{target}: no file {path.relative_to(ROOT)}")
            continue
        if anchor and path.suffix == ".md" and anchor not in anchors(path):
            dead.append(f"{target}: no heading with anchor #{anchor} in "
                        f"{path.relative_to(ROOT)}")
    assert not dead, f"dead links in {page.relative_to(ROOT)}:\n" + "\n".join(dead)
