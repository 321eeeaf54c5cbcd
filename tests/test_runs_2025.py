"""End to end on the tiny Llama: FRLoRA's start and rounds, FedSA-LoRA's clients keeping their B (also across a
resume), mixed client ranks, TensorBoard records, and the guards for engines that lack these."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from fedmomentum import checkpoint, driver, simulation
from fedmomentum.build import client_examples
from fedmomentum.cli import app
from fedmomentum.config import RunConfig
from fedmomentum.evaluate import family_losses
from fedmomentum.peft_io import ADAPTER, get_backbone, get_lora, lora_layers, set_lora
from fedmomentum.records import check_report_to, read_metrics, scalars
from fedmomentum.schedule import client_ranks, sample_clients
from fedmomentum.state import ServerState
from fedmomentum.types import LoraPair


class Capturing(simulation.InProcess):
    """The in-process engine, keeping every update it returns and every adapter its clients start from (not the
    starts the driver recomputes to measure each update, ``robust.bound_updates``)."""

    def __init__(self, engine: simulation.InProcess):
        super().__init__(engine.setup, engine.client_data)
        self.updates, self.starts, self.training = [], [], False
        original = self.setup.method.client_start

        def client_start(global_lora, **kwargs):
            start = original(global_lora, **kwargs)
            if self.training:
                self.starts.append(start)
            return start

        self.setup.method.client_start = client_start

    def train_round(self, t, *args):
        self.training = True
        try:
            trained = super().train_round(t, *args)
        finally:
            self.training = False
        self.updates += trained.updates
        return trained


def layer_outputs(setup, x):
    with torch.no_grad():
        return {name: layer(x) for name, layer in lora_layers(setup.model).items()}


def assert_average_of_client_models(setup, before, updates, x):
    """Each adapted layer of the server's model computes ``Σ p_k (W + s_k B_k A_k) x``."""
    weights = setup.method.client_weights(updates)
    outputs = layer_outputs(setup, x)
    for name in outputs:
        expected = sum(p * (x @ (before[name] + u.scaling * u.factors[name].delta()).T)
                       for p, u in zip(weights, updates, strict=True))
        torch.testing.assert_close(outputs[name], expected, atol=1e-5, rtol=1e-4)


# --- FRLoRA ----------------------------------------------------------------------------------------------------


