"""Scope: transform the parts of a model that can be captured, in a copy of the model.

A torchvision detector cannot be captured as one graph: its forward loops over images in
Python, checks its targets, and post-processes with data-dependent shapes (NMS). Its residual
sites all sit in parts that *can* be captured (the backbone + FPN). Scoping transforms those
parts and leaves the rest of the model as it is:

1. **capture** - run the model (a private copy) on the user's example once in each mode with
   forward hooks on every submodule: each submodule's own example inputs, how many times it
   ran, and whether a same-shape floating addition (a residual candidate) ran inside it;
2. **choose** - explicitly (``scope="backbone"`` or a list of module paths), or automatically:
   top-down from the root's children, the largest submodules that ran once per forward in
   both modes, take plain (pytree) inputs, hold a residual candidate, and trace with DIA
   sites; a submodule that cannot be traced is searched below;
3. **replace** - each chosen part is transformed (``fxattn.transform`` on its captured
   inputs) and put back in place of the original part, in a copy of the model.

The result is the model's own class (``FasterRCNN``, ...), so its interface, its ``forward``
and its loss dict stay what they were; ``net.fxattn_scope`` (a :class:`ScopeInfo`) records
the parts and why each was chosen. ``strip_ssia`` of it is again a copy of the model, with
each part replaced by its lean ``torch.fx.GraphModule``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .analysis import Plan
from .capture import TRACE_LOCK, ExampleInputs
from .errors import ConfigError, InputError, TraceError
from .names import SCOPE_ATTR

# --------------------------------------------------------------------------- the record


@dataclass
class ScopedPart:
    """One transformed submodule: where it is, why it was chosen, and its plan."""

    path: str
    module_class: str
    reason: str
    plan: Plan
    inputs: ExampleInputs | None = None  # what the part received on the user's example


@dataclass
class ScopePlan:
    """What a scoped transform did: the parts transformed, the submodules passed over.

    ``print(plan)`` names each part and why, then shows each part's own plan.
    """

    model_name: str
    parts: list[ScopedPart]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    whole_model: str = ""  # why the whole model was not captured ("" for an explicit scope)
    explicit: bool = False

    @property
    def paths(self) -> list[str]:
        return [part.path for part in self.parts]

    @property
    def sites(self) -> list[Any]:
        return [site for part in self.parts for site in part.plan.sites]

    @property
    def taps(self) -> list[Any]:
        return [tap for part in self.parts for tap in part.plan.taps]

    @property
    def active_pairs(self) -> list[Any]:
        return [pair for part in self.parts for pair in part.plan.active_pairs]

    @property
    def dia_parameters(self) -> int:
        return sum(part.plan.dia_parameters for part in self.parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "scope": "explicit" if self.explicit else "automatic",
            "whole_model": self.whole_model,
            "parts": [
                {"path": p.path, "class": p.module_class, "reason": p.reason,
                 "plan": p.plan.to_dict()}
                for p in self.parts
            ],
            "skipped": [{"path": path, "reason": why} for path, why in self.skipped],
        }

    def __str__(self) -> str:
        how = "explicit scope" if self.explicit else "automatic scope"
        lines = [f"{self.model_name}: {how}, {len(self.parts)} part(s) transformed"]
        if self.whole_model:
            lines.append(f"  the whole model was not captured: {self.whole_model}")
        for part in self.parts:
            lines.append(f"  transformed '{part.path}' ({part.module_class}): {part.reason}")
        for path, why in self.skipped:
            lines.append(f"  left '{path}' as is: {why}")
        for part in self.parts:
            lines.append("")
            lines.append(f"--- part '{part.path}' ---")
            lines.append(str(part.plan))
        return "\n".join(lines)


@dataclass
class ScopeInfo:
    """Kept on a scoped module as ``fxattn_scope``: enough to save, strip and rebuild it."""

    plan: ScopePlan
    dia: dict[str, Any] | None
    ssia: dict[str, Any] | None
    model_class: str
    stripped: bool = False


def scope_info(module: Any) -> ScopeInfo | None:
    info = getattr(module, SCOPE_ATTR, None) if isinstance(module, nn.Module) else None
    return info if isinstance(info, ScopeInfo) else None


def parts_of(module: nn.Module, info: ScopeInfo) -> Iterator[tuple[str, nn.Module]]:
    for path in info.plan.paths:
        yield path, module.get_submodule(path)


# --------------------------------------------------------------------------- capture


@dataclass
class _Calls:
    """What one submodule saw in one mode: its first call's inputs and how often it ran."""

    count: int = 0
    inputs: ExampleInputs | None = None
    adds: bool = False  # a same-shape floating addition ran inside it


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
         torch.Tensor.__iadd__, torch.Tensor.__radd__}


