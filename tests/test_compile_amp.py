"""torch.compile and autocast with the transformed and the stripped module.

- ``torch.compile(net)`` in train mode gives the eager outputs, SSIA loss and gradients (and
  ``fxattn.ssia_loss(compiled)`` looks through the ``_orig_mod`` wrapper); after ``eval()`` it
  gives the eager eval outputs (no SSIA branch, so ``ssia_loss`` raises), and after ``train()``
  the training graph again: the train/eval graph swap is not hidden by a stale compiled graph.
  The transformed module is compiled with the ``aot_eager`` backend (dynamo capture + AOT
  autograd, which is where an fx-built module could break) and Inductor compiles a stripped
  module once (Inductor's CPU C++ build takes tens of seconds per graph, so it runs on a
  micro model).
- ``torch.autocast("cpu", dtype=torch.bfloat16)``: forward and backward run with DIA (LSTM and
  SE) and SSIA (spatial and channel maps); the SSIA loss is computed in fp32, all gradients are
  finite, and outputs stay close to fp32 (bf16 has an 8-bit mantissa, so the bound is loose).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from training_helpers import batch, transformed

import fxattn


def _grads(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}


def test_compiled_transformed_module_matches_eager() -> None:
    torch._dynamo.reset()
    eager, inner = transformed(), transformed()
    compiled = torch.compile(inner, backend="aot_eager")
    x, y = batch(0)
    criterion = nn.CrossEntropyLoss()
    losses = {}
    for name, net in (("eager", eager), ("compiled", compiled)):
        out = net(x)
        ssia = fxattn.ssia_loss(net)  # through torch.compile's wrapper
        (criterion(out, y) + ssia).backward()
        losses[name] = (out.detach(), ssia.detach())
    torch.testing.assert_close(losses["compiled"][0], losses["eager"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["compiled"][1], losses["eager"][1], rtol=1e-5, atol=1e-6)
    reference, got = _grads(eager), _grads(inner)
    assert list(got) == list(reference) and len(got) == len(list(eager.parameters()))
    for key, grad in reference.items():
        torch.testing.assert_close(got[key], grad, rtol=1e-4, atol=1e-5, msg=key)

    eager.eval()
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(fxattn.SSIALossUnavailableError):
        fxattn.ssia_loss(compiled)
    eager.train()
    compiled.train()
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fxattn.ssia_loss(compiled), fxattn.ssia_loss(eager),
                               rtol=1e-5, atol=1e-6)


def test_compiled_stripped_module_matches_eager() -> None:
    torch._dynamo.reset()
    lean = fxattn.strip_ssia(transformed())
    compiled = torch.compile(lean, backend="aot_eager")
    x = batch(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lean(x), rtol=1e-5, atol=1e-5)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class _Micro(nn.Module):
    """Two single-conv residual stages: 2 DIA sites, 2 SSIA taps, few Inductor kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage1 = _Residual(4)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.stage2 = _Residual(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_inductor_compiles_stripped_module() -> None:
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    net = fxattn.transform(_Micro(), x)
    assert len(net.plan.sites) == 2 and len(net.plan.taps) == 2
    lean = fxattn.strip_ssia(net)
    compiled = torch.compile(lean)  # the default backend: Inductor, C++ on CPU
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), lean(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dia", "map_"), [("lstm", "spatial"), ("se", "channel")])
def test_bf16_autocast_forward_backward(dia: str, map_: str) -> None:
    x, y = batch(2)
    results = {}
    for precision in ("fp32", "bf16"):
        net = transformed(dia=fxattn.DIA(module=dia), ssia=fxattn.SSIA(map=map_))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = net(x)
            task = nn.functional.cross_entropy(out, y)
        ssia = fxattn.ssia_loss(net)
        (task + ssia).backward()
        grads = _grads(net)
        results[precision] = (out, ssia, grads)
        assert ssia.dtype == torch.float32  # the maps are computed in fp32 under autocast
        assert all(torch.isfinite(g).all() for g in grads.values())
        assert any(k.startswith("fxattn_dia.") for k in grads)
    out16, ssia16, grads16 = results["bf16"]
    out32, ssia32, grads32 = results["fp32"]
    assert out16.dtype == torch.bfloat16
    assert list(grads16) == list(grads32)
    torch.testing.assert_close(out16.float(), out32, rtol=0.1, atol=0.1)
    torch.testing.assert_close(ssia16, ssia32, rtol=0.05, atol=0.02)
    for key in ("conv1.weight", "fxattn_dia.g0.input_path.0.weight" if dia == "lstm"
                else "fxattn_dia.g0.fc.0.weight"):
        cosine = nn.functional.cosine_similarity(grads16[key].flatten(), grads32[key].flatten(),
                                                 dim=0)
        assert cosine > 0.9, (key, cosine)


def test_bf16_autocast_eval_and_stripped() -> None:
    net = transformed()
    net.eval()
    lean = fxattn.strip_ssia(net)
    x = batch(3)[0]
    with torch.no_grad():
        reference = lean(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_net, got_lean = net(x), lean(x)
    torch.testing.assert_close(got_lean, got_net, rtol=0, atol=0)
    torch.testing.assert_close(got_lean.float(), reference, rtol=0.1, atol=0.1)