def test_frlora_start_keeps_the_model_and_a_round_folds_into_the_backbone(tmp_path, fresh_tiny, small_config):
    config = small_config(tmp_path / "run", method="frlora", method_options={"train_A": True, "average": "products"},
                          clients=3, clients_per_round=3, train_per_family=13)
    setup, engine = simulation.engine(config, *fresh_tiny)
    engine = Capturing(engine)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    original = get_backbone(setup.model)
    with torch.no_grad():
        logits = setup.model(input_ids=ids).logits
    state = driver.start(setup, engine)
    start = get_lora(setup.model)
    assert all(torch.equal(start[n].A, state.lora[n].A) and torch.equal(start[n].B, state.lora[n].B) for n in start)
    with torch.no_grad():
        torch.testing.assert_close(setup.model(input_ids=ids).logits, logits, atol=1e-4, rtol=1e-4)
    s = setup.scaling
    for name, W in original.items():  # s B₀ A₀ is the top-r part of W, and W − s B₀ A₀ is left in the backbone
        U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
        top = (U[:, :4] * S[:4]) @ Vh[:4]
        torch.testing.assert_close(s * start[name].delta().double(), top, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(get_backbone(setup.model)[name].double(), W.double() - top, atol=1e-4, rtol=1e-4)

    before = get_backbone(setup.model)
    x = torch.randn(5, fresh_tiny[0].config.hidden_size, generator=torch.Generator().manual_seed(1))
    _, result, record = driver.run_round(setup, engine, state, 1)
    assert all(torch.equal(engine.starts[0][name].B, start[name].B) for name in start)  # clients start at (A₀, B₀)
    assert record["residual_rank"] > 0
    assert_average_of_client_models(setup, before, engine.updates, x)
    for name, pair in result.lora.items():  # the adapter goes back to (A₀, B₀)
        assert torch.equal(pair.A, start[name].A) and torch.equal(pair.B, start[name].B)


# --- FedSA-LoRA ------------------------------------------------------------------------------------------------


def test_fedsa_lora_clients_start_from_the_shared_A_and_their_own_B(tmp_path, fresh_tiny, small_config):
    config = small_config(tmp_path / "run", method="fedsa-lora", clients=2, clients_per_round=2)
    setup, engine = simulation.engine(config, *fresh_tiny)
    setup.client_mixtures = {}  # no personalised evaluation: only the clients' own starts are captured
    engine = Capturing(engine)
    state, first, _ = driver.run_round(setup, engine, driver.start(setup, engine), 1)
    state, _, _ = driver.run_round(setup, engine, state, 2)
    trained, starts = engine.updates[:2], engine.starts[2:]
    for update, start in zip(trained, starts, strict=True):
        for name, pair in start.items():
            assert torch.equal(pair.A, first.lora[name].A)  # the averaged A
            assert torch.equal(pair.B, update.factors[name].B)  # the client's own B from round 0
    name = next(iter(first.lora))
    assert not torch.equal(starts[0][name].B, starts[1][name].B)
    assert set(state.clients) == {"client-0", "client-1"}
    assert set(state.clients["client-0"]) == {"B"}


def test_fedsa_lora_records_each_clients_personalised_model_on_its_own_slice(tmp_path, fresh_tiny, small_config):
    """``personal_loss/<client>``: ``(A′, B_i)`` on the held-out examples of the families client i trains on, weighted
    by its share of each; recomputed here from the checkpoint and the partition. The server's model is left as it was
    (its eval loss is reproduced after the personal evaluations)."""
    config = small_config(tmp_path / "run", method="fedsa-lora", rounds=2, clients=3, clients_per_round=2,
                          accuracy_per_family=0, partition="family")
    setup, engine = simulation.engine(config, *fresh_tiny)
    driver.run(setup, engine, quiet=True)
    state, _ = checkpoint.load(tmp_path / "run" / driver.CHECKPOINT)
    last = read_metrics(tmp_path / "run")[-1]
    parts, _ = client_examples(config)
    with torch.no_grad():
        server = family_losses(setup.model, setup.eval_data, pad_id=setup.tokenizer.pad_token_id)
    assert sum(server.values()) / len(server) == pytest.approx(last["eval_loss"], rel=1e-6)
    expected = {}
    for index, part in enumerate(parts):
        client = f"client-{index}"
        shares = {f: sum(e.family == f for e in part) / len(part) for f in {e.family for e in part}}
        if client in state.clients:
            set_lora(setup.model, {n: LoraPair(p.A, state.clients[client]["B"][n]) for n, p in state.lora.items()})
        losses = family_losses(setup.model, setup.eval_data, pad_id=setup.tokenizer.pad_token_id)
        set_lora(setup.model, state.lora)
        expected[client] = sum(w * losses[f] for f, w in shares.items())
        assert last[f"personal_loss/{client}"] == pytest.approx(expected[client], rel=1e-5)
    assert len(set(e.family for e in parts[0])) == 1  # partition=family: a client's slice is one family
    assert last["personal_eval_loss"] == pytest.approx(sum(expected.values()) / 3, rel=1e-5)
    assert any(abs(last[f"personal_loss/{c}"] - last["global_eval_loss_by_client"]) > 1e-4 for c in state.clients)
    assert "final_personal_eval_loss" in json.loads((tmp_path / "run" / "summary.json").read_text())


def test_methods_whose_clients_keep_nothing_record_no_personal_loss(tmp_path, fresh_tiny, small_config):
    config = small_config(tmp_path / "run", method="fedit", rounds=1, accuracy_per_family=0)
    simulation.run(config, model=fresh_tiny[0], tokenizer=fresh_tiny[1], quiet=True)
    assert not any("personal" in key for row in read_metrics(tmp_path / "run") for key in row)


def test_fedsa_lora_resume_restores_the_clients_B_and_tensorboard_is_not_doubled(tmp_path, tiny_model,
                                                                                  small_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config(tmp_path / "full", method="fedsa-lora", rounds=3, clients=3, clients_per_round=2,
                          accuracy_per_family=0, report_to="tensorboard")
    simulation.run(config, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], quiet=True)
    full, _ = checkpoint.load(tmp_path / "full" / driver.CHECKPOINT)

    crashing = config.replace(out=str(tmp_path / "crashed"))
    setup, engine = simulation.engine(crashing, copy.deepcopy(tiny_model[0]), tiny_model[1])

    class CrashInRound2(simulation.InProcess):
        def train_round(self, t, *args):
            trained = super().train_round(t, *args)
            if t == 3:
                raise RuntimeError("power cut")
            return trained

    with pytest.raises(RuntimeError, match="power cut"):
        driver.run(setup, CrashInRound2(engine.setup, engine.client_data), quiet=True)
    saved, _ = checkpoint.load(tmp_path / "crashed" / driver.CHECKPOINT)
    assert saved.rounds_done == 2
    returning = set(saved.clients) & {f"client-{c}" for c in sample_clients(config, 3)}
    assert returning, "round 3 must have a client that trained before, or this test shows nothing"
    simulation.run(crashing, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], resume=True, quiet=True)
    resumed, _ = checkpoint.load(tmp_path / "crashed" / driver.CHECKPOINT)
    for name in full.lora:
        assert torch.equal(resumed.lora[name].A, full.lora[name].A)
        assert torch.equal(resumed.lora[name].B, full.lora[name].B)
    assert set(resumed.clients) == set(full.clients)
    for client, factors in full.clients.items():
        for name, B in factors["B"].items():
            assert torch.equal(resumed.clients[client]["B"][name], B)
    assert [r["eval_loss"] for r in read_metrics(tmp_path / "crashed")] == [
        r["eval_loss"] for r in read_metrics(tmp_path / "full")]
    events = EventAccumulator(str(tmp_path / "crashed" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval_loss")] == [0, 1, 2, 3]  # round 3 once, though written twice


# --- mixed client ranks ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, ranks", [("fedmomentum", [2, 4, 8]), ("flora", [2, 4, 8]),
                                           ("fedex-lora", [2, 4, 4]), ("flexlora", [2, 4, 4])])
