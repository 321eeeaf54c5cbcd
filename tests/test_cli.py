"""The command line, through the real command: help, typed config, one-line errors, no run overwritten, resume."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from fedmomentum import checkpoint, driver
from fedmomentum import config as config_io
from fedmomentum import methods as method_registry
from fedmomentum.cli import app

runner = CliRunner()

# A run of a few seconds on the tiny random Llama; clients_per_round is left to follow clients (2).
SMALL = ["--model", "tiny", "--rounds", "1", "--clients", "2", "--local-steps", "1",
         "--set", "families=basic_arithmetic", "--set", "train_per_family=4", "--set", "eval_per_family=2",
         "--set", "max_length=48", "--set", "batch_size=2", "--set", "accuracy_per_family=1",
         "--set", "max_new_tokens=2", "--set", "lora_r=2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    """The command failed with exit status 2 and said so in one line (the last on stderr), naming every fragment,
    with no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert lines and lines[-1].startswith("error: "), result.output
    error_lines = [line for line in lines if line.startswith("error: ") or "Traceback" in line]
    assert len(error_lines) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny_model
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- help ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["run"], ["compare"], ["study"], ["methods"], ["keys"]])
def test_every_command_has_plain_help(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    for markup in ("``", "[bold", "[/", "╭", "│"):
        assert markup not in result.output, markup


def test_run_help_documents_the_tiny_model_and_overwrite():
    output = invoke("run", "--help").output
    assert "'tiny'" in output and "--overwrite" in output and "--resume" in output


def test_methods_lists_every_option_with_its_type_default_and_meaning():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    for name in method_registry.names():
        assert f"{name}: " in result.output
        for option in method_registry.describe(name).values():
            line = f"  {option.name} ({option.type_text}; default {option.default_text}): {option.meaning}"
            assert line in result.output.splitlines(), line
            assert option.meaning  # every option says what it is
    assert '  residual_energy (float, in (0, 1]; default 1.0): ' in result.output
    assert '  split ("balanced" | "left"; default "balanced"): ' in result.output
    assert invoke("methods", "frlora").output.startswith("frlora: ")
    one_line_error(invoke("methods", "fedmomentm"), "did you mean 'fedmomentum'?")


def test_keys_lists_every_config_key_with_its_type_default_and_meaning():
    result = invoke("keys")
    assert result.exit_code == 0, result.output
    listed = [line.split(" (", 1)[0].strip() for line in result.output.splitlines()]
    assert sorted(listed) == sorted(config_io.FIELDS)  # every key, once
    for spec in config_io.describe().values():
        assert spec.meaning, spec.name
    assert "  lr (float, > 0; default 0.001): " in result.output
    assert '  partition ("iid" | "dirichlet" | "family"; default "dirichlet"): ' in result.output
    assert "may change on resume" in invoke("keys", "rounds").output
    assert "may change on resume" not in invoke("keys", "lr").output
    one_line_error(invoke("keys", "learning_rate"), "did you mean 'lr'?")


# Whatever the command, these must answer without torch, transformers or peft: they are what a user types first.
QUICK = {
    "help": ["--help"],
    "run help": ["run", "--help"],
    "methods": ["methods"],
    "keys": ["keys"],
    "a bad value": ["run", "--set", "lr=abc"],
    "an unknown key": ["run", "--set", "learning_rate=1"],
    "an unknown method": ["run", "--method", "fedmomentm"],
    "a run's plan": ["run", "--dry-run", "--model", "tiny", "--set", "families=gcd", "--set", "train_per_family=4"],
    "compare's plan": ["compare", "--dry-run", "--methods", "fedit,fedmomentum", "--model", "tiny",
                       "--set", "families=gcd", "--set", "train_per_family=4"],
}
HEAVY = ("torch", "transformers", "peft")


def _modules_after(args, cwd, extra_env=None):
    """Run the command in a fresh interpreter; its exit status, stderr and which heavy modules it had imported."""
    import subprocess
    import sys

    code = (f"import atexit, sys; atexit.register(lambda: print('LOADED', [m for m in {HEAVY!r} if m in sys.modules], "
            f"file=sys.stderr)); sys.argv = ['fedmomentum', *{list(args)!r}]; from fedmomentum.cli import main; main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=cwd,
                          env={**os.environ, **(extra_env or {})})
    loaded = [line for line in done.stderr.splitlines() if line.startswith("LOADED ")]
    return done.returncode, done.stdout, done.stderr, loaded[-1] if loaded else None


@pytest.mark.parametrize("what", list(QUICK))
def test_quick_answers_do_not_import_torch(what, tmp_path):
    code, _, stderr, loaded = _modules_after(QUICK[what], tmp_path)
    assert code in (0, 2), stderr
    assert loaded == "LOADED []", stderr


def test_a_study_plan_does_not_import_torch(tmp_path):
    study = tmp_path / "s.toml"
    study.write_text('[base]\nmodel = "tiny"\nfamilies = ["gcd"]\ntrain_per_family = 4\n'
                     '[grid]\nmethod = ["fedit", "fedmomentum"]\nseed = [0, 1]\n')
    code, stdout, stderr, loaded = _modules_after(["study", "--config", str(study), "--dry-run"], tmp_path)
    assert code == 0 and loaded == "LOADED []", stderr
    assert "2 cells, 4 runs into" in stdout and "seed 1: " in stdout and "would start" in stdout
    assert not (tmp_path / "runs").exists()


# --- --dry-run ---------------------------------------------------------------------------------------------------


def _dry_run(*args):
    result = invoke(*args, "--dry-run")
    assert result.exit_code == 0, result.output
    text = result.output
    end = text.index("\n}\n") + 2
    return json.loads(text[:end]), text[end:].strip().splitlines()


def test_dry_run_prints_the_config_and_the_plan_without_training(tmp_path):
    out = tmp_path / "run"
    config, plan = _dry_run("run", *SMALL, "--rounds", "2", "--out", out)
    assert config["rounds"] == 2 and config["families"] == ["basic_arithmetic"] and config["out"] == str(out)
    assert not out.exists()  # nothing written
    rows = dict(line.split(None, 1) for line in plan)
    assert rows["rounds"].startswith("2, 2 of 2 clients a round")
    assert rows["examples"].startswith("4 training (dirichlet): client-0 ")  # train_per_family=4, one family
    assert rows["held"].startswith("out    2: basic_arithmetic 2")

    # the bytes it announces are the run's own
    result = invoke("run", *SMALL, "--rounds", "2", "--out", out)
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    up = metrics[0]["uplink_bytes"] / 1e6
    assert f"uplink {up:.2f} MB" in rows["per"]
    bound = float(rows["per"].split("downlink ≤ ")[1].split(" MB")[0])
    assert all(row["downlink_bytes"] / 1e6 <= bound + 0.005 for row in metrics)


def test_dry_run_of_a_resume_shows_the_resumed_config_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert invoke("run", *SMALL, "--out", out).exit_code == 0
    before = contents(out)
    config, plan = _dry_run("run", "--resume", out, "--rounds", "3")
    assert config["rounds"] == 3 and config["out"] == str(out) and plan[-1] == f"out         {out}"
    assert contents(out) == before


# --- what a run says at its end, and when it is stopped ---------------------------------------------------------


def test_a_run_ends_saying_where_everything_is_and_how_to_load_it(tmp_path):
    out = tmp_path / "run"
    result = invoke("run", *SMALL, "--out", out, "--method", "flora", "--export-merged")
    assert result.exit_code == 0, result.output
    assert "{\n" not in result.output  # no JSON dump
    lines = result.output.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("done: 1 rounds of flora"))
    tail = "\n".join(lines[start:])
    for name in ("summary.json", "metrics.jsonl", "curves.png", "adapter", "base", "merged",
                 "adapter_for_original_base"):
        assert str(out / name) in tail and (out / name).exists(), name
    code = [line[9:] for line in lines[start:] if line.startswith(("load it  ", "         model ="))]
    assert len(code) == 2 and code[1].startswith("model = ")
    scope: dict = {}
    exec("\n".join(code), scope)  # the printed lines load the result
    from peft import PeftModel

    assert isinstance(scope["model"], PeftModel)


