"""The Monitor's parts, each tested alone: engine calls of a step, activation capture,
parameter reading, scalars, the step record and the manifest."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from torch import nn

from torchvitals.collect.activations import ActivationCapture
from torchvitals.collect.distributed import ParamPolicy
from torchvitals.collect.manifest import build_manifest
from torchvitals.collect.monitor import MonitorConfig
from torchvitals.collect.parameters import ParameterReader
from torchvitals.collect.record import StepRecord
from torchvitals.collect.reductions import StepReductions
from torchvitals.collect.scalars import ScalarReader
from torchvitals.collect.selection import select_modules
from torchvitals.engine.contract import COUNT_KEYS, MOMENT_KEYS
from torchvitals.engine.op import fused_stats
from torchvitals.engine.reference import tensor_stats_reference


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_step_reductions_group_by_kind_and_start_a_new_step_when_taken():
    reductions = StepReductions()
    a, b = torch.randn(5), torch.randn(3, 2)
    reductions.reduce("grad", ["a", "b"], [a, b])
    reductions.reduce("weight", ["a"], [a])
    taken = reductions.take()
    assert [(r.kind, r.names) for r in taken] == [("grad", ["a", "b"]), ("weight", ["a"])]
    ref = tensor_stats_reference([a, b])
    sumsq = MOMENT_KEYS.index("sumsq")
    torch.testing.assert_close(taken[0].moments[:, sumsq], ref["sumsq"])
    assert reductions.take() == []


def test_activation_capture_reduces_the_forward_in_one_call_and_skips_eval():
    model = mlp()
    reductions = StepReductions()
    capture = ActivationCapture(
        model, reductions, act_every=1, grad_every=1, warn_once=lambda *a: None
    )
    hooked = select_modules(model)
    for module, spec in hooked:
        module.register_forward_hook(capture.activation_hook(spec))
    x = torch.randn(16, 4)
    capture.begin_forward()
    out = model(x)
    capture.end_forward()
    (acts,) = reductions.take()
    assert acts.kind == "act" and acts.names == ["0", "1", "2"]
    relu = torch.relu(model[0](x))
    dead = COUNT_KEYS.index("dead_units")
    assert int(acts.counts[1, dead]) == int((~(relu > 0).any(0)).sum())
    assert acts.roles == ["linear", "rectifier", "linear"]
    assert out.shape == (16, 2)

    model.eval()
    capture.next_step(1)
    capture.begin_forward()
    model(x)
    capture.end_forward()
    assert reductions.take() == []  # nothing recorded outside training


def test_activation_capture_measures_in_place_overwritten_outputs_in_their_hook():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            y += 1  # overwrites the Linear's output after its hook ran
            return y

    model = InPlace()
    reductions, warned = StepReductions(), []
    capture = ActivationCapture(
        model, reductions, act_every=1, grad_every=1, warn_once=lambda k, m: warned.append(k)
    )
    for module, spec in select_modules(model):
        module.register_forward_hook(capture.activation_hook(spec))
    x = torch.randn(2, 4)
    for step in range(2):
        capture.begin_forward()
        model(x)
        capture.end_forward()
        taken = reductions.take()
        capture.next_step(step + 1)
        if step == 0:
            assert taken == [] and warned == ["inplace:fc"]
        else:
            (acts,) = taken
            assert acts.names == ["fc"]
            # measured in the hook, before the in-place add
            sum_ = MOMENT_KEYS.index("sum")
            expected = float(model.fc(x).detach().sum())
            assert float(acts.moments[0, sum_]) == pytest.approx(expected, rel=1e-6)


def test_relu_outputs_come_from_the_pass_over_their_input_and_equal_their_own():
    """A ReLU whose input is a measured activation is not read again on the CPU: its row
    comes from the pass over the input and equals the engine on the ReLU's output bit for
    bit. In-place ReLUs, ReLUs of unmeasured inputs and other rectifiers are read. (The
    input's own sums are taken run by run along the ReLU's units: equal within rounding.)"""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
            self.fc, self.act = nn.Linear(36, 5), nn.ReLU()
            self.gelu, self.inplace = nn.GELU(), nn.ReLU(inplace=True)
            self.free = nn.ReLU()

        def forward(self, x):
            h = self.relu(self.bn(self.conv(x))).flatten(1)
            y = self.act(self.fc(h))
            return self.free(self.inplace(self.gelu(y) * 2))  # inputs nobody measured

    torch.manual_seed(0)
    model = Net()
    reductions, calls = StepReductions(), []
    compute = reductions.compute

    def spy(*args, **kwargs):
        calls.append(args[-1] if len(args) == 7 else kwargs.get("rectified_of"))
        return compute(*args, **kwargs)

    reductions.compute = spy
    capture = ActivationCapture(
        model, reductions, act_every=1, grad_every=1, warn_once=lambda *a: None
    )
    outputs = {}

    def keep(module, args, output, name):  # returns None: the output stays the module's
        outputs[name] = output.detach().clone()

    for module, spec in select_modules(model):
        module.register_forward_hook(capture.activation_hook(spec))
        module.register_forward_hook(lambda m, a, o, name=spec.name: keep(m, a, o, name))
    capture.begin_forward()
    model(torch.randn(2, 3, 5, 5))
    capture.end_forward()
    (acts,) = reductions.take()
    names = acts.names
    assert names == ["conv", "bn", "relu", "fc", "act", "gelu", "inplace", "free"]
    assert calls == [[None, None, 1, None, 3, None, None, None]]
    for i, name in enumerate(names):
        dim = 1 if name in ("relu", "act", "gelu", "inplace", "free") else None
        moments, counts, hist = fused_stats(
            [outputs[name]], feature_dim=[dim], saturation=[None if dim else 6.0]
        )
        if name not in ("bn", "fc"):  # the derived rows too: bit for bit
            assert torch.equal(acts.moments[i], moments[0]), name
        assert torch.equal(acts.counts[i], counts[0]) and torch.equal(acts.hist[i], hist[0])


def test_relu_chains_and_unmeasured_relu_inputs():
    """A ReLU of a derived ReLU is read (0-d outputs have no units, so both could qualify),
    and the input of a ReLU that follows no measured activation is not kept alive by the
    stash until the forward's end (autograd keeps a ReLU's output, not its input)."""

    class Sum(nn.Module):
        def forward(self, x):
            return x.sum()

    inputs = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.total, self.r1, self.r2 = nn.Linear(4, 4), Sum(), nn.ReLU(), nn.ReLU()
            self.r3 = nn.ReLU()

        def forward(self, x):
            h = self.fc(x) * 2  # the ReLU's input is no measured activation
            inputs.append(weakref.ref(h))
            y = self.r3(h).sum(1)
            return y + self.r2(self.r1(self.total(self.fc(x))))

    model = Net()
    reductions, calls = StepReductions(), []
    compute = reductions.compute
    reductions.compute = lambda *a, **k: calls.append(a[-1]) or compute(*a, **k)
    capture = ActivationCapture(
        model, reductions, act_every=1, grad_every=1, warn_once=lambda *a: None
    )
    for module, spec in select_modules(model, include=["total"]):
        module.register_forward_hook(capture.activation_hook(spec))
    capture.begin_forward()
    out = model(torch.randn(3, 4))
    assert inputs[0]() is None  # freed while the forward ran on
    capture.end_forward()
    (acts,) = reductions.take()
    assert acts.names == ["fc", "r3", "fc", "total", "r1", "r2"]
    assert calls == [[None, None, None, None, 3, None]]
    assert out.shape == (3,)


def test_parameter_reader_reads_each_gradient_once_per_step_across_optimizers():
    model = mlp()
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    both = torch.optim.SGD(model.parameters(), lr=0.1)
    reductions = StepReductions()
    reader = ParameterReader(model, [first, both], ParamPolicy(model, 0, "all", False), reductions)
    model(torch.randn(3, 4)).sum().backward()
    reader.read_gradients(first)
    reader.read_gradients(both)
    names = [n for r in reductions.take() for n in r.names]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    reader.next_step()
    reader.read_weights()
    (weights,) = reductions.take()
    assert weights.kind == "weight" and len(weights.names) == 4


def test_scalar_reader_keeps_the_lr_of_the_optimizer_step_and_splits_host_and_device():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    reader = ScalarReader([opt], None)
    reader.on_optimizer_step(opt)
    opt.param_groups[0]["lr"] = 0.05  # a scheduler after the step
    host, device = reader.read(torch.tensor(2.0), {"acc": 0.75})
    assert host == {"loss": 2.0, "acc": 0.75, "lr/group0": 0.5} and device == {}
    reader.next_step()
    assert reader.read(None, {})[0] == {"lr/group0": 0.05}
    with pytest.raises(ValueError, match="'bad' has 2 elements"):
        reader.read(None, {"bad": torch.zeros(2)})


def test_step_record_columns_from_plain_data():
    reductions = StepReductions()
    g1, g2 = torch.tensor([3.0, 4.0]), torch.tensor([float("nan"), 12.0])
    reductions.reduce("grad", ["a", "b"], [g1, g2])
    x = torch.tensor([[-1.0, 7.0, 0.5], [-2.0, 0.0, 0.5]])
    reductions.reduce("act", ["l", "r"], [x, x.relu()], [None, 1], [6.0, None],
                      ["linear", "rectifier"])  # fmt: skip
    record = StepRecord.start(7, reductions.take(), {"loss": 1.5}, {}, histograms=True)
    scalars = record.scalar_columns()
    values = dict(zip(scalars["name"], scalars["value"], strict=True))
    assert scalars["step"] == 7 and values["loss"] == 1.5
    assert values["grad_norm"] == pytest.approx(math.sqrt(9 + 16 + 144))
    assert values["grad_nonfinite"] == 1.0
    layers = record.layer_columns()
    assert layers["layer"] == ["a", "b", "l", "r"]
    assert layers["kind"] == ["grad", "grad", "act", "act"]
    # measured where the role measures it, null (masked) elsewhere
    assert layers["saturated"].mask.all()
    assert layers["large"].mask.tolist() == [True, True, False, True] and layers["large"][2] == 1
    assert layers["units"].mask.tolist() == [True, True, True, False] and layers["units"][3] == 3
    assert layers["dead_units"].mask.tolist() == [True, True, True, False]
    assert layers["dead_units"][3] == 1  # the first unit is never positive
    hist = record.hist_columns()
    assert hist["counts"].shape[0] == 4 and hist["counts"].sum() == 2 + 2 + 6 + 6


def test_manifest_lists_layers_and_what_is_recorded_of_them():
    model = mlp()
    hooked = [spec for _, spec in select_modules(model)]
    manifest = build_manifest(
        model,
        hooked,
        MonitorConfig(),
        policy=ParamPolicy(model, 0, "all", False),
        rank=0,
        world_size=1,
        ddp=None,
        live=False,
    )
    layers = {entry["name"]: entry for entry in manifest["layers"]}
    assert layers["0"]["hooked"] == ["act", "grad", "weight"]
    assert layers["1"]["hooked"] == ["act"] and layers["1"]["param_shapes"] == {}
    assert manifest["config"]["grad_every"] == 1 and manifest["world_size"] == 1
    assert len(manifest["hist_edges"]["labels"]) > 0


def test_outputs_without_a_dense_float_tensor_are_skipped_with_one_warning():
    class DictOut(nn.Module):
        def forward(self, x):
            return {"y": torch.relu(x)}

    class IntOut(nn.ReLU):
        def forward(self, x):
            return torch.relu(x).long()

    model = nn.Sequential(nn.Linear(4, 4), DictOut())
    model2 = nn.Sequential(nn.Linear(4, 4), IntOut())
    for net in (model, model2):
        reductions, warned = StepReductions(), []
        capture = ActivationCapture(
            net, reductions, act_every=1, grad_every=1, warn_once=lambda k, m, w=warned: w.append(m)
        )
        for module, spec in select_modules(net, include=["1"]):
            module.register_forward_hook(capture.activation_hook(spec))
        for _ in range(2):
            capture.begin_forward()
            net[1](net[0](torch.randn(2, 4)))
            capture.end_forward()
            capture.next_step(1)
        assert reductions.take()[0].names == ["0"]
        # asked at every skip under one key; the Monitor's warn_once shows it once
        assert len(warned) == 2 and "'1'" in warned[0] and "skipped" in warned[0]
