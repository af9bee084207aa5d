"""`finetune_`: train a pruned model on text while every pruned weight stays exactly zero.

The loss of a step (batch b, next-token targets y, padding skipped):

    L = (1 - λ)·CE(student(b), y) + λ·T²·KL(softmax(teacher(b)/T) ‖ softmax(student(b)/T))

with λ = `distill_weight` when a `teacher` (the dense model) is given, else L = CE (Hinton et al.
2015's temperature-scaled distillation; Minitron distils on the teacher's logits). AdamW, linear
warm-up then cosine decay to a tenth of `lr`, gradient norm clipped. The weights are trained through
weights.py's reparameterisation W_used = Q(W + s·B A) ⊙ M, so masks, N:M patterns and
quantization grids hold at every step, and the end state is exactly what the model computed.
Batch k of the run is `batches[perm_e[k mod n]]`, perm_e a seeded permutation per epoch e, and step k
seeds the random draws of its forward (dropout) with (seed, k), so a run resumed from its
`checkpoint_dir` draws what an uninterrupted one would.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CalibrationError, FinetuneError
from ..graph.calibration import batch_loss, logits_of, mean_loss, token_mask, validate_batches
from ..graph.capture import forward_model
from ..prune.quantize import grid_of
from . import precision, resume, weights

METHODS = ("full", "lora")
DEFAULT_LR = {"full": 1e-4, "lora": 1e-3}


@dataclass
class FinetuneReport:
    """What a `finetune_` run did: settings, losses, held-out loss before and after, costs."""
    method: str
    steps: int
    lr: float
    trainable: int                  # parameters trained (LoRA: the adapters')
    pruned_tensors: int             # weights with frozen zeros (>= 1%): linears, MoE experts
    quantized_linears: int
    rewritten_modules: int          # modules a sparsecc rewrite replaced or shrank (CATS, structured, ...)
    frozen_zeros: int               # weights held at exactly zero
    losses: list[float] = field(repr=False)
    seconds: float = 0.0
    teacher: bool = False
    distill_weight: float = 0.0
    temperature: float = 1.0
    rank: int | None = None
    merged: bool = True
    merge_seconds: float = 0.0
    adapter_params: int = 0         # LoRA parameters (what an unmerged adapter adds to the model)
    resumed_from: int = 0
    eval_before: dict | None = None  # {"loss", "ppl", "tokens"} on eval_batches
    eval_after: dict | None = None
    master_weights: bool = False    # fp32 master copies of half-precision tensors were trained
    skipped_steps: int = 0          # float16: steps skipped because a scaled gradient overflowed

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        head = f"{self.method} fine-tuning, {self.steps} steps, lr {self.lr:g}" + (
            f", rank {self.rank}" if self.rank else "") + (
            f", distilled (weight {self.distill_weight:g}, T {self.temperature:g})" if self.teacher else "")
        lines = [head, f"  trained {self.trainable:,} parameters; {self.frozen_zeros:,} pruned weights kept at zero in "
                       f"{self.pruned_tensors} weight tensors" + (f"; {self.quantized_linears} quantized linears kept on their "
                                                           "grids" if self.quantized_linears else "")]
        if self.losses:
            k = max(1, min(10, len(self.losses) // 5))
            lines.append(f"  train loss {sum(self.losses[:k]) / k:.4f} (first {k} steps) -> "
                         f"{sum(self.losses[-k:]) / k:.4f} (last {k})" +
                         (f"; resumed at step {self.resumed_from}" if self.resumed_from else ""))
        if self.master_weights:
            lines.append("  fp32 master weights" + (f"; {self.skipped_steps} steps skipped (float16 gradient overflow, "
                                                    "loss scale halved)" if self.skipped_steps else ""))
        if self.eval_before and self.eval_after:
            lines.append(f"  held-out perplexity {self.eval_before['ppl']:.2f} -> {self.eval_after['ppl']:.2f} "
                         f"({self.eval_after['tokens']:,} tokens)")
        if self.method == "lora":
            lines.append(f"  LoRA: {self.adapter_params:,} adapter parameters; " +
                         (f"merged as (W + BA) * mask in {self.merge_seconds:.3f}s (no extra inference cost)"
                          if self.merged else "kept as adapters (merge with sparsecc.merge_adapters_)"))
        lines.append(f"  {self.seconds:.1f}s")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def finetune_(model: nn.Module, batches, *, steps: int = 100, lr: float | None = None, method: str = "full",
              rank: int = 8, alpha: float | None = None, teacher: nn.Module | None = None,
              distill_weight: float = 0.5, temperature: float = 2.0, eval_batches=None, merge: bool = True,
              weight_decay: float = 0.0, warmup: int | None = None, grad_clip: float | None = 1.0,
              checkpoint_dir=None, save_every: int = 50, allow_dense: bool = False, seed: int = 0,
              master_weights: bool = True, progress: bool = True) -> FinetuneReport:
    """Fine-tune a pruned causal LM in place on `batches` (token ids [batch, seq], or dicts with
    input_ids and attention_mask), keeping every zero weight zero, N:M patterns and quantization
    grids intact; returns a FinetuneReport.

    method "full" trains every parameter; "lora" trains rank-`rank` adapters (scale alpha/rank,
    alpha defaulting to 2·rank) on every linear but lm_head, merged as (W + BA) ⊙ mask at the end
    (`merge=False` keeps them as adapters). `teacher` (the dense model, same vocabulary) adds
    distillation on its logits. `eval_batches`: held-out batches, their perplexity reported before
    and after. `checkpoint_dir`: the run's state is saved there every `save_every` steps and at
    the end, and a run started again with the same model and settings resumes from it.
    A model with nothing pruned is refused unless `allow_dense=True`. A bfloat16 or float16
    model trains fp32 master copies of its trained tensors (float16 with loss scaling; precision.py),
    4 bytes a trained parameter more; `master_weights=False` trains in the model's dtype (bfloat16
    only). A failure (Ctrl-C included) leaves the model as it was."""
    _check_settings(steps, lr, method, rank, alpha, distill_weight, temperature, weight_decay, warmup, grad_clip,
                    save_every)
    if torch.is_inference_mode_enabled():
        raise FinetuneError("finetune_ trains with autograd, which torch.inference_mode() switches off: call it "
                            "outside that block")
    lr = DEFAULT_LR[method] if lr is None else float(lr)
    alpha = 2.0 * rank if alpha is None else float(alpha)
    warmup = min(steps // 10, 100) if warmup is None else warmup
    batches = _checked_batches(model, batches, "fine-tuning")
    eval_batches = _checked_batches(model, eval_batches, "evaluation") if eval_batches is not None else None
    if teacher is not None:
        _check_teacher(model, teacher, batches[0])
    where = weights.packed(model)
    if where is not None:
        raise FinetuneError(f"{where} is packed (pack_ / compress_*): its weights are no longer trainable tensors; "
                            "fine-tune before packing, then pack the result")
    half = next((n for n, p in model.named_parameters() if p.dtype == torch.float16), None)
    if half is not None and not master_weights:
        raise FinetuneError(f"{half} is float16, in which AdamW's updates underflow: keep master_weights=True (fp32 "
                            "copies, loss scaling), or fine-tune in float32 (model.float())")
    targets = weights.find_targets(model, lora=method == "lora")
    others = weights.other_masks(model, targets)
    summary = weights.pruned_summary(model, targets, others)
    if not any(summary.values()):
        if not allow_dense:
            raise FinetuneError("the model has nothing pruned (no linear with zeros, no quantization grid, no sparsecc "
                                "rewrite): prune it first, or pass allow_dense=True to fine-tune it as a dense model")
        warnings.warn("fine-tuning a model with nothing pruned, as a dense model (allow_dense=True)", stacklevel=2)
    if method == "lora":
        for t in targets:
            out_f, in_f = weights.out_in(t.module, t.module.weight).shape
            if rank > min(out_f, in_f):
                raise FinetuneError(f"LoRA rank {rank} is larger than {t.name} ({out_f}x{in_f}) allows; use a rank "
                                    f"<= {min(out_f, in_f)}")
    run = {"method": method, "steps": steps, "lr": lr, "rank": rank if method == "lora" else None, "alpha": alpha,
           "distill_weight": distill_weight if teacher is not None else 0.0, "temperature": temperature,
           "weight_decay": weight_decay, "warmup": warmup, "grad_clip": grad_clip, "seed": seed,
           "batches": len(batches), "master_weights": bool(master_weights)}
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None

    t0 = time.perf_counter()
    before = _evaluate(model, eval_batches) if eval_batches is not None else None
    params = dict(model.named_parameters())
    saved = {n: p.detach().to("cpu", copy=True) for n, p in params.items()}  # the undo copy, off the device
    grads = {n: p.requires_grad for n, p in params.items()}
    if folder is not None:
        run["model"] = resume.fingerprint(saved)
    state = resume.load(folder, run) if folder is not None else None
    was_training, teacher_training = model.training, teacher.training if teacher is not None else False
    devices = sorted({p.device.index or 0 for p in params.values() if p.is_cuda})
    rng = torch.random.fork_rng(devices=devices)  # each step seeds its own dropout; the caller's RNG is kept
    rng.__enter__()
    hooks, grad_mode = [], torch.is_grad_enabled()
    try:
        trained = weights.attach(targets, rank, alpha, seed)
        if method == "full":
            hooks = weights.mask_gradients(model, others)
        trainable = _trainable(model, method, trained, grads)
        masters = precision.Masters(trainable, master_weights)  # what AdamW updates (fp32 copies of half tensors)
        opt = _optimizer(masters.tensors, lr, weight_decay)
        start, losses = 0, []
        if state is not None:
            with torch.no_grad():
                for i, p in enumerate(masters.tensors):
                    p.copy_(state["trained"][f"p{i}"])
            masters.copy_back()
            masters.load_state(state["scaler"])
            resume.restore_optimizer(opt, masters.tensors, state["moments"])
            start, losses = state["step"], list(state["losses"])
        model.train()
        if teacher is not None:
            teacher.eval()
        bar = range(start, steps)
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(bar, desc=f"fine-tuning ({method})", unit="step", initial=start, total=steps)
        order = _Order(len(batches), seed)
        for step in bar:
            torch.set_grad_enabled(True)  # also under a caller's torch.no_grad(); restored below
            torch.manual_seed(seed * 1_000_003 + step)  # dropout's draws: a function of the step (resumable)
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(step, steps, warmup)
            loss = _step_loss(model, batches[order[step]], teacher, distill_weight, temperature)
            if not torch.isfinite(loss):
                raise FinetuneError(f"the loss is {loss.item()} at step {step}: lower lr (now {lr:g})")
            masters.zero_grad(opt)
            masters.backward(loss)
            masters.step(opt, grad_clip)  # skipped (and the loss scale halved) on a float16 overflow
            losses.append(loss.item())
            if progress and step % 5 == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{opt.param_groups[0]['lr']:.2g}")
            if folder is not None and ((step + 1) % save_every == 0 or step + 1 == steps):
                resume.save(folder, run, step + 1, losses, masters.tensors, opt, masters.state())
        adapter_params = sum(p.numel() for p in trained) if method == "lora" else 0
        tm = time.perf_counter()
        merged = merge or method == "full"
        if merged:
            weights.merge(targets)
        merge_s = time.perf_counter() - tm
        frozen = _check_zeros(targets, model, others)
        for n, p in model.named_parameters():  # an unmerged adapter's frozen weight stays frozen
            p.requires_grad_(grads.get(n, not n.endswith(".original")))
        after = _evaluate(model, eval_batches) if eval_batches is not None else None
    except BaseException:
        _rollback(model, targets, saved, grads)
        raise
    finally:
        rng.__exit__(None, None, None)
        torch.set_grad_enabled(grad_mode)
        for h in hooks:
            h.remove()
        model.train(was_training)
        if teacher is not None:
            teacher.train(teacher_training)
    return FinetuneReport(method, steps, lr, sum(p.numel() for p in trainable), summary["masked"], summary["quantized"],
                          summary["rewritten"], frozen, losses, time.perf_counter() - t0, teacher is not None,
                          run["distill_weight"], temperature, rank if method == "lora" else None, merged, merge_s,
                          adapter_params, start, before, after,
                          any(m is not p for m, p in zip(masters.tensors, trainable)), masters.skipped)


def merge_adapters_(model: nn.Module) -> int:
    """Merge the LoRA adapters `finetune_(..., merge=False)` left on `model` as (W + BA) ⊙ mask
    (onto the grid of a quantized linear); returns how many were merged."""
    found = weights.adapters(model)
    targets = [weights.Target(n, m, None, None, True) for n, m in found]
    weights.merge(targets)
    return len(targets)


def _check_settings(steps, lr, method, rank, alpha, distill_weight, temperature, weight_decay, warmup, grad_clip,
                    save_every) -> None:
    def positive_int(name, v):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise FinetuneError(f"{name} must be a positive int, got {v!r}")

    positive_int("steps", steps)
    positive_int("save_every", save_every)
    if method not in METHODS:
        raise FinetuneError(f"method must be one of {METHODS}, got {method!r}")
    positive_int("rank", rank)
    for name, v in (("lr", lr), ("alpha", alpha), ("temperature", temperature), ("grad_clip", grad_clip)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or math.isinf(v)):
            raise FinetuneError(f"{name} must be a positive number, got {v!r}")
    if isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float)) or not 0 <= distill_weight <= 1:
        raise FinetuneError(f"distill_weight must be in [0, 1], got {distill_weight!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise FinetuneError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup < steps):
        raise FinetuneError(f"warmup must be an int in [0, steps={steps}), got {warmup!r}")


def _checked_batches(model: nn.Module, batches, what: str) -> list:
    try:
        batches = validate_batches(model, batches)
    except CalibrationError as e:
        raise FinetuneError(f"{what} batches: {e}".replace("calibration batch", "batch")) from None
    for i, b in enumerate(batches):
        ids = b if torch.is_tensor(b) else b.get("input_ids")
        mask = token_mask(b)
        if ids is None or ids.dim() != 2 or ids.shape[1] < 2 or (
                mask is not None and not bool((mask[:, 1:] & mask[:, :-1]).any())):
            raise FinetuneError(f"{what} batch {i} has no next token to predict (token ids [batch, seq] with seq >= 2 "
                                "real tokens needed): give longer text")
    return batches


def _check_teacher(model: nn.Module, teacher: nn.Module, batch) -> None:
    if not isinstance(teacher, nn.Module):
        raise FinetuneError(f"teacher must be a torch module (the dense model), got {type(teacher).__name__}")
    mine, theirs = (next(m.parameters()).device for m in (model, teacher))
    if mine != theirs:
        raise FinetuneError(f"the teacher is on {theirs} and the model on {mine}: put them on one device "
                            f"(teacher.to({str(mine)!r}))")
    probe = batch[:1] if torch.is_tensor(batch) else {k: v[:1] if torch.is_tensor(v) else v for k, v in batch.items()}
    ids = probe if torch.is_tensor(probe) else probe["input_ids"]
    with torch.no_grad():
        s, t = (logits_of(forward_model(m, probe), ids, "finetune_") for m in (model, teacher))
    if s.shape != t.shape:
        raise FinetuneError(f"the teacher's logits are {list(t.shape)}, the model's {list(s.shape)}: distil from a "
                            "model of the same vocabulary (the dense model the pruned one came from)")


def _trainable(model: nn.Module, method: str, trained: list, grads: dict) -> list[torch.Tensor]:
    """The tensors the optimizer updates, in a fixed order: the targets' (weights.attach), then,
    for a full run, every other parameter that required a gradient."""
    if method == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trained:
            p.requires_grad_(True)
        return trained
    ids = {id(p) for p in trained}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and grid_of(head) is not None:  # a quantized lm_head stays on its grid: frozen
        ids.add(id(head.weight))
    rest = [p for n, p in model.named_parameters() if id(p) not in ids and grads.get(n, True)
            and "parametrizations." not in n]
    return [p for p in trained if p.requires_grad] + rest


def _optimizer(params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.AdamW:
    decay = [p for p in params if p.dim() >= 2]  # no decay on norms and biases
    rest = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


class _Order:
    """Batch index of each step: a seeded permutation of the batches per epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.perms = n, seed, {}

    def __getitem__(self, step: int) -> int:
        epoch = step // self.n
        if epoch not in self.perms:
            self.perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self.perms[epoch][step % self.n])


