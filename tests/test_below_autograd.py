"""The recorder below autograd of the compiled training step
(:mod:`pyro_wakesleep.compiled.below_autograd`): a replay equals a fresh eager run from
the same random state on a function unlike the objectives' (views written in place,
constants, multi-output ops, factory functions, random draws, a backward pass), and a
read of tensor data into Python is refused."""

from __future__ import annotations

import pytest
import torch

from pyro_wakesleep.compiled.below_autograd import record_below_autograd
from pyro_wakesleep.compiled.checks import Refused

CONSTANT = torch.tensor([0.5, -1.0, 2.0])


def program(w: torch.Tensor, x: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.enable_grad():
        leaf = w.detach().requires_grad_(True)
        h = torch.tanh(leaf * x + CONSTANT)
        noise = torch.bernoulli(torch.sigmoid(h.detach()))
        top, index = torch.topk(h, 2)
        first, *_ = h.unbind(0)
        view = buffer[:2]
        view.mul_(0.9).add_(top.detach())  # writes the caller's buffer through a view
        loss = (top.sum() + first) * noise.sum() + torch.zeros(3).sum() + index.sum()
        (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, noise, buffer.clone()


def test_replay_equals_eager_runs():
    w, x = torch.tensor([0.3, -0.2, 0.8]), torch.tensor([1.0, 2.0, -1.0])
    buffer = torch.ones(3)
    torch.manual_seed(0)
    graph = record_below_autograd(program, w, x, buffer.clone())
    for seed in (1, 2):
        start = torch.randn(3)
        torch.manual_seed(seed)
        expected = program(w, x, start.clone())
        torch.manual_seed(seed)
        replayed_buffer = start.clone()
        actual = graph(w, x, replayed_buffer)
        for a, e in zip(actual, expected, strict=True):
            assert torch.equal(a, e)
        assert torch.equal(replayed_buffer, expected[3])  # the in-place write is replayed
    ops = {str(node.target) for node in graph.graph.nodes}
    assert "aten.bernoulli.default" in ops and "aten.mul_.Tensor" in ops  # kept, not folded


def test_a_read_into_python_is_refused():
    def reads(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * float(x.sum()),)

    with pytest.raises(Refused, match="reads tensor data"):
        record_below_autograd(reads, torch.ones(2))


def loss_program(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor]:
    with torch.no_grad():
        scale = (w * x).exp()  # no gradient through it
    fresh = torch.tensor([1.0, 2.0, 3.0])
    fresh.mul_(2.0)  # a constant made fresh at each run, written in place
    return ((w * x * scale).sum() + (w.detach() * w).sum() + (fresh * w).sum()
            * torch.tensor(2.0).item(),)


def test_a_loss_graph_replays_under_autograd_as_the_eager_step_ran():
    """``no_grad`` regions and ``detach`` keep their effect on the gradient, a fresh
    constant written in place starts afresh at every replay, and a constant's value may
    be read."""
    w = torch.tensor([0.3, -0.2, 0.8], requires_grad=True)
    x = torch.tensor([1.0, 2.0, -1.0])
    graph = record_below_autograd(loss_program, w, x, grad_mode=True, meta=True)
    (expected,) = loss_program(w, x)
    (eager_grad,) = torch.autograd.grad(expected, w)
    for _ in range(2):
        (replayed,) = graph(w, x)
        (grad,) = torch.autograd.grad(replayed, w)
        assert torch.equal(replayed, expected) and torch.equal(grad, eager_grad)
    assert torch.is_grad_enabled()  # the replay ends in the grad mode it started in
    switches = [n.args for n in graph.graph.nodes if n.target is torch._C._set_grad_enabled]
    assert switches == [(False,), (True,)]
    # without the switches the gradient would differ: the test can fail
    without = record_below_autograd(loss_program, w, x)
    (dropped,) = torch.autograd.grad(without(w, x)[0], w)
    assert not torch.allclose(dropped, eager_grad)
    assert all(isinstance(n.meta["val"], torch.Tensor) for n in graph.graph.nodes
               if n.op in ("placeholder", "get_attr") or (
                   n.op == "call_function" and n.target is not torch._C._set_grad_enabled))


def test_compiled_graphs_each_have_their_own_code():
    """Before :func:`torch.compile`, a recorded graph's code is generated: Dynamo caches
    by code object, and a lazy graph module's ``forward`` is shared by all of them, so
    every graph after the 8th would replay uncompiled (its recompile limit)."""
    from pyro_wakesleep.compiled.below_autograd import compile_graph

    graphs = [record_below_autograd(lambda x, k=k: (x * k,), torch.ones(2)) for k in (2, 3)]
    lazy = {type(g).forward.__code__ for g in graphs}
    assert len(lazy) == 1  # what Dynamo would see without the step below
    for g in graphs:
        compile_graph(g)
    assert len({type(g).forward.__code__ for g in graphs}) == 2
