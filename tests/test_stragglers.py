"""Stragglers (``straggler_rate``, ``straggler_delay``): who is late or busy when, re-basing a late update onto the
current adapter (against dense float64 references), whole runs with late updates, resume, rounds without any
update, and what is refused."""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

import fedmomentum as fm
from fedmomentum import checkpoint, driver, report, simulation, stragglers
from fedmomentum.config import RunConfig
from fedmomentum.peft_io import get_lora
from fedmomentum.records import read_metrics
from fedmomentum.schedule import participation, sample_clients, straggler_draws
from fedmomentum.state import Pending
from test_cli import invoke, one_line_error

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps
ALMOST_ALWAYS = 1 - 1e-9  # a straggler_rate every draw of these tests is below (checked where it matters)


def schedule_config(**changes) -> RunConfig:
    return RunConfig(**{"model": "tiny", "clients": 6, "clients_per_round": 4, "rounds": 8, "seed": 3,
                        "straggler_rate": 0.4, "straggler_delay": 2, **changes})


# --- the schedule --------------------------------------------------------------------------------------------


def expected_schedule(config: RunConfig) -> list[dict[str, list[int]]]:
    """Each round's fresh / late / dropped / busy clients, walked by the rule as the docs state it, from the same
    seeded draws: a straggler of round u (a sampled client that is not busy, whose draw is below the rate) is busy
    in rounds u+1 … u+k−1, and its update arrives in u+k (dropped when that is after the last round)."""
    k, stragglers_of = config.straggler_delay, {}
    rounds = []
    for t in range(1, config.rounds + 1):
        busy = sorted(c for c in sample_clients(config, t)
                      if any(c in stragglers_of.get(u, []) for u in range(t - k + 1, t)))
        draws = straggler_draws(config, t)
        stragglers_of[t] = [c for c in sample_clients(config, t)
                            if c not in busy and float(draws[c]) < config.straggler_rate]
        in_time = t + k <= config.rounds
        rounds.append({"fresh": [c for c in sample_clients(config, t) if c not in busy + stragglers_of[t]],
                       "late": stragglers_of[t] if in_time else [], "dropped": [] if in_time else stragglers_of[t],
                       "busy": busy})
    return rounds


def test_the_schedule_follows_the_rule_from_the_seeded_draws():
    config = schedule_config()
    expected = expected_schedule(config)
    got = [vars(participation(config, t)) for t in range(1, config.rounds + 1)]
    assert got == expected
    assert any(r["busy"] for r in got) and any(r["late"] for r in got) and any(r["dropped"] for r in got)
    # a pure function of the config and t: the same in reverse order, from a fresh config
    assert [vars(participation(schedule_config(), t)) for t in reversed(range(1, 9))] == expected[::-1]
    # the draws depend on (seed, t) only, and differ across seeds and rounds
    assert torch.equal(straggler_draws(config, 4), straggler_draws(config.replace(rounds=20, lr=1.0), 4))
    assert not torch.equal(straggler_draws(config, 4), straggler_draws(config.replace(seed=4), 4))
    assert not torch.equal(straggler_draws(config, 4), straggler_draws(config, 5))


def test_a_client_is_busy_until_its_late_update_arrives():
    """Every client of every round straggles (rate ≈ 1, delay 2): late in odd rounds, busy in even ones, the last
    stragglers dropped (their update would come after round 5)."""
    config = schedule_config(clients=2, clients_per_round=2, rounds=5, straggler_rate=ALMOST_ALWAYS)
    assert all(float(straggler_draws(config, t).max()) < ALMOST_ALWAYS for t in (1, 3, 5))
    everyone, nobody = [0, 1], []
    assert [vars(participation(config, t)) for t in range(1, 6)] == [
        {"fresh": nobody, "late": everyone, "dropped": nobody, "busy": nobody},
        {"fresh": nobody, "late": nobody, "dropped": nobody, "busy": everyone},
        {"fresh": nobody, "late": everyone, "dropped": nobody, "busy": nobody},
        {"fresh": nobody, "late": nobody, "dropped": nobody, "busy": everyone},
        {"fresh": nobody, "late": nobody, "dropped": everyone, "busy": nobody},
    ]
    # delay 1: never busy; the update of round t arrives in t + 1
    assert all(not participation(config.replace(straggler_delay=1), t).busy for t in range(1, 6))


def test_without_stragglers_every_sampled_client_is_fresh():
    config = schedule_config(straggler_rate=0.0, straggler_delay=3)
    for t in range(1, 9):
        assert vars(participation(config, t)) == {"fresh": sample_clients(config, t), "late": [], "dropped": [],
                                                  "busy": []}


