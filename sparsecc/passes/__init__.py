"""Analysis and transformation passes, and the Pipeline that orders and runs them (see README.md)."""
from .analysis import (CollectGateActivations, CollectHessians, CollectInputStats, CollectOutlierRatios,
                       CollectRouterStats, HessianStats, InputStats)
from .base import AnalysisPass, Pass, TransformPass
from .pipeline import PassContext, Pipeline, PipelineResult
from .transform import ApplyRecipe, RewriteModules

__all__ = ["AnalysisPass", "ApplyRecipe", "CollectGateActivations", "CollectHessians", "CollectInputStats",
           "CollectOutlierRatios", "CollectRouterStats", "HessianStats", "InputStats", "Pass", "PassContext",
           "Pipeline", "PipelineResult", "RewriteModules", "TransformPass"]
