"""``fedmomentum study``: the study file and its errors, the grid, the statistics, and whole studies on the tiny
model (tables, plots, resuming, failures)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedmomentum import checkpoint, driver
from fedmomentum import study as study_io
from fedmomentum.cli import app

runner = CliRunner()

BASE = """
[base]
model = "tiny"
rounds = ROUNDS
clients = 3
clients_per_round = 2
families = ["basic_arithmetic", "chain_sum"]
train_per_family = 8
eval_per_family = 3
max_length = 48
local_steps = 2
batch_size = 2
lr = 5e-3
lora_r = 2
lora_alpha = 4
accuracy_per_family = 2
max_new_tokens = 3
"""


def write(tmp_path, text: str, rounds: int = 1, name: str = "study.toml"):
    path = tmp_path / name
    path.write_text(text.replace("[base]", BASE.replace("ROUNDS", str(rounds)).strip(), 1))
    return path


# --- the study file --------------------------------------------------------------------------------------------------

def test_grid_crosses_keys_options_and_cells(tmp_path):
    path = write(tmp_path, """
baseline = "fedit lora_r=2"
[base]
[grid]
lora_r = [2, 4]
seed = [3, 4, 5]
[[cell]]
name = "fedit"
method = "fedit"
[[cell]]
name = "fm0.9"
method = "fedmomentum"
method_options = {residual_energy = 0.9}
""")
    study = study_io.load(path)
    assert [c.label for c in study.cells] == ["fedit lora_r=2", "fedit lora_r=4", "fm0.9 lora_r=2", "fm0.9 lora_r=4"]
    assert study.seeds == [3, 4, 5] and study.baseline.label == "fedit lora_r=2"
    config = study.config(study.cells[3], 4, tmp_path / "x")
    assert (config.method, config.lora_r, config.seed, config.method_options) == (
        "fedmomentum", 4, 4, {"residual_energy": 0.9})
    assert config.out == str(tmp_path / "x") and config.rounds == 1


@pytest.mark.parametrize("grid, labels, options", [
    ('method_options.residual_energy = [1.0, 0.9]', ["residual_energy=1.0", "residual_energy=0.9"],
     [{"residual_energy": 1.0}, {"residual_energy": 0.9}]),
    ('"method_options.split" = ["balanced", "left"]', ["split=balanced", "split=left"],
     [{"split": "balanced"}, {"split": "left"}]),
    ('method_options = [{}, {merge_every = 2, compress_residual = true}]',
     ["default", "merge_every=2 compress_residual=True"], [{}, {"merge_every": 2, "compress_residual": True}]),
])
def test_method_options_in_the_grid(tmp_path, grid, labels, options):
    study = study_io.load(write(tmp_path, f'[base]\nmethod = "fedmomentum"\n[grid]\n{grid}\n'))
    assert [c.label for c in study.cells] == labels
    assert [study.config(c, 0).method_options for c in study.cells] == options
    assert [c.folder for c in study.cells] == [label.replace(" ", "_") for label in labels]


def test_named_cells_are_compared_with_the_baseline_of_their_regime(tmp_path):
    """``[[cell]]`` tables of one name per regime, ``baseline = {method = "fedit"}``: each cell is compared with the
    FedIT cell that shares its other settings; an option FedIT does not take (``residual_energy``) does not count,
    one it takes (``server_opt``) does."""
    study = study_io.load(write(tmp_path, """
