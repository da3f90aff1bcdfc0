"""How many parameters a MoeChat model has, from its sizes alone: no torch, nothing allocated.

The one count that params validation (does the model fit this machine?), the memory planner and the FLOPs
projection share; `MoeChatForCausalLM.parameter_counts` counts the built model and a test holds them equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moechat.model.configuration_moechat import MoeChatConfig


@dataclass(frozen=True)
class ParamCount:
    total: int
    embedding: int  # wte + wpe
    lm_head: int  # 0 when tied to wte


def count_params(model: MoeChatConfig, vocab_size: int) -> ParamCount:
    """Parameter count of MoeChatForCausalLM from its config (`vocab_size` given apart: params.yaml's
    architecture has none until the tokenizer is built), layer by layer (GPT-2 layout, biases on
    every Linear except the router and lm_head)."""
    d, f, e = model.n_embd, model.n_inner, model.num_experts
    embedding = vocab_size * d + model.n_positions * d
    attn = (d * 3 * d + 3 * d) + (d * d + d)
    mlp = (d * f + f) + (f * d + d)
    norms = 2 * (2 * d)
    n_moe = len(model.moe_layer_indices())
    n_dense = model.n_layer - n_moe
    blocks = n_dense * (attn + mlp + norms) + n_moe * (attn + norms + d * e + e * mlp)
    lm_head = 0 if model.tie_word_embeddings else vocab_size * d
    return ParamCount(total=embedding + blocks + 2 * d + lm_head, embedding=embedding, lm_head=lm_head)


