"""Training checkpoints: resume is step-for-step identical, and loading never runs code.

The uninterrupted run and the resumed run are compared loss by loss. The resumed model starts
from *different* random weights and a freshly built optimizer, and the global RNG is disturbed
after saving, so equality proves the weights, the Adam moments, the LR schedule position and
the RNG state all came from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from training_helpers import example, tiny_model, train_steps, transformed

import fxattn

STEPS, SPLIT = 6, 3


def _optim(net: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


@pytest.fixture(scope="module")
def reference() -> list[float]:
    torch.manual_seed(7)
    net = transformed(seed=0)
    opt, sched = _optim(net)
    return train_steps(net, opt, range(STEPS), sched, noise=0.1)


def _first_half(path: Path) -> list[float]:
    torch.manual_seed(7)
    net = transformed(seed=0)
    opt, sched = _optim(net)
    losses = train_steps(net, opt, range(SPLIT), sched, noise=0.1)
    fxattn.save(net, path, example(), optimizer=opt, scheduler=sched, step=SPLIT - 1, rng=True,
                extra={"epoch": 0, "losses": losses})
    torch.randn(1000)  # disturb the global RNG: the checkpoint must restore it
    return losses


@pytest.mark.parametrize("rebuild", ["load", "transform"])
def test_resume_matches_uninterrupted_run(
    tmp_path: Path, reference: list[float], rebuild: str
) -> None:
    path = tmp_path / "ckpt.fxattn"
    first = _first_half(path)
    assert first == reference[:SPLIT]
    if rebuild == "load":  # architecture from the file, weights loaded by fxattn.load
        net = fxattn.load(path, model=tiny_model(seed=99))
    else:  # the training script re-runs transform with fresh random weights
        net = transformed(seed=99)
    opt, sched = _optim(net)
    ckpt = fxattn.load_checkpoint(path, net, optimizer=opt, scheduler=sched)
    assert ckpt.restored == ("model", "optimizer", "scheduler", "rng")
    assert ckpt.step == SPLIT - 1 and ckpt.extra == {"epoch": 0, "losses": first}
    assert sched.last_epoch == SPLIT
    resumed = train_steps(net, opt, range(ckpt.step + 1, STEPS), sched, noise=0.1)
    assert len(resumed) == STEPS - SPLIT
    for step, (got, want) in enumerate(zip(resumed, reference[SPLIT:], strict=True), SPLIT):
        assert abs(got - want) <= 1e-6, (step, got, want)


def test_without_optimizer_state_resume_diverges(tmp_path: Path, reference: list[float]) -> None:
    """The control: weights, schedule and RNG without the Adam moments do not reproduce the
    trajectory, so the test above really depends on the optimizer state in the file."""
    path = tmp_path / "ckpt.fxattn"
    _first_half(path)
    net = transformed(seed=99)
    opt, sched = _optim(net)
    ckpt = fxattn.load_checkpoint(path, net, scheduler=sched)
    assert ckpt.restored == ("model", "scheduler", "rng")
    resumed = train_steps(net, opt, range(SPLIT, STEPS), sched, noise=0.1)
    assert resumed[0] == pytest.approx(reference[SPLIT], abs=1e-6)  # same weights, same data
    assert max(abs(a - b) for a, b in zip(resumed[1:], reference[SPLIT + 1 :], strict=True)) > 1e-4


def test_file_is_plain_data_loaded_weights_only(tmp_path: Path) -> None:
    net = transformed()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    train_steps(net, opt, range(1))
    path = fxattn.save(net, tmp_path / "a.fxattn", example(), optimizer=opt, step=0)
    payload = torch.load(path, weights_only=True)
    assert payload["step"] == 0 and payload["rng"] is None
    assert len(payload["optimizer"]["state"]) == len(list(net.parameters()))
    assert any(k.startswith("fxattn_dia.") for k in payload["state_dict"])


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.fxattn"
    torch.save({"format": "fxattn/1", "payload": _Evil()}, path)
    with pytest.raises(fxattn.CheckpointError, match="unpickle arbitrary code"):
        fxattn.load_checkpoint(path, transformed())


def test_unsafe_extra_is_refused_at_save_time(tmp_path: Path) -> None:
    path = tmp_path / "x.fxattn"
    with pytest.raises(fxattn.CheckpointError, match=r"extra\['hook'\]"):
        fxattn.save(transformed(), path, example(), extra={"hook": lambda: None})
    assert not path.exists()


def test_missing_optimizer_state_and_wrong_architecture(tmp_path: Path) -> None:
    path = fxattn.save(transformed(), tmp_path / "w.fxattn", example())
    net = transformed()
    with pytest.raises(fxattn.CheckpointError, match="no optimizer state"):
        fxattn.load_checkpoint(path, net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    other = transformed(dia=fxattn.DIA(module="se"))
    with pytest.raises(fxattn.CheckpointError, match="does not match"):
        fxattn.load_checkpoint(path, other)
