"""The package's layout shows the pipeline, and its imports follow it.

Read from the code (no import runs): each module of ``fxattn`` belongs to one layer, in the
order of the pipeline - shared names, capture, analysis, the fused ops and modules, the
passes, the public front (transform, scope, checkpoints), export, deploy, benchmark, command
line. A module imports only from its own layer or the layers before it (imports inside
functions count too: they are dependencies that only hide until run time). Small files, one
concept each; the DIA and SSIA roots are spelled once.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch
import torchvision

import fxattn

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fxattn"

#: Layers in pipeline order; a module may import from its own layer and the ones before it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("names", "errors", "config", "files", "report")),
    ("capture", ("capture",)),
    ("analysis", ("analysis",)),
    ("ops", ("ops",)),
    ("modules", ("modules",)),
    ("passes", ("passes",)),
    ("front", ("transform", "scope", "serialization", "diagnostics", "ssia_logging",
               "finetune")),
    ("export", ("export",)),
    ("deploy", ("deploy",)),
    ("bench", ("bench",)),
    ("cli", ("cli",)),
]
LAYER_OF = {top: index for index, (_, tops) in enumerate(LAYERS) for top in tops}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _layer(module: str) -> int | None:
    """The layer of ``fxattn.<top>...``; ``None`` for the package's facade ``fxattn``."""
    parts = module.split(".")
    return None if len(parts) == 1 else LAYER_OF[parts[1]]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``fxattn`` modules ``name`` imports (relative or absolute, at any depth)."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join([*anchor, *(node.module.split(".") if node.module else [])])
            elif node.module and node.module.split(".")[0] == "fxattn":
                target = node.module
            else:
                continue
            for alias in node.names:  # ``from .. import ops`` imports fxattn.ops, not fxattn
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("fxattn"))
    return {module for module in found if module in modules and module != name}


def test_every_module_has_a_layer() -> None:
    tops = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in
            PACKAGE.rglob("*.py")} - {"__init__"}
    assert tops <= set(LAYER_OF), f"modules without a layer: {sorted(tops - set(LAYER_OF))}"


def test_imports_never_point_back_up_the_pipeline() -> None:
    modules = _modules()
    upward = []
    for name, path in sorted(modules.items()):
        own = _layer(name)
        if own is None:  # the facade: fxattn/__init__.py gathers the public API from all
            continue
        for target in sorted(_imports(name, path, modules)):
            layer = _layer(target)
            if layer is None:
                upward.append(f"{name} -> fxattn (the facade; import from the module itself)")
            elif layer > own:
                upward.append(f"{name} ({LAYERS[own][0]}) -> {target} ({LAYERS[layer][0]})")
    assert not upward, "imports back up the pipeline:\n" + "\n".join(upward)


def test_small_files_one_concept_each() -> None:
    direct = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(direct) <= 12, f"{len(direct)} modules directly under fxattn/: {direct}"
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > 700:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                size = node.end_lineno - node.lineno + 1
                if size > 200:
                    too_long.append(f"{path.relative_to(ROOT)}: {node.name} {size} lines")
    assert not too_long, "\n".join(too_long)


def _string_literals(tree: ast.AST) -> list[str]:
    """The string constants of a module, docstrings left out (they may name a root)."""
    docstrings = {
        id(node.body[0].value) for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


@pytest.mark.parametrize("root", ["fxattn_dia", "fxattn_ssia"])
def test_root_names_are_spelled_once(root: str) -> None:
    """``fxattn_dia`` / ``fxattn_ssia`` appear as a string (or the start of one: a prefix, an
    f-string's head) only in ``fxattn/names.py``; everything else imports the name."""
    spelled = sorted(
        str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*.py")
        if any(text.startswith(root) for text in _string_literals(ast.parse(path.read_text())))
    )
    assert spelled == ["fxattn/names.py"], f"{root!r} spelled in {spelled}"


def _layer_walk(call) -> list[str]:
    """The layers a call enters, in order (consecutive calls in one layer merged)."""
    walk: list[str] = []
    tracked = {"capture", "analysis", "ops", "modules", "passes"}

    def profile(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event != "call":
            return
        filename = frame.f_code.co_filename
        if not filename.startswith(str(PACKAGE)):
            return
        top = Path(filename).relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top in tracked and (not walk or walk[-1] != top):
            walk.append(top)

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return walk


def test_transform_walks_the_pipeline_in_order() -> None:
    """``transform`` enters capture, analysis, passes and modules in that order, returning to
    a layer it has left at most twice."""
    model = torchvision.models.resnet18(num_classes=10)
    walk = _layer_walk(lambda: fxattn.transform(model, torch.randn(2, 3, 32, 32)))
    first = list(dict.fromkeys(walk))
    order = [layer for layer in first if layer in ("capture", "analysis", "passes", "modules")]
    assert order == ["capture", "analysis", "passes", "modules"], walk
    returns = len(walk) - len(first)
    assert returns <= 2, f"{returns} returns to a layer already left: {walk}"
