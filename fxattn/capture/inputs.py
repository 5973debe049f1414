"""Example inputs: what the user passes to show fxattn one real batch, normalised.

Every later step (tracing, shape propagation, verification, ONNX export) needs the model's
inputs in one form and needs to know which dimension is the batch. :class:`ExampleInputs`
holds them as positional ``args`` plus keyword ``kwargs``, from one tensor, a tuple/list or a
dict (``{"input_ids": ids, "attention_mask": mask}``); it checks they agree on one batch size,
makes fresh random inputs of another batch size (:meth:`ExampleInputs.with_batch`, used to
verify that exports keep the batch dynamic) and lines them up with a graph's placeholders.

A *sample list* (:func:`is_sample_list`) is a Python list of per-sample items - CHW images
each of its own size, or detection target dicts - and is a batch of ``len(list)`` on its
own, as torchvision's detectors take ``(images, targets)``.

:func:`check_model_inputs` refuses, before tracing and with the fix in the message, what
would otherwise fail obscurely deep in a kernel: wrapped models (TorchScript,
``torch.compile``, ``DataParallel``), parameters on the meta device, and inputs of another
dtype or device than the parameters.

Example::

    >>> import torch
    >>> from fxattn.capture import ExampleInputs
    >>> inputs = ExampleInputs.from_user({"input_ids": torch.randint(0, 100, (2, 16))})
    >>> inputs.batch_size, inputs.with_batch(3).kwargs["input_ids"].shape
    (2, torch.Size([3, 16]))
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..errors import InputError


def is_sample_list(value: Any) -> bool:
    """A Python ``list`` of per-sample items: CHW images, or target dicts.

    torchvision's detectors take ``images: list[Tensor]`` (each its own size) and
    ``targets: list[dict]``; such a list is a batch of its own, of ``len(list)`` samples.
    A list of 4-D (or larger) tensors is a list of batches (a feature pyramid), not samples.
    """
    if not isinstance(value, list) or not value:
        return False
    images = all(isinstance(v, torch.Tensor) and v.dim() == 3 for v in value)
    return images or all(isinstance(v, Mapping) for v in value)


def _walk_batches(value: Any, tensors: list[torch.Tensor], lists: list[list[Any]]) -> None:
    """Sort a pytree's leaves into batch-major tensors and sample lists (others pass)."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1:
            tensors.append(value)
    elif is_sample_list(value):
        lists.append(value)
    elif isinstance(value, Mapping):
        for item in value.values():
            _walk_batches(item, tensors, lists)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _walk_batches(item, tensors, lists)


def _fresh_tensor(leaf: torch.Tensor, shape: tuple[int, ...],
                  generator: torch.Generator | None) -> torch.Tensor:
    """Random values of ``leaf``'s kind: normal floats, all-true masks, ids below its max.

    An integer tensor of ones only is a mask too (a tokenizer's ``attention_mask`` for an
    unpadded batch) and stays all ones: random zeros in it would mask whole rows of a causal
    attention, whose outputs are then undefined (PyTorch and onnxruntime differ).
    """
    if leaf.is_floating_point():
        return torch.randn(shape, generator=generator, dtype=leaf.dtype).to(leaf.device)
    if leaf.dtype == torch.bool or (leaf.numel() and bool((leaf == 1).all())):
        return torch.ones(shape, dtype=leaf.dtype, device=leaf.device)
    high = int(leaf.max().item()) + 1 if leaf.numel() else 2
    return torch.randint(0, max(high, 1), shape, generator=generator, dtype=leaf.dtype).to(
        leaf.device
    )


