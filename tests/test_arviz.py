"""to_arviz and the converters it dispatches to (from_guide, from_mcmc, from_samples):
every group against draws taken directly, MCMC and Predictive input, ArviZ functions on
the result, the draws' dimensions, bad input, ArviZ staying optional, and no import cycle
in the diagnostics. Runs against whichever ArviZ is installed (classic InferenceData, or
the ArviZ 1.x DataTree: tests/arviz1/run.sh).

A guide's (and a dict's) independent draws lie along ``(chain, draw)`` of one chain under
classic ArviZ and along ``sample`` under ArviZ 1.x (arviz_base.from_numpyro_svi's
convention); :func:`_lead` and :func:`_flat` let one assertion cover both."""

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_wakesleep.diagnostics import (
    History,
    arviz_backend,
    from_guide,
    from_mcmc,
    from_samples,
    to_arviz,
)

X = torch.tensor([0.5, -1.0, 1.5, 0.2, 2.5])
S = 64


def model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(mu + w[..., 0], 1.0))
        pyro.deterministic("twice", 2 * z)
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    pyro.sample("mu", dist.Normal(0.3, 0.5))
    pyro.sample("w", dist.Normal(torch.tensor([0.1, -0.2]), 0.4).to_event(1))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.5 * x, 0.6))


def _variables(data, group):
    return {k: (v.dims, v.shape) for k, v in data[group].data_vars.items()}


def _lead(num, *dims):
    """(dims, shape) of ``num`` independent draws: ``(chain, draw)`` of one chain under
    classic ArviZ, ``sample`` under ArviZ 1.x."""
    if arviz_backend() == "classic":
        return ("chain", "draw", *dims), (1, num)
    return ("sample", *dims), (num,)


def _flat(array):
    """The values of a DataArray with its draws' dimensions as one leading axis."""
    lead = [d for d in array.dims if d in ("chain", "draw", "sample")]
    return array.transpose(*lead, ...).values.reshape(-1, *array.shape[len(lead):])


def test_backend_type():
    data = to_arviz(model, guide, X, num_samples=4, max_plate_nesting=1)
    if arviz_backend() == "classic":
        import arviz as az

        assert isinstance(data, az.InferenceData)
    else:
        import xarray as xr

        assert isinstance(data, xr.DataTree)


def test_round_trip_against_direct_draws():
    pyro.set_rng_seed(0)
    data = to_arviz(model, guide, X, num_samples=S, max_plate_nesting=1)
    # the same draws, directly: the guide under a plate of S at dim -2, then the
    # posterior predictive drawn right after
    pyro.set_rng_seed(0)
    tr = poutine.trace(pyro.plate("draws", S, dim=-2)(guide)).get_trace(X)
    mu, w, z = (tr.nodes[n]["value"] for n in ("mu", "w", "z"))
    assert mu.shape == (S, 1) and w.shape == (S, 1, 2) and z.shape == (S, 5)
    x_rep = dist.Normal(z, 1.0).sample()
    post = data["posterior"]
    lead, shape = _lead(S)
    assert _variables(data, "posterior") == {
        "mu": (lead, shape), "w": ((*lead, "w_dim_0"), (*shape, 2)),
        "z": ((*lead, "data"), (*shape, 5)),
        "twice": ((*lead, "data"), (*shape, 5))}
    np.testing.assert_allclose(_flat(post["mu"]), mu[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(_flat(post["w"]), w[:, 0].numpy(), rtol=1e-6)
    np.testing.assert_allclose(_flat(post["z"]), z.numpy(), rtol=1e-6)
    np.testing.assert_allclose(_flat(post["twice"]), 2 * z.numpy(), rtol=1e-6)
    assert _variables(data, "observed_data") == {"x": (("data",), (5,))}
    np.testing.assert_allclose(data["observed_data"]["x"].values, X.numpy())
    log_lik = dist.Normal(z, 1.0).log_prob(X)
    assert _variables(data, "log_likelihood") == {"x": ((*lead, "data"), (*shape, 5))}
    np.testing.assert_allclose(_flat(data["log_likelihood"]["x"]), log_lik.numpy(),
                               rtol=1e-5)
    assert _variables(data, "posterior_predictive") == {
        "x": ((*lead, "data"), (*shape, 5))}
    np.testing.assert_allclose(_flat(data["posterior_predictive"]["x"]), x_rep.numpy(),
                               rtol=1e-6)
    log_p = (dist.Normal(0.0, 1.0).log_prob(mu[:, 0])
             + dist.Normal(0.0, 1.0).log_prob(w[:, 0]).sum(-1)
             + dist.Normal(mu + w[..., 0], 1.0).log_prob(z).sum(-1) + log_lik.sum(-1))
    log_q = (dist.Normal(0.3, 0.5).log_prob(mu[:, 0])
             + dist.Normal(torch.tensor([0.1, -0.2]), 0.4).log_prob(w[:, 0]).sum(-1)
             + dist.Normal(0.5 * X, 0.6).log_prob(z).sum(-1))
    stats = data["sample_stats"]
    assert set(stats.data_vars) == {"log_p", "log_q", "log_weight"}
    np.testing.assert_allclose(_flat(stats["log_p"]), log_p.numpy(), rtol=1e-5)
    np.testing.assert_allclose(_flat(stats["log_q"]), log_q.numpy(), rtol=1e-5)
    np.testing.assert_allclose(_flat(stats["log_weight"]), (log_p - log_q).numpy(),
                               rtol=1e-5, atol=1e-4)


def test_dims_coords_and_subsample():
    data = to_arviz(model, guide, X, num_samples=8, dims={"w": ["feature"], "x": ["obs"]},
                    coords={"feature": ["a", "b"], "obs": list("vwxyz")})
    assert data["posterior"]["w"].dims == _lead(8, "feature")[0]
    assert list(data["posterior"]["w"].coords["feature"].values) == ["a", "b"]
    assert data["log_likelihood"]["x"].dims == _lead(8, "obs")[0]
    assert list(data["observed_data"]["x"].coords["obs"].values) == list("vwxyz")
    with pytest.raises(ValueError, match="dims for 'w'"):
        to_arviz(model, guide, X, num_samples=2, dims={"w": []})

    def sub_model(x, idx):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 10, subsample=idx):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)

    def sub_guide(x, idx):
        pyro.sample("loc", dist.Normal(0.0, 1.0))

    idx = torch.tensor([7, 2, 4])
    sub = to_arviz(sub_model, sub_guide, torch.zeros(3), idx, num_samples=4)
    assert list(sub["log_likelihood"]["x"].coords["data"].values) == [7, 2, 4]


