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
        if path.parent.name == "cli" or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                names = [alias.name for alias in node.names]
                assert not (target.endswith("cli") or (target in (".", "..") and "cli" in names)
                            or target == "fxattn.cli"), f"{path.name} imports the CLI"


def _module_imports() -> dict[str, set[str]]:
    """``fxattn`` module -> the ``fxattn`` modules it imports, at any depth of the file
    (imports inside functions count: they are cycles that only hide until run time).
    The package's ``__init__`` is the public facade on top, not a dependency: edges into it
    (``from . import __version__``) are left out."""
    import ast

    package = ROOT / "fxattn"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name.split(".") if is_package else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            anchor = base[: len(base) - node.level + 1]
            target = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            candidates = [f"{target}.{alias.name}" for alias in node.names] + [target]
            for candidate in candidates:
                if candidate in modules and candidate != "fxattn" and candidate != name:
                    graph[name].add(candidate)
                    break
    return graph


def test_imports_point_one_way() -> None:
    """No import cycles between fxattn's modules: each pass depends only on the ones below
    it in the pipeline (trace, analyze, insert, strip, export, benchmark)."""
    graph = _module_imports()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
