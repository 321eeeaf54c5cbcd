"""Attacks on the Flower engine, each from real ClientApps through Flower's wire format (``LocalGrid``): bounded
influence (3 honest nodes + 1 attacker per attack), partitions bound to identity, slow hellos, the size cap, node text
in logs and records, strict JSON records, failure summaries and ``fedmomentum status``.

The stated distance (docs/flower.md, threat model): with the attacker's weight ``p`` and the round's median update
norm ``m_t``, the final model ``W + s B A`` of the adapted layers is within ``Σ_t p (k + 1) m_t`` of the clean run's
(all four nodes honest) in the Frobenius norm: each round the attacker's accepted update is at most ``k m_t`` from its
start, where its honest update would have been about ``m_t``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Context, RecordDict
from typer.testing import CliRunner

from fedmomentum import checkpoint, driver, simulation
from fedmomentum.cli import app as cli
from fedmomentum.flower import RoundFailed, make_client_app, make_server_app
from fedmomentum.flower.identity import read_node_keys, same_key
from fedmomentum.flower.replays import Replays
from fedmomentum.flower.replies import shown
from fedmomentum.records import Records, read_metrics
from flower_helpers import FLOWER, LocalGrid, faulty_client_app, run_local

SCALING = 2.0  # small_config: lora_alpha 8 / lora_r 4
HONEST = ["client-0", "client-1", "client-2"]


@pytest.fixture(scope="module")
def four_nodes(small_config, tmp_path_factory):
    """``(config for out, clean run's folder)``: four nodes, four clients a round, iid (equal example counts, so
    the attacker's weight is 1/4), two rounds; the clean run is ``fedmomentum run`` (the same numbers as Flower)."""
    root = tmp_path_factory.mktemp("clean")

    def config(out, **changes):
        return small_config(out, **{**FLOWER, "clients": 4, "clients_per_round": 4, "partition": "iid",
                                    "train_per_family": 16, "accuracy_per_family": 0, **changes})

    clean = config(root / "clean")
    simulation.run(clean, quiet=True)
    return config, Path(clean.out)


def effective(folder: Path) -> dict[str, torch.Tensor]:
    """``W + s B A`` of every adapted layer in the run's checkpoint (float64)."""
    state = checkpoint.load(folder / driver.CHECKPOINT)[0]
    return {name: state.backbone[name].double() + SCALING * state.lora[name].B.double() @ state.lora[name].A.double()
            for name in state.lora}


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((a[name] - b[name]).norm()) ** 2 for name in a))


def stated_bound(rows: list[dict], k: float, weight: float = 0.25) -> float:
    """``Σ_t p (k + 1) m_t`` from the attacked run's own records."""
    return sum(weight * (k + 1) * statistics.median(row["update_norms"].values()) for row in rows[1:])


ATTACK_CASES = {  # attack → what the attacker's record shows
    "poison-9999": "clipped",
    "scaled-30": "clipped",
    "examples-1e7": "examples_capped",
    "zeros": None,
    "replay": "a replay",
    "huge-reply": "reply larger than",
    "loss-1e308": None,
}


@pytest.mark.parametrize("attack", ATTACK_CASES)
def test_one_attacker_among_four_never_gets_an_honest_reply_refused_nor_moves_the_model_far(attack, tmp_path,
                                                                                          four_nodes):
    config, clean = four_nodes
    attacked = config(tmp_path / attack)
    run_local(attacked, LocalGrid(faulty_client_app({3: attack}), range(4), 4, run_id=21))
    rows = read_metrics(attacked.out)
    for row in rows[1:]:  # the honest nodes: accepted every round
        assert set(HONEST) <= set(row["client_ids"]), (attack, row["rejected"])
        assert not set(HONEST) & set(row["rejected"]) and not set(HONEST) & set(row["failed"])
        assert not set(HONEST) & set(row["clipped"])
    shows = ATTACK_CASES[attack]
    last = rows[-1]
    if shows == "clipped":
        assert all("client-3" in row["clipped"] for row in rows[1:])
    elif shows == "examples_capped":
        declared = max(u for row in rows[1:] for u in [row["examples_capped"]["client-3"][1]])
        assert all(row["examples_capped"] == {"client-3": [10_000_000, declared]} for row in rows[1:])
        assert declared < 100  # its real count, from its hello
    elif shows is not None:
        assert shows in last["rejected"]["client-3"]
    gap = distance(effective(Path(attacked.out)), effective(clean))
    bound = stated_bound(rows, attacked.clip_k)
    assert gap <= bound, (attack, gap, bound)
    if attack in ("examples-1e7", "loss-1e308"):  # honest factors at their honest weight: the clean run exactly
        assert gap == 0.0
    text = (Path(attacked.out) / "metrics.jsonl").read_text()
    assert all(json.loads(line, parse_constant=pytest.fail) for line in text.splitlines())


