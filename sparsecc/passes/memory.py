"""Memory estimate for Hessian-based pruning, checked before any work starts.

SparseGPT and OBS hold H (in × in) for every targeted linear of one decoder block at a time
(block-sequential calibration), then, per layer, a damped inverse and its Cholesky factor
(2 more in × in) and fp32 working copies of W. If that peak exceeds the memory available on
the model's device, the run would die hours in; we refuse up front and say how much is needed.
"""
from __future__ import annotations

import ctypes
from collections import defaultdict
from dataclasses import dataclass

import torch


from ..errors import CalibrationError
from ..prune.masks import LARGE as MASK_LARGE
from ..prune.owl import CHUNK

GiB = 2 ** 30


def return_freed_memory() -> None:
    """Hand the heap's freed pages back to the system (glibc's malloc_trim; elsewhere nothing).
    Tensors under malloc's mmap threshold (up to 32 MiB) live in the heap; once freed, their pages
    stay resident, and the larger solves that follow (mmapped) come on top: a block's smaller
    Hessians, dropped one by one, would otherwise still count at the largest linear's solve, and
    the resident set would creep up block after block although what is live stays flat."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# 4 MiB: a block's per-batch transients (MLP intermediates of 512 tokens x 4096: 8 MiB, attention
# scores) are mapped too. With 16 MiB they stayed in the heap, pinned apart by the small per-batch
# statistics kept until the block's reduction, and Wanda's peak on a 1536-wide Llama (16 x 512 tokens)
# ranged 504-894 MiB from run to run; with 4 MiB, 360 (SparseGPT 565 -> 537), at about the same speed
MMAP_THRESHOLD = 4 * 2 ** 20


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> None:
    """Have glibc's malloc give every allocation of `threshold` bytes or more its own mapping, returned
    to the system as soon as it is freed (mallopt M_MMAP_THRESHOLD; elsewhere nothing). By default the
    threshold floats up to 32 MiB as large blocks are freed, and a block's Hessians, inverses and
    activations then land in the heap, whose free space fragments: the resident set creeps up block
    after block while what is live stays flat (8 blocks of a 1536-wide Llama: 737 -> 813 MiB; with
    16 MiB: 560 -> 578 MiB), and within a block the calibration forwards' transients pile up
    (MMAP_THRESHOLD). Process-wide and kept (glibc cannot restore the floating threshold);
    large tensors then cost an mmap and page faults, ~4% of the time there."""
    try:
        ctypes.CDLL(None).mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def fmt_bytes(n: float) -> str:
    """"1.24 GiB", "310 MiB", "12 KiB": an amount of memory for messages."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.3g} {unit}"


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def hessian_peak_bytes(captured, names, hessian_bytes: int = 4) -> tuple[int, str]:
    """Peak bytes for the Hessians of `names` (grouped by decoder block) plus one layer's solve,
    and a description of where the peak is."""
    per_scope: dict[int | None, int] = defaultdict(int)
    solve = 0
    groups = set()
    for name in names:
        site = captured.sites[name]
        group = captured.same_input.get(name, (name,))  # linears reading one input share one H
        if group not in groups:
            groups.add(group)
            per_scope[captured.block_of(name)] += site.in_features ** 2 * hessian_bytes
        solve = max(solve, (2 * site.in_features ** 2 + 2 * site.out_features * site.in_features) * 4)
    if not per_scope:
        return 0, ""
    scope, held = max(per_scope.items(), key=lambda kv: kv[1])
    where = "outside the decoder blocks" if scope is None else f"decoder block {captured.blocks[scope]}"
    return held + solve, where


