"""Checkpoints are read with torch.load(weights_only=True): a planted pickle that would run
code is refused (naming the path) before any of it runs or anything changes, while fit's
own checkpoints (constrained parameters, NumPy's random state, schedulers) need nothing
beyond SAFE_TYPES and still resume exactly."""

import os
import pickle
import re

import pyro
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_wakesleep import MovingAverageBaseline, ScoreFunctionELBO
from pyro_wakesleep.checkpoints import FORMAT, SAFE_TYPES, load_checkpoint
from pyro_wakesleep.training import fit

X = (torch.tensor([1.0, 2.0, 1.5]),)


def _svi(optim=None):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    def model(x):
        loc = pyro.sample("loc", pyro.distributions.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", pyro.distributions.Normal(loc, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("q_loc", torch.tensor(0.0))
        scale = pyro.param("q_scale", torch.tensor(0.5),
                           constraint=pyro.distributions.constraints.interval(0.01, 2.0))
        weight = pyro.param("q_w", torch.ones(2) / 2,
                            constraint=pyro.distributions.constraints.simplex)
        pyro.sample("loc", pyro.distributions.Normal(loc * weight[0] * 2, scale))

    loss = ScoreFunctionELBO(num_particles=2, control_variate=MovingAverageBaseline(),
                             force_score_function=True)
    optim = optim or pyro.optim.LambdaLR({"optimizer": torch.optim.Adam,
                                          "optim_args": {"lr": 0.05},
                                          "lr_lambda": lambda k: 0.9**k})
    return pyro.infer.SVI(model, guide, optim, loss), loss


class _WritesAFile:
    """Unpickling it (with pickle, or torch.load(weights_only=False)) writes ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def _plant(path, how, marker):
    payload = {"format": FORMAT, "step": 1, "trainer": _WritesAFile(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:  # a bare pickle (torch.load's legacy format), at pickle protocols 2 and 5
        path.write_bytes(pickle.dumps(payload, protocol=int(how[-1])))


def test_the_planted_pickle_would_run_code(tmp_path):
    """The test's premise: a plain load of the planted file writes the marker."""
    marker, path = tmp_path / "marker.txt", tmp_path / "evil.ckpt"
    _plant(path, "torch.save", marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 5:UserWarning")
@pytest.mark.parametrize("how", ["torch.save", "pickle2", "pickle5"])
def test_a_planted_checkpoint_is_refused_before_anything_runs_or_changes(tmp_path, how):
    marker, path = tmp_path / "marker.txt", tmp_path / "evil.ckpt"
    _plant(path, how, marker)
    before = path.read_bytes()
    svi, loss = _svi()
    rng = torch.get_rng_state()
    match = (r"checkpoint '.*evil\.ckpt' refused: it needs .*exec.*arbitrary code"
             if how != "pickle5" else r"checkpoint '.*evil\.ckpt' cannot be read")
    with pytest.raises(ValueError, match=match):
        fit(svi, X, 3, checkpoint=path, progress=False)
    assert not marker.exists()
    assert path.read_bytes() == before
    assert list(pyro.get_param_store().keys()) == [] and svi.optim.get_state() == {}
    assert torch.equal(torch.get_rng_state(), rng) and loss.state_dict() == {}
    with pytest.raises(ValueError, match="evil.ckpt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_fit_checkpoints_need_only_the_safe_types_and_resume_exactly(tmp_path):
    """Constrained parameters (interval, simplex), a scheduler whose settings hold a
    function, NumPy's random state, history with gradient statistics and the best state
    for restore_best: all load under weights_only=True."""
    ckpt = tmp_path / "run.ckpt"
    loader = DataLoader(TensorDataset(X[0]), batch_size=2, shuffle=True)
    kwargs = dict(validation=X, validate_every=2, restore_best=False,
                  gradient_stats_every=3, gradient_stats_draws=3, progress=False)
    svi, _ = _svi()
    fit(svi, loader, 7, **kwargs)
    straight = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    svi, _ = _svi()
    fit(svi, loader, 4, checkpoint=ckpt, **kwargs)
    names = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_TYPES}
    needed = set(torch.serialization.get_unsafe_globals_in_checkpoint(ckpt))
    assert needed and needed <= names | {"numpy.core.multiarray._reconstruct"}, needed - names
    assert any("constraints" in n for n in needed) and "numpy.ndarray" in needed
    safe_before = set(torch.serialization.get_safe_globals())
    saved = load_checkpoint(ckpt)
    assert set(torch.serialization.get_safe_globals()) == safe_before  # allowed for one load
    assert saved["optimizer_settings"]["scheduler"][0] == "LambdaLR"
    assert "<lambda>" in saved["optimizer_settings"]["scheduler"][1]["lr_lambda"]
    svi, _ = _svi()
    fit(svi, loader, 7, checkpoint=ckpt, **kwargs)
    resumed = dict(pyro.get_param_store().named_parameters())
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


class Positive(torch.distributions.constraints.Constraint):  # a user's own class
    def check(self, value):
        return value > 0


torch.distributions.transform_to.register(
    Positive, lambda constraint: torch.distributions.transforms.ExpTransform())


def test_a_parameter_with_a_constraint_of_ones_own_needs_allow_listing(tmp_path):
    ckpt = tmp_path / "own.ckpt"
    svi, _ = _svi(pyro.optim.Adam({"lr": 0.05}))
    pyro.param("own", torch.tensor(1.0), constraint=Positive())
    fit(svi, X, 2, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match=r"own\.ckpt' refused: it needs .*Positive.*"
                                         "add_safe_globals"):
        load_checkpoint(ckpt)
    with torch.serialization.safe_globals([Positive]):
        assert load_checkpoint(ckpt)["step"] == 2


def test_no_torch_load_in_the_package_reads_unsafely():
    root = os.path.join(os.path.dirname(__file__), os.pardir, "pyro_wakesleep")
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), encoding="utf-8") as file:
                    text = file.read()
                assert "weights_only=False" not in text, name
                for call in re.findall(r"torch\.load\(([^)]*)\)", text):
                    assert "weights_only=True" in call, (name, call)
