"""Tiny MoeChat configs, models, MoE blocks and token rows for the model tests, and the naive per-token MoE
every dispatch path is checked against."""

from __future__ import annotations

import torch

from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM
from moechat.model.modeling_moechat import MoeChatSparseMoeBlock


PAD, EOS = 60, 61


def tiny_config(**overrides) -> MoeChatConfig:
    kwargs = dict(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, num_experts=4,
                  num_experts_per_tok=2, moe_every=2, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    kwargs.update(overrides)
    return MoeChatConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> MoeChatForCausalLM:
    torch.manual_seed(seed)
    return MoeChatForCausalLM(tiny_config(**overrides))


def moe_block(seed: int = 0, **overrides) -> MoeChatSparseMoeBlock:
    torch.manual_seed(seed)
    block = MoeChatSparseMoeBlock(tiny_config(**overrides))
    for p in block.parameters():  # nn.Linear's default init is too flat to make routing interesting
        torch.nn.init.normal_(p, std=0.3)
    return block


def tokens(n: int, seed: int, high: int = PAD) -> torch.Tensor:
    return torch.randint(0, high, (1, n), generator=torch.Generator().manual_seed(seed))


def naive_moe(block: MoeChatSparseMoeBlock, x_ND: torch.Tensor) -> torch.Tensor:
    """Reference: per token, the renormalised top-k weighted sum of its experts' outputs."""
    probs = torch.softmax(x_ND @ block.router.weight.t(), dim=-1)
    out = torch.zeros_like(x_ND)
    for n in range(x_ND.shape[0]):
        w, idx = probs[n].topk(block.top_k)
        w = w / w.sum()
        for weight, e in zip(w, idx):
            out[n] += weight * block.experts[int(e)](x_ND[n : n + 1])[0]
    return out