def check_hessian_memory(captured, names, device: torch.device, hessian_bytes: int = 4) -> None:
    """Raise CalibrationError before calibration if the Hessians of `names` cannot fit."""
    need, where = hessian_peak_bytes(captured, names, hessian_bytes)
    free = available_bytes(device)
    if need and free is not None and need > free:
        raise CalibrationError(
            f"Hessian-based pruning needs ~{need / GiB:.2f} GiB at its peak ({where}: the Hessians of its "
            f"targeted linears plus one layer's inverse), but only {free / GiB:.2f} GiB is available on {device}; "
            "free memory, target fewer modules per run in the recipe, or use WandaConfig (no Hessian)")


# OWL's outlier ratio of a block (analysis/outliers.py, prune/owl.py:outlier_ratio_of) makes the Wanda
# scores |W|·‖X‖ one linear at a time: |W| (up to 4 bytes an element), the fp32 scores made from it
# in place, their finiteness mask (1); then compares up to CHUNK of them at a time in fp64 (and a mask)
OWL_SCORE_BYTES, OWL_COMPARE_BYTES = 4 + 4 + 1, 8 + 1


def owl_score_bytes(sites) -> int:
    """Peak bytes of OWL's outlier ratio over the linear `sites` (made one at a time), 0 for none."""
    sizes = [s.out_features * s.in_features for s in sites]
    return max((n * OWL_SCORE_BYTES + min(n, CHUNK) * OWL_COMPARE_BYTES for n in sizes), default=0)


# A linear pruned (or quantized) without a Hessian, one at a time (passes/transform/prune.py): its
# undo copy for the report's error (in the weights' dtype), then per weight: magnitude / Wanda, the
# scores (fp32; Wanda's fp64 for an fp64 weight) and the keep-mask; RTN (prune/quantize.py:rtn),
# fp32 temporaries of the rounding (x / s, its round, + z, clamp), its codes and the new weight.
# The selection ranks at most LARGE scores at once (prune/masks.py), MASK_WORK bytes each at most.
RTN_BYTES = 4 * 4 + 2 + 4
MASK_WORK = 32  # a whole-layer topk's values, int64 indices and sort space, and slack; lowest_k's chunks need less


def plan_bytes(config, weights: int, act_bytes: int) -> int:
    """Peak bytes of pruning one linear of `weights` weights with `config` (no Hessian)."""
    from ..techniques.quantization import RTNConfig

    per_weight = RTN_BYTES if isinstance(config, RTNConfig) else (8 if act_bytes == 8 else 4) + 1
    return weights * (act_bytes + per_weight) + min(weights, MASK_LARGE) * MASK_WORK


@dataclass
class RewriteBytes:
    """What one module rewrite (passes/transform/rewrite.py) holds and makes, in bytes (`rewrite_bytes`)."""

    held: int = 0     # its statistics: collected with the block's second forward, kept until the block's passes end
    collect: int = 0  # one batch's work while they are collected (one module's hook at a time)
    plan: int = 0     # its decision and the rewrite: transient, one module at a time
    new: int = 0      # the new module, beside the one it replaces (kept by the undo log) until the block's passes end
    grows: int = 0    # what the new module holds beyond the one it replaced, until the block is written
    sweep_held: int = 0     # the first sweep's (layerwise="global"): its channel sums, until its block's scope ends
    sweep_collect: int = 0  # one batch's work while they are collected
    scores: int = 0   # its unit scores, kept from its block to the end of the first sweep
    scoring: int = 0  # making them (its block's weights loaded)