def test_uniform_weighting_ignores_what_a_node_claims(tmp_path, four_nodes):
    """``weighting = "uniform"``: every accepted update weighs 1/4 whatever its count; the four partitions hold equal
    counts here, so the run equals the clean one exactly."""
    config, clean = four_nodes
    attacked = config(tmp_path / "uniform", weighting="uniform")
    run_local(attacked, LocalGrid(faulty_client_app({3: "examples-1e7"}), range(4), 4, run_id=30))
    assert distance(effective(Path(attacked.out)), effective(clean)) == 0.0


def test_without_clipping_the_poison_moves_the_model_past_the_stated_distance(tmp_path, four_nodes):
    """The same ±9999 attacker with ``clip="none"``: the honest replies are still accepted (bounds follow the
    client's start), but the model ends far beyond the distance clipping guarantees."""
    config, clean = four_nodes
    attacked = config(tmp_path / "unclipped", clip="none")
    run_local(attacked, LocalGrid(faulty_client_app({3: "poison-9999"}), range(4), 4, run_id=22))
    rows = read_metrics(attacked.out)
    assert all(set(HONEST) <= set(row["client_ids"]) for row in rows[1:])
    gap = distance(effective(Path(attacked.out)), effective(clean))
    assert gap > 1000 * stated_bound(rows, 3.0)


def test_node_keys_bind_partitions_to_public_keys(tmp_path, four_nodes):
    """With a node-keys file, only the named key's node holds a partition: a stranger that claims partition 0
    first is refused, and the holder of the right key trains every round."""
    config, _ = four_nodes
    private = {name: ec.generate_private_key(ec.SECP384R1()) for name in ("0", "1", "stranger")}
    pem = {name: key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
           for name, key in private.items()}
    (tmp_path / "node-0.pub").write_bytes(private["0"].public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    ssh_1 = private["1"].public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                   serialization.PublicFormat.OpenSSH).decode()
    keys = tmp_path / "node-keys.toml"
    keys.write_text(f'0 = "node-0.pub"\n1 = "{ssh_1} node-1"\n')
    run = config(tmp_path / "keys", clients=2, clients_per_round=2)
    grid = LocalGrid(make_client_app(), [0], 2, run_id=23,
                     keys={100: pem["stranger"], 101: pem["0"], 102: pem["1"]},
                     events={0: [("join", 101, 0), ("join", 102, 1)]})
    run_local(run, grid, node_keys=str(keys))
    rows = read_metrics(run.out)
    assert all(row["client_ids"] == ["client-0", "client-1"] for row in rows[1:])
    assert "public key is not the one node-keys gives" in rows[1]["nodes"]["100"]
    assert grid.received[100, "train"] == 0
    with pytest.raises(ValueError, match=r"names no key for partition\(s\) \[1\]"):
        keys.write_text('0 = "node-0.pub"\n')
        run_local(config(tmp_path / "bad-keys", clients=2, clients_per_round=2), LocalGrid(make_client_app(), [0, 1],
                                                                                           2, run_id=24),
                  node_keys=str(keys))


def test_a_squatter_loses_its_partition_to_the_waiting_holder(tmp_path, four_nodes):
    """A node claims partition 0 before its real holder and never answers: after ``handover-after`` rounds without
    an accepted update the waiting node takes the partition over (logged, recorded) and trains from then on."""
    config, _ = four_nodes
    run = config(tmp_path / "squat", clients=2, clients_per_round=2, rounds=3)
    grid = LocalGrid(make_client_app(), [0, 1], 2, run_id=25, silent={100}, events={0: [("join", 200, 0)]})
    run_local(run, grid, round_timeout=1.0, handover_after=1)
    rows = read_metrics(run.out)
    assert rows[1]["client_ids"] == ["client-1"] and rows[1]["failed"]["client-0"] == "no reply within 1s"
    assert "partition 0 goes to node 200" in rows[1]["nodes"]["100"]
    assert [row["client_ids"] for row in rows[2:]] == [["client-0", "client-1"]] * 2
    assert grid.received[200, "train"] == 2


