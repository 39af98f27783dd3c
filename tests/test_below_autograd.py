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


def checked(x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A validation check (``_is_all_true``), a finiteness check of many tensors
    (``_foreach_norm``), a random draw and a write in place of an argument."""
    ok = torch._is_all_true(x > -10)
    norms = torch._foreach_norm([x, x * 2, state], 1)
    state.mul_(0.5).add_(x.sum())  # the caller's tensor, written in place
    return ok, torch.stack(norms).sum(), torch.bernoulli(torch.sigmoid(x)), x.exp()


def test_lowering_for_inductor_keeps_the_values():
    from pyro_wakesleep.compiled.simplify import lower_for_inductor

    x = torch.tensor([0.3, -0.2, 0.8])
    graph = record_below_autograd(checked, x, torch.ones(3))
    torch.manual_seed(0)
    expected = graph(x, torch.ones(3))
    lower_for_inductor(graph.graph)
    graph.recompile()
    targets = {n.target for n in graph.graph.nodes}
    assert torch.ops.aten._is_all_true.default not in targets
    assert torch.ops.aten._foreach_norm.Scalar not in targets
    assert torch.ops.aten.all.default in targets
    torch.manual_seed(0)
    for value, want in zip(graph(x, torch.ones(3)), expected, strict=True):
        torch.testing.assert_close(value, want)


def test_compiled_graph_equals_the_recorded_one_per_layout(monkeypatch):
    """Inductor without Dynamo: the same values, random draws and writes in place as the
    graph module; another layout (a strided input) is compiled for itself, and past
    ``MAX_LAYOUTS`` the graph module runs."""
    from pyro_wakesleep.compiled.below_autograd import CompiledGraph

    x = torch.tensor([0.3, -0.2, 0.8])
    graph = record_below_autograd(checked, x, torch.ones(3))
    compiled = CompiledGraph(graph)
    strided = torch.tensor([0.3, 9.0, -0.2, 9.0, 0.8, 9.0])[::2]
    for inputs in ((x, torch.ones(3)), (x * 2, torch.full((3,), 3.0)), (strided, torch.ones(3))):
        states = [inputs[1].clone(), inputs[1].clone()]
        torch.manual_seed(1)
        expected = graph(inputs[0], states[0])
        torch.manual_seed(1)
        values = compiled(inputs[0], states[1])
        for value, want in zip(values, expected, strict=True):
            torch.testing.assert_close(value, want)
        torch.testing.assert_close(states[1], states[0])
    assert len(compiled._compiled) == 2  # contiguous and strided
    monkeypatch.setattr(CompiledGraph, "MAX_LAYOUTS", 2)
    calls = []
    monkeypatch.setattr(graph, "forward", lambda *a: calls.append(a) or checked(*a))
    with pytest.warns(RuntimeWarning, match="op by op, uncompiled"):
        compiled(torch.ones(2, 3)[:, 0], torch.ones(2))  # a third layout: no compilation
    assert len(compiled._compiled) == 2 and len(calls) == 1


def test_compiled_graph_differentiates_like_the_recorded_one():
    """A loss graph (grad-mode switches, ``detach``) compiled under autograd gives the
    recorded graph's gradient."""
    from pyro_wakesleep.compiled.below_autograd import CompiledGraph

    def loss(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor]:
        with torch.no_grad():
            scale = (w * x).sum()
        return ((w * x).tanh().sum() * scale + w.detach().sum() * w.sum(),)

    w, x = torch.tensor([0.3, -0.2, 0.8]), torch.tensor([1.0, 2.0, -1.0])
    leaf = w.clone().requires_grad_(True)
    graph = record_below_autograd(loss, leaf, x, grad_mode=True)
    (want,) = torch.autograd.grad(graph(leaf, x)[0], leaf)
    (got,) = torch.autograd.grad(CompiledGraph(graph)(leaf, x)[0], leaf)
    torch.testing.assert_close(got, want)




def test_compiled_graphs_use_inductors_cache():
    """The graph reaches inductor with a shape environment, as from Dynamo: the same graph
    compiled again (a new process, or here a new objective) is read from inductor's
    cache rather than bypassing it."""
    from torch._dynamo.utils import counters

    from pyro_wakesleep.compiled.below_autograd import CompiledGraph

    x = torch.tensor([0.3, -0.2, 0.8])
    graph = record_below_autograd(lambda v: ((v * CONSTANT).sin().sum(),), x)
    counters.clear()
    first = CompiledGraph(graph)(x)
    again = CompiledGraph(graph)(x)
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    torch.testing.assert_close(again, first)
