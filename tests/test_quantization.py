"""Quantized bases (QLoRA, issue 19): loading, the backbone change computed beside the quantized weights (no drift
over rounds, against the float32 dequantized base fed the same updates), exports, resume, Flower nodes, gradient
checkpointing. On the tiny random Llama; bitsandbytes runs its 4-bit and int8 layers on the CPU."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

import bitsandbytes.functional as bnbf  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import fedmomentum as fm  # noqa: E402
from fedmomentum import build, checkpoint, driver, simulation  # noqa: E402
from fedmomentum.backbone_change import BackboneChange  # noqa: E402
from fedmomentum.config import RunConfig  # noqa: E402
from fedmomentum.models import load_model  # noqa: E402
from fedmomentum.peft_io import (  # noqa: E402
    add_lora,
    apply_backbone,
    attach_change,
    get_backbone,
    lora_layers,
    quantized_layers,
)
from fedmomentum.quantization import Quantization, dequantize, is_quantized, quantize  # noqa: E402
from fedmomentum.records import read_metrics as rows  # noqa: E402

EPS = torch.finfo(torch.float32).eps


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device)).logits.cpu()


IDS = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(0))


# --- configuration and loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, message", [
    ({"quantization": "nf5"}, "config key quantization = 'nf5': expected one of 'none', 'nf4', 'fp4', 'int8'"),
    ({"quantization": "nf4", "compute_dtype": "fp8"}, "config key compute_dtype = 'fp8': expected one of"),
    ({"quantization": "int8", "compute_dtype": "bfloat16"}, "compute_dtype applies to nf4 and fp4 only"),
    ({"compute_dtype": "float32"}, "compute_dtype applies to nf4 and fp4 only"),
])
def test_bad_quantization_settings_are_one_line_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**changes).validate()


def test_compute_dtype_follows_dtype_unless_given():
    assert build.quantization_of(RunConfig()) is None
    assert build.quantization_of(RunConfig(quantization="nf4", dtype="bfloat16")).compute_dtype == torch.bfloat16
    settings = build.quantization_of(RunConfig(quantization="fp4", compute_dtype="float16", double_quant=False))
    assert settings == Quantization("fp4", compute_dtype=torch.float16, double_quant=False)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_folder_loaded_quantized_and_a_model_quantized_in_memory_are_the_same(kind, tiny_model, tmp_path):
    """``load_model(folder, quantization=…)`` quantizes while loading; ``quantize`` does it to a model in memory (the
    tiny one, a benchmark's random one): the same bytes. Every linear layer is quantized but the output embedding."""
    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path, quantization=Quantization(kind))
    in_memory = quantize(model, Quantization(kind))
    a, b = loaded.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[key], b[key]) for key in a)
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    modules = dict(in_memory.named_modules())
    assert {name for name in linear if is_quantized(modules[name])} == set(linear) - {"lm_head"}
    q_proj = modules["model.layers.0.self_attn.q_proj"]
    stored = q_proj.weight.numel() * q_proj.weight.element_size()
    assert stored == 64 * 64 * (1 if kind == "int8" else 0.5)  # a byte, or half a byte, per weight
    assert not any(is_quantized(m) for m in model.modules())  # the model given is left as it was


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_the_branch_adds_the_attached_change_and_the_quantized_weight_is_never_rewritten(kind, tiny_model):
    model = add_lora(quantize(tiny_model[0], Quantization(kind)), r=4, alpha=8)
    name, layer = next(iter(quantized_layers(model).items()))
    base = layer.get_base_layer()
    packed = base.weight.data.clone()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, layer.in_features, generator=g)
    deltas = [fm.LowRank(0.01 * torch.randn(layer.out_features, 3, generator=g),
                         torch.randn(3, layer.in_features, generator=g)) for _ in range(2)]
    with pytest.raises(ValueError, match="needs a BackboneChange attached"):
        apply_backbone(model, {name: deltas[0]}, {})
    with torch.no_grad():
        before = base(x)
        change = BackboneChange()
        attach_change(model, change)
        torch.testing.assert_close(base(x), before, rtol=0, atol=0)  # nothing in the change yet
        total = torch.zeros(layer.out_features, layer.in_features)
        magnitude = torch.zeros_like(total)  # Σ |L| |R|: what bounds the rounding of the factored product
        for delta in deltas:  # what the driver does: apply_backbone, then the state's change
            apply_backbone(model, {name: delta}, {})
            change.add({name: delta})
            total += delta.dense()
            magnitude += delta.left.abs() @ delta.right.abs()
            expected = x @ total.T
            # x Rᵀ Lᵀ against x (L R)ᵀ in float32: each sum of k + q terms rounds by at most (k + q) eps of |x| |L| |R|;
            # adding the branch to the layer's output and taking that output away again, two roundings of it
            atol = (2 * (6 + layer.in_features) * EPS * float((x.abs() @ magnitude.T).max())
                    + 2 * EPS * float((before.abs() + expected.abs()).max()))
            torch.testing.assert_close(base(x) - before, expected, rtol=0, atol=atol)
    assert torch.equal(base.weight.data, packed)
    assert get_backbone(model)[name].dtype == torch.float32
    torch.testing.assert_close(get_backbone(model)[name], dequantize(base) + total, rtol=0, atol=1e-6)


