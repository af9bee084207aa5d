"""Transform passes: pruning linears (prune.py) and rewriting modules (rewrite.py)."""
from .prune import ApplyRecipe
from .rewrite import RewriteModules

__all__ = ["ApplyRecipe", "RewriteModules"]
