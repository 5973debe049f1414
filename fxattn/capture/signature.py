"""How the capture calls ``forward()``: the arguments it fixes, and what a graph cannot return.

A captured graph follows one path through the model's ``forward``; the arguments the example
leaves out decide which. Two kinds are fixed for the capture:

- *unused optional arguments* (``mask=None``, ``return_dict=None``,
  ``output_attentions=False``) stay at their defaults (:func:`with_unused_defaults`), so the
  symbolic trace takes the branch the example takes instead of one that needs an input
  nobody passes;
- *the key/value cache* (:data:`CAPTURE_DEFAULTS`): a Hugging Face language model loaded
  with ``from_pretrained`` / ``from_config`` has ``config.use_cache=True`` and returns a
  ``DynamicCache`` object, which no graph can carry. A training graph never needs that
  cache, so when ``forward`` takes ``use_cache`` and neither the example nor
  ``concrete_args`` sets it, the model is captured with ``use_cache=False``
  (:func:`capture_defaults`; ``concrete_args`` for ``torch.fx``, the bound call of
  :func:`bound_forward` for ``torch.export``). The plan records it
  (``plan.fixed_arguments`` and a note); the transformed model accepts ``use_cache``
  left out, ``None`` or ``False``, and refuses ``use_cache=True`` with
  :func:`describe_fixed_mismatch`'s message. No config is edited.

When a capture still fails because ``forward`` returns an object of a type that is neither a
tensor nor a container of tensors (a cache class, a custom result class),
:func:`describe_output_type` names that type and the option that fixes it.

Example::

    >>> import torch, transformers
    >>> from fxattn.capture import ExampleInputs, TraceOptions
    >>> from fxattn.capture.signature import capture_defaults
    >>> model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16,
    ...                                                               n_head=2))
    >>> inputs = ExampleInputs.from_user({"input_ids": torch.randint(0, 100, (2, 8))})
    >>> capture_defaults(model, inputs, TraceOptions())
    {'use_cache': False}
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from collections.abc import Iterator, Mapping
from typing import Any

from torch import nn

from .inputs import ExampleInputs
from .tracer import TraceOptions

#: forward() arguments the capture fixes when the example leaves them out, and why.
CAPTURE_DEFAULTS: dict[str, tuple[Any, str]] = {
    "use_cache": (False, "a training graph never needs a key/value cache"),
}


def _supplied(model: nn.Module, inputs: ExampleInputs) -> tuple[Any, set[str]] | None:
    """``forward``'s signature and the argument names the example supplies (``None``: a
    forward whose signature cannot be read or bound)."""
    try:
        signature = inspect.signature(model.forward)
        supplied = signature.bind_partial(*inputs.args, **inputs.kwargs).arguments
    except (TypeError, ValueError):
        return None
    return signature, set(supplied)


def capture_defaults(
    model: nn.Module, inputs: ExampleInputs, options: TraceOptions
) -> dict[str, Any]:
    """The :data:`CAPTURE_DEFAULTS` that apply: ``forward`` names the argument, and neither
    the example nor the user's ``concrete_args`` sets it."""
    found = _supplied(model, inputs)
    if found is None:
        return {}
    signature, supplied = found
    user = set(options.concrete_args or {})
    return {
        name: value
        for name, (value, _) in CAPTURE_DEFAULTS.items()
        if name in signature.parameters and name not in supplied and name not in user
        and signature.parameters[name].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                inspect.Parameter.KEYWORD_ONLY)
    }


def capture_note(fixed: Mapping[str, Any]) -> str:
    """The plan's note for the arguments :func:`capture_defaults` fixed."""
    parts = [f"{name}={value!r} ({CAPTURE_DEFAULTS[name][1]})" for name, value in fixed.items()
             if name in CAPTURE_DEFAULTS]
    return (
        f"captured with {', '.join(parts)}: forward() takes it and the example inputs leave "
        "it out. The transformed model accepts it left out, None or that value and refuses "
        "any other; its outputs hold no cache (past_key_values is None)"
    )


