"""The prepare / convert API: :func:`inspect`, :func:`transform`, :func:`ssia_loss`,
:func:`strip_ssia`.

``transform`` is the *prepare* step (trace both graphs, analyze, insert DIA into both and SSIA
into the training graph); ``strip_ssia`` is the *convert* step (keep the evaluation graph,
with DIA, as a lean ``torch.fx.GraphModule``). Neither touches the model it is given.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .analysis import Plan, analyze
from .analysis.graph import count_parameters
from .analysis.groups import assign_groups
from .capture import (
    ExampleInputs,
    TraceOptions,
    check_model_inputs,
    propagate_shapes,
    trace_dual,
)
from .capture.signature import capture_note
from .config import DIA, SSIA, resolve_dia, resolve_ssia
from .errors import (
    AlreadyTransformedError,
    AnalysisError,
    InputError,
    NotTransformedError,
    SSIALossUnavailableError,
    TraceError,
)
from .modules.attach import SSIAAttach
from .modules.dia import DIALSTMCell, SharedSE, build_dia_module
from .modules.graph_module import (
    AttentionGraphModule,
    TransformInfo,
    interface_class,
    original_module,
    unwrap,
)
from .modules.ssia import PairSpec, SSIALoss, TapSpec
from .names import DIA_ROOT, FXATTN_META, SSIA_ROOT
from .passes import insert_dia, insert_ssia, strip_pass
from .scope import (
    SCOPE_ATTR,
    ScopedPart,
    ScopeInfo,
    ScopePlan,
    capture_calls,
    check_scope_argument,
    choose_parts,
    explicit_parts,
    first_sentence,
    parts_of,
    scope_info,
    strip_scoped,
)


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; pass the module "
            "itself (e.g. torchvision.models.resnet18()), not its output or state_dict"
        )
    if isinstance(unwrap(model), AttentionGraphModule) or scope_info(model) or any(
        isinstance(m, (DIALSTMCell, SharedSE, SSIALoss)) for m in model.modules()
    ):
        raise AlreadyTransformedError(
            "this model already carries fxattn attention; transform the original model "
            "instead (its weights load into the result with load_state_dict(strict=False))"
        )


def _trace_options(
    leaf_modules: Sequence[type[nn.Module] | str],
    autowrap_functions: Sequence[Callable[..., Any]],
    concrete_args: Mapping[str, Any] | None,
) -> TraceOptions:
    return TraceOptions(leaf_modules, autowrap_functions, concrete_args)  # validates them


class _Prepared:
    """Traced, shape-propagated graphs and their plans (shared by inspect and transform)."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        dia: DIA | None,
        ssia: SSIA | None,
        options: TraceOptions,
        export_fallback: bool = True,
    ) -> None:
        _check_model(model)
        self.inputs = ExampleInputs.from_user(example_inputs)
        check_model_inputs(model, self.inputs)
        self.root = copy.deepcopy(model)  # never trace, run or rewire the caller's model
        self.graphs = trace_dual(self.root, self.inputs, options, export_fallback)
        _restore_traced_attributes(self.root, model)
        propagate_shapes(self.graphs.train, self.inputs)
        propagate_shapes(self.graphs.eval, self.inputs)
        name = type(model).__name__
        parameters = count_parameters(model)
        self.train_plan = analyze(self.graphs.train, dia, ssia, tracer=self.graphs.tracer,
                                  model_name=name)
        self.eval_plan = analyze(self.graphs.eval, dia, None, tracer=self.graphs.tracer,
                                 model_name=name)
        self.train_plan.model_parameters = parameters
        self.eval_plan.model_parameters = parameters
        if self.graphs.fixed_batch is not None:
            for plan in (self.train_plan, self.eval_plan):
                plan.fixed_batch = self.graphs.fixed_batch
                plan.notes.append(_fixed_batch_note(self.graphs.fixed_batch))
        if self.graphs.fixed_arguments:
            for plan in (self.train_plan, self.eval_plan):
                plan.fixed_arguments = dict(self.graphs.fixed_arguments)
                plan.notes.append(capture_note(self.graphs.fixed_arguments))
        train_keys = [s.key for s in self.train_plan.sites]
        eval_keys = [s.key for s in self.eval_plan.sites]
        if train_keys != eval_keys and dia is not None and all(
            site.kind == "stage_output" for site in self.train_plan.sites + self.eval_plan.sites
        ):
            # No residual additions: DIA sits on stage outputs, and a training-only branch
            # (GoogLeNet's auxiliary heads) moves the main path's stage outputs in train mode.
            # DIA goes on the stage outputs both modes have, so both graphs share its modules.
            common = set(train_keys) & set(eval_keys)
            for plan in (self.train_plan, self.eval_plan):
                kept = [site for site in plan.sites if site.key in common]
                plan.sites, plan.dia_modules = assign_groups(kept, dia)
                plan.notes.append(
                    f"train and eval mode differ in stage outputs (a training-only branch); "
                    f"DIA uses the {len(kept)} both modes have"
                )
            train_keys = [s.key for s in self.train_plan.sites]
            eval_keys = [s.key for s in self.eval_plan.sites]
        if train_keys != eval_keys:
            raise AnalysisError(
                f"the train-mode and eval-mode graphs of {name} disagree on the residual sites "
                f"({len(train_keys)} vs {len(eval_keys)}); restrict DIA with "
                "DIA(include=...)/exclude to the blocks present in both modes"
            )


