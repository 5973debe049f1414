"""The transformed module in a plain training loop, and pretrained weights.

- ``loss = criterion(net(x), y) + fxattn.ssia_loss(net)`` trains (the held-out loss falls).
- Where the SSIA gradient goes, derived from the loss: every lower tap is a *student* (its map
  carries gradient) and every supervising tap is a *target* through ``detach``. With 3 taps and
  ``pairs="next"`` the deepest tap is only ever a target, so the SSIA loss alone gives its
  producer (``layer3``), its DIA group (``g2``) and the head no gradient at all, while the stem,
  ``layer1``, ``layer2`` and their DIA groups get a non-zero one. The middle tap is both: its
  gradient is exactly that of the pair in which it is the student, none from the pair in which
  it is the target. ``pairs="deepest"`` makes the deepest tap the target of every pair.
- ``ssia_loss`` before a training forward, or after switching to eval, raises
  :class:`fxattn.SSIALossUnavailableError`.
- An original model's ``state_dict`` loads into the transformed and the stripped module with
  ``strict=False``; the only missing keys are fxattn's, and nothing is unexpected.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn
from training_helpers import batch, example, train_steps, transformed

import fxattn
import fxattn.ops
from fxattn.modules.ssia import PairSpec, SSIALoss, TapSpec
from fxattn.names import DIA_ROOT, SSIA_ROOT

ROOT = Path(__file__).resolve().parents[1]


def _held_out_loss(net: nn.Module) -> float:
    net.eval()
    with torch.no_grad():
        losses = [nn.functional.cross_entropy(net(x), y).item()
                  for x, y in (batch(10_000 + i, 32) for i in range(2))]
    net.train()
    return sum(losses) / len(losses)


def test_plain_loop_reduces_the_loss() -> None:
    net = transformed()
    before = _held_out_loss(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = train_steps(net, opt, range(20))
    after = _held_out_loss(net)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.7 * before, (before, after)
    assert sum(losses[-5:]) < sum(losses[:5])


def _ssia_grads(map_: str, pairs: str) -> dict[str, float]:
    """Sum of |grad| of the SSIA loss alone, per top-level parameter group."""
    net = transformed(ssia=fxattn.SSIA(map=map_, pairs=pairs))
    net(batch(0)[0])
    fxattn.ssia_loss(net).backward()
    sums: dict[str, float] = {}
    for name, param in net.named_parameters():
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] == DIA_ROOT else parts[0]
        grad = 0.0 if param.grad is None else param.grad.abs().sum().item()
        sums[group] = sums.get(group, 0.0) + grad
    return sums


@pytest.mark.parametrize(("map_", "pairs"), [("spatial", "next"), ("spatial", "deepest"),
                                             ("channel", "next")])
def test_ssia_gradient_reaches_lower_stages_only(map_: str, pairs: str) -> None:
    grads = _ssia_grads(map_, pairs)
    for group in ("conv1", "bn1", "layer1", "layer2", f"{DIA_ROOT}.g0", f"{DIA_ROOT}.g1"):
        assert grads[group] > 0, (group, grads)
    for group in ("layer3", f"{DIA_ROOT}.g2", "fc"):  # only feed the deepest tap / the head
        assert grads[group] == 0, (group, grads)
    if map_ == "channel":  # the training-only projections learn from the SSIA loss
        assert grads[SSIA_ROOT] > 0


@pytest.mark.parametrize("fused", [False, True])
def test_target_side_is_detached_exactly(fused: bool) -> None:
    """On the SSIA modules themselves: d loss / d tap is the student terms' gradient only.

    Exact on the decomposed path; the fused operator computes the same gradient in another
    order (float32 reordering: measured 9.3e-10 abs, 2.6e-7 rel), so it is compared with
    ``assert_close``'s defaults. Either way the deepest tap (only a target) gets no gradient.
    """
    taps = [TapSpec(1, 4, (8, 8), 0), TapSpec(1, 6, (4, 4), 0), TapSpec(1, 8, (2, 2), 0)]
    pairs = [PairSpec(0, 1, True), PairSpec(1, 2, True)]
    loss_fn = SSIALoss(taps, pairs, weight=0.5)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, t.channels, *t.grid, generator=g, requires_grad=True) for t in taps]

    def maps() -> tuple[torch.Tensor, ...]:
        return tuple(tap_map(f) for tap_map, f in zip(loss_fn.maps, feats, strict=True))

    with contextlib.nullcontext() if fused else fxattn.ops.decomposed():
        loss_fn(*maps()).backward()
    assert feats[2].grad is None  # the deepest tap is only a target
    with fxattn.ops.decomposed():
        student_term = 0.5 * loss_fn._pair_loss(maps(), 1, pairs[1])
        (expected,) = torch.autograd.grad(student_term, feats[1])
    exact = {"rtol": 0, "atol": 0} if not fused else {}
    torch.testing.assert_close(feats[1].grad, expected, **exact)
    assert feats[0].grad is not None and feats[0].grad.abs().sum() > 0


def test_ssia_loss_availability() -> None:
    net = transformed()
    x = example()
    with pytest.raises(fxattn.SSIALossUnavailableError, match="run a forward pass first"):
        fxattn.ssia_loss(net)  # no forward yet
    net(x)
    first = fxattn.ssia_loss(net)
    assert first.dim() == 0 and first.item() > 0 and first.requires_grad
    net.eval()
    with pytest.raises(fxattn.SSIALossUnavailableError):
        fxattn.ssia_loss(net)  # switching to eval clears the stale training loss
    net(x)
    with pytest.raises(fxattn.SSIALossUnavailableError):
        fxattn.ssia_loss(net)  # eval forwards run no SSIA branch
    net.train()
    net(x)
    assert fxattn.ssia_loss(net).item() == pytest.approx(first.item(), rel=1e-5)
    plain = transformed(ssia=False)
    plain(x)
    zero = fxattn.ssia_loss(plain)
    assert zero.dim() == 0 and zero.item() == 0.0
    with pytest.raises(fxattn.NotTransformedError):
        fxattn.ssia_loss(nn.Linear(2, 2))


def _check_pretrained(model: nn.Module, x: torch.Tensor) -> None:
    original = {k: v.clone() for k, v in model.state_dict().items()}
    net = fxattn.transform(model, x)
    lean = fxattn.strip_ssia(net)
    # Fresh copies with other weights, so that loading must overwrite every original key.
    for target in (fxattn.transform(_reinit(model), x), fxattn.strip_ssia(net)):
        result = target.load_state_dict(original, strict=False)
        assert result.unexpected_keys == []
        assert result.missing_keys, "DIA adds parameters"
        assert all(k.startswith((f"{DIA_ROOT}.", f"{SSIA_ROOT}.")) for k in result.missing_keys)
        state = target.state_dict()
        assert set(state) == set(original) | set(result.missing_keys)
        for key, value in original.items():
            assert torch.equal(state[key], value), key
    assert set(lean.state_dict()) == set(net.state_dict())


def _reinit(model: nn.Module) -> nn.Module:
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    return other


def test_torchvision_resnet18_weights_load() -> None:
    _check_pretrained(torchvision.models.resnet18(weights=None), torch.randn(2, 3, 64, 64))


def test_timm_model_weights_load() -> None:
    _check_pretrained(timm.create_model("resnet18", pretrained=False), torch.randn(2, 3, 64, 64))


def _tiny_example_model() -> nn.Module:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from train import TinyResNet
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return TinyResNet()


def test_example_train_script_smoke(tmp_path: Path) -> None:
    """examples/train.py with tiny settings: trains, checkpoints, resumes, strips, exports."""
    script = ROOT / "examples" / "train.py"
    common = [sys.executable, str(script), "--model", "tiny", "--image-size", "16",
              "--batch-size", "8", "--steps-per-epoch", "2", "--epochs", "2",
              "--out", str(tmp_path), "--no-progress"]
    first = subprocess.run([*common, "--stop-after", "1"], capture_output=True, text=True,
                           cwd=ROOT, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stopped after epoch 1" in first.stdout
    assert (tmp_path / "last.fxattn").exists() and not (tmp_path / "model.onnx").exists()
    second = subprocess.run([*common, "--resume"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming at epoch 2" in second.stdout and "epoch 1/2" not in second.stdout
    assert fxattn.load(tmp_path / "lean.fxattn", model=_tiny_example_model()).training is False
    assert (tmp_path / "model.onnx").stat().st_size > 0
    assert "onnxruntime parity" in second.stdout
