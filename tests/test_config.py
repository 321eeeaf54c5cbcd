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


# --- declared keys: one declaration gives the type, the allowed values, the default, the meaning, the range --------


@pytest.mark.parametrize("value, expected", [
    ("balanced", "balanced"), ("left", "left"), (" left", None), ("LEFT", None), ("lft", None), (1, None),
])
def test_a_literal_accepts_exactly_its_values(value, expected):
    from typing import Literal

    kind = Literal["balanced", "left"]
    if expected is None:
        with pytest.raises(ValueError, match=r"expected one of 'balanced', 'left'"):
            coerce.convert(value, kind, "option split")
        with pytest.raises(ValueError):
            coerce.check(value, kind, "option split")
    else:
        assert coerce.convert(value, kind, "option split") == expected
        coerce.check(value, kind, "option split")


@pytest.mark.parametrize("text, value", [
    ("5e-4", 0.0005), ("3", 3), ("true", True), ('"quoted"', "quoted"), ("'single'", "single"),
    ('["a.jsonl", "b"]', ["a.jsonl", "b"]), ("{split = 'left'}", {"split": "left"}), ("tiny", "tiny"),
    ("runs/x", "runs/x"), ("", ""), ("cycle:4,8", "cycle:4,8"), ("gcd,lcm", "gcd,lcm"), ("2024-01-02", "2024-01-02"),
    ("a = b", "a = b"), ('"two\nlines"', '"two\nlines"'),
])
def test_command_line_text_is_read_as_toml_when_it_is_a_toml_value(text, value):
    assert coerce.read_text(text) == value


def test_every_key_and_option_is_declared_with_a_meaning_and_a_default_of_its_type():
    from fedmomentum import keys, methods

    for spec in config_io.describe().values():
        assert spec.meaning, spec.name
        coerce.check(spec.default, spec.kind, spec.name)
        if spec.rule is not None and spec.default is not None:
            assert spec.rule.holds(spec.default), spec.name
    for name in methods.names():
        instance = methods.check_options(name, {})  # the defaults pass their own checks
        for spec in keys.declared(type(instance)).values():
            assert spec.meaning, (name, spec.name)


def test_a_rule_names_the_key_its_bound_and_the_value():
    with pytest.raises(ValueError, match=r"^bad config: lora_dropout must be in \[0, 1\), got 1.0$"):
        RunConfig(lora_dropout=1.0).validate()
    with pytest.raises(ValueError, match=r"^bad config: target_modules must be non-empty, got \[\]$"):
        RunConfig(target_modules=[]).validate()
    with pytest.raises(ValueError, match=r"^fedmomentum option merge_every must be ≥ 1, got 0$"):
        RunConfig(method_options={"merge_every": 0}).validate()


@pytest.mark.parametrize("name, meant", [("learning_rate", "lr"), ("num_rounds", "rounds"), ("LR", "lr"),
                                         ("local-steps", "local_steps"), ("lora_rank", "lora_r"),
                                         ("output_dir", "out"), ("batchsize", "batch_size"), ("zzz", None)])
def test_suggestions_come_from_the_alias_table_and_the_spelling(name, meant):
    from fedmomentum import keys

    assert keys.suggest(name, config_io.FIELDS, config_io.ALIASES) == meant


@pytest.mark.parametrize("name, meant", [("fedmomentm", "fedmomentum"), ("FedAvg", "fedit"), ("fedex", "fedex-lora"),
                                         ("ffalora", "ffa-lora"), ("flex_lora", "flexlora"), ("sgd", None)])
def test_method_names_are_suggested(name, meant):
    from fedmomentum import keys, methods

    assert keys.suggest(name, methods.names(), methods.METHOD_ALIASES) == meant


