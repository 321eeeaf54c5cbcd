"""Data: reasoning-gym families, JSONL, GSM8K filtering, scoring, partitions, tokenisation."""

from __future__ import annotations

import copy
import json
from collections import Counter

import numpy as np
import pytest
import torch

from fedmomentum import data
from fedmomentum.data import Example

# ----------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", data.FAMILIES)
def test_family_scores_own_answer(family):
    examples = data.load_family(family, 12, seed=1)
    assert len(examples) == 12
    assert all(ex.family == family and ex.prompt and ex.response and ex.answer for ex in examples)
    assert all(ex.entry is not None and ex.entry["answer"].strip() == ex.answer for ex in examples)
    for i, ex in enumerate(examples):
        assert data.score(ex, ex.response) == 1.0, (ex.response, ex.answer)
        assert data.score(ex, ex.response + "<|im_end|>\nmore text 12345") == 1.0
        assert data.score(ex, f"The answer is {ex.answer}.") == 1.0
        wrong = next(o.answer for o in examples[i + 1 :] + examples[:i] if o.answer != ex.answer)
        assert data.score(ex, wrong) < 1.0
        assert 0.0 <= data.score(ex, "no idea") < 1.0


def test_required_families_present():
    assert {"basic_arithmetic", "chain_sum", "gsm_symbolic"} <= set(data.FAMILIES)
    assert len(data.FAMILIES) >= 5


def test_gsm_symbolic_response_is_solution_ending_in_answer():
    for ex in data.load_family("gsm_symbolic", 30, seed=4):
        lines = ex.response.splitlines()
        assert len(lines) >= 2
        assert lines[-1] == f"#### {ex.answer}"  # "1638.0" in a template is written as the exact answer
    assert data.load_family("chain_sum", 3, seed=0)[0].response == data.load_family("chain_sum", 3, seed=0)[0].answer


def test_load_family_determinism_and_errors():
    a = [ex.prompt for ex in data.load_family("basic_arithmetic", 10, seed=3)]
    b = [ex.prompt for ex in data.load_family("basic_arithmetic", 10, seed=3)]
    c = [ex.prompt for ex in data.load_family("basic_arithmetic", 10, seed=4)]
    assert a == b and a != c
    with pytest.raises(ValueError, match="no_such_family"):
        data.load_family("no_such_family", 3, seed=0)
    assert data.load_family("gcd", 0) == []


def test_make_tasks_disjoint():
    # prime_factorization draws from ~1,000 numbers, so unfiltered seeds would overlap.
    families = ["prime_factorization", "chain_sum"]
    train, held_out = data.make_tasks(families, train_size=300, eval_size=60, seed=0)
    assert Counter(ex.family for ex in train) == {f: 300 for f in families}
    assert Counter(ex.family for ex in held_out) == {f: 60 for f in families}
    train_prompts = {ex.prompt for ex in train}
    assert not train_prompts & {ex.prompt for ex in held_out}
    assert len({ex.prompt for ex in held_out}) == len(held_out)
    # The eval set does not depend on train_size, and train does not depend on eval_size.
    train2, held_out2 = data.make_tasks(families, train_size=10, eval_size=5, seed=0)
    assert [ex.prompt for ex in train2] == [ex.prompt for ex in data.by_family(train)["prime_factorization"][:10]] + [
        ex.prompt for ex in data.by_family(train)["chain_sum"][:10]
    ]
    assert set(data.by_family(held_out2)) == set(families)
    with pytest.raises(ValueError):
        data.make_tasks(["gcd", "gcd"], 2, 2)
    with pytest.raises(ValueError, match="too few distinct"):
        data.make_tasks(
            ["prime_factorization"], 2, 2, configs={"prime_factorization": {"min_value": 2, "max_value": 4}}
        )


# ----------------------------------------------------------------------------------------------- scoring


def _gsm(answer: str) -> Example:
    return Example(prompt="q", response=f"work\n#### {answer}", family=data.GSM8K_FAMILY, answer=answer)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("She makes 9 * 2 = 18 dollars.\n#### 18", 1.0),
        ("#### 1,234<|im_end|>", 0.0),
        ("The answer is $18.", 1.0),
        ("9 * 2 = 18", 1.0),
        ("18 dollars... no wait, 19", 0.0),
        ("#### 18.00", 1.0),
        ("", 0.0),
        ("#### 17\n<|im_end|> #### 18", 0.0),
    ],
)
def test_gsm8k_score(completion, expected):
    assert data.score(_gsm("18"), completion) == expected


