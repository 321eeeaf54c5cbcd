"""Users' data: JSONL, JSON arrays, Parquet and save_to_disk folders in prompt-response, Alpaca and chat form;
one error per bad record naming the file and the line (or row); held-out slices; client_data folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fedmomentum import data
from fedmomentum.build import client_examples, client_ids
from fedmomentum.config import RunConfig, from_dict
from fedmomentum.data import Example, Turn

QA = [("Capital of France?", "Paris"), ("2 + 2 =", "4"), ("Opposite of hot?", "cold"), ("Sky colour?", "blue")]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2 + 2 ="},
        {"role": "assistant", "content": "It is 4.\n#### 4"}]
RECORDS = {
    "prompt-response": [{"prompt": q, "response": a} for q, a in QA],
    "alpaca": [{"instruction": q, "input": "" if i % 2 else "Answer in one word.", "output": a}
               for i, (q, a) in enumerate(QA)],
    "chat": [{"messages": CHAT}, {"messages": [{"role": "user", "content": "Sky colour?"},
                                               {"role": "assistant", "content": "blue"}]}],
}
EXPECTED = {
    "prompt-response": [Example(q, a, "f", a) for q, a in QA],
    "alpaca": [Example(q if i % 2 else f"{q}\n\nAnswer in one word.", a, "f", a) for i, (q, a) in enumerate(QA)],
    "chat": [Example("2 + 2 =", "It is 4.\n#### 4", "f", "4",
                     context=(Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello!"))),
             Example("Sky colour?", "blue", "f", "blue")],
}


def write(path: Path, records: list[dict]) -> Path:
    """``records`` in the file type ``path``'s suffix names (a folder without one: datasets' save_to_disk)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=2))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    else:
        datasets = pytest.importorskip("datasets")
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


KINDS = ["f.jsonl", "f.json", "f.parquet", "f"]


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("form", list(RECORDS))
def test_every_file_kind_and_form_is_read_and_detected(tmp_path, name, form):
    path = write(tmp_path / name, RECORDS[form])
    assert data.load_examples(path) == EXPECTED[form]
    assert data.load_examples(path, format=form) == EXPECTED[form]
    assert {e.family for e in data.load_examples(path, family="mine")} == {"mine"}


def test_a_saved_dataset_dict_reads_its_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    train = datasets.Dataset.from_list(RECORDS["alpaca"])
    datasets.DatasetDict({"train": train, "test": train.select([0])}).save_to_disk(str(tmp_path / "dd"))
    assert data.load_examples(tmp_path / "dd") == [e.__class__(e.prompt, e.response, "dd", e.answer)
                                                   for e in EXPECTED["alpaca"]]
    datasets.DatasetDict({"a": train, "b": train}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match=r"two: a saved DatasetDict without a 'train' split \(splits: a, b\)"):
        data.load_examples(tmp_path / "two")


def test_records_may_carry_family_and_answer(tmp_path):
    path = write(tmp_path / "qa.jsonl", [{"instruction": "6*7?", "output": "It is 42", "answer": 42, "family": "m"},
                                         {"instruction": "x", "input": None, "output": "y\n#### 7"}])
    first, second = data.load_examples(path)
    assert (first.family, first.answer, second.family, second.answer, second.prompt) == ("m", "42", "qa", "7", "x")


