"""Insert the shared DIA modules into a graph (train or eval).

At a residual site ``add(shortcut, branch)`` the branch is replaced, in that add only, by the
DIA module's output, so attention multiplies the branch *before* the addition and any
activation after the add stays where it was. For the LSTM cell the state ``(h, c)`` produced at
one site of a group is passed to the next site of that group; the first site of every group
calls the cell without state (``h_0 = c_0 = 0``). At a stage-output site (networks without
residual additions) the output node's every use is redirected to the attention-weighted value.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch.fx as fx

from ..analysis import Site
from ..names import DIA_ROOT, FXATTN_META


@dataclass(frozen=True)
class DIAInsertReport:
    sites: int
    modules: tuple[str, ...]
    inserted_nodes: int
    replaced: dict[str, str]  # stage-output node -> node that now carries its attended value


def insert_dia(
    graph: fx.Graph, sites: list[Site], stateful: bool
) -> tuple[fx.Graph, DIAInsertReport]:
    """Return a copy of ``graph`` with DIA calls at ``sites`` (``fxattn_dia.<module>``)."""
    new_graph = copy.deepcopy(graph)
    nodes = {node.name: node for node in new_graph.nodes}
    state: dict[int, tuple[fx.Node, fx.Node]] = {}
    inserted: list[fx.Node] = []
    replaced: dict[str, str] = {}
    for site in sites:
        branch = nodes[site.branch]
        anchor = nodes[site.node] if site.kind == "residual" else branch.next
        with new_graph.inserting_before(anchor):
            args = (branch, *state.get(site.group, ())) if stateful else (branch,)
            call = new_graph.call_module(f"{DIA_ROOT}.{site.module}", args)
            new_nodes = [call]
            if stateful:
                attended = new_graph.call_function(operator.getitem, (call, 0))
                hidden = new_graph.call_function(operator.getitem, (call, 1))
                cell = new_graph.call_function(operator.getitem, (call, 2))
                state[site.group] = (hidden, cell)
                new_nodes += [attended, hidden, cell]
            else:
                attended = call
        for node in new_nodes:
            node.meta[FXATTN_META] = "dia"
        inserted += new_nodes
        if site.kind == "residual":
            nodes[site.node].replace_input_with(branch, attended)
        else:
            branch.replace_all_uses_with(
                attended, delete_user_cb=lambda user, own=frozenset(new_nodes): user not in own
            )
            replaced[branch.name] = attended.name
    new_graph.lint()
    report = DIAInsertReport(
        sites=len(sites),
        modules=tuple(dict.fromkeys(site.module for site in sites)),
        inserted_nodes=len(inserted),
        replaced=replaced,
    )
    return new_graph, report