def test_clients_of_mixed_ranks_train_and_aggregate_with_their_own_scaling(method, ranks, tmp_path, fresh_tiny,
                                                                           small_config):
    config = small_config(tmp_path / "run", method=method, clients=3, clients_per_round=3, client_ranks=ranks,
                          lora_r=4, lora_alpha=8, train_per_family=13)
    setup, engine = simulation.engine(config, *fresh_tiny)
    engine = Capturing(engine)
    before = get_backbone(setup.model)
    x = torch.randn(5, fresh_tiny[0].config.hidden_size, generator=torch.Generator().manual_seed(2))
    state, _, _ = driver.run_round(setup, engine, driver.start(setup, engine), 1)
    assert [next(iter(u.factors.values())).rank for u in engine.updates] == ranks
    assert [u.scaling for u in engine.updates] == [8 / r for r in ranks]
    assert setup.model.active_adapter == ADAPTER
    if method != "flexlora":  # exact: the global model is the weighted average of the client models
        assert_average_of_client_models(setup, before, engine.updates, x)
    driver.run_round(setup, engine, state, 2)  # every client starts again at its own rank
    assert [next(iter(s.values())).rank for s in engine.starts[3:]] == ranks
    assert [next(iter(u.factors.values())).rank for u in engine.updates[3:]] == ranks


def test_a_mixed_rank_run_exports_only_the_global_adapter(tmp_path, fresh_tiny, small_config):
    config = small_config(tmp_path / "run", method="fedmomentum", rounds=1, client_ranks="cycle:2,8",
                          accuracy_per_family=0)
    simulation.run(config, model=fresh_tiny[0], tokenizer=fresh_tiny[1], quiet=True)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert not [p for p in adapter.iterdir() if p.is_dir()]  # no rank2/ or rank8/ client adapters


def test_client_ranks_rules():
    base = RunConfig(clients=5, lora_r=4)
    assert client_ranks(base) == [4] * 5
    assert client_ranks(base.replace(client_ranks=[1, 2, 3, 4, 5])) == [1, 2, 3, 4, 5]
    assert client_ranks(base.replace(client_ranks="cycle:2,8")) == [2, 8, 2, 8, 2]
    drawn = client_ranks(base.replace(client_ranks="random:2,4,8"))
    assert drawn == client_ranks(base.replace(client_ranks="random:2,4,8")) and set(drawn) <= {2, 4, 8}
    assert drawn != client_ranks(base.replace(client_ranks="random:2,4,8", seed=3)) or len(set(drawn)) == 1
    assert client_ranks(base.replace(client_ranks="[1, 2, 3, 4, 5]")) == [1, 2, 3, 4, 5]  # text of a list
    assert client_ranks(base.replace(client_ranks="2,2,4,4,8")) == [2, 2, 4, 4, 8]
    for spec, message in [([2, 4], "2 ranks for 5 clients"), ("cycle", "a list of integers or a rule"),
                          ("even:2,4", "must be 'cycle:"), ("cycle:2,x", "must be integers"), ("cycle:", "no rank"),
                          ([2, 4, 0, 4, 4], "≥ 1"), ([2, 4, 2.5, 4, 4], "≥ 1"), (7, "a list of ranks")]:
        with pytest.raises(ValueError, match=message):
            client_ranks(base.replace(client_ranks=spec))


