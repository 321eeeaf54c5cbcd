"""Declared keys: one declaration per config key or method option says its type, default, meaning and allowed range.

A dataclass field made with ``key(default, "meaning", rule)`` is read by everything that needs to know about it:
the conversion of text from files and the command line (``coerce``), the checks (``check``), the listings of
``fedmomentum keys`` and ``fedmomentum methods``, and the suggestions for a misspelt name (``unknown``). Allowed
values are ``Literal`` types, bounds are ``Rule``s; nothing here imports torch.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import json
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .coerce import check as check_type
from .coerce import describe


@dataclass(frozen=True)
class Rule:
    """A bound on a value: ``text`` says it (``≥ 1``, ``in (0, 1]``), ``holds`` tests it."""

    text: str
    holds: Callable[[Any], bool]


def at_least(low: float) -> Rule:
    return Rule(f"≥ {low}", lambda value: value >= low)


def above(low: float) -> Rule:
    return Rule(f"> {low}", lambda value: value > low)


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Rule:
    """``[low, high]``, either end open on request."""
    text = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return Rule(text, lambda value: (value > low if open_low else value >= low)
                and (value < high if open_high else value <= high))


def key(default: Any, meaning: str, rule: Rule | None = None, **extra: Any) -> Any:
    """A dataclass field carrying its ``meaning`` and ``rule`` (and any ``extra`` facts) in its metadata; a list or
    dict default is copied for every instance."""
    metadata = {"meaning": meaning, "rule": rule, **extra}
    if isinstance(default, list | dict):
        return field(default_factory=functools.partial(copy.deepcopy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Declared:
    """One declared key, as the listings show it."""

    name: str
    kind: Any
    default: Any
    meaning: str
    rule: Rule | None
    metadata: Mapping[str, Any]

    @property
    def type_text(self) -> str:
        return describe(self.kind) + (f", {self.rule.text}" if self.rule else "")

    @property
    def default_text(self) -> str:
        return json.dumps(self.default)


@functools.cache
def declared(cls: type) -> dict[str, Declared]:
    """Every field of the dataclass ``cls`` with its type, default, meaning and rule, in declaration order."""
    hints = typing.get_type_hints(cls)
    found = {}
    for item in dataclasses.fields(cls):
        if item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = item.default
        found[item.name] = Declared(item.name, hints[item.name], default, item.metadata.get("meaning", ""),
                                    item.metadata.get("rule"), item.metadata)
    return found


def check(values: object, what: Callable[[str], str], out_of_range: Callable[[str], str] | None = None) -> None:
    """Raise a one-line ``ValueError`` unless every field of the dataclass instance ``values`` has its declared type
    and keeps its rule; ``what(name)`` names the key in the message (``config key lr``), ``out_of_range(name)`` in
    the message of a broken rule (default: ``what``)."""
    for name, spec in declared(type(values)).items():
        value = getattr(values, name)
        check_type(value, spec.kind, what(name))
        if spec.rule is not None and value is not None and not spec.rule.holds(value):
            raise ValueError(f"{(out_of_range or what)(name)} must be {spec.rule.text}, got {value!r}")


def suggest(name: str, known: typing.Iterable[str], aliases: Mapping[str, str] | None = None) -> str | None:
    """The known name ``name`` was probably meant to be: from ``aliases`` (other libraries' names for it), else the
    closest by spelling (ignoring case, ``-`` and ``_``); ``None`` when nothing is close."""
    known = list(known)
    plain = name.strip().lower().replace("-", "_")
    for alias, target in (aliases or {}).items():
        if alias.lower().replace("-", "_") == plain and target in known:
            return target
    squashed = {k.lower().replace("-", "").replace("_", ""): k for k in known}
    close = difflib.get_close_matches(plain.replace("_", ""), list(squashed), n=1, cutoff=0.75)
    if close:
        return squashed[close[0]]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown(names: typing.Iterable[str], known: typing.Iterable[str], aliases: Mapping[str, str] | None = None,
            quote: bool = True) -> str:
    """``'learning_rate' (did you mean 'lr'?), 'foo'``: each unknown name with its suggestion, if any (``quote``:
    names in quotes)."""
    known = list(known)
    show = repr if quote else str
    parts = []
    for name in names:
        hint = suggest(name, known, aliases)
        parts.append(show(name) + (f" (did you mean {show(hint)}?)" if hint else ""))
    return ", ".join(parts)