def rewrite_bytes(captured, name: str, config, spec, tokens: list[int], act_bytes: int) -> RewriteBytes:
    """The memory of rewriting module `name` with `config` (spec: its GatedMLP, PlainMLP or
    AttentionHeads), given the calibration batches' `tokens` and the weights' itemsize `act_bytes`.
    I is the width of the linear consuming its units (down's or o's input), H the hidden size
    (its output), T the tokens of the largest batch, B the number of batches; the terms by the
    statistics the technique needs (`needs`), so that any config needing them is counted:

    - "gate_activations" (CATS, analysis/gate_activations.py): held, the samples of |act(x W_gate)|,
      4 bytes each, n = Σ_b min(MAX_SAMPLES // B, T_b·I); collecting, one batch's |act(y)| (fp32,
      made with one temporary: 8·T·I) and its draw (an int64 index and the values: 12 a sample);
      the threshold, the samples concatenated and sorted (values and int64 indices: 16·n) and W_down
      re-laid column-major (H·I weights; made row-major again when written, after the outputs);
    - "router_stats" (MoE router="fitted", analysis/router_stats.py, techniques/moe/router.py): held,
      XᵀX, XᵀS, ΣS, ΣS² in fp64, 8·((H+1)² + (H+1)·E + 2·E); collecting, the experts' split at the
      first batch (the normalised [W_gate, W_up] rows and their copy, 16·I·H; the similarities and
      their int64 order, 12·I·E) and one batch's expert slices of h, [x, 1] and its fp32 product
      with its fp64 copy (4·T·I + 4·T·(H+1) + 12·(H+1)²); the fit, the regularised matrix, its
      diagonal and the solve's factor (24·(H+1)²). MoE with router="centroid" splits at its rewrite;
    - "channel_stats" (structured, analysis/channel_stats.py): held, Σh and Σh² in fp64 per batch
      (folded after the block: 16·I·B), and with update="refit" H = Σ h hᵀ (8·I²); collecting, one
      batch's h in fp64 and its square (16·T·I), with refit its fp32 product and fp64 copy (12·I²);
      the rewrite, the consumer in fp32, its |W| or W² for the scores and the new weight (12·H·I),
      with refit H in fp32, damped, its kept block and the solve's factor (16·I²);
    - "unit_sparsity" (layerwise="global", analysis/unit_budget.py, the first sweep over the dense
      blocks): Σh and Σh² per batch for "wanda-sp"/"flap" (16·I·B) while its block is observed
      (one batch: 16·T·I), then its scores made from its weights (the consumer, or a producer, in
      fp32 and its |W|: 8 bytes a weight of the largest linear) and kept to the sweep's end (8·I);
    - a rewrite that builds new linears (`rebuilds_linears`: structured, MoE) holds them beside the
      old ones until the block's passes end (the module's linear weights once more: an upper bound
      for structured, whose kept share is smaller); MoE copies one weight by its neurons (H·I
      weights) and adds its fp32 router, 4·E·(H+1), which stays until the block is written.
    Attention forms (data-free, nothing but their module's own weights) add nothing; nor do the
    small per-module tensors (biases FLAP adds, thresholds, kept-unit indices)."""
    from ..graph.gated import GatedMLP, PlainMLP
    from ..graph.heads import AttentionHeads
    from ..techniques.configs import technique_for
    from ..techniques.shrink import consumer, producers
    from .analysis.gate_activations import MAX_SAMPLES

    out = RewriteBytes()
    if not isinstance(spec, (GatedMLP, PlainMLP, AttentionHeads)):
        return out
    cons = captured.sites.get(f"{name}.{consumer(spec)}")
    if cons is None:
        return out
    tech = technique_for(config)
    needs = set(tech.needs(config))
    inner, hidden, t = cons.in_features, cons.out_features, max(tokens, default=0)
    children = [*producers(spec), consumer(spec)] + ([spec.k, spec.v] if isinstance(spec, AttentionHeads) else [])
    linears = [captured.sites[f"{name}.{c}"] for c in children if f"{name}.{c}" in captured.sites]  # the module's own
    weights = sum(s.out_features * s.in_features for s in linears)
    experts = getattr(config, "num_experts", None)
    split = 16 * inner * hidden + 12 * inner * (experts or 0)  # MoE's split (techniques/moe/split.py)
    if "gate_activations" in needs:
        per_batch = MAX_SAMPLES // max(len(tokens), 1)
        n = sum(min(per_batch, b * inner) for b in tokens)
        out.held += 4 * n
        out.collect = max(out.collect, 8 * t * inner + 12 * min(per_batch, t * inner))
        out.plan += 16 * n + hidden * inner * act_bytes
    if "router_stats" in needs:
        h1 = hidden + 1
        out.held += 8 * (h1 * h1 + h1 * experts + 2 * experts)
        out.collect = max(out.collect, split + 4 * t * inner + 4 * t * h1 + 12 * h1 * h1)
        out.plan += 24 * h1 * h1
    elif experts:
        out.plan += split
    if "channel_stats" in needs:
        refit = getattr(config, "update", None) == "refit"
        out.held += 16 * inner * len(tokens) + (8 * inner * inner if refit else 0)
        out.collect = max(out.collect, 16 * t * inner + (12 * inner * inner if refit else 0))
        out.plan += 16 * inner * inner if refit else 0
    if tech.rebuilds_linears:
        out.new = weights * act_bytes
        if experts:  # MoE: one weight indexed by the split, and the router
            out.plan += hidden * inner * act_bytes
            out.grows = 4 * experts * (hidden + 1)
        else:  # structured: the scores and the new consumer weight
            out.plan += 12 * hidden * inner
    if "unit_sparsity" in needs:
        if getattr(config, "score", None) in ("wanda-sp", "flap"):
            out.sweep_held, out.sweep_collect = 16 * inner * len(tokens), 16 * t * inner
        out.scores = 8 * inner
        out.scoring = 8 * max((s.out_features * s.in_features for s in linears), default=0)
    return out