def with_unused_defaults(
    model: nn.Module, inputs: ExampleInputs, options: TraceOptions,
    fixed: Mapping[str, Any] | None = None,
) -> TraceOptions:
    """``options`` with ``concrete_args`` fixing ``forward`` arguments the example leaves at a
    ``None`` / bool default, plus the ``fixed`` capture defaults.

    Optional inputs (``mask=None``, ``return_dict=None``, ``output_attentions=False``) guard
    ``if mask is not None:`` branches; traced as proxies, the branch would be taken and the
    graph would need a mask nobody passes (Hiera). Fixed at their defaults, as the model is
    actually called, they trace the path the example runs. ``concrete_args`` given by the user
    win; the graph still accepts the argument and checks it has the traced value.
    """
    found = _supplied(model, inputs)
    if found is None:
        return options
    signature, supplied = found
    concrete = {
        name: parameter.default
        for name, parameter in signature.parameters.items()
        if name not in supplied
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        and (parameter.default is None or isinstance(parameter.default, bool))
    }
    concrete.update(fixed or {})
    concrete.update(options.concrete_args or {})
    if not concrete:
        return options
    return dataclasses.replace(options, concrete_args=concrete)


@contextlib.contextmanager
def bound_forward(model: nn.Module, fixed: Mapping[str, Any]) -> Iterator[None]:
    """Within the block, ``model(...)`` runs ``forward(..., **fixed)``.

    For ``torch.export``, which captures what a call of the module does: the fixed keywords
    are bound into the call (an instance attribute ``forward``, removed afterwards), so they
    are neither inputs nor outputs of the graph. ``torch.fx`` reads the class's ``forward``
    and gets them as ``concrete_args`` instead (:func:`with_unused_defaults`).
    """
    if not fixed:
        yield
        return
    had = "forward" in vars(model)
    previous = vars(model).get("forward")
    model.forward = functools.partial(model.forward, **fixed)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had:
            model.forward = previous  # type: ignore[method-assign]
        else:
            del model.forward


def describe_fixed_mismatch(module_name: str, name: str, fixed: Any, given: Any) -> str:
    """Why a transformed model refuses ``name=given`` (it was captured with ``fixed``)."""
    reason = CAPTURE_DEFAULTS.get(name, (None, "the example inputs left it out"))[1]
    extra = ""
    if name == "use_cache":
        extra = (
            ". It returns no key/value cache: cached generation (model.generate) is not what "
            "fxattn's captured graphs serve; for inference, export the lean logits graph with "
            "fxattn.export_onnx"
        )
    return (
        f"{module_name} was captured with {name}={fixed!r} ({reason}; see net.plan.notes) "
        f"and cannot run with {name}={given!r}; leave {name} out or pass {fixed!r}{extra}"
    )


_OUTPUT_TYPE = re.compile(r"Found <class '([^']+)'> in output")


def describe_output_type(
    model: nn.Module, inputs: ExampleInputs, export_error: BaseException
) -> str | None:
    """The cause and the fix, when ``torch.export`` failed on an output type it cannot carry
    (``None`` for any other failure)."""
    match = _OUTPUT_TYPE.search(str(export_error))
    if match is None:
        return None
    qualified = match.group(1)
    name = type(model).__name__
    cause = (
        f"{name}.forward() returns a {qualified}, which a captured graph cannot carry (graphs "
        "return tensors, and tuples, lists, dicts and dataclasses of them)"
    )
    if "cache" in qualified.rsplit(".", 1)[-1].lower():
        found = _supplied(model, inputs)
        takes = found is not None and "use_cache" in found[0].parameters
        given = inputs.kwargs.get("use_cache")
        if takes and given:
            fix = (
                f"it is the key/value cache: the example inputs set use_cache={given!r}; "
                "leave use_cache out of them (fxattn then captures with the cache off) or pass "
                "use_cache=False"
            )
        elif takes:
            fix = ("it is the key/value cache: pass use_cache=False in the example inputs or "
                   "concrete_args={'use_cache': False}")
        else:
            fix = (
                "it is the key/value cache, and forward() takes no use_cache argument: fix the "
                "argument that turns it on with concrete_args={...}, or switch the cache off "
                "where the model reads it (e.g. config.use_cache = False)"
            )
    else:
        fix = (
            "return tensors (or containers of them), register the type with "
            "torch.utils._pytree.register_pytree_node, or fix the forward() argument that "
            "makes it return one with concrete_args={...}"
        )
    return f"{cause}; {fix}"
