"""How many aten operators a model dispatches, per DIA site and per SSIA tap.

The counter itself is :class:`fxattn.ops.counting.AtenOpCounter` (the operators' own tests use
it too). :func:`step_ops` counts one eval forward, one training forward (with its loss) and one
backward of a module; :func:`ops_per_site` turns two such counts into "operators added per DIA
site" (``(ops of transformed - ops of original) / sites``), and :func:`op_account` does the
whole comparison for a model: DIA per site, SSIA per tap.

The baseline of "per site" is the original *as fxattn captured it* (``transform`` with DIA and
SSIA off), not the user's eager module: a model served by the ``torch.export`` capture runs an
aten graph whose own operator count differs from its Python forward (a Hugging Face model's
eager forward builds its cache and masks its own way), and that difference is not DIA's.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..ops.counting import count_aten_ops

PHASES = ("eval_forward", "train_forward", "backward")


@dataclass(frozen=True)
class StepOps:
    """Aten operators of one eval forward, one training forward (loss included) and the
    backward of that loss."""

    eval_forward: int
    train_forward: int
    backward: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def default_loss(module: nn.Module, output: Any) -> torch.Tensor:
    """A loss any model can be trained with for measuring: the mean square of every floating
    output, plus ``fxattn.ssia_loss`` when ``module`` is an fxattn module (zero without SSIA)."""
    from ..modules.graph_module import is_fxattn_module
    from ..scope import scope_info
    from ..transform import ssia_loss

    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)
              and t.is_floating_point()]
    loss = torch.stack([t.float().square().mean() for t in leaves]).sum()
    if is_fxattn_module(module) or scope_info(module) is not None:
        loss = loss + ssia_loss(module)
    return loss


def step_ops(module: nn.Module, example_inputs: Any,
             loss_fn: Callable[[nn.Module, Any], torch.Tensor] = default_loss) -> StepOps:
    """Count the operators of ``module``'s eval forward, training forward and backward on
    ``example_inputs`` (a tensor, a tuple or a dict, as :func:`fxattn.transform` takes).

    Runs on a deep copy, so the caller's module keeps its mode, statistics and gradients.
    ``loss_fn(module, output)`` makes the scalar the backward starts from.
    """
    from ..capture import ExampleInputs

    inputs = ExampleInputs.from_user(example_inputs)
    work = copy.deepcopy(module)
    work.eval()
    with torch.no_grad():
        eval_forward = sum(count_aten_ops(lambda: inputs.call(work)).values())
    work.train()
    box: list[torch.Tensor] = []
    train_forward = sum(count_aten_ops(
        lambda: box.append(loss_fn(work, inputs.call(work)))).values())
    backward = sum(count_aten_ops(lambda: box[0].backward()).values())
    return StepOps(eval_forward, train_forward, backward)


def ops_per_site(original: StepOps, transformed: StepOps, sites: int) -> dict[str, float]:
    """Operators ``transformed`` adds to ``original`` in each phase, divided by ``sites``."""
    if sites < 1:
        raise ValueError(f"ops_per_site needs at least one site, got {sites}")
    return {phase: (getattr(transformed, phase) - getattr(original, phase)) / sites
            for phase in PHASES}


@dataclass(frozen=True)
class OpAccount:
    """Aten operators of the original, DIA and DIA + SSIA models, and what DIA adds per site and
    SSIA per tap (``None`` where the method was off).

    ``captured``: the original as fxattn captured it, nothing inserted - the baseline of the
    per-site figures (``None``: the eager original is the baseline).
    """

    original: StepOps
    dia: StepOps | None
    dia_ssia: StepOps | None
    sites: int
    taps: int
    captured: StepOps | None = None

    @property
    def baseline(self) -> StepOps:
        return self.captured if self.captured is not None else self.original

    @property
    def dia_per_site(self) -> dict[str, float] | None:
        if self.dia is None or not self.sites:
            return None
        return ops_per_site(self.baseline, self.dia, self.sites)

    @property
    def ssia_per_tap(self) -> dict[str, float] | None:
        base = self.dia or self.baseline
        if self.dia_ssia is None or not self.taps:
            return None
        per_tap = ops_per_site(base, self.dia_ssia, self.taps)
        per_tap.pop("eval_forward")  # SSIA is stripped from inference: nothing to count there
        return per_tap

    def to_dict(self) -> dict[str, Any]:
        return {"original": self.original.to_dict(),
                "captured": self.captured.to_dict() if self.captured else None,
                "dia": self.dia.to_dict() if self.dia else None,
                "dia_ssia": self.dia_ssia.to_dict() if self.dia_ssia else None,
                "sites": self.sites, "taps": self.taps,
                "dia_per_site": self.dia_per_site, "ssia_per_tap": self.ssia_per_tap}

    def markdown(self) -> list[str]:
        """Table lines: the operators of each model and phase, then the per-site figures."""
        lines = ["| model | eval forward | training forward | backward |",
                 "|---|---:|---:|---:|"]
        for name, ops in (("original", self.original), ("original as captured", self.captured),
                          ("DIA", self.dia), ("DIA + SSIA", self.dia_ssia)):
            if ops is not None:
                lines.append(f"| {name} | {ops.eval_forward} | {ops.train_forward} | "
                             f"{ops.backward} |")
        if self.dia_per_site:
            per = self.dia_per_site
            lines.append(f"| DIA per site ({self.sites} sites) | {per['eval_forward']:+.1f} | "
                         f"{per['train_forward']:+.1f} | {per['backward']:+.1f} |")
        if self.ssia_per_tap:
            per = self.ssia_per_tap
            lines.append(f"| SSIA per tap ({self.taps} taps) | - | {per['train_forward']:+.1f} | "
                         f"{per['backward']:+.1f} |")
        return lines


def op_account(model: nn.Module, example_inputs: Any, dia: Any = True,
               ssia: Any = True) -> OpAccount:
    """Count the operators of ``model``, of it as captured with nothing inserted, and of it
    transformed with DIA alone and with DIA + SSIA (``dia`` / ``ssia`` as
    :func:`fxattn.transform` takes them) on ``example_inputs``.

    The figures do not depend on the device or the batch: count them on CPU at a small batch.
    """
    from ..config import resolve_dia, resolve_ssia
    from ..transform import transform

    dia_cfg, ssia_cfg = resolve_dia(dia), resolve_ssia(ssia)
    original = step_ops(model, example_inputs)
    captured = step_ops(transform(model, example_inputs, dia=False, ssia=False), example_inputs)
    dia_ops = dia_ssia_ops = None
    sites = taps = 0
    if dia_cfg is not None:
        net = transform(model, example_inputs, dia=dia_cfg, ssia=False)
        dia_ops, sites = step_ops(net, example_inputs), len(plan_of(net).sites)
    if ssia_cfg is not None:
        net = transform(model, example_inputs, dia=dia_cfg or False, ssia=ssia_cfg)
        dia_ssia_ops, taps = step_ops(net, example_inputs), len(plan_of(net).taps)
        sites = sites or len(plan_of(net).sites)
    return OpAccount(original, dia_ops, dia_ssia_ops, sites, taps, captured)


def plan_of(net: nn.Module) -> Any:
    """The plan of a transformed module (a :class:`~fxattn.Plan` or a scoped model's
    :class:`~fxattn.ScopePlan`): both list ``sites`` and ``taps``."""
    from ..capture.wrappers import unwrap
    from ..scope import scope_info

    module = unwrap(net)
    info = scope_info(module)
    return info.plan if info is not None else module.plan
