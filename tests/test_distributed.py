"""Data-parallel training on torch.distributed: 2 CPU processes with gloo on 127.0.0.1.

One pair of processes runs every objective under DistributedDataParallel (the fixture);
the tests compare what the ranks computed with the same per-rank computations done one
after another in this process. Skipped where torch.distributed/gloo cannot start.
"""

import socket

import distributed_worker as w
import pyro
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

import pyro_wakesleep.control_variates.moving_average as moving_average
import pyro_wakesleep.control_variates.neural as neural
from pyro_wakesleep.distributed import (
    all_reduce_mean,
    all_reduce_moments,
    all_reduce_sum,
    is_distributed,
)
from pyro_wakesleep.signals import ema_update


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("ddp")
    try:
        mp.spawn(w.worker, args=(_free_port(), str(out)), nprocs=w.WORLD, join=True)
    except Exception as error:
        if not all((out / f"rank{r}.pt").exists() for r in range(w.WORLD)):
            pytest.skip(f"could not start {w.WORLD} gloo processes: {error!r}")
        raise
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(w.WORLD)]
    for r in results:
        if "init_error" in r:
            pytest.skip(f"torch.distributed (gloo) cannot start here: {r['init_error']}")
    return results


def _record(monkeypatch):
    """Records the values that the control variates reduce (in one process: no-ops)."""
    seen = []

    def mean(value):
        seen.append(value.detach().clone())
        return all_reduce_mean(value)

    def moments(value, shift=0.0):
        seen.append(value.detach().clone())
        return all_reduce_moments(value, shift)

    monkeypatch.setattr(moving_average, "all_reduce_mean", mean)
    monkeypatch.setattr(neural, "all_reduce_moments", moments)
    return seen


def _global_state(name, pre, values):
    """The control-variate state after one step of a single process whose step's
    statistics are over the whole global batch (all ranks' values)."""
    state = dict(pre)
    if not values:
        return state
    v = torch.cat([x.flatten() for x in values])
    if name == "sf_moving_average":
        state["z.average"], state["z.weight"] = ema_update(
            pre["z.average"], pre["z.weight"], v.mean(), 0.5)
    elif name == "sf_neural":
        state["z.mean"], state["z.weight"] = ema_update(
            pre["z.mean"], pre["z.weight"], v.mean(), 0.5)
        state["z.variance"], _ = ema_update(
            pre["z.variance"], pre["z.weight"], v.var(correction=0), 0.5)
    return state


def _reference(name, monkeypatch):
    """Rank r's computations one after another here (same seeds, same shards, the same
    pre-step state); gradients averaged, state updated over the global batch."""
    seen = _record(monkeypatch)
    module = w.build(name)
    optimizer = torch.optim.SGD(module.parameters(), lr=w.LR)
    steps = []
    for t in range(w.STEPS):
        pre = w.cv_state(module)
        per_rank = []
        seen.clear()
        for r in range(w.WORLD):
            module.control_variates.load_state_dict(pre)
            pyro.set_rng_seed(w.seed(t, r))
            optimizer.zero_grad()
            module(w.DATA[w.shard(r)]).backward()
            per_rank.append(w.grads(module))
        mean_grads = {n: torch.stack([g[n] for g in per_rank]).mean(0) for n in per_rank[0]}
        state = _global_state(name, pre, seen)
        module.control_variates.load_state_dict(state)
        for n, p in module.named_parameters():
            p.grad = mean_grads[n].clone()
        steps.append((mean_grads, state))
        optimizer.step()
    return steps


@pytest.mark.parametrize("name", w.CONFIGS)
def test_ddp_gradient_is_the_average_of_the_per_rank_computations(ranks, name, monkeypatch):
    reference = _reference(name, monkeypatch)
    for rank in ranks:
        for (got, _), (want, _) in zip(rank[name], reference, strict=True):
            assert got.keys() == want.keys()
            for n in want:
                torch.testing.assert_close(got[n], want[n], msg=f"{name}: {n}")


@pytest.mark.parametrize("name", w.CONFIGS)
def test_control_variate_state_is_global_and_identical_on_every_rank(ranks, name, monkeypatch):
    reference = _reference(name, monkeypatch)
    for t, (_, want) in enumerate(reference):
        states = [rank[name][t][1] for rank in ranks]
        for n in want:
            assert torch.equal(states[0][n], states[1][n]), f"{name}: {n} differs by rank"
            torch.testing.assert_close(states[0][n], want[n], msg=f"{name}: {n} at step {t}")
    if name in ("sf_moving_average", "sf_neural"):  # the state is there and moved
        assert any(float(v.abs().sum()) > 0 for v in reference[-1][1].values())


def test_subsampled_plate_gives_the_full_data_gradient(ranks):
    """Each rank's plate("data", N, subsample=its DistributedSampler shard) scales its
    loss by N / n = WORLD; DDP divides the sum of the ranks' gradients by WORLD: the
    result is the gradient of the full-data loss (the sum over all N datapoints) with the
    same draws, so it is unbiased for the full-data gradient."""
    full = None
    for r in range(w.WORLD):
        pyro.clear_param_store()
        torch.manual_seed(0)
        module = w.ScoreFunctionELBO(2, control_variate=w.LeaveOneOutBaseline())(
            w.MixedModel(), w.MixedGuide()
        )
        pyro.set_rng_seed(w.seed(0, r))
        module(w.DATA[w.shard(r)]).backward()  # no scale: the shard's sum
        g = w.grads(module)
        full = g if full is None else {n: full[n] + g[n] for n in g}
    for rank in ranks:
        got = rank["subsampled"]
        for n in full:
            torch.testing.assert_close(got[n], full[n])


def test_reductions_are_plain_statistics_in_one_process():
    assert not is_distributed()
    v = torch.tensor([[1.0, 2.0], [4.0, 7.0]])
    assert torch.equal(all_reduce_sum(v), v)
    assert all_reduce_sum(v) is not v  # never the input itself
    assert torch.equal(all_reduce_mean(v), v.mean())
    mean, var = all_reduce_moments(v, shift=3.0)
    assert torch.equal(mean, v.mean()) and torch.equal(var, v.var(correction=0))
