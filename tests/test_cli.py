"""The command line: help, config files with overrides, clear errors, run / resume / compare on a local model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedmomentum import config as config_io
from fedmomentum.cli import app

runner = CliRunner()

SMALL = ["--rounds", "1", "--clients", "2", "--clients-per-round", "2", "--local-steps", "1",
         "--set", "families=[basic_arithmetic]", "--set", "train_per_family=6", "--set", "eval_per_family=2",
         "--set", "max_length=48", "--set", "batch_size=2", "--set", "accuracy_per_family=0", "--set", "lora_r=2"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny_model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("command", [[], ["run"], ["compare"], ["methods"]])
def test_every_command_has_help(command):
    result = runner.invoke(app, command + ["--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_methods_lists_every_method():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0
    for name in ("fedit", "ffa-lora", "rolora", "flora", "fedex-lora", "flexlora", "fedmomentum"):
        assert name in result.output
    assert "residual_energy" in result.output


def test_config_file_with_a_typo_names_the_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('method = "fedmomentum"\nrounds = 2\nlocal_step = 3\n')
    with pytest.raises(ValueError, match=r"'local_step' \(did you mean 'local_steps'\?\)"):
        config_io.load(path)
    result = runner.invoke(app, ["run", "--config", str(path)])
    assert result.exit_code == 2 and "local_step" in result.output


def test_yaml_config_and_cli_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: flora\nrounds: 7\nmethod_options: {}\n")
    config = config_io.load(path, {"rounds": 3})
    assert (config.method, config.rounds) == ("flora", 3)


@pytest.mark.parametrize("args, message", [
    (["--method", "fedavg"], "unknown method 'fedavg'"),
    (["--option", "residual_energi=0.9"], "unknown option(s) residual_energi"),
    (["--clients", "2", "--clients-per-round", "5"], "clients_per_round"),
    (["--model", "/no/such/folder"], "/no/such/folder"),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path):
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "x"), *SMALL, *args])
    assert result.exit_code != 0
    assert message in result.output


def test_run_resume_and_compare_on_a_local_model(model_dir, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["run", "--model", str(model_dir), "--out", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1 and summary["final_eval_loss"] is not None

    result = runner.invoke(app, ["run", "--resume", str(out), "--rounds", "2"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["round"] for row in rows] == [0, 1, 2]

    root = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", "--methods", "fedit,fedmomentum", "--model", str(model_dir),
                                 "--out", str(root), "--target-loss", "100", *SMALL])
    assert result.exit_code == 0, result.output
    assert "| fedit |" in result.output and "| fedmomentum |" in result.output
    assert (root / "compare.png").stat().st_size > 1000
    assert (root / "compare.csv").read_text().startswith("method,")

    # --resume keeps finished methods and runs only what is missing
    before = (root / "fedit" / "metrics.jsonl").read_text()
    result = runner.invoke(app, ["compare", "--methods", "fedit,flora", "--model", str(model_dir),
                                 "--out", str(root), "--resume", *SMALL])
    assert result.exit_code == 0, result.output
    assert (root / "fedit" / "metrics.jsonl").read_text() == before
    assert "| flora |" in result.output and (root / "flora" / "summary.json").is_file()
