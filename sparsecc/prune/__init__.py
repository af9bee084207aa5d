"""Per-matrix pruning functions, usable without any pipeline: weight (+ statistics) -> keep-mask."""
from .magnitude import magnitude
from .masks import nm_mask, parse_pattern, unstructured_mask

__all__ = ["magnitude", "nm_mask", "parse_pattern", "unstructured_mask"]
