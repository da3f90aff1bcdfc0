"""Typed view of params.yaml: one frozen dataclass per section, loaded and validated once.

Every stage calls `load_params()` and hands each library function only the sections it needs, so a
stage's `params:` list in dvc.yaml matches what its code can see. Bad input fails here, before any
work, with an error that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class MoechatError(Exception):
    """An error the user can fix from its message; stage scripts print it as one line, no traceback."""


class ConfigError(MoechatError, ValueError):
    """A params.yaml value that cannot work; the message names the key, the value and the fix."""


@dataclass(frozen=True)
class DataConfig:
    source: str = "OpenAssistant/oasst1"
    revision: Optional[str] = "main"
    langs: tuple[str, ...] = ("en",)
    thread_policy: Literal["best", "all"] = "best"
    val_fraction: float = 0.05
    include_synthetic: bool = False
    overlong: Literal["truncate", "drop"] = "truncate"
    num_proc: int = 2


@dataclass(frozen=True)
class TokenizerConfig:
    source: str = "gpt2"
    vocab_size: int = 50257


@dataclass(frozen=True)
class ModelConfig:
    init_from: Optional[str] = None
    n_positions: int = 1024
    n_embd: int = 1024
    n_layer: int = 8
    n_head: int = 16
    n_inner: int = 4096
    num_experts: int = 10
    top_k: int = 2
    moe_every: int = 2
    capacity_factor: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    moe_backend: Literal["torch", "tutel"] = "torch"
    tie_word_embeddings: bool = False
    dropout: float = 0.0
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-5


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 1024
    micro_batch_size: int = 4
    grad_accum: int = 8
    epochs: int = 1
    max_steps: Optional[int] = None
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: Literal["adamw_8bit", "adamw"] = "adamw_8bit"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = True
    compile: bool = False  # torch.compile each transformer block (train.py); see docs/performance.md
    eval_every: int = 200
    eval_batches: int = 50
    save_every: int = 200
    keep_checkpoints: int = 2
    gpu_memory_gb: float = 16.0
    deepspeed: Optional[str] = None


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 4
    max_batches: Optional[int] = None
    dead_expert_threshold: float = 0.01
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    prompts: tuple[str, ...] = (
        "What is a mixture-of-experts model?",
        "Write a haiku about autumn.",
        "How do I reverse a list in Python?",
    )


@dataclass(frozen=True)
class QuantizeConfig:
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    calib_samples: int = 128
    calib_max_tokens: int = 1024
    min_expert_tokens: int = 16


@dataclass(frozen=True)
class Params:
    seed: int = 1337
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read, merge `overrides` (same nesting as the file) and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: not found; run from the project root or pass --params PATH")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = merge(raw, overrides)
    return params_from_dict(raw, source=str(path))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def params_from_dict(raw: dict[str, Any], source: str = "params.yaml") -> Params:
    params = _build(Params, raw, source, prefix="")
    _check(params, source)
    return params


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]}; known keys in {where}: {', '.join(fields)}"
        )
    missing = [name for name in fields if name not in raw]
    if missing:
        raise ConfigError(
            f"{source}: missing key {prefix}{missing[0]}; every key of {where} must be set "
            f"(see the reference params.yaml), missing: {', '.join(prefix + m for m in missing)}"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, source, prefix=f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}", source)
    return cls(**values)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Check `value` against a field's type hint; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key, source)
    if origin is Literal:
        if value not in args:
            choices = " | ".join(map(str, args))
            raise ConfigError(f"{source}: {key}={value!r} is not one of {choices}; pick one of those")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {key}={value!r} must be a list of strings, e.g. [en]")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(
            f"{source}: {key}={value!r} must be of type {hint.__name__}, got {type(value).__name__}"
        )
    return value


def _require(ok: bool, message: str, source: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {message}")


def _check(p: Params, source: str) -> None:
    """Cross-key checks: combinations that no code path can run."""
    m, t, d, q, e = p.model, p.train, p.data, p.quantize, p.eval
    _require(0.0 < d.val_fraction < 1.0,
             f"data.val_fraction={d.val_fraction} must lie strictly between 0 and 1, e.g. 0.05", source)
    _require(d.num_proc >= 1, f"data.num_proc={d.num_proc} must be >= 1", source)
    _require(p.tokenizer.vocab_size >= 260,
             f"tokenizer.vocab_size={p.tokenizer.vocab_size} must be >= 260 (256 bytes + chat tokens)", source)
    for key in ("n_positions", "n_embd", "n_layer", "n_head", "n_inner", "num_experts", "top_k", "moe_every"):
        _require(getattr(m, key) >= 1, f"model.{key}={getattr(m, key)} must be >= 1", source)
    _require(m.top_k <= m.num_experts,
             f"model.top_k={m.top_k} must be <= model.num_experts={m.num_experts}; "
             f"lower top_k or add experts", source)
    _require(m.n_embd % m.n_head == 0,
             f"model.n_embd={m.n_embd} must be divisible by model.n_head={m.n_head}; "
             f"pick n_head from the divisors of n_embd", source)
    _require(m.capacity_factor >= 0, f"model.capacity_factor={m.capacity_factor} must be >= 0 (0 = dropless)",
             source)
    for key in ("aux_loss_coef", "z_loss_coef"):
        _require(getattr(m, key) >= 0, f"model.{key}={getattr(m, key)} must be >= 0 (0 switches the loss off)", source)
    _require(m.init_from is None or p.tokenizer.source != "train",
             f"model.init_from={m.init_from!r} needs the parent's tokenizer, but tokenizer.source='train' builds "
             f"a new vocabulary; set tokenizer.source to the parent (e.g. gpt2) or model.init_from to null", source)
    _require(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)", source)
    _require(t.seq_len <= m.n_positions,
             f"train.seq_len={t.seq_len} must be <= model.n_positions={m.n_positions}; "
             f"lower seq_len or raise n_positions", source)
    for key in ("seq_len", "micro_batch_size", "grad_accum", "epochs", "eval_every", "eval_batches",
                "save_every", "keep_checkpoints"):
        _require(getattr(t, key) >= 1, f"train.{key}={getattr(t, key)} must be >= 1", source)
    _require(t.max_steps is None or t.max_steps >= 1,
             f"train.max_steps={t.max_steps} must be null or >= 1", source)
    _require(0 < t.min_lr <= t.lr, f"train.min_lr={t.min_lr} must be in (0, train.lr={t.lr}]", source)
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0", source)
    _require(t.gpu_memory_gb > 0, f"train.gpu_memory_gb={t.gpu_memory_gb} must be > 0", source)
    for key in ("batch_size", "max_new_tokens"):
        _require(getattr(e, key) >= 1, f"eval.{key}={getattr(e, key)} must be >= 1", source)
    _require(e.max_batches is None or e.max_batches >= 1,
             f"eval.max_batches={e.max_batches} must be null (the whole val split) or >= 1", source)
    _require(0.0 <= e.dead_expert_threshold < 1.0,
             f"eval.dead_expert_threshold={e.dead_expert_threshold} must be in [0, 1)", source)
    _require(e.temperature >= 0, f"eval.temperature={e.temperature} must be >= 0 (0 = greedy)", source)
    _require(0.0 < e.top_p <= 1.0, f"eval.top_p={e.top_p} must be in (0, 1]", source)
    _require(q.bits in (2, 3, 4, 8), f"quantize.bits={q.bits} must be one of 2, 3, 4, 8 (GPTQ)", source)
    _require(q.group_size == -1 or q.group_size >= 1,
             f"quantize.group_size={q.group_size} must be -1 (per column) or >= 1", source)
    for key in ("calib_samples", "calib_max_tokens"):
        _require(getattr(q, key) >= 1, f"quantize.{key}={getattr(q, key)} must be >= 1", source)
    _require(q.min_expert_tokens >= 0,
             f"quantize.min_expert_tokens={q.min_expert_tokens} must be >= 0 (0 = never fall back)", source)
