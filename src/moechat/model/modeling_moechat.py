"""MoeChatForCausalLM: GPT-2 (learned positions, pre-LN, GELU MLP with biases) with sparse MoE MLPs.

Self-contained (imports only torch and transformers) so that a saved folder loads with
`trust_remote_code=True` anywhere. The MoE block reads like Mixtral's: a router (fp32 logits, softmax,
top-k), experts that are plain GPT-2 MLPs (`experts.{j}.c_fc`, `experts.{j}.c_proj`), and a dispatcher
that sorts token assignments by expert and runs all experts as grouped matmuls, without a host sync.

Attention goes through transformers' attention interface (`attn_implementation`: sdpa by default, eager,
flash_attention_2, flex_attention) with masks from `transformers.masking_utils`, so padding, packed
documents (position ids restarting, as in padding-free training) and static caches are handled the way
every transformers model handles them.

Router outputs travel back through each block's return value (never through module state), so the
auxiliary losses are counted exactly once, also when the blocks are recomputed by activation
checkpointing; the model returns them as plain tensors (`router_*` fields).

Shape suffixes: B batch, T query length, K key length, D model width, N routed tokens, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
# registers torch.ops.transformers.grouped_mm_fallback, the loop the grouped matmul falls back to
from transformers.integrations import moe as _hf_moe  # noqa: F401
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput

try:
    from transformers.modeling_utils import slice_logits_to_keep
except ImportError:  # transformers < 5.20: the same function, copied, so exports load where serving stacks pin

    def slice_logits_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
        """The positions of `hidden_states` [B, T, D] whose logits are needed: the last `logits_to_keep`
        (an int, 0 = all), the positions in a 1-D tensor, per-row positions in a 2-D integer tensor, or the
        True positions of a 2-D boolean mask (flattened to [N, D])."""
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
            if logits_to_keep.dtype == torch.bool:
                return hidden_states[logits_to_keep]
            return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None)
        return hidden_states[:, logits_to_keep, :]

from .configuration_moechat import (
    MoeChatConfig,  # a sibling file, also in a saved folder
)


class MoeChatBackendError(RuntimeError):
    """The chosen `moe_backend` cannot run here; the message says how to install it or what to pick."""


# vLLM's Transformers backend builds the model with this attention implementation, then swaps every
# `experts` ModuleList for its own FusedMoE (SiLU, gate/up/down weights): a different function from ours.
VLLM_TRANSFORMERS_BACKEND_ATTENTION = "vllm"


def refuse_vllm_transformers_backend(config: MoeChatConfig) -> None:
    """Raise when vLLM's Transformers backend (`model_impl="transformers"`) is building this model."""
    if getattr(config, "_attn_implementation", None) == VLLM_TRANSFORMERS_BACKEND_ATTENTION:
        raise MoeChatBackendError(
            "MoeChatForCausalLM cannot run under vLLM's Transformers backend (model_impl='transformers'): it would "
            "replace the GELU experts with its own SiLU FusedMoE and serve a different function. Install the "
            "moechat-vllm plugin (`pip install -e serving/vllm` from the moechat repository) and serve with "
            "model_impl='auto' (the default)")


# ----------------------------------------------------------------------------------------------------
# Building blocks


class MoeChatMLP(nn.Module):
    """The GPT-2 MLP: Linear -> GELU (tanh approximation, GPT-2's `gelu_new`) -> Linear, with biases."""

    def __init__(self, n_embd: int, n_inner: int, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, n_inner)
        self.c_proj = nn.Linear(n_inner, n_embd)
        self.c_proj.is_residual_projection = True  # scaled init, see MoeChatPreTrainedModel._init_weights
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(gelu_then(self.c_proj, self.c_fc(x)))


