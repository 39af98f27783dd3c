"""The dataflow layer: provenance through torch operations, and reads into Python."""

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch

from pyro_wakesleep.dataflow import Dataflow, TrackDraws, sequential_frames


def labelled(flow, value, bits):
    value = torch.as_tensor(value, dtype=torch.float32)
    flow.stamp(value, bits)
    return value


# -- provenance ---------------------------------------------------------------------------
def test_provenance_is_the_union_of_the_inputs_labels():
    flow = Dataflow()
    with flow:
        a, b = labelled(flow, [1.0, 2.0], 0b01), labelled(flow, [3.0, 4.0], 0b10)
        c = torch.zeros(2)
        assert flow.provenance(a + b) == 0b11
        assert flow.provenance(a * 2.0) == 0b01
        assert flow.provenance(c + 1) == 0
        assert flow.provenance(torch.cat([a, c])) == 0b01
        assert flow.provenance(torch.stack([a, b]).sum(0)) == 0b11
        assert flow.provenance(a.detach()) == 0b01  # values, not gradients
        with torch.no_grad():
            assert flow.provenance(torch.exp(b)) == 0b10
        assert flow.provenance(a.T if a.dim() == 2 else a.data) == 0b01  # getters too
        assert flow.provenance(a.unbind()[1]) == 0b01


def test_provenance_flows_through_sampling_ops():
    flow = Dataflow()
    with flow:
        probs = labelled(flow, [0.3, 0.6], 0b100)
        assert flow.provenance(torch.bernoulli(probs)) == 0b100
        assert flow.provenance(dist.Bernoulli(probs).sample()) == 0b100
        assert flow.provenance(torch.randn(3)) == 0  # no labelled input, random=0


def test_random_ops_get_the_random_label():
    flow = Dataflow(random=0b1000)
    with flow:
        assert flow.provenance(torch.randn(3)) == 0b1000
        assert flow.provenance(torch.empty(3).uniform_()) == 0b1000
        assert flow.provenance(torch.zeros(3) + 1) == 0


def test_in_place_writes_make_the_target_depend_on_the_written_values():
    flow = Dataflow()
    with flow:
        target = torch.zeros(3)
        target[1] = labelled(flow, 2.0, 0b1)
        assert flow.provenance(target) == 0b1
        other = torch.zeros(3)
        other.add_(labelled(flow, [1.0, 1.0, 1.0], 0b10))
        assert flow.provenance(other) == 0b10
        out = torch.empty(3)
        torch.add(labelled(flow, [1.0, 2.0, 3.0], 0b100), 1.0, out=out)
        assert flow.provenance(out) == 0b100


def test_an_op_returning_its_input_does_not_taint_it_with_the_others():
    flow = Dataflow()
    with flow:
        a, b = labelled(flow, [1.0, 2.0], 0b01), labelled(flow, [3.0, 4.0], 0b10)
        same = a.to(b.dtype)
        assert same is a and flow.provenance(a) == 0b01
        a2, b2 = torch.broadcast_tensors(a, b)  # i-th output from the i-th input only
        assert flow.provenance(a2) == 0b01 and flow.provenance(b2) == 0b10


def test_labels_of_another_flow_are_ignored():
    first, second = Dataflow(), Dataflow()
    with first:
        a = labelled(first, [1.0], 0b1)
    with second:
        assert second.provenance(a + 1) == 0
        second.stamp(a, 0b10)
        assert second.provenance(a) == 0b10


# -- reads --------------------------------------------------------------------------------
READS = {
    "bool": lambda v: bool(v[0] > 0),
    "item": lambda v: v[0].item(),
    "int": lambda v: int(v[0]),
    "float": lambda v: float(v[0]),
    "index": lambda v: [10, 20, 30][v[0].long()],
    "tolist": lambda v: v.tolist(),
    "numpy": lambda v: v.numpy(),
    "array": lambda v: np.asarray(v),
    "equal": lambda v: torch.equal(v, v),
    "format": lambda v: f"{v[0]:.2f}",
    "contains": lambda v: 1.0 in v,
    "if": lambda v: 1 if (v > 0).any() else 0,
    "mask": lambda v: v[v > 1.5],
    "nonzero": lambda v: torch.nonzero(v),
    "iterate_and_test": lambda v: [x for x in v if x > 1.5],
}


@pytest.mark.parametrize("name", sorted(READS))
def test_every_read_into_python_is_recorded_with_its_labels_and_line(name):
    flow = Dataflow()
    with flow:
        value = labelled(flow, [1.0, 2.0], 0b10)
        READS[name](value)
    assert flow.reads, name
    assert all(read.provenance == 0b10 for read in flow.reads)
    assert all(__file__ in read.where for read in flow.reads)


