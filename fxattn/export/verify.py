"""Verification: does onnxruntime compute what PyTorch computes?

The rule is fxattn's one rule for two computations of the same model
(:mod:`fxattn.export.agreement`); here the candidate is onnxruntime, the reference PyTorch, and
the exact evaluation of the ``float64`` step PyTorch in float64 (:func:`float64_call`).

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
from .agreement import Judgement, WorstElement, element_ratios, judge, judge_conditioned
from .outputs import match_outputs
from .runtime import ort_feed, ort_session


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
    float64_worst: WorstElement | None = None  # the worst element under the float64 rule
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


_NARROW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class Float64Everywhere(TorchDispatchMode):
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

    def __enter__(self) -> Float64Everywhere:
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
    itself is untouched. Call it under :class:`Float64Everywhere` with float64 inputs.
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


def tensor_outputs(result: Any) -> list[np.ndarray]:
    """The tensors of a forward's result (nested in tuples, lists, dicts), as numpy arrays."""
    tensors = [t for t in tree_leaves(result) if isinstance(t, torch.Tensor)]
    return [(t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach())
            .cpu().numpy() for t in tensors]


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
    runs: list[tuple[ExampleInputs, list[np.ndarray], list[np.ndarray], Judgement]] = []
    for batch in batch_sizes:
        batch_inputs = inputs.with_batch(batch, generator)
        with torch.no_grad():
            result = batch_inputs.call(module)
        if not runs:  # a file with some entries of a mapping output: compare those
            matched = match_outputs(module, result, names)
            if matched is not module:
                module, result = matched, matched.select(result)
        expected = tensor_outputs(result)
        try:
            actual = session.run(None, ort_feed(session, batch_inputs))
        except Exception as exc:  # noqa: BLE001 - onnxruntime's own failure, in one line
            raise VerificationError(
                f"onnxruntime cannot run the exported model at batch {batch}: "
                f"{first_line(exc)} (often a size the exporter fixed at the example's batch); "
                "try the other exporter (exporter='dynamo' or 'torchscript')"
            ) from exc
        runs.append((batch_inputs, actual, expected, judge(batch, actual, expected, names, tol)))
    worst = max((run[3] for run in runs), key=lambda c: c.margin)
    report = VerificationReport(
        batch_sizes=tuple(batch_sizes), tolerance=tol, passed=worst.margin <= 1.0,
        rule="allclose", max_abs_error=max(run[3].max_abs for run in runs),
        max_rel_error=max(run[3].max_rel for run in runs), margin=worst.margin,
        worst=worst.allclose_worst,
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
            again = tensor_outputs(batch_inputs.call(module))
        repeat = judge(comparison.batch, again, expected, names, tol, ("PyTorch", "PyTorch"))
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
    """Judge failing batches by the ``float64`` step of :mod:`fxattn.export.agreement`."""
    double = float64_call(module)
    worst: Judgement | None = None
    noise_max = 0.0
    for batch_inputs, actual, expected, comparison in runs:
        if comparison.ratio <= 1.0:
            continue
        try:
            reference = float64_outputs(double, batch_inputs)
        except Exception as exc:  # noqa: BLE001 - float64 unsupported by one of its ops
            report.notes.append(f"no float64 check: the module fails in float64 ({exc})")
            return
        judge_conditioned(comparison, actual, expected, names, tol, exact=reference)
        noise_max = max(noise_max, comparison.noise or 0.0)
        if worst is None or comparison.ratio > worst.ratio:
            worst = comparison
    if worst is None:
        return
    report.float64_margin, report.float64_noise = worst.ratio, noise_max
    if worst.passed:
        report.passed, report.rule = True, "float64"
    else:
        report.float64_worst = worst.worst


def float64_outputs(double: Any, inputs: ExampleInputs) -> list[np.ndarray]:
    """The tensor outputs of ``double`` (:func:`float64_call`) on float64 copies of
    ``inputs``, every float op widened to float64."""
    with torch.no_grad(), Float64Everywhere():
        return tensor_outputs(double(*_as_float64(inputs.args), **_as_float64(inputs.kwargs)))


def _failure_message(report: VerificationReport) -> str:
    tol = report.tolerance
    worst = report.worst
    text = (f"onnxruntime and PyTorch disagree: {worst.describe() if worst else 'an output'}; "
            f"that is {report.margin:.3g} times atol + rtol*|ref| (atol {tol.atol:g}, "
            f"rtol {tol.rtol:g})")
    if report.float64_noise is not None:
        if report.float64_worst is not None:
            text += f"; by the float64 rule the worst is {report.float64_worst.describe()}"
        text += (f"; against a float64 run it is still {report.float64_margin:.3g} times "
                 f"what the float64 rule allows (PyTorch's own float32 error "
                 f"{report.float64_noise:.2e}, times {tol.float64_factor:g}), so this is not "
                 "rounding")
    return text + (
        ". Look for an op that onnxruntime computes differently (run the export's ops one by "
        "one, or try exporter='torchscript'); if the model is known to be this sensitive, "
        "loosen rtol/atol (export_onnx(..., rtol=...), --rtol/--atol on the command line)"
    )


__all__ = ["DEFAULT_ATOL", "DEFAULT_FLOAT64_FACTOR", "DEFAULT_RTOL", "Float64Everywhere",
           "Tolerance", "VerificationReport", "WorstElement", "element_ratios", "float64_call",
           "float64_outputs", "tensor_outputs", "verify_onnx"]