def gelu_then(linear: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """linear(GELU(h)) without keeping GELU(h) for backward, which recomputes it from h (saved anyway for
    the GELU's own backward): one [tokens, n_inner] activation less per MLP.

    Non-reentrant checkpointing stops recomputing as soon as the tensors backward needs are saved again
    (torch's checkpoint early stop, on by default), which happens when `linear`'s matmul records its inputs,
    before it runs: backward reruns the GELU, never the matmul, provided the matmul is `linear`'s last op
    (tests/model/test_moe_dispatch.py counts them)."""
    if not torch.is_grad_enabled():
        return linear(F.gelu(h, approximate="tanh"))
    return checkpoint(lambda h: linear(F.gelu(h, approximate="tanh")), h, use_reentrant=False,
                      preserve_rng_state=False)  # no randomness inside: dropout comes after


def eager_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax(QK^T * scaling + mask) V, the reference every other backend is tested against and the
    only one that returns the attention weights. `attention_mask` is a [B, 1, T, K] boolean (True =
    attend) or additive float mask, as transformers' masking utilities build it."""
    scores_BHTK = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores_BHTK = scores_BHTK.masked_fill(~attention_mask, torch.finfo(scores_BHTK.dtype).min)
        else:
            scores_BHTK = scores_BHTK + attention_mask
    weights_BHTK = F.softmax(scores_BHTK, dim=-1, dtype=torch.float32).to(query.dtype)
    weights_BHTK = F.dropout(weights_BHTK, p=dropout, training=module.training)
    out_BTHd = torch.matmul(weights_BHTK, value).transpose(1, 2).contiguous()
    return out_BTHd, weights_BHTK


class MoeChatAttention(nn.Module):
    """Causal self-attention through transformers' attention interface (`config._attn_implementation`:
    sdpa by default, eager, flash_attention_2 or flex_attention), so the mask each backend needs
    (a boolean tensor, varlen sequence lengths, a FlexAttention block mask) comes from transformers'
    masking utilities and the fast kernels skip the masked tiles of packed documents."""

    def __init__(self, config: MoeChatConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.scaling = self.head_dim ** -0.5
        self.layer_idx = layer_idx
        self.is_causal = True
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x_BTD: torch.Tensor, attention_mask: Any, past_key_values: Optional[Cache],
                output_attentions: bool = False, **kwargs: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Returns the block's attention output and, with `output_attentions` (computed eagerly then), the
        weights [B, H, T, K]."""
        B, T, D = x_BTD.shape
        q, k, v = self.c_attn(x_BTD).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        y_BTHd, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                    dropout=self.dropout if self.training else 0.0, **kwargs)
        return self.resid_dropout(self.c_proj(y_BTHd.reshape(B, T, D))), weights


@dataclass
class RoutingResult:
    """What one MoE layer reports: the two router losses (scalars) and per-layer statistics."""

    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # LongTensor[E]: assignments chosen by the router (before capacity)
    dropped: torch.Tensor  # LongTensor[]: assignments dropped by capacity routing
    entropy: torch.Tensor  # mean router entropy over the routed tokens, nats


class MoeChatSparseMoeBlock(nn.Module):
    """Top-k routed GPT-2 MLP experts (Mixtral layout; GPT-2 MLPs as experts).

    Router logits are computed in fp32, softmaxed, the top-k kept and their weights renormalised to sum
    to 1, so a model whose experts are all equal computes exactly its dense parent (upcycling). Padding
    tokens (`token_mask` False) are not routed at all: their MLP output is zero, so they pass through the
    residual, and they count in no loss or statistic.

    Capacity routing (`capacity_factor > 0`) is a training-time device and applies only in training mode;
    in eval mode (evaluation, generate) the layer routes dropless, so cached and uncached generation agree.
    When it applies it is causal: tokens are ranked position-major (every row's position 0, then every
    row's position 1, ...), each token's k choices together, and an expert keeps the first `capacity`
    assignments in that order. The cap counts all B*T positions, padding included, so no token's routing
    depends on any later position (not even on whether later positions are padding).
    """

    def __init__(self, config: MoeChatConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.capacity_factor = config.capacity_factor
        self.backend = config.moe_backend
        self.expert_path: Optional[str] = None  # one of EXPERT_PATHS to force it; None: expert_path_for the device
        self.router = nn.Linear(config.n_embd, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [MoeChatMLP(config.n_embd, config.n_inner, config.dropout) for _ in range(config.num_experts)])
        if self.backend == "tutel":
            _import_tutel()

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits and probabilities in fp32 and the top-k expert ids with their weights."""
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            # Called as a module (engines that repack linears see it); fp32 unless a user cast it down.
            logits_NE = self.router(x_ND.to(self.router.weight.dtype)).float()
        probs_NE = logits_NE.softmax(dim=-1)
        weights_Nk, experts_Nk = probs_NE.topk(self.top_k, dim=-1)
        # Renormalised over the k chosen. For k=1 that is exactly 1, which would cut the router off from
        # the LM loss; p / stop_grad(p) keeps the value 1 and passes d(log p) to the router.
        norm_Nk1 = weights_Nk.sum(dim=-1, keepdim=True)
        weights_Nk = weights_Nk / (norm_Nk1.detach() if self.top_k == 1 else norm_Nk1)
        return logits_NE, probs_NE, weights_Nk, experts_Nk

    def capacity(self, n_positions: int) -> Optional[int]:
        """Per-expert assignment cap for a batch of `n_positions` (B*T) positions; None when dropless
        (`capacity_factor == 0`, or eval mode: capacity is a training-time device)."""
        if self.capacity_factor <= 0 or not self.training:
            return None
        return math.ceil(self.capacity_factor * n_positions * self.top_k / self.num_experts)

    def forward(self, x_BTD: torch.Tensor, token_mask_BT: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, RoutingResult]:
        B, T, D = x_BTD.shape
        cap = self.capacity(B * T)
        # Capacity priority follows the token order, so capacity routing ranks position-major (N = T*B):
        # then it is causal. Dropless routing does not depend on the order and skips that transpose copy.
        position_major = cap is not None
        x_ND = (x_BTD.transpose(0, 1) if position_major else x_BTD).reshape(B * T, D)
        valid_N = None
        if token_mask_BT is not None:
            valid_N = (token_mask_BT.t() if position_major else token_mask_BT).reshape(-1)
        if self.backend == "tutel":
            y_ND, result = self._forward_tutel(x_ND, valid_N, cap)
        else:
            logits_NE, probs_NE, weights_Nk, experts_Nk = self.route(x_ND)
            y_ND, tokens_per_expert, dropped = self._dispatch_torch(x_ND, weights_Nk, experts_Nk, cap, valid_N)
            result = self._losses(logits_NE, probs_NE, tokens_per_expert, dropped, valid_N)
        if position_major:
            return y_ND.view(T, B, D).transpose(0, 1).contiguous(), result
        return y_ND.view(B, T, D), result

    def _forward_tutel(self, x_ND: torch.Tensor, valid_N: Optional[torch.Tensor], cap: Optional[int]
                       ) -> tuple[torch.Tensor, RoutingResult]:
        """tutel's kernels take the routed tokens only: padding is gathered out first (a host sync)."""
        routed_idx = None if valid_N is None else valid_N.nonzero().squeeze(-1)
        x_routed = x_ND if routed_idx is None else x_ND[routed_idx]
        logits_NE, probs_NE, weights_Nk, experts_Nk = self.route(x_routed)
        y_routed, tokens_per_expert, dropped = self._dispatch_tutel(x_routed, weights_Nk, experts_Nk, cap)
        result = self._losses(logits_NE, probs_NE, tokens_per_expert, dropped, None)
        if routed_idx is None:
            return y_routed, result
        return x_ND.new_zeros(x_ND.shape).index_copy(0, routed_idx, y_routed), result

    def _dispatch_torch(self, x_ND: torch.Tensor, weights_Nk: torch.Tensor, experts_Nk: torch.Tensor,
                        cap: Optional[int], valid_N: Optional[torch.Tensor] = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sort the N*k (token, expert) assignments by expert and run all experts as two grouped matmuls.

        Everything stays on the device (no host sync): the group offsets are a device tensor, padding
        (`valid_N` False) and capacity-dropped assignments are sorted past the last group (a sentinel
        "expert E") where the grouped matmul does not compute, and every expert's weights enter the graph,
        so an expert that got no token still gets a (zero) gradient and DDP sees no unused parameter.

        Assignments are ordered token-major (token t's k choices before token t+1's), and the sort by
        expert is stable, so with a cap an expert keeps its earliest tokens and drops the rest: a token's
        routing never depends on a later token. Returns the output in x's dtype (the experts may run in
        bf16 under autocast while x, a LayerNorm output, is fp32), the per-expert assignment counts (router
        choices of the valid tokens, before capacity) and the number of dropped assignments.
        """
        n, k = experts_Nk.shape
        E = self.num_experts
        expert_A = experts_Nk.reshape(-1)  # A = n*k assignments, token-major
        token_A = torch.arange(n * k, device=x_ND.device) // k
        if valid_N is None:
            key_A = expert_A
        else:  # padding's assignments go to the sentinel group E
            key_A = expert_A.masked_fill(~valid_N.unsqueeze(1).expand(n, k).reshape(-1), E)
        counts = _count_per_group(key_A, E + 1)  # [E + 1], the last the padding sentinel
        order_A = torch.argsort(key_A, stable=True)
        key_S = key_A[order_A]
        kept = counts
        path = self.expert_path or expert_path_for(x_ND.device, _compute_dtype(x_ND), cap is not None)
        rank_S = None
        if cap is not None or path == "capacity_bmm":  # rank within the expert, in token order
            starts = torch.cumsum(counts, 0) - counts
            rank_S = torch.arange(n * k, device=x_ND.device) - starts[key_S]
        if cap is not None:  # past the cap -> sentinel, re-sort
            key_S = key_S.masked_fill(rank_S >= cap, E)
            resort = torch.argsort(key_S, stable=True)
            order_A, key_S, rank_S = order_A[resort], key_S[resort], rank_S[resort]
            kept = counts.clamp(max=cap)
        tokens_per_expert = counts[:E]
        dropped = (tokens_per_expert - kept[:E]).sum()
        offs_E = torch.cumsum(kept[:E], 0).to(torch.int32)
        dead_S1 = None if valid_N is None and cap is None else (key_S == E).unsqueeze(-1)
        token_S = token_A[order_A]
        if self._experts_are_plain_linears() and path == "capacity_bmm":  # each expert padded to `rows` rows
            y_SD = self._experts_batched(x_ND.index_select(0, token_S), key_S, rank_S, cap if cap is not None else n)
        elif self._experts_are_plain_linears():
            y_SD = self._experts_grouped(x_ND.index_select(0, token_S), key_S.clamp(max=E - 1), offs_E, dead_S1,
                                         loop=path == "loop")
        else:
            y_SD = self._experts_called(x_ND.index_select(0, token_S), offs_E)
        # Back to token-major order (a permutation: no scatter-add), then each token's k outputs weighted and
        # summed by one batched matmul in the experts' dtype, so backward keeps only that output (not fp32
        # copies of it, as an index_add of weighted rows would) and sums in a fixed order. Under autocast the
        # routing weights enter that matmul in bf16, as in Mixtral's weighted sum; router logits, softmax and
        # the router losses stay fp32.
        y_NkD = y_SD.index_select(0, _inverse_permutation(order_A)).view(n, k, y_SD.shape[-1])
        y_ND = torch.bmm(weights_Nk.unsqueeze(1).to(y_NkD.dtype), y_NkD).squeeze(1).to(x_ND.dtype)
        return y_ND, tokens_per_expert, dropped

    def _experts_are_plain_linears(self) -> bool:
        """The grouped path reads the experts' weights instead of calling their modules, so it runs only
        when a call would do nothing more: plain `nn.Linear`s without hooks. GPTQ calibration hooks them
        (each expert must see its own routed tokens) and a quantized model replaces them."""
        return all(type(m) is nn.Linear and not m._forward_hooks and not m._forward_pre_hooks
                   for e in self.experts for m in (e.c_fc, e.c_proj))

    def _experts_called(self, x_SD: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
        """Each expert module called on its rows (one host sync for the sizes); rows past the last group
        (padding, drops) stay zero."""
        ends = offs_E.tolist()
        sizes = [end - start for start, end in zip([0] + ends[:-1], ends)]
        chunks = x_SD.split(sizes + [x_SD.shape[0] - ends[-1]])
        outs = [expert(chunk) for expert, chunk in zip(self.experts, chunks) if chunk.shape[0] > 0]
        dtype = outs[0].dtype if outs else x_SD.dtype
        tail = x_SD.new_zeros(chunks[-1].shape, dtype=dtype)
        return torch.cat([out.to(dtype) for out in outs] + [tail])

    def _experts_grouped(self, x_SD: torch.Tensor, expert_S: torch.Tensor, offs_E: torch.Tensor,
                         dead_S1: Optional[torch.Tensor], loop: bool = False) -> torch.Tensor:
        """Every expert's GPT-2 MLP on its rows of the expert-sorted x_SD, in the autocast dtype.

        The per-expert `nn.Linear` weights are stacked here, each forward, so the parameters keep their
        names and layout (`experts.{j}.c_fc`, checkpoints, GPTQ and upcycling address them). Rows of
        `dead_S1` (past the last group) are left uninitialised by the grouped matmul, in the output and in
        its input gradient: they are zeroed before each matmul result is used and before the gather's
        backward sums them into x (torch's masked_fill backward zeroes their gradient).
        """
        dtype = _compute_dtype(x_SD)
        fc = [e.c_fc for e in self.experts]
        proj = [e.c_proj for e in self.experts]
        x_SD = x_SD.to(dtype)
        if dead_S1 is not None:
            x_SD = x_SD.masked_fill(dead_S1, 0.0)
        onehot_SE = _one_hot(expert_S, self.num_experts, dtype)
        h_SF = _grouped_linear(x_SD, _stack([m.weight for m in fc], dtype), _stack([m.bias for m in fc], dtype),
                               offs_E, onehot_SE, loop)
        if dead_S1 is not None:
            h_SF = h_SF.masked_fill(dead_S1, 0.0)
        proj_weight = _stack([m.weight for m in proj], dtype)
        if _grouped_mm_runs(h_SF, proj_weight) and not loop:
            y_SD = gelu_then(lambda a_SF: _grouped_matmul(a_SF, proj_weight, offs_E), h_SF)  # the matmul last
        else:  # the fallback op saves its inputs after it runs: early stop would recompute it, so keep the GELU
            y_SD = _grouped_matmul(F.gelu(h_SF, approximate="tanh"), proj_weight, offs_E, loop)
        y_SD = _add_expert_bias(y_SD, _stack([m.bias for m in proj], dtype), onehot_SE)
        if dead_S1 is not None:  # before the routing weight: its gradient reads y
            y_SD = y_SD.masked_fill(dead_S1, 0.0)
        return self.experts[0].dropout(y_SD)

    def _experts_batched(self, x_SD: torch.Tensor, key_S: torch.Tensor, rank_S: torch.Tensor, rows: int
                         ) -> torch.Tensor:
        """Every expert's GPT-2 MLP as two batched matmuls over an [E, rows, D] buffer: assignment s goes to
        row rank_S[s] of its expert's slab (GShard's dispatch layout). `rows` is known on the host (the cap, or
        the token count when dropless, which no expert can exceed), so nothing waits for the device; rows of
        the sentinel expert (padding, drops) land in one spare slot and read back zeros. Unfilled slots compute
        the bias path and are never read, so they give no gradient."""
        E, D = self.num_experts, x_SD.shape[-1]
        dtype = _compute_dtype(x_SD)
        slot_S = torch.where(key_S < E, key_S * rows + rank_S, E * rows)
        x_PD = x_SD.new_zeros(E * rows + 1, D, dtype=dtype).index_copy(0, slot_S, x_SD.to(dtype))
        fc = [e.c_fc for e in self.experts]
        proj = [e.c_proj for e in self.experts]
        fc_w, fc_b = _stack([m.weight for m in fc], dtype), _stack([m.bias for m in fc], dtype)
        proj_w, proj_b = _stack([m.weight for m in proj], dtype), _stack([m.bias for m in proj], dtype)
        h_ERF = torch.baddbmm(fc_b.unsqueeze(1), x_PD[:E * rows].view(E, rows, D), fc_w.transpose(1, 2))
        y_ERD = gelu_then(lambda a_ERF: torch.baddbmm(proj_b.unsqueeze(1), a_ERF, proj_w.transpose(1, 2)), h_ERF)
        y_PD = torch.cat([y_ERD.reshape(E * rows, D), y_ERD.new_zeros(1, D)])
        return self.experts[0].dropout(y_PD.index_select(0, slot_S))

    def _dispatch_tutel(self, x_ND: torch.Tensor, weights_Nk: torch.Tensor, experts_Nk: torch.Tensor,
                        cap: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dispatch with tutel's fast encode/decode kernels (tutel.moe's low-level API).

        Same router, experts, weights and drop order as the torch path: the expert ids, gates and slot
        locations handed to tutel are ours (tutel's `extract_critical` would rank all first choices
        before any second choice, which is not causal), and an assignment whose slot is past the cap is
        dropped by tutel's kernels exactly as the torch path drops it.

        The critical data follow `tutel.impls.fast_dispatch.extract_critical` (checked against tutel commit
        82af7aa): (num_experts, [expert id per token] * k, [slot per token] * k, [gate per token] * k,
        capacity, assignments per expert). fast_encode scatters each token into its expert's slot of an
        [E, capacity, D] buffer (zeros where no token landed); fast_decode gathers the slots back, times
        the gates (`is_postscore`), and sums a token's k outputs.
        """
        tutel_moe = _import_tutel()
        n, d = x_ND.shape
        expert_A = experts_Nk.reshape(-1)  # token-major, as in _dispatch_torch
        slot_A = (F.one_hot(expert_A, self.num_experts).cumsum(dim=0) - 1).gather(1, expert_A.unsqueeze(1))
        slot_Nk = slot_A.view(n, self.top_k).to(torch.int32)
        tokens_per_expert = torch.bincount(expert_A, minlength=self.num_experts)
        capacity = max(int(tokens_per_expert.max()) if n else 0, 1) if cap is None else cap
        # tutel's kernels take one contiguous [N] tensor per choice j (the k-th column of each [N, k] tensor)
        crit = (self.num_experts, list(experts_Nk.t().to(torch.int32).contiguous()),
                list(slot_Nk.t().contiguous()), list(weights_Nk.t().contiguous()), capacity, tokens_per_expert)
        x_ECD = tutel_moe.fast_encode(x_ND.contiguous(), crit)
        y_ECD = torch.stack([expert(x_ECD[e]) for e, expert in enumerate(self.experts)]).to(x_ND.dtype)
        y_ND = tutel_moe.fast_decode(y_ECD, crit).view(n, d)
        kept = tokens_per_expert if cap is None else tokens_per_expert.clamp(max=cap)
        return y_ND, tokens_per_expert, (tokens_per_expert - kept).sum()

    def _losses(self, logits_NE: torch.Tensor, probs_NE: torch.Tensor, tokens_per_expert: torch.Tensor,
                dropped: torch.Tensor, valid_N: Optional[torch.Tensor]) -> RoutingResult:
        """Switch load-balancing loss and ST-MoE z-loss over the routed (non-padding, `valid_N`) tokens.

        aux = E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4), with f_e the share of the N*k assignments
        that chose expert e and P_e the mean router probability of e; it equals 1 at perfect balance.
        z = mean_n logsumexp(logits_n)^2 (Zoph et al. 2022, eq. 5). Means are masked sums over a device
        count (no host sync); with no routed token every term is 0 and the graph stays attached.
        """
        z_N = torch.logsumexp(logits_NE, dim=-1).pow(2)
        entropy_N = -(probs_NE * F.log_softmax(logits_NE, dim=-1)).sum(dim=-1)
        if valid_N is None:
            n = max(probs_NE.shape[0], 1)
            mean_probs_E, z, entropy = probs_NE.sum(dim=0) / n, z_N.sum() / n, entropy_N.sum() / n
        else:
            w_N = valid_N.to(probs_NE.dtype)
            n = w_N.sum().clamp(min=1)
            mean_probs_E = (probs_NE * w_N.unsqueeze(-1)).sum(dim=0) / n
            z, entropy = (z_N * w_N).sum() / n, (entropy_N * w_N).sum() / n
        f_E = tokens_per_expert.to(probs_NE.dtype) / (n * self.top_k)
        aux = self.num_experts * torch.sum(f_E * mean_probs_E)
        return RoutingResult(aux, z, tokens_per_expert, dropped, entropy.detach())


def _count_per_group(group_A: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Assignments per group id, on the device (`bincount` syncs on CUDA to size its output)."""
    return torch.zeros(n_groups, dtype=torch.long, device=group_A.device).index_add_(
        0, group_A, torch.ones_like(group_A))


def _inverse_permutation(order_A: torch.Tensor) -> torch.Tensor:
    """inverse[order[i]] = i, on the device (a scatter, not a second sort)."""
    positions = torch.arange(order_A.numel(), device=order_A.device)
    return torch.empty_like(order_A).scatter_(0, order_A, positions)


EXPERT_PATHS = ("grouped_mm", "capacity_bmm", "loop")


def expert_path_for(device: torch.device, dtype: torch.dtype, capped: bool) -> str:
    """The expert path that runs here without host syncs, as far as one exists.

    `torch._grouped_mm` runs its sync-free kernel on CUDA sm90/sm100 in bf16 only (PyTorch's GroupedBlas.cpp,
    `_grouped_mm_cuda`: elsewhere `_grouped_mm_fallback` copies the offsets to the host, one sync per grouped
    matmul, and the Triton template of torch.compile also needs sm90); on CPU there is no device to wait for.
    Elsewhere capacity routing (`capped`) runs as batched matmuls over [E, capacity] slabs, sync-free. Dropless
    routing keeps the grouped matmul and its syncs (three per grouped matmul with backward: 6 per MoE layer per
    micro-batch): a sync-free dropless layout would pad every expert to all N tokens, E / k times the FLOPs."""
    if device.type != "cuda":
        return "grouped_mm"
    native = torch.cuda.get_device_capability(device) in ((9, 0), (10, 0)) and dtype == torch.bfloat16
    if native or not capped:
        return "grouped_mm"
    return "capacity_bmm"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's where it is on, else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _stack(tensors: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[E, ...] copy of the experts' parameters in the compute dtype (the grouped matmul does not autocast)."""
    return torch.stack([t.to(dtype) for t in tensors])


def _grouped_mm_runs(x_SI: torch.Tensor, weight_EOI: torch.Tensor) -> bool:
    """Whether `F.grouped_mm` takes these operands. Its contract (torch 2.13): row strides that are multiples
    of 16 bytes, int32 offsets, on CUDA an sm80+ GPU (Ampere or newer); under torch.compile its fake
    kernel accepts bf16 only (eager CPU also runs fp32)."""
    aligned = all(dim * x_SI.element_size() % 16 == 0 for dim in weight_EOI.shape[1:])
    if torch.compiler.is_compiling() and x_SI.dtype != torch.bfloat16:
        return False
    if x_SI.device.type == "cuda":
        return aligned and torch.cuda.get_device_capability(x_SI.device) >= (8, 0)
    return aligned and x_SI.device.type == "cpu"


def _grouped_linear(x_SI: torch.Tensor, weight_EOI: torch.Tensor, bias_EO: torch.Tensor, offs_E: torch.Tensor,
                    onehot_SE: torch.Tensor, loop: bool = False) -> torch.Tensor:
    """y = x @ W_e^T + b_e for each row with its group's e; groups are the row ranges ending at offs_E."""
    return _add_expert_bias(_grouped_matmul(x_SI, weight_EOI, offs_E, loop), bias_EO, onehot_SE)


def _grouped_matmul(x_SI: torch.Tensor, weight_EOI: torch.Tensor, offs_E: torch.Tensor, loop: bool = False
                    ) -> torch.Tensor:
    """x @ W_e^T for each row range ending at offs_E. Where the grouped matmul cannot run (or `loop` forces
    it), transformers' fallback op loops over the experts (one host sync for the offsets; an opaque custom
    op, so torch.compile does not break the graph on it either)."""
    if _grouped_mm_runs(x_SI, weight_EOI) and not loop:
        return F.grouped_mm(x_SI, weight_EOI.transpose(-2, -1), offs=offs_E)
    return torch.ops.transformers.grouped_mm_fallback(x_SI, weight_EOI.transpose(-2, -1), offs_E)


def _one_hot(expert_S: torch.Tensor, n_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[S, E] rows of 0/1 (F.one_hot checks its input's range with a host sync on CPU)."""
    return (expert_S.unsqueeze(-1) == torch.arange(n_experts, device=expert_S.device)).to(dtype)


def _add_expert_bias(y_SO: torch.Tensor, bias_EO: torch.Tensor, onehot_SE: torch.Tensor) -> torch.Tensor:
    """y + b_e for each row's expert e, as y + onehot @ bias: one fused BLAS call, whose backward sums each
    expert's rows with a matmul (deterministic and far faster on CPU than the scatter-add that the
    backward of gathering bias rows by index does)."""
    return torch.addmm(y_SO, onehot_SE, bias_EO)


def _import_tutel():
    try:
        from tutel import moe as tutel_moe
    except ImportError as err:
        raise MoeChatBackendError(
            "model.moe_backend=tutel but tutel is not importable here "
            f"({err}). tutel is not on PyPI: build it from source with `pip install --no-build-isolation "
            "git+https://github.com/microsoft/tutel@82af7aa` (the commit moechat is checked against), or set "
            "model.moe_backend: torch (the default, same results)") from err
    return tutel_moe


class MoeChatBlock(GradientCheckpointingLayer):
    """Pre-LN GPT-2 block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), the MLP dense or MoE."""

    def __init__(self, config: MoeChatConfig, layer_idx: int):
        super().__init__()
        self.is_moe = config.is_moe_layer(layer_idx)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = MoeChatAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        if self.is_moe:
            self.mlp = MoeChatSparseMoeBlock(config)
        else:
            self.mlp = MoeChatMLP(config.n_embd, config.n_inner, config.dropout)

    def forward(self, x_BTD: torch.Tensor, attention_mask: Any = None, token_mask_BT: Optional[torch.Tensor] = None,
                past_key_values: Optional[Cache] = None, **kwargs: Any) -> tuple[Optional[torch.Tensor], ...]:
        """Returns (hidden, attention weights or None) for a dense block and (hidden, weights, aux, z,
        tokens_per_expert, dropped, entropy) for an MoE block: a flat tuple, so checkpointing carries the
        router losses' graph."""
        a_BTD, weights = self.attn(self.ln_1(x_BTD), attention_mask, past_key_values, **kwargs)
        x_BTD = x_BTD + a_BTD
        if not self.is_moe:
            return x_BTD + self.mlp(self.ln_2(x_BTD)), weights
        y_BTD, r = self.mlp(self.ln_2(x_BTD), token_mask_BT)
        return x_BTD + y_BTD, weights, r.aux_loss, r.z_loss, r.tokens_per_expert, r.dropped, r.entropy


# ----------------------------------------------------------------------------------------------------
# Models


@dataclass
class MoeChatModelOutput(ModelOutput):
    """Tensors only. Per-MoE-layer rows follow `config.moe_layer_indices()`.

    `router_aux_loss` / `router_z_loss`: one 0-dim FloatTensor per MoE layer, every call (the causal LM
    sums them into its loss; batch statistics, so not rows of a [n_moe_layers] tensor). With
    `output_router_stats=True` also `router_tokens_per_expert` LongTensor[n_moe_layers, E] (top-k
    assignments chosen, before capacity), `router_dropped` LongTensor[n_moe_layers] (dropped by capacity
    routing, training mode only) and `router_entropy` FloatTensor[n_moe_layers] (mean router entropy over
    routed tokens, nats; ln E is uniform).
    """

    last_hidden_state: Optional[torch.Tensor] = None
    past_key_values: Optional[Cache] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None
    router_aux_loss: Optional[tuple[torch.Tensor, ...]] = None
    router_z_loss: Optional[tuple[torch.Tensor, ...]] = None
    router_tokens_per_expert: Optional[torch.LongTensor] = None
    router_dropped: Optional[torch.LongTensor] = None
    router_entropy: Optional[torch.Tensor] = None


@dataclass
class MoeChatCausalLMOutput(ModelOutput):
    """`loss` = lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss; the parts come back separately.

    The `router_*` statistics (only with `output_router_stats=True`) are as in MoeChatModelOutput: plain
    tensors, one row per MoE layer (`config.moe_layer_indices()`), left on the device (no host sync).
    """

    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    past_key_values: Optional[Cache] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None
    router_tokens_per_expert: Optional[torch.LongTensor] = None
    router_dropped: Optional[torch.LongTensor] = None
    router_entropy: Optional[torch.Tensor] = None


class MoeChatPreTrainedModel(PreTrainedModel):
    config_class = MoeChatConfig
    config: MoeChatConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoeChatBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    # Attention goes through ALL_ATTENTION_FUNCTIONS; each backend declared here is tested
    # (tests/model/test_modeling.py, tests/model/test_hf_common.py; flash_attention_2 needs a CUDA device).
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # routing has data-dependent shapes
    _keep_in_fp32_modules = ["router"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2 init: N(0, 0.02) weights, zero biases, and the residual projections (attention and MLP
        `c_proj`, every expert's too) scaled to 0.02 / sqrt(2 * n_layer) (Radford et al. 2019, sec. 2.3)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "is_residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    def _flag(self, value: Optional[bool], name: str) -> bool:
        """A per-call output flag, defaulting to the config's (transformers' convention)."""
        return bool(getattr(self.config, name)) if value is None else bool(value)


class MoeChatModel(MoeChatPreTrainedModel):
    """Embeddings, blocks and the final LayerNorm (parameter names as in GPT-2: wte, wpe, h.{i}, ln_f)."""

    def __init__(self, config: MoeChatConfig):
        refuse_vllm_transformers_backend(config)
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([MoeChatBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.wte = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_stats: bool = False,
        token_mask: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs: Any,
    ) -> MoeChatModelOutput | tuple:
        """`attention_mask`: 2D [B, past + T] (0 = padding) or a prepared 4D mask. Without it, position
        ids that restart inside a row mark packed documents, which attend only within themselves (as
        transformers does for padding-free batches). `token_mask` [B, T] (True = real token) decides which
        tokens the MoE layers route and count; by default the attention mask decides, never a token id."""
        output_attentions = self._flag(output_attentions, "output_attentions")
        output_hidden_states = self._flag(output_hidden_states, "output_hidden_states")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if output_attentions and self.config._attn_implementation not in ("eager", "sdpa"):
            raise ValueError(f"output_attentions=True needs attn_implementation 'eager' or 'sdpa' (the "
                             f"{self.config._attn_implementation!r} kernels never form the weights); load the "
                             f"model with attn_implementation='eager' or call model.set_attn_implementation('eager')")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        B, T, _ = inputs_embeds.shape
        use_cache = self._flag(use_cache, "use_cache") and not (self.gradient_checkpointing and self.training)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        known_max = None  # a bound on the position ids known on the host, when they are ours
        if position_ids is None:
            position_ids = self._default_position_ids(attention_mask, B, T, past, inputs_embeds.device)
            known_max = past + T - 1
        position_ids = position_ids.view(-1, T).expand(B, T)
        self._check_positions(position_ids, known_max)

        # An empty dynamic cache sizes the mask like no cache, and only without one does transformers
        # read packed documents from the position ids; a static cache fixes the key length, so it goes in.
        mask_cache = past_key_values if past > 0 or getattr(past_key_values, "is_compileable", False) else None
        # With output_attentions the sdpa model computes that call's attention eagerly (transformers' convention),
        # so its boolean mask must be materialised rather than left to sdpa's is_causal.
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  past_key_values=mask_cache, position_ids=position_ids,
                                  allow_is_causal_skip=not output_attentions)
        if token_mask is None:
            token_mask = self._routed_tokens(attention_mask, past, T)
        x_BTD = self.drop(inputs_embeds + self.wpe(position_ids))
        hidden_states, attentions, routing = [], [], []
        for block in self.h:
            if output_hidden_states:
                hidden_states.append(x_BTD)
            x_BTD, weights, *router = block(x_BTD, attention_mask=mask, token_mask_BT=token_mask,
                                             past_key_values=past_key_values, position_ids=position_ids,
                                             output_attentions=output_attentions, **kwargs)
            attentions.append(weights)
            if router:
                routing.append(router)
        x_BTD = self.ln_f(x_BTD)
        out = MoeChatModelOutput(
            last_hidden_state=x_BTD, past_key_values=past_key_values,
            hidden_states=(*hidden_states, x_BTD) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            **self._stack_routing(routing, x_BTD.device, output_router_stats))
        return out if self._flag(return_dict, "return_dict") else out.to_tuple()

    @staticmethod
    def _default_position_ids(attention_mask: Optional[torch.Tensor], B: int, T: int, past: int,
                              device: torch.device) -> torch.Tensor:
        """Positions count real tokens only, so a left-padded row gets the same positions as unpadded."""
        if attention_mask is None or attention_mask.dim() != 2:
            return torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]

    def _check_positions(self, position_ids_BT: torch.Tensor, known_max: Optional[int]) -> None:
        """Refuse positions past the learned table, by the largest position id (not the row length), so a
        padding-free row of several documents is fine as long as each fits. No host sync when the bound
        known on the host proves it, nor in training (an asynchronous device-side check: a training step
        must not wait for the GPU; the packed rows were checked when they were prepared)."""
        n = self.config.n_positions
        if known_max is not None and known_max < n:
            return
        if self.training:
            torch._assert_async(position_ids_BT.max() < n, f"a position id exceeds the model's n_positions={n}")
            return
        largest = int(position_ids_BT.max())
        if largest >= n:
            raise ValueError(f"position id {largest} exceeds the model's n_positions={n}: cut the documents (or "
                             f"the prompt plus max_new_tokens) to {n} tokens")

    @staticmethod
    def _routed_tokens(attention_mask: Any, past: int, T: int) -> Optional[torch.Tensor]:
        """[B, T] True where a token is real, read from the attention mask: a 2D mask directly, a 4D mask
        by whether each query may attend to itself (a padding query may not). None routes every token
        (no mask, or a FlexAttention BlockMask, which cannot be read back)."""
        if not isinstance(attention_mask, torch.Tensor):
            return None
        if attention_mask.dim() == 2:
            return attention_mask[:, -T:].bool()
        if attention_mask.shape[-1] < past + T:
            raise ValueError(f"4D attention_mask has {attention_mask.shape[-1]} key positions; past {past} + new {T} "
                             f"tokens need at least {past + T}")
        q = torch.arange(T, device=attention_mask.device)
        self_BT = attention_mask[:, 0, q, q + past]
        return self_BT if self_BT.dtype == torch.bool else self_BT == 0

    def _stack_routing(self, routing: list[list[torch.Tensor]], device: torch.device,
                       with_stats: bool) -> dict[str, Any]:
        """Per-layer router losses as tuples of scalars; statistics stacked into one row per MoE layer."""
        if not routing:
            out = {"router_aux_loss": (), "router_z_loss": ()}
            if with_stats:
                zeros = torch.zeros(0, device=device)
                out.update(router_tokens_per_expert=torch.zeros(0, self.config.num_experts, dtype=torch.long,
                                                                device=device),
                           router_dropped=zeros.long(), router_entropy=zeros)
            return out
        aux, z, tokens_per_expert, dropped, entropy = zip(*routing)
        out = {"router_aux_loss": aux, "router_z_loss": z}
        if with_stats:
            out.update(router_tokens_per_expert=torch.stack(tokens_per_expert), router_dropped=torch.stack(dropped),
                       router_entropy=torch.stack(entropy))
        return out


# Rows of logits per chunk: 1024 x 50260 is 0.2 GiB in fp32, under what one MoE block's backward holds at the
# reference micro-batch (so smaller chunks would not lower the step's peak), and few enough chunks that the
# head weight's fp32 gradient is updated only a handful of times per micro-batch.
LOSS_CHUNK_TOKENS = 1024


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum_n CE(h_n @ W^T, t_n) over targets != -100, chunk by chunk; nothing of the logits is saved.

    Forward keeps only a running fp32 sum; backward recomputes each chunk's logits and forms
    d logits = softmax - onehot(target) (rows of ignored targets zero) to get dh and dW. Under autocast the
    matmuls run in the autocast dtype like `nn.Linear` would, the softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                chunk_tokens: int) -> torch.Tensor:
        device_type = hidden_ND.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden_ND.dtype
        ctx.save_for_backward(hidden_ND, weight_VD, targets_N)
        ctx.chunk_tokens, ctx.dtype = chunk_tokens, dtype
        weight = weight_VD.to(dtype)
        acc = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for fp64 inputs (gradcheck)
        total = hidden_ND.new_zeros((), dtype=acc)
        with torch.autocast(device_type, enabled=False):
            for h_CD, t_C in zip(hidden_ND.split(chunk_tokens), targets_N.split(chunk_tokens)):
                logits_CV = (h_CD.to(dtype) @ weight.t()).to(acc)
                total = total + F.cross_entropy(logits_CV, t_C, ignore_index=-100, reduction="sum")
                del logits_CV  # before the next chunk's: one chunk of logits at a time
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        hidden_ND, weight_VD, targets_N = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk_tokens
        weight = weight_VD.to(dtype)
        grad_hidden = torch.empty_like(hidden_ND) if ctx.needs_input_grad[0] else None
        acc = torch.promote_types(dtype, torch.float32)
        grad_weight = torch.zeros_like(weight_VD, dtype=acc) if ctx.needs_input_grad[1] else None
        with torch.autocast(hidden_ND.device.type, enabled=False):
            for start in range(0, hidden_ND.shape[0], chunk):
                h_CD, t_C = hidden_ND[start:start + chunk].to(dtype), targets_N[start:start + chunk]
                grad_CV = (h_CD @ weight.t()).to(acc).softmax(dim=-1)
                valid_C1 = (t_C != -100).unsqueeze(-1)
                grad_CV.scatter_add_(1, t_C.clamp(min=0).unsqueeze(-1), -valid_C1.to(acc))  # - onehot
                grad_CV = grad_CV.mul_(valid_C1 * grad_total).to(dtype)  # in place: one fp32 chunk at a time
                if grad_hidden is not None:
                    grad_hidden[start:start + chunk] = grad_CV @ weight
                if grad_weight is not None:
                    grad_weight += grad_CV.t() @ h_CD
                del grad_CV  # before the next chunk's logits: two chunk buffers at a time, not three
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight_VD.dtype)
        return grad_hidden, grad_weight, None, None


class MoeChatForCausalLM(MoeChatPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: MoeChatConfig):
        super().__init__(config)
        self.transformer = MoeChatModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_router_stats: bool = False,
        return_dict: Optional[bool] = None,
        num_items_in_batch: Optional[int | torch.Tensor] = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> MoeChatCausalLMOutput | tuple:
        """Logits, and with `labels` (or `shift_labels`) the loss. `labels` are shifted here (label t is
        predicted at t-1); `shift_labels`, already shifted (context/sequence parallelism hands each rank its
        slice), take precedence, as in transformers. -100 is ignored, and the LM loss is the mean over real
        targets (or their sum divided by `num_items_in_batch`, for exact gradient accumulation).

        In training mode with targets the loss is chunked (`chunked_lm_loss`) and `logits` is None
        (liger-kernel's convention): the full [B, T, V] logits are never held. In eval mode the logits are
        returned and the loss is computed from them, unless `logits_to_keep` keeps only some positions
        (a validation loop that wants the loss alone passes 1): then the loss is chunked too.

        Without an attention mask, the pad tail of a packed row (the last document when none of its
        labels is a target) is not routed: `prepare` pads rows that way."""
        targets_BT = shift_labels if shift_labels is not None else labels
        out = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            output_router_stats=output_router_stats, return_dict=True,
            token_mask=self._packed_pad_tail_mask(attention_mask, position_ids, targets_BT), **kwargs)
        hidden_BTD = out.last_hidden_state
        if shift_labels is not None:
            hidden_BTD, targets_BT = hidden_BTD, shift_labels
        elif labels is not None:
            hidden_BTD, targets_BT = hidden_BTD[:, :-1], labels[:, 1:]
        aux_loss, z_loss = self._router_losses(out.router_aux_loss, out.router_z_loss, out.last_hidden_state)
        logits = lm_loss = loss = None
        if targets_BT is None or not self.training:
            logits = self.lm_head(slice_logits_to_keep(out.last_hidden_state, logits_to_keep))
        if targets_BT is not None:
            if logits is not None and isinstance(logits_to_keep, int) and logits_to_keep == 0:
                lm_loss = self.lm_loss(logits if shift_labels is not None else logits[:, :-1], targets_BT,
                                       num_items_in_batch)  # the full logits exist anyway
            else:
                lm_loss = self.chunked_lm_loss(hidden_BTD, self.lm_head.weight, targets_BT, num_items_in_batch)
        if lm_loss is not None:
            loss = lm_loss + self.config.aux_loss_coef * aux_loss + self.config.z_loss_coef * z_loss
        result = MoeChatCausalLMOutput(
            loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss, logits=logits,
            past_key_values=out.past_key_values, hidden_states=out.hidden_states, attentions=out.attentions,
            router_tokens_per_expert=out.router_tokens_per_expert, router_dropped=out.router_dropped,
            router_entropy=out.router_entropy)
        return result if self._flag(return_dict, "return_dict") else result.to_tuple()

    @staticmethod
    def _packed_pad_tail_mask(attention_mask: Optional[torch.Tensor], position_ids: Optional[torch.Tensor],
                              targets_BT: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[B, T] False on the pad tail of packed rows, read from positions and targets (no host sync).

        Only without an attention mask (which otherwise decides) and with packed positions and targets:
        the tail is the last document of a row (from the last restart of the position ids) when it has
        more than zero documents before it and no target; None when there is nothing to decide."""
        if attention_mask is not None or position_ids is None or targets_BT is None:
            return None
        position_ids = position_ids.view(-1, targets_BT.shape[1]).expand_as(targets_BT)
        restarts_BT = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1
        document_BT = restarts_BT.cumsum(-1)
        in_tail_BT = document_BT == document_BT[:, -1:]
        tail_has_target_B1 = ((targets_BT != -100) & in_tail_BT).any(-1, keepdim=True)
        is_packed_B1 = document_BT[:, -1:] > 0
        return ~(in_tail_BT & ~tail_has_target_B1 & is_packed_B1)

    @staticmethod
    def chunked_lm_loss(hidden_BTD: torch.Tensor, head_weight_VD: torch.Tensor, targets_BT: torch.Tensor,
                        num_items_in_batch: Optional[int | torch.Tensor] = None,
                        chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
        """Cross-entropy of `hidden @ head_weight^T` against the already-shifted `targets` (-100 ignored),
        summed in fp32 and divided by the target count (or `num_items_in_batch`), without ever holding the
        full [tokens, vocab] logits: `chunk_tokens` rows at a time, the head recomputed in backward.

        Same value and gradients as `lm_loss(lm_head(hidden), labels)` within fp32 rounding; peak extra
        memory is one chunk's logits (compute dtype) and their fp32 softmax instead of ~16 bytes per logit.
        `forward` uses it whenever labels are given and then, in training mode only, returns `logits=None`
        (liger-kernel's convention); in eval mode the logits are computed as well for outside callers.
        """
        hidden_ND = hidden_BTD.reshape(-1, hidden_BTD.shape[-1])
        targets_N = targets_BT.reshape(-1).to(hidden_ND.device)
        total = _ChunkedCrossEntropy.apply(hidden_ND, head_weight_VD, targets_N, chunk_tokens)
        count = num_items_in_batch if num_items_in_batch is not None else (targets_N != -100).sum().clamp(min=1)
        return total / count

    @staticmethod
    def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor,
                num_items_in_batch: Optional[int | torch.Tensor] = None) -> torch.Tensor:
        """Cross-entropy in fp32 of already shifted targets (targets[:, t] is predicted by logits[:, t]) over
        targets != -100 (0 when there are none). The one place the LM loss is computed."""
        logits = logits_BTV.reshape(-1, logits_BTV.shape[-1]).float()
        targets = targets_BT.reshape(-1).to(logits.device)
        total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum().clamp(min=1)
        return total / count

    @staticmethod
    def _router_losses(aux_per_layer: tuple[torch.Tensor, ...], z_per_layer: tuple[torch.Tensor, ...],
                       logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over MoE layers of the per-layer aux and z losses (zeros for a model without MoE layers).

        Summed, not averaged: Switch Transformer (Fedus et al. 2022, Sec. 2.2) and ST-MoE (Zoph et al.
        2022, Sec. 3.1) add alpha x aux (alpha = 0.01) and c_z x z (c_z = 0.001) for every router, so the
        published coefficients hold per layer whatever the depth; a mean would divide each layer's weight by
        the number of MoE layers (4 in the reference). (transformers' Mixtral pools the layers' counts into one
        loss instead, which is neither.)
        """
        if not aux_per_layer:
            zero = logits.new_zeros((), dtype=torch.float32)  # logits: any tensor on the device
            return zero, zero
        aux = torch.stack(aux_per_layer).sum()
        z = torch.stack(z_per_layer).sum()
        return aux, z

    # --- accounting -------------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, int]:
        """Total and per-token active parameters, with and without the embeddings (wte, wpe).

        Active counts every parameter except the experts a token does not use: in each MoE layer
        top_k of num_experts experts. `lm_head` is not an embedding here (it is a matmul per token);
        when tied it is the same tensor as wte and counted once, with the embeddings.
        """
        total = sum(p.numel() for p in self.parameters())
        embedding = self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        idle = 0
        for block in self.transformer.h:
            if block.is_moe:
                per_expert = sum(p.numel() for p in block.mlp.experts[0].parameters())
                idle += (self.config.num_experts - self.config.num_experts_per_tok) * per_expert
        active = total - idle
        return {"total": total, "active": active, "total_non_embedding": total - embedding,
                "active_non_embedding": active - embedding}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * N + 12 * n_layer * n_embd * seq_len (PaLM, Chowdhery et al. 2022,
        appendix B), N the active non-embedding parameters including the lm_head matmul."""
        n = self.parameter_counts()["active_non_embedding"]
        if self.config.tie_word_embeddings:
            n += self.config.vocab_size * self.config.n_embd
        return float(6 * n + 12 * self.config.n_layer * self.config.n_embd * seq_len)


__all__ = ["MoeChatForCausalLM", "MoeChatModel", "MoeChatPreTrainedModel", "MoeChatCausalLMOutput",
           "MoeChatModelOutput",
           "MoeChatSparseMoeBlock", "MoeChatMLP", "MoeChatBackendError", "EXPERT_PATHS", "expert_path_for"]