# --- re-basing against dense float64 references ---------------------------------------------------------------


def random_pair(rank: int, d: int, k: int, seed: int, dtype=torch.float32) -> fm.LoraPair:
    generator = torch.Generator().manual_seed(seed)
    return fm.LoraPair(torch.randn(rank, k, generator=generator, dtype=dtype),
                       torch.randn(d, rank, generator=generator, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("client_rank, ratio", [(4, 1.0), (2, 3.0), (6, 0.75)])
def test_the_product_rule_applies_the_clients_change_of_the_product(dtype, client_rank, ratio):
    d, k, r = 9, 7, 4
    now, then = random_pair(r, d, k, 1, dtype), random_pair(client_rank, d, k, 2, dtype)
    trained = random_pair(client_rank, d, k, 3, dtype)
    new = stragglers.rebase(trained, then, now, stragglers.PRODUCT, ratio)
    assert new.A.dtype == dtype and new.rank == r + 2 * client_rank

    def dense(pair):
        return pair.B.double() @ pair.A.double()

    reference = dense(now) + ratio * (dense(trained) - dense(then))
    got = dense(new)
    # the stacking is exact; only ratio·B rounds once in the factors' dtype, then the float64 product sums terms
    magnitude = new.B.double().abs() @ new.A.double().abs()
    eps = torch.finfo(dtype).eps if ratio != 1.0 else 0.0
    bound = (eps + (new.rank + 2) * EPS64) * magnitude
    assert bool(((got - reference).abs() <= bound).all())
    assert not torch.allclose(got, dense(now) + dense(trained))  # the start is taken out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_factor_rule_applies_the_change_of_each_factor(dtype):
    d, k, r = 9, 7, 4
    now, then, trained = (random_pair(r, d, k, seed, dtype) for seed in (4, 5, 6))
    new = stragglers.rebase(trained, then, now, stragglers.FACTORS)
    eps = torch.finfo(dtype).eps
    for factor in ("A", "B"):
        x_now, x_then, x_i = (getattr(p, factor).double() for p in (now, then, trained))
        reference = x_now + (x_i - x_then)
        bound = 2 * eps * (x_now.abs() + x_i.abs() + x_then.abs())  # two roundings in the factors' dtype
        assert bool(((getattr(new, factor).double() - reference).abs() <= bound).all())
    with pytest.raises(ValueError, match="global rank and scaling"):
        stragglers.rebase(random_pair(2, d, k, 7), random_pair(2, d, k, 8), now, stragglers.FACTORS)
    with pytest.raises(ValueError, match="global rank and scaling"):
        stragglers.rebase(trained, then, now, stragglers.FACTORS, 2.0)


def test_each_method_takes_a_late_update_by_its_rule():
    rules = {name: stragglers.rule(fm.methods.create(name), 8) for name in fm.methods.names()}
    assert rules == {"fedit": "factors", "ffa-lora": "factors", "rolora": "factors", "flora": "product",
                     "fedex-lora": "factors", "flexlora": "product", "fedmomentum": "product", "frlora": "factors",
                     "fedsa-lora": "factors"}


def test_a_rebased_update_enters_fedmomentum_exactly():
    """FedMomentum on a fresh and a re-based late update: W + s B'A' + delta is the p-weighted sum of the two
    client models, the late one as its change applied to the current global."""
    d, k, r, s = 10, 8, 3, 2.0
    now, then, trained, fresh = (random_pair(r, d, k, seed, torch.float64) for seed in (11, 12, 13, 14))
    late = stragglers.rebase_update(fm.ClientUpdate({"w": trained}, 30, "c1@1"), {"w": then}, {"w": now},
                                    stragglers.PRODUCT, s)
    updates = [fm.ClientUpdate({"w": fresh}, 10, "c0"), late]
    result = fm.methods.create("fedmomentum", dtype="float64").aggregate({"w": now}, updates, scaling=s, t=2)
    got = s * result.lora["w"].delta() + result.backbone["w"].dense()
    reference = s * (0.25 * fresh.delta() + 0.75 * (now.delta() + trained.delta() - then.delta()))
    magnitude = s * (0.25 * fresh.B.abs() @ fresh.A.abs()
                     + 0.75 * (now.B.abs() @ now.A.abs() + trained.B.abs() @ trained.A.abs()
                               + then.B.abs() @ then.A.abs()))
    assert bool(((got - reference).abs() <= 1e3 * EPS64 * magnitude.max()).all())


class OnlyLate(simulation.InProcess):
    """An engine whose round trains nobody: the round aggregates only what arrives late."""

    def __init__(self, engine: simulation.InProcess):
        super().__init__(engine.setup, engine.client_data)

    def train_round(self, t, *args, **kwargs):
        return driver.ClientRound([], [])


@pytest.mark.parametrize("stream", ["never", "always"])
@pytest.mark.parametrize("method", ["fedit", "fedmomentum"])
def test_the_driver_rebases_a_late_update_onto_the_current_adapter(method, stream, tmp_path, tiny_model,
                                                                   small_config):
    """A late update alone in its round, collected or streamed: the new global model is the current one plus the
    update's own change (fedit: of each factor; fedmomentum: of the product, exactly, backbone included)."""
    config = small_config(tmp_path / "run", method=method, straggler_rate=0.5, accuracy_per_family=0,
                          stream=stream, clip="none")
    setup, engine = simulation.engine(config, copy.deepcopy(tiny_model[0]), tiny_model[1])
    state = driver.start(setup, engine)
    now = {name: fm.LoraPair(pair.A, pair.B + 0.01) for name, pair in state.lora.items()}  # the global moved on
    then = {name: random_pair(pair.rank, *pair.shape, seed) for seed, (name, pair) in enumerate(state.lora.items())}
    trained = {name: fm.LoraPair(p.A + 0.02, p.B + 0.03 * torch.ones_like(p.B)) for name, p in then.items()}
    pending = Pending(fm.ClientUpdate(trained, 5, "client-1@1"), then, trained_in=1, arrives=3)
    before = {name: weight.clone() for name, weight in state.backbone.items()}
    state = replace(state, rounds_done=2, lora=now, pending=(pending,))
    after, result, record = driver.run_round(setup, OnlyLate(engine), state, 3)
    assert after.pending == () and record["stale_updates"] == 1 and record["client_ids"] == ["client-1@1"]
    assert record.get("streamed", False) == (stream == "always")
    s = setup.scaling
    for name, pair in now.items():
        if method == "fedit":  # one update: the average is its re-based factors (a streamed sum divides by n_i)
            for factor in ("A", "B"):
                want = getattr(pair, factor) + (getattr(trained[name], factor) - getattr(then[name], factor))
                got = getattr(after.lora[name], factor)
                assert torch.allclose(got, want, rtol=0, atol=4 * EPS32 * float(want.abs().max()))
            continue
        model = (after.backbone[name].double() - before[name].double()
                 + s * after.lora[name].B.double() @ after.lora[name].A.double())
        reference = s * (pair.delta().double() + trained[name].delta().double() - then[name].delta().double())
        # float32 aggregation: the SVD and the backbone's in-place update each round at float32's eps, relative to
        # the weights and the change they hold (a few hundred ulps at most at these sizes)
        scale = float(reference.abs().max()) + float(before[name].abs().max())
        assert torch.allclose(model, reference, rtol=0, atol=1e3 * EPS32 * scale)


# --- whole runs on the tiny model ----------------------------------------------------------------------------


def run(config, tiny_model, engine_class=None):
    setup, engine = simulation.engine(config, copy.deepcopy(tiny_model[0]), tiny_model[1])
    return driver.run(setup, engine if engine_class is None else engine_class(engine), quiet=True), setup


def final_adapter(out):
    state, _ = checkpoint.load(out / driver.CHECKPOINT)
    return state


def assert_same_state(a, b):
    assert a.lora.keys() == b.lora.keys()
    for name in a.lora:
        assert torch.equal(a.lora[name].A, b.lora[name].A) and torch.equal(a.lora[name].B, b.lora[name].B)
        assert torch.equal(a.backbone[name], b.backbone[name])


def test_no_stragglers_is_the_run_without_the_keys(tmp_path, tiny_model, small_config):
    plain = small_config(tmp_path / "plain", accuracy_per_family=0)
    zero = small_config(tmp_path / "zero", accuracy_per_family=0, straggler_rate=0.0, straggler_delay=3)
    run(plain, tiny_model)
    run(zero, tiny_model)
    assert_same_state(final_adapter(tmp_path / "plain"), final_adapter(tmp_path / "zero"))
    assert final_adapter(tmp_path / "zero").pending == ()
    rows = read_metrics(tmp_path / "zero")[1:]
    assert all(row["stale_updates"] == row["busy_clients"] == 0 and row["fresh_updates"] == 2 for row in rows)


@pytest.mark.parametrize("method", ["fedmomentum", "fedit"])
def test_a_run_with_stragglers_records_fresh_late_and_busy_updates(method, tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "run", method=method, rounds=4, straggler_rate=0.5, straggler_delay=2,
                          accuracy_per_family=0)
    summary, setup = run(config, tiny_model)
    sent = 4 * sum(pair.A.numel() + pair.B.numel() for pair in get_lora(setup.model).values())  # r, float32
    rows = read_metrics(tmp_path / "run")
    assert [row["round"] for row in rows] == [0, 1, 2, 3, 4] and summary["rounds"] == 4
    assert all(torch.isfinite(torch.tensor(row["eval_loss"])) for row in rows)
    for row in rows[1:]:
        plan, earlier = participation(config, row["round"]), row["round"] - 2
        assert row["fresh_updates"] == len(plan.fresh) and row["busy_clients"] == len(plan.busy)
        assert row["stale_updates"] == (len(participation(config, earlier).late) if earlier >= 1 else 0)
        assert row["stragglers"] == len(plan.late) + len(plan.dropped)
        assert row["clients"] == row["fresh_updates"] + row["stale_updates"]
        late_ids = [i for i in row["client_ids"] if "@" in i]  # client-1@2: client-1's update of round 2
        assert len(late_ids) == row["stale_updates"] and all(i.endswith(f"@{earlier}") for i in late_ids)
        assert row["uplink_bytes"] == (sent if row["clients"] else 0)  # a late update sent rank r, not the re-based
    assert sum(row["stale_updates"] for row in rows[1:]) > 0 and sum(row["busy_clients"] for row in rows[1:]) > 0
    state = final_adapter(tmp_path / "run")
    assert all(bool(torch.isfinite(p.A).all() and torch.isfinite(p.B).all()) for p in state.lora.values())


class Crash(RuntimeError):
    pass


class CrashInRound3(simulation.InProcess):
    def __init__(self, engine: simulation.InProcess):
        super().__init__(engine.setup, engine.client_data)

    def train_round(self, t, *args, **kwargs):
        if t == 3:
            raise Crash("power cut")
        return super().train_round(t, *args, **kwargs)


def test_a_run_stopped_after_round_2_and_resumed_is_the_uninterrupted_run(tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "full", rounds=4, straggler_rate=0.5, straggler_delay=2, accuracy_per_family=0)
    run(config, tiny_model)
    crashing = config.replace(out=str(tmp_path / "crashed"))
    with pytest.raises(Crash):
        run(crashing, tiny_model, CrashInRound3)
    saved = final_adapter(tmp_path / "crashed")
    assert saved.rounds_done == 2 and saved.pending  # round 2's stragglers wait in the checkpoint
    assert {(p.trained_in, p.arrives) for p in saved.pending} == {(2, 4)}
    assert all(p.update.client_id.endswith("@2") and p.update.num_examples > 0 for p in saved.pending)
    simulation.run(crashing, model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1], resume=True, quiet=True)
    assert_same_state(final_adapter(tmp_path / "crashed"), final_adapter(tmp_path / "full"))
    keys = ("eval_loss", "fresh_updates", "stale_updates", "busy_clients", "client_ids")
    assert [{k: row.get(k) for k in keys} for row in read_metrics(tmp_path / "crashed")] == [
        {k: row.get(k) for k in keys} for row in read_metrics(tmp_path / "full")]
    assert read_metrics(tmp_path / "full")[4]["stale_updates"] > 0  # the resumed run did aggregate them


def test_a_round_without_any_update_keeps_the_global_adapter(tmp_path, tiny_model, small_config):
    """Both clients straggle in round 1 (nothing arrives), are busy in round 2 (nothing again), and in round 3 only
    their late updates of round 1 are aggregated (round 3's own stragglers are dropped: no round 5)."""
    config = small_config(tmp_path / "run", rounds=3, clients=2, clients_per_round=2, accuracy_per_family=0,
                          straggler_rate=ALMOST_ALWAYS, straggler_delay=2)
    assert all(float(straggler_draws(config, t).max()) < ALMOST_ALWAYS for t in (1, 3))
    setup, engine = simulation.engine(config, copy.deepcopy(tiny_model[0]), tiny_model[1])
    initial = {name: pair.B.clone() for name, pair in get_lora(setup.model).items()}
    driver.run(setup, engine, quiet=True)
    rows = read_metrics(tmp_path / "run")
    counts = ("clients", "fresh_updates", "stale_updates", "stragglers", "busy_clients")
    assert [[row[key] for key in counts] for row in rows[1:]] == [[0, 0, 0, 2, 0], [0, 0, 0, 0, 2], [2, 0, 2, 2, 0]]
    for row in rows[1:3]:  # the model stayed the one before training
        assert row["eval_loss"] == rows[0]["eval_loss"] and row["uplink_bytes"] == row["downlink_bytes"] == 0
        assert "no update arrived: the global adapter stays" in report.round_line(row)
    assert rows[1]["train_loss"] is not None and rows[2]["train_loss"] is None  # round 2: nobody trained
    assert rows[3]["eval_loss"] != rows[0]["eval_loss"]
    state = final_adapter(tmp_path / "run")
    assert state.pending == () and state.rounds_done == 3
    assert any(not torch.equal(state.lora[name].B, B) for name, B in initial.items())  # round 3 moved it


# --- what is refused -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, fragment", [
    ({"method": "fedsa-lora"}, "fedsa-lora's clients keep their own B between rounds"),
    ({"scaffold": True}, "scaffold's clients keep control variates"),
    ({"method": "rolora", "straggler_delay": 1}, "rolora trains other factors 1 round(s) later"),
    ({"method": "fedex-lora", "client_ranks": [2, 4]}, "re-bases a late update factor by factor"),
])
def test_methods_that_cannot_take_a_late_update_are_refused_in_one_line(changes, fragment):
    config = RunConfig(**{"model": "tiny", "clients": 2, "lora_r": 4, "straggler_rate": 0.5, **changes})
    with pytest.raises(ValueError, match="^bad config: straggler_rate > 0, but ") as error:
        config.validate()
    assert fragment in str(error.value) and "\n" not in str(error.value)
    config.replace(straggler_rate=0.0).validate()  # without stragglers each is fine
    if changes.get("method") == "rolora":
        config.replace(straggler_delay=2).validate()  # the same factor two rounds later


