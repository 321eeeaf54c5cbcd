"""``fedmomentum study``: the study file and its errors, the grid, the statistics, and whole studies on the tiny
model (tables, plots, resuming, failures)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics

import pytest
from typer.testing import CliRunner

from fedmomentum import checkpoint, driver, report
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


@pytest.mark.parametrize("text, message", [
    ('baseline_cell = 1\n[base]\n', "unknown key(s) 'baseline_cell'"),
    ('[base]\nlocal_step = 3\n', "[base]: unknown config key(s): 'local_step' (did you mean 'local_steps'?)"),
    ('[base]\nout = "x"\n', "[base] out"),
    ('[base]\n[grid]\nmethods = ["fedit"]\n', "[grid] methods: unknown config key 'methods'"),
    ('[base]\n[grid]\nmethod = "fedit"\n', "[grid] method: must be a non-empty list"),
    ('[base]\n[grid]\nseed = [0, 0]\n', "[grid] seed: must be distinct integers"),
    ('[base]\n[grid]\nmethod = ["fedit", "fedmomentum"]\nmethod_options.residual_energy = [0.9]\n',
     "cell 'fedit': unknown option(s) residual_energy for method 'fedit'"),
    ('[base]\n[grid]\nrounds = [2, 0]\n', "cell 'rounds=0': bad config: rounds must be ≥ 1"),
    ('baseline = {method = "flora"}\n[base]\n[grid]\nmethod = ["fedit", "fedmomentum"]\n',
     "baseline: {'method': 'flora'} matches 0 cells"),
    ('baseline = {methd = "fedit"}\n[base]\n[grid]\nmethod = ["fedit", "fedmomentum"]\n',
     "baseline methd: unknown config key 'methd'"),
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
    assert "Not finished yet (running in another process): default seed 0." in report.study_markdown(
        study, summaries, [])