baseline = {method = "fedit"}
[base]
[[cell]]
name = "iid"
method = "fedit"
partition = "iid"
[[cell]]
name = "iid"
method = "fedmomentum"
partition = "iid"
[[cell]]
name = "family"
method = "fedit"
partition = "family"
[[cell]]
name = "family"
method = "fedmomentum"
partition = "family"
[[cell]]
name = "family tau=0.9"
method = "fedmomentum"
partition = "family"
method_options = {residual_energy = 0.9}
[[cell]]
name = "family avgm"
method = "fedit"
partition = "family"
method_options = {server_opt = "avgm"}
[[cell]]
name = "family avgm"
method = "fedmomentum"
partition = "family"
method_options = {server_opt = "avgm"}
"""))
    assert {c.label: study.baseline_of(c).label for c in study.cells} == {
        "iid fedit": "iid fedit", "iid fedmomentum": "iid fedit", "family fedit": "family fedit",
        "family fedmomentum": "family fedit", "family tau=0.9": "family fedit",
        "family avgm fedit": "family avgm fedit", "family avgm fedmomentum": "family avgm fedit"}
    assert [c.label for c in study.baseline_cells()] == ["iid fedit", "family fedit", "family avgm fedit"]
    assert study.compared_with("`") == "its baseline"
    with pytest.raises(study_io.StudyError, match="3 baseline cells"):
        study.baseline  # noqa: B018 - one baseline for every cell only


@pytest.mark.parametrize("text, message", [
    ('baseline_cell = 1\n[base]\n', "unknown key(s) 'baseline_cell'"),
    ('[base]\nlocal_step = 3\n', "[base]: unknown config key(s): 'local_step' (did you mean 'local_steps'?)"),
    ('[base]\nout = "x"\n', "[base] out"),
    ('[base]\n[grid]\nmethods = ["fedit"]\n', "[grid] methods: unknown config key 'methods'"),
    ('[base]\n[grid]\nmethod = "fedit"\n', "[grid] method: must be a non-empty list"),
    ('[base]\n[grid]\nseed = [0, 0]\n', "[grid] seed: must be a list of distinct integers"),
    ('[base]\n[[cell]]\nname = "a"\nseeds = [1, true]\n', "cell 'a': seeds: must be a list of distinct integers"),
    ('[base]\n[grid]\nmethod = ["fedit", "fedmomentum"]\nmethod_options.residual_energy = [0.9]\n',
     "cell 'fedit': unknown option(s) residual_energy for method 'fedit'"),
    ('[base]\n[grid]\nrounds = [2, 0]\n', "cell 'rounds=0': bad config: rounds must be ≥ 1"),
    ('baseline = {method = "flora"}\n[base]\n[grid]\nmethod = ["fedit", "fedmomentum"]\n',
     "baseline: {'method': 'flora'} matches 0 cells"),
    ('baseline = {methd = "fedit"}\n[base]\n[grid]\nmethod = ["fedit", "fedmomentum"]\n',
     "baseline methd: unknown config key 'methd'"),
    ('baseline = {method = "fedit"}\n[base]\n[[cell]]\nmethod = "fedit"\npartition = "iid"\n[[cell]]\n'
     'method = "fedit"\npartition = "family"\n[[cell]]\nmethod = "fedmomentum"\npartition = "dirichlet"\n',
     "baseline: cell 'fedmomentum partition=dirichlet' must agree with exactly one of the baseline cells "
     "(fedit partition=iid, fedit partition=family) on everything but method; it agrees with none: "
     "'fedit partition=iid' differs in partition; 'fedit partition=family' differs in partition"),
    ('baseline = {method = "fedit"}\n[base]\n[[cell]]\nname = "a"\nmethod = "fedit"\n[[cell]]\nname = "b"\n'
     'method = "fedit"\n[[cell]]\nname = "c"\nmethod = "fedmomentum"\n',
     "baseline: cell 'c' must agree with exactly one of the baseline cells (a, b) on everything but method; "
     "it agrees with 2: a, b"),
    ('baseline = {lora_r = 2}\n[base]\n[grid]\nmethod = ["fedit", "fedmomentum"]\n',
     "baseline: {'lora_r': 2} matches 2 cells (fedit, fedmomentum)"),  # every cell: nothing to compare
    ('baseline = {}\n[base]\n[grid]\nmethod = ["fedit", "fedmomentum"]\n',
     "baseline: must be a cell's name or a table of values, got {}"),
    ('target_loss = "low"\n[base]\n', "target_loss must be a number"),
    ('[base]\n[[cell]]\nname = "a"\nseed = 1\n', "cell 'a': key 'seed' is not a RunConfig key a cell may set"),
    ('[base]\n[[cell]]\nname = "a"\n[[cell]]\nname = "a"\n', "cells ['a'] share a label"),
    ('[base\n', "cannot parse config file"),
])
def test_study_file_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as error:
        study_io.load(path)
    assert message in str(error.value) and str(path) in str(error.value)
    result = runner.invoke(app, ["study", "--config", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_missing_study_file_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["study", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2 and "config file not found" in result.output


T_975 = {1: 12.706204736174698, 2: 4.302652729911275, 4: 2.7764451051977987, 9: 2.2621571627409915}  # a t table


def power_by_integration(noncentrality: float, df: int, critical: float) -> float:
    """``P(|T| > c)`` for ``T = (Z + λ) / √(V/df)``, ``V ~ χ²_df``, by integrating the normal tails over ``u = √V``
    (chi density): no noncentral t distribution involved."""
    from scipy import integrate

    def tails(u: float) -> float:
        edge = critical * u / math.sqrt(df)
        density = math.exp((df - 1) * math.log(u) - u * u / 2 - (df / 2 - 1) * math.log(2) - math.lgamma(df / 2)) \
            if u > 0 else (1.0 if df == 1 else 0.0) * math.sqrt(2 / math.pi)
        return (statistics.NormalDist().cdf(noncentrality - edge) + statistics.NormalDist().cdf(
            -noncentrality - edge)) * density

    return integrate.quad(tails, 0, math.inf, epsabs=1e-13, epsrel=1e-12, limit=200)[0]


def detectable_by_integration(std: float, n: int) -> float:
    low, high = 0.0, 100.0
    for _ in range(100):  # bisection on λ: the power rises with it
        middle = (low + high) / 2
        low, high = (middle, high) if power_by_integration(middle, n - 1, T_975[n - 1]) < 0.8 else (low, middle)
    return (low + high) / 2 * std / math.sqrt(n)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_detectable_difference_is_that_of_a_paired_t_test_at_80_percent_power(n):
    assert power_by_integration(0.0, n - 1, T_975[n - 1]) == pytest.approx(0.05, abs=1e-9)  # the reference's check
    assert study_io.detectable_difference(0.3, n) == pytest.approx(detectable_by_integration(0.3, n), rel=1e-7)
    assert study_io.detectable_difference(0.6, n) == pytest.approx(2 * study_io.detectable_difference(0.3, n))


def test_detectable_difference_edges_and_the_large_sample_formula():
    z = statistics.NormalDist().inv_cdf  # many seeds: the normal formula (z_{1−α/2} + z_{power}) σ / √n
    assert study_io.detectable_difference(1.0, 4000) == pytest.approx((z(0.975) + z(0.8)) / math.sqrt(4000),
                                                                      rel=1e-3)
    assert study_io.detectable_difference(1.0, 1) is None and study_io.detectable_difference(0.0, 3) == 0.0
    assert study_io.interval([1.0, 2.0, 4.0]).detectable == study_io.detectable_difference(
        statistics.stdev([1.0, 2.0, 4.0]), 3)


def test_interval_is_a_t_interval():
    stat = study_io.interval([1.0, 2.0, 3.0, None, math.nan])
    assert (stat.mean, stat.std, stat.n) == (2.0, 1.0, 3)
    assert stat.half == pytest.approx(4.302652729911275 / math.sqrt(3))  # t(0.975, 2) from a table
    stat = study_io.interval([0.5, 0.7, 0.2, 0.4, 0.9])
    assert stat.half == pytest.approx(2.7764451051977987 * statistics.stdev([0.5, 0.7, 0.2, 0.4, 0.9]) / math.sqrt(5))
    assert study_io.interval([4.0]).half is None and study_io.interval([]) is None


# --- whole studies on the tiny model -------------------------------------------------------------------------------

TWO_BY_TWO = """
baseline = {method = "fedit"}
target_loss = 100.0
[base]
[grid]
method = ["fedit", "fedmomentum"]
seed = [0, 1]
"""


def summaries(out, label):
    return {seed: json.loads((out / "runs" / label / f"seed-{seed}" / "summary.json").read_text()) for seed in (0, 1)}


def test_a_study_writes_tables_and_plots_and_a_resumed_study_redoes_nothing(tmp_path):
    path, out = write(tmp_path, TWO_BY_TWO), tmp_path / "out"
    result = runner.invoke(app, ["study", "--config", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output

    rows = list(csv.DictReader((out / "study.csv").open()))
    assert [row["cell"] for row in rows] == ["fedit", "fedmomentum"]
    runs = {label: summaries(out, label) for label in ("fedit", "fedmomentum")}
    for row in rows:
        finals = [s["final_eval_loss"] for s in runs[row["cell"]].values()]
        assert row["seeds"] == "2" and row["failed"] == "0"
        assert float(row["final_eval_loss_mean"]) == pytest.approx(statistics.mean(finals))
        assert float(row["final_eval_loss_std"]) == pytest.approx(statistics.stdev(finals))
        downlink = [s["downlink_bytes"] for s in runs[row["cell"]].values()]
        assert float(row["downlink_bytes_mean"]) == pytest.approx(statistics.mean(downlink))
    deltas = [runs["fedmomentum"][s]["final_eval_loss"] - runs["fedit"][s]["final_eval_loss"] for s in (0, 1)]
    assert float(rows[1]["delta_final_eval_loss_mean"]) == pytest.approx(statistics.mean(deltas))
    assert float(rows[1]["delta_final_eval_loss_ci95"]) == pytest.approx(
        12.706204736174698 * statistics.stdev(deltas) / math.sqrt(2))  # t(0.975, 1)
    assert len(list(csv.DictReader((out / "runs.csv").open()))) == 4

    text = (out / "study.md").read_text()
    assert "| fedmomentum | 2 |" in text and "Paired differences in final eval loss" in text
    assert f"| fedmomentum | {deltas[0]:+.4f} | {deltas[1]:+.4f} |" in text
    for name in ("loss_vs_rounds.png", "loss_vs_bytes.png", "final.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"![{name}]({name})" in text
    assert not (out / "gap_vs_momentum.png").exists()  # one baseline: every point would have the same x

    # the per-round gap is the mean over seeds of the same-seed differences
    study = study_io.load(path)
    results = study_io.execute(study, out, log=lambda _: None)
    assert not any(r.redone for r in results)
    losses, gaps, frontier = study_io.curves(study, results)
    metrics = {(r.cell.label, r.seed): {row["round"]: row["eval_loss"] for row in r.rows} for r in results}
    expected = [statistics.mean(metrics[("fedmomentum", s)][t] - metrics[("fedit", s)][t] for s in (0, 1))
                for t in (0, 1)]
    assert gaps["fedmomentum"].x == [0, 1] and gaps["fedmomentum"].mean == pytest.approx(expected)
    assert frontier["fedmomentum"].x[0] == 0 and frontier["fedmomentum"].x[1] > frontier["fedit"].x[1] > 0

    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.jsonl")}
    result = runner.invoke(app, ["study", "--config", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("already finished, read back") == 4 and "starting" not in result.output
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.jsonl")} == before
    assert list(csv.DictReader((out / "study.csv").open())) == rows


def test_cells_with_their_own_seeds_are_paired_on_the_seeds_they_share(tmp_path):
    """``seeds = [...]`` in a ``[[cell]]``: that cell runs on those seeds only, and its paired differences are
    taken on the seeds the baseline has too."""
    path = write(tmp_path, '[base]\n[grid]\nseed = [0, 1]\n[[cell]]\nmethod = "fedit"\n'
                           '[[cell]]\nmethod = "fedmomentum"\nseeds = [0, 2]\n')
    study = study_io.load(path)
    assert [(c.label, s) for c, s in study.runs()] == [("fedit", 0), ("fedmomentum", 0), ("fedit", 1),
                                                        ("fedmomentum", 2)]  # seed by seed
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", "--config", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 cells, 4 runs" in result.output and "[4/4] fedmomentum seed 2" in result.output
    assert sorted(p.parent.name + "/" + p.name for p in (out / "runs").glob("*/seed-*")) == [
        "fedit/seed-0", "fedit/seed-1", "fedmomentum/seed-0", "fedmomentum/seed-2"]
    final = {(p.parent.name, p.name): json.loads((p / "summary.json").read_text())["final_eval_loss"]
             for p in (out / "runs").glob("*/seed-*")}
    rows = {row["cell"]: row for row in csv.DictReader((out / "study.csv").open())}
    assert rows["fedmomentum"]["seeds"] == "2"
    gap = final[("fedmomentum", "seed-0")] - final[("fedit", "seed-0")]
    assert float(rows["fedmomentum"]["delta_final_eval_loss_mean"]) == pytest.approx(gap)
    text = (out / "study.md").read_text()
    assert f"| fedmomentum | {gap:+.4f} | - | - |" in text and "Not finished yet" not in text
    assert study_io.read_back(study, out) and len(study_io.read_back(study, out)) == 4


REGIMES = """
baseline = {method = "fedit"}
[base]
[grid]
method = ["fedit", "fedmomentum"]
clients_per_round = [2, 3]
seed = [0, 1, 2]
"""


def fake_runs(study, out: Path) -> dict[tuple[str, int], list[dict]]:
    """A finished run folder (``config.json``, ``metrics.jsonl``, ``summary.json``) for every run of ``study`` in
    ``out``, with made-up eval losses and momentum measures, nothing trained; (cell label, seed) → its rows."""
    import random

    numbers, made = random.Random(0), {}
    for cell, seed in study.runs():
        folder = study_io.run_folder(out, cell, seed)
        config = study.config(cell, seed, folder)
        rows = [{"round": 0, "eval_loss": 3.0}] + [
            {"round": t, "eval_loss": numbers.uniform(1.0, 3.0), "uplink_bytes": 10, "downlink_bytes": 20,
             "noise_share": numbers.uniform(0.0, 0.5), "update_alignment": numbers.uniform(-1, 1) if t > 1 else None}
            for t in range(1, config.rounds + 1)]
        losses = [row["eval_loss"] for row in rows]
        summary = {"rounds": config.rounds, "final_eval_loss": losses[-1], "best_eval_loss": min(losses),
                   "final_accuracy": 0.0, "uplink_bytes": 10 * config.rounds, "downlink_bytes": 20 * config.rounds,
                   "seconds": 1.0}
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
        (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        (folder / "summary.json").write_text(json.dumps(summary))
        made[(cell.label, seed)] = rows
    return made


def test_a_regime_sweep_compares_each_cell_with_the_baseline_of_its_regime(tmp_path):
    """``baseline = {method = "fedit"}`` over method × clients_per_round: each FedMomentum cell is paired with the
    FedIT cell of its clients_per_round, in the tables, the per-round gaps and the gap against momentum plot."""
    path, out = write(tmp_path, REGIMES, rounds=3), tmp_path / "out"
    study = study_io.load(path)
    rows = fake_runs(study, out)
    result = runner.invoke(app, ["study", "--config", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.count("already finished, read back") == 12

    def mean_loss(label, seed):
        return statistics.mean(row["eval_loss"] for row in rows[(label, seed)][1:])

    def mean_of(label, key):
        return statistics.mean(statistics.mean(row[key] for row in rows[(label, seed)] if row.get(key) is not None)
                               for seed in (0, 1, 2))

    results = study_io.read_back(study, out)
    points = {title: {p.label: p for p in found}
              for title, found in study_io.gap_vs_momentum(study_io.summarize(study, results)).items()}
    gaps = study_io.curves(study, results)[1]
    table = {row["cell"]: row for row in csv.DictReader((out / "study.csv").open())}
    text = (out / "study.md").read_text()
    for k in (2, 3):
        cell, base = f"fedmomentum clients_per_round={k}", f"fedit clients_per_round={k}"
        diffs = [mean_loss(cell, seed) - mean_loss(base, seed) for seed in (0, 1, 2)]
        assert table[cell]["baseline"] == base and table[base]["baseline"] == base
        assert float(table[cell]["delta_mean_eval_loss_mean"]) == pytest.approx(statistics.mean(diffs))
        assert float(table[cell]["delta_mean_eval_loss_ci95"]) == pytest.approx(
            T_975[2] * statistics.stdev(diffs) / math.sqrt(3))
        assert f"| {cell} | {base} | " + " | ".join(f"{d:+.4f}" for d in diffs) + " | " in text
        assert gaps[cell].mean == pytest.approx([statistics.mean(
            rows[(cell, seed)][t]["eval_loss"] - rows[(base, seed)][t]["eval_loss"] for seed in (0, 1, 2))
            for t in range(4)])
        noise = points["noise share"][cell]
        assert (noise.x, noise.y, noise.half) == pytest.approx((mean_of(base, "noise_share"), statistics.mean(diffs),
                                                                T_975[2] * statistics.stdev(diffs) / math.sqrt(3)))
        assert points["update alignment"][cell].x == pytest.approx(mean_of(base, "update_alignment"))
    assert set(points["noise share"]) == {"fedmomentum clients_per_round=2", "fedmomentum clients_per_round=3"}
    assert "baselines `fedit clients_per_round=2`, `fedit clients_per_round=3`" in text
    assert "## Paired differences in mean eval loss over rounds: cell − its baseline, same seed" in text
    assert (out / "gap_vs_momentum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![gap_vs_momentum.png](gap_vs_momentum.png)" in text


def test_a_study_of_server_optimizers_and_client_corrections(tmp_path):
    """The study cells of issue 18: methods with ``server_opt``, FedProx and SCAFFOLD, all run and checkpointed."""
    path = write(tmp_path, '[base]\nprox_mu = 0.01\nscaffold = true\n[grid]\nmethod = ["fedit", "fedmomentum"]\n'
                           'method_options.server_opt = ["avgm"]\nseed = [0]\n')
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", "--config", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    states = [checkpoint.load(p)[0] for p in sorted((out / "runs").rglob(driver.CHECKPOINT))]
    assert len(states) == 2
    for state in states:
        assert {"opt_m_A", "opt_m_B"} <= set(state.method) or {"opt_m_left", "opt_m_right"} <= set(state.method)
        assert set(state.control) == {"A", "B"}


def test_interrupted_runs_resume_from_their_checkpoints(tmp_path):
    one = '[base]\n[grid]\nmethod = ["fedmomentum"]\nseed = [0]\n'
    out = tmp_path / "out"
    study = study_io.load(write(tmp_path, one, rounds=1))
    study_io.execute(study, out, log=lambda _: None)
    folder = study_io.run_folder(out, study.cells[0], 0)
    first = (folder / "metrics.jsonl").read_text().splitlines()

    (folder / "summary.json").unlink()  # stopped after its last checkpoint, before the summary
    assert study_io.state(folder, study.config(study.cells[0], 0, folder)) == "partial"
    results = study_io.execute(study, out, log=lambda _: None)
    assert results[0].redone and results[0].error is None
    assert (folder / "metrics.jsonl").read_text().splitlines() == first

    longer = study_io.load(write(tmp_path, one, rounds=2))  # more rounds: the run continues from round 1
    results = study_io.execute(longer, out, log=lambda _: None)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert results[0].redone and [json.loads(x)["round"] for x in lines] == [0, 1, 2] and lines[:2] == first

    for child in folder.iterdir():  # stopped before its first checkpoint: only config.json is left
        if child.name != "config.json":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    assert study_io.state(folder, longer.config(longer.cells[0], 0, folder)) == "started"
    results = study_io.execute(longer, out, log=lambda _: None)
    assert results[0].redone and [row["round"] for row in results[0].rows] == [0, 1, 2]
    assert [json.loads(x)["eval_loss"] for x in (folder / "metrics.jsonl").read_text().splitlines()] == [
        json.loads(x)["eval_loss"] for x in lines]  # started over: the same numbers


def test_a_failed_run_is_reported_and_the_grid_goes_on(tmp_path):
    path = write(tmp_path, """
