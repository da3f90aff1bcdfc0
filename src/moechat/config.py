"""Typed view of params.yaml: one frozen dataclass per section, loaded and validated once.

Every stage calls `load_params()` and hands each library function only the sections it needs, so a
stage's `params:` list in dvc.yaml matches what its code can see. Bad input fails here, before any
work, with an error that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
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
    thread_policy: Literal["best", "all"] = "all"
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
    init_from: Optional[str] = "gpt2-medium"
    init_layers: Optional[tuple[int, ...]] = None  # parent blocks (0-based) seeding ours; null = evenly spaced
    upcycle_reinit_ratio: float = 0.5  # Drop-Upcycling: share of each expert's FFN units re-initialised
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
    micro_batch_size: int = 8
    grad_accum: int = 4
    epochs: int = 2
    max_steps: Optional[int] = None
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: Optional[int] = None  # set exactly one of warmup_steps / warmup_ratio (moechat.schedule)
    warmup_ratio: Optional[float] = 0.05  # share of the run's optimizer steps, sized from the data
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    optimizer: Literal["adamw_8bit", "adamw"] = "adamw_8bit"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    gradient_checkpointing: bool = False
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
    lm_eval_tasks: tuple[str, ...] = ("arc_easy", "hellaswag", "piqa")  # lm-evaluation-harness; [] = none
    lm_eval_limit: Optional[int] = 500  # examples per task; null = the whole task
    lm_eval_include_path: Optional[str] = None  # folder of local lm-eval task YAMLs (offline tasks)


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
    raw = read_yaml(path)
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
    _check_finite(params, source)
    _check(params, source)
    _check_ranges(params, source)
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
        item = args[0]
        if not isinstance(value, list) or not all(isinstance(v, item) and not isinstance(v, bool) for v in value):
            kind, example = ("strings", "[en]") if item is str else ("integers", "[0, 3, 7]")
            raise ConfigError(f"{source}: {key}={value!r} must be a list of {kind}, e.g. {example}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str) and _yaml11_float_string(value):
        raise ConfigError(f"{source}: {key}={value!r} was read as a string: YAML 1.1 needs a dot in the mantissa "
                          f"of a float; write {_yaml11_float_fix(value)}")
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
    _check_upcycling(m, source)
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
    _check_warmup(t, source)
    _require(t.gpu_memory_gb > 0, f"train.gpu_memory_gb={t.gpu_memory_gb} must be > 0", source)
    for key in ("batch_size", "max_new_tokens"):
        _require(getattr(e, key) >= 1, f"eval.{key}={getattr(e, key)} must be >= 1", source)
    _require(e.max_batches is None or e.max_batches >= 1,
             f"eval.max_batches={e.max_batches} must be null (the whole val split) or >= 1", source)
    _require(0.0 <= e.dead_expert_threshold < 1.0,
             f"eval.dead_expert_threshold={e.dead_expert_threshold} must be in [0, 1)", source)
    _require(e.temperature >= 0, f"eval.temperature={e.temperature} must be >= 0 (0 = greedy)", source)
    _require(0.0 < e.top_p <= 1.0, f"eval.top_p={e.top_p} must be in (0, 1]", source)
    _require(e.lm_eval_limit is None or e.lm_eval_limit >= 1,
             f"eval.lm_eval_limit={e.lm_eval_limit} must be null (whole tasks) or >= 1", source)
    _require(q.bits in (2, 3, 4, 8), f"quantize.bits={q.bits} must be one of 2, 3, 4, 8 (GPTQ)", source)
    _require(q.group_size == -1 or q.group_size >= 1,
             f"quantize.group_size={q.group_size} must be -1 (per column) or >= 1", source)
    for key in ("calib_samples", "calib_max_tokens"):
        _require(getattr(q, key) >= 1, f"quantize.{key}={getattr(q, key)} must be >= 1", source)
    _require(q.min_expert_tokens >= 0,
             f"quantize.min_expert_tokens={q.min_expert_tokens} must be >= 0 (0 = never fall back)", source)


# ----------------------------------------------------------------------------------------------------
# Reading the YAML file: duplicate keys and YAML 1.1 floats


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key repeated in one mapping (plain PyYAML keeps the last silently, so
    `lr` set twice, or a section pasted twice, would drop values without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}:{line}: key {key!r} appears twice in one mapping "
                                  f"(first at line {seen[key]}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Parse a params file with duplicate keys refused; a syntax error names the file and line."""
    text = path.read_text(encoding="utf-8")
    try:
        return yaml.load(text, Loader=_loader_for(path)) or {}
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({err.problem}); fix the syntax there") from None


def _loader_for(path: Path) -> type:
    """_UniqueKeyLoader whose marks carry the file's path (the messages name the file)."""

    class Loader(_UniqueKeyLoader):
        def __init__(self, stream: Any):
            super().__init__(stream)
            self.name = str(path)

    return Loader


# 1e-3, 5E+4, -2e5: floats in YAML 1.2 and Python, strings under PyYAML's YAML 1.1 resolver.
_YAML11_FLOAT_STRING = re.compile(r"^[-+]?\d+[eE][-+]?\d+$")


def _yaml11_float_string(value: str) -> bool:
    return _YAML11_FLOAT_STRING.match(value.strip()) is not None


