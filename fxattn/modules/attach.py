"""Attached SSIA: the training-only loss rides on the model's output through autograd.

Frameworks that compute the loss themselves (Hugging Face ``Trainer``, ultralytics' trainers,
Lightning recipes) never add ``fxattn.ssia_loss(net)`` to it. With ``SSIA(attach=True)`` the
training graph ends in ``fxattn_ssia.attach(ssia_loss, output)``: an identity on the forward
(every floating leaf of the output that requires grad comes back as a fresh copy, so the
framework may modify it in place) whose backward also hands the SSIA scalar a gradient. Any
backward through a loss computed from the output therefore trains SSIA exactly once per
forward, with no change to the loop - the pattern of Megatron-LM's ``MoEAuxLossAutoScaler``.

Which gradient the SSIA scalar gets:

- The output holds a 0-dim floating leaf that receives a gradient (a loss the model computes
  itself: a Hugging Face model called with ``labels``, a torchvision detector's loss dict):
  the SSIA scalar gets *that leaf's* incoming gradient. Whatever the framework did to the
  loss on the way - divided it by the accumulation steps, multiplied it by a
  ``torch.amp.GradScaler`` scale - is applied to the SSIA term too, exactly as if the model
  had returned ``loss + ssia``.
- Otherwise (logits, feature maps: the loss is computed outside the model) the SSIA scalar
  gets ``1.0``, the gradient of ``task + ssia``. fxattn cannot see how the loss was scaled
  after it left the model, so with gradient accumulation that divides the loss, or a
  GradScaler, either compute the loss inside the model (transform with the targets among the
  example inputs) or set the scale per step with :func:`fxattn.set_ssia_scale`, as Megatron's
  schedules do for the MoE auxiliary loss.

If a training forward's attached gradient never arrives (no backward used the output before
the next training forward), the module warns once: the loss ignored the output, or the model
ran in train mode without a backward.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def _is_leaf(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad


def floating_leaves(output: Any) -> list[torch.Tensor]:
    """The floating tensors of ``output`` that require grad, in a fixed traversal order.

    Traverses tensors, tuples / lists / namedtuples, dicts (``ModelOutput`` included) and
    dataclasses; anything else is left alone.
    """
    found: list[torch.Tensor] = []
    _rebuild(output, lambda t: found.append(t) or t)
    return found


def _rebuild(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with every floating, grad-requiring tensor ``t`` replaced by ``fn(t)``."""
    if isinstance(value, torch.Tensor):
        return fn(value) if _is_leaf(value) else value
    if isinstance(value, dict):  # before dataclasses: a ModelOutput is both
        items = {key: _rebuild(item, fn) for key, item in value.items()}
        if dataclasses.is_dataclass(value):
            return dataclasses.replace(value, **items)  # ModelOutput: fields are its keys
        rebuilt = _empty_like(value)
        rebuilt.update(items)
        return rebuilt
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _rebuild(getattr(value, f.name), fn)
            for f in dataclasses.fields(value)
            if f.init
        }
        return dataclasses.replace(value, **changes)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(_rebuild(item, fn) for item in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_rebuild(item, fn) for item in value)
    return value


def _empty_like(value: dict[Any, Any]) -> dict[Any, Any]:
    """An empty mapping of ``value``'s type (``OrderedDict`` stays ordered)."""
    try:
        return type(value)()
    except TypeError:
        return {}


class _AttachState:
    """Per-module bookkeeping shared with the autograd function (plain Python, never saved)."""

    def __init__(self) -> None:
        self.scale = 1.0
        self.pending = False  # a training forward attached the term and no backward came yet
        self.warned = False


class _AttachFunction(torch.autograd.Function):
    """Identity on ``leaves``; backward also returns the SSIA scalar's gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, state: _AttachState, ssia: torch.Tensor, *leaves: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        ctx.state = state
        ctx.scalars = tuple(i for i, leaf in enumerate(leaves) if leaf.dim() == 0)
        ctx.set_materialize_grads(False)  # an unused leaf's gradient stays None
        # Fresh tensors, not views of the inputs: frameworks modify the returned loss in place.
        return tuple(leaf.clone() for leaf in leaves)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        state: _AttachState = ctx.state
        state.pending = False
        scalar_grads = [grads[i] for i in ctx.scalars if grads[i] is not None]
        if scalar_grads:  # the model's own loss: its gradient carries the framework's scaling
            ssia_grad = scalar_grads[0].detach().float()
        else:
            reference = next(g for g in grads if g is not None)
            ssia_grad = torch.full((), state.scale, dtype=torch.float32, device=reference.device)
        return (None, ssia_grad, *grads)


class SSIAAttach(nn.Module):
    """The graph node ``fxattn_ssia.attach(ssia, output)``: returns ``output`` with the term."""

    _is_impure = True

    def __init__(self) -> None:
        super().__init__()
        self.state = _AttachState()

    def forward(self, ssia: torch.Tensor, output: Any) -> Any:
        leaves = floating_leaves(output)
        if not leaves or not torch.is_grad_enabled() or not ssia.requires_grad:
            return output  # nothing to backpropagate through (no_grad, frozen model)
        if not torch.compiler.is_compiling():
            self._check_previous()
            self.state.pending = True
        attached: Iterator[torch.Tensor] = iter(_AttachFunction.apply(self.state, ssia, *leaves))
        return _rebuild(output, lambda _: next(attached))

    def _check_previous(self) -> None:
        state = self.state
        if state.pending and not state.warned:
            state.warned = True
            warnings.warn(
                "fxattn: the SSIA term attached to the previous training forward's output got "
                "no gradient (no backward went through any floating tensor of that output "
                "before this forward), so SSIA did not train on it. If your loss uses no "
                "output tensor, transform with SSIA(attach=False) and add "
                "fxattn.ssia_loss(net) to the loss; if the forward ran in train mode only to "
                "predict, run it under torch.no_grad() or in eval mode.",
                RuntimeWarning,
                stacklevel=4,
            )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["state"] = _AttachState()  # bookkeeping is per live module, never copied
        return state
