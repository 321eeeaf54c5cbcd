"""ClientApp: ``fedmomentum.flower.client_app.app`` (one data partition per SuperNode, from its node config)."""

from fedmomentum.flower.client_app import app

__all__ = ["app"]
