"""Registered techniques: each module defines configs and the `Technique`s that carry them out."""
from .attention import AttentionSinkConfig, SlidingWindowConfig
from .cats import CATSConfig, CATSMLP
from .l0 import L0Config
from .layer_drop import LayerDropConfig
from .moe import MoEConfig, MoEMLP, SparseMoEConfig, moe_load_balance
from .pruning import MagnitudeConfig, OBSConfig, PruningConfig, SparseGPTConfig, WandaConfig
from .quantization import GPTQConfig, RTNConfig
from .structured import StructuredConfig

__all__ = ["AttentionSinkConfig", "GPTQConfig", "RTNConfig", "SlidingWindowConfig", "CATSConfig", "CATSMLP", "L0Config", "LayerDropConfig", "MagnitudeConfig", "MoEConfig", "MoEMLP", "OBSConfig", "PruningConfig", "SparseGPTConfig", "SparseMoEConfig", "StructuredConfig", "WandaConfig", "moe_load_balance"]
