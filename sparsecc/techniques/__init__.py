"""Registered techniques: each module defines configs and the `Technique`s that carry them out."""
from .cats import CATSConfig, CATSMLP
from .pruning import MagnitudeConfig, OBSConfig, PruningConfig, SparseGPTConfig, WandaConfig

__all__ = ["CATSConfig", "CATSMLP", "MagnitudeConfig", "OBSConfig", "PruningConfig", "SparseGPTConfig", "WandaConfig"]
