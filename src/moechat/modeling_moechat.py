"""MoeChatForCausalLM: GPT-2 (learned positions, pre-LN, GELU MLP with biases) with sparse MoE MLPs.

Self-contained (imports only torch and transformers) so that a saved folder loads with
`trust_remote_code=True` anywhere. The MoE block reads like Mixtral's: a router (fp32 logits, softmax,
top-k), experts that are plain GPT-2 MLPs (`experts.{j}.c_fc`, `experts.{j}.c_proj`), and a dispatcher
that sorts token assignments by expert and runs one matmul per expert.

Router outputs travel back through each block's return value (never through module state), so the
auxiliary losses are counted exactly once, also when the blocks are recomputed by activation
checkpointing.

Shape suffixes: B batch, T query length, K key length, D model width, N routed tokens, E experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_moechat import (
    MoeChatConfig,  # a sibling file, also in a saved folder
)


class MoeChatBackendError(RuntimeError):
    """The chosen `moe_backend` cannot run here; the message says how to install it or what to pick."""


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
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class MoeChatAttention(nn.Module):
    """Causal self-attention through `F.scaled_dot_product_attention` with an optional boolean mask."""

    def __init__(self, config: MoeChatConfig, layer_idx: int):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.layer_idx = layer_idx
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x_BTD: torch.Tensor, mask_B1TK: Optional[torch.Tensor],
                past_key_values: Optional[Cache]) -> torch.Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.c_attn(x_BTD).split(D, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask_B1TK, is_causal=mask_B1TK is None and T > 1,
            dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, D)))


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
        self.router = nn.Linear(config.n_embd, config.num_experts, bias=False)
        self.experts = nn.ModuleList(
            [MoeChatMLP(config.n_embd, config.n_inner, config.dropout) for _ in range(config.num_experts)])
        if self.backend == "tutel":
            _import_tutel()

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits and probabilities in fp32 and the top-k expert ids with their weights."""
        with torch.autocast(device_type=x_ND.device.type, enabled=False):
            logits_NE = F.linear(x_ND.float(), self.router.weight.float())
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
        # Position-major token order (N = T*B): the capacity priority, which follows it, is then causal.
        x_ND = x_BTD.transpose(0, 1).reshape(T * B, D)
        routed_idx = None
        if token_mask_BT is not None:
            routed_idx = token_mask_BT.t().reshape(-1).nonzero().squeeze(-1)
            x_ND = x_ND[routed_idx]
        logits_NE, probs_NE, weights_Nk, experts_Nk = self.route(x_ND)
        n = x_ND.shape[0]
        cap = self.capacity(B * T)
        if self.backend == "tutel":
            y_ND, tokens_per_expert, dropped = self._dispatch_tutel(x_ND, weights_Nk, experts_Nk, cap)
        else:
            y_ND, tokens_per_expert, dropped = self._dispatch_torch(x_ND, weights_Nk, experts_Nk, cap)
        result = self._losses(logits_NE, probs_NE, tokens_per_expert, dropped, n)
        if routed_idx is not None:
            y_ND = y_ND.new_zeros(T * B, D).index_copy(0, routed_idx, y_ND)
        return y_ND.view(T, B, D).transpose(0, 1).contiguous(), result

    def _dispatch_torch(self, x_ND: torch.Tensor, weights_Nk: torch.Tensor, experts_Nk: torch.Tensor,
                        cap: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sort the N*k (token, expert) assignments by expert, run each expert once on its slice, scatter back.

        Assignments are ordered token-major (token t's k choices before token t+1's), and the sort by
        expert is stable, so with a cap an expert keeps its earliest tokens and drops the rest: a token's
        routing never depends on a later token. Returns the output in x's dtype (the experts may run in
        bf16 under autocast while x, a LayerNorm output, is fp32), the per-expert assignment counts and
        the number of dropped assignments.
        """
        n, k = experts_Nk.shape
        expert_A = experts_Nk.reshape(-1)  # A = n*k assignments, token-major
        token_A = torch.arange(n, device=x_ND.device).repeat_interleave(k)
        weight_A = weights_Nk.reshape(-1)
        tokens_per_expert = torch.bincount(expert_A, minlength=self.num_experts)
        order = torch.argsort(expert_A, stable=True)
        kept_per_expert = tokens_per_expert
        if cap is not None:
            starts = torch.cumsum(tokens_per_expert, 0) - tokens_per_expert
            rank_in_expert = torch.arange(order.numel(), device=x_ND.device) - starts[expert_A[order]]
            order = order[rank_in_expert < cap]
            kept_per_expert = tokens_per_expert.clamp(max=cap)
        dropped = (tokens_per_expert - kept_per_expert).sum()
        token_S, weight_S = token_A[order], weight_A[order]  # S = kept assignments sorted by expert
        chunks = x_ND[token_S].split(kept_per_expert.tolist())
        outs = [expert(chunk) for expert, chunk in zip(self.experts, chunks) if chunk.shape[0] > 0]
        y_SD = torch.cat(outs) if outs else x_ND.new_zeros(0, x_ND.shape[1])
        y_SD = y_SD.to(x_ND.dtype) * weight_S.unsqueeze(-1).to(x_ND.dtype)
        y_ND = x_ND.new_zeros(x_ND.shape).index_add(0, token_S, y_SD)
        return y_ND, tokens_per_expert, dropped

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
                dropped: torch.Tensor, n: int) -> RoutingResult:
        """Switch load-balancing loss and ST-MoE z-loss over the routed (non-padding) tokens.

        aux = E * sum_e f_e * P_e (Fedus et al. 2021, eq. 4), with f_e the share of the N*k assignments
        that chose expert e and P_e the mean router probability of e; it equals 1 at perfect balance.
        z = mean_n logsumexp(logits_n)^2 (Zoph et al. 2022, eq. 5).
        """
        if n == 0:
            zero = logits_NE.sum() * 0.0  # keeps the graph (and the router) attached
            return RoutingResult(zero, zero, tokens_per_expert, dropped, zero.detach())
        f_E = tokens_per_expert.to(probs_NE.dtype) / (n * self.top_k)
        aux = self.num_experts * torch.sum(f_E * probs_NE.mean(dim=0))
        z = torch.logsumexp(logits_NE, dim=-1).pow(2).mean()
        entropy = -(probs_NE * F.log_softmax(logits_NE, dim=-1)).sum(dim=-1).mean()
        return RoutingResult(aux, z, tokens_per_expert, dropped, entropy.detach())


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

    def forward(self, x_BTD: torch.Tensor, mask_B1TK: Optional[torch.Tensor] = None,
                token_mask_BT: Optional[torch.Tensor] = None, past_key_values: Optional[Cache] = None
                ) -> tuple[torch.Tensor, ...]:
        """Returns (hidden,) for a dense block and (hidden, aux, z, tokens_per_expert, dropped, entropy) for
        an MoE block: a flat tuple of tensors, so checkpointing carries the router losses' graph."""
        x_BTD = x_BTD + self.attn(self.ln_1(x_BTD), mask_B1TK, past_key_values)
        if not self.is_moe:
            return (x_BTD + self.mlp(self.ln_2(x_BTD)),)
        y_BTD, r = self.mlp(self.ln_2(x_BTD), token_mask_BT)
        return x_BTD + y_BTD, r.aux_loss, r.z_loss, r.tokens_per_expert, r.dropped, r.entropy


