"""Registered techniques: each module defines configs and the `Technique`s that carry them out."""
from .pruning import MagnitudeConfig, OBSConfig, PruningConfig, SparseGPTConfig, WandaConfig

__all__ = ["MagnitudeConfig", "OBSConfig", "PruningConfig", "SparseGPTConfig", "WandaConfig"]
