"""fit(logger=...): what a logger receives (the history's values, per datapoint, the
learning rate, gradient statistics), TensorBoard's SummaryWriter, bad loggers."""

import math

import pyro
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_wakesleep import MovingAverageBaseline, ScoreFunctionELBO
from pyro_wakesleep.training import fit

X = (torch.tensor([1.0, 2.0, 1.5]),)


class FakeLogger:
    """Anything with add_scalar(tag, value, step) is a logger."""

    def __init__(self):
        self.scalars = {}
        self.flushed = 0

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, {})[step] = float(value)

    def flush(self):
        self.flushed += 1


def _model(x):
    loc = pyro.sample("loc", pyro.distributions.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("x", pyro.distributions.Normal(loc, 1.0), obs=x)


def _guide(x):
    loc = pyro.param("q_loc", torch.tensor(0.0))
    scale = pyro.param("q_scale", torch.tensor(0.5), constraint=pyro.distributions
                       .constraints.positive)
    pyro.sample("loc", pyro.distributions.Normal(loc, scale))


def _svi(optim=None):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    loss = ScoreFunctionELBO(num_particles=2, control_variate=MovingAverageBaseline(),
                             force_score_function=True)
    optim = optim or pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "gamma": 0.5})
    return pyro.infer.SVI(_model, _guide, optim, loss), loss


def test_logger_gets_the_history_per_datapoint_learning_rate_and_gradients():
    svi, _ = _svi()
    logger = FakeLogger()
    history = fit(svi, X, 6, validation=X, validate_every=2, gradient_stats_every=3,
                  gradient_stats_draws=3, logger=logger, progress=False)
    s = logger.scalars
    assert s["train/loss"] == dict(zip(history.steps, history.losses, strict=True))
    assert s["train/loss_per_datapoint"] == pytest.approx(
        {k: v / 3 for k, v in s["train/loss"].items()})
    assert s["validation/loss"] == dict(history.validation)
    assert s["validation/loss_per_datapoint"] == pytest.approx(
        {k: v / 3 for k, v in dict(history.validation).items()})
    # the rate each step used: 0.05, halved after every step (ExponentialLR, stepped by fit)
    assert s["lr"] == pytest.approx({k: 0.05 * 0.5 ** (k - 1) for k in range(1, 7)})
    for row in history.gradients:
        for key in ("mean_norm", "variance", "snr", "mean_snr"):
            assert s[f"gradients/{row['group']}/{key}"][row["step"]] == pytest.approx(row[key])
    assert set(s["gradients/guide/snr"]) == {3, 6}
    assert logger.flushed == 1


def test_module_route_logs_each_param_group_and_datapoints_override():
    _, loss = _svi()

    class Guide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(0.0))
            self.b = torch.nn.Parameter(torch.tensor(0.0))

        def forward(self, x):
            pyro.sample("loc", pyro.distributions.Normal(self.a + self.b, 0.5))

    guide = Guide()
    module = loss(_model, guide)
    optimizer = torch.optim.SGD([{"params": [guide.a], "lr": 0.1},
                                 {"params": [guide.b], "lr": 0.01}])
    logger = FakeLogger()
    batches = DataLoader(TensorDataset(torch.randn(8)), batch_size=4)
    history = fit(module, batches, 3, optimizer=optimizer, logger=logger, progress=False,
                  validation=batches, validate_every=3, datapoints=lambda args, kw: 2)
    s = logger.scalars
    assert s["lr/group0"] == {1: 0.1, 2: 0.1, 3: 0.1} and set(s["lr/group1"].values()) == {0.01}
    assert s["train/loss_per_datapoint"] == pytest.approx(
        {k: v / 2 for k, v in s["train/loss"].items()})
    assert s["validation/loss_per_datapoint"][3] == pytest.approx(history.validation[0][1] / 2)
    # by default a batch holds as many datapoints as its first tensor's length
    logger = FakeLogger()
    fit(module, batches, 1, optimizer=optimizer, logger=logger, progress=False)
    s = logger.scalars
    assert s["train/loss"][1] / 4 == pytest.approx(s["train/loss_per_datapoint"][1])


def test_a_callable_validation_is_logged_without_a_per_datapoint_value():
    svi, _ = _svi(pyro.optim.Adam({"lr": 0.05}))
    logger = FakeLogger()
    fit(svi, X, 2, validation=lambda: 1.5, validate_every=1, logger=logger, progress=False)
    assert logger.scalars["validation/loss"] == {1: 1.5, 2: 1.5}
    assert "validation/loss_per_datapoint" not in logger.scalars
    assert logger.scalars["lr"] == {1: 0.05, 2: 0.05}


@pytest.mark.parametrize("logger", [object(), "runs/x", type("NoCall", (), {"add_scalar": 3})()])
def test_a_bad_logger_is_refused_before_training(logger):
    svi, _ = _svi()
    with pytest.raises(TypeError, match=r"logger must be .*add_scalar.*got " + repr(logger)[:8]):
        fit(svi, X, 2, logger=logger, progress=False)
    assert list(pyro.get_param_store().keys()) == []


@pytest.mark.parametrize("datapoints, error", [(0, ValueError), ("3", TypeError),
                                               (2.0, TypeError)])
def test_bad_datapoints_are_refused(datapoints, error):
    svi, _ = _svi()
    with pytest.raises(error, match="datapoints"):
        fit(svi, X, 2, datapoints=datapoints, progress=False)
    with pytest.raises(ValueError, match="datapoints gave 0"):
        fit(svi, X, 2, datapoints=lambda args, kwargs: 0, logger=FakeLogger(), progress=False)


def test_tensorboard_summary_writer(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    svi, _ = _svi()
    writer = SummaryWriter(log_dir=str(tmp_path))
    history = fit(svi, X, 4, validation=X, validate_every=2, logger=writer, progress=False)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/loss_per_datapoint", "validation/loss",
            "validation/loss_per_datapoint", "lr"} <= tags
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == history.steps
    assert all(math.isclose(v, w, rel_tol=1e-6) for (_, v), w in
               zip(logged, history.losses, strict=True))