# A bad record in each file kind: the error names the file, the line (JSON) or row (Parquet, datasets) and what.
BAD = {"prompt-response": {"prompt": "a"}, "alpaca": {"instruction": "a", "output": None},
       "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}}
BAD_SAYS = {"prompt-response": "missing field 'response'", "alpaca": "field 'output' must be a string, got null",
            "chat": "message 2: 'role' must be one of system, user, assistant, got 'bot'"}
WHERE = {"f.jsonl": r"f\.jsonl:3: ", "f.json": r"f\.json:5 \(record 3\): ", "f.parquet": r"f\.parquet: row 3: ",
         "f": r"f: row 3: "}


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("form", list(BAD))
def test_a_bad_record_is_one_error_naming_file_and_line(tmp_path, name, form):
    good = RECORDS[form][:2]
    if name in ("f.parquet", "f") and form == "prompt-response":
        bad = {"prompt": "a", "response": None}  # a table has every column: a null stands in for a missing field
        says = "field 'response' must be a string, got null"
    else:
        bad, says = BAD[form], BAD_SAYS[form]
    path = write(tmp_path / name, [*good, bad])
    if name == "f.json":  # the bad record starts on line 5
        path.write_text("[\n" + ",\n".join(json.dumps(r) for r in good) + ",\n\n" + json.dumps(bad) + "\n]\n")
    with pytest.raises(ValueError, match=WHERE[name] + re.escape(says)) as error:
        data.load_examples(path)
    assert "\n" not in str(error.value)


# Syntax, encoding and shape errors of JSON files: one line naming the file and the line.
@pytest.mark.parametrize("name, content, says", [
    ("x.jsonl", b'{"prompt": "a", "response": "b"}\n\n{"prompt": "a", \n', r"x\.jsonl:3: invalid JSON"),
    ("x.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n',
     r"x\.jsonl:2: not valid UTF-8 \(byte 0xe9 at byte 16 of the line\)"),
    ("x.jsonl", b'{"prompt": "a", "response": "b"}\n["prompt"]\n', r"x\.jsonl:2: expected a JSON object, got list"),
    ("x.jsonl", b'{"question": "a", "answer": "b"}\n',
     r"x\.jsonl:1: cannot tell the data format from the fields \(question, answer\)"),
    ("x.jsonl", b'{"prompt": "a", "response": "  "}\n', r"x\.jsonl:1: field 'response' is empty"),
    ("x.jsonl", b"\n\n", r"x\.jsonl: no examples"),
    ("x.json", b'[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a" "response": "b"}\n]',
     r"x\.json:3: invalid JSON"),
    ("x.json", b'[\n  {"prompt": "a", "response": "b"}\n  {"prompt": "c"}\n]',
     r"x\.json:3: invalid JSON: expected ',' or ']'"),
    ("x.json", b'[\n{"prompt": "a", "response": "b"},\n\n{"prompt": "\xff", "response": "b"}]',
     r"x\.json:4: not valid UTF-8 \(byte 0xff at byte 13 of the line\)"),
    ("x.json", b'[{"prompt": "a", "response": "b"}] []', r"x\.json:1: invalid JSON: extra data after the array"),
    ("x.json", b'{\n  "data": [{"prompt": "a", "response": "b"}]\n}', r"x\.json: holds one JSON object, not records"),
    ("x.json", b'"text"', r"x\.json: expected a JSON array of records"),
    ("x.json", b"[]", r"x\.json: no examples"),
])
def test_json_file_errors(tmp_path, name, content, says):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=says):
        data.load_examples(path)


