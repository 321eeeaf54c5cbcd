"""Values from files and the command line, converted to the type their key declares, or refused in one line.

YAML 1.1 reads ``5e-4`` as a string, TOML keeps ``clients = "2"`` a string, and ``--set`` gives text: ``convert``
turns such values into the declared ``int``, ``float``, ``bool``, ``str``, ``list[str]``, ``dict``, ``Literal[...]``
(or ``X | None``) where that is unambiguous and raises a ``ValueError`` naming the key, the value and the expected
type otherwise. ``check`` is the strict twin for values given in Python: no text is parsed, only the type is checked.
``read_text`` reads a command-line value the one way for every key: as a TOML value when it is one (``5e-4``,
``true``, ``"a string"``, ``["a", "b"]``), else as the bare text.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import numbers
import tomllib
import types
import typing

import yaml

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
NONE = ("", "none", "null")
EXPECTED = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
            list: "a list of strings", dict: "a mapping of keys to values"}


def _parts(kind) -> tuple[object, bool]:
    """``(the type, whether None is allowed)`` of an annotation such as ``int`` or ``str | None``."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        args = [arg for arg in typing.get_args(kind) if arg is not type(None)]
        return (args[0] if len(args) == 1 else object), len(args) < len(typing.get_args(kind))
    return kind, False


def _base(kind) -> object:
    return typing.get_origin(kind) or kind


def _refuse(what: str, value, kind) -> ValueError:
    if _base(kind) is typing.Literal:
        choices = typing.get_args(kind)
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close and isinstance(value, str) else ""
        return ValueError(f"{what} = {value!r}: expected one of {', '.join(map(repr, choices))}{hint}")
    return ValueError(f"{what} = {value!r}: expected {EXPECTED.get(_base(kind), getattr(kind, '__name__', kind))}")


def describe(kind) -> str:
    """A declared type in words, for listings: ``int``, ``float``, ``list of str``, ``'balanced' | 'left'``,
    ``str or none``."""
    if typing.get_origin(kind) in (types.UnionType, typing.Union):
        args = typing.get_args(kind)
        words = [describe(arg) for arg in args if arg is not type(None)]
        return " or ".join(words + (["none"] if type(None) in args else []))
    base = _base(kind)
    if base is typing.Literal:
        return " | ".join(json.dumps(choice) for choice in typing.get_args(kind))
    if base is list:
        item = typing.get_args(kind)
        return f"list of {describe(item[0])}" if item else "list"
    if base is dict:
        return "table"
    return getattr(base, "__name__", str(base))


def read_text(text: str):
    """A command-line value (``--set key=TEXT``): the TOML value ``TEXT`` is (a number, ``true``, a quoted string, a
    list, an inline table), else ``TEXT`` itself. A TOML date stays text."""
    if "\n" in text:
        return text
    try:
        value = tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text
    return text if isinstance(value, datetime.date | datetime.time) else value


def convert(value, kind, what: str):
    """``value`` as ``kind``, parsing text where needed (``"5e-4"`` → 0.0005, ``"no"`` → False, ``"2"`` → 2)."""
    kind, optional = _parts(kind)
    base = _base(kind)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in NONE):
        if optional:
            return None
        raise _refuse(what, value, kind)
    if base is typing.Literal:
        for choice in typing.get_args(kind):
            try:
                candidate = convert(value, type(choice), what)
            except ValueError:
                continue
            if candidate == choice:
                return choice
        raise _refuse(what, value, kind)
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise _refuse(what, value, kind)
    if base is int:
        number = _number(value)
        if number is None or not math.isfinite(number) or number != int(number):
            raise _refuse(what, value, kind)
        return int(number)
    if base is float:
        number = _number(value)
        if number is None or not math.isfinite(number):
            raise _refuse(what, value, kind)
        return float(number)
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return str(value)
        raise _refuse(what, value, kind)
    if base is list:
        if isinstance(value, str):
            text = value.strip()
            value = _yaml(text, what, kind) if text.startswith("[") else [p.strip() for p in text.split(",")
                                                                          if p.strip()]
        if not isinstance(value, list | tuple):
            raise _refuse(what, value, kind)
        item = (typing.get_args(kind) or (object,))[0]
        return [convert(v, item, f"{what}[{i}]") if item is not object else v for i, v in enumerate(value)]
    if base is dict:
        if isinstance(value, str):
            value = _yaml(value, what, kind) if value.strip() else {}
        if not isinstance(value, dict):
            raise _refuse(what, value, kind)
        return {str(k): v for k, v in value.items()}
    return value  # an annotation we do not know: taken as given


def check(value, kind, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` already is a ``kind`` (an int is a float; a bool is not an int)."""
    kind, optional = _parts(kind)
    base = _base(kind)
    if value is None:
        ok = optional
    elif base is typing.Literal:
        ok = any(value == choice and type(value) is type(choice) for choice in typing.get_args(kind))
    elif base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    elif base in (str, list, dict):
        ok = isinstance(value, base)
        if ok and base is list and typing.get_args(kind):
            for i, item in enumerate(value):
                check(item, typing.get_args(kind)[0], f"{what}[{i}]")
    else:
        ok = True
    if not ok:
        raise _refuse(what, value, kind)


def _number(value) -> float | int | None:
    """A real number from a number or its text (``"5e-4"``, ``"2"``); ``None`` when it is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        for parse in (int, float):
            try:
                return parse(text)
            except ValueError:
                continue
    return None


def _yaml(text: str, what: str, kind):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise _refuse(what, text, kind) from None
