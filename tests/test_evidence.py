"""The evidence benchmark's own code (``benchmarks/evidence.py``; the full run is a benchmark).

The data generators are deterministic, offline and give the stated shapes and balanced labels;
one tiny training run per layout goes end to end through the script's own ``train_run``
(training, strip, fp32 / int8 / int4 ONNX evaluated in onnxruntime, attention correlation) and
reproduces itself exactly; the paired statistics match scipy's.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.common

import evidence  # noqa: E402

from benchmarks.common import evidence_tasks  # noqa: E402
from benchmarks.common.evidence_tasks import ClutterRecipe, cluttered_digits, mnist1d  # noqa: E402

SMALL = ClutterRecipe(train_copies=1, eval_copies=1)
FREQUENCY = torch.bincount(torch.from_numpy(load_digits().target)) / 1797


@pytest.fixture(scope="module")
def clutter() -> dict:
    return cluttered_digits(SMALL)


@pytest.fixture(scope="module")
def signals() -> dict:
    return mnist1d()


def test_cluttered_digits_is_deterministic_with_the_stated_shapes(clutter: dict) -> None:
    first, second = clutter, cluttered_digits(SMALL)
    sizes = {name: len(y) for name, (_, y) in first.items()}
    assert sum(sizes.values()) == 1797  # one canvas per source digit, every digit used once
    assert sizes["test"] == math.ceil(1797 * SMALL.test_fraction)  # scikit-learn rounds up
    for name, (x, y) in first.items():
        assert x.shape == (len(y), 1, SMALL.canvas, SMALL.canvas) and x.dtype == torch.float32
        assert set(y.tolist()) == set(range(10))
        share = torch.bincount(y, minlength=10) / len(y)  # stratified: the classes' shares
        torch.testing.assert_close(share, FREQUENCY, rtol=0, atol=0.01)
        torch.testing.assert_close(x, second[name][0], rtol=0, atol=0)
        assert torch.equal(y, second[name][1])
    train = first["train"][0]
    torch.testing.assert_close(train.mean(), torch.tensor(0.0), rtol=0, atol=1e-5)
    torch.testing.assert_close(train.std(), torch.tensor(1.0), rtol=0, atol=1e-4)


def test_mnist1d_is_generated_offline_deterministically(monkeypatch, signals: dict) -> None:
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    data, again = signals, mnist1d()
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global state untouched
    assert {k: tuple(x.shape) for k, (x, _) in data.items()} == {
        "train": (1000, 1, 40), "val": (800, 1, 40), "test": (1000, 1, 40)}
    for name, (x, y) in data.items():
        assert set(y.tolist()) == set(range(10))
        assert torch.equal(x, again[name][0]) and torch.equal(y, again[name][1])


def _tiny(monkeypatch, name: str, data: dict) -> None:
    """The script's task ``name`` on a small slice of its data, with a narrow network."""
    small = {split: (x[:n], y[:n]) for (split, (x, y)), n in
             zip(data.items(), (96, 64, 64), strict=True)}
    monkeypatch.setitem(evidence_tasks.TASKS, name,
                        replace(evidence_tasks.TASKS[name], widths=(8, 12, 16), batch=32))
    monkeypatch.setattr(evidence, "task_data", lambda task: small)


@pytest.mark.parametrize(("name", "arm"), [("cluttered", "ssia"), ("mnist1d", "dia")])
def test_one_tiny_run_end_to_end(monkeypatch, tmp_path: Path, clutter: dict, signals: dict,
                                 name: str, arm: str) -> None:
    data = clutter if name == "cluttered" else signals
    _tiny(monkeypatch, name, data)
    record = evidence.train_run(name, arm, 1, 0.05, 1, False, tmp_path)
    stored = json.loads(json.dumps(record))  # what the cache stores (tuples become lists)
    assert stored["curves"] == record["curves"] and stored["onnx"] == record["onnx"]
    assert len(record["curves"]["val_acc"]) == 1 and 0 <= record["test_acc"] <= 1
    onnx = record["onnx"]
    # the fp32 export scores what PyTorch scores (same predictions up to float noise)
    assert abs(onnx["fp32"]["test_acc"] - record["test_acc"]) <= 1 / 64
    assert onnx["fp32"]["verify_max_abs_error"] < 1e-4
    if arm == "dia":
        assert record["dia_sites"] == 6  # 3 stages x 2 blocks
        assert set(onnx) == {"fp32", "int8", "int4"}
        assert "MatMulNBits" in onnx["int4"]["note"]
        assert onnx["int8"]["prediction_agreement"] >= 0.9
        assert len(record["correlation"]["stages"]) == 3
    else:
        assert record["ssia_pairs"] == 2 and set(onnx) == {"fp32"}
        assert record["curves"]["ssia_loss"][0] > 0
    again = evidence.train_run(name, arm, 1, 0.05, 1, False, tmp_path)
    assert again["test_acc"] == record["test_acc"]
    assert again["curves"] == record["curves"]  # deterministic, bit for bit


