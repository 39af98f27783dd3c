"""Data-parallel training on torch.distributed: 2 CPU processes with gloo on 127.0.0.1.

One pair of processes runs every objective under DistributedDataParallel (the fixture);
the tests compare what the ranks computed with the same per-rank computations done one
after another in this process. Skipped where torch.distributed/gloo cannot start.
"""

import shutil
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


def _spawn(entry, out, prefix):
    """``entry(rank, port, out)`` on WORLD gloo processes; their saved results, or a skip
    where torch.distributed cannot start here."""
    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    try:
        mp.spawn(entry, args=(_free_port(), str(out)), nprocs=w.WORLD, join=True)
    except Exception as error:
        if not all((out / f"{prefix}{r}.pt").exists() for r in range(w.WORLD)):
            pytest.skip(f"could not start {w.WORLD} gloo processes: {error!r}")
        raise
    results = [torch.load(out / f"{prefix}{r}.pt", weights_only=False) for r in range(w.WORLD)]
    for r in results:
        if "init_error" in r:
            pytest.skip(f"torch.distributed (gloo) cannot start here: {r['init_error']}")
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _spawn(w.worker, tmp_path_factory.mktemp("ddp"), "rank")


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
    elif name == "sf_enum_moving_average":  # the sampled switch s of EnumModel
        state["s.average"], state["s.weight"] = ema_update(
            pre["s.average"], pre["s.weight"], v.mean(), 0.5)
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


def test_compiled_objectives_replay_their_graph_under_ddp(ranks):
    for name in ("vimco_jit", "rws_jit"):  # exact: the gradient test above covers them
        assert all(rank[f"{name}:graphs"] == 1 for rank in ranks), name


@pytest.mark.parametrize("name", w.CONFIGS)
def test_control_variate_state_is_global_and_identical_on_every_rank(ranks, name, monkeypatch):
    reference = _reference(name, monkeypatch)
    for t, (_, want) in enumerate(reference):
        states = [rank[name][t][1] for rank in ranks]
        for n in want:
            assert torch.equal(states[0][n], states[1][n]), f"{name}: {n} differs by rank"
            torch.testing.assert_close(states[0][n], want[n], msg=f"{name}: {n} at step {t}")
    if name in ("sf_moving_average", "sf_neural", "sf_enum_moving_average"):  # it moved
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


# -- fit(): rank 0 writes the checkpoint, every rank reads it, any number of ranks resumes --
@pytest.fixture(scope="module")
def fit_ranks(tmp_path_factory):
    if not (tdist.is_available() and tdist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path_factory.mktemp("fit")
    one = w.fit_run(0, 1, w.FIT_CHECKPOINT_AT, str(out / "one.ckpt"), validation=False)
    shutil.copy(out / "one.ckpt", out / "one.ckpt.orig")
    return _spawn(w.fit_worker, out, "fit"), one, out


def _same_state(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k}"


def test_fit_on_two_ranks_writes_each_checkpoint_once_on_rank_0(fit_ranks):
    ranks, _, _ = fit_ranks
    assert ranks[0]["straight"]["saves"] == [w.FIT_CHECKPOINT_AT, w.FIT_STEPS]
    assert ranks[0]["first"]["saves"] == [w.FIT_CHECKPOINT_AT]
    assert ranks[0]["resumed"]["saves"] == [w.FIT_STEPS]
    for job in ("straight", "first", "resumed", "from_one"):
        assert ranks[1][job]["saves"] == [], f"rank 1 wrote a checkpoint in {job}"


def test_fit_resumed_on_as_many_ranks_continues_exactly(fit_ranks):
    ranks, _, _ = fit_ranks
    for r, rank in enumerate(ranks):
        straight, resumed = rank["straight"], rank["resumed"]
        _same_state(resumed["state"], straight["state"], f"rank {r}")
        assert resumed["losses"] == straight["losses"]
        assert resumed["validation"] == straight["validation"]
    _same_state(ranks[0]["straight"]["state"], ranks[1]["straight"]["state"], "ranks differ")
    assert ranks[0]["straight"]["losses"] == ranks[1]["straight"]["losses"]  # global means


def test_fit_checkpoint_of_one_process_resumes_on_two_ranks(fit_ranks):
    """Restored on both ranks, then the 2-rank DDP run from that state (a hand-written
    loop from the same checkpoint gives the same parameters bit for bit)."""
    ranks, one, _ = fit_ranks
    for r, rank in enumerate(ranks):
        _same_state(rank["from_one"]["state"], rank["from_one_hand"], f"rank {r}")
        assert rank["from_one"]["losses"][:w.FIT_CHECKPOINT_AT] == one["losses"]
    _same_state(ranks[0]["from_one"]["state"], ranks[1]["from_one"]["state"], "ranks differ")
    assert any("written by 1 rank(s) and resumes on 2" in m
               for m in ranks[0]["from_one_warnings"])
    assert not ranks[1]["from_one_warnings"]


def test_fit_checkpoint_of_two_ranks_resumes_in_one_process(fit_ranks):
    ranks, _, out = fit_ranks
    shutil.copy(out / "two.ckpt", out / "two.ckpt.orig")
    with pytest.warns(RuntimeWarning, match="written by 2 rank.*resumes on 1"):
        resumed = w.fit_run(0, 1, w.FIT_STEPS, str(out / "two.ckpt"), validation=False)
    hand = w.hand_resume(0, 1, str(out / "two.ckpt.orig"))
    _same_state(resumed["state"], hand, "1 process")
    assert resumed["losses"][:w.FIT_CHECKPOINT_AT] == ranks[0]["first"]["losses"]


def test_fit_stops_every_rank_when_one_asks(fit_ranks):
    ranks, _, _ = fit_ranks
    for rank in ranks:
        assert len(rank["stopped"]["losses"]) == 2
    assert ranks[0]["stopped"]["saves"] == [2] and ranks[1]["stopped"]["saves"] == []


def test_fit_under_torch_distributed_needs_ddp(monkeypatch):
    import pyro_wakesleep.training as training

    monkeypatch.setattr(training, "_rank_and_world", lambda: (0, 2))
    module, _, optimizer, loader = w.fit_setup(0, 1)
    with pytest.raises(ValueError, match="initialized with 2 ranks.*DistributedDataParallel"):
        training.fit(module, loader, 1, optimizer=optimizer, progress=False)


def test_fit_unreadable_checkpoint_raises_on_every_rank(fit_ranks):
    ranks, _, _ = fit_ranks
    for rank in ranks:
        assert "bad.ckpt" in rank["bad"] and "cannot be read" in rank["bad"]