baseline = "ok"
[base]
[grid]
seed = [0]
[[cell]]
name = "broken"
model = "/no/such/model-folder"
[[cell]]
name = "ok"
method = "fedit"
""")
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", "--config", str(path), "--out", str(out)])
    assert result.exit_code == 1
    assert "broken seed 0: FAILED" in result.output and "/no/such/model-folder" in result.output
    assert (out / "runs" / "ok" / "seed-0" / "summary.json").is_file()
    text = (out / "study.md").read_text()
    assert "## Failed runs" in text and "- broken seed 0:" in text and "| ok | 1 |" in text
    assert "1 failed" in text
    assert "FAILED" in (out / "study.log").read_text()


def test_a_folder_holding_another_config_is_not_mixed_in(tmp_path):
    out = tmp_path / "out"
    text = '[base]\n[grid]\nmethod = ["fedit"]\nseed = [0]\n'
    study_io.execute(study_io.load(write(tmp_path, text)), out, log=lambda _: None)
    changed = study_io.load(write(tmp_path, text.replace("[grid]", "weight_decay = 0.01\n[grid]")))
    results = study_io.execute(changed, out, log=lambda _: None)
    assert "holds a run with other settings: weight_decay (0.0 → 0.01)" in (results[0].error or "")


def test_a_run_another_live_process_holds_is_skipped(tmp_path):
    """The same study started twice: a run claimed by a live process is left to it; a dead process's claim is
    taken over."""
    import subprocess
    import sys

    out = tmp_path / "out"
    study = study_io.load(write(tmp_path, '[base]\n[grid]\nmethod = ["fedit"]\nseed = [0, 1]\n'))
    busy, free = (study_io.run_folder(out, study.cells[0], seed) for seed in (0, 1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    busy.parent.mkdir(parents=True)
    busy.with_name("seed-0.lock").write_text(str(os.getppid()))  # our parent: alive while we run
    free.with_name("seed-1.lock").write_text(dead.stdout.strip())  # a process that has exited
    lines = []
    results = study_io.execute(study, out, log=lines.append)
    assert [r.seed for r in results] == [1] and results[0].redone and results[0].error is None
    assert any("seed 0: running in another process, skipped" in line for line in lines)
    assert not busy.exists() and busy.with_name("seed-0.lock").is_file()  # left alone
    assert not free.with_name("seed-1.lock").exists()  # released after the run
    assert not study_io.claim(busy) and study_io.claim(free)
    study_io.release(free)
    summaries = study_io.summarize(study, results)
    assert "Not finished yet (still running, or stopped part way): default seed 0." in study_io.tables.study_markdown(
        study, summaries, [])


def test_a_run_another_process_finishes_meanwhile_is_read_back_at_the_end(tmp_path):
    """Two processes share a grid: the one that ends last reports every run, the other's too, in grid order."""
    study = study_io.load(write(tmp_path, '[base]\n[grid]\nmethod = ["fedit"]\nseed = [0, 1]\n'))
    elsewhere = tmp_path / "elsewhere"
    study_io.execute(study, elsewhere, log=lambda _: None)
    out = tmp_path / "out"
    busy = study_io.run_folder(out, study.cells[0], 0)
    busy.parent.mkdir(parents=True)
    busy.with_name("seed-0.lock").write_text(str(os.getppid()))  # our parent: alive while we run
    lines = []

    def log(line: str) -> None:
        lines.append(line)
        if line.endswith("seed 0: running in another process, skipped"):  # ... which then finishes it
            shutil.copytree(study_io.run_folder(elsewhere, study.cells[0], 0), busy)

    results = study_io.execute(study, out, log=log)
    assert [r.seed for r in results] == [0, 1] and [r.redone for r in results] == [False, True]
    assert results[0].summary == json.loads((busy / "summary.json").read_text())
    assert lines[-1] == "[1/2] default seed 0: finished in another process, read back"


