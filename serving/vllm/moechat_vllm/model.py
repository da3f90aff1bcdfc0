"""MoeChatForCausalLM for vLLM: GPT-2 blocks whose every `moe_every`-th MLP is a top-k routed MoE.

The same function as the exported folder's `modeling_moechat.py`, built from vLLM's own layers:
learned positions, pre-LN blocks with vLLM's GPT-2 style attention (fused `c_attn`, biases), GELU-tanh
(GPT-2's `gelu_new`) MLPs with biases, and in the MoE blocks an fp32 router (softmax over fp32 logits,
top-k, weights renormalised over the k chosen; no capacity limit at inference) feeding vLLM's FusedMoE
with expert biases.

Experts: each export expert is `c_proj(gelu_tanh(c_fc(x)))`. vLLM's CPU fused-MoE kernels are gated only
(`act(gate) * up`), so on CPU an expert is loaded as a gated GELU-tanh MLP whose gate is `c_fc` and whose
up half has zero weights and bias 1: `gelu_tanh(c_fc(x)) * 1`, the same function. Elsewhere the
non-gated `gelu_tanh_no_mul` activation is used with `c_fc` alone (CUDA: unverified).

Loading refuses (raises) on any missing or unexpected checkpoint tensor, so a folder this code does not
fully understand is never served as a different function.
"""

import re
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import FusedMoEFactory
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import (ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear,
                                               RowParallelLinear)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors


class MoeChatLoadError(ValueError):
    """The checkpoint's tensors are not exactly those of a MoeChatForCausalLM with this config."""


def experts_are_gated() -> bool:
    """Whether experts run as gated MLPs with a constant-1 up half: vLLM's CPU fused-MoE has no
    non-gated activation (CUDA, ROCm and XPU list `gelu_tanh_no_mul`)."""
    return current_platform.is_cpu()


