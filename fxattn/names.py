"""Names that every layer of fxattn shares, defined once.

The passes put DIA and SSIA modules under two roots of the transformed module; the export
sees the same roots as ONNX name scopes (``fxattn_dia.g0/...``) and the low-precision and
onnxruntime passes find DIA's weights by them; the strip pass finds SSIA's nodes by the mark
the insert passes leave in ``node.meta``.
"""

from __future__ import annotations

#: Attribute of the transformed module that holds the DIA modules (``net.fxattn_dia.g0``).
DIA_ROOT = "fxattn_dia"
#: Attribute of the transformed module that holds the SSIA branches (training only).
SSIA_ROOT = "fxattn_ssia"
#: Prefix of every DIA parameter, module path and ONNX name scope (``fxattn_dia.``).
DIA_PREFIX = f"{DIA_ROOT}."
#: Prefix of every SSIA parameter and module path (``fxattn_ssia.``).
SSIA_PREFIX = f"{SSIA_ROOT}."
#: ``node.meta`` key the insert passes mark their nodes with (``"dia"`` or ``"ssia"``).
FXATTN_META = "fxattn"
#: Attribute of a scoped model (a detector whose backbone was transformed) with its plan.
SCOPE_ATTR = "fxattn_scope"
