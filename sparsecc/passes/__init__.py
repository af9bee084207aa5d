"""Analysis and transformation passes, and the Pipeline that orders and runs them (see README.md)."""
from .base import AnalysisPass, ApplyRecipe, CollectHessians, CollectInputStats, Pass, TransformPass
from .pipeline import PassContext, Pipeline, PipelineResult
from .stats import HessianStats, InputStats, dampen

__all__ = ["AnalysisPass", "ApplyRecipe", "CollectHessians", "CollectInputStats", "HessianStats", "InputStats",
           "Pass", "PassContext", "Pipeline", "PipelineResult", "TransformPass", "dampen"]