def test_a_4bit_layer_computes_with_its_dequantized_weight(tiny_model):
    """What the no-drift test compares against: a float32 layer holding ``dequantize(quantized(W₀))``."""
    quantized = quantize(tiny_model[0], Quantization("nf4"))
    layer = quantized.model.layers[0].mlp.down_proj
    x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(1))
    W = dequantize(layer)
    with torch.no_grad():
        atol = 2 * layer.in_features * EPS * float((x.abs() @ W.abs().T).max())
        torch.testing.assert_close(layer(x), x @ W.T, rtol=0, atol=atol)
    assert not torch.equal(W, tiny_model[0].model.layers[0].mlp.down_proj.weight)  # it is quantized


# --- the backbone change beside the quantized weights: no drift -----------------------------------------------------


def client_updates(global_lora, round, clients=3):
    """Seeded updates near the global adapter, at the scale a few local steps give."""
    g = torch.Generator().manual_seed(1000 + round)
    return [fm.ClientUpdate({name: fm.LoraPair(p.A + 0.02 * torch.randn(p.A.shape, generator=g),
                                               p.B + 2e-3 * torch.randn(p.B.shape, generator=g))
                             for name, p in global_lora.items()}, num_examples=10 + 5 * i, client_id=f"c{i}")
            for i in range(clients)]


def dequantized_copy(model, quantized):
    """``model`` (float32) with each linear layer that ``quantized`` holds quantized set to its dequantized weight."""
    copy_ = copy.deepcopy(model)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in copy_.named_modules():
            if isinstance(module, torch.nn.Linear) and is_quantized(modules.get(name)):
                module.weight.copy_(dequantize(modules[name]))
    return copy_


def setup_for(config, model, tokenizer):
    peft, tokenizer = build.peft_model(config, model, tokenizer)
    return build.Setup(config, peft, tokenizer, build.make_method(config), fm.peft_io.scaling(peft), {}, {})


def requantize(weight, kind="nf4"):
    """What merging into the 4-bit weights would do: the sum quantized again."""
    packed, state = bnbf.quantize_4bit(weight, quant_type=kind, compress_statistics=True)
    return bnbf.dequantize_4bit(packed, state).float()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("method", ["fedmomentum", "flora", "fedex-lora", "frlora"])
