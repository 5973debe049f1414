"""The module inside a wrapper: what fxattn captures when it is handed a wrapped model.

Training code hands fxattn modules wrapped for data parallelism (``DistributedDataParallel``,
``DataParallel``) or compilation (``torch.compile``'s ``OptimizedModule``); every public
function looks through them to the user's own module.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def unwrap(module: Any) -> Any:
    """Look through DistributedDataParallel / DataParallel / torch.compile wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        else:
            break
    return module
