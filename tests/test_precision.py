"""Base weights in low precision: the `dtype` key, float32 adapters, and backbone deltas that do not drift."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fedmomentum as fm
from fedmomentum import simulation
from fedmomentum.build import peft_model
from fedmomentum.models import resolve_dtype
from fedmomentum.peft_io import (
    add_lora,
    apply_backbone,
    backbone_of,
    export_merged,
    get_backbone,
    get_lora,
    lora_layers,
    scaling,
    set_backbone,
)

BF16 = torch.bfloat16


def test_auto_dtype_is_bfloat16_on_cuda_and_float32_on_cpu():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:1") == BF16
    assert resolve_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("fp8", "cpu")


def test_a_bf16_base_keeps_float32_adapters_and_trains_them_in_float32(small_config, tmp_path):
    """PEFT upcasts the factors (autocast_adapter_dtype), so AdamW's state is float32 too."""
    model, _ = peft_model(small_config(tmp_path, dtype="bfloat16"))
    layer = next(iter(lora_layers(model).values()))
    assert layer.get_base_layer().weight.dtype == BF16
    assert model.get_base_model().model.embed_tokens.weight.dtype == BF16
    assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == torch.float32


def client_updates(global_lora, round, clients=3):
    """Seeded updates near the global adapter, at the scale a few local steps give."""
    g = torch.Generator().manual_seed(round)
    updates = []
    for i in range(clients):
        factors = {name: fm.LoraPair(p.A + 0.02 * torch.randn(p.A.shape, generator=g),
                                     p.B + 2e-3 * torch.randn(p.B.shape, generator=g))
                   for name, p in global_lora.items()}
        updates.append(fm.ClientUpdate(factors, num_examples=10 + 5 * i, client_id=f"c{i}"))
    return updates


def naive_merge(model, deltas):
    """What a bf16-only backbone can do at best: add each round's delta in float32 and round the sum to bf16."""
    layers = lora_layers(model)
    with torch.no_grad():
        for name, delta in deltas.items():
            weight = layers[name].get_base_layer().weight
            weight.copy_(weight.float() + delta.dense())


@pytest.mark.parametrize("method", ["fedmomentum", "flora", "fedex-lora"])
def test_a_bf16_base_stays_within_one_rounding_of_the_fp32_backbone_over_24_rounds(tiny_model, method):
    """The same client updates, 24 rounds, fed to: the float32 model (the reference), the bf16 model through
    ``apply_backbone`` (float32 masters), and a bf16 model merged naively. The first stays the reference rounded
    once; the naive one loses a growing part of the deltas."""
    start = copy.deepcopy(tiny_model[0]).to(BF16)
    reference = add_lora(copy.deepcopy(start).float(), r=4, alpha=8)  # the same base weights, held in float32
    model = add_lora(copy.deepcopy(start), r=4, alpha=8)
    naive = add_lora(copy.deepcopy(start), r=4, alpha=8)
    first = get_backbone(reference)
    aggregator, global_lora, s = fm.methods.create(method), get_lora(reference), scaling(reference)
    total = {name: torch.zeros_like(w) for name, w in first.items()}  # Σ deltas, float64 would not change the story
    naive_errors, naive_drift = [], []
    reference_backbone, backbone = backbone_of(reference), backbone_of(model)
    for t in range(1, 25):
        result = aggregator.aggregate(global_lora, client_updates(global_lora, t - 1), scaling=s, t=t)
        assert result.backbone, "the method must change the backbone for this test to mean anything"
        apply_backbone(reference, result.backbone, reference_backbone)
        apply_backbone(model, result.backbone, backbone)
        naive_merge(naive, result.backbone)
        global_lora = result.lora
        for name, delta in result.backbone.items():
            total[name] += delta.dense()
        naive_now, ref_now = get_backbone(naive), get_backbone(reference)
        naive_errors.append(max(float((naive_now[n].float() - first[n] - total[n]).norm() / total[n].norm())
                                for n in total))  # the share of the deltas lost
        naive_drift.append(sum(float((naive_now[n].float() - ref_now[n]).norm()) for n in total))
    ref, ours, naive_w = get_backbone(reference), lora_layers(model), get_backbone(naive)
    assert {w.dtype for w in backbone.values()} == {torch.float32}  # every layer got deltas, so has a master
    for name, weight in ref.items():
        stored = ours[name].get_base_layer().weight.detach()
        assert stored.dtype == BF16
        torch.testing.assert_close(backbone[name], weight, rtol=0, atol=0)  # the master is the fp32 model
        ulp = torch.finfo(BF16).eps * weight.abs().clamp(min=torch.finfo(BF16).tiny)  # ≥ one bf16 ulp of the value
        assert ((stored.float() - weight).abs() <= ulp / 2).all()  # within one rounding
        torch.testing.assert_close(weight - first[name], total[name], rtol=1e-4, atol=1e-6)
    # the naive merge drifts: far more than one rounding off somewhere, losing much of the deltas, further each round
    worst = max(float(((naive_w[n].float() - ref[n]).abs() / (torch.finfo(BF16).eps * ref[n].abs())).max())
                for n in ref)
    assert worst > 4, worst
    assert min(naive_errors[3:]) > 0.05
    assert naive_drift[-1] > 1.5 * naive_drift[3] and naive_drift[-1] > naive_drift[11]