def _fixed_batch_note(batch: int) -> str:
    return (
        f"torch.export fixed the batch at {batch}: a shape guard in the model's code holds "
        "for other batch sizes only beyond what its symbolic solver proves (a torch.export "
        f"limitation; exporting the original model with a dynamic batch fails the same way). "
        f"The transformed model and its ONNX export take batches of {batch} only"
    )


_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _is_traced(value: Any) -> bool:
    """A fake tensor or symbolic size that a tracer left behind."""
    if isinstance(value, (tuple, list)):
        return any(_is_traced(item) for item in value)
    if isinstance(value, torch.SymInt | torch.SymFloat):
        return True
    return isinstance(value, torch.Tensor) and type(value) is not torch.Tensor and not isinstance(
        value, nn.Parameter)


def _restore_traced_attributes(root: nn.Module, model: nn.Module) -> None:
    """Undo plain attributes that tracing replaced with fake values on ``root``'s modules.

    ``torch.export`` runs the forward on fake tensors, and a forward that caches on ``self``
    (ultralytics' ``Detect`` keeps ``anchors`` / ``strides`` / ``shape``) leaves them behind.
    The transformed module keeps these modules, so they get the original's values back.
    """
    originals = dict(model.named_modules())
    for name, module in root.named_modules():
        original = originals.get(name)
        for key, value in list(vars(module).items()):
            if key in _MODULE_INTERNALS or not _is_traced(value):
                continue
            if original is not None and key in vars(original):
                module.__dict__[key] = copy.deepcopy(vars(original)[key])
            else:
                del module.__dict__[key]


def inspect(
    model: nn.Module,
    example_inputs: Any,
    dia: bool | DIA | Mapping[str, Any] | None = True,
    ssia: bool | SSIA | Mapping[str, Any] | None = True,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    concrete_args: Mapping[str, Any] | None = None,
    scope: str | Sequence[str] = "auto",
) -> Plan | ScopePlan:
    """Where DIA and SSIA would go in ``model``: sites, groups, taps, parameter overhead.

    ``print(plan)`` shows it as tables; ``plan.to_dict()`` gives JSON-ready data. The model
    is not modified.

    Example::

        >>> plan = fxattn.inspect(torchvision.models.resnet50(), torch.randn(2, 3, 224, 224))
        >>> len(plan.sites), [m.channels for m in plan.dia_modules]
        (16, [256, 512, 1024, 2048])
    """
    dia_cfg, ssia_cfg = resolve_dia(dia), resolve_ssia(ssia)
    options = _trace_options(leaf_modules, autowrap_functions, concrete_args)
    check_scope_argument(scope)
    if scope == "auto":
        try:
            return _Prepared(model, example_inputs, dia_cfg, ssia_cfg, options).train_plan
        except TraceError as whole:
            return _scoped_plan(model, example_inputs, dia_cfg, ssia_cfg, options, scope,
                                whole)[0]
    return _scoped_plan(model, example_inputs, dia_cfg, ssia_cfg, options, scope, None)[0]


