"""The whole-pipeline check every zoo test shares (random weights, small inputs).

transform (DIA + SSIA) -> the SSIA loss is a finite scalar whose gradient reaches the stem ->
one SGD step on task + SSIA loss moves every shared DIA cell -> strip (no SSIA left, the lean
output is the eval output, the original's output structure) -> ONNX export verified in
onnxruntime at batch 2 and 3 by the default rule (``fxattn.export.verify``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

import fxattn
from fxattn.export import ExportReport, export_onnx
from fxattn.names import DIA_ROOT, SSIA_ROOT


def call(module: torch.nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


def floats(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(value) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _stem(net: torch.nn.Module) -> tuple[str, torch.nn.Parameter]:
    """The first weight matrix or kernel outside fxattn's modules: the bottom of the backbone."""
    return next((n, p) for n, p in net.named_parameters()
                if not n.startswith("fxattn") and n.endswith("weight") and p.dim() >= 2)


def whole_pipeline(
    model: torch.nn.Module,
    inputs: Any,
    tmp_path: Path,
    *,
    tracer: str | None = None,
    task_loss: Callable[[Any], torch.Tensor] | None = None,
) -> ExportReport:
    """Run and check every stage on ``model``; returns the export report."""
    model.eval()
    with torch.no_grad():
        reference = floats(call(model, inputs))
    net = fxattn.transform(model, inputs, dia=True, ssia=True)
    plan = net.plan
    if tracer is not None:
        assert plan.tracer == tracer
    assert plan.sites, "no DIA site"
    assert plan.active_pairs, "no SSIA pair"

    net.train()
    out = call(net, inputs)
    ssia = fxattn.ssia_loss(net)
    assert ssia.dim() == 0 and torch.isfinite(ssia) and ssia.item() >= 0
    stem_name, stem = _stem(net)
    (grad,) = torch.autograd.grad(ssia, stem, retain_graph=True, allow_unused=True)
    assert grad is not None and grad.abs().sum() > 0, f"no SSIA gradient reaches {stem_name}"

    before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(DIA_ROOT)}
    task = task_loss(out) if task_loss else sum(t.pow(2).mean() for t in floats(out))
    (task + ssia).backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    after = net.state_dict()
    for module in plan.dia_modules:  # every shared cell learns
        keys = [k for k in before if k.startswith(f"{DIA_ROOT}.{module.name}.")]
        assert any(not torch.equal(before[k], after[k]) for k in keys), module.name

    net.eval()
    lean = fxattn.strip_ssia(net)
    assert not any(name.startswith(SSIA_ROOT) for name, _ in lean.named_modules())
    assert not any(SSIA_ROOT in str(n.target) for n in lean.graph.nodes)
    with torch.no_grad():
        expected = floats(call(net, inputs))
        got = floats(call(lean, inputs))
    assert len(got) == len(expected) == len(reference)
    assert all(torch.isfinite(t).all() for t in got), "the step left non-finite outputs"
    for a, b, ref in zip(got, expected, reference, strict=True):
        assert a.shape == ref.shape
        torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)

    report = export_onnx(lean, tmp_path / "model.onnx", inputs, batch_sizes=(2, 3))
    assert report.verified and report.verification.passed
    return report
