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