def test_the_training_keys_are_declared_once():
    """TrainConfig's keys are RunConfig's (inherited, not repeated), and train_config carries their values."""
    import dataclasses

    from fedmomentum.client import TrainConfig as ClientTrainConfig
    from fedmomentum.config import TrainConfig

    assert ClientTrainConfig is TrainConfig and issubclass(RunConfig, TrainConfig)
    config = RunConfig(local_steps=7, lr=0.02, bf16=True)
    train = config.train_config()
    assert type(train) is TrainConfig
    assert dataclasses.asdict(train) == {f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)}


def test_what_may_change_on_resume_is_what_the_flower_fingerprint_ignores():
    from fedmomentum.flower.wire import fingerprint

    base = RunConfig()
    for name in config_io.MAY_CHANGE_ON_RESUME:
        other = {"out": "elsewhere", "device": "cuda:0", "report_to": "tensorboard", "stream": "never"}.get(name)
        if other is None:
            value = getattr(base, name)
            other = (not value) if isinstance(value, bool) else value + 1
        assert fingerprint(dataclasses_replace(base, **{name: other})) == fingerprint(base), name
    assert fingerprint(dataclasses_replace(base, lr=0.5)) != fingerprint(base)
    assert set(config_io.MAY_CHANGE_ON_RESUME) >= {"rounds", "out", "device", "export_rank", "report_to"}


def dataclasses_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_the_registry_and_the_method_classes_agree():
    from fedmomentum import methods
    from fedmomentum.methods.option_specs import OPTIONS, MethodOptions

    for name in methods.names():
        cls = methods.get(name)
        assert cls.name == name and cls.Options is OPTIONS[name] and issubclass(cls.Options, MethodOptions)
        assert methods.create(name).options == methods.check_options(name, {})


def test_a_registered_method_brings_its_options():
    import dataclasses

    from fedmomentum import methods
    from fedmomentum.keys import at_least, key
    from fedmomentum.methods.base import Method
    from fedmomentum.methods.option_specs import MethodOptions

    @dataclasses.dataclass(frozen=True)
    class DampedOptions(MethodOptions):
        """FedIT with its update scaled down."""

        damping: int = key(2, "divide the update by this", at_least(1))

    class Damped(Method):
        name = "damped-test"
        Options = DampedOptions

    try:
        methods.register(Damped)
        assert methods.create("damped-test", damping=3).options.damping == 3
        with pytest.raises(ValueError, match="damped-test option damping must be ≥ 1"):
            methods.create("damped-test", damping=0)
        with pytest.raises(ValueError, match=r"unknown option\(s\) dampin \(did you mean damping\?\)"):
            methods.check_options("damped-test", {"dampin": 2})
    finally:
        methods._OPTIONS.pop("damped-test", None)
        methods._CLASSES.pop("damped-test", None)


def test_importing_fedmomentum_and_its_config_does_not_import_torch():
    """``import fedmomentum``, its config and the method registry stay torch-free until a tensor is needed; the
    public names still work (and then import torch)."""
    import subprocess
    import sys

    code = ("import sys; import fedmomentum as fm; from fedmomentum import config, plan; "
            "config.load(None, {'lr': '5e-4'}); fm.methods.check_options('fedmomentum', {'split': 'left'}); "
            "assert not any(m in sys.modules for m in ('torch', 'transformers', 'peft')), sorted(sys.modules); "
            "pair = fm.LoraPair; from fedmomentum.methods import FedMomentum; assert 'torch' in sys.modules; "
            "assert fm.methods.create('fedmomentum').split == 'balanced' and pair.__name__ == 'LoraPair'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_random_tiny_model_skips_accuracy_unless_asked():
    """Its answers mean nothing: no generation by default; asked for, it is scored; other models score 8."""
    from fedmomentum.config import RunConfig

    assert RunConfig(model="tiny").accuracy_per_family == 0
    assert RunConfig(model="tiny", accuracy_per_family=3).accuracy_per_family == 3
    assert RunConfig().accuracy_per_family == 8
    assert RunConfig(model="tiny").replace(model="/some/model").accuracy_per_family == 8  # it followed the model
    assert RunConfig(model="tiny", accuracy_per_family=3).replace(model=None).accuracy_per_family == 3