def _yaml11_float_fix(value: str) -> str:
    mantissa, exponent = re.split(r"[eE]", value.strip())
    return f"{mantissa}.0e{exponent}"


# ----------------------------------------------------------------------------------------------------
# Range checks added for issue 12: values that used to pass here and fail late (or silently misbehave)

SEED_MAX = 2**32 - 1  # numpy's and torch.manual_seed's range
N_POSITIONS_MAX = 65536  # the position table and activations beyond this do not fit one 16 GB GPU


def _check_finite(p: Params, source: str) -> None:
    """Every float param is a finite number: `.inf`/`.nan` pass the type check and end in NaN losses."""
    for section in dataclasses.fields(p):
        value = getattr(p, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        for f in dataclasses.fields(value):
            x = getattr(value, f.name)
            if isinstance(x, float) and not math.isfinite(x):
                raise ConfigError(f"{source}: {section.name}.{f.name}={x} must be a finite number")


def _check_ranges(p: Params, source: str) -> None:
    """Ranges that no run can use, checked before any stage works; each message names the key and the fix."""
    m, t, e = p.model, p.train, p.eval
    _require(0 <= p.seed <= SEED_MAX, f"seed={p.seed} must be in 0..{SEED_MAX} (2^32-1), e.g. 1337", source)
    for key in ("beta1", "beta2"):
        _require(0.0 <= getattr(t, key) < 1.0,
                 f"train.{key}={getattr(t, key)} must be in [0, 1), e.g. beta1: 0.9, beta2: 0.95", source)
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0 (0 = no decay)", source)
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 = no clipping)", source)
    _require(m.initializer_range > 0,
             f"model.initializer_range={m.initializer_range} must be > 0 (the std of the weight init), e.g. 0.02",
             source)
    _require(m.layer_norm_epsilon > 0,
             f"model.layer_norm_epsilon={m.layer_norm_epsilon} must be > 0 (it keeps LayerNorm from dividing "
             f"by zero), e.g. 1.0e-5", source)
    _require(m.moe_every <= m.n_layer,
             f"model.moe_every={m.moe_every} must be <= model.n_layer={m.n_layer}, or the model has no MoE "
             f"layer at all; lower moe_every (1 = every layer)", source)
    _require(m.n_positions <= N_POSITIONS_MAX,
             f"model.n_positions={m.n_positions} must be <= {N_POSITIONS_MAX}: the position table and the "
             f"activations of such sequences need tens of GB; use the longest train.seq_len you train on", source)
    _require(len(e.prompts) >= 1 and all(prompt.strip() for prompt in e.prompts),
             "eval.prompts must list at least one non-empty prompt (the evaluate stage samples a reply to "
             "each)", source)
    _require(m.moe_backend != "tutel" or importlib.util.find_spec("tutel") is not None,
             "model.moe_backend=tutel but tutel is not installed; tutel is not on PyPI: `pip install "
             "git+https://github.com/microsoft/tutel@main`, or set model.moe_backend: torch (same results)", source)


def _check_warmup(t: TrainConfig, source: str) -> None:
    """Exactly one warmup key; a warmup that covers a fixed-length run is refused here, one sized from
    the data when the blocks are counted (moechat.schedule.build_schedule, before step 0)."""
    _require((t.warmup_steps is None) != (t.warmup_ratio is None),
             f"train.warmup_steps={t.warmup_steps} and train.warmup_ratio={t.warmup_ratio}: set exactly one "
             f"(the other to null), e.g. warmup_ratio: 0.05", source)
    if t.warmup_ratio is not None:
        _require(0.0 <= t.warmup_ratio < 1.0,
                 f"train.warmup_ratio={t.warmup_ratio} must be in [0, 1), e.g. 0.05", source)
        return
    _require(t.warmup_steps >= 0, f"train.warmup_steps={t.warmup_steps} must be >= 0", source)
    _require(t.max_steps is None or t.warmup_steps < t.max_steps,
             f"train.warmup_steps={t.warmup_steps} must be < train.max_steps={t.max_steps} or the rate never "
             f"reaches train.lr; lower warmup_steps, or set it to null and train.warmup_ratio: 0.05", source)


def _check_upcycling(m: ModelConfig, source: str) -> None:
    """model.init_layers names one parent block per block of ours, in order; the parent's depth is checked
    when it is loaded (moechat.init)."""
    _require(0.0 <= m.upcycle_reinit_ratio <= 1.0,
             f"model.upcycle_reinit_ratio={m.upcycle_reinit_ratio} must be in [0, 1] (0 = exact copies of the "
             f"parent MLP, 0.5 = Drop-Upcycling's choice)", source)
    if m.init_layers is None:
        return
    _require(m.init_from is not None,
             f"model.init_layers={list(m.init_layers)} selects blocks of a dense parent, but model.init_from is "
             f"null; set model.init_from (e.g. gpt2-medium) or model.init_layers to null", source)
    _require(len(m.init_layers) == m.n_layer,
             f"model.init_layers={list(m.init_layers)} names {len(m.init_layers)} blocks but model.n_layer="
             f"{m.n_layer}; list one parent block per layer, or null for evenly spaced ones", source)
    _require(all(0 <= a < b for a, b in zip(m.init_layers, m.init_layers[1:])) and m.init_layers[0] >= 0,
             f"model.init_layers={list(m.init_layers)} must be increasing block indices >= 0 (0-based)", source)