def test_a_run_on_an_unchanged_backbone_loads_from_the_tiny_model(tmp_path):
    result = invoke("run", *SMALL, "--out", tmp_path / "run", "--method", "fedit")
    assert result.exit_code == 0, result.output
    code = [line[9:] for line in result.output.splitlines() if line.startswith(("load it  ", "         model ="))]
    assert "tiny_model(0)[0]" in code[1]
    scope: dict = {}
    exec("\n".join(code), scope)
    assert scope["model"].active_adapter == "default"


def test_sigterm_stops_a_run_like_ctrl_c(tmp_path, monkeypatch):
    """A job scheduler's SIGTERM in round 2: exit status 143, the checkpoint of round 1 intact, the line says how to
    continue, and the continued run finishes."""
    import signal

    out = tmp_path / "run"
    evaluate, calls = driver.evaluate, []

    def terminated_in_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # round 0 (before training), round 1, then round 2
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(driver, "evaluate", terminated_in_round_2)
        result = invoke("run", *SMALL, "--rounds", "3", "--out", out)
    assert result.exit_code == 143 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines()[-1] == (f"interrupted by SIGTERM; continue with "
                                                      f"`fedmomentum run --resume {out}`")
    assert checkpoint.load(out / driver.CHECKPOINT)[0].rounds_done == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the command's only
    result = invoke("run", "--resume", out)
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