def test_a_quantized_base_equals_the_dequantized_float32_base_fed_the_same_updates_over_12_rounds(
        method, device, tiny_model, small_config, tmp_path):
    """Twelve rounds of the same updates through the driver (``driver.start``, ``driver.advance``) into an NF4 base,
    whose change is a branch beside its weights, and into the float32 base ``dequantize(quantized(W₀))``, whose
    weights take the deltas: the same backbone and the same logits to float32 tolerance. Re-quantizing the sum
    after each merge instead loses the deltas (they are far below a 4-bit step) and drifts."""
    config = small_config(tmp_path, method=method, quantization="nf4", lora_r=4, lora_alpha=8, device=device)
    ours = setup_for(config, copy.deepcopy(tiny_model[0]), tiny_model[1])
    reference_model = dequantized_copy(tiny_model[0], ours.model.get_base_model()).to(device)
    reference = setup_for(config.replace(quantization="none"), reference_model, tiny_model[1])
    engine = driver.Engine()
    state, ref_state = driver.start(ours, engine), driver.start(reference, engine)
    assert set(state.lora) == set(quantized_layers(ours.model)) and state.backbone == {}  # no float32 masters
    first = get_backbone(reference.model)  # after FRLoRA's start, which both computed from the same weights
    for name in state.lora:
        torch.testing.assert_close(state.lora[name].B, ref_state.lora[name].B, rtol=0, atol=0)
    naive = {name: requantize(weight) for name, weight in first.items()}
    total = {name: torch.zeros_like(weight) for name, weight in first.items()}  # Σ deltas since the start
    delta_norms = dict.fromkeys(first, 0.0)
    naive_distance = []
    for t in range(1, 13):
        updates = client_updates(state.lora, t)
        result = ours.method.aggregate(state.lora, updates, scaling=ours.scaling, t=t, state=state.method)
        assert result.backbone, "the method must change the backbone for this test to mean anything"
        state = driver.advance(ours, state, result, updates, t)
        ref_state = driver.advance(reference, ref_state, result, updates, t)
        for name, delta in result.backbone.items():
            dense = delta.dense()
            total[name] += dense
            delta_norms[name] += float(dense.norm())
            naive[name] = requantize(naive[name] + dense)
        got, expected = get_backbone(ours.model), get_backbone(reference.model)
        distance = 0.0
        for name, weight in expected.items():
            # float32 backward error of t additions into W and of the change's factored cuts (QR + SVD of an n-wide
            # matrix): eps · (t ‖W‖ + n Σ‖δ‖)
            bound = EPS * (t * float(weight.norm()) + max(weight.shape) * delta_norms[name])
            assert float((got[name] - weight).norm()) <= bound, (t, name)
            assert float((naive[name] - weight).norm()) > 100 * bound, (t, name)  # far outside the tolerance
            distance += float((naive[name] - weight).norm())
        naive_distance.append(distance)
        assert torch.isfinite(logits(ours.model, IDS)).all()
    ids_logits = logits(reference.model, IDS)
    # the weights agree to a few hundred eps relative (the bound above); the forward pass adds a few roundings a layer
    torch.testing.assert_close(logits(ours.model, IDS), ids_logits, rtol=0,
                               atol=1e3 * EPS * float(ids_logits.abs().max()))
    lost = [float((naive[n] - first[n] - total[n]).norm() / total[n].norm()) for n in first]
    assert min(lost) > 0.5  # re-quantizing loses more than half of every layer's change
    assert naive_distance[-1] > naive_distance[2]  # and it drifts further from the model the method defines


# --- whole runs ---------------------------------------------------------------------------------------------------