def test_hellos_still_in_flight_at_node_timeout_are_waited_for(tmp_path, four_nodes):
    """On a busy machine every hello answers after node-timeout: round 1 waits for them (up to the round timeout)
    instead of ending the run with no nodes."""
    config, _ = four_nodes
    run = config(tmp_path / "slow", clients=2, clients_per_round=2, rounds=1)
    grid = LocalGrid(make_client_app(), [0, 1], 2, run_id=26, hello_delay=1.0)
    run_local(run, grid, node_timeout=0.05, round_timeout=30.0)
    assert read_metrics(run.out)[1]["client_ids"] == ["client-0", "client-1"]


def test_a_reply_past_its_cap_is_not_downloaded(tmp_path, four_nodes):
    """A 40 MB reply (the factors take about 100 KB): refused having pulled little more than its cap, as
    ``HttpGrid`` pulls (``LocalGrid.runtime``)."""
    config, _ = four_nodes
    run = config(tmp_path / "huge", clients=2, clients_per_round=2, rounds=1)
    grid = LocalGrid(faulty_client_app({1: "huge-reply"}), [0, 1], 2, run_id=27)
    run_local(run, grid)
    reason = read_metrics(run.out)[1]["rejected"]["client-1"]
    cap = int(reason.split("reply larger than ")[1].split()[0])
    assert "not downloaded" in reason and cap < 1_000_000
    chunk = 5 * 2**20  # Flower's chunk size; two pulls run at a time
    assert grid.runtime.pulled <= 2 * cap + 2 * chunk < 40_000_000


def test_node_text_is_escaped_and_cut_in_logs_and_records(tmp_path, four_nodes, caplog):
    """A hello whose error forges a whole round line (a newline, a terminal escape) and one of 50,000 characters:
    the log and the record show one escaped line each, at most a few hundred characters."""
    config, _ = four_nodes
    run = config(tmp_path / "text", clients=3, clients_per_round=3, rounds=1)
    grid = LocalGrid(faulty_client_app({1: "hello-forged-log", 2: "hello-long-error"}), [0, 1, 2], 3, run_id=28)
    with caplog.at_level(logging.INFO):
        run_local(run, grid)
    nodes = read_metrics(run.out)[1]["nodes"]
    assert "\n" not in nodes["101"] and "\x1b" not in nodes["101"] and "\\n[2026-01-01" in nodes["101"]
    assert len(nodes["102"]) < 400 and "(50000 characters)" in nodes["102"]
    assert not [line for line in caplog.text.splitlines() if line.startswith("[2026-01-01")]
    assert all("\n" not in record.getMessage() for record in caplog.records if "node 10" in record.getMessage())


def test_shown_escapes_control_and_format_characters():
    assert shown("a\nb\x1b[2Jc\u202ed\u2028e") == "a\\nb\\x1b[2Jc\\u202ed\\u2028e"
    assert shown("é ü 中") == "é ü 中"
    assert shown("a" * 500 + "b" * 500, 20) == "a" * 10 + " … (1000 characters) … " + "b" * 10
    assert shown("\n" * 1000, 20) == "\\n" * 5 + " … (1000 characters) … " + "\\n" * 5
    assert shown(list(range(5))) == "[0, 1, 2, 3, 4]"


def test_records_write_non_finite_numbers_as_null(tmp_path):
    records = Records(tmp_path)
    records.append({"round": 1, "train_loss": math.inf, "x": {"y": [math.nan, 1.0]}}, {"q": {"noise_norm": -math.inf}})
    records.close()
    strict = dict(parse_constant=pytest.fail)
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), **strict) == {"round": 1, "train_loss": None,
                                                                              "x": {"y": [None, 1.0]}}
    assert json.loads((tmp_path / "aggregation.jsonl").read_text(), **strict)["layers"] == {"q": {"noise_norm": None}}