class MoeChatAttention(nn.Module):
    """Causal self-attention as in vLLM's GPT-2: fused q|k|v projection with bias, output projection."""

    def __init__(self, config, cache_config: CacheConfig | None, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        n_head = config.n_head
        assert n_head % get_tensor_model_parallel_world_size() == 0
        self.head_dim = config.n_embd // n_head
        self.c_attn = QKVParallelLinear(config.n_embd, self.head_dim, n_head, bias=True, quant_config=quant_config,
                                        prefix=f"{prefix}.c_attn")
        self.c_proj = RowParallelLinear(config.n_embd, config.n_embd, bias=True, quant_config=quant_config,
                                        prefix=f"{prefix}.c_proj")
        self.attn = Attention(n_head // get_tensor_model_parallel_world_size(), self.head_dim,
                              scale=self.head_dim ** -0.5, cache_config=cache_config, quant_config=quant_config,
                              prefix=f"{prefix}.attn")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.c_attn(x)
        q, k, v = qkv.chunk(chunks=3, dim=-1)
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class MoeChatMLP(nn.Module):
    """The GPT-2 MLP: c_fc -> GELU-tanh -> c_proj, with biases."""

    def __init__(self, config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.c_fc = ColumnParallelLinear(config.n_embd, config.n_inner, bias=True, quant_config=quant_config,
                                         prefix=f"{prefix}.c_fc")
        self.c_proj = RowParallelLinear(config.n_inner, config.n_embd, bias=True, quant_config=quant_config,
                                        prefix=f"{prefix}.c_proj")
        self.act = get_act_fn("gelu_new")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.c_fc(x)
        out, _ = self.c_proj(self.act(h))
        return out


class MoeChatSparseMoeBlock(nn.Module):
    """fp32 router (softmax, top-k, renormalised) and the experts as one vLLM FusedMoE with biases."""

    def __init__(self, config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        # Kept and run in fp32 whatever the model dtype, as the export's `_keep_in_fp32_modules`.
        self.router = ReplicatedLinear(config.n_embd, config.num_experts, bias=False, params_dtype=torch.float32,
                                       quant_config=None, prefix=f"{prefix}.router")
        gated = experts_are_gated()
        self.experts = FusedMoEFactory(
            num_experts=config.num_experts, top_k=config.num_experts_per_tok, hidden_size=config.n_embd,
            intermediate_size=config.n_inner, renormalize=True, scoring_func="softmax",
            activation="gelu_tanh" if gated else "gelu_tanh_no_mul", has_bias=True,
            router_logits_dtype=torch.float32, quant_config=quant_config,
            ckpt_names=("c_fc", "c_proj", "up" if gated else None), prefix=f"{prefix}.experts")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.router(x.float())
        return self.experts(x, logits)


class MoeChatBlock(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x)), the MLP dense or MoE."""

    def __init__(self, config, layer_idx: int, cache_config: CacheConfig | None,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.ln_1 = LayerNorm(config.n_embd, eps=eps)
        self.attn = MoeChatAttention(config, cache_config, quant_config, prefix=f"{prefix}.attn")
        self.ln_2 = LayerNorm(config.n_embd, eps=eps)
        if is_moe_layer(config, layer_idx):
            self.mlp = MoeChatSparseMoeBlock(config, quant_config, prefix=f"{prefix}.mlp")
        else:
            self.mlp = MoeChatMLP(config, quant_config, prefix=f"{prefix}.mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def is_moe_layer(config, layer_idx: int) -> bool:
    """Block `layer_idx` (0-based) is MoE when `(layer_idx + 1) % moe_every == 0` (MoeChatConfig.is_moe_layer)."""
    return (layer_idx + 1) % config.moe_every == 0


@support_torch_compile
class MoeChatModel(nn.Module):
    """Embeddings (token + learned position), the blocks and the final LayerNorm."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.wte = VocabParallelEmbedding(config.vocab_size, config.n_embd, quant_config=quant_config,
                                          prefix=f"{prefix}.wte")
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList([MoeChatBlock(config, i, cache_config, quant_config, prefix=f"{prefix}.h.{i}")
                                for i in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        x = inputs_embeds + self.wpe(positions)
        for block in islice(self.h, 0, len(self.h)):
            x = block(x)
        return self.ln_f(x)


class MoeChatForCausalLM(nn.Module):
    """The causal LM: MoeChatModel and an lm_head (tied to wte when the config says so)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.transformer = MoeChatModel(vllm_config=vllm_config, prefix=_join(prefix, "transformer"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.n_embd, quant_config=vllm_config.quant_config,
                                      prefix=_join(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.transformer.wte)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transformer.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the export's tensors by their names; raise MoeChatLoadError on any missing or unexpected one."""
        params = dict(self.named_parameters())
        expected = expected_checkpoint_names(self.config)
        seen: set[str] = set()
        loaded: set[str] = set()
        for name, tensor in weights:
            if name not in expected or name in seen:
                raise MoeChatLoadError(f"checkpoint tensor {name!r} is not a MoeChatForCausalLM tensor for this "
                                       f"config.json (n_layer={self.config.n_layer}, moe_every="
                                       f"{self.config.moe_every}, num_experts={self.config.num_experts}"
                                       f"{', a duplicate' if name in seen else ''}); export the folder again with "
                                       f"`dvc repro export`")
            seen.add(name)
            loaded.update(self._load_one(params, name, tensor))
        missing = sorted(expected - seen)
        if missing:
            raise MoeChatLoadError(f"the checkpoint lacks {len(missing)} tensor(s) of MoeChatForCausalLM, e.g. "
                                   f"{missing[:5]}; export the folder again with `dvc repro export`")
        unset = sorted(set(params) - loaded)
        if unset:
            raise MoeChatLoadError(f"vLLM parameters left unloaded: {unset[:5]}")
        return loaded

    def _load_one(self, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> set[str]:
        """Load one checkpoint tensor; returns the vLLM parameter names it filled."""
        expert = EXPERT_TENSOR.fullmatch(name)
        if expert is None:
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            return {name}
        block, j, linear, kind = expert.groups()
        target = _find_param(params, f"{block}.mlp.experts.", "w13" if linear == "c_fc" else "w2", kind)
        param = params[target]
        shard = "w1" if linear == "c_fc" else "w2"
        param.weight_loader(param, tensor, f"{target}", shard, int(j))
        if linear == "c_fc" and experts_are_gated():  # the constant up half: zero weights, bias 1
            up = torch.ones_like(tensor) if kind == "bias" else torch.zeros_like(tensor)
            param.weight_loader(param, up, f"{target}", "w3", int(j))
        return {target}


EXPERT_TENSOR = re.compile(r"(transformer\.h\.\d+)\.mlp\.experts\.(\d+)\.(c_fc|c_proj)\.(weight|bias)")


def _find_param(params: dict[str, nn.Parameter], under: str, stem: str, kind: str) -> str:
    """The one FusedMoE parameter `<stem>_<kind>` below `under` (its module path depends on vLLM's version)."""
    found = [p for p in params if p.startswith(under) and p.endswith(f".{stem}_{kind}")]
    if len(found) != 1:
        raise MoeChatLoadError(f"expected one FusedMoE parameter {stem}_{kind} under {under!r}, found {found}; "
                               f"this vLLM version's FusedMoE layout is not supported by moechat-vllm")
    return found[0]


def expected_checkpoint_names(config) -> set[str]:
    """Every tensor name an export of this config holds (modeling_moechat.py's parameter names)."""
    names = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"}
    if not config.tie_word_embeddings:
        names.add("lm_head.weight")
    linear = lambda stem: {f"{stem}.weight", f"{stem}.bias"}  # noqa: E731
    for i in range(config.n_layer):
        block = f"transformer.h.{i}"
        names |= linear(f"{block}.ln_1") | linear(f"{block}.ln_2")
        names |= linear(f"{block}.attn.c_attn") | linear(f"{block}.attn.c_proj")
        if is_moe_layer(config, i):
            names.add(f"{block}.mlp.router.weight")
            for j in range(config.num_experts):
                names |= linear(f"{block}.mlp.experts.{j}.c_fc") | linear(f"{block}.mlp.experts.{j}.c_proj")
        else:
            names |= linear(f"{block}.mlp.c_fc") | linear(f"{block}.mlp.c_proj")
    return names


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
