"""fedmomentum on Flower: same numbers as `fedmomentum run`, faults, backbone versioning, resume, deployment.

The Ray simulations and the loopback deployment use the tiny random Llama (``model="tiny"``), built
deterministically by the server and by every ClientApp process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle
import torch
from flwr.app import Array, ArrayRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from fedmomentum import build, checkpoint, driver, simulation
from fedmomentum.config import RunConfig
from fedmomentum.flower import LoraStrategy, RoundFailed, make_client_app, make_server_app, parse_run_config, wire
from fedmomentum.flower import client_app as flower_client
from fedmomentum.peft_io import apply_backbone, get_backbone
from fedmomentum.records import read_metrics as rows
from fedmomentum.types import LoraPair, LowRank

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLOWER = dict(clients=2, clients_per_round=2, train_per_family=16, accuracy_per_family=0)


@pytest.fixture(scope="session")
def flower_config(small_config):
    """``flower_config(tmp_path, name, **changes)``: ``small_config`` for two nodes, writing to ``tmp_path/name``."""
    return lambda tmp_path, name, **changes: small_config(tmp_path / name, **{**FLOWER, **changes})


def faulty_client_app(faults: dict[int, str]) -> ClientApp:
    """The real ClientApp, with a fault on some partitions: ``"raise"`` (the ClientApp fails), ``"nan"`` (a NaN
    factor in the reply) or ``"keys"`` (a layer the adapter does not have)."""
    app = ClientApp()
    app.query()(flower_client.hello)

    @app.train()
    def _train(message: Message, context: Context) -> Message:
        fault = faults.get(int(context.node_config["partition-id"]))
        if fault == "raise":
            raise RuntimeError(f"injected failure on partition {context.node_config['partition-id']}")
        reply = flower_client.train(message, context)
        factors = reply.content.array_records.get("factors") if reply.has_content() else None
        if factors is not None and fault == "nan":
            key = next(iter(factors))
            factors[key] = Array(np.full(factors[key].shape, np.nan, np.float32))
        elif factors is not None and fault == "keys":
            factors["not.a.layer/" + next(iter(factors)).rsplit("/", 1)[1]] = next(iter(factors.values()))
        return reply

    return app


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's actors get faulty_client_app by value


def assert_same_state(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint, atol: float = 1e-5) -> None:
    assert a.round == b.round
    assert set(a.lora) == set(b.lora) and set(a.backbone) == set(b.backbone)
    for name in a.lora:
        torch.testing.assert_close(a.lora[name].A, b.lora[name].A, atol=atol, rtol=1e-4)
        torch.testing.assert_close(a.lora[name].B, b.lora[name].B, atol=atol, rtol=1e-4)
    for name in a.backbone:
        torch.testing.assert_close(a.backbone[name], b.backbone[name], atol=atol, rtol=1e-4)
    assert set(a.held) == set(b.held)


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
        "method-options.residual_energy": 0.99, "min-clients": 2, "round-timeout": 30, "resume": True})
    assert config.families == ["gcd", "chain_sum"] and config.local_steps == 3
    assert config.method_options == {"residual_energy": 0.99}
    assert options == {"min_clients": 2, "round_timeout": 30.0} and resume
    with pytest.raises(ValueError, match="local_step"):
        parse_run_config({"local-step": 3})


# --- an in-process grid: every node is a (ClientApp, Context) called directly -----------------------------


class LocalGrid:
    """Stands in for Flower's Grid (``get_node_ids`` / ``send_and_receive``) without processes or network.

    ``events`` maps a number of completed rounds to actions run once when the strategy reaches it:
    ``("join", node_id, partition)`` or ``("restart", node_id)`` (the node loses its state and process).
    """

    def __init__(self, app, partitions, clients: int, run_id: int = 1, events=None, silent=()):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
        self.app, self.run_id, self.clients = app, run_id, clients
        self.contexts: dict[int, Context] = {}
        for index, partition in enumerate(partitions):
            self.join(100 + index, partition)
        self.events = dict(events or {})
        self.silent = set(silent)  # nodes whose train replies never arrive (a timeout)
        self.strategy: LoraStrategy | None = None

    def join(self, node_id: int, partition: int) -> None:
        self.contexts[node_id] = Context(run_id=self.run_id, node_id=node_id, state=RecordDict(), run_config={},
                                         node_config={"partition-id": partition, "num-partitions": self.clients})

    def get_node_ids(self):
        for action in self.events.pop(self.strategy.round if self.strategy else 0, []):
            if action[0] == "join":
                self.join(action[1], action[2])
            else:
                self.contexts[action[1]].state = RecordDict()
                flower_client.reset_worker()
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            if message.metadata.dst_node_id in self.silent and message.metadata.message_type == "train":
                continue
            try:
                replies.append(self.app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as error:  # what Flower's engines turn a raising ClientApp into
                replies.append(Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message))
        return replies


def node_backbone(context: Context, config: RunConfig, extra=None) -> dict[str, torch.Tensor]:
    """The backbone a node rebuilds from the base model and the deltas in its state (then ``extra``)."""
    model, _ = build.peft_model(config)
    log = wire.record_to_deltas(context.state.array_records[flower_client.STATE_LOG])
    for round in sorted(log):
        apply_backbone(model, log[round])
    apply_backbone(model, extra or {})
    return get_backbone(model)


def run_local(config: RunConfig, grid: LocalGrid, resume: bool = False, **options) -> LoraStrategy:
    strategy = LoraStrategy(config, node_timeout=0.1, **options)
    grid.strategy = strategy
    strategy.start(grid, resume=resume)
    return strategy


@pytest.fixture(scope="module")
def reference(tmp_path_factory, flower_config):
    """``fedmomentum run`` of ``small_config`` per method (computed once, on first use): its output folder."""
    root, done = tmp_path_factory.mktemp("reference"), {}

    def get(method: str) -> Path:
        if method not in done:
            config = flower_config(root, method, method=method)
            simulation.run(config, quiet=True)
            done[method] = Path(config.out)
        return done[method]

    return get


@pytest.mark.parametrize("method", ["fedmomentum", "rolora"])
def test_in_process_flower_rounds_are_bit_identical_to_fedmomentum_run(method, tmp_path, reference, flower_config):
    config = flower_config(tmp_path, "flower", method=method)
    if method == "fedmomentum":  # a node whose own LoRA init differs notices (digest) and gets the whole adapter
        worker = flower_client.shared_worker(1, wire.fingerprint(config), config)
        worker.initial = {k: LoraPair(v.A + 1e-3, v.B) for k, v in worker.initial.items()}
    run_local(config, LocalGrid(make_client_app(), [0, 1], 2, run_id=1))
    a = checkpoint.load(reference(method) / driver.CHECKPOINT)
    b = checkpoint.load(tmp_path / "flower" / driver.CHECKPOINT)
    assert_same_state(a, b, atol=0.0)
    sim_rows, flower_rows = rows(reference(method)), rows(tmp_path / "flower")
    assert [r["eval_loss"] for r in sim_rows] == pytest.approx([r["eval_loss"] for r in flower_rows], abs=1e-6)
    assert all(r["uplink_bytes"] >= r["method_uplink_bytes"] > 0 for r in flower_rows[1:])  # + npy headers
    adapter = wire.split_factors(wire.lora_to_record(a.lora))
    factor_bytes = {f: wire.array_bytes(RecordDict({"x": record})) for f, record in adapter.items()}
    if method == "fedmomentum":
        assert flower_rows[1]["resyncs"] == 2 and flower_rows[2]["resyncs"] == 0
        assert flower_rows[2]["downlink_bytes"] > sum(factor_bytes.values())  # the adapter and round 1's delta
    else:  # round 1: every node builds the seeded init itself; round 2: only B, trained in round 1, goes out
        assert flower_rows[1]["downlink_bytes"] == 0 and flower_rows[2]["downlink_bytes"] == factor_bytes["B"]
    assert (tmp_path / "flower" / "summary.json").is_file() and (tmp_path / "flower" / "curves.png").is_file()


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
    server = checkpoint.load(Path(config.out) / driver.CHECKPOINT).backbone
    assert any(not torch.equal(server[k], v) for k, v in get_backbone(build.peft_model(config)[0]).items())
    for node_id in (100, 101, 102):  # each trained round 3 on version 2; round 3's delta reaches them next time
        assert flower_client.node_version(grid.contexts[node_id], strategy.fingerprint) == 2
        rebuilt = node_backbone(grid.contexts[node_id], config, extra=strategy.backbone_log.deltas[2])
        assert all(torch.equal(rebuilt[k], server[k]) for k in server), node_id


def test_faulty_replies_are_left_out_and_recorded(tmp_path, caplog, flower_config):
    config = flower_config(tmp_path, "faults", clients=5, clients_per_round=5, rounds=1)
    grid = LocalGrid(faulty_client_app({1: "raise", 2: "nan", 3: "keys"}), [0, 1, 2, 3, 4], 5, run_id=3,
                     silent={104})
    seen = []
    strategy = LoraStrategy(config, node_timeout=0.1)
    grid.strategy = strategy
    strategy.setup = build.prepare(config)
    aggregate = strategy.setup.method.aggregate

    def spy(lora, updates, **options):
        seen.extend(updates)
        return aggregate(lora, updates, **options)

    strategy.setup.method.aggregate = spy
    with caplog.at_level(logging.WARNING):
        strategy.start(grid)
    record = rows(config.out)[1]
    assert record["client_ids"] == ["client-0"] and record["clients"] == 1
    assert [u.client_id for u in seen] == ["client-0"]
    assert "injected failure" in record["failed"]["client-1"]
    assert "NaN or Inf" in record["rejected"]["client-2"]
    assert "layers do not match" in record["rejected"]["client-3"]
    assert "no reply within" in record["failed"]["client-4"]
    assert "rejected the update of client-2" in caplog.text and "client-1 failed" in caplog.text

    strict = flower_config(tmp_path, "strict", clients=2, clients_per_round=2, rounds=1)
    with pytest.raises(RoundFailed, match="fewer than min_clients=2"):
        run_local(strict, LocalGrid(faulty_client_app({1: "nan"}), [0, 1], 2, run_id=4), min_clients=2)


def test_resuming_the_server_continues_the_run(tmp_path, reference, flower_config):
    part = flower_config(tmp_path, "part", rounds=1)
    run_local(part, LocalGrid(make_client_app(), [0, 1], 2, run_id=6))
    # a new Flower run (fresh nodes at version 0) continues from the checkpoint and the saved delta log
    resumed = run_local(part.replace(rounds=2), LocalGrid(make_client_app(), [0, 1], 2, run_id=7), resume=True)
    assert_same_state(checkpoint.load(reference("fedmomentum") / driver.CHECKPOINT),
                      checkpoint.load(Path(part.out) / driver.CHECKPOINT), atol=0.0)
    assert [r["round"] for r in rows(part.out)] == [0, 1, 2]
    assert resumed.backbone_log.deltas[0] and rows(part.out)[2]["downlink_bytes"] > rows(part.out)[1]["downlink_bytes"]


# --- Flower's simulation engine (Ray) ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fedmomentum", "fedex-lora"])
def test_ray_simulation_matches_fedmomentum_run(method, tmp_path, reference, flower_config):
    ray_simulation(flower_config(tmp_path, "flower", method=method), num_supernodes=2)
    assert (tmp_path / "flower" / "summary.json").is_file(), "the Flower run did not finish"
    assert_same_state(checkpoint.load(reference(method) / driver.CHECKPOINT),
                      checkpoint.load(tmp_path / "flower" / driver.CHECKPOINT))
    sim_rows, flower_rows = rows(reference(method)), rows(tmp_path / "flower")
    assert [r["eval_loss"] for r in flower_rows] == pytest.approx([r["eval_loss"] for r in sim_rows], abs=1e-4)
    # no resync: the simulation engine keeps each node's context (its backbone version and deltas) between rounds
    assert all(r["client_ids"] == ["client-0", "client-1"] and not r["failed"] and r["resyncs"] == 0
               for r in flower_rows[1:])
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["engine"] == "flower" and summary["uplink_bytes"] == sum(r["uplink_bytes_total"]
                                                                            for r in flower_rows[1:])


@pytest.mark.slow
def test_ray_simulation_survives_a_raising_and_a_nan_client(tmp_path, flower_config):
    config = flower_config(tmp_path, "faults", clients=3, clients_per_round=3, rounds=1)
    ray_simulation(config, num_supernodes=3, faults={1: "raise", 2: "nan"})
    record = rows(config.out)[1]
    assert record["client_ids"] == ["client-0"]
    assert "injected failure" in record["failed"]["client-1"]
    assert "NaN or Inf" in record["rejected"]["client-2"]


# --- a real deployment on loopback ------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (by parent id, so detached children are found too)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def stop(processes: list[subprocess.Popen]) -> None:
    """Terminate what the test started (and everything those processes started), then kill what is left."""
    targets = []
    for process in processes:
        targets += [process.pid, *descendants(process.pid)]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


@pytest.mark.slow
@pytest.mark.skipif(not all((BIN / name).exists() for name in ("flower-superlink", "flower-supernode", "flwr")),
                    reason="the Flower binaries (flower-superlink, flower-supernode, flwr) are not installed")
def test_deployment_on_loopback(tmp_path, reference):
    """A real SuperLink, two SuperNodes and `flwr run`, insecure on 127.0.0.1: two rounds of ``small_config``.

    Flower's deployment engine starts a ClientApp process per message, so round 2 only works without a resync
    if the node's backbone state survived in its context; the result must match ``fedmomentum run``.
    """
    link, node_a, node_b = free_ports(3)
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = tmp_path / "run"
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        handle = (logs / f"{name}.log").open("w")
        process = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=handle,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        processes.append(process)
        return process

    try:
        start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
              "--database", str(tmp_path / "state.db"))
        for index, port in enumerate((node_a, node_b)):
            start(f"supernode-{index}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--host", "127.0.0.1", "--port", str(port),
                  "--node-config", f"partition-id={index} num-partitions=2")
        overrides = ("model='tiny' method='fedmomentum' rounds=2 clients=2 clients-per-round=2 "
                     "families='basic_arithmetic,chain_sum' train-per-family=16 eval-per-family=4 max-length=64 "
                     "local-steps=2 batch-size=2 lr=0.005 lora-r=4 lora-alpha=8.0 accuracy-per-family=0 "
                     f"out='{out}'")
        deadline = time.monotonic() + 240
        run = None
        while time.monotonic() < deadline:  # the SuperLink needs a moment before it accepts runs
            if any(process.poll() is not None for process in processes):
                break  # a Flower process died (say, a port was taken meanwhile): report its log below
            run = subprocess.run([str(BIN / "flwr"), "run", str(ROOT / "examples" / "flower"), "loopback",
                                  "--run-config", overrides, "--stream"], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=max(deadline - time.monotonic(), 1))
            if run.returncode == 0 or "Successfully started run" in run.stdout:
                break
            time.sleep(1)
        while (time.monotonic() < deadline and not (out / "summary.json").is_file()
               and all(process.poll() is None for process in processes)):
            time.sleep(1)
        if not (out / "summary.json").is_file():
            dump = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logs.iterdir()))
            pytest.fail(f"the deployed run did not finish\nflwr run: {run and (run.stdout + run.stderr)[-3000:]}"
                        f"\n{dump}")
    finally:
        stop(processes)
    records = rows(out)
    assert all(r["client_ids"] == ["client-0", "client-1"] and not r["failed"] for r in records[1:])
    assert records[1]["uplink_bytes"] > 0 and records[2]["resyncs"] == 0
    assert records[2]["downlink_bytes"] > records[1]["downlink_bytes"]  # round 1's backbone delta went out
    assert_same_state(checkpoint.load(reference("fedmomentum") / driver.CHECKPOINT),
                      checkpoint.load(out / driver.CHECKPOINT))
    assert all(process.poll() is not None for process in processes)
    shutil.rmtree(home, ignore_errors=True)
