"""The fedmomentum Flower app: thin entry points into ``fedmomentum.flower``."""
