"""Param-store names of the example models: two instances in one process train
independently (issue 10, "global state that silently stops training")."""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable

import pyro
import pytest
import torch
from pyro.infer import SVI
from torch import Tensor

from pyro_wakesleep import ScoreFunctionELBO
from pyro_wakesleep.examples.mixture import GaussianMixture
from pyro_wakesleep.examples.models import ParamStoreNamed, SigmoidBeliefNet
from pyro_wakesleep.objectives.wake_sleep import WakeSleepELBO


def _sbn() -> SigmoidBeliefNet:
    return SigmoidBeliefNet((6, 3))


def _sbn_data() -> Tensor:
    return torch.bernoulli(torch.full((5, 6), 0.5))


def _gmm_data() -> Tensor:
    return GaussianMixture(num_clusters=4).sample(8)


MAKERS: dict[str, tuple[Callable[[], ParamStoreNamed], Callable[[], Tensor]]] = {
    "sbn": (_sbn, _sbn_data),
    "gmm": (lambda: GaussianMixture(num_clusters=4), _gmm_data),
}


def _snapshot(net: ParamStoreNamed) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in net.named_parameters()}


def _changed(net: ParamStoreNamed, before: dict[str, Tensor]) -> dict[str, bool]:
    return {k: not torch.equal(before[k], v) for k, v in net.named_parameters()}


def _train(net: ParamStoreNamed, x: Tensor, steps: int = 3) -> None:
    objective = ScoreFunctionELBO(2, max_plate_nesting=1, vectorize_particles=False)
    svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.05}), objective)  # type: ignore
    for _ in range(steps):
        svi.step(x)


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_two_instances_both_train_under_svi(kind: str) -> None:
    make, data = MAKERS[kind]
    first, second = make(), make()
    assert first.name != second.name
    x = data()
    before = [_snapshot(first), _snapshot(second)]
    _train(first, x)
    _train(second, x)  # same process, same param store, no clear_param_store between
    for net, snapshot in zip((first, second), before, strict=True):
        changed = _changed(net, snapshot)
        assert all(changed.values()), f"{net.name}: parameters left untouched: {changed}"
    store = pyro.get_param_store()
    for net in (first, second):
        for part in ("generative", "recognition"):
            module = getattr(net, part)
            for param_name, param in module.named_parameters():
                key = f"{net.name}.{part}$$${param_name}"
                assert store.get_param(key).unconstrained() is param  # type: ignore


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_two_instances_both_train_under_wake_sleep(kind: str) -> None:
    make, data = MAKERS[kind]
    first, second = make(), make()
    x = data()
    before = [_snapshot(first), _snapshot(second)]
    for net in (first, second):
        svi = SVI(net.model, net.guide, pyro.optim.Adam({"lr": 0.05}),  # type: ignore
                  WakeSleepELBO(1, 2, vectorize_particles=False))
        for _ in range(3):
            svi.step(x)
    for net, snapshot in zip((first, second), before, strict=True):
        assert all(_changed(net, snapshot).values()), net.name


def test_default_names_are_distinct_and_follow_the_class() -> None:
    nets = [SigmoidBeliefNet((4, 2)) for _ in range(3)]
    gmms = [GaussianMixture(num_clusters=3) for _ in range(2)]
    assert [n.name for n in nets] == ["sbn", "sbn_1", "sbn_2"]
    assert [g.name for g in gmms] == ["gmm", "gmm_1"]
    x = torch.ones(2, 4)
    nets[1].model(x)
    nets[1].guide(x)
    keys = set(pyro.get_param_store())
    assert keys == {f"sbn_1.generative$$${n}" for n, _ in nets[1].generative.named_parameters()} \
        | {f"sbn_1.recognition$$${n}" for n, _ in nets[1].recognition.named_parameters()}


