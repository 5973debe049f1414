"""Which of a model's outputs an export keeps.

A Hugging Face language model returns a ``ModelOutput``. With the cache off and no labels a
causal LM's holds only ``logits``, but an encoder-decoder's also holds the encoder's last hidden
state (kept for generation, which reuses it), and any model configured with
``output_hidden_states`` returns every layer's states. A deployed model wants the logits, so by
default (``outputs="auto"``) an export of a model whose output is a mapping (a ``ModelOutput``
or a dict) with a ``logits`` entry beside other tensors keeps ``logits`` alone and says what it
left out. ``outputs=None`` keeps every output; a sequence of names keeps those, in that order::

    fxattn.export_onnx(net, "t5.onnx", {"input_ids": ids, "decoder_input_ids": ids})
    # -> one ONNX output, "logits"
    fxattn.export_onnx(net, "t5.onnx", inputs, outputs=["logits", "encoder_last_hidden_state"])

The ONNX outputs are then named after the entries they hold.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..errors import ConfigError

AUTO = "auto"
#: the entry a deployed model is asked for when its output holds several
PREDICTION = "logits"


class SelectedOutputs(nn.Module):
    """Calls ``inner`` and returns the entries ``names`` of its mapping output (one tensor
    for one name, else a tuple in the order given). Its ``forward`` has ``inner``'s signature,
    so that exporters bind keyword inputs and dynamic shapes as they would for ``inner``."""

    def __init__(self, inner: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.inner = inner
        self.names = tuple(names)
        self.train(inner.training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.select(self.inner(*args, **kwargs))

    def select(self, result: Any) -> Any:
        """The chosen entries of one of ``inner``'s outputs."""
        picked = tuple(result[name] for name in self.names)
        return picked[0] if len(picked) == 1 else picked


def _entries(result: Any) -> dict[str, Any] | None:
    """The non-``None`` entries of a mapping output (a ``ModelOutput`` drops ``None`` ones
    itself), or ``None`` when the output is not a mapping with string keys."""
    if not isinstance(result, Mapping) or not all(isinstance(k, str) for k in result):
        return None
    return {k: v for k, v in result.items() if v is not None}


def select_outputs(module: nn.Module, result: Any, outputs: str | Sequence[str] | None,
                   ) -> tuple[nn.Module, list[str]]:
    """``module`` wrapped to return only the chosen entries of its output ``result`` (one run
    on the example inputs), and notes for the export report; ``module`` itself when every output
    is kept."""
    if outputs is None:
        return module, []
    entries = _entries(result)
    if isinstance(outputs, str) and outputs == AUTO:
        if entries is None or PREDICTION not in entries or len(entries) == 1:
            return module, []
        names: Sequence[str] = (PREDICTION,)
        dropped = [k for k in entries if k != PREDICTION]
        notes = [f"exported {PREDICTION!r} only, the prediction of its "
                 f"{type(result).__name__}; left out {', '.join(map(repr, dropped))} "
                 "(outputs=None keeps every output, outputs=[names] chooses)"]
    else:
        names = [outputs] if isinstance(outputs, str) else list(outputs)
        if entries is None:
            raise ConfigError(
                f"outputs={list(names)} names entries of a mapping output, but "
                f"{type(module).__name__} returns {type(result).__name__}; leave outputs at "
                "its default")
        unknown = [n for n in names if n not in entries]
        if not names or unknown or len(set(names)) != len(names):
            raise ConfigError(
                f"outputs={list(names)}: choose distinct names among the outputs "
                f"{', '.join(map(repr, entries))}" + (f" (not {unknown})" if unknown else ""))
        notes = [f"exported the outputs {', '.join(map(repr, names))}"]
    wrapper = SelectedOutputs(module, names)
    _give_signature(wrapper, module)
    return wrapper, notes


def match_outputs(module: nn.Module, result: Any,
                  names: Sequence[str]) -> nn.Module | SelectedOutputs:
    """``module`` returning only the entries an ONNX file's outputs are named after (a file
    exported with some entries of a mapping output), so that a verification compares like with
    like; ``module`` itself when the file holds every output or its names are the exporter's."""
    entries = _entries(result)
    if entries is None or list(names) == list(entries) or not set(names) <= set(entries):
        return module
    wrapper = SelectedOutputs(module, names)
    _give_signature(wrapper, module)
    return wrapper


def _give_signature(wrapper: SelectedOutputs, inner: nn.Module) -> None:
    """Give ``wrapper.forward`` the signature of ``inner.forward`` (a class of its own, since a
    bound method's signature is its function's)."""
    try:
        signature = inspect.signature(inner.forward)
    except (TypeError, ValueError):
        return
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)

    def forward(self: SelectedOutputs, *args: Any, **kwargs: Any) -> Any:
        return SelectedOutputs.forward(self, *args, **kwargs)

    forward.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[self_param, *signature.parameters.values()])
    wrapper.__class__ = type("SelectedOutputs", (SelectedOutputs,), {"forward": forward})


def output_names(module: nn.Module) -> list[str] | None:
    """The ONNX output names of a module made by :func:`select_outputs` (``None``: the
    exporter's own)."""
    return list(module.names) if isinstance(module, SelectedOutputs) else None