def test_the_command_line_refuses_them_without_a_traceback(tmp_path):
    one_line_error(invoke("run", "--model", "tiny", "--method", "fedsa-lora", "--set", "straggler_rate=0.5",
                          "--out", tmp_path / "a"), "straggler_rate > 0", "fedsa-lora")
    one_line_error(invoke("run", "--model", "tiny", "--set", "scaffold=true", "--set", "straggler_rate=0.5",
                          "--out", tmp_path / "b"), "straggler_rate > 0", "scaffold")
    one_line_error(invoke("run", "--model", "tiny", "--set", "straggler_rate=1", "--out", tmp_path / "c"),
                   "straggler_rate")
    one_line_error(invoke("run", "--model", "tiny", "--set", "straggler_delay=0", "--out", tmp_path / "d"),
                   "straggler_delay")
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_the_flower_engine_refuses_stragglers_in_one_line():
    from fedmomentum.flower.strategy import LoraStrategy

    config = RunConfig(model="tiny", clients=2, method="fedit", straggler_rate=0.5)
    config.validate()
    setup = SimpleNamespace(config=config, method=fm.methods.create("fedit"))
    flower = SimpleNamespace(name=LoraStrategy.name, features=LoraStrategy.features)
    with pytest.raises(ValueError, match="^the flower engine cannot run this yet: straggler_rate > 0") as error:
        driver.check_engine(setup, flower)
    assert "\n" not in str(error.value)
    driver.check_engine(SimpleNamespace(config=config.replace(straggler_rate=0.0), method=setup.method), flower)


def test_a_checkpoint_written_before_these_keys_existed_still_resumes(tmp_path, tiny_model, small_config):
    config = small_config(tmp_path / "run", rounds=1, accuracy_per_family=0)
    run(config, tiny_model)
    path = tmp_path / "run" / driver.CHECKPOINT
    state, info = checkpoint.load(path)
    old = {k: v for k, v in info["config"].items() if k not in ("straggler_rate", "straggler_delay")}
    checkpoint.save(path, state, {**info, "config": old})
    simulation.run(config.replace(rounds=2), model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1],
                   resume=True, quiet=True)
    assert final_adapter(tmp_path / "run").rounds_done == 2
    checkpoint.save(path, state, {**info, "config": {**old, "straggler_rate": 0.5}})  # a real difference still counts
    with pytest.raises(ValueError, match="different config: straggler_rate"):
        simulation.run(config.replace(rounds=2), model=copy.deepcopy(tiny_model[0]), tokenizer=tiny_model[1],
                       resume=True, quiet=True)
