"""Modules by role: transformers' GPT-2, BERT and Llama (tiny configs, no downloads)
get their MLP activations monitored by default; other libraries' activation layers are
found by the registry or the name rule; a model without any activation function warns."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchvitals
from torchvitals.collect.selection import role_of, select_modules

transformers = pytest.importorskip("transformers")


def tiny(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    if kind == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
            vocab_size=100, max_position_embeddings=32,
        )  # fmt: skip
        return transformers.BertForMaskedLM(config)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=32,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


MLP_ACTIVATIONS = {
    "gpt2": ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"],
    "bert": [
        "bert.encoder.layer.0.intermediate.intermediate_act_fn",
        "bert.encoder.layer.1.intermediate.intermediate_act_fn",
    ],
    "llama": ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"],
}
LINEAR_LIKE = {
    "gpt2": "transformer.h.0.mlp.c_fc",  # transformers' Conv1D
    "bert": "bert.encoder.layer.0.intermediate.dense",
    "llama": "model.layers.0.mlp.gate_proj",
}
NORM = {
    "gpt2": "transformer.h.0.ln_1",
    "bert": "bert.encoder.layer.0.output.LayerNorm",
    "llama": "model.layers.0.input_layernorm",  # LlamaRMSNorm
}


@pytest.mark.parametrize("kind", ["gpt2", "bert", "llama"])
def test_transformers_mlp_activations_are_monitored_by_default(tmp_path, kind):
    model = tiny(kind)
    roles = {spec.name: spec.role for _, spec in select_modules(model)}
    for name in MLP_ACTIVATIONS[kind]:
        assert roles.get(name) == "rectifier", (name, roles)
    assert roles[LINEAR_LIKE[kind]] == "linear"
    assert roles[NORM[kind]] == "norm"
    ids = torch.randint(0, 100, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "no activation function" warning
        mon = torchvitals.Monitor(model, tmp_path / "run", optimizer=opt)
    with mon:
        for _ in range(2):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            mon.step(loss=out.loss)
    assert mon.errors == 0
    layers = torchvitals.load_run(tmp_path / "run").to_pandas("layers").astype({"layer": str})
    acts = layers[layers["kind"] == "act"]
    for name in MLP_ACTIVATIONS[kind]:
        rows = acts[acts["layer"] == name]
        assert len(rows) == 2, name
        assert (rows["units"] == rows["units"].iloc[0]).all() and rows["units"].iloc[0] > 0
        assert (rows["numel"] == 4 * 16 * rows["units"]).all()  # units on the last dim


class QuickGELU(nn.Module):  # as in CLIP and open_clip
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class SquaredReLU(nn.Module):
    def forward(self, x):
        return torch.relu(x) ** 2


class Gate(nn.Module):  # has parameters: not an activation function
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return torch.relu(x) * self.scale


def test_roles_of_other_libraries_and_the_name_rule():
    assert role_of(QuickGELU()) == "rectifier"
    assert role_of(SquaredReLU()) == "rectifier"
    assert role_of(Gate()) is None
    assert role_of(nn.Identity()) is None
    assert role_of(nn.Dropout()) is None
    assert role_of(nn.Hardtanh()) == "bounded"
    assert role_of(nn.MultiheadAttention(8, 2)) == "linear"


def test_timm_activation_layers_by_the_name_rule():
    pytest.importorskip("timm", reason="timm is not installed")
    from timm.layers import activations

    for cls in (activations.GELU, activations.Swish, activations.Mish, activations.QuickGELU):
        assert role_of(cls()) == "rectifier", cls


def test_a_model_without_activation_functions_warns_once(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="no activation function module"):
        torchvitals.Monitor(model, tmp_path / "run").close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        torchvitals.Monitor(model, tmp_path / "off", activations=False).close()


def test_types_replaces_the_roles(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), QuickGELU(), nn.Linear(4, 2))
    names = [spec.name for _, spec in select_modules(model, types=(nn.Linear,))]
    assert names == ["0", "2"]
    assert [spec.name for _, spec in select_modules(model)] == ["0", "1", "2"]
