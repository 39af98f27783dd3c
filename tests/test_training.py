"""fit(): exact resume in a fresh process (also after Ctrl-C mid-step), early stopping,
callbacks, gradient statistics in the history, the module route, bad input."""

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap

import pyro
import pytest
import torch

from pyro_wakesleep import MovingAverageBaseline, ScoreFunctionELBO
from pyro_wakesleep.checkpoints import check_optimizer_settings, optimizer_settings
from pyro_wakesleep.distributed import derived_rng_state
from pyro_wakesleep.training import History, fit

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    import pyro, torch
    from torch.utils.data import DataLoader, TensorDataset
    from pyro_wakesleep import MovingAverageBaseline, NeuralBaseline, ScoreFunctionELBO
    from pyro_wakesleep.examples.models import SigmoidBeliefNet
    from pyro_wakesleep.training import fit

    def build(interrupt_at=None):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        x = torch.bernoulli(torch.full((40, 12), 0.3))
        sbn = SigmoidBeliefNet((12, 5, 3))
        baseline = torch.nn.Sequential(torch.nn.Linear(12, 1), torch.nn.Flatten(0))
        loss = ScoreFunctionELBO(num_particles=2, control_variate={
            "h1": NeuralBaseline(baseline), "h2": MovingAverageBaseline()})
        calls = [0]

        def guide(x):  # optionally sends Ctrl-C to itself in the middle of a step
            calls[0] += 1
            if calls[0] == interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            sbn.guide(x)

        svi = pyro.infer.SVI(sbn.model, guide, pyro.optim.Adam({"lr": 0.02}), loss)
        loader = DataLoader(TensorDataset(x), batch_size=15, shuffle=True)  # ragged epochs
        return svi, loader, loss, x

    def run(steps, checkpoint=None, interrupt_at=None):
        svi, loader, loss, x = build(interrupt_at)
        history = fit(svi, loader, steps, checkpoint=checkpoint, checkpoint_every=3,
                      validation=(x,), validate_every=2, progress=False)
        params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
        return {"params": params, "objective": loss.state_dict(), "losses": history.losses,
                "validation": history.validation}

    if __name__ == "__main__":
        torch.save(run(int(sys.argv[1]), sys.argv[2]), sys.argv[3])
