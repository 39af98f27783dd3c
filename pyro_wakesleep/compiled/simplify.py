"""Graph passes over a recorded step (private to :mod:`pyro_wakesleep.compiled`): what
the eager program computed only for Python's sake (views and broadcasts to the shapes
tensors already have, neutral arithmetic, no-op grad-mode switches, dead values) is
removed before the graph is replayed. Each pass keeps the graph's values, random draws
and gradients exactly: nothing random is dropped and nothing whose result is mutated in
place is replaced.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import Tensor, fx


def _same_shape(node: Any, source: Any) -> bool:
    value, like = node.meta.get("val"), getattr(source, "meta", {}).get("val")
    return (isinstance(value, Tensor) and isinstance(like, Tensor)
            and value.shape == like.shape and value.dtype == like.dtype)


def _mutated(node: fx.Node) -> bool:
    return any(getattr(getattr(user.target, "_schema", None), "is_mutable", False)
               for user in node.users)


def simplify(graph: fx.Graph) -> None:
    """Removes what the recorded step computes for Python's sake only: ``expand`` and
    ``reshape`` to the shape a tensor already has, ``broadcast_tensors`` of tensors of
    equal shapes, a ``detach`` of a detached value, arithmetic with a neutral Python
    number (``x * 1``, ``x + 0.0``), grad-mode switches that change nothing, and (by
    dead-code elimination) every value no output depends on. Random operations are kept
    (they advance the generator); nothing whose result is mutated in place is replaced."""
    aten = torch.ops.aten
    views = {aten.expand.default, aten.reshape.default, aten.view.default}
    neutral = {aten.mul.Tensor: 1, aten.div.Tensor: 1, aten.add.Tensor: 0, aten.sub.Tensor: 0}
    for node in list(graph.nodes):
        if node.op != "call_function" or _mutated(node):
            continue
        if node.target in views and _same_shape(node, node.args[0]):
            node.replace_all_uses_with(node.args[0])
        elif node.target is aten.detach.default and getattr(
                node.args[0], "target", None) is aten.detach.default:
            node.replace_all_uses_with(node.args[0])  # detach(detach(x)) = detach(x)
        elif node.target in neutral and node.args[1] == neutral[node.target] \
                and _same_shape(node, node.args[0]):
            node.replace_all_uses_with(node.args[0])  # x * 1, x / 1, x + 0, x - 0
        elif node.target is aten.broadcast_tensors.default:
            inputs = node.args[0]
            users = list(node.users)
            if all(u.target is operator.getitem and not _mutated(u)
                   and _same_shape(u, inputs[u.args[1]]) for u in users):
                for user in users:
                    user.replace_all_uses_with(inputs[user.args[1]])
    graph.eliminate_dead_code()
    for node in list(graph.nodes):  # in-place ops on fresh copies of constants nobody reads
        source = node.args[0] if node.args else None
        if (node.op == "call_function" and _mutated_in_place(node) and not node.users
                and isinstance(source, fx.Node) and source.target is aten.lift_fresh_copy.default
                and len(source.users) == 1):
            graph.erase_node(node)
            graph.erase_node(source)
    _drop_grad_switches(graph)
    graph.eliminate_dead_code()


def _drop_grad_switches(graph: fx.Graph) -> None:
    """Removes grad-mode switches that change nothing: one that sets the mode the graph
    is already in, and a switch immediately undone by the next node (repeatedly, as the
    pairs nest). A graph is replayed with gradients on, so it starts in grad mode. One
    pass, linear in the graph's size."""
    def switch(node: fx.Node) -> bool:
        return node.op == "call_function" and node.target is torch._C._set_grad_enabled

    state = True
    pending: list[tuple[fx.Node, bool]] = []  # kept switches with no node since them
    for node in list(graph.nodes):
        if not switch(node):
            pending.clear()
            continue
        if node.args[0] == state:
            graph.erase_node(node)
        elif pending:  # the switch before it set the mode this one undoes
            previous, before = pending.pop()
            graph.erase_node(previous)
            graph.erase_node(node)
            state = before
        else:
            pending.append((node, state))
            state = node.args[0]


def _mutated_in_place(node: fx.Node) -> bool:
    return bool(getattr(getattr(node.target, "_schema", None), "is_mutable", False))


def lower_for_inductor(graph: fx.Graph) -> None:
    """Replaces the ops of a recorded step that inductor has no lowering for by equal
    ones it fuses (inductor would call each from Python, between its fused kernels):
    ``_is_all_true(x)`` (the validation checks of :mod:`torch.distributions`) by
    ``all(x)``, and ``_foreach_norm(xs, p)`` (one finiteness check of many tensors) by
    a ``linalg_vector_norm(x, p)`` per tensor. The values are the same (a norm up to
    the order of its sum, which inductor chooses anyway)."""
    aten = torch.ops.aten
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten._is_all_true.default:
            node.target = aten.all.default
        elif node.target is aten._foreach_norm.Scalar and not node.kwargs \
                and all(u.target is operator.getitem for u in node.users):
            tensors, order = node.args[0], node.args[1] if len(node.args) > 1 else 2
            for user in list(node.users):
                with graph.inserting_before(user):
                    norm = graph.call_function(aten.linalg_vector_norm.default,
                                               (tensors[user.args[1]], order))
                user.replace_all_uses_with(norm)
                graph.erase_node(user)
            graph.erase_node(node)