def test_json_lines_in_a_json_file_and_a_byte_order_mark(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n')
    assert [e.prompt for e in data.load_examples(path)] == ["a", "c"]


@pytest.mark.parametrize("messages, says", [
    ([{"role": "user", "content": "a"}], "the last message must be the assistant's (it is the user's)"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
     "after any system messages, a conversation must start with a user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "assistant", "content": "c"}],
     "the last assistant message must follow a user message"),
    ([{"role": "user", "content": 5}, {"role": "assistant", "content": "b"}], "message 1: 'content' must be a string"),
    (["hi"], "message 1 must be an object with 'role' and 'content', got str"),
    ([], "field 'messages' must be a non-empty list"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "the last assistant message is empty"),
])
def test_chat_errors(tmp_path, messages, says):
    path = write(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": messages}])
    with pytest.raises(ValueError, match=r"c\.jsonl:2: " + re.escape(says)):
        data.load_examples(path)


def test_a_given_format_is_enforced_and_unknown_files_are_refused(tmp_path):
    path = write(tmp_path / "p.jsonl", RECORDS["prompt-response"])
    with pytest.raises(ValueError, match=r"p\.jsonl:1: missing field 'instruction'"):
        data.load_examples(path, format="alpaca")
    with pytest.raises(ValueError, match="unknown data format 'sharegpt'"):
        data.load_examples(path, format="sharegpt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.txt: unknown kind of data file '\.txt'"):
        data.load_examples(tmp_path / "notes.txt")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot read it as Parquet"):
        data.load_examples(tmp_path / "broken.parquet")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_examples(tmp_path / "nope.jsonl")


def test_a_folder_is_read_file_by_file(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write(folder / "b.parquet", RECORDS["alpaca"])
    write(folder / "a.jsonl", RECORDS["prompt-response"])
    (folder / ".hidden.txt").write_text("skipped")
    assert data.data_sources(folder) == [folder / "a.jsonl", folder / "b.parquet"]
    examples = data.load_examples(folder)
    assert [e.family for e in examples] == ["a"] * 4 + ["b"] * 4
    (folder / "README.md").write_text("not data")
    with pytest.raises(ValueError, match=r"mixed: cannot read 'README\.md'"):
        data.load_examples(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="the folder holds no data files"):
        data.load_examples(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- held-out slices


@pytest.mark.parametrize("total, fraction, limit, count", [
    (100, 0.1, 8, 8), (50, 0.1, 8, 5), (5, 0.1, 8, 1), (1, 0.5, 8, 0), (10, 0.0, 8, 0), (3, 0.9, 8, 2),
    (10, 0.5, 0, 0),
])
def test_held_out_count(total, fraction, limit, count):
    assert data.held_out_count(total, fraction, limit) == count


def test_split_held_out_is_seeded_disjoint_and_in_order():
    examples = [Example(str(i), str(i), "f", str(i)) for i in range(40)]
    train, held = data.split_held_out(examples, 0.2, 8, seed=0, name="f.jsonl")
    assert len(held) == 8 and sorted(train + held, key=lambda e: int(e.prompt)) == examples
    assert train == sorted(train, key=lambda e: int(e.prompt)) and held == sorted(held, key=lambda e: int(e.prompt))
    assert data.split_held_out(examples, 0.2, 8, seed=0, name="f.jsonl") == (train, held)
    assert data.split_held_out(examples, 0.2, 8, seed=1, name="f.jsonl")[1] != held
    assert data.split_held_out(examples, 0.2, 8, seed=0, name="g.jsonl")[1] != held
    with pytest.raises(ValueError, match="held-out fraction"):
        data.split_held_out(examples, 1.0, 8, seed=0)


# ----------------------------------------------------------------------------------------------- runs on users' data


def _qa_records(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"{tag} question {i}?", "response": f"{tag} answer {i}"} for i in range(n)]


def test_data_only_training_holds_out_a_slice_of_each_file(tmp_path):
    write(tmp_path / "a.jsonl", _qa_records(30, "a"))
    write(tmp_path / "b.parquet", _qa_records(10, "b"))
    config = RunConfig(families=[], data=[str(tmp_path / "a.jsonl")], jsonl=[str(tmp_path / "b.parquet")],
                       clients=3, clients_per_round=2, eval_per_family=4, eval_fraction=0.2, partition="iid")
    config.validate()
    parts, held_out = client_examples(config)
    train = [e for part in parts for e in part]
    assert {f: len(v) for f, v in held_out.items()} == {"b": 2, "a": 4}
    assert len(train) == 40 - 6 and not set(train) & {e for v in held_out.values() for e in v}
    assert set(train) | {e for v in held_out.values() for e in v} == set(
        data.load_examples(tmp_path / "a.jsonl") + data.load_examples(tmp_path / "b.parquet"))
    assert client_examples(config) == (parts, held_out)  # seeded
    with pytest.raises(ValueError, match="no held-out examples to evaluate on"):
        client_examples(config.replace(eval_fraction=0.0))


def test_client_data_gives_each_client_its_file(tmp_path):
    folder = tmp_path / "fed"
    folder.mkdir()
    write(folder / "carol.jsonl", _qa_records(6, "c"))
    write(folder / "alice.parquet", _qa_records(9, "a"))
    write(folder / "bob.json", [{"instruction": f"b {i}", "output": f"b{i}"} for i in range(3)])
    config = from_dict(dict(families=[], client_data=str(folder), clients_per_round=2, eval_fraction=0.25))
    assert config.clients == 3  # follows the folder
    config.validate()
    assert client_ids(config) == ["alice", "bob", "carol"]
    parts, held_out = client_examples(config)
    assert list(held_out) == ["alice", "bob", "carol"]
    for part, name in zip(parts, client_ids(config), strict=True):
        own = data.load_examples(data.client_sources(folder)[name])
        assert {e.family for e in part} == {name}
        assert sorted(part + held_out[name], key=own.index) == own and not set(part) & set(held_out[name])
    # With families too, the shared examples are partitioned across the same clients.
    mixed, _ = client_examples(config.replace(families=["basic_arithmetic"], train_per_family=6, eval_per_family=2))
    assert [len(m) - len(p) for m, p in zip(mixed, parts, strict=True)] == [2, 2, 2]


def test_client_data_errors(tmp_path):
    folder = tmp_path / "fed"
    folder.mkdir()
    write(folder / "a.jsonl", _qa_records(3, "a"))
    write(folder / "b.jsonl", _qa_records(3, "b"))
    with pytest.raises(ValueError, match=r"holds 2 clients but clients = 3; leave clients out"):
        from_dict(dict(client_data=str(folder), clients=3, clients_per_round=2)).validate()
    with pytest.raises(FileNotFoundError, match="client_data folder not found"):
        from_dict(dict(client_data=str(tmp_path / "nope")))
    write(folder / "a.parquet", _qa_records(3, "a"))
    with pytest.raises(ValueError, match=r"two files for client 'a' \(a\.jsonl and a\.parquet\)"):
        data.client_sources(folder)


@pytest.mark.parametrize("changes, says", [
    (dict(families=[]), "give at least one task family, data file or client_data folder"),
    (dict(data_format="csv"), "data_format = 'csv': expected one of '', 'alpaca', 'chat', 'prompt-response'"),
    (dict(eval_fraction=1.0), "eval_fraction must be in"),
    (dict(data="x.jsonl"), r"data.* a list"),  # the type check: "config key data = ...: expected a list of strings"
])
def test_config_checks_for_data(changes, says):
    with pytest.raises(ValueError, match=says):
        RunConfig(**changes).validate()


# ----------------------------------------------------------------------------------------------- from the command line

RUN = ["--model", "tiny", "--rounds", "1", "--clients-per-round", "2", "--local-steps", "1", "--set", "families=[]",
       "--set", "max_length=48", "--set", "batch_size=2", "--set", "lora_r=2", "--set", "accuracy_per_family=1",
       "--set", "max_new_tokens=2", "--set", "eval_fraction=0.25"]


def _cli(*args: str):
    from typer.testing import CliRunner

    from fedmomentum.cli import app

    return CliRunner().invoke(app, ["run", *args])


def test_cli_client_data_folder_end_to_end(tmp_path):
    folder = tmp_path / "fed"
    folder.mkdir()
    write(folder / "alice.jsonl", _qa_records(5, "a"))
    write(folder / "bob.json", [{"instruction": f"b {i}", "output": f"b{i}"} for i in range(4)])
    write(folder / "carol.parquet", [{"messages": CHAT}] * 4)
    out = tmp_path / "run"
    result = _cli(*RUN, "--set", f"client_data={folder}", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["clients"] == 3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[1]["client_ids"]) <= {"alice", "bob", "carol"} and len(rows[1]["client_ids"]) == 2
    assert {key for key in rows[1] if key.startswith(("loss/", "accuracy/"))} == {
        f"{kind}/{name}" for kind in ("loss", "accuracy") for name in ("alice", "bob", "carol")}
    result = _cli(*RUN, "--set", f"client_data={folder}", "--clients", "4", "--out", str(tmp_path / "bad"))
    assert result.exit_code == 2 and "holds 3 clients but clients = 4" in result.output
    assert "Traceback" not in result.output


def test_cli_jsonl_only_training(tmp_path):
    path = write(tmp_path / "qa.jsonl", _qa_records(12, "q"))
    out = tmp_path / "run"
    result = _cli(*RUN, "--clients", "2", "--set", f"jsonl=[{path}]", "--out", str(out))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["eval_loss"] == row["loss/qa"] for row in rows] == [True, True] and "accuracy/qa" in rows[1]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    result = _cli(*RUN, "--clients", "2", "--set", f"data=[{bad}]", "--out", str(tmp_path / "bad"))
    assert result.exit_code == 2 and "bad.jsonl:2: not valid UTF-8" in result.output