def onload_peak_bytes(captured, hessian_names, block_bytes: dict[str, int], rest_bytes: int, batches: list,
                      act_bytes: int, hessian_bytes: int = 8, activations: str = "memory",
                      outlier_names=(), rewrites: dict | None = None, pruned: dict | None = None) -> tuple[int, dict]:
    """Peak bytes of sequential onloading (api.prune_folder), known before any weight is read: the
    largest of its phases (the interpreter and its libraries not counted).

    - outside the blocks (the probe, and the rest of the model at the end): those parameters, the
      blocks' inputs and one batch's logits;
    - in block k, on top of its parameters (once: as read, or as rewritten, page by page) and the
      calibration activations (the block's inputs; its outputs too while they are computed):
      collecting, its Hessians and one batch's transients; solving linear j, the Hessians not yet
      used (each goes once its linear is pruned) and j's solve (H in fp32, its damped inverse and
      Cholesky factor, W's working copy, mask and undo copy); pruning linear j without a Hessian
      (`pruned`: {name: config}), the Hessians not yet used and j's `plan_bytes`;
    - module rewrites (`rewrites`: {module: (config, spec)}, CATS, MoE, structured; `rewrite_bytes`
      gives each one's terms), in block k on top of the same: collecting their statistics (the
      block's second forward, once its linears are pruned and their Hessians gone), every rewrite's
      held statistics and the largest one batch's work; rewriting module m (in the order they run),
      the held statistics, the new modules made so far beside the ones they replace (the undo log
      keeps those until the block's passes end) and m's own work; computing the outputs, what the
      new modules hold beyond the old ones (MoE's routers);
    - a first sweep over the dense model, in block k on top of the same: OWL's (`outlier_names`: the
      linears it observes), one fp64 Σx² per input column and batch of each linear (folded in batch
      order after the scope), then the block's outlier ratio, the Wanda scores of one linear at a
      time (`owl_score_bytes`); outside the blocks, each such linear's (lm_head); structured
      pruning's global widths (layerwise="global"), its channel sums and one batch's work, then its
      unit scores, those of every module so far kept to the sweep's end.
    `activations` is how the hidden states are kept (passes/activations.py): "bf16"/"fp16" count 2
    bytes an element (and one batch back in the model's dtype), "disk" one batch in memory.

    Returns (bytes, {"block": where the peak is, "phase": what runs then, part: bytes, ...})."""
    from collections import Counter

    from ..graph.calibration import _main_tensor
    from ..techniques.configs import technique_for

    shapes = [tuple(_main_tensor(b).shape) for b in batches]
    tokens = [s[0] * s[1] if len(s) >= 2 else s[0] for s in shapes]
    seq = max((s[1] for s in shapes if len(s) >= 2), default=1)
    hessians, owl = set(hessian_names), set(outlier_names)
    by_block: dict[int | None, list] = defaultdict(list)
    for site in captured.sites.values():
        by_block[captured.block_of(site.name)].append(site)
    rewritten: dict[int | None, list] = defaultdict(list)  # block -> [(module, its terms)], in the order they run
    for name, (config, spec) in sorted((rewrites or {}).items(), key=lambda kv: technique_for(kv[1][0]).order):
        rewritten[captured.block_of(name + ".")].append((name, rewrite_bytes(captured, name, config, spec, tokens,
                                                                             act_bytes)))
    first = by_block.get(0) or list(captured.sites.values())
    hidden = Counter(s.in_features for s in first).most_common(1)[0][0] if first else 0  # what the blocks pass on
    one = max(tokens, default=0) * hidden * act_bytes  # one batch's hidden states, as the blocks compute them
    acts = {"memory": sum(tokens) * hidden * act_bytes, "disk": one}.get(activations, sum(tokens) * hidden * 2 + one)
    rest_out = sum(s.out_features for s in by_block.get(None, []))
    best = (rest_bytes + acts + max(tokens, default=0) * rest_out * 4,
            {"block": "outside the blocks", "phase": "the probe and the rest of the model",
             "parameters": rest_bytes, "activations": acts})
    scores = owl_score_bytes([s for s in by_block.get(None, []) if s.name in owl])
    if rest_bytes + acts + scores > best[0]:
        best = (rest_bytes + acts + scores, {"block": "outside the blocks", "phase": "OWL's outlier ratio (first sweep)",
                                             "parameters": rest_bytes, "statistics": scores, "activations": acts})
    outside = [s for s in by_block.get(None, []) if s.name in (pruned or {})]  # lm_head, when the recipe prunes it
    work = max((plan_bytes(pruned[s.name], s.out_features * s.in_features, act_bytes) for s in outside), default=0)
    if work and rest_bytes + acts + work > best[0]:
        best = (rest_bytes + acts + work, {"block": "outside the blocks", "phase": "pruning the linears outside the "
                                           "blocks", "parameters": rest_bytes, "statistics": work, "activations": acts})
    kept_scores = 0  # the first sweep's unit scores of the blocks so far (layerwise="global")
    for k, block in enumerate(captured.blocks):
        sites = by_block.get(k, [])
        params = block_bytes.get(block, 0)
        # one batch in the block: every linear's output (fp32 at most) and the attention scores
        transient = max(tokens, default=0) * (sum(s.out_features for s in sites) * 4 + seq * 4 * max(1, hidden // 64))
        # one H per group of linears reading one input: made fp32 (compact) at its first linear's
        # solve, freed after its last one's
        group = {s.name: captured.same_input.get(s.name, (s.name,)) for s in sites if s.name in hessians}
        size = {g: next(s.in_features for s in sites if s.name in g) ** 2 for g in group.values()}
        first, last = {}, {}
        for j, s in enumerate(sites):
            if s.name in group:
                first.setdefault(group[s.name], j)
                last[group[s.name]] = j
        mine = rewritten.get(k, [])
        grows = sum(r.grows for _, r in mine)
        # (phase, statistics, activations, parameters beyond the block's own)
        phases = [("collecting statistics", sum(size.values()) * hessian_bytes, acts + transient, 0),
                  ("computing its outputs", 0, 2 * acts + transient, grows)]
        observed = [s for s in sites if s.name in owl]
        sweep = [r for _, r in mine if r.scores]
        if observed or sweep:  # a first sweep: its outputs are computed as in the second (the phase above)
            held = len(batches) * sum(s.in_features for s in observed) * 8 + sum(r.sweep_held for r in sweep)
            work = max((r.sweep_collect for r in sweep), default=0)
            what = "OWL's statistics" if not sweep else "the global widths' statistics" if not observed else \
                "OWL's and the global widths' statistics"
            phases.append((f"collecting {what} (first sweep)", kept_scores + held + work, acts + transient, 0))
        if observed:
            phases.append(("OWL's outlier ratio (first sweep)", kept_scores + owl_score_bytes(observed), acts, 0))
        for r in sweep:
            kept_scores += r.scores
            phases.append(("unit scores of the global widths (first sweep)", kept_scores + r.scoring, acts, 0))
        for j, s in enumerate(sites):
            mine_h = group.get(s.name)
            others = sum(n * (hessian_bytes if first[g] > j else 4) for g, n in size.items()
                         if g != mine_h and last[g] > j)
            if mine_h is None:
                if s.name in (pruned or {}):
                    phases.append((f"pruning {s.name}", others + plan_bytes(pruned[s.name], s.out_features *
                                                                            s.in_features, act_bytes), acts, 0))
                continue
            solve = max((hessian_bytes + 4) * size[mine_h] if first[mine_h] == j else 0,  # fp64 sums and fp32 H a moment
                        3 * size[mine_h] * 4 + s.out_features * s.in_features * (4 + 1 + act_bytes))
            phases.append((f"solving {s.name}", others + solve, acts, 0))
        held = sum(r.held for _, r in mine)
        if held:
            phases.append(("collecting the rewrites' statistics", held + max(r.collect for _, r in mine),
                           acts + transient, 0))
        made = 0
        for name, r in mine:
            made += r.new
            if r.held or r.plan or r.new:
                phases.append((f"rewriting {name}", held + r.plan, acts, made))
        for phase, stats, activations, more in phases:
            if params + more + stats + activations > best[0]:
                best = (params + more + stats + activations, {"block": block, "phase": phase,
                                                              "block parameters": params + more,
                                                              "statistics": stats, "activations": activations})
    return best


def parse_bytes(text) -> int:
    """"24GiB", "512MB", "1.5G" or a number of bytes -> bytes ("GB": powers of 1000; "G", "GiB": of 1024)."""
    import re
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?)([bB]?)\s*", str(text))
    if m is None or (m.group(3) and not m.group(2)):
        raise ValueError(f"cannot read {text!r} as an amount of memory; write it as e.g. 24GiB, 512MB or 1.5G")
    number, unit, binary, b = m.groups()
    power = "kmgt".index(unit.lower()) + 1 if unit else 0
    base = 1000 if b and not binary else 1024  # "GB": 10^9; "G", "GiB": 2^30
    return int(float(number) * base ** power)


def check_whole_memory(model, recipe, budget: int, hessian_bytes: int = 8) -> None:
    """Refuse (CalibrationError) pruning a loaded model whole when its estimated peak exceeds `budget`:
    the model, the pruned weights' undo copies and decisions (two more copies at most), and, for a
    Hessian method, the Hessians of every linear (a whole-model run keeps them to the end)."""
    from torch import nn

    from ..techniques.configs import technique_for
    from ..techniques.targeting import normalize_recipe

    params = sum(p.numel() * p.element_size() for p in model.parameters())
    hessians = any("hessian" in technique_for(c).needs(c) for c in normalize_recipe(recipe).values() if c is not None)
    held = sum(m.in_features ** 2 * hessian_bytes for m in model.modules() if isinstance(m, nn.Linear)) if hessians else 0
    need = 3 * params + held
    if need > budget:
        raise CalibrationError(f"pruning the whole model needs ~{fmt_bytes(need)} (parameters {fmt_bytes(params)} three "
                               f"times, Hessians {fmt_bytes(held)}), more than --max-memory {fmt_bytes(budget)}; let "
                               "sparsecc prune load it one block at a time (leave out --no-onload)")
