"""Analysis passes: each collects one artefact, by module name, block by block.

    artefact           pass                      for
    input_stats        CollectInputStats         Wanda (‖X_j‖₂)
    hessian            CollectHessians           SparseGPT, OBS (H = XᵀX)
    layer_sparsity     CollectOutlierRatios      OWL's per-block sparsity (whole model, dense)
    gate_activations   CollectGateActivations    CATS thresholds
    router_stats       CollectRouterStats        MoEfication's fitted routers
    channel_stats      CollectChannelStats       structured pruning of MLP channels (FLAP, Wanda-SP, refit)
    unit_sparsity      CollectUnitBudget         structured pruning's per-module widths (whole model, dense)
    unit_relevance     CollectUnitRelevance      structured pruning's score="bonsai" (whole model, dense, forwards only)
    unit_gates         CollectUnitGates          L0Config's learned hard-concrete gates (whole model, dense, weights frozen)
    block_influence    CollectBlockInfluence     LayerDropConfig: ShortGPT's Block Influence, loss increase or L0 block gates (whole model, dense)

Each pass's `reduce` completes a block's statistics over torch.distributed ranks, bit for bit what
one process collects (batch_sums.py: fp64 sums folded in global batch order); the gate-training
passes (unit_gates, block_influence's "l0") run in one process only.
"""
from .block_influence import CollectBlockInfluence
from .channel_stats import ChannelStats, CollectChannelStats
from .gate_activations import CollectGateActivations, GateSamples
from .hessian import CollectHessians, HessianStats
from .input_stats import CollectInputStats, InputStats
from .outliers import CollectOutlierRatios, LayerSparsity
from .router_stats import CollectRouterStats
from .unit_budget import CollectUnitBudget
from .unit_gates import CollectUnitGates
from .unit_relevance import CollectUnitRelevance

#: artefact -> the pass that produces it
PRODUCERS = {"input_stats": CollectInputStats, "hessian": CollectHessians, "layer_sparsity": CollectOutlierRatios,
             "gate_activations": CollectGateActivations, "router_stats": CollectRouterStats,
             "channel_stats": CollectChannelStats, "unit_sparsity": CollectUnitBudget,
             "unit_relevance": CollectUnitRelevance, "unit_gates": CollectUnitGates,
             "block_influence": CollectBlockInfluence}
#: artefact -> its statistic type, for the artefacts a Plan keeps (small, per module)
STAT_TYPES = {"input_stats": InputStats, "hessian": HessianStats, "layer_sparsity": LayerSparsity}

__all__ = ["PRODUCERS", "STAT_TYPES", "ChannelStats", "CollectBlockInfluence", "CollectChannelStats", "CollectGateActivations", "CollectHessians", "CollectInputStats",
           "CollectOutlierRatios", "CollectRouterStats", "CollectUnitBudget", "CollectUnitGates", "CollectUnitRelevance", "GateSamples", "HessianStats", "InputStats", "LayerSparsity"]
