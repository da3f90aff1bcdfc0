"""The optimizer: AdamW parameter groups, and 8-bit AdamW (bitsandbytes) with 32-bit state for embeddings,
or DeepSpeed's CPU Adam under optimizer offload."""

from __future__ import annotations

from typing import Any

import torch

from moechat.config.params import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matmul weights only; none on biases, LayerNorms and embeddings (GPT-2/nanoGPT
    practice: decaying them shrinks scales and lookup rows without regularising anything)."""
    no_decay_ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, (torch.nn.Embedding, torch.nn.LayerNorm)):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if id(p) in no_decay_ids or name.endswith("bias") or p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, offload: bool) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(groups, **kw)
        keep_embeddings_in_32bit(model, bnb.optim.GlobalOptimManager.get_instance())
        return optimizer
    return torch.optim.AdamW(groups, **kw)


EMBEDDING_LIKE = ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight")


def keep_embeddings_in_32bit(model: torch.nn.Module, manager: Any) -> None:
    """32-bit Adam state for wte, wpe and lm_head under 8-bit AdamW, as bitsandbytes recommends for
    embeddings (Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization", Sec. 2.3: the
    embedding layer is where 8-bit state destabilised training; their StableEmbedding keeps its state in 32 bits).
    bitsandbytes keys overrides by parameter identity in its process-wide GlobalOptimManager and reads them
    when it creates each state, at the optimizer's first step."""
    named = dict(model.named_parameters(remove_duplicate=False))
    for name in EMBEDDING_LIKE:
        if name in named:  # a tied lm_head is wte, already listed
            manager.override_config(named[name], "optim_bits", 32)