@pytest.mark.slow
def test_sigterm_to_the_installed_command(tmp_path):
    """The real thing: SIGTERM sent to a running ``fedmomentum run`` process once it has a checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    script = shutil.which("fedmomentum", path=os.path.dirname(sys.executable))
    process = subprocess.Popen([script, "run", *SMALL, "--rounds", "200", "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / driver.CHECKPOINT).is_file() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == f"interrupted by SIGTERM; continue with `fedmomentum run --resume {out}`"
    assert checkpoint.load(out / driver.CHECKPOINT)[0].rounds_done >= 1


# --- typed config --------------------------------------------------------------------------------------------


def test_values_from_files_and_flags_get_their_types(tmp_path):
    """YAML 1.1 reads 5e-4 as text, TOML keeps "2" text, --set gives text: all reach the run as numbers, booleans
    and lists; --set families=basic_arithmetic is one family, not its characters."""
    path = tmp_path / "run.yaml"
    path.write_text('weight_decay: 1e-2\nclients: "2"\nmethod_options:\n  merge_residual: "false"\n'
                    '  residual_energy: 9.9e-1\n')
    result = invoke("run", "--config", path, *SMALL, "--set", "lr=5e-4", "-o", "merge_every=2",
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["lr"] == 0.0005 and saved["weight_decay"] == 0.01 and saved["clients"] == 2
    assert saved["families"] == ["basic_arithmetic"] and saved["clients_per_round"] == 2
    assert saved["method_options"] == {"merge_residual": False, "residual_energy": 0.99, "merge_every": 2}


@pytest.mark.parametrize("plain, quoted", [
    ("client_data=examples/data/clients", 'client_data="examples/data/clients"'),
    ("client_data=examples/data/clients", "client_data='examples/data/clients'"),
    ("model=tiny", 'model="tiny"'),
    ("families=gcd", 'families=["gcd"]'),
    ("families=gcd,lcm", "families=[gcd, lcm]"),
    ("lr=5e-4", 'lr="5e-4"'),
    ("rslora=true", 'rslora="true"'),
    ("data_format=chat", 'data_format="chat"'),
    ("method_options={split: left}", "method_options={split = 'left'}"),
])
def test_set_reads_a_value_the_same_way_whatever_its_type(plain, quoted, tmp_path, monkeypatch):
    """--set and -o read a value as TOML when it is a TOML value (a quoted string is that string), else as text."""
    from fedmomentum.cli import _overrides

    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples" / "data" / "clients").mkdir(parents=True)
    for name in ("ann", "bob"):
        (tmp_path / "examples" / "data" / "clients" / f"{name}.jsonl").write_text('{"prompt": "1+1", "response": "2"}\n'
                                                                                 * 3)
    expected = config_io.from_dict(_overrides([plain], None))
    assert config_io.from_dict(_overrides([quoted], None)) == expected
    assert expected != config_io.RunConfig()


def test_method_options_read_the_same_way():
    from fedmomentum.cli import _overrides

    plain = config_io.from_dict(_overrides(None, ["split=left", "residual_energy=0.99", "merge_residual=false"]))
    quoted = config_io.from_dict(_overrides(None, ['split="left"', "residual_energy='0.99'", 'merge_residual="no"']))
    assert plain.method_options == quoted.method_options == {"split": "left", "residual_energy": 0.99,
                                                             "merge_residual": False}


def test_a_quoted_client_data_folder_runs(tmp_path):
    """The issue's case: --set 'client_data="folder"' kept the quotes and failed with `folder not found`."""
    folder = tmp_path / "clients"
    folder.mkdir()
    for name in ("ann", "bob"):
        (folder / f"{name}.jsonl").write_text('{"prompt": "1+1", "response": "2"}\n' * 3)
    config, plan = _dry_run("run", "--model", "tiny", "--set", "families=[]", "--set", f'client_data="{folder}"')
    assert config["client_data"] == str(folder) and config["clients"] == 2
    rows = dict(line.split(None, 1) for line in plan)
    assert rows["examples"] == "4 training (dirichlet): ann 2, bob 2"  # one of each file's 3 is held out
    assert rows["held"] == "out    2: ann 1, bob 1"