@dataclass(frozen=True)
class ExampleInputs:
    """The user's example inputs, normalised to positional ``args`` and keyword ``kwargs``.

    Accepted forms: one tensor, a tuple/list of positional arguments, or a dict of keyword
    arguments (``{"input_ids": ids}``). Each argument is a pytree whose parts are one of:

    - a *batch-major tensor* (dim >= 1): its leading dimension is the batch; all of them
      must agree on it (an image and its mask, ids and attention mask);
    - a *sample list*: a Python ``list`` of tensors (CHW images, each its own size) or of
      dicts (detection targets), nested inside an argument: a batch of ``len(list)`` of its
      own (torchvision's detectors take ``(images, targets)`` this way);
    - anything else (0-d timesteps, ints, flags, ``None``): passed through unchanged.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_user(cls, example_inputs: Any) -> ExampleInputs:
        if isinstance(example_inputs, ExampleInputs):
            return example_inputs
        if example_inputs is None:
            raise InputError(
                "example_inputs is required: pass a tensor shaped like one real batch "
                "(e.g. torch.randn(2, 3, 224, 224)), a tuple of positional inputs, or a dict"
            )
        if isinstance(example_inputs, torch.Tensor):
            inputs = cls((example_inputs,))
        elif isinstance(example_inputs, Mapping):
            inputs = cls((), dict(example_inputs))
        elif isinstance(example_inputs, (tuple, list)):
            inputs = cls(tuple(example_inputs))
        else:
            raise InputError(
                f"example_inputs must be a tensor, a tuple/list or a dict, got "
                f"{type(example_inputs).__name__}"
            )
        inputs.validate()
        return inputs

    def tensors(self) -> list[torch.Tensor]:
        leaves = torch.utils._pytree.tree_leaves((self.args, self.kwargs))
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def batches(self) -> tuple[list[torch.Tensor], list[list[Any]]]:
        """The batch-major tensors and the sample lists (see the class docstring)."""
        tensors: list[torch.Tensor] = []
        lists: list[list[Any]] = []
        for value in (*self.args, *self.kwargs.values()):
            _walk_batches(value, tensors, lists)
        return tensors, lists

    def validate(self) -> None:
        tensors = self.tensors()
        if not tensors:
            raise InputError("example_inputs holds no tensor; pass at least one input tensor")
        batched, lists = self.batches()
        if not batched and not lists:
            raise InputError(
                "example input is a scalar tensor; inputs need a leading batch dimension"
            )
        for tensor in batched:
            if tensor.shape[0] == 0:
                raise InputError(
                    f"example input of shape {tuple(tensor.shape)} has an empty batch; "
                    "use a batch of at least 1 (2 or more lets export check a dynamic batch)"
                )
        if len({t.shape[0] for t in batched}) > 1:
            shapes = ", ".join(str(tuple(t.shape)) for t in batched)
            raise InputError(f"example inputs disagree on the batch size: {shapes}")
        counts = {len(items) for items in lists}
        if len(counts) > 1:
            raise InputError(
                f"example inputs hold lists of {' and '.join(map(str, sorted(counts)))} samples "
                "(e.g. images and their targets); give one entry per sample in each list"
            )

    @property
    def batch_size(self) -> int:
        """The leading size of the batch-major tensors, else the length of the sample lists."""
        batched, lists = self.batches()
        return int(batched[0].shape[0]) if batched else len(lists[0])

    def with_batch(self, batch: int, generator: torch.Generator | None = None) -> ExampleInputs:
        """Fresh random inputs of the same kind with another batch size (for verification).

        Batch-major tensors get ``batch`` rows of random values (normal floats, ids below the
        example's largest; masks - bool, or integers that are all ones - stay all true); a
        sample list gets ``batch``
        entries cycling over the example's (so images keep their sizes, each paired with its
        own target: sample ``i`` is a fresh image shaped like example ``i % len``, with that
        example's target dict); other leaves are kept.
        """

        def fresh(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                if value.dim() == 0:
                    return value
                return _fresh_tensor(value, (batch, *value.shape[1:]), generator)
            if is_sample_list(value):
                cycled = [value[i % len(value)] for i in range(batch)]
                return [
                    _fresh_tensor(item, tuple(item.shape), generator)
                    if isinstance(item, torch.Tensor) else item
                    for item in cycled
                ]
            if isinstance(value, dict):
                out = copy.copy(value)  # keeps OrderedDict / BatchEncoding and their order
                for key, item in value.items():
                    out[key] = fresh(item)
                return out
            if isinstance(value, tuple) and hasattr(value, "_fields"):  # named tuples
                return type(value)(*(fresh(v) for v in value))
            if isinstance(value, (list, tuple)):
                return type(value)(fresh(v) for v in value)
            return value

        return ExampleInputs(tuple(fresh(a) for a in self.args),
                             {k: fresh(v) for k, v in self.kwargs.items()})

    def call(self, module: Callable[..., Any]) -> Any:
        return module(*self.args, **self.kwargs)

    def placeholder_values(self, graph: fx.Graph) -> list[Any]:
        """The inputs in the order of the graph's placeholders (for ``Interpreter.run``)."""
        values: list[Any] = []
        positional = list(self.args)
        placeholders = list(graph.find_nodes(op="placeholder"))
        names = [str(node.target).lstrip("*") for node in placeholders]
        variadic = any(str(node.target).startswith("*") for node in placeholders)
        unknown = sorted(set(self.kwargs) - set(names))
        if unknown and not variadic:
            raise InputError(
                f"example_inputs names {', '.join(map(repr, unknown))}, but forward() takes "
                f"{', '.join(map(repr, names)) or 'no inputs'}; use forward()'s argument names"
            )
        for node, name in zip(placeholders, names, strict=True):
            if str(node.target).startswith("**"):
                continue  # ``**kwargs``: extra keywords (the interpreter hands it the rest)
            if positional:
                values.append(positional.pop(0))
            elif name in self.kwargs:
                values.append(self.kwargs[name])
            elif node.args:
                values.append(node.args[0])
            else:
                raise InputError(
                    f"example_inputs gives no value for forward()'s input {name!r}; pass it "
                    f"positionally or as {{{name!r}: tensor}}"
                )
        if positional and not variadic:
            images = all(isinstance(a, torch.Tensor) and a.dim() == 3 for a in self.args)
            hint = "; a list of images is one input: pass ([image, ...],)" if images else ""
            raise InputError(
                f"example_inputs has {len(self.args)} positional inputs but forward() takes "
                f"{len(names)} ({', '.join(map(repr, names))}); pass one value per argument"
                f"{hint}"
            )
        return values


def _check_not_wrapped(model: nn.Module) -> None:
    """Wrappers hide the Python forward that torch.fx traces: ask for the module inside."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(
            f"{type(model).__name__} is a TorchScript module, which torch.fx cannot trace; "
            "pass the Python nn.Module it was scripted from"
        )
    if hasattr(model, "_orig_mod"):
        raise InputError(
            "the model is wrapped by torch.compile; pass model._orig_mod to fxattn and "
            "compile the module fxattn returns"
        )
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise InputError(
            f"the model is wrapped in {type(model).__name__}; pass model.module to fxattn "
            "and wrap the module fxattn returns"
        )


def check_model_inputs(model: nn.Module, inputs: ExampleInputs) -> None:
    """Refuse a model/input mismatch before tracing, with the fix in the message.

    Catches what would otherwise surface as an obscure error deep inside a kernel: parameters
    on the meta device (never materialised), floating inputs of another dtype than the
    model's parameters, and inputs on another device than the parameters.
    """
    _check_not_wrapped(model)
    tensors = list(model.parameters()) + list(model.buffers())
    if any(t.is_meta for t in tensors):
        raise InputError(
            f"{type(model).__name__} has parameters on the meta device (not materialised); "
            "call model.to_empty(device='cpu') and load weights first"
        )
    floating = [t for t in tensors if t.is_floating_point()]
    if not floating:
        return
    dtype, device = floating[0].dtype, floating[0].device
    for tensor in inputs.tensors():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            raise InputError(
                f"example input is {str(tensor.dtype).replace('torch.', '')} but the model's "
                f"parameters are {str(dtype).replace('torch.', '')}; convert the input "
                f"(x.to({dtype})) or the model (model.to({tensor.dtype}))"
            )
        if tensor.device != device:
            raise InputError(
                f"example input is on {tensor.device} but the model is on {device}; move "
                "them to the same device"
            )
