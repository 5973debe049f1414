"""The code base stays `ruff` clean (configuration in pyproject.toml)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_clean() -> None:
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    targets = [p for p in ("fxattn", "tests", "benchmarks", "examples") if (ROOT / p).exists()]
    result = subprocess.run([ruff, "check", *targets], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_library_modules_never_import_the_cli() -> None:
    """Imports point one way: the CLI uses the library (``fxattn bench`` calls ``benchmark``),
    never the other way round."""
    import ast

    for path in sorted((ROOT / "fxattn").rglob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [alias.name for alias in node.names]
                assert not (target.endswith("cli") or (target in (".", "..") and "cli" in names)
                            or target == "fxattn.cli"), f"{path.name} imports the CLI"
