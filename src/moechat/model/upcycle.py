"""The init stage: build the MoE model from params (from scratch) or by sparse upcycling a dense GPT-2.

Scratch: GPT-2 initialisation (N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)), seeded.
Upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling"): embeddings, attention and norms are copied
from the dense parent, every expert of an MoE block is a copy of the dense MLP it replaces, and the
router is freshly initialised. With all experts equal and the top-k weights renormalised to 1 the
upcycled model computes exactly its parent's function at step 0 (tested).

Layer policy: `model.n_layer` may be smaller than the parent's; `model.init_layers` names the parent
blocks that seed ours, in order. By default they are evenly spaced over the parent and keep its first and
last blocks (for gpt2-medium into 8 layers: 0, 3, 7, 10, 13, 16, 20, 23): the last block writes the
residual stream that ln_f and the head were trained to read, and the first turns embeddings into what
every later block expects; layer-pruning studies find the middle blocks the most redundant (Gromov et
al. 2024, "The Unreasonable Ineffectiveness of the Deeper Layers"; Men et al. 2024, ShortGPT).

Symmetry breaking: experts that are exact copies get identical gradients from the LM loss, and the
router gets none (every choice gives the same output), so they only drift apart through the routing
noise. Drop-Upcycling (Nakamura et al. 2025, "Drop-Upcycling: Training Sparse Mixture of Experts with
Partial Re-initialization", ICLR) re-initialises a random share r of each expert's FFN units (c_fc rows,
c_proj columns) from N(mean, std) of the parent matrix, a different share per expert; r = 0.5 was their
best setting and is the default (`model.upcycle_reinit_ratio`; 0 keeps exact copies, upcycled = parent).

Vocabulary: the
tokenizer may extend the parent's (the chat tokens ChatML adds); new rows of wte / lm_head start at
the mean of the parent's rows (Hewitt 2021), so they do not skew the softmax. Output head: the parent's
`lm_head` is copied (for GPT-2 that is wte, to which it is tied); a tied model cannot be built from a
parent with an untied head, which raises rather than silently computing something else.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerBase

from moechat.errors import ConfigError
from moechat.model.folder_checks import PIPELINE_NO_CODE, check_tokenizer_code, weight_shards
from moechat.hub import looks_like_path, require_hub_repo
from moechat.atomic import atomic_dir
from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM

log = logging.getLogger(__name__)


class ModelSpec(Protocol):
    """What initialisation reads of params.yaml's `model` section (moechat.config.params.ModelConfig is one):
    declared here, so the model floor does not import the params floor above it."""

    init_from: Optional[str]
    init_layers: Optional[Sequence[int]]
    upcycle_reinit_ratio: float
    architecture: MoeChatConfig


class UpcycleError(ConfigError):
    """The dense parent cannot be upcycled into the configured model; names the key and both values."""


def build_config(model: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> MoeChatConfig:
    """params.yaml's model architecture with the tokenizer's vocabulary and special ids."""
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ConfigError(
            f"tokenizer has pad_token_id={tokenizer.pad_token_id}, eos_token_id={tokenizer.eos_token_id}; "
            f"both are needed (prepare adds <|pad|> and sets eos to <|im_end|>): rerun `dvc repro prepare`")
    shape = {name: getattr(model.architecture, name) for name in MoeChatConfig.hyperparameters()}
    return MoeChatConfig(**shape, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def init_scratch(config: MoeChatConfig, seed: int) -> MoeChatForCausalLM:
    """A freshly initialised model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return MoeChatForCausalLM(config)


def load_dense_parent(source: str) -> GPT2LMHeadModel:
    """A dense GPT-2 from a Hub id (e.g. `gpt2-medium`) or a local save_pretrained folder, safetensors only.

    Every parameter must come from the checkpoint: transformers fills missing tensors with random
    weights and only logs it, which would upcycle a model that is not the parent, so that raises here.
    """
    path = Path(source)
    if path.exists() and not path.is_dir():
        raise UpcycleError(f"model.init_from={source!r} is a file; pass the folder that save_pretrained wrote "
                           f"(config.json + model.safetensors) or a Hub id such as gpt2-medium")
    if not path.is_dir() and looks_like_path(source):
        raise UpcycleError(f"model.init_from={source!r}: no such folder; fix the path (relative paths are read "
                           f"from the project root) or use a Hub id such as gpt2-medium")
    revision = None
    if not path.is_dir():  # a Hub id: fail in seconds, by name, where from_pretrained would retry for minutes
        revision = require_hub_repo("model.init_from", source, "model",
                                    hint="point model.init_from at a local save_pretrained folder")
    try:
        if path.is_dir():  # never a pickle shard named by an index (from_pretrained would torch.load it)
            weight_shards(path)
        parent, info = GPT2LMHeadModel.from_pretrained(source, revision=revision, use_safetensors=True,
                                                       dtype=torch.float32, output_loading_info=True,
                                                       trust_remote_code=False)
    except OSError as err:
        raise UpcycleError(
            f"model.init_from={source!r}: could not load a GPT-2 checkpoint with safetensors weights ({err}); "
            f"pass a Hub id such as gpt2-medium (needs network) or a local folder, or null to start from "
            f"scratch") from err
    problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys",
                                                                  "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(map(str, keys[:8]))}"
                           + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                           for kind, keys in problems.items())
        raise UpcycleError(
            f"model.init_from={source!r} is not a complete GPT-2 checkpoint ({listed}); transformers would "
            f"fill the gaps with random weights, so the upcycled model would not be its parent. Point "
            f"model.init_from at an intact GPT-2 (GPT2LMHeadModel) save_pretrained folder or Hub id")
    return parent.eval()


