"""Count the aten operators a piece of code dispatches (device-independent cost measure)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as ops: ...`` then ``ops.total`` / ``ops.counts``.

    Every operator that reaches the dispatcher below autograd counts once - an fxattn custom
    operator included (its implementation runs below the mode and is not counted). On a GPU
    each counted op is at least one kernel launch, which is why the count is the target.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
