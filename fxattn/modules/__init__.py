"""The attention modules fxattn inserts: DIA cells (kept) and the SSIA loss (training only)."""

from .dia import DIALSTMCell, SharedSE, build_dia_module
from .ssia import SSIALoss, attention_map

__all__ = ["DIALSTMCell", "SSIALoss", "SharedSE", "attention_map", "build_dia_module"]