def parent_layers(n_layer: int, parent_depth: int, init_layers: Optional[Sequence[int]] = None) -> list[int]:
    """The parent block (0-based) that seeds each of our `n_layer` blocks: `init_layers` when given, else
    evenly spaced from the parent's first block to its last."""
    if init_layers is None:
        if n_layer == 1:
            return [parent_depth - 1]
        return [math.floor(i * (parent_depth - 1) / (n_layer - 1) + 0.5) for i in range(n_layer)]  # half up
    if len(init_layers) != n_layer or max(init_layers) >= parent_depth:
        raise UpcycleError(f"model.init_layers={list(init_layers)} must name {n_layer} blocks (model.n_layer) of "
                           f"the dense parent's 0..{parent_depth - 1}; fix the list or set it to null")
    return list(init_layers)


def upcycle(config: MoeChatConfig, parent: GPT2LMHeadModel, seed: int,
            init_layers: Optional[Sequence[int]] = None, reinit_ratio: float = 0.0) -> MoeChatForCausalLM:
    """Sparse upcycling of `parent` into a model built from `config` (see the module docstring): block i
    is a copy of parent block `parent_layers(...)[i]`; with `reinit_ratio` > 0 the experts are then
    Drop-Upcycled, seeded by `seed`."""
    _check_compatible(config, parent)
    layers = parent_layers(config.n_layer, parent.config.n_layer, init_layers)
    model = init_scratch(config, seed)  # seeded: fixes the routers (and nothing else survives the copy)
    src = parent.transformer
    dst = model.transformer
    with torch.no_grad():
        v_parent = src.wte.weight.shape[0]
        dst.wte.weight[:v_parent] = src.wte.weight
        dst.wte.weight[v_parent:] = src.wte.weight.mean(dim=0)
        dst.wpe.weight.copy_(src.wpe.weight[: config.n_positions])
        for block, parent_index in zip(dst.h, layers):
            parent_block = src.h[parent_index]
            for name in ("ln_1", "ln_2"):
                getattr(block, name).load_state_dict(getattr(parent_block, name).state_dict())
            _copy_conv1d(block.attn.c_attn, parent_block.attn.c_attn)
            _copy_conv1d(block.attn.c_proj, parent_block.attn.c_proj)
            mlps = block.mlp.experts if block.is_moe else [block.mlp]
            for mlp in mlps:
                _copy_conv1d(mlp.c_fc, parent_block.mlp.c_fc)
                _copy_conv1d(mlp.c_proj, parent_block.mlp.c_proj)
        dst.ln_f.load_state_dict(src.ln_f.state_dict())
        if not config.tie_word_embeddings:  # tied: lm_head *is* wte, checked equal to the parent's head
            head = parent.lm_head.weight
            model.lm_head.weight[:v_parent] = head
            model.lm_head.weight[v_parent:] = head.mean(dim=0)
        if reinit_ratio > 0:
            generator = torch.Generator().manual_seed(seed)
            for block in dst.h:
                if block.is_moe:
                    for expert in block.mlp.experts:
                        drop_upcycle(expert, reinit_ratio, generator)
    return model