def test_mcmc_and_predictive():
    pyro.set_rng_seed(0)
    mcmc = pyro.infer.MCMC(pyro.infer.NUTS(model), num_samples=30, warmup_steps=20,
                           disable_progbar=True)
    mcmc.run(X)
    data = to_arviz(mcmc)
    samples = mcmc.get_samples()
    np.testing.assert_allclose(data["posterior"]["w"].values[0], samples["w"].numpy())
    np.testing.assert_allclose(data["posterior"]["z"].values[0], samples["z"].numpy())
    np.testing.assert_allclose(
        data["log_likelihood"]["x"].values[0],
        dist.Normal(samples["z"], 1.0).log_prob(X).numpy(), rtol=1e-5)
    assert {"log_p", "diverging"} <= set(data["sample_stats"].data_vars)
    predictive = pyro.infer.Predictive(model, guide=guide, num_samples=20,
                                       return_sites=["mu", "w", "z", "x"])(X)
    assert predictive["mu"].shape == (20, 1)  # Predictive's padded axis
    pdata = to_arviz(model, predictive, X)
    assert pdata["posterior"]["mu"].shape == _lead(20)[1]
    np.testing.assert_allclose(_flat(pdata["posterior"]["mu"]), predictive["mu"][:, 0])
    np.testing.assert_allclose(_flat(pdata["posterior_predictive"]["x"]),
                               predictive["x"].numpy())
    with pytest.raises(ValueError, match="latent site"):
        to_arviz(model, {"mu": predictive["mu"]}, X)
    with pytest.raises(ValueError, match="shape"):
        to_arviz(model, {**predictive, "w": torch.zeros(20, 3)}, X)


def test_arviz_functions_work_on_result():
    pyro.set_rng_seed(0)
    one = to_arviz(model, guide, X, num_samples=200)
    two = to_arviz(model, guide, X, num_samples=200, dims={"x": ["data"]})
    if arviz_backend() == "classic":
        import arviz as az
        import matplotlib

        matplotlib.use("Agg")
        assert set(az.summary(one, var_names=["mu", "w"]).index) == {"mu", "w[0]", "w[1]"}
        assert np.isfinite(az.loo(one)["elpd_loo"])
        assert set(az.compare({"one": one, "two": two}).index) == {"one", "two"}
        az.plot_posterior(one, var_names=["mu"])
        az.plot_ppc(one, num_pp_samples=20)
        matplotlib.pyplot.close("all")
    else:  # arviz_stats: summary's r-hat and loo/compare need (chain, draw)
        import arviz_stats as azs

        assert "mu" in str(azs.summary(one, var_names=["mu", "w"], sample_dims=["sample"],
                                       kind="stats").index[0])
        pyro.set_rng_seed(0)
        one = to_arviz(model, guide, X, num_samples=200, sample_dims=("chain", "draw"))
        two = to_arviz(model, guide, X, num_samples=200, dims={"x": ["data"]},
                       sample_dims=("chain", "draw"))
        assert "mu" in str(azs.summary(one, var_names=["mu", "w"]).index[0])
        assert np.isfinite(azs.loo(one).elpd)
        assert set(azs.compare({"one": one, "two": two}).index) == {"one", "two"}


