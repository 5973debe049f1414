"""fxattn's Triton kernels, checked on CPU in Triton's interpreter (no GPU needed).

The check runs in a subprocess (``tests/_triton_interpret_check.py``) because
``TRITON_INTERPRET=1`` must be set before the kernels are defined; the subprocess also keeps
it away from every other test of the same pytest(-xdist) worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent


def test_triton_kernels_match_the_composite_implementation() -> None:
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(HERE / "_triton_interpret_check.py")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "TRITON-INTERPRETER-OK" in result.stdout