def drop_upcycle(expert: torch.nn.Module, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """Re-initialise a random `ratio` of the expert's FFN units in place (Drop-Upcycling, Nakamura et al.
    2025, Sec. 3): rows of c_fc.weight ([n_inner, n_embd]) and columns of c_proj.weight ([n_embd, n_inner])
    drawn from N(mean, std) of the whole parent matrix; biases are kept (the paper's models have none).
    Returns the re-initialised unit indices."""
    n_inner = expert.c_fc.weight.shape[0]
    units = torch.randperm(n_inner, generator=generator)[: round(ratio * n_inner)]
    for weight, dim in ((expert.c_fc.weight, 0), (expert.c_proj.weight, 1)):
        mean, std = weight.mean().item(), weight.std().item()
        shape = list(weight.shape)
        shape[dim] = units.numel()
        fresh = torch.randn(shape, generator=generator) * std + mean
        weight.index_copy_(dim, units.to(weight.device), fresh.to(weight.dtype).to(weight.device))
    return units


def _copy_conv1d(linear: torch.nn.Linear, conv1d: torch.nn.Module) -> None:
    """transformers' GPT-2 Conv1D stores weight as [in, out]; nn.Linear wants [out, in]."""
    linear.weight.copy_(conv1d.weight.t())
    linear.bias.copy_(conv1d.bias)


def _parent_head_is_tied(parent: GPT2LMHeadModel) -> bool:
    head, wte = parent.lm_head.weight, parent.transformer.wte.weight
    return head is wte or (head.shape == wte.shape and torch.equal(head, wte))


def _check_compatible(config: MoeChatConfig, parent_model: GPT2LMHeadModel) -> None:
    parent = parent_model.config
    parent_inner = parent.n_inner if parent.n_inner is not None else 4 * parent.n_embd
    checks = [
        ("model.n_embd", config.n_embd, parent.n_embd, config.n_embd == parent.n_embd),
        ("model.n_head", config.n_head, parent.n_head, config.n_head == parent.n_head),
        ("model.n_inner", config.n_inner, parent_inner, config.n_inner == parent_inner),
        ("model.n_layer", config.n_layer, parent.n_layer, config.n_layer <= parent.n_layer),
        ("model.n_positions", config.n_positions, parent.n_positions, config.n_positions <= parent.n_positions),
        ("model.layer_norm_epsilon", config.layer_norm_epsilon, parent.layer_norm_epsilon,
         config.layer_norm_epsilon == parent.layer_norm_epsilon),
    ]
    for key, ours, theirs, ok in checks:
        if not ok:
            relation = "<=" if key in ("model.n_layer", "model.n_positions") else "=="
            raise UpcycleError(
                f"{key}={ours} cannot be upcycled from the dense parent, which has {theirs}: set {key} "
                f"{relation} {theirs} in params.yaml, or pick another model.init_from")
    if config.vocab_size < parent.vocab_size:
        raise UpcycleError(
            f"the tokenizer has {config.vocab_size} tokens but the dense parent {parent.vocab_size}: upcycling "
            f"needs the parent's tokenizer (tokenizer.source: gpt2) plus the chat tokens, not a new one")
    if config.tie_word_embeddings and not _parent_head_is_tied(parent_model):
        raise UpcycleError(
            "model.tie_word_embeddings=true but the dense parent's lm_head differs from its wte (an untied "
            "head): a tied model would not compute the parent's logits. Set model.tie_word_embeddings: false")
    if parent.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise UpcycleError(f"the dense parent uses activation_function={parent.activation_function!r}; "
                           f"moechat's MLP is GPT-2's gelu_new (tanh GELU), so its outputs would differ")
    if parent.scale_attn_by_inverse_layer_idx or parent.reorder_and_upcast_attn or not parent.scale_attn_weights:
        raise UpcycleError("the dense parent uses non-standard GPT-2 attention scaling flags "
                           "(scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn / scale_attn_weights)")


def model_report(model: MoeChatForCausalLM, seq_len: int, init_from: str | None,
                 upcycling: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What metrics/model.json records: parameter counts, which blocks are MoE, training FLOPs per token,
    and for an upcycled model the parent blocks copied and the re-initialised share."""
    cfg = model.config
    return {
        "init_from": init_from,
        "upcycling": upcycling,
        "params": model.parameter_counts(),
        "layers": ["moe" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.n_layer)],
        "moe_layers": cfg.moe_layers,
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "vocab_size": cfg.vocab_size,
        "seq_len": seq_len,
        "train_flops_per_token": model.flops_per_token(seq_len),
    }


def save_atomic(model: MoeChatForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: Path) -> None:
    """save_pretrained (safetensors + the two code files) and the tokenizer, swapped into place whole, so a
    crash never leaves a half-written models/init."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def initialize(model_cfg: ModelSpec, seed: int, seq_len: int, tokenizer_dir: Path, out_dir: Path
               ) -> dict[str, Any]:
    """Build (scratch or upcycled), save to `out_dir` with the tokenizer, and return the model report."""
    check_tokenizer_code(Path(tokenizer_dir), trust_remote_code=False, fix=PIPELINE_NO_CODE)  # prepare's output
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False)
    config = build_config(model_cfg, tokenizer)
    upcycling = None
    if model_cfg.init_from is None:
        model = init_scratch(config, seed)
    else:
        parent = load_dense_parent(model_cfg.init_from)
        model = upcycle(config, parent, seed, model_cfg.init_layers, model_cfg.upcycle_reinit_ratio)
        upcycling = {"parent_layers": parent_layers(config.n_layer, parent.config.n_layer, model_cfg.init_layers),
                     "parent_n_layer": parent.config.n_layer, "reinit_ratio": model_cfg.upcycle_reinit_ratio}
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    save_atomic(model, tokenizer, out_dir)
    return model_report(model, seq_len, model_cfg.init_from, upcycling)
