"""Count the aten operators a piece of code dispatches: the device-independent part of cost.

On a GPU every aten operator is at least one kernel launch, so a model made of many small
operators is bound by dispatching them, not by their arithmetic. Counting them needs no GPU:
:class:`AtenOpCounter` is a ``TorchDispatchMode`` that sees every operator that reaches the
kernels (after autograd and after composite operators such as ``linear`` are decomposed), in
the forward and in the backward (the autograd engine carries the mode to its threads). An
fxattn custom operator counts once: its implementation runs below the mode.

>>> import torch
>>> counts = count_aten_ops(lambda: torch.ones(3).add(1).relu())
>>> sorted(counts.items())
[('aten.add.Tensor', 1), ('aten.ones.default', 1), ('aten.relu.default', 1)]
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while it is active (``with AtenOpCounter() as c``);
    ``c.counts`` maps ``aten.<op>.<overload>`` to its number of calls, ``c.total`` sums them."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_aten_ops(fn: Callable[[], Any]) -> Counter[str]:
    """Call ``fn()`` once and return how many times it dispatched each aten operator."""
    with AtenOpCounter() as counter:
        fn()
    return counter.counts