def test_a_default_name_skips_names_that_the_param_store_holds() -> None:
    net = _sbn()
    net.model(_sbn_data())
    assert net.name == "sbn"
    del net
    gc.collect()
    # the dead instance's tensors are still in the store under "sbn.": not reused
    assert _sbn().name == "sbn_1"
    pyro.clear_param_store()
    gc.collect()
    assert _sbn().name == "sbn"  # nothing holds "sbn" any more


def test_an_unreferenced_instance_in_a_reference_cycle_gives_its_name_back() -> None:
    gc.disable()
    try:
        net = _sbn()
        net.__dict__["cycle"] = [net]  # garbage only the cycle collector can free
        del net
        assert _sbn().name == "sbn"
    finally:
        gc.enable()


def test_explicit_name_is_respected() -> None:
    net = SigmoidBeliefNet((6, 3), name="mnist")
    gmm = GaussianMixture(num_clusters=4, name="le.gmm")
    assert (net.name, gmm.name) == ("mnist", "le.gmm")
    net.model(_sbn_data())
    gmm.guide(_gmm_data())
    keys = set(pyro.get_param_store())
    assert "mnist.generative$$$prior_logits" in keys
    assert any(k.startswith("le.gmm.recognition$$$") for k in keys)
    assert SigmoidBeliefNet((6, 3)).name == "sbn"  # explicit names do not shift defaults
    assert copy.deepcopy(net).name == "mnist"  # a copy keeps an explicit name


def test_a_copy_of_a_default_named_instance_trains_on_its_own() -> None:
    net = _sbn()
    x = _sbn_data()
    _train(net, x)
    twin = copy.deepcopy(net)
    assert twin.name != net.name
    before = _snapshot(net)
    twin_before = _snapshot(twin)
    _train(twin, x)
    assert all(_changed(twin, twin_before).values())
    assert not any(_changed(net, before).values())


def test_the_same_explicit_name_on_two_live_instances_is_refused() -> None:
    first, second = SigmoidBeliefNet((6, 3), name="a"), SigmoidBeliefNet((6, 3), name="a")
    x = _sbn_data()
    first.model(x)
    with pytest.raises(ValueError, match=r"'a.generative\$\$\$prior_logits'.*own name="):
        second.model(x)
    first.guide(x)
    with pytest.raises(ValueError, match="a.recognition"):
        second.guide(x)


@pytest.mark.parametrize("cls", [SigmoidBeliefNet, GaussianMixture])
@pytest.mark.parametrize("bad", [3, b"sbn", ["sbn"], 1.5])
def test_a_name_that_is_not_a_str_is_a_type_error(cls: type, bad: object) -> None:
    with pytest.raises(TypeError, match="name must be a str"):
        cls(name=bad)


@pytest.mark.parametrize("bad", ["", "a$$$b"])
def test_an_empty_name_or_one_with_pyros_separator_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="name must be non-empty"):
        SigmoidBeliefNet((6, 3), name=bad)


def test_the_main_jobs_interleaved_objectives_each_train_their_own_net() -> None:
    """compare() keeps every objective's network in the param store at once (they train
    interleaved): each under its own name, each trained, none sharing another's tensors."""
    from pyro_wakesleep.examples.compare import compare
    from pyro_wakesleep.examples.datasets import load_digits

    train, test = load_digits()
    compare(train, test, ["sf", "vimco", "ws"], steps=3, seconds=0, rounds=1,
            evaluations=1, latent=(4,), progress=False, grad_draws=2, eval_particles=2)
    store = pyro.get_param_store()
    prefix = {key.split(".generative$$$")[0] for key in store if ".generative$$$" in key}
    assert len(prefix) == 4, prefix  # the initial net (measured at step 0) and three copies
    initial = min(prefix, key=len)
    start = store.get_param(f"{initial}.generative$$$prior_logits").detach()
    trained = [store.get_param(f"{p}.generative$$$prior_logits") for p in prefix - {initial}]
    assert all(not torch.equal(start, t.detach()) for t in trained)
    assert len({id(t) for t in trained}) == 3