def transform(
    model: nn.Module,
    example_inputs: Any,
    dia: bool | DIA | Mapping[str, Any] | None = True,
    ssia: bool | SSIA | Mapping[str, Any] | None = True,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    concrete_args: Mapping[str, Any] | None = None,
    scope: str | Sequence[str] = "auto",
) -> nn.Module:
    """Return a copy of ``model`` with DIA inserted and SSIA attached to its training graph.

    The result is a drop-in replacement: ``net(x)`` returns what ``model(x)`` returns, it
    trains with any optimizer, and ``fxattn.ssia_loss(net)`` is the SSIA loss of the latest
    training forward. ``model`` itself is never modified.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace (leaf modules help otherwise).
        example_inputs: one batch: a tensor, a tuple of positional inputs, or a dict.
        dia: ``True`` (defaults), ``False``, or :class:`fxattn.DIA` options.
        ssia: ``True`` (defaults), ``False``, or :class:`fxattn.SSIA` options.
        leaf_modules / autowrap_functions / concrete_args: tracing help, see
            :class:`fxattn.capture.TraceOptions`.
        scope: ``"auto"`` transforms the whole model when it can be captured, else the
            largest capturable submodules that hold residual sites (a detector's backbone +
            FPN); a module path (``"backbone"``) or a list of paths transforms just those
            parts. A scoped result is a copy of ``model`` (its own class) with those parts
            replaced; ``net.fxattn_scope`` says which and why (see :mod:`fxattn.scope`).

    Hugging Face language models as ``from_pretrained`` / ``from_config`` give them (the
    key/value cache on): when ``forward`` takes ``use_cache`` and ``example_inputs`` leaves it
    out, the model is captured with ``use_cache=False`` - a training graph never needs the
    cache - and ``net.plan.notes`` says so (``net.plan.fixed_arguments`` records it); no
    config is edited. ``net`` accepts ``use_cache`` left out, ``None`` or ``False``, and
    refuses ``use_cache=True`` with an :class:`~fxattn.errors.InputError` (it has no cache to
    return). Put ``labels`` in the example to train on the model's own loss (with
    ``SSIA(attach=True)`` inside ``Trainer``), then export for the inference inputs:
    ``fxattn.export_onnx(net, path, {"input_ids": ids, "attention_mask": mask})`` captures the
    lean graph again for them (see :func:`strip_ssia`).

    Example::

        >>> net = fxattn.transform(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
        >>> loss = criterion(net(x), y) + fxattn.ssia_loss(net)
    """
    dia_cfg, ssia_cfg = resolve_dia(dia), resolve_ssia(ssia)
    options = _trace_options(leaf_modules, autowrap_functions, concrete_args)
    check_scope_argument(scope)
    if scope != "auto":
        return _transform_scoped(model, example_inputs, dia_cfg, ssia_cfg, options, scope, None)
    try:
        prepared = _Prepared(model, example_inputs, dia_cfg, ssia_cfg, options)
    except TraceError as whole:
        return _transform_scoped(model, example_inputs, dia_cfg, ssia_cfg, options, "auto",
                                 whole)
    return _build(model, prepared, dia_cfg, ssia_cfg)


