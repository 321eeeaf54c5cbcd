"""fedmomentum on Flower: same numbers as `fedmomentum run`, faults, backbone versioning, resume, deployment.

The Ray simulations and the loopback deployment use the tiny random Llama (``model="tiny"``), built
deterministically by the server and by every ClientApp process.
"""

from __future__ import annotations

import json
import logging
import tomllib
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.simulation import run_simulation

import flower_helpers
from fedmomentum import build, checkpoint, driver, methods, simulation
from fedmomentum.config import FIELDS, RunConfig
from fedmomentum.flower import RoundFailed, make_client_app, make_server_app, parse_run_config, wire
from fedmomentum.flower import client_app as flower_client
from fedmomentum.flower.replies import Limits
from fedmomentum.flower.server_app import FLOWER_KEYS
from fedmomentum.peft_io import get_backbone
from fedmomentum.records import read_metrics as rows
from fedmomentum.types import LoraPair, LowRank
from flower_helpers import (
    FLOWER,
    HELLO_FAULTS,
    RESYNC_FAULTS,
    ROOT,
    TRAIN_FAULTS,
    LocalGrid,
    assert_same_state,
    faulty_client_app,
    node_backbone,
    run_local,
)

ray.cloudpickle.register_pickle_by_value(flower_helpers)  # Ray's actors get faulty_client_app by value


@pytest.fixture(scope="session")
def flower_config(small_config):
    """``flower_config(tmp_path, name, **changes)``: ``small_config`` for two nodes, writing to ``tmp_path/name``."""
    return lambda tmp_path, name, **changes: small_config(tmp_path / name, **{**FLOWER, **changes})


def ray_simulation(config: RunConfig, num_supernodes: int, faults: dict[int, str] | None = None) -> None:
    client_app = faulty_client_app(faults) if faults else make_client_app()
    run_simulation(make_server_app(config, min_clients=1, node_timeout=60), client_app,
                   num_supernodes=num_supernodes,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})


# --- wire format ------------------------------------------------------------------------------------------


def test_wire_round_trips_factors_and_deltas():
    lora = {"model.layers.0.self_attn.q_proj": LoraPair(torch.randn(4, 8), torch.randn(6, 4)),
            "model.layers.1.self_attn.v_proj": LoraPair(torch.randn(4, 8), torch.randn(3, 4))}
    back = wire.record_to_lora(wire.lora_to_record(lora))
    assert all(torch.equal(back[k].A, lora[k].A) and torch.equal(back[k].B, lora[k].B) for k in lora)
    only_b = wire.record_to_factors(wire.lora_to_record(lora, ("B",)))
    assert all(set(v) == {"B"} for v in only_b.values())
    log = {0: {"model.layers.0.self_attn.q_proj": LowRank(torch.randn(6, 3), torch.randn(3, 8))}, 1: {}, 2: {
        "model.layers.1.self_attn.v_proj": LowRank(torch.randn(3, 1), torch.randn(1, 8))}}
    record = wire.deltas_to_record(log)
    got = wire.record_to_deltas(record)
    assert set(got) == {0, 2}
    assert torch.equal(got[2]["model.layers.1.self_attn.v_proj"].right, log[2]["model.layers.1.self_attn.v_proj"].right)
    content = RecordDict({"backbone": record})
    assert wire.array_bytes(content) >= 4 * (6 * 3 + 3 * 8 + 3 + 8)
    with pytest.raises(ValueError, match="unexpected array"):
        wire.record_to_factors(ArrayRecord({"x/C": Array(np.ones((1, 1), np.float32))}))


