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
