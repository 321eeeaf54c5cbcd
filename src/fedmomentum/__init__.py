"""fedmomentum: federated LoRA fine-tuning with FedMomentum and its baselines."""

from . import linalg, methods
from .types import Aggregate, ClientUpdate, LoraPair, LowRank, UpdateError

__version__ = "0.1.0"
__all__ = ["Aggregate", "ClientUpdate", "Engine", "LoraPair", "LowRank", "ServerState", "UpdateError", "linalg",
           "methods"]


def __getattr__(name: str):
    """``Engine`` and ``ServerState`` on first use (they pull in transformers and PEFT)."""
    if name == "Engine":
        from .driver import Engine

        return Engine
    if name == "ServerState":
        from .state import ServerState

        return ServerState
    raise AttributeError(f"module 'fedmomentum' has no attribute {name!r}")