''')


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "resume_script.py"
    path.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("resume_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, path


def _resume_in_fresh_process(path, steps, checkpoint, out):
    subprocess.run([sys.executable, str(path), str(steps), str(checkpoint), str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    return torch.load(out, weights_only=False)


def _assert_identical(a, b):
    assert a["params"].keys() == b["params"].keys()
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert a["objective"].keys() == b["objective"].keys()
    assert any(k.startswith("h1.module") for k in a["objective"])  # NVIL's learned weights
    assert any(k.startswith("h2.average") for k in a["objective"])  # moving average
    assert all(torch.equal(a["objective"][k], b["objective"][k]) for k in a["objective"])
    assert a["losses"] == b["losses"] and a["validation"] == b["validation"]


def test_resume_in_fresh_process_is_exact_also_after_ctrl_c(script, tmp_path):
    # train, stop (Ctrl-C arriving mid-step: the step finishes, the state is saved),
    # restore in a fresh process, train on: identical to the run that never stopped
    module, path = script
    straight = module.run(11)
    checkpoint = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt, match="resume from"):
        module.run(11, checkpoint, interrupt_at=12)  # inside the guide, mid-step
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    saved = torch.load(checkpoint, weights_only=False)
    assert 3 < saved["step"] < 11  # after a periodic save (every 3 steps)
    assert len(saved["history"]["losses"]) == saved["step"]
    resumed = _resume_in_fresh_process(path, 11, checkpoint, tmp_path / "out.pt")
    _assert_identical(straight, resumed)
    assert torch.load(checkpoint, weights_only=False)["step"] == 11


def _gauss_svi():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    def model(x):
        loc = pyro.sample("loc", pyro.distributions.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", pyro.distributions.Normal(loc, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("q_loc", torch.tensor(0.0))
        pyro.sample("loc", pyro.distributions.Normal(loc, 0.5))

    loss = ScoreFunctionELBO(num_particles=2, control_variate=MovingAverageBaseline(),
                             force_score_function=True)
    return pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss), loss


def test_early_stopping_restore_best_and_callbacks():
    svi, _ = _gauss_svi()
    x = torch.tensor([1.0, 2.0, 1.5])
    values = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8])
    seen = {}

    def remember(info):
        seen[info.step] = pyro.param("q_loc").detach().clone()

    history = fit(svi, (x,), 50, validation=lambda: next(values), validate_every=1,
                  patience=2, restore_best=True, callbacks=[remember], progress=False)
    assert history.stopped_early and len(history) == 5
    assert history.best == (3, 3.0)
    assert torch.equal(pyro.param("q_loc").detach(), seen[3])
    svi, _ = _gauss_svi()
    history = fit(svi, (x,), 50, callbacks=[lambda info: info.step == 4], progress=True)
    assert len(history) == 4 and history.stopped_early


def test_gradient_stats_in_history_do_not_change_training():
    x = torch.tensor([1.0, 2.0, 1.5])
    svi, _ = _gauss_svi()
    plain = fit(svi, (x,), 6, progress=False)
    plain_loc = pyro.param("q_loc").detach().clone()
    svi, _ = _gauss_svi()
    watched = fit(svi, {"x": x}, 6, gradient_stats_every=3, gradient_stats_draws=5,
                  progress=False)
    assert torch.equal(pyro.param("q_loc").detach(), plain_loc)
    assert watched.losses == plain.losses
    frame = watched.gradients_dataframe()
    assert sorted(set(frame.index.get_level_values("step"))) == [3, 6]
    assert set(frame.index.get_level_values("group")) == {"guide"}


def test_module_route_resume_and_history_outputs(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    x = torch.tensor([1.0, 2.0, 1.5])

    class Guide(pyro.nn.PyroModule):
        def __init__(self):
            super().__init__()
            self.q_loc = torch.nn.Parameter(torch.tensor(0.0))

        def forward(self, x):
            pyro.sample("loc", pyro.distributions.Normal(self.q_loc, 0.5))

    def run(steps, checkpoint=None):
        svi, loss = _gauss_svi()
        module = loss(svi.model, Guide())
        optimizer = torch.optim.Adam(module.parameters(), lr=0.05)
        history = fit(module, (x,), steps, optimizer=optimizer, checkpoint=checkpoint,
                      checkpoint_every=2, progress=False)
        return history, {k: v.clone() for k, v in module.state_dict().items()}

    straight, state = run(7)
    ckpt = tmp_path / "module.ckpt"
    run(4, ckpt)
    resumed, resumed_state = run(7, ckpt)
    assert resumed.losses == straight.losses
    assert state.keys() == resumed_state.keys() and "control_variates.loc.average" in state
    assert all(torch.equal(state[k], resumed_state[k]) for k in state)
    assert list(straight.to_dataframe()["loss"]) == straight.losses
    fig = straight.plot()
    assert fig.axes
    matplotlib.pyplot.close(fig)
    assert "7 steps" in repr(straight) and isinstance(straight, History)


def test_bad_input(tmp_path):
    svi, loss = _gauss_svi()
    x = torch.tensor([1.0])
    with pytest.raises(ValueError, match="num_steps"):
        fit(svi, (x,), -1)
    with pytest.raises(TypeError, match="SVI"):
        fit(object(), (x,), 1)
    with pytest.raises(ValueError, match="optimizer"):
        fit(loss(svi.model, svi.guide), (x,), 1)
    with pytest.raises(TypeError, match="data"):
        fit(svi, 3, 1)
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"step": 1}, bogus)
    with pytest.raises(ValueError, match="not a checkpoint"):
        fit(svi, (x,), 2, checkpoint=bogus)
    assert not os.path.exists(tmp_path / "never.ckpt.tmp")


# -- checkpoints: a different model, corrupt files, unwritable paths, atomic saves -----------
def _svi(params, control_variate=None):
    """SVI on the Gaussian model whose guide has ``params`` (name -> initial value)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    def model(x):
        loc = pyro.sample("loc", pyro.distributions.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", pyro.distributions.Normal(loc, 1.0), obs=x)

    def guide(x):
        values = [pyro.param(name, value).sum() for name, value in params.items()]
        pyro.sample("loc", pyro.distributions.Normal(sum(values), 0.5))

    loss = ScoreFunctionELBO(num_particles=2, control_variate=control_variate,
                             force_score_function=True)
    return pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss), loss


X = (torch.tensor([1.0, 2.0, 1.5]),)
Q = {"q_loc": torch.tensor(0.0), "q_shift": torch.tensor(0.1)}


@pytest.mark.parametrize("params, control_variate, match", [
    ({"q_loc": torch.tensor(0.0)}, None, "checkpoint has parameter 'q_shift', which"),
    ({**Q, "q_new": torch.tensor(0.0)}, None, "parameter 'q_new' of this run is missing"),
    ({**Q, "q_loc": torch.zeros(2)}, None,
     r"parameter 'q_loc' has shape \(\) in the checkpoint but \(2,\) in this run"),
    (Q, {"loc": MovingAverageBaseline()}, "control variate state 'loc.average' of this run"),
])
def test_resume_from_another_model_raises_and_changes_nothing(tmp_path, params,
                                                              control_variate, match):
    ckpt = tmp_path / "run.ckpt"
    svi, _ = _svi(Q, MovingAverageBaseline() if control_variate is None else None)
    pyro.param("unrelated", torch.tensor(7.0))  # in the param store of both runs
    fit(svi, X, 3, checkpoint=ckpt, progress=False)
    before = ckpt.read_bytes()
    svi, loss = _svi(params, control_variate)
    store = pyro.get_param_store()
    pyro.param("unrelated", torch.tensor(7.0))
    objective, rng = loss.state_dict(), torch.get_rng_state()
    with pytest.raises(ValueError, match=match):
        fit(svi, X, 6, checkpoint=ckpt, progress=False)
    assert list(store.keys()) == ["unrelated"] and pyro.param("unrelated").item() == 7.0
    assert loss.state_dict().keys() == objective.keys()
    assert all(torch.equal(loss.state_dict()[k], objective[k]) for k in objective)
    assert svi.optim.get_state() == {} and torch.equal(torch.get_rng_state(), rng)
    assert ckpt.read_bytes() == before


def test_resume_from_another_route_or_optimizer_raises(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    svi, loss = _svi(Q)
    fit(svi, X, 2, checkpoint=ckpt, progress=False)

    class Guide(pyro.nn.PyroModule):
        def __init__(self, n):
            super().__init__()
            self.q = torch.nn.Parameter(torch.zeros(n))

        def forward(self, x):
            pyro.sample("loc", pyro.distributions.Normal(self.q.sum(), 0.5))

    svi, loss = _svi(Q)
    module = loss(svi.model, Guide(1))
    optimizer = torch.optim.Adam(module.parameters())
    with pytest.raises(ValueError, match=r"written by fit\(SVI\).*this run is fit\(module"):
        fit(module, X, 4, optimizer=optimizer, checkpoint=ckpt, progress=False)
    ckpt = tmp_path / "module.ckpt"
    fit(module, X, 2, optimizer=optimizer, checkpoint=ckpt, progress=False)
    module = loss(svi.model, Guide(2))
    with pytest.raises(ValueError, match=r"module state 'guide.q' has shape \(1,\)"):
        fit(module, X, 4, optimizer=torch.optim.Adam(module.parameters()), checkpoint=ckpt,
            progress=False)
    module = loss(svi.model, Guide(1))
    extra = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match=r"param groups of sizes \[2\] in this run but \[1\]"):
        fit(module, X, 4, optimizer=torch.optim.Adam([*module.parameters(), extra]),
            checkpoint=ckpt, progress=False)


def test_resume_keeps_state_of_lazily_created_control_variates(tmp_path):
    # a site reached only at later steps (stochastic control flow): its control variate's
    # saved state is kept until this run creates it, and resuming is not refused
    calls = [0]

    def build():
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        calls[0] = 0

        def model(x):
            pyro.sample("a", pyro.distributions.Normal(0.0, 1.0))
            if calls[0] > 2:
                pyro.sample("late", pyro.distributions.Normal(0.0, 1.0))
            pyro.sample("x", pyro.distributions.Normal(0.0, 1.0), obs=x)

        def guide(x):
            calls[0] += 1
            q = pyro.param("q", torch.tensor(0.0))
            pyro.sample("a", pyro.distributions.Normal(q, 1.0))
            if calls[0] > 2:
                pyro.sample("late", pyro.distributions.Normal(q, 1.0))

        loss = ScoreFunctionELBO(control_variate=MovingAverageBaseline(),
                                 force_score_function=True)
        return pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), loss), loss

    ckpt = tmp_path / "run.ckpt"
    svi, loss = build()
    fit(svi, (torch.tensor(1.0),), 5, checkpoint=ckpt, progress=False)
    saved = loss.state_dict()
    assert "late.average" in saved
    svi, loss = build()
    fit(svi, (torch.tensor(1.0),), 5, checkpoint=ckpt, progress=False)  # resumes, at the end
    assert torch.equal(loss.state_dict()["late.average"], saved["late.average"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "truncated"])
def test_corrupt_or_empty_checkpoint_is_a_clear_error(tmp_path, content):
    ckpt = tmp_path / "run.ckpt"
    if content == "truncated":
        svi, _ = _svi(Q)
        fit(svi, X, 2, checkpoint=ckpt, progress=False)
        content = ckpt.read_bytes()[:100]
    ckpt.write_bytes(content)
    svi, _ = _svi(Q)
    with pytest.raises(ValueError, match=r"run\.ckpt' cannot be read.*resume=False"):
        fit(svi, X, 2, checkpoint=ckpt, progress=False)
    assert list(pyro.get_param_store().keys()) == []
    torch.save([1, 2], ckpt)
    with pytest.raises(ValueError, match="not a checkpoint of fit"):
        fit(svi, X, 2, checkpoint=ckpt, progress=False)


def test_unwritable_checkpoint_path_is_found_before_training(tmp_path):
    (tmp_path / "a_file").write_text("")
    steps = []
    for path, match in [(tmp_path / "a_file" / "run.ckpt", "cannot write checkpoint"),
                        (tmp_path, "is a directory")]:
        svi, _ = _svi(Q)
        with pytest.raises(ValueError, match=match) as error:
            fit(svi, X, 2, checkpoint=path, callbacks=[steps.append], progress=False)
        assert str(path) in str(error.value)
    assert steps == [] and list(pyro.get_param_store().keys()) == []
    svi, _ = _svi(Q)  # a directory that does not exist yet is created, as before
    fit(svi, X, 1, checkpoint=tmp_path / "new" / "dir" / "run.ckpt", progress=False)
    assert os.listdir(tmp_path / "new" / "dir") == ["run.ckpt"]


def test_a_crash_during_a_save_loses_nothing(tmp_path, monkeypatch):
    ckpt = tmp_path / "run.ckpt"
    svi, _ = _svi(Q)
    fit(svi, X, 2, checkpoint=ckpt, progress=False)
    save = torch.save

    def crash(obj, f, *args, **kwargs):  # writes half a file, then dies
        save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)):
            with open(f, "r+b") as file:
                file.truncate(50)
        else:
            f.seek(50)
            f.truncate()
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    svi, _ = _svi(Q)
    with pytest.raises(OSError, match="disk full"):
        fit(svi, X, 4, checkpoint=ckpt, checkpoint_every=1, progress=False)
    assert os.listdir(tmp_path) == ["run.ckpt"]  # no temporary file left behind
    assert torch.load(ckpt, weights_only=False)["step"] == 2


def _callback(info):
    return None


@pytest.mark.parametrize("kwargs, error, match", [
    ({"patience": "3", "validation": X}, TypeError, "patience must be an int"),
    ({"patience": 0, "validation": X}, ValueError, "patience must be >= 1"),
    ({"callbacks": [None]}, TypeError, r"callbacks\[0\] must be callable, got None"),
    ({"callbacks": [_callback, 3]}, TypeError, r"callbacks\[1\] must be callable"),
    ({"callbacks": _callback}, TypeError, "callbacks must be a list"),
    ({"validation": 5}, TypeError, "validation must be"),
    ({"validation": "x"}, TypeError, "validation must be"),
    ({"num_steps": "3"}, TypeError, "num_steps must be an int"),
    ({"num_steps": 2.0}, TypeError, "num_steps must be an int"),
    ({"validate_every": 0}, ValueError, "validate_every must be >= 1"),
    ({"checkpoint_every": "2"}, TypeError, "checkpoint_every must be an int"),
    ({"gradient_stats_every": 0}, ValueError, "gradient_stats_every must be >= 1"),
    ({"gradient_stats_draws": 1}, ValueError, "gradient_stats_draws must be >= 2"),
    ({"min_delta": "0"}, TypeError, "min_delta must be a float"),
    ({"min_delta": -1.0}, ValueError, "min_delta must be in"),
    ({"restore_best": "yes", "validation": X}, TypeError, "restore_best must be a bool"),
    ({"resume": None}, TypeError, "resume must be a bool"),
    ({"progress": 1}, TypeError, "progress must be a bool"),
    ({"checkpoint": 5}, TypeError, "checkpoint must be a path"),
    ({"description": 5}, TypeError, "description must be a str"),
    ({"optimizer": "adam"}, TypeError, "optimizer must be a torch.optim.Optimizer"),
    ({"optimizer": torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)},
     ValueError, "optimizer is for fit\\(module"),
    ({"patience": 2}, ValueError, "need validation"),
    ({"restore_best": True}, ValueError, "need validation"),
])
def test_bad_arguments_are_refused_before_training(kwargs, error, match):
    svi, _ = _svi(Q)
    kwargs = {"num_steps": 3, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        fit(svi, X, **kwargs)
    assert list(pyro.get_param_store().keys()) == []  # no step was taken


# -- resuming with other optimizer settings is refused, naming the setting ------------------
class _LocGuide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_loc = torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, x):
        pyro.sample("loc", pyro.distributions.Normal(self.q_loc, 0.5))


def _module_run(tmp_path, steps, lr=0.05, optimizer=torch.optim.Adam, decay=False):
    svi, loss = _svi({})
    module = loss(svi.model, _LocGuide())
    opt = optimizer(module.parameters(), lr=lr)

    def halve(info):  # a callback that changes the learning rate during training
        for group in opt.param_groups:
            group["lr"] *= 0.5

    return fit(module, X, steps, optimizer=opt, checkpoint=tmp_path / "lr.ckpt",
               checkpoint_every=2, progress=False, callbacks=[halve] if decay else [])


def test_resume_with_another_learning_rate_raises_and_changes_nothing(tmp_path):
    _module_run(tmp_path, 2)
    before = torch.load(tmp_path / "lr.ckpt", weights_only=False)
    with pytest.raises(ValueError, match=r"'lr' of param group 0 is 0.01 in this run but "
                                         r"0.05 in the checkpoint.*resume=False"):
        _module_run(tmp_path, 4, lr=0.01)
    with pytest.raises(ValueError, match="optimizer is SGD in this run but Adam"):
        _module_run(tmp_path, 4, optimizer=torch.optim.SGD)
    after = torch.load(tmp_path / "lr.ckpt", weights_only=False)
    assert after["step"] == before["step"] == 2
    assert len(_module_run(tmp_path, 4).losses) == 4  # the same settings resume
    with pytest.raises(ValueError, match="'lr'"):  # also when no step is left to do
        _module_run(tmp_path, 4, lr=0.01)


def test_settings_are_those_the_optimizer_was_built_with(tmp_path):
    """A callback that changes the learning rate during training does not make the resume
    fail: the settings compared are those at the start of the run."""
    straight = _module_run(tmp_path / "a", 6, decay=True)
    _module_run(tmp_path / "b", 3, decay=True)
    resumed = _module_run(tmp_path / "b", 6, decay=True)
    assert resumed.losses == straight.losses


def test_svi_resume_with_another_learning_rate_raises(tmp_path):
    svi, _ = _svi(Q)
    fit(svi, X, 2, checkpoint=tmp_path / "svi.ckpt", progress=False)
    svi, _ = _svi(Q)
    svi.optim.pt_optim_args = {"lr": 0.2}
    with pytest.raises(ValueError, match=r"'lr' is 0.2 in this run but 0.05 in the checkpoint"):
        fit(svi, X, 4, checkpoint=tmp_path / "svi.ckpt", progress=False)
    svi, _ = _svi(Q)
    assert len(fit(svi, X, 4, checkpoint=tmp_path / "svi.ckpt", progress=False).losses) == 4


def test_optimizer_settings_per_parameter_and_bad_input():
    svi, _ = _svi(Q)
    svi.optim = pyro.optim.Adam(lambda name: {"lr": 0.1 if name == "q_loc" else 0.2})
    settings = optimizer_settings(svi, None, names=["q_loc", "q_shift"])
    assert settings["per_param_args"] == {"q_loc": {"lr": 0.1}, "q_shift": {"lr": 0.2}}
    other = {**settings, "per_param_args": {"q_loc": {"lr": 0.1}, "q_shift": {"lr": 0.3}}}
    with pytest.raises(ValueError, match=r"'lr' of parameter 'q_shift' is 0.3 in this run"):
        check_optimizer_settings(settings, other)
    check_optimizer_settings(settings, settings)
    check_optimizer_settings(None, settings)  # an older checkpoint: nothing to compare
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        optimizer_settings(torch.nn.Linear(1, 1), None)


def test_derived_rng_state_is_deterministic_per_rank_and_changes_nothing():
    pyro.set_rng_seed(3)
    state = pyro.util.get_rng_state()
    first, again, other = (derived_rng_state(state, r) for r in (1, 1, 2))
    assert torch.equal(first["torch"], again["torch"])
    assert not torch.equal(first["torch"], other["torch"])
    assert not torch.equal(first["torch"], state["torch"])
    assert torch.equal(pyro.util.get_rng_state()["torch"], state["torch"])
    with pytest.raises(ValueError, match="rank"):
        derived_rng_state(state, 0)
