"""ownlm: build your own assistant model end to end, on hardware you own."""

__version__ = "0.1.0"