def test_toml_strings_are_converted(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('clients = "3"\nlr = "1e-3"\nbf16 = "no"\ntarget_modules = "q_proj, v_proj"\n'
                    '[method_options]\nmerge_residual = "false"\nmerge_every = "2"\n')
    config = config_io.load(path)
    assert (config.clients, config.lr, config.bf16, config.target_modules) == (3, 0.001, False, ["q_proj", "v_proj"])
    assert config.method_options == {"merge_residual": False, "merge_every": 2}
    assert config.clients_per_round == 3  # follows clients (default 4, at most every client)


@pytest.mark.parametrize("args, fragments", [
    (["--set", "rounds=abc"], ["rounds", "'abc'", "an integer"]),
    (["--set", "rounds=2.5"], ["rounds = 2.5", "an integer"]),
    (["--set", "lr=fast"], ["lr", "'fast'", "a finite number"]),
    (["--set", "lr=nan"], ["lr = nan", "a finite number"]),
    (["--set", "rslora=perhaps"], ["rslora", "'perhaps'", "true or false"]),
    (["--set", "method_options=[1, 2]"], ["method_options", "a mapping"]),
    (["-o", "residual_energy=abc"], ["residual_energy", "'abc'", "a finite number"]),
    (["-o", "merge_residual=maybe"], ["merge_residual", "'maybe'", "true or false"]),
    (["-o", "merge_every=1.5"], ["merge_every = 1.5", "an integer"]),
    (["-o", "split=lft"], ["split = 'lft'", "one of 'balanced', 'left'", "did you mean 'left'?"]),
    (["-o", "residual_energy=0"], ["fedmomentum option residual_energy must be in (0, 1], got 0"]),
    (["--rounds", "abc"], ["--rounds", "'abc'", "integer"]),
    (["--bogus"], ["--bogus"]),
    (["--set", "lr"], ["--set expects key=value"]),
    (["--method", "fedavg"], ["unknown method 'fedavg' (did you mean 'fedit'?)"]),
    (["--method", "fedmomentm"], ["unknown method 'fedmomentm' (did you mean 'fedmomentum'?)"]),
    (["-o", "residual_energi=0.9"], ["unknown option(s) residual_energi (did you mean residual_energy?)"]),
    (["-o", "tau=0.9"], ["tau (did you mean residual_energy?)"]),
    (["--set", "local_step=3"], ["'local_step' (did you mean 'local_steps'?)"]),
    (["--set", "learning_rate=1e-3"], ["'learning_rate' (did you mean 'lr'?)"]),
    (["--set", "num_rounds=3"], ["'num_rounds' (did you mean 'rounds'?)"]),
    (["--set", "partition=iiid"], ["partition = 'iiid'", "did you mean 'iid'?"]),
    (["--clients", "2", "--clients-per-round", "5"], ["clients_per_round"]),
    (["--set", "eval_per_family=0"], ["eval_per_family"]),
    (["--set", "lr=-1"], ["lr must be > 0"]),
    (["--model", "/no/such/folder"], ["/no/such/folder"]),
])
def test_bad_input_is_one_line(args, fragments, tmp_path):
    one_line_error(invoke("run", *SMALL, "--out", tmp_path / "x", *args), *fragments)
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_bad_values_in_a_config_file_are_one_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('clients = "two"\n')
    one_line_error(invoke("run", "--config", path), "clients", "'two'", "an integer")
    path.write_text("rounds = [\n")
    one_line_error(invoke("run", "--config", path), "cannot parse config file")
    one_line_error(invoke("run", "--config", tmp_path / "missing.toml"), "config file not found")


def test_clients_per_round_follows_clients(tmp_path):
    """--clients 3 alone used to fail (the per-round default was 4); now 3 of 3 train, a given value is kept."""
    assert config_io.load(None, {"clients": "3"}).clients_per_round == 3
    assert config_io.load(None, {"clients": "16"}).clients_per_round == 4
    assert config_io.load(None, {"clients": 3, "clients_per_round": 2}).clients_per_round == 2
    assert config_io.RunConfig().replace(clients=2).clients_per_round == 2
    assert config_io.RunConfig(clients=8, clients_per_round=3).replace(clients=6).clients_per_round == 3


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_one_line(tmp_path):
    one_line_error(invoke("run", *SMALL, "--device", "cuda", "--out", tmp_path / "x"), "'cuda'", "no CUDA device")
    one_line_error(invoke("run", *SMALL, "--device", "gpu", "--out", tmp_path / "x"), "cpu, cuda or cuda:N")


def test_a_model_folder_without_weights_is_one_line(tmp_path, model_dir):
    folder = tmp_path / "no-weights"
    shutil.copytree(model_dir, folder)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    one_line_error(invoke("run", *SMALL, "--model", folder, "--out", tmp_path / "x"), str(folder))


def test_out_naming_a_file_or_a_path_through_one_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    one_line_error(invoke("run", *SMALL, "--out", tmp_path / "file"), "is a file")
    one_line_error(invoke("run", *SMALL, "--out", tmp_path / "file" / "run"), str(tmp_path / "file"))


def test_a_non_finite_gradient_is_one_line(tmp_path):
    line = one_line_error(invoke("run", *SMALL, "--local-steps", "3", "--set", "lr=1e30", "--out", tmp_path / "x"))
    assert "not finite" in line and "lower lr" in line


def test_a_full_disk_names_the_file_and_resume_continues(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_file, calls = checkpoint.save_file, []

    def disk_full_in_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return save_file(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_file", disk_full_in_round_2)
        line = one_line_error(invoke("run", *SMALL, "--rounds", "2", "--out", out))
    assert str(out / "checkpoint.safetensors") in line and "disk is full" in line
    assert f"fedmomentum run --resume {out}" in line
    assert checkpoint.load(out / driver.CHECKPOINT)[0].rounds_done == 1
    result = invoke("run", "--resume", out)  # the disk has room again: round 2 is trained again, round 1 is kept
    assert result.exit_code == 0, result.output
    assert "resuming after round 1" in result.output
    assert [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_an_unwritable_export_names_the_folder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # no file name, as a failing write() gives

    monkeypatch.setattr(driver, "export_adapter", refuse)
    line = one_line_error(invoke("run", *SMALL, "--out", tmp_path / "run"))
    assert str(tmp_path / "run" / "adapter") in line and "Permission denied" in line
    assert not (tmp_path / "run" / "adapter").exists() and not (tmp_path / "run" / ".exports.tmp").exists()


def test_a_bug_is_a_short_traceback_without_locals(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        # a local variable that must not be printed
        secret = "a training example"  # noqa: F841
        raise KeyError("oops")

    monkeypatch.setattr(driver, "evaluate", broken)
    result = invoke("run", *SMALL, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert "Traceback" in result.output and "internal error" in result.output and "KeyError" in result.output
    assert "a training example" not in result.output and len(result.output.splitlines()) < 40


def test_ctrl_c_says_how_to_continue(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "evaluate", interrupt)
    result = invoke("run", *SMALL, "--out", tmp_path / "run")
    assert result.exit_code == 130 and "Traceback" not in result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"interrupted; continue with `fedmomentum run --resume {tmp_path / 'run'}`"


# --- no run is overwritten -----------------------------------------------------------------------------------


def test_a_run_folder_is_never_overwritten_without_asking(tmp_path):
    out = tmp_path / "run"
    assert invoke("run", *SMALL, "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    one_line_error(invoke("run", *SMALL, "--out", out), str(out), "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before

    (out / "merged").mkdir()  # an export of the old run: --overwrite clears the folder whole
    (out / "merged" / "stale.txt").write_text("old")
    result = invoke("run", *SMALL, "--out", out, "--overwrite", "--method", "fedit")
    assert result.exit_code == 0, result.output
    assert not (out / "merged").exists() and not (out / "base").exists()  # fedit changes no backbone
    assert json.loads((out / "config.json").read_text())["method"] == "fedit"

    one_line_error(invoke("run", *SMALL, "--out", out, "--resume", out, "--overwrite"), "one of them")


def test_overwrite_refuses_a_folder_that_holds_no_run(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    one_line_error(invoke("run", *SMALL, "--out", tmp_path, "--overwrite"), "holds files but no run")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def contents(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_never_deletes_a_model_folder(model_dir, tmp_path):
    """An HF model folder has a config.json too (of model keys): it is not a run."""
    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    (folder / "notes.md").write_text("my notes")
    before = contents(folder)
    one_line_error(invoke("run", *SMALL, "--out", folder, "--overwrite"), "--overwrite refused", "no run")
    assert contents(folder) == before


@pytest.mark.parametrize("where", ["cwd", "parent"])
def test_overwrite_never_deletes_the_working_directory_or_a_folder_above_it(tmp_path, monkeypatch, where):
    """Even a folder that looks like a run (a run's config.json and metrics.jsonl) is kept when it is the working
    directory or holds it."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "data.csv").write_text("a,b\n1,2\n")
    (project / "config.json").write_text(json.dumps({"method": "fedit", "rounds": 1, "lora_r": 2, "clients": 2}))
    (project / "metrics.jsonl").write_text("{}\n")
    monkeypatch.chdir(project if where == "cwd" else project / "src")
    before = contents(project)
    reason = "it is the working directory" if where == "cwd" else "the working directory is inside it"
    one_line_error(invoke("run", *SMALL, "--out", project, "--overwrite"), "--overwrite refused", reason)
    assert contents(project) == before


def test_overwrite_never_deletes_the_home_folder(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    one_line_error(invoke("run", *SMALL, "--out", home, "--overwrite"), "it is the home folder")
    assert (home / ".bashrc").read_text() == "mine"


def test_a_run_that_stopped_before_its_first_round_resumes_from_scratch(tmp_path):
    out = tmp_path / "run"
    one_line_error(invoke("run", *SMALL, "--local-steps", "3", "--set", "lr=1e30", "--out", out))
    assert (out / "config.json").is_file() and not (out / driver.CHECKPOINT).exists()
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**saved, "lr": 0.001}))  # the user fixes the setting
    result = invoke("run", "--resume", out)
    assert result.exit_code == 0, result.output
    assert [row["round"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0, 1]


# --- resume --------------------------------------------------------------------------------------------------


def test_resume_takes_only_what_may_change_and_says_what_differs(tmp_path):
    out = tmp_path / "run"
    assert invoke("run", *SMALL, "--out", out).exit_code == 0
    first = checkpoint.load(out / driver.CHECKPOINT)[1]["seconds"]

    other = tmp_path / "other.toml"
    other.write_text("lr = 0.01\nseed = 3\nrounds = 2\n")
    one_line_error(invoke("run", "--resume", out, "--config", other), "lr (0.001 → 0.01)", "seed (0 → 3)")
    one_line_error(invoke("run", "--resume", out, "--clients", "3"), "clients (2 → 3)")
    one_line_error(invoke("run", "--resume", out, "--out", tmp_path / "elsewhere"), "different folders")

    same = tmp_path / "same.toml"  # a file that agrees with the run: its rounds are taken
    same.write_text('rounds = 2\nclients = "2"\nfamilies = ["basic_arithmetic"]\n')
    result = invoke("run", "--resume", out, "--config", same)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == json.loads((out / "config.json").read_text())["rounds"] == 2
    assert summary["seconds"] > first  # the whole run, not only the resumed part

    one_line_error(invoke("run", "--resume", out, "--rounds", "1"), "done 2 rounds", "at least 2")
    assert json.loads((out / "config.json").read_text())["rounds"] == 2

    edited = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**edited, "seed": 5}))
    one_line_error(invoke("run", "--resume", out, "--rounds", "3"), "seed (0 → 5)")
    one_line_error(invoke("run", "--resume", tmp_path / "nothing"), "nothing to resume")


def test_resume_replaces_the_exports_whole(tmp_path):
    out = tmp_path / "run"
    assert invoke("run", *SMALL, "--out", out, "--export-merged", "--method", "flora").exit_code == 0
    assert (out / "merged").is_dir() and (out / "base").is_dir()
    result = invoke("run", "--resume", out, "--rounds", "2", "--set", "export_merged=false")
    assert result.exit_code == 0, result.output
    assert not (out / "merged").exists()  # no merged model of round 1 beside the round-2 adapter
    text = (out / "adapter" / "adapter_config.json").read_text()
    adapter = json.loads(text)
    assert adapter["base_model_name_or_path"] == "../base"  # relative to the adapter: no path of this machine
    assert (out / "adapter" / adapter["base_model_name_or_path"]).resolve() == (out / "base").resolve()
    assert str(tmp_path) not in text
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_a_run_writes_files_others_can_read(tmp_path):
    """The checkpoint and every record get the usual permissions (0666 less the umask), as any file would."""
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert invoke("run", *SMALL, "--out", out).exit_code == 0
    finally:
        os.umask(old)
    for name in (driver.CHECKPOINT, "metrics.jsonl", "summary.json", "config.json", "curves.png"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


# --- compare -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("methods, fragment", [("", "names no method"), (" , ", "names no method"),
                                               ("fedit,fedit", "twice"), ("fedit,fedavg", "unknown method")])
def test_compare_refuses_bad_method_lists(methods, fragment, tmp_path):
    one_line_error(invoke("compare", "--methods", methods, "--out", tmp_path / "cmp", *SMALL), fragment)


def test_run_resume_and_compare_on_a_local_model(model_dir, tmp_path):
    small = list(SMALL)
    small[small.index("--model") + 1] = str(model_dir)
    root = tmp_path / "cmp"
    result = invoke("compare", "--methods", "fedit,fedmomentum", "--out", root, "--target-loss", "100", *small)
    assert result.exit_code == 0, result.output
    assert "| fedit |" in result.output and "| fedmomentum |" in result.output
    assert (root / "compare.png").stat().st_size > 1000
    assert (root / "compare.csv").read_text().startswith("method,")

    # a second compare into the same folder is refused up front, before any method runs
    before = (root / "fedit" / "metrics.jsonl").read_text()
    one_line_error(invoke("compare", "--methods", "flora,fedit", "--out", root, *small), "--resume")
    assert not (root / "flora").exists()

    # --resume keeps finished methods and runs only what is missing
    result = invoke("compare", "--methods", "fedit,flora", "--out", root, "--resume", *small)
    assert result.exit_code == 0, result.output
    assert (root / "fedit" / "metrics.jsonl").read_text() == before
    assert "| flora |" in result.output and (root / "flora" / "summary.json").is_file()

    # ... but not with other settings
    one_line_error(invoke("compare", "--methods", "fedit", "--out", root, "--resume", *small, "--seed", "4"),
                   "seed (0 → 4)")


def test_compare_gives_every_method_the_options_of_o(model_dir, tmp_path):
    small = list(SMALL)
    small[small.index("--model") + 1] = str(model_dir)
    root = tmp_path / "cmp"
    one_line_error(invoke("compare", "--methods", "fedmomentum,fedit", "--out", root, "-o", "merge_every=2", *small),
                   "unknown option(s) merge_every for method 'fedit'")
    assert not (root / "fedmomentum").exists()  # refused before any method ran
    result = invoke("compare", "--methods", "fedit,flora", "--out", root, "-o", "server_opt=avgm", "-o",
                    "server_momentum=0.5", *small)
    assert result.exit_code == 0, result.output
    for name in ("fedit", "flora"):
        saved = json.loads((root / name / "config.json").read_text())["method_options"]
        assert saved == {"server_opt": "avgm", "server_momentum": 0.5}
        assert any(slot.startswith("opt_m") for slot in checkpoint.load(root / name / driver.CHECKPOINT)[0].method)


def test_the_installed_command_prints_one_line(tmp_path):
    """The console script itself (a subprocess): a bad value is one line on stderr and exit status 2."""
    import subprocess
    import sys

    script = shutil.which("fedmomentum", path=os.path.dirname(sys.executable))
    result = subprocess.run([script, "run", "--set", "lr=abc", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == "error: config key lr = 'abc': expected a finite number"
