"""The README's quickstart runs exactly as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README-quickstart", "exec"), namespace)  # noqa: S102
    assert os.path.exists(tmp_path / "resnet18_dia.onnx")
    assert os.path.exists(tmp_path / "resnet18_dia.b1.onnx")  # compiled for onnxruntime's CPU
    assert namespace["report"].verified  # type: ignore[attr-defined]


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest -q -n auto --dist loadfile" in README.read_text()
    assert ".venv/bin/python -m pytest -q -n auto --dist loadfile" in ci


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.encode()) <= 15_500  # a newcomer reads it in a few minutes; docs/ has the rest
    head = "\n".join(text.splitlines()[:40])
    assert ".venv/bin/fxattn demo" in head
    assert ".venv/bin/python -m pytest -q -n auto --dist loadfile" in head


def test_api_table_names_every_public_name() -> None:
    import fxattn

    section = README.read_text().split("## API", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`([A-Za-z_]\w*)", section))
    assert not set(fxattn.__all__) - named, "add these to the README's API table"


def test_cli_table_names_every_subcommand() -> None:
    from fxattn.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    section = README.read_text().split("## Command line", 1)[1].split("\n## ", 1)[0]
    assert {f"fxattn {name}" for name in sub.choices} <= set(
        re.findall(r"`(fxattn \w+)", section))
