"""The aggregation methods, by name: ``names()`` lists them, ``create(name, **options)`` builds one.

Listing the methods and checking their options (``options``, ``option_types``, ``check_options``,
``parse_options``) needs only their declarations in ``option_specs.py``: torch is imported when a method is built
(``get``, ``create``).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

from .. import keys
from ..coerce import convert
from .option_specs import ALIASES, OPTIONS, MethodOptions

if TYPE_CHECKING:
    from .base import Method

# Other libraries' (and papers') names for the methods, for the "did you mean" of an unknown one.
METHOD_ALIASES = {"fedavg": "fedit", "fed_it": "fedit", "ffa": "ffa-lora", "fedex": "fedex-lora",
                  "flex": "flexlora", "fedsa": "fedsa-lora", "momentum": "fedmomentum", "fed_momentum": "fedmomentum"}

# name → "module:Class" of the built-in methods, imported on first use
_BUILT_IN = {"fedit": "fedit:FedIT", "ffa-lora": "ffa_lora:FFALoRA", "rolora": "rolora:RoLoRA", "flora": "flora:FLoRA",
             "fedex-lora": "fedex_lora:FedExLoRA", "flexlora": "flexlora:FlexLoRA",
             "fedmomentum": "fedmomentum:FedMomentum", "frlora": "frlora:FRLoRA", "fedsa-lora": "fedsa_lora:FedSALoRA"}
_OPTIONS: dict[str, type[MethodOptions]] = dict(OPTIONS)
_CLASSES: dict[str, type[Method]] = {}  # built-in classes once imported, and registered ones


def names() -> list[str]:
    """Every registered method name."""
    return list(_OPTIONS)


def _known(name: str) -> str:
    if name not in _OPTIONS:
        hint = keys.suggest(name, _OPTIONS, METHOD_ALIASES)
        raise ValueError(f"unknown method {name!r}" + (f" (did you mean {hint!r}?)" if hint else "")
                         + f"; choose one of {', '.join(_OPTIONS)}")
    return name


def option_class(name: str) -> type[MethodOptions]:
    """The dataclass declaring ``name``'s options (torch-free)."""
    return _OPTIONS[_known(name)]


def describe(name: str) -> dict[str, keys.Declared]:
    """Each option of ``name`` with its type, default, meaning and range."""
    return keys.declared(option_class(name))


def options(name: str) -> list[str]:
    """The keyword options ``create(name, ...)`` accepts."""
    return list(describe(name))


def option_types(name: str) -> dict[str, object]:
    """Each option's declared type."""
    return {key: spec.kind for key, spec in describe(name).items()}


def check_options(name: str, opts: dict) -> MethodOptions:
    """``name``'s options as its checked options object: an unknown option, a value of the wrong type
    (``merge_residual="no"`` is an error, not True) or out of range is a one-line ``ValueError``."""
    cls = option_class(name)
    unknown = [key for key in opts if key not in keys.declared(cls)]
    if unknown:
        listed = keys.unknown(unknown, keys.declared(cls), ALIASES, quote=False)
        raise ValueError(f"unknown option(s) {listed} for method {name!r}; it accepts "
                         f"{', '.join(keys.declared(cls))} (see: fedmomentum methods)")
    values = cls(**opts)
    keys.check(values, lambda key: f"{name} option {key}")
    return values


def parse_options(name: str, opts: dict) -> dict:
    """Options from a file or the command line converted to their declared types (``"0.99"`` → 0.99,
    ``"false"`` → False); a value that does not convert is a ``ValueError`` naming the option and the value."""
    kinds = option_types(name)
    return {key: convert(value, kinds[key], f"{name} option {key}") if key in kinds else value
            for key, value in opts.items()}


def get(name: str) -> type[Method]:
    """The method class (importing it, and torch, on first use)."""
    _known(name)
    if name not in _CLASSES:
        module, cls = _BUILT_IN[name].split(":")
        _CLASSES[name] = getattr(importlib.import_module(f".{module}", __name__), cls)
    return _CLASSES[name]


def create(name: str, **opts: Any) -> Method:
    """A new method object; its options are checked first (``check_options``)."""
    return get(name)(check_options(name, opts))


def register(cls: type[Method]) -> type[Method]:
    """Add a method class (usable as a decorator) so ``create`` and the CLI know it; its options are its ``Options``
    dataclass (a subclass of ``MethodOptions``)."""
    if not cls.name:
        raise ValueError("a method class needs a name")
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, MethodOptions)
            and dataclasses.is_dataclass(cls.Options)):
        raise ValueError(f"{cls.__name__}.Options must be a dataclass subclassing methods.options.MethodOptions")
    _OPTIONS[cls.name] = cls.Options
    _CLASSES[cls.name] = cls
    return cls


def __getattr__(attribute: str):
    """``Method`` and the built-in classes (``FedMomentum``, ...), imported (with torch) when asked for."""
    if attribute == "Method":
        from .base import Method

        return Method
    for name, target in _BUILT_IN.items():
        if target.endswith(f":{attribute}"):
            return get(name)
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


__all__ = ["Method", "MethodOptions", "check_options", "create", "describe", "get", "names", "option_class",
           "option_types", "options", "parse_options", "register"]