def _build(
    model: nn.Module, prepared: _Prepared, dia_cfg: DIA | None, ssia_cfg: SSIA | None
) -> AttentionGraphModule:
    """The transformed module from traced, analysed graphs (see :func:`transform`)."""
    plan, eval_plan = prepared.train_plan, prepared.eval_plan
    if dia_cfg is not None and not plan.sites:
        raise AnalysisError(
            f"no DIA site found in {type(model).__name__}: it has no residual addition and no "
            "stage output matched; select sites with DIA(include=[regex on module paths]) or "
            "use dia=False"
        )
    if ssia_cfg is not None and not plan.active_pairs:
        raise AnalysisError(_no_ssia_pair_message(type(model).__name__, plan))
    root = prepared.root
    active_pairs = plan.active_pairs
    # the passes first: both graphs rewritten to call the modules they will own
    train_graph = prepared.graphs.train.graph
    eval_graph = prepared.graphs.eval.graph
    replaced: dict[str, str] = {}
    if dia_cfg is not None:
        stateful = dia_cfg.module == "lstm"
        train_graph, train_report = insert_dia(train_graph, plan.sites, stateful)
        eval_graph, _ = insert_dia(eval_graph, eval_plan.sites, stateful)
        replaced = train_report.replaced
    if ssia_cfg is not None:
        train_graph, _ = insert_ssia(train_graph, plan.taps, replaced, attach=ssia_cfg.attach)
    # then the modules those calls name, placed like the model's own weights
    device, dtype = _placement(root, prepared.inputs)
    if dia_cfg is not None:
        dia_modules = nn.Module()
        for spec in plan.dia_modules:
            module = build_dia_module(dia_cfg.module, spec.channels, dia_cfg.reduction,
                                      spec.channel_dim, fused=dia_cfg.fused,
                                      init=dia_cfg.init)
            module.pack_params = len(spec.sites) > 1
            dia_modules.add_module(spec.name, module.to(device=device, dtype=dtype))
        root.add_module(DIA_ROOT, dia_modules)
    if ssia_cfg is not None:
        pairs = [PairSpec(p.low, p.high, p.resize) for p in active_pairs]
        taps = [
            TapSpec(t.channel_dim, t.shape[t.channel_dim], t.grid, t.skip_tokens)
            for t in plan.taps
        ]
        ssia_module = SSIALoss(taps, pairs, weight=ssia_cfg.weight, p=ssia_cfg.p,
                               map=ssia_cfg.map)
        if ssia_cfg.attach:
            ssia_module.add_module("attach", SSIAAttach())
        root.add_module(SSIA_ROOT, ssia_module.to(device=device, dtype=dtype))
    info = TransformInfo(
        plan=plan,
        dia=dia_cfg.to_dict() if dia_cfg else None,
        ssia=ssia_cfg.to_dict() if ssia_cfg else None,
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
    )
    cls = interface_class(type(model))  # keeps the original's methods and attributes
    net = cls(root, train_graph, eval_graph, info,
                               class_name=f"FxAttn{type(model).__name__}")
    net.train(model.training)
    return net


def _no_ssia_pair_message(name: str, plan: Plan) -> str:
    return f"{_why_no_ssia_pair(name, plan)}; use ssia=False for this model"


def _why_no_ssia_pair(name: str, plan: Plan) -> str:
    """What the taps were and why none of them pairs: too few, or every pair skipped."""
    if len(plan.taps) < 2:
        found = ", ".join(f"{t.node} {t.layout} {tuple(t.shape)}" for t in plan.taps) or "none"
        return (
            f"SSIA needs at least two stage outputs (taps) to pair; {name} has "
            f"{len(plan.taps)} on its main path ({found})"
        )
    reasons = "; ".join(f"{p.low}->{p.high}: {p.skipped}" for p in plan.pairs)
    return f"SSIA found {len(plan.taps)} taps in {name} but no pair of them can be compared " \
           f"({reasons})"