# --- committed studies: study.md recomputed from the runs' files ----------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "study-tiny"  # made by tests/momentum_helpers.py (see its study.toml)


def committed_studies() -> list[Path]:
    """Every finished study in ``docs/results/`` that holds its runs' files (a study still running has no
    ``study.md`` yet), and the tiny fixture study."""
    results = ROOT / "docs" / "results"
    return sorted(p for p in results.iterdir()
                  if (p / "study.md").is_file() and any(p.glob("runs/*/seed-*/summary.json"))) + [FIXTURE]


def spec_of(folder: Path) -> Path:
    """The study file: the folder's own ``study.toml``, else ``examples/studies/<study>.toml``."""
    own = folder / "study.toml"
    return own if own.is_file() else ROOT / "examples" / "studies" / f"{folder.name}.toml"


def read_csv(path: Path) -> list[dict]:
    def value(text: str):
        try:
            return float(text)
        except ValueError:
            return text

    return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(path.open(encoding="utf-8"))]


@pytest.mark.parametrize("folder", committed_studies(), ids=lambda p: p.name)
def test_a_committed_study_is_recomputed_from_its_runs_files(folder, tmp_path):
    study = study_io.load(spec_of(folder))
    results = study_io.read_back(study, folder)
    assert results  # a study part way through lists its missing runs in study.md, so the text below differs
    # if a run's files were left out of the repository after study.md was written
    study_io.write(study, results, tmp_path, draw=any(folder.glob("*.png")))
    assert (tmp_path / "study.md").read_text(encoding="utf-8") == (folder / "study.md").read_text(encoding="utf-8")
    for name in ("study.csv", "runs.csv"):  # full-precision numbers: equal up to the last digits of scipy's t and nct
        assert read_csv(tmp_path / name) == [{k: pytest.approx(v, rel=1e-9) if isinstance(v, float) else v
                                              for k, v in row.items()} for row in read_csv(folder / name)]


