"""PEFT model <-> factors, backbone deltas in place, checked loads."""

from __future__ import annotations

import copy

import pytest
import torch

import fedmomentum as fm
from fedmomentum.peft_io import (
    add_lora,
    apply_backbone,
    backbone_of,
    get_backbone,
    get_lora,
    lora_layers,
    scaling,
    set_lora,
)


@pytest.fixture
def peft_model(tiny_model):
    return add_lora(copy.deepcopy(tiny_model[0]), r=4, alpha=8, seed=3)


def random_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: fm.LoraPair(torch.randn(p.A.shape, generator=g), torch.randn(p.B.shape, generator=g))
            for name, p in get_lora(model).items()}


def test_keys_are_module_paths_and_scaling_is_alpha_over_r(peft_model, tiny_model):
    names = list(get_lora(peft_model))
    assert "model.layers.0.self_attn.q_proj" in names
    assert len(names) == 4 * tiny_model[0].config.num_hidden_layers
    assert scaling(peft_model) == 2.0
    rs = add_lora(copy.deepcopy(tiny_model[0]), r=4, alpha=8, rslora=True)
    assert scaling(rs) == pytest.approx(8 / 2)  # alpha / sqrt(r)


def test_set_then_get_round_trips_and_changes_the_output(peft_model):
    ids = torch.arange(10).unsqueeze(0)
    before = peft_model(input_ids=ids).logits
    lora = random_lora(peft_model)
    set_lora(peft_model, lora)
    back = get_lora(peft_model)
    for name in lora:
        assert torch.equal(back[name].A, lora[name].A) and torch.equal(back[name].B, lora[name].B)
    assert not torch.allclose(peft_model(input_ids=ids).logits, before)


def test_seeded_init_is_the_same_for_every_party(tiny_model):
    a = get_lora(add_lora(copy.deepcopy(tiny_model[0]), r=4, seed=7))
    b = get_lora(add_lora(copy.deepcopy(tiny_model[0]), r=4, seed=7))
    c = get_lora(add_lora(copy.deepcopy(tiny_model[0]), r=4, seed=8))
    name = next(iter(a))
    assert torch.equal(a[name].A, b[name].A) and not torch.equal(a[name].A, c[name].A)
    assert torch.count_nonzero(a[name].B) == 0


def test_set_lora_refuses_missing_layers_and_wrong_shapes(peft_model):
    lora = random_lora(peft_model)
    name = next(iter(lora))
    partial = {k: v for k, v in lora.items() if k != name}
    with pytest.raises(ValueError, match="missing"):
        set_lora(peft_model, partial)
    wrong = {**lora, name: fm.LoraPair(torch.zeros(3, 5), lora[name].B)}
    with pytest.raises(ValueError, match=name):
        set_lora(peft_model, wrong)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_backbone_adds_left_times_right(tiny_model, dtype):
    model = add_lora(copy.deepcopy(tiny_model[0]).to(dtype), r=4)
    before = get_backbone(model)
    g = torch.Generator().manual_seed(0)
    deltas = {name: fm.LowRank(torch.randn(w.shape[0], 3, generator=g), torch.randn(3, w.shape[1], generator=g))
              for name, w in before.items()}
    backbone = backbone_of(model)
    apply_backbone(model, deltas, backbone)
    layers = lora_layers(model)
    for name, delta in deltas.items():
        expected = before[name].float() + delta.dense()
        torch.testing.assert_close(backbone[name], expected)  # the backbone (a float32 master for a bf16 weight)
        assert backbone[name].dtype == torch.float32
        torch.testing.assert_close(layers[name].get_base_layer().weight, expected.to(dtype))  # what the model uses
        if dtype == torch.float32:  # no copy: the backbone is the model's own weight
            assert backbone[name].data_ptr() == layers[name].get_base_layer().weight.data_ptr()
    with pytest.raises(ValueError, match="does not adapt"):
        apply_backbone(model, {"model.embed_tokens": next(iter(deltas.values()))}, backbone)


def test_lora_layers_needs_lora(tiny_model):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(tiny_model[0]), LoraConfig(r=2, target_modules=["q_proj"]))
    assert len(lora_layers(model)) == tiny_model[0].config.num_hidden_layers


def test_conv1d_layers_of_gpt2_get_the_weighted_average_of_the_client_models():
    """GPT-2 stores ``c_attn``/``c_proj`` as ``Conv1D`` (weight ``in×out``, PEFT's ``fan_in_fan_out``): the backbone
    delta must go in transposed. Reference: PEFT's own ``get_delta_weight`` of each client's adapter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=2))
    model = add_lora(base, r=3, alpha=6, target_modules=["c_attn", "c_proj"], seed=1)
    layers = lora_layers(model)
    assert {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj"} <= set(layers)
    assert all(layer.fan_in_fan_out for layer in layers.values())
    global_lora = get_lora(model)
    updates = [fm.ClientUpdate(random_lora(model, seed), num_examples=n) for seed, n in ((1, 3), (2, 5), (3, 9))]
    weights = [3 / 17, 5 / 17, 9 / 17]

    def effective(name):  # the layer's weight as the model uses it, oriented like the stored W
        return layers[name].get_base_layer().weight + layers[name].get_delta_weight("default")

    before = get_backbone(model)
    expected = {}
    for name in layers:
        total = 0
        for p, update in zip(weights, updates, strict=True):
            set_lora(model, update.factors)
            total = total + p * effective(name).detach()
        expected[name] = total
    result = fm.methods.create("fedmomentum").aggregate(global_lora, updates, scaling=scaling(model))
    set_lora(model, global_lora)
    assert all(torch.equal(get_backbone(model)[k], before[k]) for k in before)
    apply_backbone(model, result.backbone, backbone_of(model))
    set_lora(model, result.lora)
    for name in layers:
        torch.testing.assert_close(effective(name).detach(), expected[name], atol=1e-5, rtol=1e-5)


def test_backbone_weights_are_out_by_in_and_frlora_starts_on_gpt2_conv1d():
    """``BackboneWeights`` shows every adapted weight as ``out×in`` (Conv1D stores ``in×out``): FRLoRA's start
    computed from it leaves the model's function unchanged, which a transposed view would not."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fedmomentum.peft_io import BackboneWeights

    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=24, n_layer=2, n_head=2))
    model = add_lora(base, r=3, alpha=6, target_modules=["c_attn", "c_proj"], seed=1).eval()  # no dropout
    view = BackboneWeights(model)
    layers = lora_layers(model)
    assert set(view) == set(layers) and len(view) == len(layers)
    for name, pair in get_lora(model).items():
        assert tuple(view[name].shape) == pair.shape
        assert torch.equal(view[name], layers[name].get_base_layer().weight.T)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    start = fm.methods.create("frlora").start(get_lora(model), view, scaling=scaling(model))
    apply_backbone(model, start.backbone, backbone_of(model))
    set_lora(model, start.lora)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
    assert max(float(pair.B.abs().max()) for pair in start.lora.values()) > 0.01  # a real start, not B = 0
