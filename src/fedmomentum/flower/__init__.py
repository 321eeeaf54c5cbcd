"""fedmomentum on Flower: a Message-API strategy, a ServerApp and a ClientApp over the same methods and client code.

``flwr run examples/flower`` runs the example app (local simulation or a deployed SuperLink); in Python,
``flwr.simulation.run_simulation(make_server_app(config), make_client_app(), num_supernodes=config.clients)``.
See docs/flower.md.
"""

from .client_app import make_client_app
from .server_app import make_server_app, parse_run_config
from .strategy import LoraStrategy, RoundFailed

__all__ = ["LoraStrategy", "RoundFailed", "make_client_app", "make_server_app", "parse_run_config"]