def test_checkpointed_masters_round_trip_and_exports_round_once(tiny_model, tmp_path):
    model = add_lora(copy.deepcopy(tiny_model[0]).to(BF16), r=4, alpha=8)
    layers = lora_layers(model)
    names = list(layers)
    g = torch.Generator().manual_seed(1)
    delta = {n: fm.LowRank(1e-4 * torch.randn(layers[n].out_features, 2, generator=g),
                           torch.randn(2, layers[n].in_features, generator=g)) for n in names[:2]}
    backbone = backbone_of(model)
    apply_backbone(model, delta, backbone)
    saved = {n: w.clone() for n, w in backbone.items()}  # what a checkpoint holds
    assert {saved[n].dtype for n in names[:2]} == {torch.float32} and saved[names[2]].dtype == BF16

    fresh = add_lora(copy.deepcopy(tiny_model[0]).to(BF16), r=4, alpha=8)
    fresh_backbone = set_backbone(fresh, saved)
    assert {n: w.dtype for n, w in fresh_backbone.items()} == {n: w.dtype for n, w in backbone.items()}
    assert all(torch.equal(fresh_backbone[n], saved[n]) for n in names)
    assert all(torch.equal(get_backbone(fresh)[n], get_backbone(model)[n]) for n in names)  # the rounded weights
    apply_backbone(model, delta, backbone)
    apply_backbone(fresh, delta, fresh_backbone)
    assert all(torch.equal(fresh_backbone[n], backbone[n]) for n in names)
    with pytest.raises(ValueError, match="does not fit"):
        set_backbone(fresh, {**saved, names[0]: torch.zeros(3, 3)})

    export_merged(model, tmp_path / "base", merge=False, backbone=backbone)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype="auto")
    weights = dict(loaded.named_parameters())
    for name in names:
        exported = weights[f"{name}.weight"]
        assert exported.dtype == BF16
        assert torch.equal(exported, backbone[name].to(BF16))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_dtype_bfloat16_runs_on_cpu_and_tracks_the_float32_run(small_config, tmp_path):
    rows = {}
    for dtype in ("float32", "bfloat16"):
        config = small_config(tmp_path / dtype, dtype=dtype, rounds=3, local_steps=3, lr=1e-2)
        simulation.run(config, quiet=True)
        rows[dtype] = [json.loads(line) for line in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    fp32, bf16 = ([r["eval_loss"] for r in rows[d]] for d in ("float32", "bfloat16"))
    assert fp32[-1] < fp32[0] - 0.05  # it learns, so tracking means something
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) < 0.02 * a, (fp32, bf16)


@pytest.mark.parametrize("key, value, message", [("dtype", "fp8", "dtype = 'fp8': expected one of 'auto'"),
                                                 ("eval_batch_size", 0, "eval_batch_size must be")])
def test_bad_dtype_or_eval_batch_size_is_a_clear_config_error(key, value, message):
    from fedmomentum.config import from_dict

    with pytest.raises(ValueError, match=message):
        from_dict({key: value}).validate()
