"""sparsecc: a sparsifying compiler for PyTorch models.

    plan = sparsecc.calibrate(model, batches, recipe)       # analysis passes -> Plan
    sparsecc.sparsify_(model, plan)                          # or sparsify_(model, recipe, batches)
    sparsecc.prune_folder(folder, recipe, batches, out)      # a model larger than memory, block by block
    sparsecc.finetune_(model, batches, steps=200)            # recover what pruning cost, zeros kept
    model = torch.compile(model, backend="sparsecc")
"""
__version__ = "0.1.0"

# Public names -> the submodule defining them, imported on first use (PEP 562), so that
# `import sparsecc` and `sparsecc --help` do not import torch.
_SOURCES = {
    "calibrate": ".api", "sparsify_": ".api", "prune_folder": ".api", "finetune_": ".finetune",
    "FinetuneReport": ".finetune", "merge_adapters_": ".finetune", "sparsecc_backend": ".backend",
    "CalibrationSet": ".graph.calibration", "sample_batches": ".graph.calibration", "load_pruned": ".io.checkpoint", "checkpoint_size": ".io.checkpoint",
    "save_pruned": ".io.checkpoint", "CSRLinear": ".techniques.packing", "NMLinear": ".techniques.packing", "QuantLinear": ".techniques.packing",
    "compress_csr_": ".techniques.packing", "compress_nm_": ".techniques.packing", "pack_": ".techniques.packing", "Captured": ".graph.capture",
    "LinearSite": ".graph.capture", "capture": ".graph.capture", "SparsityConfig": ".techniques.configs", "Technique": ".techniques.configs",
    "config_from_dict": ".techniques.configs", "register_technique": ".techniques.configs", "Plan": ".io.plan",
    "dump_recipe": ".io.recipes", "load_recipe": ".io.recipes", "Report": ".io.report",
    "kv_cache_lengths": ".techniques.attention", "cache_kwargs": ".techniques.attention", "activation_sparsity": ".techniques.cats",
    **dict.fromkeys(["CalibrationError", "CaptureError", "PipelineError", "PlanError", "RecipeError",
                     "SparseccError", "WholeModelError", "DistributedError", "FinetuneError"], ".errors"),
    **dict.fromkeys(["AnalysisPass", "ApplyRecipe", "CollectHessians", "CollectInputStats", "Pass", "Pipeline",
                     "PipelineResult", "TransformPass"], ".passes"),
    **dict.fromkeys(["MoEConfig", "MoEMLP", "SparseMoEConfig", "moe_load_balance", "AttentionSinkConfig",
                     "SlidingWindowConfig", "CATSConfig", "CATSMLP", "LayerDropConfig", "MagnitudeConfig", "OBSConfig",
                     "PruningConfig", "SparseGPTConfig", "StructuredConfig", "WandaConfig", "GPTQConfig",
                     "RTNConfig", "L0Config"], ".techniques"),
}


def __getattr__(name):
    import importlib

    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # The technique registry (recipes and plans name methods) and the torch ops fill in when
    # .techniques is imported: any public name or submodule brings them, as the eager package did.
    importlib.import_module(".techniques", __name__)
    if name not in _SOURCES:  # a submodule (sparsecc.prune, sparsecc.backend, ...), else no such name
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(_SOURCES[name], __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted({*globals(), *__all__})


__all__ = [
    "AnalysisPass", "ApplyRecipe", "AttentionSinkConfig", "SlidingWindowConfig", "CATSConfig", "CATSMLP", "CalibrationError", "CalibrationSet", "CaptureError", "Captured",
    "CSRLinear", "CollectHessians", "GPTQConfig", "RTNConfig", "CollectInputStats", "L0Config", "LayerDropConfig", "LinearSite", "MagnitudeConfig", "MoEConfig", "MoEMLP", "SparseMoEConfig", "NMLinear", "OBSConfig", "Pass", "QuantLinear",
    "PruningConfig", "SparseGPTConfig", "StructuredConfig", "WandaConfig", "Pipeline",
    "PipelineError", "PipelineResult", "Plan", "PlanError", "RecipeError", "Report", "SparseccError", "WholeModelError", "DistributedError", "FinetuneError", "FinetuneReport",
    "SparsityConfig", "Technique", "TransformPass", "calibrate", "activation_sparsity", "capture", "checkpoint_size", "compress_csr_", "compress_nm_", "config_from_dict", "dump_recipe", "kv_cache_lengths", "cache_kwargs",
    "finetune_", "load_pruned", "load_recipe", "merge_adapters_", "moe_load_balance", "pack_", "prune", "prune_folder", "register_technique", "sample_batches", "save_pruned", "sparsecc_backend",
    "sparsify_",
]