def test_cbam_arm_puts_timm_cbam_in_every_block() -> None:
    task = replace(evidence_tasks.TASKS["cluttered"], widths=(8, 12, 16))
    net = evidence.build(task, "cbam", 0, torch.randn(2, 1, 32, 32))
    blocks = {k.split(".attention.")[0] for k in net.state_dict() if ".attention." in k}
    assert len(blocks) == 6  # every residual block has CBAM parameters
    base = evidence.build(task, "baseline", 0, torch.randn(2, 1, 32, 32))
    shared = {k: v for k, v in base.state_dict().items() if "attention" not in k}
    cbam = net.state_dict()
    for key, value in shared.items():  # same base initialisation as the baseline's
        torch.testing.assert_close(cbam[key], value, rtol=0, atol=0)


def test_paired_statistics_match_scipy() -> None:
    from scipy import stats

    rng = np.random.default_rng(0)
    base = rng.normal(0.9, 0.01, 10)
    arm = base + rng.normal(0.005, 0.004, 10)
    result = evidence.paired(arm, base)
    interval = stats.ttest_rel(arm, base).confidence_interval(0.95)
    np.testing.assert_allclose(result["ci95"], [interval.low, interval.high], rtol=1e-10,
                               atol=1e-12)
    np.testing.assert_allclose(result["p"], stats.ttest_rel(arm, base).pvalue, rtol=1e-10)
    adjusted = evidence.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adjusted == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})


def test_next_lr_walks_the_1_3_10_grid() -> None:
    assert [evidence.next_lr(lr, up=True) for lr in (0.03, 0.1, 0.3, 1.0)] == [0.1, 0.3, 1.0, 3.0]
    assert [evidence.next_lr(lr, up=False) for lr in (0.03, 0.1, 0.3, 1.0)] == [
        0.01, 0.03, 0.1, 0.3]


def _fake_sweep(monkeypatch, tmp_path: Path, val_of) -> list[float]:
    """``choose_lr`` with training replaced by ``val_of(lr)``; the lrs it trained, in order."""
    trained: list[float] = []

    def run_jobs(jobs, workers, estimate):
        for job in jobs:
            task, arm, seed, lr, epochs, sweep, path, _ = job
            trained.append(lr)
            config = json.loads(json.dumps(evidence.TASKS[task].to_dict()))
            path.write_text(json.dumps({
                "task": task, "arm": arm, "seed": seed, "lr": lr, "epochs": epochs,
                "task_config": config, "val_acc": val_of(lr), "train_seconds": 0.0,
                "recipe_fingerprint": evidence.recipe_fingerprint()}))

    monkeypatch.setattr(evidence, "run_jobs", run_jobs)
    return trained


def test_the_lr_sweep_widens_until_the_best_is_bracketed(monkeypatch, tmp_path: Path) -> None:
    task = evidence.TASKS["mnist1d"]  # grid 0.03, 0.1, 0.3
    trained = _fake_sweep(monkeypatch, tmp_path, lambda lr: -abs(math.log10(lr / 1.0)))
    lr, records = evidence.choose_lr(task, tmp_path, 1, False)
    assert lr == 1.0 and trained == [0.03, 0.1, 0.3, 1.0, 3.0]  # 3 is worse: 1 is bracketed
    assert sorted(r["lr"] for r in records) == [0.03, 0.1, 0.3, 1.0, 3.0]
    again = _fake_sweep(monkeypatch, tmp_path, lambda lr: 0.0)
    assert evidence.choose_lr(task, tmp_path, 1, False)[0] == 1.0 and again == []  # cached
    low = _fake_sweep(monkeypatch, tmp_path / "low", lambda lr: -lr)  # smaller is better
    (tmp_path / "low").mkdir()
    lr, _ = evidence.choose_lr(task, tmp_path / "low", 1, False)
    assert low[:3] == [0.03, 0.1, 0.3] and low[3:] == [0.01, 0.003, 0.001, 0.0003, 0.0001,
                                                       3e-05]
    assert lr == 3e-05  # the widening limit: reported as the choice, never past the limit


def test_a_cached_run_of_other_code_is_redone(monkeypatch, tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    config = json.loads(json.dumps(evidence.TASKS["mnist1d"].to_dict()))
    record = {"task": "mnist1d", "lr": 0.3, "epochs": 15, "task_config": config,
              "recipe_fingerprint": evidence.recipe_fingerprint()}
    path.write_text(json.dumps(record))
    assert evidence._load(path, 0.3, 15) == record
    path.write_text(json.dumps({**record, "recipe_fingerprint": "an older loop"}))
    assert evidence._load(path, 0.3, 15) is None
    del record["recipe_fingerprint"]  # runs made before the fingerprint existed
    path.write_text(json.dumps(record))
    assert evidence._load(path, 0.3, 15) is None
