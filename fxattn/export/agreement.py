"""One rule for whether two computations of the same model agree.

Wherever fxattn replaces one computation of a model by another - the export (onnxruntime for
PyTorch), the compile (the compiled file for the portable one), low-precision DIA weights, a
detector's transformed parts - the replacement (the *candidate*) is judged against the
computation it replaces (the *reference*) output element by output element, in two steps:

``allclose``
    ``|candidate - reference| <= atol + rtol * |reference|`` (the rule of ``numpy.allclose``
    and ``torch.testing.assert_close``). Most models pass here.
``float64`` / ``spread`` (conditioning-aware; when ``allclose`` fails somewhere and the
tolerance's ``float64_check`` is on)
    The reference is a float32 computation too. An element that is the near-cancellation of
    large terms (a logit near 0 in a model whose logits are ~1e3) carries a rounding error of
    the size of those terms in *any* float32 evaluation, so the candidate is asked only to be no
    worse than ``factor`` times the reference's own rounding error ``noise`` (the largest over
    that output):

    * ``float64``, with an exact evaluation at hand (PyTorch in float64,
      :func:`fxattn.export.verify.float64_call`)::

          noise = max |reference - exact|
          |candidate - exact| <= atol + rtol * |exact| + factor * noise

    * ``spread``, without one: the reference evaluated a second time in another reduction order
      (the portable file run without onnxruntime's graph optimisations, say) measures its
      rounding noise::

          noise = max |reference - second|
          |candidate - reference| <= atol + rtol * |reference| + factor * noise

A genuine mismatch (one weight off by a relative 1e-3, a dropped multiply) sits orders of
magnitude above float32 rounding error and fails both steps; the worst element is named in the
:class:`WorstElement` of the step that decided. The factor
(:data:`fxattn.config.DEFAULT_FLOAT64_FACTOR`, 16) is onnxruntime's measured worst rounding
relative to PyTorch's own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..config import Tolerance
from ..errors import VerificationError

#: the rules, in the order they are tried (the report's ``rule`` names the one that decided)
RULES = ("allclose", "float64", "spread")


def element_ratios(got: np.ndarray, want: np.ndarray, atol: float, rtol: float,
                   extra: float = 0.0) -> np.ndarray:
    """``|got - want| / (atol + rtol |want| + extra)`` elementwise; NaN/inf handled exactly.

    The verification rule's own measure: an element passes when its ratio is at most 1
    (benchmarks use it to say how far a perturbation moves an output in the rule's units).
    """
    if want.dtype.kind not in "fc":  # integers and booleans: exact
        return np.where(got == want, 0.0, np.inf)
    a, w = got.astype(np.float64), want.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(a - w)
        ratio = diff / (atol + rtol * np.abs(w) + extra)
    same = (a == w) | (np.isnan(a) & np.isnan(w))  # equal infinities, NaN where both are NaN
    ratio = np.where(same, 0.0, ratio)
    return np.where(np.isnan(ratio), np.inf, ratio)


@dataclass(frozen=True)
class WorstElement:
    """The element whose error is largest against what the rule allows it.

    ``onnxruntime`` is the candidate's value, ``pytorch`` the reference's (the names of the
    export's comparison; ``labels`` says what they were in another one, e.g. the compiled and
    the portable file), ``exact`` the float64 value where the ``float64`` rule judged it.
    """

    output: int  # index among the model's tensor outputs
    name: str  # the ONNX output's name
    batch: int
    index: tuple[int, ...]
    onnxruntime: float
    pytorch: float
    abs_error: float  # |onnxruntime - pytorch| (- exact, where the float64 rule judged)
    rel_error: float  # abs_error / |pytorch| (|exact|; inf where it is 0)
    ratio: float  # abs_error / what the rule allows (atol + rtol * |pytorch|): <= 1 passes
    labels: tuple[str, str] = ("onnxruntime", "PyTorch")
    exact: float | None = None  # the float64 reference, when the float64 rule judged it

    def describe(self) -> str:
        where = f"output {self.output} ({self.name}) at batch {self.batch}, element {self.index}"
        exact, against = "", ""
        if self.exact is not None:
            exact, against = f", float64 {self.exact:.7g}", " against float64"
        return (f"{where}: {self.labels[0]} {self.onnxruntime:.7g} vs {self.labels[1]} "
                f"{self.pytorch:.7g}{exact}, abs error{against} {self.abs_error:.3e}, relative "
                f"{self.rel_error:.3e}")


@dataclass
class Judgement:
    """One batch of outputs judged: the rule that decided and the worst element under it."""

    batch: int
    rule: str  # "allclose", then "float64" or "spread" where that judged (see RULES)
    passed: bool
    ratio: float  # the worst element's ratio under ``rule``: <= 1 passes
    worst: WorstElement | None
    margin: float  # worst ratio under allclose
    allclose_worst: WorstElement | None
    max_abs: float  # largest |candidate - reference| over the outputs
    max_rel: float  # max_abs / the output's largest magnitude
    noise: float | None = None  # the reference's own rounding error, where it was measured


def judge(batch: int, candidate: Sequence[np.ndarray], reference: Sequence[np.ndarray],
          names: Sequence[str], tol: Tolerance,
          labels: tuple[str, str] = ("onnxruntime", "PyTorch")) -> Judgement:
    """The ``allclose`` step: every output of ``candidate`` against ``reference``.

    Raises :class:`~fxattn.VerificationError` where the outputs differ in number or shape.
    """
    if len(candidate) != len(reference):
        raise VerificationError(
            f"{labels[0]} returned {len(candidate)} outputs, {labels[1]} {len(reference)}; "
            "the export dropped or added an output")
    result = Judgement(batch, "allclose", True, 0.0, None, 0.0, None, 0.0, 0.0)
    for i, (got, want) in enumerate(zip(candidate, reference, strict=True)):
        if got.shape != want.shape:
            raise VerificationError(
                f"output {i} ({names[i]}) at batch {batch}: {labels[0]} shape {got.shape}, "
                f"{labels[1]} {want.shape}; check the dynamic batch dimension of the export")
        if want.size == 0:
            continue
        if want.dtype.kind in "fc":
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            finite = diff[np.isfinite(diff)]
            max_abs = float(finite.max()) if finite.size else 0.0
            scale = float(np.nanmax(np.abs(want))) if np.isfinite(want).any() else 0.0
            result.max_abs = max(result.max_abs, max_abs)
            result.max_rel = max(result.max_rel, max_abs / scale if scale > 0 else max_abs)
        _keep_worst(result, i, names[i], got, want, element_ratios(got, want, tol.atol,
                                                                   tol.rtol), labels)
    result.margin, result.allclose_worst = result.ratio, result.worst
    result.passed = result.ratio <= 1.0
    return result


def judge_conditioned(result: Judgement, candidate: Sequence[np.ndarray],
                      reference: Sequence[np.ndarray], names: Sequence[str], tol: Tolerance, *,
                      exact: Sequence[np.ndarray] | None = None,
                      second: Sequence[np.ndarray] | None = None) -> Judgement:
    """The conditioning-aware step, after :func:`judge` failed ``result``: against ``exact``
    (the ``float64`` rule) or, without it, within the spread of ``reference`` and ``second``
    (the ``spread`` rule); see the module docstring. Updates and returns ``result``."""
    other = exact if exact is not None else second
    if other is None:
        raise ValueError("judge_conditioned needs exact or second")
    labels = result.allclose_worst.labels if result.allclose_worst else ("onnxruntime",
                                                                        "PyTorch")
    result.rule = "float64" if exact is not None else "spread"
    result.ratio, result.worst, result.noise = 0.0, None, 0.0
    for i, (got, want, other_i) in enumerate(zip(candidate, reference, other, strict=True)):
        if want.size == 0:
            continue
        if want.dtype.kind not in "fc":
            ratio = element_ratios(got, want, tol.atol, tol.rtol)
            _keep_worst(result, i, names[i], got, want, ratio, labels)
            continue
        gap = np.abs(want.astype(np.float64) - np.asarray(other_i, np.float64))
        noise = float(np.nanmax(gap)) if np.isfinite(gap).any() else 0.0
        result.noise = max(result.noise, noise)
        anchor = np.asarray(other_i) if exact is not None else want
        ratio = element_ratios(got, anchor, tol.atol, tol.rtol, tol.float64_factor * noise)
        _keep_worst(result, i, names[i], got, want, ratio, labels,
                    anchor if exact is not None else None)
    result.passed = result.ratio <= 1.0
    return result


def _keep_worst(result: Judgement, output: int, name: str, got: np.ndarray, want: np.ndarray,
                ratio: np.ndarray, labels: tuple[str, str],
                exact: np.ndarray | None = None) -> None:
    """Make the element of largest ``ratio`` the result's worst when it beats the one kept."""
    flat = int(np.argmax(ratio))
    if ratio.flat[flat] < result.ratio and result.worst is not None:
        return
    index = tuple(int(k) for k in np.unravel_index(flat, ratio.shape))
    o, p = float(got[index]), float(want[index])
    e = float(exact[index]) if exact is not None else None
    base = p if e is None else e  # the error is against what the rule compared with
    abs_error = abs(o - base) if math.isfinite(o - base) else math.inf
    result.ratio = float(ratio.flat[flat])
    result.worst = WorstElement(
        output=output, name=name, batch=result.batch, index=index, onnxruntime=o, pytorch=p,
        abs_error=abs_error, rel_error=abs_error / abs(base) if base else math.inf,
        ratio=result.ratio, labels=labels, exact=e)


def describe_rule(rule: str, tol: Tolerance, noise: float | None = None) -> str:
    """What ``rule`` allows, in one phrase (for reports and errors)."""
    base = f"|err| <= atol + rtol*|ref| (atol {tol.atol:g}, rtol {tol.rtol:g})"
    if rule == "allclose":
        return base
    against = "a float64 run" if rule == "float64" else "its own rounding spread"
    return (f"{base} + {tol.float64_factor:g} x the reference's own float32 error "
            f"{noise or 0.0:.2e}, measured against {against}")


__all__ = ["RULES", "Judgement", "WorstElement", "describe_rule", "element_ratios", "judge",
           "judge_conditioned"]
