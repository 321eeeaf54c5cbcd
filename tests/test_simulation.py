"""End to end on a tiny random Llama: every method runs, resume is exact, exports reproduce the model."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import fedmomentum as fm
from fedmomentum import checkpoint, driver, simulation
from fedmomentum.peft_io import get_backbone, lora_layers
from fedmomentum.records import read_metrics


class Capturing(simulation.InProcess):
    """The in-process engine, keeping every update it returns (an injection point of ``driver.run_round``)."""

    def __init__(self, engine: simulation.InProcess):
        super().__init__(engine.setup, engine.client_data)
        self.updates = []

    def train_round(self, t, *args):
        trained = super().train_round(t, *args)
        self.updates += trained.updates
        return trained


@pytest.mark.parametrize("method", fm.methods.names())
def test_every_method_runs_two_rounds_and_records(method, tmp_path, fresh_tiny, small_config):
    config = small_config(tmp_path / "run", method=method)
    summary = simulation.run(config, model=fresh_tiny[0], tokenizer=fresh_tiny[1], quiet=True)
    out = tmp_path / "run"
    rows = read_metrics(out)
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
    assert len(layers) == 2 and len(layers[0]["layers"]) == 4 * fresh_tiny[0].config.num_hidden_layers


def test_training_lowers_the_eval_loss(tmp_path, fresh_tiny, small_config):
    config = small_config(tmp_path / "run", rounds=3, local_steps=4, accuracy_per_family=0)
    summary = simulation.run(config, model=fresh_tiny[0], tokenizer=fresh_tiny[1], quiet=True)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"] - 0.05


class Crash(RuntimeError):
    pass


class CrashInRound(simulation.InProcess):
    def __init__(self, engine: simulation.InProcess, t: int):
        super().__init__(engine.setup, engine.client_data)
        self.crash_round = t

    def train_round(self, t, *args):
        if t == self.crash_round:
            raise Crash("power cut")
        return super().train_round(t, *args)


def test_resume_after_a_crash_gives_the_uninterrupted_numbers(tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "full", rounds=3, method_options={"merge_every": 2})
    simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    full, _ = checkpoint.load(tmp_path / "full" / driver.CHECKPOINT)

    crashing = config.replace(out=str(tmp_path / "crashed"))
    setup, engine = simulation.engine(crashing, copy.deepcopy(tiny_model[0]), tiny_model[1])
    with pytest.raises(Crash):
        driver.run(setup, CrashInRound(engine, 2), quiet=True)
    saved, _ = checkpoint.load(tmp_path / "crashed" / driver.CHECKPOINT)
    assert saved.rounds_done == 1 and saved.method  # merge_every=2: round 1's residual waits on the server
    simulation.run(crashing, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], resume=True, quiet=True)
    resumed, _ = checkpoint.load(tmp_path / "crashed" / driver.CHECKPOINT)

    assert resumed.rounds_done == full.rounds_done == 3
    for name in full.lora:
        assert torch.equal(resumed.lora[name].A, full.lora[name].A)
        assert torch.equal(resumed.lora[name].B, full.lora[name].B)
        assert torch.equal(resumed.backbone[name], full.backbone[name])
    assert [r["eval_loss"] for r in read_metrics(tmp_path / "crashed")] == [
        r["eval_loss"] for r in read_metrics(tmp_path / "full")]
    # the momentum measures' state resumed too (float64 sums may round differently across processes: a few ulps)
    for resumed_row, full_row in zip(read_metrics(tmp_path / "crashed"), read_metrics(tmp_path / "full"), strict=True):
        for key in ("update_alignment", "path_efficiency", "subspace_overlap", "noise_share"):
            expected = full_row.get(key)
            assert resumed_row.get(key) == (expected if expected is None else
                                            pytest.approx(expected, rel=1e3 * torch.finfo(torch.float64).eps))
    assert read_metrics(tmp_path / "full")[3]["update_alignment"] is not None


def test_exports_reproduce_the_final_logits(tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "run", method="fedmomentum", export_merged=True, accuracy_per_family=0)
    setup, engine = simulation.engine(config, copy.deepcopy(tiny_model[0]), tiny_model[1])
    driver.run(setup, engine, quiet=True)
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
def test_exact_methods_give_the_weighted_average_of_client_models(method, tmp_path, fresh_tiny, small_config):
    config = small_config(tmp_path / "run", method=method, clients=3, clients_per_round=3, train_per_family=13)
    setup, engine = simulation.engine(config, *fresh_tiny)
    engine = Capturing(engine)
    before = get_backbone(setup.model)
    driver.run_round(setup, engine, driver.start(setup, engine), 1)
    captured = engine.updates
    weights = setup.method.client_weights(captured)
    assert len(set(weights)) > 1  # 26 examples over 3 clients: uneven, so p_i matters
    s = setup.scaling
    x = torch.randn(5, fresh_tiny[0].config.hidden_size, generator=torch.Generator().manual_seed(1))
    for name, layer in lora_layers(setup.model).items():
        with torch.no_grad():
            global_out = layer(x)
        clients_out = sum(p * (x @ (before[name] + s * u.factors[name].B @ u.factors[name].A).T)
                          for p, u in zip(weights, captured, strict=True))
        torch.testing.assert_close(global_out, clients_out, atol=1e-5, rtol=1e-4)


def test_fedit_is_not_the_average_of_client_models(tmp_path, fresh_tiny, small_config):
    """The same check fails for FedIT: this is the noise FedMomentum removes (and shows the test can fail)."""
    config = small_config(tmp_path / "run", method="fedit", clients=3, clients_per_round=3)
    setup, engine = simulation.engine(config, *fresh_tiny)
    engine = Capturing(engine)
    before = get_backbone(setup.model)
    driver.run_round(setup, engine, driver.start(setup, engine), 1)
    captured = engine.updates
    name, layer = next(iter(lora_layers(setup.model).items()))
    weights = setup.method.client_weights(captured)
    x = torch.randn(5, fresh_tiny[0].config.hidden_size)
    clients_out = sum(p * (x @ (before[name] + setup.scaling * u.factors[name].delta()).T)
                      for p, u in zip(weights, captured, strict=True))
    with torch.no_grad():
        assert not torch.allclose(layer(x), clients_out, atol=1e-6, rtol=1e-5)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "run", rounds=1, accuracy_per_family=0)
    simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    path = tmp_path / "run" / driver.CHECKPOINT
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="corrupt or unreadable checkpoint"):
        simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], resume=True, quiet=True)


def test_resume_with_a_different_config_is_refused(tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "run", rounds=1, accuracy_per_family=0)
    simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    changed = config.replace(lr=1e-2)
    with pytest.raises(ValueError, match="different config"):
        simulation.run(changed, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], resume=True, quiet=True)
