"""On CUDA only (marked ``gpu``, skipped without a device): the shapes and precisions users run.

``benchmarks/gpu_check.sh`` runs these with the timings; here they are pass/fail. ``FEDMOMENTUM_TOKENIZER`` names a
tokenizer folder where the default model's cache cannot be built (a GPU machine without the GGUF package).
"""

from __future__ import annotations

import os

import pytest
import torch

import fedmomentum as fm
from fedmomentum import checkpoint, simulation
from fedmomentum.models import random_model
from fedmomentum.peft_io import lora_layers
from fedmomentum.records import read_metrics

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["fedmomentum", "fedit"])
def test_a_1b_llama_in_bf16_trains_past_round_2_on_cuda(method, small_config, tmp_path):
    """The issue's failure: on a 16-layer 1B random Llama the first client of round 2 returned NaN factors (a cut
    prompt starting on <|im_end|>, whose embedding is zero). Default families, prompts long enough to be cut."""
    model, tokenizer = random_model("1b", dtype=torch.bfloat16, device="cuda",
                                    tokenizer=os.environ.get("FEDMOMENTUM_TOKENIZER"))
    config = small_config(tmp_path, model=None, method=method, device="cuda", dtype="bfloat16", rounds=3, clients=4,
                          clients_per_round=4, local_steps=8, batch_size=4, max_length=128, lr=1e-3,
                          families=["gsm_symbolic", "basic_arithmetic"], train_per_family=40)
    simulation.run(config, model=model, tokenizer=tokenizer, quiet=True)
    rows = read_metrics(tmp_path)
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in rows)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows[1:])
    layer = next(iter(lora_layers(model).values()))
    assert layer.get_base_layer().weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    if method == "fedmomentum":  # its residuals went into float32 masters, not into the bf16 weights
        state, _ = checkpoint.load(tmp_path / "checkpoint.safetensors")
        assert {w.dtype for w in state.backbone.values()} == {torch.float32}


def test_batched_aggregation_on_cuda_matches_the_per_layer_route_and_the_cpu():
    g = torch.Generator().manual_seed(0)
    shapes = {f"l{i}": (512, 512) if i % 2 else (128, 512) for i in range(8)}

    def pair(d, k, r=8):
        return fm.LoraPair(torch.randn(r, k, generator=g) / k**0.5, 0.01 * torch.randn(d, r, generator=g))

    global_lora = {n: pair(*s) for n, s in shapes.items()}
    updates = [fm.ClientUpdate({n: pair(*s) for n, s in shapes.items()}, 10 + i, f"c{i}") for i in range(6)]

    def on(device, batched):
        lora = {n: p.to(device) for n, p in global_lora.items()}
        ups = [fm.ClientUpdate({n: p.to(device) for n, p in u.factors.items()}, u.num_examples, u.client_id)
               for u in updates]
        return fm.methods.create("fedmomentum", batched=batched).aggregate(lora, ups, scaling=2.0)

    batched, per_layer, cpu = on("cuda", True), on("cuda", False), on("cpu", True)
    for name in shapes:
        expected = cpu.backbone[name].dense() + 2.0 * cpu.lora[name].delta()
        for result in (batched, per_layer):
            merged = (result.backbone[name].dense() + 2.0 * result.lora[name].delta()).cpu()
            torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(batched.lora[name].A, per_layer.lora[name].A, rtol=1e-5, atol=1e-6)