def test_extract_answer():
    assert data.extract_answer("blah\n#### 42\n") == "42"
    assert data.extract_answer("so <answer> 7/9 </answer> done") == "7/9"
    assert data.extract_answer("Thus the final answer is 2 × 3.") == "2 × 3"
    assert data.extract_answer("line one\n 15 \n<|im_end|>\nnoise") == "15"
    assert data.score(_gsm("1234"), "#### 1,234") == 1.0


def test_jsonl_score_exact_match(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "Capital of France?", "response": "Paris"}) + "\n")
    (ex,) = data.load_jsonl(path)
    assert data.score(ex, " paris. ") == 1.0
    assert data.score(ex, "Lyon") == 0.0


# ----------------------------------------------------------------------------------------------- JSONL


def test_load_jsonl(tmp_path):
    path = tmp_path / "my_task.jsonl"
    rows = [
        {"prompt": "2+2?", "response": "It is 4.\n#### 4"},
        {"prompt": "Name?", "response": "Bob", "family": "names", "answer": "bob"},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    a, b = data.load_jsonl(path)
    assert (a.prompt, a.response, a.family, a.answer) == ("2+2?", "It is 4.\n#### 4", "my_task", "4")
    assert (b.family, b.answer) == ("names", "bob")
    (c, d) = data.load_jsonl(path, family="fixed")
    assert c.family == d.family == "fixed"

    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"question": "Q", "solution": "S"}) + "\n")
    (e,) = data.load_jsonl(other, prompt_field="question", response_field="solution")
    assert (e.prompt, e.response, e.answer) == ("Q", "S", "S")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"}\n{"prompt": oops}\n',
            r"bad\.jsonl:3: invalid JSON",
        ),
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', r"bad\.jsonl:2: missing field 'response'"),
        ('["prompt", "response"]\n', r"bad\.jsonl:1: expected a JSON object"),
        ('{"prompt": "a", "response": 5}\n', r"bad\.jsonl:1: field 'response' must be a string"),
        ("\n\n", r"bad\.jsonl: no examples"),
    ],
)
def test_load_jsonl_errors(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        data.load_jsonl(path)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_jsonl(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------------------------- GSM8K


def test_gsm8k_counts_and_near_duplicates():
    full = data.load_gsm8k_test(exclude_near_duplicates=False)
    assert len(full) == 1319
    assert full[0].family == "gsm8k" and full[0].answer == "18" and full[0].response.endswith("#### 18")
    assert "<<" not in full[0].response
    assert all(data.score(ex, ex.response) == 1.0 for ex in full)

    near = data.gsm8k_near_duplicates()
    assert len(near) == 100
    assert sorted(near.values()) == list(range(100))  # one source question per gsm_symbolic template
    # Spot checks: template 0 (peel and saute), 1 (toys for the nephew), 93 (the dragon-slaying princes, whose
    # names and weapons all became placeholders) ...
    assert near[989] == 0 and near[930] == 1 and near[432] == 93
    assert full[989].prompt.startswith("Emily can peel 6 shrimp")
    # ... and questions that merely share a theme with a template are kept.
    for row in (219, 566, 279, 0):
        assert row not in near

    kept = data.load_gsm8k_test()
    assert len(kept) == 1319 - 100
    dropped = {full[i].prompt for i in near}
    assert not dropped & {ex.prompt for ex in kept}


# ----------------------------------------------------------------------------------------------- partitions


def _pool(per_family: int = 100, families=("a", "b", "c", "d")) -> list[Example]:
    return [Example(f"{f}{i}", "r", f, "x") for f in families for i in range(per_family)]


def _ids(shards):
    return sorted(id(ex) for shard in shards for ex in shard)


def _tv_to_global(shards, families):
    total = Counter(ex.family for shard in shards for ex in shard)
    n = sum(total.values())
    glob = np.array([total[f] / n for f in families])
    out = []
    for shard in shards:
        counts = Counter(ex.family for ex in shard)
        p = np.array([counts[f] / len(shard) for f in families])
        out.append(0.5 * np.abs(p - glob).sum())
    return np.array(out)


@pytest.mark.parametrize("scheme", data.SCHEMES)
@pytest.mark.parametrize("num_clients", [1, 3, 4, 7])
def test_partition_no_loss_no_duplication(scheme, num_clients):
    pool = _pool(per_family=25)
    shards = data.partition(pool, num_clients, scheme, seed=1)
    assert len(shards) == num_clients
    assert _ids(shards) == sorted(id(ex) for ex in pool)
    assert all(len(shard) >= 1 for shard in shards)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partition_deterministic(scheme):
    pool = _pool()
    a = data.partition(pool, 5, scheme, seed=7)
    b = data.partition(pool, 5, scheme, seed=7)
    c = data.partition(pool, 5, scheme, seed=8)
    assert [[ex.prompt for ex in s] for s in a] == [[ex.prompt for ex in s] for s in b]
    assert [[ex.prompt for ex in s] for s in a] != [[ex.prompt for ex in s] for s in c]
    sizes = sorted(len(s) for s in a)
    assert sizes[-1] - sizes[0] <= 1  # balanced client sizes


def test_dirichlet_non_iid_vs_iid():
    pool = _pool(per_family=200)
    families = ["a", "b", "c", "d"]
    # Mean total-variation distance between a client's family mix and the global mix.
    skewed = [_tv_to_global(data.partition(pool, 8, "dirichlet", alpha=0.5, seed=s), families).mean() for s in range(5)]
    flat = [
        _tv_to_global(data.partition(pool, 8, "dirichlet", alpha=1000.0, seed=s), families).mean() for s in range(5)
    ]
    iid = _tv_to_global(data.partition(pool, 8, "iid", seed=0), families).mean()
    assert min(skewed) > 0.2 and np.mean(skewed) > 0.25, skewed
    assert max(flat) < 0.1, flat
    assert iid < 0.1, iid

    # A client's largest family: about half its data under alpha=0.5, about a quarter (uniform) under 1000.
    def top_share(alpha):
        shares = []
        for seed in range(5):
            for c in data.family_counts(data.partition(pool, 8, "dirichlet", alpha=alpha, seed=seed)):
                shares.append(max(c.values()) / sum(c.values()))
        return np.mean(shares)

    assert top_share(0.5) > 0.45
    assert top_share(1000.0) < 0.33


def test_dirichlet_one_example_each():
    pool = _pool(per_family=2)
    shards = data.partition(pool, len(pool), "dirichlet", seed=0)
    assert [len(s) for s in shards] == [1] * len(pool)
    assert _ids(shards) == sorted(id(ex) for ex in pool)


def test_family_scheme():
    pool = _pool(per_family=10)
    shards = data.partition(pool, 4, "family", seed=0)
    assert [Counter(ex.family for ex in s) for s in shards] == [{"a": 10}, {"b": 10}, {"c": 10}, {"d": 10}]
    shards = data.partition(pool, 6, "family", seed=0)  # round-robin: a, b, c, d, a, b
    assert [set(ex.family for ex in s) for s in shards] == [{"a"}, {"b"}, {"c"}, {"d"}, {"a"}, {"b"}]
    assert [len(s) for s in shards] == [5, 5, 10, 10, 5, 5]
    shards = data.partition(pool, 3, "family", seed=0)  # fewer clients than families: a+d, b, c
    assert [set(ex.family for ex in s) for s in shards] == [{"a", "d"}, {"b"}, {"c"}]
    lopsided = _pool(per_family=10, families=("a",)) + _pool(per_family=1, families=("b",))
    with pytest.raises(ValueError, match="'b' has 1 examples but is shared by 2 clients"):
        data.partition(lopsided, 4, "family")


def test_partition_errors():
    pool = _pool(per_family=2)
    with pytest.raises(ValueError, match="unknown partition scheme 'shards'"):
        data.partition(pool, 2, "shards")
    with pytest.raises(ValueError, match="8 examples across 9 clients"):
        data.partition(pool, 9, "iid")
    with pytest.raises(ValueError, match="num_clients"):
        data.partition(pool, 0, "iid")
    with pytest.raises(ValueError, match="alpha"):
        data.partition(pool, 2, "dirichlet", alpha=0)


# ----------------------------------------------------------------------------------------------- formatting


def _example(response="The answer is 42.\n#### 42"):
    return Example(prompt="What is six times seven? Show your work.", response=response, family="t", answer="42")


def test_encode_masks_prompt(tokenizer):
    ex = _example()
    enc = data.encode(ex, tokenizer, max_length=512)
    ids, labels = enc["input_ids"], enc["labels"]
    assert len(ids) == len(labels) == len(enc["attention_mask"]) and all(enc["attention_mask"])
    prompt = data.prompt_ids(ex, tokenizer)
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [-100] * len(prompt)
    labelled = [t for t in labels if t != -100]
    assert labelled == ids[len(prompt) :]
    assert tokenizer.decode(labelled) == ex.response + "<|im_end|>"
    # The whole sequence is the chat template's conversation (without the newline after the last turn).
    conversation = tokenizer.apply_chat_template(
        [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response}], tokenize=False
    )
    assert tokenizer.decode(ids) == conversation.rstrip()
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert data.prompt_ids(ex.prompt, tokenizer) == prompt


def test_encode_truncation(tokenizer):
    ex = _example()
    full = data.encode(ex, tokenizer, max_length=None)
    n_resp = sum(t != -100 for t in full["labels"])
    # Room for the response: the user's text is cut from its beginning, the response stays whole.
    budget = 2 * n_resp + 4
    assert budget < len(full["input_ids"])
    enc = data.encode(ex, tokenizer, max_length=budget)
    assert len(enc["input_ids"]) == budget
    head = (budget - n_resp) // 2  # the template's start keeps at most half of the prompt's budget
    assert enc["input_ids"][:head] == full["input_ids"][:head]
    assert enc["input_ids"][head:] == full["input_ids"][-(budget - head):]
    assert tokenizer.decode([t for t in enc["labels"] if t != -100]) == ex.response + "<|im_end|>"
    # A response longer than half the budget: half stays for the prompt, the response is cut on the right.
    long = _example(response=" ".join(["word"] * 200))
    enc = data.encode(long, tokenizer, max_length=64)
    assert len(enc["input_ids"]) == 64
    assert enc["labels"][:32] == [-100] * 32 and -100 not in enc["labels"][32:]
    assert tokenizer.decode(enc["labels"][32:]).strip().startswith("word word")
    with pytest.raises(ValueError):
        data.encode(ex, tokenizer, max_length=1)


def test_truncated_examples_start_as_the_template_starts(tokenizer):
    """Regression (the CUDA round-2 NaN): a cut prompt must not start on an arbitrary token such as <|im_end|>."""
    examples = data.make_tasks(["gsm_symbolic"], train_size=40, eval_size=0, seed=0)[0]
    system = data.prompt_ids("x", tokenizer)[:20]  # <|im_start|>system ... of SmolLM2's template
    cut = 0
    for example in examples:
        full = data.encode(example, tokenizer, max_length=None)
        enc = data.encode(example, tokenizer, max_length=96)
        cut += len(full["input_ids"]) > 96
        assert enc["input_ids"][:20] == system
        response = [t for t in enc["labels"] if t != -100]
        assert response == [t for t in full["labels"] if t != -100][: len(response)] and response
        assert tokenizer.decode(enc["input_ids"]).count("<|im_start|>assistant\n") == 1
    assert cut >= 10  # the case matters: many gsm_symbolic prompts are cut at this length


def test_encode_without_chat_template(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    ex = _example()
    enc = data.encode(ex, plain, max_length=512)
    assert plain.decode(data.prompt_ids(ex, plain)) == f"User: {ex.prompt}\nAssistant: "
    assert plain.decode([t for t in enc["labels"] if t != -100]) == ex.response + plain.eos_token


def test_collate_and_loss_on_response_only(tiny_model):
    model, tok = tiny_model
    batch = [data.encode(_example(), tok, 512), data.encode(_example("7"), tok, 512)]
    out = data.collate(batch, pad_id=tok.pad_token_id)
    width = max(len(b["input_ids"]) for b in batch)
    assert out["input_ids"].shape == out["labels"].shape == out["attention_mask"].shape == (2, width)
    assert out["input_ids"].dtype == torch.long
    short = len(batch[1]["input_ids"])
    assert (out["input_ids"][1, short:] == tok.pad_token_id).all()
    assert (out["labels"][1, short:] == -100).all() and (out["attention_mask"][1, short:] == 0).all()
    assert out["labels"][1, :short].tolist() == batch[1]["labels"]
    with torch.no_grad():
        loss = model(**out).loss
    assert torch.isfinite(loss)
    # Changing the prompt's content changes the loss only through the context, never through its labels:
    # with every label masked there is nothing to learn.
    masked = dict(out, labels=torch.full_like(out["labels"], -100))
    with torch.no_grad():
        assert torch.isnan(model(**masked).loss)
    with pytest.raises(ValueError):
        data.collate([], pad_id=0)