def _scoped_plan(
    model: nn.Module,
    example_inputs: Any,
    dia_cfg: DIA | None,
    ssia_cfg: SSIA | None,
    options: TraceOptions,
    scope: str | Sequence[str],
    whole: TraceError | None,
) -> tuple[ScopePlan, nn.Module, list[Any]]:
    """Capture, choose and prepare the parts (see :mod:`fxattn.scope`); nothing is built."""
    _check_model(model)
    inputs = ExampleInputs.from_user(example_inputs)
    check_model_inputs(model, inputs)
    root = copy.deepcopy(model)  # the parts are replaced in this copy, never in ``model``
    seen = capture_calls(root, inputs)
    skipped: list[tuple[str, str]] = []

    def prepare(module: nn.Module, part_inputs: ExampleInputs, fallback: bool = True
                ) -> _Prepared:
        return _Prepared(module, part_inputs, dia_cfg, ssia_cfg, options, fallback)

    if scope == "auto":
        # torch.fx first: a failed torch.export capture costs seconds per submodule (a
        # detector's RoI heads); the export-based capture only when torch.fx finds no part
        # residual sites first (every residual backbone); stage outputs only where none has
        # any (a VGG backbone)
        candidates = []
        for residual in (True, False):
            for tracer in (lambda m, i: prepare(m, i, False), prepare):
                if not candidates:
                    skipped.clear()
                    candidates = choose_parts(root, seen, tracer, skipped, residual)
        if not candidates:
            assert whole is not None
            raise TraceError(
                f"{whole} (no submodule that can be captured on its own holds a residual site "
                "or a stage output either; name the parts to transform with "
                "scope=[module paths])"
            ) from whole
    else:
        candidates = explicit_parts(root, scope, seen)
    prepared = []
    for candidate in candidates:
        ready = candidate.prepared or prepare(root.get_submodule(candidate.path),
                                              candidate.inputs)
        prepared.append((candidate, ready))
    parts = [
        ScopedPart(c.path, type(root.get_submodule(c.path)).__name__, c.reason, p.train_plan,
                   c.inputs)
        for c, p in prepared
    ]
    plan = ScopePlan(type(model).__name__, parts, skipped,
                     whole_model=first_sentence(whole) if whole is not None else "",
                     explicit=scope != "auto")
    return plan, root, prepared


def _transform_scoped(
    model: nn.Module,
    example_inputs: Any,
    dia_cfg: DIA | None,
    ssia_cfg: SSIA | None,
    options: TraceOptions,
    scope: str | Sequence[str],
    whole: TraceError | None,
) -> nn.Module:
    """A copy of ``model`` whose scoped parts are transformed (see :mod:`fxattn.scope`)."""
    plan, root, prepared = _scoped_plan(model, example_inputs, dia_cfg, ssia_cfg, options,
                                        scope, whole)
    with_ssia = []
    for part, (candidate, ready) in zip(plan.parts, prepared, strict=True):
        sub = root.get_submodule(candidate.path)
        part_ssia = ssia_cfg if ready.train_plan.active_pairs else None
        if ssia_cfg is not None and part_ssia is None:
            part.reason += f"; no SSIA here: {_why_no_ssia_pair('it', ready.train_plan)}"
        try:
            net = _build(sub, ready, dia_cfg, part_ssia)
        except AnalysisError as exc:
            raise type(exc)(f"scope part {candidate.path!r}: {exc}") from exc
        root.set_submodule(candidate.path, net)
        with_ssia.append(part_ssia is not None)
    if ssia_cfg is not None and not any(with_ssia):
        reasons = "; ".join(
            _why_no_ssia_pair(repr(candidate.path), ready.train_plan)
            for candidate, ready in prepared
        )
        raise AnalysisError(
            f"no scoped part of {type(model).__name__} has an SSIA pair: {reasons}; use "
            "ssia=False for this model, or widen the scope to include more stages"
        )
    info = ScopeInfo(
        plan=plan,
        dia=dia_cfg.to_dict() if dia_cfg else None,
        ssia=ssia_cfg.to_dict() if ssia_cfg else None,
        model_class=f"{type(model).__module__}.{type(model).__qualname__}",
    )
    setattr(root, SCOPE_ATTR, info)
    root.train(model.training)
    return root


