"""End to end on a tiny random Llama: every method runs, resume is exact, exports reproduce the model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import fedmomentum as fm
from fedmomentum import checkpoint, simulation
from fedmomentum.config import RunConfig
from fedmomentum.peft_io import get_backbone, get_lora, lora_layers


def small_config(tmp_path, **changes) -> RunConfig:
    values = dict(method="fedmomentum", rounds=2, clients=3, clients_per_round=2, families=["basic_arithmetic",
                  "chain_sum"], train_per_family=12, eval_per_family=4, max_length=64, local_steps=2, batch_size=2,
                  lr=5e-3, lora_r=4, lora_alpha=8, accuracy_per_family=2, max_new_tokens=4, out=str(tmp_path / "run"))
    values.update(changes)
    return RunConfig(**values)


def setup_for(config, tiny_model):
    model, tokenizer = tiny_model
    return simulation.prepare(config, copy.deepcopy(model), tokenizer)


@pytest.mark.parametrize("method", fm.methods.names())
def test_every_method_runs_two_rounds_and_records(method, tmp_path, tiny_model):
    config = small_config(tmp_path, method=method)
    summary = simulation.run(config, setup=setup_for(config, tiny_model), quiet=True)
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    for key in ("train_loss", "eval_loss", "uplink_bytes", "downlink_bytes", "aggregation_seconds",
                "round_seconds", "rank_kept", "residual_rank", "loss/basic_arithmetic", "loss/chain_sum"):
        assert key in rows[-1], key
    assert all(torch.isfinite(torch.tensor(row["eval_loss"])) for row in rows)
    assert "accuracy" in rows[-1] and 0.0 <= rows[-1]["accuracy"] <= 1.0
    assert rows[1]["uplink_bytes"] > 0 and summary["rounds"] == 2
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["method"] == method
    layers = [json.loads(line) for line in (out / "aggregation.jsonl").read_text().splitlines()]
    assert len(layers) == 2 and len(layers[0]["layers"]) == 4 * tiny_model[0].config.num_hidden_layers


def test_training_lowers_the_eval_loss(tmp_path, tiny_model):
    config = small_config(tmp_path, rounds=3, local_steps=4, accuracy_per_family=0)
    summary = simulation.run(config, setup=setup_for(config, tiny_model), quiet=True)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.05


class Crash(RuntimeError):
    pass


def test_resume_after_a_crash_gives_the_uninterrupted_numbers(tmp_path, tiny_model, monkeypatch):
    config = small_config(tmp_path, rounds=3, method_options={"merge_every": 2}, out=str(tmp_path / "full"))
    simulation.run(config, setup=setup_for(config, tiny_model), quiet=True)
    full = checkpoint.load(tmp_path / "full" / simulation.CHECKPOINT)

    crashing = config.replace(out=str(tmp_path / "crashed"))
    real_round = simulation.run_round

    def crash_in_round_three(setup, global_lora, round):
        if round == 2:
            raise Crash("power cut")
        return real_round(setup, global_lora, round)

    monkeypatch.setattr(simulation, "run_round", crash_in_round_three)
    with pytest.raises(Crash):
        simulation.run(crashing, setup=setup_for(crashing, tiny_model), quiet=True)
    monkeypatch.setattr(simulation, "run_round", real_round)
    assert checkpoint.load(tmp_path / "crashed" / simulation.CHECKPOINT).round == 2
    simulation.run(crashing, resume=True, setup=setup_for(crashing, tiny_model), quiet=True)
    resumed = checkpoint.load(tmp_path / "crashed" / simulation.CHECKPOINT)

    assert resumed.round == full.round == 3
    for name in full.lora:
        assert torch.equal(resumed.lora[name].A, full.lora[name].A)
        assert torch.equal(resumed.lora[name].B, full.lora[name].B)
        assert torch.equal(resumed.backbone[name], full.backbone[name])
    rows = lambda run: [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [r["eval_loss"] for r in rows("crashed")] == [r["eval_loss"] for r in rows("full")]


def test_exports_reproduce_the_final_logits(tmp_path, tiny_model):
    config = small_config(tmp_path, method="fedmomentum", export_merged=True, accuracy_per_family=0)
    setup = setup_for(config, tiny_model)
    simulation.run(config, setup=setup, quiet=True)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = setup.model(input_ids=ids).logits
        out = tmp_path / "run"
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(out / "merged")
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    original = tiny_model[0].model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, original)


@pytest.mark.parametrize("method", ["fedmomentum", "fedex-lora", "flora"])
def test_exact_methods_give_the_weighted_average_of_client_models(method, tmp_path, tiny_model, monkeypatch):
    config = small_config(tmp_path, method=method, clients=3, clients_per_round=3, train_per_family=13)
    setup = setup_for(config, tiny_model)
    before = get_backbone(setup.model)
    start = get_lora(setup.model)
    captured = []
    real_train = simulation.train_client

    def capture(*args, **kwargs):
        update, loss = real_train(*args, **kwargs)
        captured.append(update)
        return update, loss

    monkeypatch.setattr(simulation, "train_client", capture)
    simulation.run_round(setup, start, 0)
    weights = setup.method.client_weights(captured)
    assert len(set(weights)) > 1  # 26 examples over 3 clients: uneven, so p_i matters
    s = setup.scaling
    x = torch.randn(5, tiny_model[0].config.hidden_size, generator=torch.Generator().manual_seed(1))
    for name, layer in lora_layers(setup.model).items():
        with torch.no_grad():
            global_out = layer(x)
        clients_out = sum(p * (x @ (before[name] + s * u.factors[name].B @ u.factors[name].A).T)
                          for p, u in zip(weights, captured, strict=True))
        torch.testing.assert_close(global_out, clients_out, atol=1e-5, rtol=1e-4)


def test_fedit_is_not_the_average_of_client_models(tmp_path, tiny_model, monkeypatch):
    """The same check fails for FedIT: this is the noise FedMomentum removes (and shows the test can fail)."""
    config = small_config(tmp_path, method="fedit", clients=3, clients_per_round=3)
    setup = setup_for(config, tiny_model)
    captured = []
    real_train = simulation.train_client
    monkeypatch.setattr(simulation, "train_client",
                        lambda *a, **k: captured.append(real_train(*a, **k)[0]) or (captured[-1], 0.0))
    before = get_backbone(setup.model)
    simulation.run_round(setup, get_lora(setup.model), 0)
    name, layer = next(iter(lora_layers(setup.model).items()))
    weights = setup.method.client_weights(captured)
    x = torch.randn(5, tiny_model[0].config.hidden_size)
    clients_out = sum(p * (x @ (before[name] + setup.scaling * u.factors[name].delta()).T)
                      for p, u in zip(weights, captured, strict=True))
    with torch.no_grad():
        assert not torch.allclose(layer(x), clients_out, atol=1e-6, rtol=1e-5)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_model):
    config = small_config(tmp_path, rounds=1, accuracy_per_family=0)
    simulation.run(config, setup=setup_for(config, tiny_model), quiet=True)
    path = tmp_path / "run" / simulation.CHECKPOINT
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or unreadable checkpoint"):
        simulation.run(config, resume=True, setup=setup_for(config, tiny_model), quiet=True)


def test_resume_with_a_different_config_is_refused(tmp_path, tiny_model):
    config = small_config(tmp_path, rounds=1, accuracy_per_family=0)
    simulation.run(config, setup=setup_for(config, tiny_model), quiet=True)
    changed = config.replace(lr=1e-2)
    with pytest.raises(ValueError, match="different config"):
        simulation.run(changed, resume=True, setup=setup_for(changed, tiny_model), quiet=True)
