"""Registered techniques: each module defines a config and the `Technique` that carries it out."""
from .magnitude import MagnitudeConfig

__all__ = ["MagnitudeConfig"]
