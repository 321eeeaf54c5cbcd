"""ServerApp: ``fedmomentum.flower.server_app.app`` (reads this app's ``[tool.flwr.app.config]``)."""

from fedmomentum.flower.server_app import app

__all__ = ["app"]