def test_bad_input():
    with pytest.raises(ValueError, match="num_samples"):
        to_arviz(model, guide, X, num_samples=0)

    def partial_guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"\['w', 'z'\]"):
        to_arviz(model, partial_guide, X, num_samples=4)

    def unobserved(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed sample site"):
        to_arviz(unobserved, partial_guide, X, num_samples=4)
    assert "log_likelihood" not in _groups(
        to_arviz(unobserved, partial_guide, X, num_samples=4, log_likelihood=False))

    def positive_model(x):
        scale = pyro.sample("scale", dist.HalfNormal(1.0))
        pyro.sample("x", dist.Normal(0.0, scale), obs=x)

    def sign_guide(x):
        pyro.sample("scale", dist.Normal(0.0, 1.0))

    pyro.set_rng_seed(0)
    message = r"site 'scale' is non-finite in \d+ of 50 draws"
    with pytest.raises(ValueError, match=message), pyro.validation_enabled(False):
        to_arviz(positive_model, sign_guide, torch.tensor(1.0), num_samples=50)
    with pytest.raises(TypeError, match="to_arviz takes"):
        to_arviz(model, 3, X)


def _groups(data):
    return set(data.children) if hasattr(data, "children") else set(data.groups())


def test_history_to_arviz_and_pandas():
    history = History()
    for step in range(1, 6):
        history.add_loss(step, 10.0 - step)
    history.add_validation(5, 4.5)
    assert "training" in _groups(history.to_arviz())
    frame = history.to_dataframe()
    assert list(frame["loss"]) == [9.0, 8.0, 7.0, 6.0, 5.0]
    assert frame.loc[5, "validation"] == 4.5


def test_import_does_not_import_arviz():
    code = ("import sys, pyro_wakesleep, pyro_wakesleep.diagnostics, pyro_wakesleep.training; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'arviz', 'arviz_base', 'arviz_stats', 'arviz_plots'}); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_missing_arviz_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "arviz", None)
    monkeypatch.setitem(sys.modules, "arviz_base", None)
    with pytest.raises(ImportError, match=r"pip install pyro-wakesleep\[arviz\]"):
        to_arviz(model, guide, X, num_samples=2)


def test_posterior_predictive_with_an_observation_that_uses_a_deterministic_site():
    def det_model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            loc = pyro.deterministic("loc", mu + x)
            pyro.sample("y", dist.Normal(loc, 1.0), obs=x)

    def det_guide(x):
        pyro.sample("mu", dist.Normal(0.3, 0.5))

    data = to_arviz(det_model, det_guide, X, num_samples=S)
    assert data["posterior_predictive"]["y"].shape == (*_lead(S)[1], len(X))
    np.testing.assert_allclose(_flat(data["posterior"]["loc"]),
                               _flat(data["posterior"]["mu"])[:, None] + X.numpy(),
                               rtol=1e-5)


def _assert_same(one, two):
    assert _groups(one) == _groups(two)
    for group in _groups(one):
        if group == "training":
            continue
        assert _variables(one, group) == _variables(two, group), group
        for name, array in one[group].data_vars.items():
            np.testing.assert_allclose(array.values, two[group][name].values, rtol=1e-6)


def test_from_guide_is_to_arviz_of_a_guide():
    pyro.set_rng_seed(3)
    ours = from_guide(model, guide, X, num_samples=S, max_plate_nesting=1,
                      dims={"w": ["feature"]})
    pyro.set_rng_seed(3)
    _assert_same(ours, to_arviz(model, guide, X, num_samples=S, max_plate_nesting=1,
                                dims={"w": ["feature"]}))
    assert ours["posterior"]["w"].dims == _lead(S, "feature")[0]
    assert set(ours["sample_stats"].data_vars) == {"log_p", "log_q", "log_weight"}
    assert ours["sample_stats"]["log_p"].dims == _lead(S)[0]
    assert ours["observed_data"]["x"].dims == ("data",)  # no draws there
    reduced = from_guide(model, guide, X, num_samples=4, posterior_predictive=False,
                         log_likelihood=False)
    assert _groups(reduced) == {"posterior", "observed_data", "sample_stats"}
    with pytest.raises(ValueError, match="num_samples"):
        from_guide(model, guide, X, num_samples=0)
    with pytest.raises(TypeError, match="num_samples"):
        from_guide(model, guide, X, num_samples=2.5)


def test_from_samples_is_to_arviz_of_a_dict():
    pyro.set_rng_seed(4)
    draws = pyro.infer.Predictive(model, guide=guide, num_samples=12,
                                  return_sites=["mu", "w", "z", "x"])(X)
    pyro.set_rng_seed(5)
    ours = from_samples(model, draws, X)
    pyro.set_rng_seed(5)
    _assert_same(ours, to_arviz(model, draws, X))
    assert ours["posterior"]["z"].dims == _lead(12, "data")[0]
    assert set(ours["sample_stats"].data_vars) == {"log_p"}
    np.testing.assert_allclose(_flat(ours["posterior_predictive"]["x"]), draws["x"].numpy())
    with pytest.raises(ValueError, match="empty"):
        from_samples(model, {}, X)
    with pytest.raises(ValueError, match="not a sample site"):
        from_samples(model, {**draws, "nope": torch.zeros(12)}, X)
    with pytest.raises(ValueError, match="12 draws"):
        from_samples(model, {**draws, "mu": torch.zeros(7)}, X)


def test_from_mcmc_is_to_arviz_of_mcmc_and_keeps_chain_and_draw():
    pyro.set_rng_seed(0)
    mcmc = pyro.infer.MCMC(pyro.infer.NUTS(model), num_samples=15, warmup_steps=10,
                           disable_progbar=True)
    mcmc.run(X)
    pyro.set_rng_seed(6)
    ours = from_mcmc(mcmc)
    pyro.set_rng_seed(6)
    _assert_same(ours, to_arviz(mcmc))
    # MCMC draws lie along (chain, draw) under either ArviZ
    assert ours["posterior"]["z"].dims == ("chain", "draw", "data")
    assert ours["posterior"]["z"].shape == (1, 15, 5)
    assert ours["sample_stats"]["diverging"].dims == ("chain", "draw")
    np.testing.assert_allclose(ours["posterior"]["w"].values[0],
                               mcmc.get_samples()["w"].numpy())
    pyro.set_rng_seed(6)
    given = from_mcmc(mcmc, X)  # the run's arguments, given again
    np.testing.assert_allclose(given["log_likelihood"]["x"].values,
                               ours["log_likelihood"]["x"].values)
    flat = from_mcmc(mcmc, sample_dims=("sample",), posterior_predictive=False)
    assert flat["posterior"]["z"].dims == ("sample", "data")
    np.testing.assert_allclose(flat["posterior"]["z"].values, mcmc.get_samples()["z"].numpy())


@pytest.mark.parametrize("layout", [("chain", "draw"), ("sample",)])
def test_sample_dims_can_be_chosen(layout):
    pyro.set_rng_seed(7)
    data = from_guide(model, guide, X, num_samples=10, sample_dims=layout)
    shape = (1, 10) if layout == ("chain", "draw") else (10,)
    for group in ("posterior", "log_likelihood", "posterior_predictive", "sample_stats"):
        for name, array in data[group].data_vars.items():
            assert array.dims[:len(layout)] == layout, (group, name)
            assert array.shape[:len(layout)] == shape, (group, name)
    pyro.set_rng_seed(7)
    default = from_guide(model, guide, X, num_samples=10)
    np.testing.assert_allclose(_flat(data["posterior"]["w"]), _flat(default["posterior"]["w"]))
    with pytest.raises(ValueError, match="sample_dims"):
        from_guide(model, guide, X, num_samples=2, sample_dims=("draw",))


def test_default_sample_dims_follow_the_installed_arviz():
    data = from_guide(model, guide, X, num_samples=6)
    expected = ("chain", "draw") if arviz_backend() == "classic" else ("sample",)
    assert data["posterior"]["mu"].dims == expected


DIAGNOSTICS = Path(__file__).resolve().parents[1] / "pyro_wakesleep" / "diagnostics"
PACKAGE = "pyro_wakesleep.diagnostics"


def _imports(path):
    """The package modules a diagnostics module imports: (at module level, inside
    functions)."""
    tree = ast.parse(path.read_text())
    top, inner = set(), set()
    module_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        names = [n for n in names if n.startswith("pyro_wakesleep")]
        (top if id(node) in module_level else inner).update(names)
    return top, inner


def test_diagnostics_have_no_import_cycle():
    # the package's __init__ is a node too: a submodule importing from it is a cycle
    modules = {PACKAGE if p.stem == "__init__" else f"{PACKAGE}.{p.stem}": p
               for p in DIAGNOSTICS.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        top, inner = _imports(path)
        assert not {n for n in inner if n.startswith(PACKAGE)}, (
            f"{name} imports diagnostics modules inside a function: {sorted(inner)}")
        graph[name] = {n for n in top if n in modules}
    order, done = [], set()

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join([*path, name])}"
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, (*path, name))
        done.add(name)
        order.append(name)

    for name in sorted(graph):
        visit(name, ())
    assert len(order) == len(modules)