def test_run_config_parsing():
    config, options, resume = parse_run_config({
        "model": "tiny", "method": "fedmomentum", "families": "gcd, chain_sum", "local-steps": 3,
        "method-options.residual_energy": 0.99, "method-options.split": "", "min-clients": 2, "round-timeout": 30,
        "resume": True, "max-examples": 500, "max-factor-abs": 10.0, "eval-data": "none", "lr-schedule": "",
        "config-file": ""})
    assert config.families == ["gcd", "chain_sum"] and config.local_steps == 3
    assert config.method_options == {"residual_energy": 0.99}  # "" = not set
    assert config.lr_schedule == RunConfig().lr_schedule
    assert options == {"min_clients": 2, "round_timeout": 30.0, "eval_data": "none",
                       "limits": Limits(max_examples=500, max_abs=10.0)} and resume
    with pytest.raises(ValueError, match="local_step"):
        parse_run_config({"local-step": 3})
    with pytest.raises(ValueError, match="unknown option.*residual_energy.*fedit"):
        parse_run_config({"method": "fedit", "method-options.residual_energy": 0.99})


def test_config_file_sits_between_the_app_defaults_and_explicit_keys(tmp_path):
    """RunConfig defaults < the app's pyproject < config-file < the keys given with ``--run-config``."""
    path = tmp_path / "run.toml"
    path.write_text('rounds = 7\nlocal_steps = 5\nlr = 0.01\nmethod_options = {residual_energy = 0.9}\n')
    values = {"model": "tiny", "rounds": 3, "local-steps": 2, "lr": 0.001, "batch-size": 3, "config-file": str(path),
              "method-options.residual_energy": "", "method-options.merge_every": 2}
    config, _, _ = parse_run_config(values, explicit={"config-file", "lr", "method-options.merge_every"})
    assert (config.rounds, config.local_steps, config.lr, config.batch_size) == (7, 5, 0.001, 3)
    assert config.method_options == {"residual_energy": 0.9, "merge_every": 2}
    assert parse_run_config(values)[0].rounds == 3  # every key explicit (the Python API): the file only fills gaps
    with pytest.raises(FileNotFoundError, match="absolute path"):
        parse_run_config({"config-file": "nowhere.toml"})