def _placement(root: nn.Module, inputs: ExampleInputs) -> tuple[torch.device, torch.dtype]:
    for tensor in list(root.parameters()) + list(root.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    floating = [t for t in inputs.tensors() if t.is_floating_point()]
    if floating:
        return floating[0].device, floating[0].dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _fxattn_module(net: Any, what: str) -> AttentionGraphModule:
    module = unwrap(net)
    if not isinstance(module, AttentionGraphModule):
        raise NotTransformedError(
            f"{what} needs a module returned by fxattn.transform, got "
            f"{type(net).__name__}; call fxattn.transform(model, example_inputs) first"
        )
    return module


def ssia_loss(net: nn.Module) -> torch.Tensor:
    """The weighted SSIA loss of ``net``'s latest training-mode forward.

    Add it to your task loss: ``loss = criterion(net(x), y) + fxattn.ssia_loss(net)``.
    Works through DDP, DataParallel and ``torch.compile`` wrappers. For a module transformed
    with ``ssia=False`` it is a zero scalar (so one training loop serves every arm).

    With ``SSIA(attach=True)`` the term already rides on the output's gradient, so the value
    returned is *detached*: log it freely; adding it to a loss changes the logged number but
    never the gradient (no double counting).

    Raises:
        SSIALossUnavailableError: no training forward since the module was made or switched
            to eval mode (eval forwards run no SSIA branch).
    """
    info = scope_info(unwrap(net))
    if info is not None and not info.stripped:  # a scoped model: the sum over its parts
        module = unwrap(net)
        losses = [ssia_loss(part) for _, part in parts_of(module, info)]
        return torch.stack(losses).sum()
    module = _fxattn_module(net, "ssia_loss")
    ssia = getattr(module, SSIA_ROOT, None)
    if ssia is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    if ssia.latest is None:
        raise SSIALossUnavailableError(
            "no SSIA loss yet: call net.train() and run a forward pass first (eval-mode "
            "forwards run no SSIA branch, and switching to eval clears the last loss)"
        )
    if isinstance(getattr(ssia, "attach", None), SSIAAttach):
        return ssia.latest.detach()  # its gradient already flows through the output
    return ssia.latest


def set_ssia_scale(net: nn.Module, scale: float) -> None:
    """The gradient an attached SSIA term gets when the output holds no scalar loss.

    With ``SSIA(attach=True)`` and a loss computed outside the model (from logits), the SSIA
    scalar's gradient is ``scale`` (default ``1.0``: the gradient of ``task + ssia``). A loop
    that divides the loss by ``N`` accumulation steps and multiplies it by a GradScaler's
    scale ``S`` matches ``(task + ssia) * S / N`` with ``set_ssia_scale(net, S / N)``. Not
    needed when the model returns its own 0-dim loss: that leaf's gradient is used as is.

    Raises:
        NotTransformedError: ``net`` was not transformed with ``SSIA(attach=True)``.
    """
    module = _fxattn_module(net, "set_ssia_scale")
    attach = getattr(getattr(module, SSIA_ROOT, None), "attach", None)
    if not isinstance(attach, SSIAAttach):
        raise NotTransformedError(
            "set_ssia_scale needs a module transformed with ssia=fxattn.SSIA(attach=True); "
            f"{type(module).__name__} has no attached SSIA term"
        )
    attach.state.scale = float(scale)


def strip_ssia(
    net: nn.Module,
    example_inputs: Any = None,
    *,
    leaf_modules: Sequence[type[nn.Module] | str] = (),
    autowrap_functions: Sequence[Callable[..., Any]] = (),
    concrete_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The lean inference model: ``net``'s evaluation graph with DIA and without SSIA.

    Returns a new ``torch.fx.GraphModule`` in eval mode (``net`` is untouched) whose
    ``state_dict`` keys are the original model's plus ``fxattn_dia.*``; the strip report is
    in ``lean.meta["fxattn_strip"]``.

    Without ``example_inputs`` the lean graph takes what ``net`` was transformed with - its
    *training* signature. A model trained with its targets among the inputs (a language model's
    ``labels``, whose loss the graph computes) then wants them at inference too. Pass the
    inference inputs instead (``example_inputs={"input_ids": ids, "attention_mask": mask}``)
    and the evaluation graph is captured again for them: the original ``forward`` (the model's
    own class, over ``net``'s trained submodules) is captured in eval mode, DIA is inserted at
    the same sites, and ``net``'s trained ``fxattn_dia.*`` tensors are loaded into it - the
    same keys and shapes, checked (:class:`~fxattn.errors.AnalysisError` if the sites or DIA
    modules differ). So a causal LM trained with ``labels`` gives a lean graph from
    ``input_ids`` / ``attention_mask`` to logits; :func:`fxattn.export_onnx` does this by
    itself when given a training module and inputs its lean graph does not take.
    ``leaf_modules`` / ``autowrap_functions`` / ``concrete_args`` are the tracing help of
    :func:`transform`, for that capture.

    Example::

        >>> net = fxattn.transform(lm, {"input_ids": ids, "labels": ids}, ssia=SSIA(attach=True))
        >>> ...  # train
        >>> lean = fxattn.strip_ssia(net, example_inputs={"input_ids": ids})
        >>> lean(input_ids=ids).logits.shape
        torch.Size([2, 16, 50257])

    For a scoped model (a detector whose backbone was transformed) it returns a copy of the
    model, of its own class, whose transformed parts are lean ``torch.fx.GraphModule``
    s (``lean.backbone``); the rest (pre- and post-processing) is the original code, so
    ``lean(images)`` returns the detector's own output. ``lean.fxattn_scope.stripped`` is
    ``True``. (``example_inputs`` is for whole-model transforms: a scoped model's parts keep
    the inputs they were captured with.)
    """
    info = scope_info(unwrap(net))
    if info is not None:
        if info.stripped:
            raise NotTransformedError(
                "strip_ssia needs a module returned by fxattn.transform; this scoped model "
                "is already stripped (lean)"
            )
        if example_inputs is not None:
            raise InputError(
                "strip_ssia(example_inputs=...) captures a whole-model transform again; a "
                "scoped model's parts keep the inputs they were captured with: call "
                "strip_ssia(net) without example_inputs"
            )
        return strip_scoped(unwrap(net), lambda part: strip_pass(part)[0])
    module = _fxattn_module(net, "strip_ssia")
    if example_inputs is None:
        return strip_pass(module)[0]
    options = _trace_options(leaf_modules, autowrap_functions, concrete_args)
    return _recaptured_lean(module, example_inputs, options)


def _recaptured_lean(
    net: AttentionGraphModule, example_inputs: Any, options: TraceOptions
) -> torch.fx.GraphModule:
    """The lean graph of ``net`` captured again for ``example_inputs`` (see :func:`strip_ssia`).
    """
    trained = net.fxattn_info
    dia_cfg = resolve_dia(trained.dia)
    original = original_module(net)  # shares net's trained submodules; _Prepared copies it
    original.eval()
    prepared = _Prepared(original, example_inputs, dia_cfg, None, options)
    rebuilt = _build(original, prepared, dia_cfg, None)
    loaded = _load_trained_dia(rebuilt, net)
    lean, report = strip_pass(rebuilt)
    ssia = getattr(net, SSIA_ROOT, None)
    lean.meta["fxattn_strip"] = dataclasses.replace(
        report,
        removed_nodes=sum(1 for n in net.train_graph.nodes if n.meta.get(FXATTN_META) == "ssia"),
        removed_parameters=count_parameters(ssia) if ssia is not None else 0,
    )
    names = ", ".join(prepared.inputs.kwargs) or f"{len(prepared.inputs.args)} positional"
    lean.meta["fxattn_info"].plan.notes.append(
        f"lean graph captured again for the inputs given ({names}); its {loaded} DIA tensors "
        f"are the training module's (same fxattn_dia.* keys and sites)"
    )
    return lean


def _load_trained_dia(rebuilt: AttentionGraphModule, net: AttentionGraphModule) -> int:
    """Load ``net``'s DIA tensors into ``rebuilt`` after checking both have DIA at the same
    sites, in the same modules; returns how many tensors were loaded."""
    def sites(plan: Plan) -> list[tuple[str, int, int]]:
        return [(site.key, site.group, site.channels) for site in plan.sites]

    if sites(rebuilt.plan) != sites(net.plan):
        raise AnalysisError(
            f"the graph captured for the inputs given has DIA at {len(rebuilt.plan.sites)} "
            f"sites, the training module at {len(net.plan.sites)} (or at others): the inputs "
            "take another path through the model; export with the training inputs, or "
            "transform the original model with these inputs and load net's state_dict"
        )
    prefix = DIA_ROOT + "."
    want = {k: v for k, v in net.state_dict().items() if k.startswith(prefix)}
    have = {k for k in rebuilt.state_dict() if k.startswith(prefix)}
    if set(want) != have:
        raise AnalysisError(
            f"the DIA modules of the graph captured for the inputs given differ from the "
            f"training module's: missing {sorted(set(want) - have)[:3]}, new "
            f"{sorted(have - set(want))[:3]}"
        )
    rebuilt.load_state_dict(want, strict=False)  # shapes are checked by load_state_dict
    return len(want)
