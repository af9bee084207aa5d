"""Training after pruning: mask-preserving fine-tuning, LoRA, distillation (seeds 000, 002, 004).

    report = sparsecc.finetune_(pruned, batches, steps=200, method="lora", teacher=dense,
                                eval_batches=held_out)

weights.py: what is trained and how masks, N:M patterns and quantization grids are kept;
loop.py: the training loop and its report; resume.py: the checkpoint folder a run resumes from.
"""
from .loop import FinetuneReport, finetune_, merge_adapters_

__all__ = ["FinetuneReport", "finetune_", "merge_adapters_"]