def test_the_example_app_declares_every_documented_key():
    """Flower refuses run-config keys an app does not declare: the example declares every RunConfig field, every
    method option and every Flower-only key, and its defaults parse."""
    app = tomllib.loads((ROOT / "examples" / "flower" / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    declared = {key.replace("-", "_") for key, value in app["config"].items() if not isinstance(value, dict)}
    assert set(FIELDS) - {"method_options"} <= declared, set(FIELDS) - declared
    assert {key.replace("-", "_") for key in FLOWER_KEYS} <= declared
    options = {o for name in methods.names() for o in methods.options(name)} - {"weighting", "seed"}
    assert options == set(app["config"]["method-options"])
    flat = {k: v for k, v in app["config"].items() if not isinstance(v, dict)}
    flat.update({f"method-options.{k}": v for k, v in app["config"]["method-options"].items()})
    config, options, resume = parse_run_config(flat, explicit=set())
    assert config.method == "fedmomentum" and config.method_options == {} and not resume
    assert config.lr_schedule == "cosine" and config.jsonl == [] and options["limits"] == Limits()


# --- in-process rounds on LocalGrid (Flower's wire format, no processes) ----------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, flower_config):
    """``fedmomentum run`` of ``small_config`` per method and changes (computed once, on first use): its output
    folder."""
    root, done = tmp_path_factory.mktemp("reference"), {}

    def get(method: str, **changes) -> Path:
        key = (method, *sorted((k, repr(v)) for k, v in changes.items()))
        if key not in done:
            config = flower_config(root, f"{method}-{len(done)}", method=method, **changes)
            simulation.run(config, quiet=True)
            done[key] = Path(config.out)
        return done[key]

    return get


@pytest.mark.parametrize("method", ["fedmomentum", "rolora"])
def test_in_process_flower_rounds_are_bit_identical_to_fedmomentum_run(method, tmp_path, reference, flower_config):
    config = flower_config(tmp_path, "flower", method=method)
    if method == "fedmomentum":  # a node whose own LoRA init differs notices (digest) and gets the whole adapter
        worker = flower_client.shared_worker(1, wire.fingerprint(config), config)
        worker.initial = {k: LoraPair(v.A + 1e-3, v.B) for k, v in worker.initial.items()}
    run_local(config, LocalGrid(make_client_app(), [0, 1], 2, run_id=1))
    assert_same_state(reference(method) / driver.CHECKPOINT, tmp_path / "flower" / driver.CHECKPOINT, atol=0.0)
    sim_rows, flower_rows = rows(reference(method)), rows(tmp_path / "flower")
    assert [r["eval_loss"] for r in sim_rows] == pytest.approx([r["eval_loss"] for r in flower_rows], abs=1e-6)
    assert all(r["uplink_bytes"] >= r["method_uplink_bytes"] > 0 for r in flower_rows[1:])  # + npy headers
    adapter = wire.split_factors(wire.lora_to_record(checkpoint.load(reference(method) / driver.CHECKPOINT)[0].lora))
    factor_bytes = {f: wire.array_bytes(RecordDict({"x": record})) for f, record in adapter.items()}
    if method == "fedmomentum":
        assert flower_rows[1]["resyncs"] == 2 and flower_rows[2]["resyncs"] == 0
        assert flower_rows[2]["downlink_bytes"] > sum(factor_bytes.values())  # the adapter and round 1's delta
    else:  # round 1: every node builds the seeded init itself; round 2: only B, trained in round 1, goes out
        assert flower_rows[1]["downlink_bytes"] == 0 and flower_rows[2]["downlink_bytes"] == factor_bytes["B"]
    assert (tmp_path / "flower" / "summary.json").is_file() and (tmp_path / "flower" / "curves.png").is_file()


@pytest.mark.parametrize("method, changes", [("frlora", {}), ("fedsa-lora", {}),
                                             ("fedmomentum", {"client_ranks": [2, 6]}),
                                             ("flexlora", {"client_ranks": [6, 2], "rslora": True})])
def test_2025_methods_and_mixed_ranks_on_flower_equal_fedmomentum_run(method, changes, tmp_path, reference,
                                                                      flower_config):
    """FRLoRA's start (a backbone delta before round 1), FedSA-LoRA's B kept on each node, and clients of other
    ranks (each with its own scaling) give on Flower the same model as in the simulation, also when a node loses
    its state and process before round 3 (the server resends what it held: the backbone, a kept B)."""
    changes = {**changes, "rounds": 3}
    config = flower_config(tmp_path, "flower", method=method, **changes)
    run_local(config, LocalGrid(make_client_app(), [0, 1], 2, run_id=11, events={2: [("restart", 100)]}))
    a, b = reference(method, **changes) / driver.CHECKPOINT, tmp_path / "flower" / driver.CHECKPOINT
    assert_same_state(a, b, atol=0.0)  # the clients' kept B too
    assert bool(checkpoint.load(b)[0].clients) == (method == "fedsa-lora")
    sim_rows, flower_rows = rows(reference(method, **changes)), rows(tmp_path / "flower")
    assert [r["eval_loss"] for r in sim_rows] == pytest.approx([r["eval_loss"] for r in flower_rows], abs=1e-6)
    assert flower_rows[3]["resyncs"] == 1  # the restarted node was brought back


def test_late_and_restarted_nodes_rebuild_the_same_backbone(tmp_path, flower_config):
    """Partition 2 joins after two rounds; node 100 loses its state and process before round 3."""
    config = flower_config(tmp_path, "late", clients=3, clients_per_round=3, rounds=3)
    grid = LocalGrid(make_client_app(), [0, 1], 3, run_id=2, events={2: [("join", 102, 2), ("restart", 100)]})
    strategy = run_local(config, grid)
    records = rows(config.out)
    assert [r["client_ids"] for r in records[1:]] == [["client-0", "client-1"]] * 2 + [
        ["client-0", "client-1", "client-2"]]
    assert "client-2" in records[1]["failed"] and "no connected node" in records[1]["failed"]["client-2"]
    assert records[3]["resyncs"] == 1  # node 100 said it was at version 0 and got the whole log
    server = checkpoint.load(Path(config.out) / driver.CHECKPOINT)[0].backbone
    assert any(not torch.equal(server[k], v) for k, v in get_backbone(build.peft_model(config)[0]).items())
    for node_id in (100, 101, 102):  # each trained round 3 on version 2; round 3's delta reaches them next time
        assert flower_client.node_version(grid.contexts[node_id], strategy.fingerprint) == 2
        rebuilt = node_backbone(grid.contexts[node_id], config, extra=strategy.backbone_log.deltas[2])
        assert all(torch.equal(rebuilt[k], server[k]) for k in server), node_id


def test_every_bad_reply_is_rejected_and_the_round_goes_on(tmp_path, caplog, flower_config):
    """One round, one node per fault, each fault crafted by a real ClientApp and sent through Flower's wire format:
    every bad train, resync or hello reply is rejected with its reason (log and record), a second claim of a
    partition is refused, and the round aggregates the one good reply."""
    faults = [None, *TRAIN_FAULTS, *RESYNC_FAULTS, "raise", *HELLO_FAULTS, "hello-raise", "silent"]
    clients = len(faults)
    config = flower_config(tmp_path, "faults", clients=clients, clients_per_round=clients, rounds=1, partition="iid",
                           train_per_family=2 * clients)
    node_configs = {i: {"fault": fault} for i, fault in enumerate(faults) if fault}
    grid = LocalGrid(faulty_client_app(), range(clients), clients, run_id=3, node_configs=node_configs,
                     silent={100 + faults.index("silent")}, events={0: [("join", 999, 0)]})
    with caplog.at_level(logging.WARNING):
        run_local(config, grid, round_timeout=2.0)
    record = rows(config.out)[1]
    assert record["client_ids"] == ["client-0"], record["rejected"]
    for index, fault in enumerate(faults):
        cid = f"client-{index}"
        if fault in TRAIN_FAULTS or fault in RESYNC_FAULTS:
            expected = {**TRAIN_FAULTS, **RESYNC_FAULTS}[fault]
            assert expected in record["rejected"].get(cid, ""), (fault, record["rejected"].get(cid))
            assert expected in caplog.text, fault
        elif fault in HELLO_FAULTS:
            assert HELLO_FAULTS[fault] in record["nodes"][str(100 + index)], (fault, record["nodes"])
            assert record["failed"][cid] == "no connected node holds this partition"
    assert "injected failure" in record["failed"][f"client-{faults.index('raise')}"]
    failing_hello = 100 + faults.index("hello-raise")  # asked once a round, not at every look at the node list
    assert record["failed"][f"client-{faults.index('hello-raise')}"] == "no connected node holds this partition"
    assert grid.received[failing_hello, "query"] == 1
    assert record["failed"][f"client-{faults.index('silent')}"] == "no reply within 2s"
    assert "claims partition 0, already held by node 100: refused" in record["nodes"]["999"]
    summary = json.loads((tmp_path / "faults" / "summary.json").read_text())
    assert summary["status"] == "completed"


def test_a_round_without_enough_updates_stops_the_run_with_a_failed_summary(tmp_path, flower_config):
    config = flower_config(tmp_path, "strict", rounds=2)
    grid = LocalGrid(faulty_client_app({1: "huge-factors"}), [0, 1], 2, run_id=4)
    with pytest.raises(RoundFailed, match="fewer than min-clients=2"):
        run_local(config, grid, min_clients=2)
    summary = json.loads((tmp_path / "strict" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
    assert "RoundFailed" in summary["reason"] and "beyond max-factor-abs" in summary["reason"]
    # the documented way on: fix the cause, resume (no checkpoint yet: the run starts over)
    run_local(config, LocalGrid(make_client_app(), [0, 1], 2, run_id=12), resume=True, min_clients=2)
    assert json.loads((tmp_path / "strict" / "summary.json").read_text())["status"] == "completed"
    assert [row["round"] for row in rows(config.out)] == [0, 1, 2]


def test_a_killed_node_is_recorded_as_disconnected(tmp_path, flower_config):
    """The SuperLink answers a dead node's message with NODE_UNAVAILABLE (from itself, not the node): the round
    records "node disconnected" at once rather than waiting out the round timeout."""
    config = flower_config(tmp_path, "killed")
    grid = LocalGrid(make_client_app(), [0, 1], 2, run_id=5, events={1: [("kill", 101)]})  # after its round-2 message
    run_local(config, grid, round_timeout=3600.0)
    record = rows(config.out)[2]
    assert record["client_ids"] == ["client-0"] and record["failed"] == {"client-1": "node disconnected"}


def test_a_node_that_answers_with_an_error_does_not_hold_the_round_up(tmp_path, flower_config):
    """Partition 1's node fails; the round ends when partition 0 has replied, without waiting out node-timeout for
    another node to take partition 1 (its node is still there). Without polling pauses, waiting the 60 s would look
    at the node list thousands of times."""
    config = flower_config(tmp_path, "error", rounds=1)
    grid = LocalGrid(faulty_client_app({1: "raise"}), [0, 1], 2, run_id=9)
    run_local(config, grid, node_timeout=60.0)
    assert rows(config.out)[1]["client_ids"] == ["client-0"] and grid.node_polls < 20


def test_a_node_that_restarts_during_the_wait_trains_in_that_round(tmp_path, reference, flower_config):
    """Round 2: partition 0's SuperNode dies after its message went out and comes back as a new node (new id, no
    state). Its claim waits until the old node is known to be gone, then it gets round 2's message (with the whole
    backbone log): the run ends bit-identical to ``fedmomentum run``."""
    config = flower_config(tmp_path, "restart")
    grid = LocalGrid(make_client_app(), [0, 1], 2, run_id=6, events={1: [("kill", 100), ("join", 200, 0)]})
    run_local(config, grid)
    record = rows(config.out)[2]
    assert record["client_ids"] == ["client-0", "client-1"] and not record["failed"]
    assert "claims partition 0, already held by node 100" in record["nodes"]["200"]
    assert record["downlink_bytes_per_client"]["client-0"] > record["downlink_bytes_per_client"]["client-1"]
    assert_same_state(reference("fedmomentum") / driver.CHECKPOINT,
                      Path(config.out) / driver.CHECKPOINT, atol=0.0)


def write_jsonl(path: Path, family: str, count: int, marker: str) -> Path:
    lines = [json.dumps({"prompt": f"{marker} {i} + {i} = ?", "response": f"{2 * i}", "family": family})
             for i in range(count)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_nodes_train_on_their_own_data_which_never_leaves_them(tmp_path, flower_config):
    """Each node trains on the file or folder of its node config (``data``, any format ``fedmomentum run`` reads)
    and sends only its example count; the server evaluates on its own file (``eval-data``); a node whose data
    cannot be read is left out, saying why."""
    (tmp_path / "b").mkdir()
    node_a = write_jsonl(tmp_path / "a.jsonl", "alpha", 5, "SECRET-A")
    (tmp_path / "b" / "train.json").write_text(json.dumps(  # another format (Alpaca records in a JSON array)
        [{"instruction": f"SECRET-B {i} times 2?", "input": "", "output": f"{2 * i}"} for i in range(7)]))
    held_out = write_jsonl(tmp_path / "server.jsonl", "gamma", 4, "SERVER")
    config = flower_config(tmp_path, "own", clients=3, clients_per_round=3, rounds=1)
    grid = LocalGrid(make_client_app(), [0, 1, 2], 3, run_id=7, node_configs={
        0: {"data": str(node_a)}, 1: {"data": str(tmp_path / "b")}, 2: {"data": str(tmp_path / "missing.jsonl")}})
    seen: list = []
    run_local(config, grid, seen=seen, eval_data=str(held_out))
    assert [(u.client_id, u.num_examples) for u in seen] == [("client-0", 5), ("client-1", 7)]
    record = rows(config.out)[1]
    assert {k for k in record if k.startswith("loss/")} == {"loss/gamma"}
    assert "cannot read its data: FileNotFoundError" in record["nodes"]["102"]
    assert grid.uplink and all(b"SECRET" not in blob for blob in grid.uplink), "a node's examples left the node"


def test_evaluation_can_be_off(tmp_path, flower_config):
    config = flower_config(tmp_path, "no-eval", rounds=1)
    run_local(config, LocalGrid(make_client_app(), [0, 1], 2, run_id=8), eval_data="none")
    assert all("eval_loss" not in row for row in rows(config.out))
    summary = (tmp_path / "no-eval" / "summary.json").read_text()
    assert json.loads(summary)["status"] == "completed"
    # a new run refused the folder (it holds a run): the run there is left as it was
    with pytest.raises(ValueError, match="already holds a run"):
        run_local(config, LocalGrid(make_client_app(), [0, 1], 2, run_id=13), eval_data="none")
    assert (tmp_path / "no-eval" / "summary.json").read_text() == summary


def test_a_busy_superlink_only_delays_the_round(tmp_path, reference, flower_config):
    """Every other call to the Grid fails (a SuperLink whose database is locked answers 500): the exchange asks
    again, and the run ends as ``fedmomentum run`` does."""
    config = flower_config(tmp_path, "flaky")
    grid = LocalGrid(make_client_app(), [0, 1], 2, run_id=10, flaky=True)
    run_local(config, grid)
    assert all(grid.calls[m] > 2 for m in ("get_node_ids", "push_messages", "pull_messages"))
    assert all(not row["failed"] for row in rows(config.out)[1:])
    assert_same_state(reference("fedmomentum") / driver.CHECKPOINT,
                      Path(config.out) / driver.CHECKPOINT, atol=0.0)


def test_resuming_the_server_continues_the_run(tmp_path, reference, flower_config):
    part = flower_config(tmp_path, "part", rounds=1)
    run_local(part, LocalGrid(make_client_app(), [0, 1], 2, run_id=6))
    # a new Flower run (fresh nodes at version 0) continues from the checkpoint and the saved delta log
    resumed = run_local(part.replace(rounds=2), LocalGrid(make_client_app(), [0, 1], 2, run_id=7), resume=True)
    assert_same_state(reference("fedmomentum") / driver.CHECKPOINT,
                      Path(part.out) / driver.CHECKPOINT, atol=0.0)
    assert [r["round"] for r in rows(part.out)] == [0, 1, 2]
    assert resumed.backbone_log.deltas[0] and rows(part.out)[2]["downlink_bytes"] > rows(part.out)[1]["downlink_bytes"]


# --- Flower's simulation engine (Ray) ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedmomentum", "fedex-lora"])
def test_ray_simulation_matches_fedmomentum_run(method, tmp_path, reference, flower_config):
    ray_simulation(flower_config(tmp_path, "flower", method=method), num_supernodes=2)
    assert (tmp_path / "flower" / "summary.json").is_file(), "the Flower run did not finish"
    assert_same_state(reference(method) / driver.CHECKPOINT,
                      tmp_path / "flower" / driver.CHECKPOINT)
    sim_rows, flower_rows = rows(reference(method)), rows(tmp_path / "flower")
    assert [r["eval_loss"] for r in flower_rows] == pytest.approx([r["eval_loss"] for r in sim_rows], abs=1e-4)
    # no resync: the simulation engine keeps each node's context (its backbone version and deltas) between rounds
    assert all(r["client_ids"] == ["client-0", "client-1"] and not r["failed"] and r["resyncs"] == 0
               for r in flower_rows[1:])
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["uplink_bytes"] == sum(r["uplink_bytes_total"]
                                                                            for r in flower_rows[1:])


@pytest.mark.slow
def test_ray_simulation_survives_bad_replies(tmp_path, flower_config):
    config = flower_config(tmp_path, "faults", clients=4, clients_per_round=4, rounds=1, partition="iid")
    ray_simulation(config, num_supernodes=4, faults={1: "raise", 2: "header-37gib", 3: "huge-factors"})
    record = rows(config.out)[1]
    assert record["client_ids"] == ["client-0"]
    assert "injected failure" in record["failed"]["client-1"]
    assert TRAIN_FAULTS["header-37gib"] in record["rejected"]["client-2"]
    assert TRAIN_FAULTS["huge-factors"] in record["rejected"]["client-3"]
