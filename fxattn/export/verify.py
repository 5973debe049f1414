"""Verification: does onnxruntime compute what PyTorch computes?

The ONNX model and the PyTorch module run on the same fresh inputs at two batch sizes, and every
output element must satisfy the rule of ``torch.testing.assert_close`` and ``numpy.allclose``::

    |onnxruntime - pytorch| <= atol + rtol * |pytorch|          (elementwise)

An absolute bound alone cannot judge models whose outputs are not of order 1: float32 reordering
error grows with the magnitude of the values, so a fixed ``atol`` rejects a detector whose boxes
are in pixels and accepts a genuinely wrong model whose outputs are ~1e-3. The defaults
(:data:`DEFAULT_ATOL`, :data:`DEFAULT_RTOL`) come from the errors measured across the model zoo
(``benchmarks/results/zoo.md`` shows the distribution of the worst ratio
``|err| / (atol + rtol * |ref|)`` per model) and from the smallest genuine mismatch the tests
must catch: one ONNX weight scaled by ``1 + 1e-3``.

**Ill-conditioned outputs.** An element that is a near-cancellation of large terms (a logit
near 0 in a model whose logits are ~1e3; random-weight MobileOne, whose branch sums reach 1e5)
carries a rounding error of the size of those terms, in PyTorch's own float32 as much as in
onnxruntime's. The elementwise rule cannot tell that from a mismatch, so when it fails (and
``float64_check`` is on, the default) the module is run once more in float64: PyTorch's own
float32 error ``noise = max |torch32 - torch64|`` measures how ill-conditioned each output is,
and the model passes when every element satisfies::

    |onnxruntime - torch64| <= atol + rtol * |torch64| + float64_factor * noise

A real mismatch (a wrong weight, a wrong op) sits orders of magnitude above PyTorch's own
rounding error and still fails (the tests check both sides). The report then names the rule
that served (``"float64"``).

**Non-determinism.** Before that, PyTorch is run a second time on the same inputs: a forward that
draws fresh random numbers (dropout left on, noise injection) can never match an export, and
the error says so instead of blaming the tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from ..capture import ExampleInputs
from ..config import DEFAULT_ATOL, DEFAULT_FLOAT64_FACTOR, DEFAULT_RTOL, Tolerance
from ..errors import VerificationError, first_line
from .runtime import ort_feed, ort_session


@dataclass(frozen=True)
class WorstElement:
    """The element whose error is largest against what the rule allows it."""

    output: int  # index among the model's tensor outputs
    name: str  # the ONNX output's name
    batch: int
    index: tuple[int, ...]
    onnxruntime: float
    pytorch: float
    abs_error: float
    rel_error: float  # abs_error / |pytorch| (inf where pytorch is 0)
    ratio: float  # abs_error / (atol + rtol * |pytorch|): <= 1 passes

    def describe(self) -> str:
        where = f"output {self.output} ({self.name}) at batch {self.batch}, element {self.index}"
        return (f"{where}: onnxruntime {self.onnxruntime:.7g} vs PyTorch {self.pytorch:.7g}, "
                f"abs error {self.abs_error:.3e}, relative {self.rel_error:.3e}")


@dataclass
class VerificationReport:
    """What :func:`verify_onnx` compared and how close it was."""

    batch_sizes: tuple[int, ...]
    tolerance: Tolerance
    passed: bool
    rule: str  # "allclose" or "float64" (the rule that decided)
    max_abs_error: float
    max_rel_error: float  # max abs error / the output's largest magnitude
    margin: float  # worst |err| / (atol + rtol |ref|): <= 1 passes the elementwise rule
    worst: WorstElement | None
    float64_margin: float | None = None  # worst ratio under the float64 rule, when it ran
    float64_noise: float | None = None  # max |torch32 - torch64| over the outputs, when it ran
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        tol = self.tolerance
        text = (f"max abs error {self.max_abs_error:.2e}, worst |err|/(atol+rtol|ref|) "
                f"{self.margin:.3g} (atol {tol.atol:g}, rtol {tol.rtol:g})")
        if self.rule == "float64":
            text += (f"; ill-conditioned output, passed against float64: PyTorch float32 is "
                     f"{self.float64_noise:.2e} off float64, worst ratio {self.float64_margin:.3g}")
        return text


@dataclass
class _Comparison:
    """One batch size: every output compared, the worst element kept."""

    batch: int
    ratio: float
    worst: WorstElement | None
    max_abs: float
    max_rel: float


_NARROW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class _Float64Everywhere(TorchDispatchMode):
    """Every float dtype an op asks for becomes float64 (and so does the default dtype).

    ``module.double()`` converts parameters and buffers, but a captured graph spells the
    model's casts out: an RMSNorm's ``x.float()`` is ``aten._to_copy(dtype=float32)``, an
    ``arange`` or a ``softmax`` names float32. Without this, such a graph either fails on mixed
    dtypes (no float64 check at all) or computes parts in float32 (a reference that is not one).
    """

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        def widen(value: Any) -> Any:
            return torch.float64 if isinstance(value, torch.dtype) and value in _NARROW_FLOATS \
                else value

        return func(*tree_map(widen, args), **tree_map(widen, kwargs or {}))

    def __enter__(self) -> _Float64Everywhere:
        self._default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.set_default_dtype(self._default)
        super().__exit__(*exc)


def float64_call(module: nn.Module) -> Any:
    """``module``'s forward with float64 copies of its parameters and buffers swapped in.

    Only the float64 tensors are made, no float32 copy of the module on the way (a 2.6 GB
    RegNet-Y-128GF ran out of 24 GB with ``copy.deepcopy(module).double()``); ``module``
    itself is untouched. Call it under :class:`_Float64Everywhere` with float64 inputs.
    """
    state = {name: value.double() if value.is_floating_point() else value
             for name, value in (*module.named_parameters(), *module.named_buffers())}

    def double(*args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(module, state, args, kwargs)

    return double


def _as_float64(value: Any) -> Any:
    return tree_map(
        lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
        value,
    )


def _tensor_outputs(result: Any) -> list[np.ndarray]:
    tensors = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
    return [(t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach())
            .cpu().numpy() for t in tensors]


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


def _compare(batch: int, actual: Sequence[np.ndarray], expected: Sequence[np.ndarray],
             names: Sequence[str], tol: Tolerance) -> _Comparison:
    if len(actual) != len(expected):
        raise VerificationError(
            f"onnxruntime returned {len(actual)} outputs, PyTorch {len(expected)}; the export "
            "dropped or added an output"
        )
    result = _Comparison(batch, 0.0, None, 0.0, 0.0)
    for i, (got, want) in enumerate(zip(actual, expected, strict=True)):
        if got.shape != want.shape:
            raise VerificationError(
                f"output {i} ({names[i]}) at batch {batch}: onnxruntime shape {got.shape}, "
                f"PyTorch {want.shape}; check the dynamic batch dimension of the export"
            )
        if want.size == 0:
            continue
        ratio = element_ratios(got, want, tol.atol, tol.rtol)
        if want.dtype.kind in "fc":
            diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
            finite = diff[np.isfinite(diff)]
            max_abs = float(finite.max()) if finite.size else 0.0
            scale = float(np.nanmax(np.abs(want))) if np.isfinite(want).any() else 0.0
            result.max_abs = max(result.max_abs, max_abs)
            result.max_rel = max(result.max_rel, max_abs / scale if scale > 0 else max_abs)
        flat = int(np.argmax(ratio))
        if ratio.flat[flat] >= result.ratio or result.worst is None:
            index = tuple(int(k) for k in np.unravel_index(flat, ratio.shape))
            o, p = float(got[index]), float(want[index])
            abs_error = abs(o - p) if math.isfinite(o - p) else math.inf
            result.ratio = float(ratio.flat[flat])
            result.worst = WorstElement(
                output=i, name=names[i], batch=batch, index=index, onnxruntime=o, pytorch=p,
                abs_error=abs_error, rel_error=abs_error / abs(p) if p else math.inf,
                ratio=result.ratio,
            )
    return result


def verify_onnx(
    path: str,
    module: nn.Module,
    inputs: ExampleInputs,
    batch_sizes: tuple[int, ...] = (2, 3),
    tolerance: Tolerance | None = None,
    seed: int = 0,
    *,
    raise_on_failure: bool = True,
) -> VerificationReport:
    """Compare the ONNX model at ``path`` with ``module`` at each batch size.

    Raises :class:`~fxattn.VerificationError` naming the worst element (output, batch,
    index, both values, absolute and relative error) and what to do, unless
    ``raise_on_failure=False``, which returns the failing report instead (benchmarks record
    margins that way).
    """
    tol = tolerance or Tolerance()
    try:
        session = ort_session(path)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
        raise VerificationError(
            f"onnxruntime cannot load the exported model: {first_line(exc)}"
        ) from exc
    names = [o.name for o in session.get_outputs()]
    generator = torch.Generator().manual_seed(seed)
    runs: list[tuple[ExampleInputs, list[np.ndarray], list[np.ndarray], _Comparison]] = []
    for batch in batch_sizes:
        batch_inputs = inputs.with_batch(batch, generator)
        with torch.no_grad():
            expected = _tensor_outputs(batch_inputs.call(module))
        actual = session.run(None, ort_feed(session, batch_inputs))
        runs.append((batch_inputs, actual, expected, _compare(batch, actual, expected, names, tol)))
    worst = max((run[3] for run in runs), key=lambda c: c.ratio)
    report = VerificationReport(
        batch_sizes=tuple(batch_sizes), tolerance=tol, passed=worst.ratio <= 1.0,
        rule="allclose", max_abs_error=max(run[3].max_abs for run in runs),
        max_rel_error=max(run[3].max_rel for run in runs), margin=worst.ratio,
        worst=worst.worst,
    )
    if report.passed:
        return report
    _check_deterministic(module, runs, names, tol)
    if tol.float64_check:
        _float64_rule(module, runs, names, tol, report)
    if report.passed or not raise_on_failure:
        return report
    raise VerificationError(_failure_message(report))


def _check_deterministic(module: nn.Module, runs: list[Any], names: Sequence[str],
                         tol: Tolerance) -> None:
    """Fail clearly when PyTorch does not even agree with itself on the same inputs."""
    for batch_inputs, _, expected, comparison in runs:
        if comparison.ratio <= 1.0:
            continue
        with torch.no_grad():
            again = _tensor_outputs(batch_inputs.call(module))
        repeat = _compare(comparison.batch, again, expected, names, tol)
        if repeat.ratio > 1.0:
            raise VerificationError(
                f"PyTorch itself returns different values for the same inputs "
                f"({repeat.worst.describe() if repeat.worst else 'an output'} between two "
                "runs): the forward draws random numbers (dropout or noise left on in eval "
                "mode, a random augmentation) or is otherwise non-deterministic; make the "
                "exported forward deterministic before verifying, or pass verify=False"
            )


def _float64_rule(module: nn.Module, runs: list[Any], names: Sequence[str], tol: Tolerance,
                  report: VerificationReport) -> None:
    """Judge failing batches against a float64 run of the module (see the module docstring)."""
    double = float64_call(module)
    worst_ratio, noise_max = 0.0, 0.0
    for batch_inputs, actual, expected, comparison in runs:
        if comparison.ratio <= 1.0:
            continue
        try:
            with torch.no_grad(), _Float64Everywhere():
                reference = _tensor_outputs(
                    double(*_as_float64(batch_inputs.args), **_as_float64(batch_inputs.kwargs))
                )
        except Exception as exc:  # noqa: BLE001 - float64 unsupported by one of its ops
            report.notes.append(f"no float64 check: the module fails in float64 ({exc})")
            return
        for got, want32, want64 in zip(actual, expected, reference, strict=True):
            if want32.dtype.kind not in "fc" or want32.size == 0:
                ratio = element_ratios(got, want32, tol.atol, tol.rtol)
            else:
                gap = np.abs(want32.astype(np.float64) - want64.astype(np.float64))
                noise = float(np.nanmax(gap)) if np.isfinite(gap).any() else 0.0
                noise_max = max(noise_max, noise)
                ratio = element_ratios(got, want64, tol.atol, tol.rtol, tol.float64_factor * noise)
            worst_ratio = max(worst_ratio, float(ratio.max()) if ratio.size else 0.0)
    report.float64_margin, report.float64_noise = worst_ratio, noise_max
    if worst_ratio <= 1.0:
        report.passed, report.rule = True, "float64"


def _failure_message(report: VerificationReport) -> str:
    tol = report.tolerance
    worst = report.worst
    text = (f"onnxruntime and PyTorch disagree: {worst.describe() if worst else 'an output'}; "
            f"that is {report.margin:.3g} times atol + rtol*|ref| (atol {tol.atol:g}, "
            f"rtol {tol.rtol:g})")
    if report.float64_noise is not None:
        text += (f"; against a float64 run it is still {report.float64_margin:.3g} times "
                 f"what the float64 rule allows (PyTorch's own float32 error "
                 f"{report.float64_noise:.2e}, times {tol.float64_factor:g}), so this is not "
                 "rounding")
    return text + (
        ". Look for an op that onnxruntime computes differently (run the export's ops one by "
        "one, or try exporter='torchscript'); if the model is known to be this sensitive, "
        "loosen rtol/atol (export_onnx(..., rtol=...), --rtol/--atol on the command line)"
    )


__all__ = ["DEFAULT_ATOL", "DEFAULT_FLOAT64_FACTOR", "DEFAULT_RTOL", "Tolerance",
           "VerificationReport", "WorstElement", "element_ratios", "verify_onnx"]
