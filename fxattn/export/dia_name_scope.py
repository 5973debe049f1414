"""Which names and nodes of an exported ONNX graph are DIA's.

DIA's modules live under one root of the lean module (:data:`fxattn.names.DIA_PREFIX`); the
exporters carry it into the graph as parameter names (both exporters), module name scopes
(dynamo) or node names (TorchScript, where :func:`mark_dia_name_scopes` records the scope). The
exact rewrites, the low-precision weights, the compile and the cost account all find DIA here.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from ..names import DIA_PREFIX

#: metadata entry with a node's DIA scope, where the exporter records no module scopes
NAME_SCOPE_KEY = "fxattn.name_scope"


def is_dia_name(name: str, prefix: str = DIA_PREFIX) -> bool:
    """``prefix`` starts the name or one of its dotted components: the dynamo exporter keeps
    the module's own parameter names (``fxattn_dia.g0...``), the TorchScript exporter names
    them after the export wrapper's attribute (``inner.fxattn_dia.g0...``)."""
    return name.startswith(prefix) or f".{prefix}" in name


def dia_matrix_names(model: Any, prefix: str = DIA_PREFIX) -> list[str]:
    """Names of the 2-D initializers (matrices) that are DIA parameters (:func:`is_dia_name`)."""
    return [i.name for i in model.graph.initializer
            if is_dia_name(i.name, prefix) and len(i.dims) == 2]


def in_dia(node: Any) -> bool:
    """Whether ``node`` comes from a DIA module: the dynamo exporter's name scopes, the scope
    :func:`mark_dia_name_scopes` recorded on a TorchScript export, or a scoped node name."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPE_KEY:
            return prop.value.startswith(DIA_PREFIX)
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                scopes = [prop.value]
            return any(str(s).startswith(DIA_PREFIX) for s in scopes)
    return DIA_PREFIX in node.name


def mark_dia_name_scopes(model: Any) -> int:
    """Record DIA's module scope on the nodes of a TorchScript export; returns how many.

    The TorchScript exporter names a node after the modules it ran in, one path component per
    module call: DIA's group ``fxattn_dia.g2``, called from the graph module, gives
    ``/inner/g2/Mul_7`` at its first site and ``/inner/g2_1/...`` at the next (the container
    ``fxattn_dia`` is never called, so the names lose it); only the parameters keep the full
    name (``inner.fxattn_dia.g2.input_path.0.weight``). A node that reads a DIA parameter shows
    where its group's calls are (``/inner/`` + ``g2``); every node under one of them gets the
    metadata entry :data:`NAME_SCOPE_KEY` = ``fxattn_dia.g2``, which :func:`in_dia` reads, so the
    rewrites here, :func:`fxattn.compile_ort_cpu` and the cost account find DIA in TorchScript
    exports as they do in dynamo exports. A call under which other parameters are read (a
    module of the model that has the group's name) is left unmarked: an optimisation skipped,
    never a wrong one.
    """
    parameters = {init.name for init in model.graph.initializer}
    groups: set[tuple[str, str]] = set()  # (the scope's parent, the group): ("/inner/", "g2")
    for node in model.graph.node:
        for name in node.input:
            if name in parameters and is_dia_name(name, DIA_PREFIX):
                group = name[name.index(DIA_PREFIX) + len(DIA_PREFIX):].split(".")[0]
                parts = node.name.split("/")[:-1]
                if group in parts:
                    groups.add(("/".join(parts[:parts.index(group)]) + "/", group))

    def scope(node: Any) -> tuple[str, str] | None:
        """``(node name prefix, DIA scope)`` of a node in a call of a DIA group."""
        for parent, group in groups:
            call, _, rest = node.name[len(parent):].partition("/")
            if node.name.startswith(parent) and rest \
                    and re.fullmatch(rf"{re.escape(group)}(_\d+)?", call):  # g2, g2_1, ...
                return parent + call + "/", DIA_PREFIX + group
        return None

    scoped = [(node, found) for node in model.graph.node if (found := scope(node))]
    foreign = {prefix for node, (prefix, _) in scoped
               if any(name in parameters and not is_dia_name(name, DIA_PREFIX)
                      for name in node.input)}
    marked = 0
    for node, (prefix, dia_name_scope) in scoped:
        if prefix not in foreign and not any(p.key == NAME_SCOPE_KEY for p in node.metadata_props):
            node.metadata_props.add(key=NAME_SCOPE_KEY, value=dia_name_scope)
            marked += 1
    return marked


def has_dia(model: Any) -> bool:
    return any(in_dia(node) for node in model.graph.node)
