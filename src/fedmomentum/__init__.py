"""fedmomentum: federated LoRA fine-tuning with FedMomentum and its baselines."""

from . import linalg, methods
from .types import Aggregate, ClientUpdate, LoraPair, LowRank, UpdateError

__version__ = "0.1.0"
__all__ = ["Aggregate", "ClientUpdate", "LoraPair", "LowRank", "UpdateError", "linalg", "methods"]