def status(out: Path) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["status", str(out)])
    return result.exit_code, result.output


@pytest.mark.parametrize("fault", ["min-clients=0", "missing eval-data", "round failed"])
def test_every_failure_leaves_a_failed_summary_and_status_exits_non_zero(fault, tmp_path, four_nodes):
    """A bad option, a missing eval-data file or a round without enough updates: ``summary.json`` says failed and
    why, and ``fedmomentum status`` exits 1; a completed run exits 0."""
    config, clean = four_nodes
    run = config(tmp_path / "failing", clients=2, clients_per_round=2, rounds=1)
    grid = LocalGrid(faulty_client_app({1: "raise"}), [0, 1], 2, run_id=29)
    if fault == "min-clients=0":  # as `flwr run --run-config "min-clients=0 ..."` gives it to the ServerApp
        context = Context(run_id=29, node_id=0, state=RecordDict(), node_config={},
                          run_config={"model": "tiny", "out": run.out, "min-clients": 0})
        with pytest.raises(ValueError, match="min-clients must be ≥ 1"):
            make_server_app()(grid, context)
    elif fault == "missing eval-data":
        with pytest.raises(FileNotFoundError):
            run_local(run, grid, eval_data=str(tmp_path / "nowhere.jsonl"))
    else:
        with pytest.raises(RoundFailed):
            run_local(run, grid, min_clients=2)
    summary = json.loads((tmp_path / "failing" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert {"min-clients=0": "min-clients must be ≥ 1", "missing eval-data": "nowhere.jsonl",
            "round failed": "RoundFailed"}[fault] in summary["reason"]
    code, output = status(tmp_path / "failing")
    assert code == 1 and "failed" in output and summary["reason"][:40] in output
    assert status(clean)[0] == 0 and "completed" in status(clean)[1]


def test_status_of_an_unfinished_run_and_of_a_folder_without_a_run(tmp_path, four_nodes):
    config, clean = four_nodes
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text((clean / "config.json").read_text())
    (unfinished / "metrics.jsonl").write_text("\n".join((clean / "metrics.jsonl").read_text().splitlines()[:2]))
    code, output = status(unfinished)
    assert code == 3 and "not finished: 1 round(s) recorded" in output
    code, output = status(tmp_path)
    assert code == 2 and "holds no run" in output


def test_replay_digests_survive_a_resume_except_the_rounds_after_the_checkpoint(tmp_path):
    replays = Replays()
    replays.add("client-0", "aa", 1)
    replays.add("client-0", "bb", 2)
    replays.add("client-1", "cc", 3)
    replays.save(tmp_path / "replays.json")
    back = Replays.load(tmp_path / "replays.json", rounds=2)  # round 3 is trained again after the resume
    assert back.earlier("client-0", "aa") == 1 and back.earlier("client-0", "bb") == 2
    assert back.earlier("client-1", "cc") is None and back.earlier("client-2", "aa") is None
    assert Replays.load(tmp_path / "missing.json", rounds=5).seen == {}
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a replay log"):
        Replays.load(tmp_path / "bad.json", rounds=1)


def test_node_keys_file_errors_name_what_is_wrong(tmp_path):
    keys = [ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() for _ in range(2)]
    path = tmp_path / "node-keys.toml"
    with pytest.raises(FileNotFoundError, match="not found on the server"):
        read_node_keys(path, 2)
    cases = {f'0 = "{keys[0]}"\n1 = "{keys[0]}"\n': "one key to several partitions",
             f'0 = "{keys[0]}"\n2 = "{keys[1]}"\n': "partitions 0 … 1",
             f'0 = "{keys[0]}"\n1 = "missing.pub"\n': "neither an OpenSSH public key nor a file",
             f'0 = "{keys[0]}"\n1 = "ssh-ed25519 AAAA"\n': "not an OpenSSH public key",
             '0 = "a\n': "node-keys file"}
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_node_keys(path, 2)
    path.write_text(f'0 = "{keys[0]}"\n1 = "{keys[1]} comment"\n')
    read = read_node_keys(path, 2)
    pem = serialization.load_ssh_public_key(keys[1].encode()).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert same_key(pem, read[1]) and not same_key(pem, read[0]) and not same_key(b"", read[0])