def run_kept(config, tiny_model, **kwargs):
    """``simulation.run``, keeping the server's setup (its final model) for the test."""
    setup, engine = simulation.engine(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    return setup, driver.run(setup, engine, quiet=True, **kwargs)


@pytest.mark.parametrize("method, kind", [("frlora", "nf4"), ("fedmomentum", "int8"), ("fedit", "fp4")])
def test_exports_of_a_quantized_run_load_in_plain_transformers_and_peft(method, kind, tiny_model, small_config,
                                                                        tmp_path):
    """``merged/`` and ``base/`` + ``adapter/`` are the run's model, unquantized (no quantization_config: plain
    transformers loads them); ``adapter_for_original_base/`` carries the whole change for the unquantized original
    (the model there differs from the trained one by the quantization's error); the summary says which is which."""
    config = small_config(tmp_path / "run", method=method, quantization=kind, export_merged=True, rounds=3,
                          accuracy_per_family=0)
    setup, summary = run_kept(config, tiny_model)
    out = Path(config.out)
    losses = [row["eval_loss"] for row in rows(out)]
    assert all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    trained = logits(setup.model, IDS)
    # a 4-bit layer multiplies by its dequantized weight (float32 roundings); an int8 layer also rounds its inputs to
    # int8 (LLM.int8: 1/127 of each row's largest value), which a plain float32 model does not
    scale = float(trained.abs().max())
    atol = (2 / 127 if kind == "int8" else 1e3 * EPS) * scale
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert "quantization_config" not in json.loads((out / "merged" / "config.json").read_text())
    assert not any(is_quantized(m) for m in merged.modules())
    torch.testing.assert_close(logits(merged, IDS), trained, rtol=0, atol=atol)
    merged_weights = dict(merged.named_parameters())
    backbone = get_backbone(setup.model)  # the dequantized weight plus its change
    for name, layer in lora_layers(setup.model).items():  # merged/ is exactly that plus s·B·A
        expected = backbone[name] + layer.get_delta_weight("default").detach()
        torch.testing.assert_close(merged_weights[f"{name}.weight"].detach(), expected, rtol=0,
                                   atol=4 * EPS * float(expected.abs().max()))
    notes = summary["exports_of_quantized_base"]
    assert notes["quantization"] == kind and notes["merged"].startswith(f"the dequantized {kind} base")
    changed = method != "fedit"
    if not changed:  # the backbone did not change: adapter/ is for the original base, there is no base/
        assert not (out / "base").exists() and driver.FOR_ORIGINAL_BASE not in summary
        return
    assert "base" in notes and driver.FOR_ORIGINAL_BASE in notes
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    torch.testing.assert_close(logits(adapted, IDS), trained, rtol=0, atol=atol)
    # adapter_for_original_base/: its s·B·A per layer is the whole change, merged/ minus the dequantized base
    original = PeftModel.from_pretrained(copy.deepcopy(tiny_model[0]), out / driver.FOR_ORIGINAL_BASE)
    quantized = quantized_layers(setup.model)
    for name, layer in lora_layers(original).items():
        whole = merged_weights[f"{name}.weight"].detach() - dequantize(quantized[name].get_base_layer())
        scale = float(whole.abs().max())
        torch.testing.assert_close(layer.get_delta_weight("default").detach(), whole, rtol=0,
                                   atol=1e3 * EPS * scale + 1e-6 * scale)


def test_a_resumed_quantized_run_is_the_uninterrupted_one(tiny_model, small_config, tmp_path):
    """The change (the branch the quantized layers compute) comes back from the checkpoint."""
    whole = small_config(tmp_path / "whole", method="fedmomentum", quantization="nf4", rounds=3,
                         lr_schedule="constant", accuracy_per_family=0)  # the same lr whatever the rounds
    run_kept(whole, tiny_model)
    part = whole.replace(out=str(tmp_path / "part"), rounds=2)
    run_kept(part, tiny_model)
    setup, _ = run_kept(part.replace(rounds=3), tiny_model, resume=True)
    assert setup.model.__dict__["_fedmomentum_change_branch"].change.deltas  # the restored change is attached
    a, b = (checkpoint.load(Path(c) / driver.CHECKPOINT)[0] for c in (whole.out, tmp_path / "part"))
    assert a.backbone == b.backbone == {}
    for name in a.lora:
        torch.testing.assert_close(a.lora[name].B, b.lora[name].B, rtol=0, atol=0)
        torch.testing.assert_close(a.change.deltas[name].dense(), b.change.deltas[name].dense(), rtol=0, atol=0)
    assert [r["eval_loss"] for r in rows(whole.out)] == [r["eval_loss"] for r in rows(tmp_path / "part")]


def test_flower_nodes_on_a_quantized_base_equal_the_simulation(tiny_model, small_config, tmp_path):
    """Each node keeps its own change beside its quantized layers (a restarted node rebuilds it from the log): the
    same state and losses as the in-process run, FRLoRA's start included."""
    from fedmomentum.flower import make_client_app
    from flower_helpers import FLOWER, LocalGrid, assert_same_state, run_local

    changes = {**FLOWER, "method": "frlora", "quantization": "nf4", "rounds": 3}
    reference = small_config(tmp_path / "sim", **changes)
    simulation.run(reference, quiet=True)
    config = small_config(tmp_path / "flower", **changes)
    run_local(config, LocalGrid(make_client_app(), [0, 1], 2, run_id=19, events={2: [("restart", 100)]}))
    a, b = Path(reference.out) / driver.CHECKPOINT, Path(config.out) / driver.CHECKPOINT
    assert_same_state(a, b, atol=0.0)
    sim, flower = checkpoint.load(a)[0].change.deltas, checkpoint.load(b)[0].change.deltas
    assert sim.keys() == flower.keys() and all(torch.equal(sim[n].dense(), flower[n].dense()) for n in sim)
    assert [r["eval_loss"] for r in rows(reference.out)] == pytest.approx(
        [r["eval_loss"] for r in rows(config.out)], abs=1e-6)


@pytest.mark.parametrize("kind", ["none", "nf4"])
def test_gradient_checkpointing_changes_memory_not_the_training(kind, tiny_model, small_config, tmp_path):
    """Activations recomputed in the backward pass (non-reentrant, the RNG state replayed) give the same update."""
    runs = []
    for checkpointing in (False, True):
        config = small_config(tmp_path / str(checkpointing), method="fedmomentum", quantization=kind, rounds=1,
                              gradient_checkpointing=checkpointing, lora_dropout=0.1, accuracy_per_family=0)
        setup, _ = run_kept(config, tiny_model)
        assert setup.model.get_base_model().is_activation_checkpointing == checkpointing
        runs.append(checkpoint.load(Path(config.out) / driver.CHECKPOINT)[0])
    for name, pair in runs[0].lora.items():
        scale = float(pair.B.abs().max())
        torch.testing.assert_close(runs[1].lora[name].B, pair.B, rtol=0, atol=1e3 * EPS * scale)


def test_a_model_given_quantized_is_used_as_it_is_when_the_config_agrees(tiny_model, small_config, tmp_path):
    """A benchmark builds its random model quantized (on the device, layer by layer) and hands it over."""
    quantized = quantize(tiny_model[0], Quantization("nf4"))
    model, _ = build.peft_model(small_config(tmp_path, quantization="nf4"), quantized, tiny_model[1])
    assert model.get_base_model() is quantized
    with pytest.raises(ValueError, match="quantized as nf4, but the config says quantization = int8"):
        build.peft_model(small_config(tmp_path, quantization="int8"), quantize(tiny_model[0], Quantization("nf4")),
                         tiny_model[1])


@pytest.mark.slow
def test_the_backbone_changing_methods_train_smollm2_in_nf4(tmp_path):
    """The real SmolLM2-135M-Instruct with NF4 linear layers: FedMomentum (the residual merged every round) and FRLoRA
    (the backbone changed before round 1) lower the held-out loss, with finite losses throughout, and never a float32
    master. Every other backbone-changing method is checked on the tiny model in NF4 above."""
    for method in ("fedmomentum", "frlora"):
        config = RunConfig(method=method, quantization="nf4", rounds=2, clients=2, clients_per_round=2,
                           families=["basic_arithmetic", "chain_sum"], train_per_family=16, eval_per_family=3,
                           max_length=80, local_steps=2, batch_size=2, lr=2e-3, accuracy_per_family=0,
                           out=str(tmp_path / method))
        setup, engine = simulation.engine(config)
        assert setup.model.get_base_model().config.num_hidden_layers == 30  # the real model, not a stand-in
        assert quantized_layers(setup.model)
        summary = driver.run(setup, engine, quiet=True)
        losses = [row["eval_loss"] for row in rows(tmp_path / method)]
        assert all(math.isfinite(loss) for loss in losses), method
        assert summary["final_eval_loss"] < summary["initial_eval_loss"], method
        assert checkpoint.load(tmp_path / method / driver.CHECKPOINT)[0].backbone == {}
