"""Plain option objects for the two methods, validated on construction.

They play the role of ``torch.ao.quantization``'s QConfig mappings: the passes read them and
never change them, and they serialise to JSON (:meth:`to_dict`) so a saved model records how
it was made.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import ConfigError

DIAModuleKind = Literal["lstm", "se"]
ShareMode = Literal["stage", "channels", "none"]
MapKind = Literal["spatial", "channel"]
PairMode = Literal["next", "deepest"]
DIAInit = Literal["paper", "identity"]

DIA_MODULE_KINDS = ("lstm", "se")
SHARE_MODES = ("stage", "channels", "none")
MAP_KINDS = ("spatial", "channel")
PAIR_MODES = ("next", "deepest")
DIA_INITS = ("paper", "identity")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported; choose one of {', '.join(choices)}")


def _check_regexes(name: str, patterns: tuple[str, ...]) -> None:
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"{name} must hold regex strings, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{name} pattern {pattern!r} is not a valid regex: {exc}") from None


@dataclass(frozen=True)
class DIA:
    """Options of Dense-and-Implicit Attention (kept in the deployed model).

    Args:
        module: ``"lstm"`` (the DIA-LSTM cell, default) or ``"se"`` (a shared SE MLP).
        reduction: hidden width of the cell's MLPs is ``C // reduction`` (default 4).
        share: ``"stage"`` one module per group of consecutive sites (default),
            ``"channels"`` one per channel count, ``"none"`` one per site.
        include / exclude: regexes on a site's module path (``layer1.0``); a site is kept if it
            matches any ``include`` (when given) and no ``exclude``. When the model has no
            residual sites, they select among the stage outputs instead.
        init: ``"paper"`` (default) multiplies each branch by the cell's ``h`` in (0, 1), as in
            the paper - right for training from scratch. ``"identity"`` multiplies by
            ``1 + gate * (h - 1)`` with a per-channel ``gate`` started at 0: the transformed
            model computes exactly what the original does, so trained weights keep their
            accuracy, and training opens the gate (use it on pretrained models; see
            ``docs/finetuning.md``).
        fused: run each site as one fused operator (``torch.ops.fxattn.dia_lstm`` /
            ``dia_se``: one op forward, one backward; Triton kernels on CUDA) - the default.
            ``False`` keeps the decomposed PyTorch graph (debugging, reference). Same
            parameters and math either way; ONNX export always writes the decomposed graph.
    """

    module: DIAModuleKind = "lstm"
    reduction: int = 4
    share: ShareMode = "stage"
    include: tuple[str, ...] = field(default_factory=tuple)
    exclude: tuple[str, ...] = field(default_factory=tuple)
    init: DIAInit = "paper"
    fused: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.fused, bool):
            raise ConfigError(f"DIA fused must be True or False, got {self.fused!r}")
        _check_choice("DIA module", self.module, DIA_MODULE_KINDS)
        _check_choice("DIA init", self.init, DIA_INITS)
        _check_choice("DIA share", self.share, SHARE_MODES)
        if isinstance(self.reduction, bool) or not isinstance(self.reduction, int):
            raise ConfigError(f"DIA reduction must be a positive integer, got {self.reduction!r}")
        if self.reduction <= 0:
            raise ConfigError(f"DIA reduction must be >= 1, got {self.reduction}")
        object.__setattr__(self, "include", _as_tuple(self.include))
        object.__setattr__(self, "exclude", _as_tuple(self.exclude))
        _check_regexes("DIA include", self.include)
        _check_regexes("DIA exclude", self.exclude)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SSIA:
    """Options of Self-Supervised Implicit Attention (training only, stripped for inference).

    Args:
        weight: multiplier of the loss returned by :func:`fxattn.ssia_loss` (default 1.0).
        p: exponent of the attention map ``mean_c |F|^p`` (default 2).
        map: ``"spatial"`` attention maps (default) or ``"channel"`` descriptors compared
            through a training-only projection.
        pairs: ``"next"`` (each tap with the next deeper one, default) or ``"deepest"``.
        token_taps: how many evenly spaced taps a model of constant resolution (ViT) gets.
        attach: ride the weighted SSIA term on the model's output through autograd instead of
            asking for ``+ fxattn.ssia_loss(net)`` in the loss (for frameworks that compute the
            loss themselves; see :mod:`fxattn.modules.attach`). ``fxattn.ssia_loss`` then
            returns a detached value, for logging only.
    """

    weight: float = 1.0
    p: float = 2.0
    map: MapKind = "spatial"
    pairs: PairMode = "next"
    token_taps: int = 4
    attach: bool = False

    def __post_init__(self) -> None:
        _check_choice("SSIA map", self.map, MAP_KINDS)
        if not isinstance(self.attach, bool):
            raise ConfigError(f"SSIA attach must be True or False, got {self.attach!r}")
        _check_choice("SSIA pairs", self.pairs, PAIR_MODES)
        for name in ("weight", "p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"SSIA {name} must be a number, got {value!r}")
            if value != value or value in (float("inf"), float("-inf")):
                raise ConfigError(f"SSIA {name} must be finite, got {value!r}")
        if self.weight < 0:
            raise ConfigError(f"SSIA weight must be >= 0, got {self.weight}")
        if self.p <= 0:
            raise ConfigError(f"SSIA p must be > 0, got {self.p}")
        if isinstance(self.token_taps, bool) or not isinstance(self.token_taps, int):
            raise ConfigError(f"SSIA token_taps must be an integer, got {self.token_taps!r}")
        if self.token_taps < 2:
            raise ConfigError(f"SSIA token_taps must be >= 2 to form a pair, got {self.token_taps}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Verification defaults of :func:`fxattn.export_onnx` (the evidence: :mod:`fxattn.export.verify`).
DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-5
# onnxruntime's float32 matmuls may round worse than PyTorch's own: on an AVX-512 Intel Xeon its
# worst element on a cancellation model (tests/test_verify.py) was a median 3.4x, p90 5.4x and
# at most 10.4x PyTorch's worst float32 error, over 40 random batches (4 had sufficed on an AMD
# EPYC). A real mismatch sits orders of magnitude above either.
DEFAULT_FLOAT64_FACTOR = 16.0


@dataclass(frozen=True)
class Tolerance:
    """How close onnxruntime must be to PyTorch (plain options, validated on construction).

    Args:
        atol: the absolute part (matters for elements near zero).
        rtol: the relative part, times ``|pytorch|`` elementwise.
        float64_check: when the rule fails, judge the error against PyTorch's own float32
            rounding error measured with a float64 run (ill-conditioned outputs).
        float64_factor: how many times PyTorch's float32 error onnxruntime may be off float64.
    """

    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    float64_check: bool = True
    float64_factor: float = DEFAULT_FLOAT64_FACTOR

    def __post_init__(self) -> None:
        for name in ("atol", "rtol", "float64_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be finite and >= 0, got {value!r}")
        if self.atol == 0 and self.rtol == 0:
            raise ConfigError("atol and rtol are both 0: give at least one a positive value")

    def loosened(self, atol: float, rtol: float) -> Tolerance:
        """The looser of this tolerance and ``(atol, rtol)`` (low-precision DIA weights)."""
        return Tolerance(max(self.atol, atol), max(self.rtol, rtol), self.float64_check,
                         self.float64_factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_tuple(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    try:
        return tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"expected a regex or a list of regexes, got {value!r}") from None


def resolve_dia(dia: bool | DIA | None) -> DIA | None:
    """``True`` -> defaults, ``False``/``None`` -> disabled, a DIA object -> itself."""
    return _resolve(dia, DIA, "dia")


def resolve_ssia(ssia: bool | SSIA | None) -> SSIA | None:
    return _resolve(ssia, SSIA, "ssia")


def _resolve(value: object, kind: type, name: str) -> Any:
    if value is True:
        return kind()
    if value is False or value is None:
        return None
    if isinstance(value, kind):
        return value
    if isinstance(value, dict):
        known = [f.name for f in fields(kind)]
        unknown = sorted(str(key) for key in value if key not in known)
        if unknown:
            raise ConfigError(
                f"unknown {name} option(s) {', '.join(map(repr, unknown))}; "
                f"fxattn.{kind.__name__} takes {', '.join(known)}"
            )
        return kind(**value)
    raise ConfigError(
        f"{name} must be True, False, a dict of options or fxattn.{kind.__name__}(...), "
        f"got {type(value).__name__}"
    )
