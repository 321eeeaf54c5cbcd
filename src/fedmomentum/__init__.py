"""fedmomentum: federated LoRA fine-tuning with FedMomentum and its baselines.

The exports are imported on first use, so ``import fedmomentum`` (and the command line's ``--help``, ``methods``
and config checks) does not import torch; ``fm.LoraPair``, ``fm.linalg`` and the rest load it when touched.
"""

import importlib

__version__ = "0.1.0"

# name → the submodule it comes from (a submodule itself maps to None)
_EXPORTS = {"Aggregate": "types", "ClientUpdate": "types", "LoraPair": "types", "LowRank": "types",
            "UpdateError": "types", "Engine": "driver", "ServerState": "state", "linalg": None, "methods": None}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_EXPORTS[name] or name}", __name__)
    value = module if _EXPORTS[name] is None else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
