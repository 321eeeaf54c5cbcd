"""The aggregation methods, by name: ``names()`` lists them, ``create(name, **options)`` builds one."""

from __future__ import annotations

import inspect
import typing

import yaml

from ..coerce import check, convert
from .base import Method
from .fedex_lora import FedExLoRA
from .fedit import FedIT
from .fedmomentum import FedMomentum
from .ffa_lora import FFALoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .rolora import RoLoRA

_REGISTRY: dict[str, type[Method]] = {
    cls.name: cls for cls in (FedIT, FFALoRA, RoLoRA, FLoRA, FedExLoRA, FlexLoRA, FedMomentum)
}


def names() -> list[str]:
    """Every registered method name."""
    return list(_REGISTRY)


def options(name: str) -> list[str]:
    """The keyword options ``create(name, ...)`` accepts."""
    own = inspect.signature(get(name).__init__).parameters
    keys = [p for p in own if p not in ("self", "common")]
    if "common" in own:  # **common is passed on to Method.__init__
        keys += [p for p in inspect.signature(Method.__init__).parameters if p != "self"]
    return keys


def option_types(name: str) -> dict[str, object]:
    """Each option's declared type (from the ``__init__`` type hints; ``object`` where there is none)."""
    hints = {**typing.get_type_hints(Method.__init__), **typing.get_type_hints(get(name).__init__)}
    return {key: hints.get(key, object) for key in options(name)}


def parse_options(name: str, opts: dict) -> dict:
    """Options from a file or the command line converted to their declared types (``"0.99"`` → 0.99,
    ``"false"`` → False); a value that does not convert is a ``ValueError`` naming the option and the value."""
    kinds = option_types(name)
    return {key: _parse(value, kinds[key], f"{name} option {key}") if key in kinds else value
            for key, value in opts.items()}


def _parse(value, kind, what: str):
    if kind is object and isinstance(value, str):  # an option without a type hint: its text is read as YAML
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return value
    return convert(value, kind, what)


def get(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def create(name: str, **opts) -> Method:
    """A new method object; an unknown option is an error naming the options it accepts."""
    allowed = options(name)
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for method {name!r}; "
                         f"it accepts {', '.join(allowed)}")
    kinds = option_types(name)
    for key, value in opts.items():
        check(value, kinds[key], f"{name} option {key}")  # merge_residual="no" is an error, not True
    return get(name)(**opts)


def register(cls: type[Method]) -> type[Method]:
    """Add a method class (usable as a decorator) so ``create`` and the CLI know it."""
    if not cls.name:
        raise ValueError("a method class needs a name")
    _REGISTRY[cls.name] = cls
    return cls


__all__ = ["Method", "names", "create", "get", "option_types", "options", "parse_options", "register"]