def test_the_fixture_studys_numbers_are_what_its_runs_files_say():
    """The fixture's tables against numbers computed here from its metrics.jsonl lines alone."""
    study = study_io.load(FIXTURE / "study.toml")
    lines = {(cell.label, seed): [json.loads(x) for x in (study_io.run_folder(FIXTURE, cell, seed) / "metrics.jsonl")
                                  .read_text().splitlines()] for cell in study.cells for seed in study.seeds}
    table = {row["cell"]: row for row in read_csv(FIXTURE / "study.csv")}
    text = (FIXTURE / "study.md").read_text(encoding="utf-8")

    def per_seed(label, number):
        return [number(lines[(label, seed)]) for seed in study.seeds]

    def mean_loss(rows):
        return statistics.mean(r["eval_loss"] for r in rows if r["round"] > 0 and "eval_loss" in r)

    def mean_of(key):
        return lambda rows: statistics.mean(r[key] for r in rows if r.get(key) is not None)

    for label in ("fedit", "fedmomentum"):
        assert table[label]["mean_eval_loss_mean"] == pytest.approx(statistics.mean(per_seed(label, mean_loss)))
        for key in ("update_alignment", "subspace_overlap", "noise_share"):
            assert table[label][f"mean_{key}_mean"] == pytest.approx(statistics.mean(per_seed(label, mean_of(key))))
        assert table[label]["final_path_efficiency_mean"] == pytest.approx(statistics.mean(
            per_seed(label, lambda rows: rows[-1]["path_efficiency"])))
        reached = [rows for rows in per_seed(label, lambda rows: rows) if any(
            r.get("eval_loss", math.inf) <= study.target_loss for r in rows)]
        assert 0 < len(reached) < len(study.seeds)  # the fixture's target is reached by some seeds only
        sent = [sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rows[1: next(
            i for i, r in enumerate(rows) if r.get("eval_loss", math.inf) <= study.target_loss) + 1])
            for rows in reached]
        assert table[label]["bytes_to_target_mean"] == pytest.approx(statistics.mean(sent))
    diffs = [a - b for a, b in zip(per_seed("fedmomentum", mean_loss), per_seed("fedit", mean_loss), strict=True)]
    detectable = detectable_by_integration(statistics.stdev(diffs), len(diffs))
    assert table["fedmomentum"]["delta_mean_eval_loss_detectable80"] == pytest.approx(detectable, rel=1e-7)
    assert f"| {statistics.mean(diffs):+.4f} [" in text and f"no clear difference | {detectable:.4f} |" in text
    assert "## Momentum" in text and "| fedmomentum | " + f"{table['fedmomentum']['mean_update_alignment_mean']:.3f}" \
        in text