def _step_loss(model, batch, teacher, distill_weight: float, temperature: float) -> torch.Tensor:
    ids = batch if torch.is_tensor(batch) else batch["input_ids"]
    logits = logits_of(forward_model(model, batch), ids, "finetune_")
    mask = token_mask(batch)
    keep = torch.ones_like(ids[:, 1:], dtype=torch.bool) if mask is None else mask[:, 1:] & mask[:, :-1]
    student = logits[:, :-1][keep].float()
    ce = F.cross_entropy(student, ids[:, 1:][keep])
    if teacher is None or distill_weight == 0:
        return ce
    with torch.no_grad():
        target = logits_of(forward_model(teacher, batch), ids, "finetune_")[:, :-1][keep].float()
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(target / t, -1), log_target=True,
                  reduction="batchmean") * t * t
    return (1 - distill_weight) * ce + distill_weight * kl


def _evaluate(model: nn.Module, batches: list) -> dict:
    """Mean next-token loss and perplexity on held-out batches (padding skipped), in eval mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [batch_loss(model, b, "fine-tuning's evaluation") for b in batches]
    finally:
        model.train(was)
    loss = mean_loss(parts, "fine-tuning's evaluation")
    return {"loss": loss, "ppl": math.exp(loss), "tokens": sum(c for _, c in parts)}


def _check_zeros(targets: list, model: nn.Module, others: dict) -> int:
    """Count the weights held at zero, and check every one is still exactly zero."""
    params = dict(model.named_parameters())
    masks = [(t.name, t.module.weight, t.mask) for t in targets if t.mask is not None]
    masks += [(n, params[n], m) for n, m in others.items()]
    total = 0
    for name, w, keep in masks:
        moved = int((w.detach()[~keep] != 0).sum())
        if moved:
            raise FinetuneError(f"{name}: {moved} pruned weights became nonzero (a sparsecc bug; please report it)")
        total += int((~keep).sum())
    return total


def _rollback(model: nn.Module, targets: list, saved: dict, grads: dict) -> None:
    weights.detach_all(targets)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in saved:
                p.copy_(saved[n])
            p.requires_grad_(grads.get(n, True))