def test_metadata_is_not_a_read():
    flow = Dataflow()
    with flow:
        value = labelled(flow, [[1.0, 2.0]], 0b1)
        (value.shape, value.dim(), len(value), value.size(-1), value.numel(), value.dtype,
         value.device, value.requires_grad, value.is_contiguous(), value.stride(),
         value.type(), value.expand(3, 2).shape)
        [row.sum() for row in value]  # iterating gives tensors: not a read
    assert flow.reads == []


def test_validation_guards_are_not_reads_but_a_user_check_is():
    flow = Dataflow()
    with pyro.validation_enabled(True), flow:
        value = labelled(flow, [1.0, 0.0], 0b1)
        dist.Bernoulli(probs=value * 0.5).log_prob(value)  # support and argument checks
        assert flow.reads == []
        if (value > 0).all():
            pass
    assert len(flow.reads) == 1


def test_on_read_can_stop_the_program():
    def refuse(read):
        raise RuntimeError(f"refused {read.what}")

    with pytest.raises(RuntimeError, match="refused Tensor.item"), Dataflow(on_read=refuse) as f:
        labelled(f, [1.0], 0b1)[0].item()


def test_control_is_scoped_by_sequential_plate_iterations():
    flow = Dataflow()
    seen = {}
    with flow:
        for i in pyro.plate("p", 3):
            value = labelled(flow, 1.0, 1 << i)
            seen[i] = sequential_frames()
            bool(value > 0)
    assert seen[1] == (("p", 2),)
    assert flow.control((("p", 1),)) == 0b001
    assert flow.control((("p", 3),)) == 0b100
    assert flow.control(()) == 0b111  # outside the plate: every iteration's reads
    flow.clear_control()
    assert flow.control(()) == 0


def test_track_draws_labels_each_guide_draw_and_notes_control():
    def guide():
        a = pyro.sample("a", dist.Bernoulli(0.5))
        if a.item() == 1:
            pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.sample("c", dist.Bernoulli(0.2 + 0.5 * a))
        with pyro.plate("data", 2, subsample_size=1):
            pass

    torch.manual_seed(0)
    flow, bits = Dataflow(), {}
    with flow, TrackDraws(flow, bits, True) as tracker:
        trace = poutine.trace(guide).get_trace()
    assert list(bits)[:1] == ["a"] and "data" not in bits  # plate subsamples: no bit
    assert flow.provenance(trace.nodes["c"]["value"]) == (1 << bits["a"]) | (1 << bits["c"])
    assert tracker.control["a"] == 0 and tracker.control["c"] == 1 << bits["a"]


def test_nested_flows_keep_their_labels_apart():
    outer = Dataflow()
    with outer:
        a = labelled(outer, [1.0, 2.0], 0b1)
        inner = Dataflow()
        with inner:
            inner.stamp(a, 0b10)
            b = a * 2.0
            assert inner.provenance(b) == 0b10
        assert outer.provenance(b) == 0b1  # the inner flow did not overwrite it
        c = b + 1.0
        assert outer.provenance(c) == 0b1 and inner.provenance(c) == 0  # inner has ended


def test_a_long_lived_tensor_keeps_no_history_of_ended_flows():
    persistent = torch.zeros(2)
    for _ in range(5):
        flow = Dataflow()
        with flow:
            persistent.add_(labelled(flow, [1.0, 1.0], 0b1))
            assert flow.provenance(persistent) == 0b1
    assert len(persistent._pyro_wakesleep_provenance) == 1


def test_writes_notes_and_restores_in_place_writes_to_outside_tensors():
    from pyro_wakesleep.dataflow import Writes

    outside = torch.zeros(3)
    bn = torch.nn.BatchNorm1d(2)
    writes = Writes([])
    with writes:
        fresh = torch.ones(2)
        fresh.add_(1.0)  # created inside: not noted
        outside.add_(2.0)
        bn(torch.randn(4, 2))
    assert outside.tolist() == [2.0, 2.0, 2.0] and int(bn.num_batches_tracked) == 1
    writes.restore()
    assert outside.tolist() == [0.0, 0.0, 0.0] and int(bn.num_batches_tracked) == 0
    assert bn.running_mean.abs().sum() == 0


def test_guessing_the_plate_nesting_changes_no_module_state():
    from pyro_wakesleep.traces import guess_max_plate_nesting

    bn = torch.nn.BatchNorm1d(1)

    def guide(x):
        logits = bn(x.unsqueeze(-1)).squeeze(-1)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(logits=logits))

    def model(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Bernoulli(0.5))

    assert guess_max_plate_nesting(model, guide, (torch.randn(5),), {}) == 1
    assert int(bn.num_batches_tracked) == 0 and bn.running_mean.abs().sum() == 0
