"""Typed config: values from files and the command line get their fields' types, or one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from fedmomentum import checkpoint, coerce
from fedmomentum import config as config_io
from fedmomentum.config import RunConfig
from fedmomentum.records import Records, read_jsonl


@pytest.mark.parametrize("value, kind, expected", [
    ("5e-4", float, 0.0005), ("1e-3", float, 0.001), (2, float, 2.0), (" 0.5 ", float, 0.5),
    ("2", int, 2), (2.0, int, 2), ("1e3", int, 1000), (7, int, 7),
    ("true", bool, True), ("No", bool, False), ("off", bool, False), (1, bool, True), (False, bool, False),
    ("runs/x", str, "runs/x"), (2024, str, "2024"),
    ("", str | None, None), ("none", str | None, None), (None, str | None, None), ("tiny", str | None, "tiny"),
    ("basic_arithmetic", list[str], ["basic_arithmetic"]), ("a, b", list[str], ["a", "b"]),
    ("[a, b]", list[str], ["a", "b"]), ("[1, 2]", list[str], ["1", "2"]),
    ("", list[str], []), ("[]", list[str], []), (("a",), list[str], ["a"]),
    ("{residual_energy: 0.9}", dict, {"residual_energy": 0.9}), ("", dict, {}),
])
def test_convert(value, kind, expected):
    got = coerce.convert(value, kind, "key")
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, kind, expected", [
    ("abc", int, "an integer"), ("2.5", int, "an integer"), (2.5, int, "an integer"), (True, int, "an integer"),
    (None, int, "an integer"), ("inf", float, "a finite number"), ("nan", float, "a finite number"),
    (True, float, "a finite number"), ("maybe", bool, "true or false"), (2, bool, "true or false"),
    (True, str, "a string"), (["a"], str, "a string"), (5, list[str], "a list of strings"),
    ("[a", list[str], "a list of strings"), ("[1]", dict, "a mapping"), ([True], list[str], "a string"),
])
def test_convert_refuses_in_one_line_naming_key_value_and_type(value, kind, expected):
    with pytest.raises(ValueError) as error:
        coerce.convert(value, kind, "config key k")
    message = str(error.value)
    assert "\n" not in message and message.startswith("config key k") and expected in message
    assert repr(value) in message or repr(str(value)) in message or "[" in message


def test_yaml_1_1_numbers_and_toml_strings(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("lr: 1e-3\nweight_decay: 5e-4\nrounds: '3'\nfamilies: basic_arithmetic\n")
    config = config_io.load(yaml_file)
    assert (config.lr, config.weight_decay, config.rounds) == (0.001, 0.0005, 3)
    assert config.families == ["basic_arithmetic"]
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('clients = "2"\n[method_options]\nmerge_residual = "false"\n')
    config = config_io.load(toml_file)
    assert config.clients == 2 and config.method_options == {"merge_residual": False}
    toml_file.write_text('[method_options]\nmerge_residual = "nope"\n')
    with pytest.raises(ValueError, match="merge_residual = 'nope': expected true or false"):
        config_io.load(toml_file)


def test_python_values_of_the_wrong_type_are_refused_by_validate():
    with pytest.raises(ValueError, match="config key rounds = '2': expected an integer"):
        RunConfig(rounds="2").validate()
    with pytest.raises(ValueError, match="config key families"):
        RunConfig(families="basic_arithmetic").validate()
    with pytest.raises(ValueError, match="merge_residual"):
        RunConfig(method_options={"merge_residual": "no"}).validate()
    RunConfig(lora_alpha=8).validate()  # an int is a fine float


def test_method_options_from_a_file_and_flags_add_up(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[method_options]\nresidual_energy = 0.99\n")
    config = config_io.load(path, {"method_options": {"merge_every": "2"}})
    assert config.method_options == {"residual_energy": 0.99, "merge_every": 2}


def test_resumed_takes_what_may_change_and_names_what_may_not():
    saved = RunConfig(rounds=4, out="runs/a").to_dict()
    config = config_io.resumed(saved, {"rounds": "6", "eval_every": 2, "lr": "1e-3", "out": "x"}, out="runs/a")
    assert (config.rounds, config.eval_every, config.lr, config.out) == (6, 2, 0.001, "runs/a")
    with pytest.raises(ValueError) as error:
        config_io.resumed(saved, {"lr": 0.01, "seed": 2, "rounds": 6}, out="runs/a")
    assert "lr (0.001 → 0.01), seed (0 → 2)" in str(error.value) and "rounds" not in str(error.value).split(";")[0]


def test_records_drop_a_torn_last_line_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "eval_lo')
    records = Records(tmp_path, keep_rounds=1)
    assert [row["round"] for row in records.rows] == [0, 1]
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"round": 0}, {"round": 1}]
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\nnot json\n{"round": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a record"):
        Records(tmp_path, keep_rounds=1)


def test_a_checkpoint_with_non_finite_or_odd_tensors_is_refused(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    metadata = {"round": "1", "info": json.dumps({"config": {}}), "format": "fedmomentum/1"}
    save_file({"lora.A.l": torch.tensor([[float("nan")]]), "lora.B.l": torch.zeros(1, 1)}, str(path), metadata)
    with pytest.raises(ValueError, match="lora.A.l is not a finite matrix"):
        checkpoint.load(path)
    save_file({"lora.A.l": torch.zeros(1, 1), "lora.B.l": torch.zeros(1, 1)}, str(path),
              {**metadata, "info": "[1, 2]"})
    with pytest.raises(ValueError, match="corrupt or unreadable checkpoint"):
        checkpoint.load(path)
