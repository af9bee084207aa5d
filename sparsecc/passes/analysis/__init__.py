"""Analysis passes: each collects one artefact, by module name, block by block.

    artefact           pass                      for
    input_stats        CollectInputStats         Wanda (‖X_j‖₂)
    hessian            CollectHessians           SparseGPT, OBS (H = XᵀX)
    layer_sparsity     CollectOutlierRatios      OWL's per-block sparsity (whole model, dense)
    gate_activations   CollectGateActivations    CATS thresholds
    router_stats       CollectRouterStats        MoEfication's fitted routers
    channel_stats      CollectChannelStats       structured pruning of MLP channels (FLAP, Wanda-SP, refit)
"""
from .channel_stats import ChannelStats, CollectChannelStats
from .gate_activations import CollectGateActivations, GateSamples
from .hessian import CollectHessians, HessianStats
from .input_stats import CollectInputStats, InputStats
from .outliers import CollectOutlierRatios, LayerSparsity
from .router_stats import CollectRouterStats

#: artefact -> the pass that produces it
PRODUCERS = {"input_stats": CollectInputStats, "hessian": CollectHessians, "layer_sparsity": CollectOutlierRatios,
             "gate_activations": CollectGateActivations, "router_stats": CollectRouterStats,
             "channel_stats": CollectChannelStats}
#: artefact -> its statistic type, for the artefacts a Plan keeps (small, per module)
STAT_TYPES = {"input_stats": InputStats, "hessian": HessianStats, "layer_sparsity": LayerSparsity}

__all__ = ["PRODUCERS", "STAT_TYPES", "ChannelStats", "CollectChannelStats", "CollectGateActivations", "CollectHessians", "CollectInputStats",
           "CollectOutlierRatios", "CollectRouterStats", "GateSamples", "HessianStats", "InputStats", "LayerSparsity"]
