"""``adapter_for_original_base/``: the whole change of a run (every backbone delta plus the final ``s·B·A``) as one
LoRA adapter for the original base model, built factored; against float64 references and on the tiny Llama."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedmomentum import checkpoint, driver, simulation
from fedmomentum.backbone_change import BackboneChange, whole_change
from fedmomentum.types import LoraPair, LowRank


def lowrank(rng, d, k, q):
    return LowRank(torch.tensor(rng.standard_normal((d, q)), dtype=torch.float32),
                   torch.tensor(rng.standard_normal((q, k)), dtype=torch.float32))


def dense(x: LowRank) -> np.ndarray:
    return x.left.double().numpy() @ x.right.double().numpy()


def test_the_change_is_the_sum_of_the_deltas_and_is_cut_when_its_width_doubles():
    rng = np.random.default_rng(0)
    base = lowrank(rng, 30, 20, 3)
    rounds = [{"a": lowrank(rng, 30, 20, 2), "b": lowrank(rng, 8, 6, 1)}, {"a": base},
              {"a": LowRank(-base.left, base.right)}]
    change, reference = BackboneChange(), {"a": np.zeros((30, 20)), "b": np.zeros((8, 6))}
    for deltas in rounds:
        change.add(deltas)
        for name, delta in deltas.items():
            reference[name] += dense(delta)
    for name, expected in reference.items():
        np.testing.assert_allclose(dense(change.deltas[name]), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert change.deltas["a"].rank == 2 + 3 + 3  # below the first cut (width 32) the factors are only stacked
    Y = lowrank(rng, 60, 50, 30)
    wide = BackboneChange({"a": Y})
    widths = []
    for _ in range(5):  # + x − x: the width grows by 8 a pair, is cut at 34 (> 32), then again past 68
        x = lowrank(rng, 60, 50, 4)
        wide.add({"a": x})
        wide.add({"a": LowRank(-x.left, x.right)})
        widths.append(wide.deltas["a"].rank)
    assert widths == [38, 46, 54, 62, 30]  # the last cut leaves the numerical rank: the cancelled pairs are gone
    np.testing.assert_allclose(dense(wide.deltas["a"]), dense(Y), rtol=0, atol=1e-4 * np.abs(dense(Y)).max())


@pytest.mark.parametrize("rank", [None, 2])
def test_whole_change_is_the_backbone_change_plus_the_adapter(rank):
    rng = np.random.default_rng(1)
    s = 1.5
    change = {"a": lowrank(rng, 30, 20, 5)}
    lora = {"a": LoraPair(torch.tensor(rng.standard_normal((3, 20)), dtype=torch.float32),
                          torch.tensor(rng.standard_normal((30, 3)), dtype=torch.float32)),
            "b": LoraPair(torch.randn(3, 6), torch.zeros(8, 3))}  # untouched: B = 0 and no change
    factors, stats = whole_change(change, lora, s, rank)
    assert set(factors) == {"a"}
    total = dense(change["a"]) + s * lora["a"].B.double().numpy() @ lora["a"].A.double().numpy()
    U, S, Vh = np.linalg.svd(total, full_matrices=False)
    keep = 8 if rank is None else rank
    expected = (U[:, :keep] * S[:keep]) @ Vh[:keep]
    got = factors["a"].B.double().numpy() @ factors["a"].A.double().numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * S[0])
    assert stats["a"]["rank"] == factors["a"].rank == keep
    assert stats["a"]["energy_dropped"] == pytest.approx((S[keep:] ** 2).sum() / (S**2).sum(), abs=1e-6)
    B, A = factors["a"].B.double().numpy(), factors["a"].A.double().numpy()
    np.testing.assert_allclose(B.T @ B, A @ A.T, rtol=0, atol=1e-4 * S[0])  # √S on each side


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method, options", [("fedmomentum", {}), ("frlora", {}), ("flora", {})])
def test_the_original_base_with_the_adapter_is_the_merged_model(method, options, tmp_path, tiny_model, small_config):
    original = copy.deepcopy(tiny_model[0])
    config = small_config(tmp_path / "run", method=method, method_options=options, export_merged=True,
                          accuracy_per_family=0)
    summary = simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    out = tmp_path / "run"
    folder = out / driver.FOR_ORIGINAL_BASE
    settings = json.loads((folder / "adapter_config.json").read_text())
    assert settings["base_model_name_or_path"] == "tiny"
    assert summary[driver.FOR_ORIGINAL_BASE]["energy_dropped"] == pytest.approx(0.0, abs=1e-6)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = logits(AutoModelForCausalLM.from_pretrained(out / "merged"), ids)
    adapted = PeftModel.from_pretrained(copy.deepcopy(original), folder)
    torch.testing.assert_close(logits(adapted, ids), merged, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(logits(original, ids), merged, atol=1e-3)  # the run did change the model
    assert max(settings["rank_pattern"].values()) == summary[driver.FOR_ORIGINAL_BASE]["rank"]


def test_export_rank_cuts_and_reports_the_energy(tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "run", method="fedmomentum", export_merged=True, export_rank=1,
                          accuracy_per_family=0)
    summary = simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    exported = summary[driver.FOR_ORIGINAL_BASE]
    assert exported["rank"] == 1 and 0 < exported["energy_dropped"] < 1
    settings = json.loads((tmp_path / "run" / driver.FOR_ORIGINAL_BASE / "adapter_config.json").read_text())
    assert set(settings["rank_pattern"].values()) == {1}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())[driver.FOR_ORIGINAL_BASE] == exported


def test_the_change_survives_a_resume(tmp_path, tiny_model, small_config):
    original = copy.deepcopy(tiny_model[0])
    config = small_config(tmp_path / "run", method="fedex-lora", rounds=1, export_merged=True, accuracy_per_family=0)
    simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    assert checkpoint.load(tmp_path / "run" / driver.CHECKPOINT)[0].change
    longer = config.replace(rounds=2)
    simulation.run(longer, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], resume=True, quiet=True)
    out = tmp_path / "run"
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))
    merged = logits(AutoModelForCausalLM.from_pretrained(out / "merged"), ids)
    adapted = PeftModel.from_pretrained(original, out / driver.FOR_ORIGINAL_BASE)
    torch.testing.assert_close(logits(adapted, ids), merged, atol=1e-4, rtol=1e-4)


def test_no_adapter_for_the_original_base_when_the_backbone_did_not_change(tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "run", method="fedit", rounds=1, accuracy_per_family=0)
    summary = simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    assert driver.FOR_ORIGINAL_BASE not in summary
    assert not (tmp_path / "run" / driver.FOR_ORIGINAL_BASE).exists()


def test_a_bfloat16_base_with_the_adapter_is_the_merged_model_up_to_one_rounding(tmp_path, tiny_model, small_config):
    """With ``dtype=bfloat16`` the backbone is kept in float32 masters and ``merged/`` is it rounded once to bf16: the
    original bf16 base + the adapter gives the same logits up to that rounding, far below what the run changed."""
    original = copy.deepcopy(tiny_model[0]).to(torch.bfloat16)
    config = small_config(tmp_path / "run", method="fedmomentum", dtype="bfloat16", export_merged=True,
                          accuracy_per_family=0)
    simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    out = tmp_path / "run"
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    merged_model = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.bfloat16)
    assert merged_model.dtype == torch.bfloat16
    merged = logits(merged_model, ids).float()
    adapted = logits(PeftModel.from_pretrained(copy.deepcopy(original), out / driver.FOR_ORIGINAL_BASE), ids).float()
    changed = (logits(original, ids).float() - merged).abs().max()
    assert changed > 0.05
    assert (adapted - merged).abs().max() < 0.05 * changed
