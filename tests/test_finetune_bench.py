"""Smoke test of ``benchmarks/finetune.py`` (the full run is a benchmark, not a test).

``--quick`` on the digits ResNet-20 with two seeds and three arms: the files are written, the
identity arm starts exactly where the pretrained model is (step 0 equal to the continued
baseline's in every seed, logits unchanged) while the paper's init moves the logits, and a rerun
is served from the cache.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common

import finetune  # noqa: E402


def test_quick_run_writes_results_and_identity_starts_at_the_pretrained(tmp_path: Path,
                                                                        capsys) -> None:
    argv = ["--quick", "--tasks", "resnet20", "--seeds", "0", "1", "--workers", "1",
            "--arms", "baseline", "dia-paper", "dia-identity", "--out", str(tmp_path)]
    assert finetune.main(argv) == 0
    for suffix in ("json", "md", "png"):
        assert (tmp_path / f"finetune.{suffix}").stat().st_size > 0
    results = json.loads((tmp_path / "finetune.json").read_text())
    assert results["machine"]["cores"] and len(results["machine"]["git_commit"]) >= 7
    arms = results["tasks"]["resnet20"]["arms"]
    assert list(arms) == ["baseline", "dia-paper", "dia-identity"]
    base, identity, paper = arms["baseline"], arms["dia-identity"], arms["dia-paper"]
    assert len(base["test_acc"]) == 2 and len(base["test_acc"][0]) == 2  # step 0, epoch 1
    assert [row[0] for row in identity["test_acc"]] == [row[0] for row in base["test_acc"]]
    assert identity["step0_max_abs_logit_change"] == 0.0
    assert paper["step0_max_abs_logit_change"] > 0.1
    assert identity["new_parameters"] == paper["new_parameters"] + 16 + 32 + 64  # the gates
    assert "vs_baseline_end" in identity and "p_holm" in identity["vs_baseline_end"]
    text = (tmp_path / "finetune.md").read_text()
    assert "| dia-identity |" in text and "significantly worse" in text
    capsys.readouterr()
    assert finetune.main(argv) == 0  # cached: no job runs again
    assert "jobs to run" not in capsys.readouterr().out
