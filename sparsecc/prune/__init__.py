"""Per-matrix pruning functions, usable without any pipeline: weight (+ statistics) -> mask.

    keep = sparsecc.prune.magnitude(w, 0.5, group="output")
    keep = sparsecc.prune.wanda(w, act_norm, 0.5, pattern="2:4")
    new_w, keep = sparsecc.prune.sparsegpt(w, H, 0.5)
    new_w, keep = sparsecc.prune.obs(w, H, 0.5)
    new_w, keep, grid = sparsecc.prune.sparsegpt(w, H, 0.5, bits=4, group_size=128)   # joint, seed 001
    new_w, grid = sparsecc.prune.gptq(w, H, bits=4)          new_w, grid = sparsecc.prune.rtn(w, bits=4)
    z = sparsecc.prune.sample_gates(log_alpha, generator=g)   # hard-concrete gates (L0, seed 004)
"""
from .hard_concrete import deterministic_gates, expected_l0, sample_gates
from .hessian_error import reconstruction_error
from .magnitude import magnitude
from .masks import nm_mask, parse_pattern, unstructured_mask
from .obs import obs
from .owl import outlier_ratio, owl_sparsities
from .permute import find_permutation, nm_retained
from .quantize import QuantGrid, rtn
from .sparsegpt import gptq, sparsegpt
from .wanda import wanda

__all__ = ["QuantGrid", "deterministic_gates", "expected_l0", "find_permutation", "gptq", "magnitude", "nm_mask", "nm_retained", "obs", "outlier_ratio", "owl_sparsities",
           "parse_pattern", "reconstruction_error", "rtn", "sample_gates", "sparsegpt", "unstructured_mask", "wanda"]
