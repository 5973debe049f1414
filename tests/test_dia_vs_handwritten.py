"""The statistics of ``benchmarks/dia_vs_handwritten.py`` decide what the data say.

Synthetic timings stand in for onnxruntime runs: the verdict on target 1 (share of the
hand-written DIA's overhead <= 0.85) must be *met* for a clearly smaller overhead, *not met*
for an equal one, and *not decided* when session-to-session noise is as large as the gap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dia_vs_handwritten  # noqa: E402

MODELS = ("original", "original-twin", "lean", "lean-fuse", "lean-noopt", "hand-dia")


def _samples(means: dict[str, float], session_noise: float, blocks: int = 8,
             rounds: int = 20, seed: int = 0) -> dict[str, list[list[float]]]:
    """``[block][round]`` milliseconds: every block's session of a model has its own speed
    (``session_noise``, relative), every run a little jitter."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[float]]] = {}
    for name in MODELS:
        mean = means.get(name, means.get("original", 100.0))
        out[name] = [list(mean * (1 + session_noise * rng.standard_normal())
                          * (1 + 0.01 * rng.standard_normal(rounds))) for _ in range(blocks)]
    return out


@pytest.fixture(autouse=True)
def _fewer_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dia_vs_handwritten, "BOOTSTRAP", 400)


def test_a_clearly_smaller_overhead_is_met_and_an_equal_one_is_not() -> None:
    stats = dia_vs_handwritten.share_statistics(_samples(
        {"original": 100, "lean": 110, "lean-fuse": 120, "lean-noopt": 120, "hand-dia": 120},
        session_noise=0.002))
    assert stats["overhead"]["lean"] == pytest.approx(0.10, abs=0.01)
    assert stats["lean_share"]["verdict"] == "met"
    assert stats["lean_share"]["ci95"][1] <= dia_vs_handwritten.TARGET_SHARE
    assert stats["lean-noopt_share"]["verdict"] == "not met"
    low, high = stats["ratio_to_lean"]["lean-fuse"]["ci95"]
    assert low <= 120 / 110 <= high
    assert set(stats["ratio_to_lean"]) == {"lean-fuse", "lean-noopt"}
    twin_low, twin_high = stats["noise_twin_overhead_ci95"]
    assert twin_low <= 0 <= twin_high


def test_session_noise_as_large_as_the_gap_is_not_decided() -> None:
    stats = dia_vs_handwritten.share_statistics(_samples(
        {"original": 100, "lean": 110, "lean-fuse": 110, "lean-noopt": 110, "hand-dia": 120},
        session_noise=0.05))
    assert stats["lean_share"]["verdict"] == "not decided"
    assert stats["blocks"] == 8 and stats["rounds_per_block"] == 20
    assert len(stats["overhead_per_block"]["lean"]) == 8


def test_reanalyse_rewrites_the_tables_from_the_saved_samples(tmp_path: Path) -> None:
    samples = _samples({"original": 100, "lean": 110, "hand-dia": 120}, session_noise=0.002)
    results = {"command": "python benchmarks/dia_vs_handwritten.py", "machine": {},
               "threads": 2, "size": 224, "load_before": [0.5], "load_after": [0.6],
               "hand_gap": "0.0e+00 (max abs)", "batches": {"1": {"samples_ms": samples}}}
    (tmp_path / "dia_vs_handwritten.json").write_text(json.dumps(results))
    assert dia_vs_handwritten.main(["--reanalyse", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "dia_vs_handwritten.md").read_text()
    assert "| 1 | 8 x 20 |" in text and " met |" in text


@pytest.mark.parametrize("spinning", [False, True])
def test_time_blocks_samples_every_file_in_every_block(tmp_path: Path, spinning: bool) -> None:
    """Both threading protocols give ``[block][round]`` milliseconds for every file; with
    spinning workers each file is timed with the only live session of its block."""
    import random

    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    files = {"original": path, "original-twin": path, "hand-dia": path}
    samples = dia_vs_handwritten.time_blocks(files, np.ones((1, 4), np.float32), blocks=2,
                                             rounds=3, warmup=1, threads=1,
                                             rng=random.Random(0), spinning=spinning)
    assert set(samples) == set(files)
    assert all(len(blocks) == 2 and all(len(r) == 3 and min(r) > 0 for r in blocks)
               for blocks in samples.values())