@pytest.mark.parametrize("change, message", [
    (lambda summary, rows: ({**summary, "seconds": "slow"}, rows), "summary.json: seconds must be a finite number"),
    (lambda summary, rows: (summary, [{**rows[0], "eval_loss": float("nan")}] + rows[1:]),
     "metrics.jsonl: eval_loss must be a finite number or null"),
    (lambda summary, rows: (summary, rows[:1] + [{k: v for k, v in rows[1].items() if k != "downlink_bytes"}]
                            + rows[2:]), "a trained round without its uplink or downlink bytes"),
])
def test_read_back_checks_the_numbers_it_uses(tmp_path, change, message):
    folder = tmp_path / "study"
    shutil.copytree(FIXTURE, folder)
    study = study_io.load(folder / "study.toml")
    run = study_io.run_folder(folder, study.cells[1], study.seeds[0])
    summary, rows = change(json.loads((run / "summary.json").read_text()),
                           [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()])
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=message):
        study_io.read_back(study, folder)


def test_the_reading_of_a_clear_difference_says_which_way_is_better():
    """A loss below the baseline's is better, an accuracy below it worse; an interval holding 0 is no difference."""
    below, above, around = (study_io.summary.Interval(mean, 0.01, 0.02, 3) for mean in (-0.05, 0.05, 0.0))
    reading = study_io.tables._reading
    assert [reading(s, lower_is_better=True) for s in (below, above, around)] == [
        "lower (better)", "higher (worse)", "no clear difference"]
    assert [reading(s, lower_is_better=False) for s in (below, above, around)] == [
        "lower (worse)", "higher (better)", "no clear difference"]
