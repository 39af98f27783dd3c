"""psis_khat and variational_loo: the analytic case, Pyro's psis_diagnostic, ArviZ."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.importance import psis_diagnostic, vectorized_importance_weights

from pyro_wakesleep.diagnostics import (
    arviz_backend,
    from_guide,
    log_importance_weights,
    psis_khat,
    to_arviz,
    variational_loo,
)
from pyro_wakesleep.diagnostics.backend import as_chain_draw

X = torch.tensor([0.3, -1.2, 2.0, 0.7, -0.4, 1.1])
POST_VAR = 1.0 / (1 + len(X))
POST_MEAN = float(X.sum()) * POST_VAR


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def exact_guide(x):
    pyro.sample("mu", dist.Normal(POST_MEAN, POST_VAR**0.5))


def wide_guide(x):
    pyro.sample("mu", dist.Normal(POST_MEAN + 0.3, 0.5 * POST_VAR**0.5))


def analytic_log_weights(s2, replicates, num, seed):
    # q = N(0, 1), p = N(0, s2): log w = log p(z) - log q(z) = z^2/2 (1 - 1/s2) + const
    z = torch.randn(replicates, num, generator=torch.Generator().manual_seed(seed))
    return 0.5 * z.double() ** 2 * (1 - 1 / s2) - 0.5 * math.log(s2)


@pytest.mark.parametrize("s2", [1.5, 4.0])
def test_analytic_khat(s2):
    # k = 1 - 1/s2 (1/3 and 3/4). Measured over 40 seeds with S = 1e4 draws, one estimate
    # has sd ~0.08-0.10, and k-hat is biased low before the asymptotic regime (its mean is
    # 0.325 for s2=1.5 and ~0.69 for s2=4; still 0.708 at S = 1e6). The mean of 32
    # replicates has se ~0.018: a tolerance of 0.1 covers the bias plus 2 se.
    khat = psis_khat(analytic_log_weights(s2, 32, 10_000, seed=0))
    assert khat.shape == (32,)
    assert abs(float(khat.mean()) - (1 - 1 / s2)) < 0.1


def test_exact_guide_khat_is_small():
    pyro.set_rng_seed(0)
    khat = psis_khat(log_importance_weights(model, exact_guide, X, num_samples=2000))
    assert khat < 0.5
    pyro.set_rng_seed(0)
    assert psis_khat(log_importance_weights(model, wide_guide, X, num_samples=2000)) > 0.7


def test_agrees_with_pyro_psis_diagnostic():
    pyro.set_rng_seed(1)
    k_pyro = psis_diagnostic(model, wide_guide, X, num_particles=1000, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    weights = vectorized_importance_weights(model, wide_guide, X, num_samples=1000,
                                            max_plate_nesting=1)[0]
    assert psis_khat(weights) == pytest.approx(k_pyro, abs=1e-6)  # float64 vs float32
    pyro.set_rng_seed(1)
    ours = log_importance_weights(model, wide_guide, X, num_samples=1000, max_plate_nesting=1)
    assert torch.allclose(ours.float(), weights, atol=1e-4)
    assert psis_khat(ours) == pytest.approx(k_pyro, abs=1e-3)


def test_agrees_with_arviz_psislw():
    log_w = analytic_log_weights(4.0, 1, 4000, seed=2)[0]
    ours = psis_khat(log_w)
    if arviz_backend() == "classic":
        import arviz as az

        assert az.psislw(log_w.numpy())[1] == pytest.approx(ours, abs=1e-6)
    else:  # arviz-stats' psislw negates its input (LOO convention) and fits the tail anew
        from arviz_stats.base import array_stats

        assert float(array_stats.psislw(-log_w.numpy())[1]) == pytest.approx(ours, abs=0.05)


def test_khat_input_errors():
    with pytest.raises(ValueError, match="no log weights"):
        psis_khat([])
    with pytest.raises(ValueError, match="not finite"):
        psis_khat([0.0, float("nan"), 1.0])
    assert psis_khat(np.zeros(5)) == math.inf  # too few draws for a tail


def test_variational_loo():
    pyro.set_rng_seed(0)
    exact = to_arviz(model, exact_guide, X, num_samples=2000)
    assert psis_khat(exact) < 0.5
    loo = variational_loo(exact)
    if arviz_backend() == "classic":
        import arviz as az

        plain, compare, elpd = az.loo(exact), az.compare, "elpd_loo"
    else:
        import arviz_stats as azs

        # guide draws lie along `sample` under ArviZ 1.x; arviz_stats.loo reads
        # (chain, draw) only
        plain, compare, elpd = azs.loo(as_chain_draw(exact)), azs.compare, "elpd"
    value = loo[elpd] if arviz_backend() == "classic" else loo.elpd
    # exact guide: constant importance weights, so the correction changes nothing
    assert value == pytest.approx(plain[elpd] if arviz_backend() == "classic" else plain.elpd,
                                  abs=1e-3)
    pyro.set_rng_seed(0)
    wide = to_arviz(model, wide_guide, X, num_samples=2000)
    corrected = variational_loo(wide)
    corrected_value = (corrected[elpd] if arviz_backend() == "classic" else corrected.elpd)
    assert math.isfinite(corrected_value)
    table = compare({"exact": loo, "wide": corrected})
    assert set(table.index) == {"exact", "wide"}
    with pytest.raises(ValueError, match="log_q"):  # draws without a guide: no log q
        variational_loo(to_arviz(model, {"mu": torch.randn(50)}, X))


def test_variational_loo_and_khat_read_either_layout_of_the_draws():
    results = {}
    for layout in [("chain", "draw"), ("sample",)]:
        pyro.set_rng_seed(2)
        data = from_guide(model, wide_guide, X, num_samples=500, sample_dims=layout)
        loo = variational_loo(data)
        value = loo["elpd_loo"] if arviz_backend() == "classic" else loo.elpd
        results[layout] = (value, psis_khat(data))
    (one, k_one), (two, k_two) = results.values()
    assert math.isfinite(one) and one == pytest.approx(two, abs=1e-8)
    assert k_one == pytest.approx(k_two, abs=1e-12)
    pyro.set_rng_seed(2)
    weights = log_importance_weights(model, wide_guide, X, num_samples=500)
    assert k_one == pytest.approx(psis_khat(weights), abs=1e-6)