@pytest.mark.parametrize("args, message", [
    (["--method", "fedit", "--set", "client_ranks=[2,4]"], "fedit needs every client at the global rank 2"),
    (["--method", "fedsa-lora", "--set", "client_ranks=cycle:2,4"], "fedsa-lora needs every client"),
    (["--method", "fedex-lora", "--set", "client_ranks=[2,4]"], "must not exceed"),
    (["--set", "client_ranks=[2,4,8]"], "3 ranks for 2 clients"),
    (["--set", "report_to=wandb"], "report_to: unknown 'wandb'"),
])
def test_bad_ranks_and_reporters_are_one_line_errors(args, message, tmp_path):
    result = CliRunner().invoke(app, ["run", "--model", "tiny", "--out", str(tmp_path / "x"), "--clients", "2",
                                      "--clients-per-round", "2", "--set", "lora_r=2", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


# --- engines without these features ----------------------------------------------------------------------------


class Plain(driver.Engine):
    name = "plain"


@pytest.mark.parametrize("changes, message", [
    ({"method": "frlora"}, "frlora changes the backbone before round 1"),
    ({"method": "fedsa-lora"}, "fedsa-lora's clients keep their own B"),
    ({"method": "flora", "client_ranks": [2, 4, 4]}, "client_ranks gives clients their own LoRA ranks"),
])
def test_an_engine_without_a_feature_refuses_the_run(changes, message, tmp_path, fresh_tiny, small_config):
    config = small_config(tmp_path / "run", **changes)
    setup, _ = simulation.engine(config, *fresh_tiny)
    with pytest.raises(ValueError, match=f"the plain engine cannot run this yet: {message}"):
        driver.run(setup, Plain(), quiet=True)
    driver.check_engine(setup, simulation.InProcess(setup, []))


# --- TensorBoard -----------------------------------------------------------------------------------------------


def test_tensorboard_holds_every_per_round_scalar(tmp_path, fresh_tiny, small_config):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = small_config(tmp_path / "run", report_to=["tensorboard"])
    simulation.run(config, model=fresh_tiny[0], tokenizer=fresh_tiny[1], quiet=True)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    rows = read_metrics(tmp_path / "run")
    expected = {}
    for row in rows:
        for tag, value in scalars(row):
            expected.setdefault(tag, {})[row["round"]] = value
    assert {"eval_loss", "train_loss", "loss/chain_sum", "uplink_bytes", "rank_kept", "accuracy",
            "uplink_bytes_per_client/client-0"} <= set(expected)
    assert set(expected) == tags
    for tag, by_round in expected.items():
        got = {e.step: e.value for e in events.Scalars(tag)}
        assert got.keys() == by_round.keys(), tag
        for step, value in by_round.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)


def test_report_to_checks(monkeypatch):
    assert check_report_to("none") == [] and check_report_to(["tensorboard"]) == ["tensorboard"]
    assert check_report_to("[tensorboard]") == ["tensorboard"] == check_report_to("tensorboard, none")
    with pytest.raises(ValueError, match="report_to: unknown 'wandb'"):
        check_report_to(["tensorboard", "wandb"])
    with pytest.raises(ValueError, match="report_to must be a name or a list"):
        check_report_to(3)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name))
    with pytest.raises(ValueError, match=r"pip install 'fedmomentum\[tensorboard\]'"):
        RunConfig(report_to="tensorboard").validate()


def test_checkpoint_keeps_the_clients_state_under_any_id(tmp_path):
    from safetensors.torch import load_file, save_file

    lora = {"l": fm_pair(2, 3, 4)}
    clients = {"bob.v2": {"B": {"l": torch.randn(3, 2)}}, "client-0": {"B": {"l": torch.randn(3, 2)}}}
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, ServerState(1, lora, clients=clients), {"x": 1})
    loaded, info = checkpoint.load(path)
    assert set(loaded.clients) == set(clients) and info == {"x": 1}
    for client, factors in clients.items():
        assert torch.equal(loaded.clients[client]["B"]["l"], factors["B"]["l"])
    assert checkpoint.load(_resaved(path, tmp_path, load_file, save_file, {}))[0].clients == {}
    broken = _resaved(path, tmp_path, load_file, save_file, {"client.7.B.l": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="bad client tensor name 'client.7.B.l'"):
        checkpoint.load(broken)


def fm_pair(r, d, k):
    from fedmomentum.types import LoraPair

    return LoraPair(torch.randn(r, k), torch.randn(d, r))


def _resaved(path, tmp_path, load_file, save_file, extra):
    """The checkpoint with its client tensors replaced by ``extra`` (same metadata)."""
    from safetensors import safe_open

    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("client.")}
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    out = tmp_path / f"resaved{len(extra)}.safetensors"
    save_file({**tensors, **extra}, str(out), metadata=metadata)
    return out


def test_compare_writes_one_csv_for_methods_with_and_without_an_original_base_adapter(tmp_path):
    import csv

    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "--model", "tiny", "--methods", "fedit,flora", "--rounds", "1",
                                      "--clients", "2", "--clients-per-round", "2", "--local-steps", "1",
                                      "--set", "accuracy_per_family=0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [row["method"] for row in rows] == ["fedit", "flora"]
    assert rows[0]["adapter_for_original_base/rank"] == "" and int(rows[1]["adapter_for_original_base/rank"]) > 0