class _AddWatcher(TorchFunctionMode):
    """Marks the running submodules when ``a + b`` adds two same-shape floating tensors."""

    def __init__(self, stack: list[_Calls]) -> None:
        super().__init__()
        self.stack = stack

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in _ADDS and len(args) >= 2:
            a, b = args[0], args[1]
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                    and a.shape == b.shape and a.is_floating_point() and a.dim() >= 2):
                for calls in self.stack:
                    calls.adds = True
        return func(*args, **(kwargs or {}))


def _plain(value: Any) -> bool:
    """Inputs a tracer can take: tensors in lists / tuples / dicts, numbers, strings, None."""
    if isinstance(value, (torch.Tensor, int, float, bool, str, type(None))):
        return True
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def capture_calls(model: nn.Module, inputs: ExampleInputs) -> dict[bool, dict[str, _Calls]]:
    """Run ``model`` once per mode with hooks: each submodule's inputs, call count, adds.

    Runs without autograd, on a forked RNG, and restores the buffers (batch-norm statistics)
    and training flags afterwards; ``model`` is the caller's private copy anyway.
    """
    flags = {module: module.training for module in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    seen: dict[bool, dict[str, _Calls]] = {True: {}, False: {}}
    stack: list[_Calls] = []
    handles = []
    mode = [True]

    def pre(path: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls = seen[mode[0]].setdefault(path, _Calls())
            calls.count += 1
            if calls.count == 1 and _plain(args) and _plain(kwargs):
                calls.inputs = ExampleInputs(tuple(args), dict(kwargs))
            stack.append(calls)
        return hook

    def post(_module: nn.Module, _args: Any, _output: Any) -> None:
        stack.pop()

    for path, module in model.named_modules():
        if path:
            handles.append(module.register_forward_pre_hook(pre(path), with_kwargs=True))
            handles.append(module.register_forward_hook(post))
    try:
        with TRACE_LOCK, torch.no_grad(), torch.random.fork_rng(devices=[]):
            for training in (True, False):
                mode[0] = training
                stack.clear()
                model.train(training)
                with _AddWatcher(stack):
                    inputs.call(model)
    except Exception as exc:  # noqa: BLE001 - the model rejected the example inputs
        state = "training" if mode[0] else "evaluation"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{type(model).__name__} cannot run on the example inputs in {state} mode: {first}; "
            "pass what its own forward takes in both modes (a detector: (images, targets))"
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
        for module, flag in flags.items():
            module.training = flag
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return seen


# --------------------------------------------------------------------------- choose


@dataclass
class Candidate:
    """A chosen part with its captured example inputs and the search's prepared result."""

    path: str
    inputs: ExampleInputs
    reason: str
    prepared: Any = None


def _usable(path: str, seen: dict[bool, dict[str, _Calls]]) -> str:
    """Why the submodule at ``path`` cannot be a part on its own ("" when it can)."""
    train, evaluation = seen[True].get(path), seen[False].get(path)
    if train is None or evaluation is None:
        return "does not run in both training and evaluation mode"
    if train.count != 1 or evaluation.count != 1:
        return (f"runs {train.count} time(s) per training forward and {evaluation.count} per "
                "evaluation forward (once each is needed: a Python loop calls it per item)")
    if train.inputs is None:
        return "takes inputs other than tensors, lists, tuples, dicts and numbers"
    return ""


def choose_parts(
    model: nn.Module,
    seen: dict[bool, dict[str, _Calls]],
    prepare: Callable[[nn.Module, ExampleInputs], Any],
    skipped: list[tuple[str, str]],
    residual: bool = True,
) -> list[Candidate]:
    """The largest capturable submodules holding DIA sites, top-down from the root.

    ``prepare(module, inputs)`` traces and analyses a submodule; it returns an object with a
    ``train_plan`` or raises :class:`TraceError` (the search then goes one level down).
    With ``residual=True`` only submodules in which a same-shape addition ran are tried; with
    ``False`` (a backbone without residual additions: SSD's VGG) every one is, and one with at
    least two stage outputs is taken (DIA goes on them).
    """
    chosen: list[Candidate] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            train = seen[True].get(path)
            if train is None or (residual and not any(
                    seen[m].get(path, _Calls()).adds for m in seen)):
                continue  # no same-shape addition ran inside it: no residual site
            why = _usable(path, seen)
            if why:
                skipped.append((path, why))
                visit(f"{path}.", child)
                continue
            assert train.inputs is not None
            try:
                prepared = prepare(child, train.inputs)
            except TraceError as exc:
                why = f"cannot be captured ({first_sentence(exc)}); searched inside"
                skipped.append((path, why))
                visit(f"{path}.", child)
                continue
            except InputError as exc:
                skipped.append((path, f"rejected its captured inputs ({first_sentence(exc)})"))
                continue
            sites = len(prepared.train_plan.sites)
            if not sites:
                skipped.append((path, "traced, but holds no DIA site"))
                continue
            if not residual and sites < 2:
                # a backbone has stages; one stage output is a lone layer (a stem), not one
                skipped.append((path, "traced, but holds a single stage output"))
                continue
            kind = "residual sites" if residual else "stage outputs (no residual additions)"
            chosen.append(Candidate(path, train.inputs, (
                f"the largest capturable submodule holding {kind} ({sites} DIA "
                f"site(s), traced by {prepared.graphs.tracer})"), prepared))

    visit("", model)
    return chosen


def explicit_parts(
    model: nn.Module, scope: str | Sequence[str], seen: dict[bool, dict[str, _Calls]]
) -> list[Candidate]:
    """The parts the user named, checked: they exist, nest nowhere, and ran once per mode."""
    paths = [scope] if isinstance(scope, str) else list(scope)
    if not paths or not all(isinstance(p, str) and p for p in paths):
        raise ConfigError(
            f"scope must be 'auto', a module path or a list of module paths, got {scope!r}"
        )
    names = dict(model.named_modules())
    chosen = []
    for path in paths:
        if path not in names:
            children = ", ".join(repr(n) for n, _ in model.named_children())
            raise ConfigError(
                f"scope names {path!r}, which is not a submodule of {type(model).__name__} "
                f"(its children: {children}); use paths as model.named_modules() prints them"
            )
        for other in paths:
            if other != path and other.startswith(f"{path}."):
                raise ConfigError(f"scope names {path!r} and {other!r} inside it; name one")
        why = _usable(path, seen)
        if why:
            raise ConfigError(f"scope {path!r} cannot be transformed on its own: it {why}")
        calls = seen[True][path]
        assert calls.inputs is not None
        chosen.append(Candidate(path, calls.inputs, "named in scope"))
    return chosen


def first_sentence(exc: BaseException) -> str:
    """``cannot trace module ... at file:line `code`: reason`` without the hints after it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    head, _, tail = text.partition("`: ")
    if tail:
        return f"{head}`: {tail.split('. ')[0].rstrip('.')}"
    return text.split(". ")[0]




# --------------------------------------------------------------------------- strip


def strip_scoped(net: nn.Module, strip_part: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A copy of a scoped module whose parts are their lean GraphModules, in eval mode."""
    info = scope_info(net)
    assert info is not None
    if info.stripped:
        lean = copy.deepcopy(net)
    else:
        lean = copy.deepcopy(net)
        for path, part in parts_of(net, info):
            lean.set_submodule(path, strip_part(part))
        setattr(lean, SCOPE_ATTR, replace(info, stripped=True))
    return lean.eval()


def check_scope_argument(scope: Any) -> None:
    if scope is None or scope == "auto":
        return
    if isinstance(scope, str):
        return
    if isinstance(scope, Sequence) and scope and all(isinstance(p, str) for p in scope):
        return
    raise ConfigError(
        f"scope must be None, 'auto', a module path or a list of module paths, got {scope!r}"
    )
