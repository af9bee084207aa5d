"""sparsecc: a sparsifying compiler for PyTorch models.

    plan = sparsecc.calibrate(model, batches, recipe)       # analysis passes -> Plan
    sparsecc.sparsify_(model, plan)                          # or sparsify_(model, recipe, batches)
    model = torch.compile(model, backend="sparsecc")
"""
__version__ = "0.1.0"

from . import prune
from .api import calibrate, sparsify_
from .backend import sparsecc_backend
from .calibration import CalibrationSet, sample_batches
from .checkpoint import load_pruned, save_pruned
from .compressed import CSRLinear, NMLinear, compress_csr_, compress_nm_
from .capture import Captured, LinearSite, capture
from .configs import SparsityConfig, Technique, config_from_dict, register_technique
from .errors import CalibrationError, CaptureError, PipelineError, PlanError, RecipeError, SparseccError
from .passes import (AnalysisPass, ApplyRecipe, CollectHessians, CollectInputStats, Pass, Pipeline,
                     PipelineResult, TransformPass)
from .plan import Plan
from .recipes import dump_recipe, load_recipe
from .report import Report
from .techniques.attention import kv_cache_lengths
from .techniques.cats import activation_sparsity
from .techniques import MoEConfig, MoEMLP, SparseMoEConfig, moe_load_balance
from .techniques import AttentionSinkConfig, SlidingWindowConfig, CATSConfig, CATSMLP, MagnitudeConfig, OBSConfig, PruningConfig, SparseGPTConfig, WandaConfig

__all__ = [
    "AnalysisPass", "ApplyRecipe", "AttentionSinkConfig", "SlidingWindowConfig", "CATSConfig", "CATSMLP", "CalibrationError", "CalibrationSet", "CaptureError", "Captured",
    "CSRLinear", "CollectHessians", "CollectInputStats", "LinearSite", "MagnitudeConfig", "MoEConfig", "MoEMLP", "SparseMoEConfig", "NMLinear", "OBSConfig", "Pass",
    "PruningConfig", "SparseGPTConfig", "WandaConfig", "Pipeline",
    "PipelineError", "PipelineResult", "Plan", "PlanError", "RecipeError", "Report", "SparseccError",
    "SparsityConfig", "Technique", "TransformPass", "calibrate", "activation_sparsity", "capture", "compress_csr_", "compress_nm_", "config_from_dict", "dump_recipe", "kv_cache_lengths",
    "load_pruned", "load_recipe", "moe_load_balance", "prune", "register_technique", "sample_batches", "save_pruned", "sparsecc_backend",
    "sparsify_",
]