# ----------------------------------------------------------------------------------------------------
# Models


@dataclass
class MoeChatModelOutput(ModelOutput):
    last_hidden_state: Optional[torch.Tensor] = None
    past_key_values: Optional[Cache] = None
    routing: Optional[list[tuple[int, RoutingResult]]] = None


@dataclass
class MoeChatCausalLMOutput(ModelOutput):
    """`loss` = lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss; the parts come back separately.

    `router_stats` (only with `output_router_stats=True`): one dict per MoE layer with `layer` (block
    index), `tokens_per_expert` (LongTensor[E], top-k assignments chosen), `expert_share` (FloatTensor[E],
    sums to 1), `dropped_tokens` (assignments dropped by capacity routing, training mode only),
    `dropped_share` (of all assignments) and `entropy` (mean router entropy, nats; ln E is uniform).
    """

    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    z_loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    past_key_values: Optional[Cache] = None
    router_stats: Optional[list[dict[str, Any]]] = None


class MoeChatPreTrainedModel(PreTrainedModel):
    config_class = MoeChatConfig
    config: MoeChatConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MoeChatBlock"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
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


class MoeChatModel(MoeChatPreTrainedModel):
    """Embeddings, blocks and the final LayerNorm (parameter names as in GPT-2: wte, wpe, h.{i}, ln_f)."""

    def __init__(self, config: MoeChatConfig):
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
        use_cache: Optional[bool] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> MoeChatModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)
        B, T, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be 2D [batch, past + new tokens], got {tuple(attention_mask.shape)}")
        if position_ids is None:
            # Known on the host: positions <= past + T - 1, and "packed" only matters without a mask.
            position_ids = self._default_position_ids(attention_mask, B, T, past, inputs_embeds.device)
            max_position, packed = past + T - 1, False
        else:
            if position_ids.dim() == 1:
                position_ids = position_ids.unsqueeze(0)
            position_ids = position_ids.expand(B, T)
            # One host sync for both facts (range check, and whether positions restart = packed documents).
            q_abs = torch.arange(past, past + T, device=position_ids.device)
            max_position, packed = torch.stack(
                [position_ids.max(), (position_ids != q_abs).any().long()]).tolist()
        if past + T > self.config.n_positions or max_position >= self.config.n_positions:
            raise ValueError(f"sequence of {past + T} tokens exceeds n_positions={self.config.n_positions}")

        mask_B1TK = self._attention_mask(attention_mask, position_ids, past, T, bool(packed))
        token_mask_BT = self._token_mask(input_ids, attention_mask, T)
        x_BTD = self.drop(inputs_embeds + self.wpe(position_ids))
        routing = []
        for i, block in enumerate(self.h):
            out = block(x_BTD, mask_B1TK=mask_B1TK, token_mask_BT=token_mask_BT, past_key_values=past_key_values)
            x_BTD = out[0]
            if block.is_moe:
                routing.append((i, RoutingResult(*out[1:])))
        return MoeChatModelOutput(last_hidden_state=self.ln_f(x_BTD), past_key_values=past_key_values,
                                  routing=routing)

    @staticmethod
    def _default_position_ids(attention_mask: Optional[torch.Tensor], B: int, T: int, past: int,
                              device: torch.device) -> torch.Tensor:
        """Positions count real tokens only, so a left-padded row gets the same positions as unpadded."""
        if attention_mask is None:
            return torch.arange(past, past + T, device=device).unsqueeze(0).expand(B, T)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]

    def _attention_mask(self, attention_mask: Optional[torch.Tensor], position_ids_BT: torch.Tensor,
                        past: int, T: int, packed: bool) -> Optional[torch.Tensor]:
        """Boolean [B, 1, T, K] mask (True = attend) or None for plain causal attention.

        A query at absolute index q with position p belongs to the document that started at q - p (the
        position ids restart at 0 where `prepare` packed a new conversation), so it sees keys in
        [q - p, q]: causal and block-diagonal in one rule, valid with a KV cache too. Keys whose 2D
        attention_mask is 0 (left padding) are hidden; a query always sees itself so no row is empty.
        `packed` (positions restart somewhere) is computed by the caller, which already synced for it.
        """
        B = position_ids_BT.shape[0]
        device = position_ids_BT.device
        K = past + T
        q_abs = torch.arange(past, K, device=device)
        k_abs = torch.arange(K, device=device)
        if attention_mask is None and not packed and T > 1 and past == 0:
            return None  # fast path: SDPA's own causal kernel
        start_BT = q_abs - position_ids_BT
        allowed = (k_abs.view(1, 1, K) >= start_BT.unsqueeze(-1)) & (k_abs.view(1, 1, K) <= q_abs.view(1, T, 1))
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, -K:].bool()
            allowed = allowed | (k_abs.view(1, 1, K) == q_abs.view(1, T, 1))
        return allowed.view(B, 1, T, K)

    def _token_mask(self, input_ids: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor],
                    T: int) -> Optional[torch.Tensor]:
        """Tokens the MoE layers route and count: not masked out by attention_mask and not the pad token.

        The pad id counts only when it is a dedicated token (different from eos/bos), which is how the
        pad tail of a packed block is recognised without an attention mask.
        """
        mask = None
        if attention_mask is not None:
            mask = attention_mask[:, -T:].bool()
        pad = self.config.pad_token_id
        eos = self.config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        if input_ids is not None and pad is not None and pad not in eos_ids and pad != self.config.bos_token_id:
            not_pad = input_ids != pad
            mask = not_pad if mask is None else mask & not_pad
        return mask


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
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_router_stats: bool = False,
        inputs_embeds: Optional[torch.Tensor] = None,
        num_items_in_batch: Optional[int | torch.Tensor] = None,
        **kwargs: Any,
    ) -> MoeChatCausalLMOutput:
        """Logits, and with `labels` the loss. Labels are shifted here (label t is predicted at t-1), -100
        is ignored, and the LM loss is the mean over real target tokens (or their sum divided by
        `num_items_in_batch` when given, for exact gradient accumulation)."""
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, use_cache=use_cache, inputs_embeds=inputs_embeds)
        logits = self.lm_head(out.last_hidden_state)
        aux_loss, z_loss = self._router_losses(out.routing, logits)
        lm_loss = loss = None
        if labels is not None:
            lm_loss = self.lm_loss(logits, labels, num_items_in_batch)
            loss = lm_loss + self.config.aux_loss_coef * aux_loss + self.config.z_loss_coef * z_loss
        stats = self.router_stats(out.routing) if output_router_stats else None
        return MoeChatCausalLMOutput(loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, z_loss=z_loss, logits=logits,
                                     past_key_values=out.past_key_values, router_stats=stats)

    @staticmethod
    def lm_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                num_items_in_batch: Optional[int | torch.Tensor] = None) -> torch.Tensor:
        """Next-token cross-entropy in fp32 over targets != -100 (0 when there are none)."""
        logits = logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float()
        targets = labels_BT[:, 1:].reshape(-1).to(logits.device)
        total = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum().clamp(min=1)
        return total / count

    @staticmethod
    def _router_losses(routing: list[tuple[int, RoutingResult]], logits: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over MoE layers of the per-layer aux and z losses (zeros for a model without MoE layers)."""
        if not routing:
            zero = logits.new_zeros((), dtype=torch.float32)
            return zero, zero
        aux = torch.stack([r.aux_loss for _, r in routing]).mean()
        z = torch.stack([r.z_loss for _, r in routing]).mean()
        return aux, z

    @staticmethod
    def router_stats(routing: list[tuple[int, RoutingResult]]) -> list[dict[str, Any]]:
        stats = []
        for layer, r in routing:
            assigned = int(r.tokens_per_expert.sum())
            dropped = int(r.dropped)
            stats.append({
                "layer": layer,
                "tokens_per_expert": r.tokens_per_expert.detach().cpu(),
                "expert_share": (r.tokens_per_expert.float() / max(assigned, 1)).detach().cpu(),
                "dropped_tokens": dropped,
                "dropped_share": dropped / max(assigned, 1),
                "entropy": float(r.entropy),
            })
        return stats

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
           "MoeChatSparseMoeBlock", "MoeChatMLP", "MoeChatBackendError"]
