"""Typed view of params.yaml: one frozen dataclass per section, loaded and validated once.

Every stage calls `load_params()` and hands each library function only the sections it needs, so a
stage's `params:` list in dvc.yaml matches what its code can see. Bad input fails here, before any
work, with an error that names the key, the value and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

import yaml

from moechat.errors import ConfigError
from moechat.model.size import count_params

if TYPE_CHECKING:  # transformers takes seconds to import; the config module loads it when it builds one
    from moechat.model.configuration_moechat import MoeChatConfig






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
    """params.yaml's `model` section: how the init stage seeds the model, and the model itself. Every key
    other than the three below is a MoeChatConfig field of the same name (MoeChatConfig.hyperparameters()),
    built and validated once, by MoeChatConfig, into `architecture`."""

    init_from: Optional[str]  # dense GPT-2 parent to upcycle; None = from scratch
    init_layers: Optional[tuple[int, ...]]  # parent blocks (0-based) seeding ours; None = evenly spaced
    upcycle_reinit_ratio: float  # Drop-Upcycling: share of each expert's FFN units re-initialised
    architecture: MoeChatConfig  # vocabulary and special ids unset: they come from the tokenizer (init)


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    epochs: int
    max_steps: Optional[int]
    lr: float
    min_lr: float
    warmup_steps: Optional[int]  # set exactly one of warmup_steps / warmup_ratio (moechat.train.schedule)
    warmup_ratio: Optional[float]  # share of the run's optimizer steps, sized from the data
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    optimizer: Literal["adamw_8bit", "adamw"]
    precision: Literal["auto", "bf16", "fp16", "fp32"]
    gradient_checkpointing: bool
    # attention kernel for training (moechat.train.backends.resolve_attention): auto = one that skips the masked
    # tiles of packed rows on CUDA (flash_attention_2 when installed, else flex_attention), sdpa on CPU
    attn_implementation: Literal["auto", "sdpa", "flex_attention", "flash_attention_2"]
    compile: bool  # torch.compile each transformer block (moechat.train.engine.compile_blocks); see docs/performance.md
    eval_every: int
    eval_batches: int
    save_every: int
    keep_checkpoints: int
    max_consecutive_skips: int  # stop after this many optimizer steps in a row with non-finite gradients
    gpu_memory_gb: float
    deepspeed: Optional[str]


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


# An example for each list-of-strings key, for the message when it is not one.
LIST_EXAMPLES = {"data.langs": "[en]", "eval.prompts": '["Write a haiku about autumn."]',
                 "eval.lm_eval_tasks": "[arc_easy, piqa]"}
# quantize.bits our GPTQ dequantization unpacks (moechat.release.quantize.dequantize_gptq: 32/bits rows per int32)
QUANTIZE_BITS = (2, 4, 8)
QUANTIZE_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # GPTQModel 7.6's torch kernel SUPPORTS_GROUP_SIZE


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
    """The whole of params.yaml. The model and train sections have no defaults: params.yaml (or a preset
    merged over it) is their one source."""

    seed: int
    data: DataConfig
    tokenizer: TokenizerConfig
    model: ModelConfig
    train: TrainConfig
    eval: EvalConfig
    quantize: QuantizeConfig


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
    _check(params, source)
    _check_ranges(params, source)
    return params


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {raw!r}")
    if cls is ModelConfig:
        return _build_model(raw, source, prefix)
    hints = typing.get_type_hints(cls)
    _check_keys(raw, [f.name for f in dataclasses.fields(cls)], source, prefix)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, source, prefix=f"{prefix}{name}.")
        else:
            values[name] = _coerce(value, hint, f"{prefix}{name}", source)
    return cls(**values)


def _check_keys(raw: dict[str, Any], known: list[str], source: str, prefix: str) -> None:
    """Every key of a section is known and set: a typo or a forgotten key fails here, by name."""
    where = prefix.rstrip(".") or "top level"
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]}; known keys in {where}: {', '.join(known)}"
        )
    missing = [name for name in known if name not in raw]
    if missing:
        raise ConfigError(
            f"{source}: missing key {prefix}{missing[0]}; every key of {where} must be set "
            f"(see the reference params.yaml), missing: {', '.join(prefix + m for m in missing)}"
        )


def _build_model(raw: dict[str, Any], source: str, prefix: str) -> ModelConfig:
    """The model section: its three init keys typed here, every other key a MoeChatConfig field, typed by
    the config's own annotations and validated by the config itself (its message, naming our key)."""
    from moechat.model.configuration_moechat import MoeChatConfig, MoeChatConfigError

    init_keys = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "architecture"]
    shape_keys = MoeChatConfig.hyperparameters()
    _check_keys(raw, init_keys + list(shape_keys), source, prefix)
    hints = typing.get_type_hints(ModelConfig, localns={"MoeChatConfig": MoeChatConfig})
    shape_hints = _own_type_hints(MoeChatConfig, shape_keys)
    init = {name: _coerce(raw[name], hints[name], f"{prefix}{name}", source) for name in init_keys}
    shape = {name: _coerce(raw[name], shape_hints[name], f"{prefix}{name}", source) for name in shape_keys}
    try:
        architecture = MoeChatConfig(**shape)
    except MoeChatConfigError as err:
        raise ConfigError(f"{source}: {err.render(prefix)}") from None
    return ModelConfig(**init, architecture=architecture)


def _own_type_hints(cls: type, names: tuple[str, ...]) -> dict[str, Any]:
    """Resolved type hints of `names`, declared on `cls` itself (PretrainedConfig's own annotations name
    types its module never imports, so typing.get_type_hints(cls) cannot resolve the whole class)."""
    own = type("Hints", (), {"__annotations__": {n: cls.__annotations__[n] for n in names},
                             "__module__": cls.__module__})
    return typing.get_type_hints(own)


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
            kind, example = ("strings", LIST_EXAMPLES.get(key, "[a, b]")) if item is str else ("integers", "[0, 3, 7]")
            raise ConfigError(f"{source}: {key}={value!r} must be a list of {kind}, e.g. {example}")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        # .inf/.nan pass the type check and end in NaN losses
        raise ConfigError(f"{source}: {key}={value} must be a finite number")
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
    _require(m.init_from is None or p.tokenizer.source != "train",
             f"model.init_from={m.init_from!r} needs the parent's tokenizer, but tokenizer.source='train' builds "
             f"a new vocabulary; set tokenizer.source to the parent (e.g. gpt2) or model.init_from to null", source)
    _check_upcycling(m, source)
    _require(t.seq_len <= m.architecture.n_positions,
             f"train.seq_len={t.seq_len} must be <= model.n_positions={m.architecture.n_positions}; "
             f"lower seq_len or raise n_positions", source)
    for key in ("seq_len", "micro_batch_size", "grad_accum", "epochs", "eval_every", "eval_batches",
                "save_every", "keep_checkpoints", "max_consecutive_skips"):
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
    _require(q.bits in QUANTIZE_BITS, f"quantize.bits={q.bits} must be one of {', '.join(map(str, QUANTIZE_BITS))} "
                                      f"(GPTQ packs 32/bits weights per int32; 3-bit rows straddle words)", source)
    _require(q.group_size in QUANTIZE_GROUP_SIZES,
             f"quantize.group_size={q.group_size} must be one of {', '.join(map(str, QUANTIZE_GROUP_SIZES))} "
             f"(-1 = one group per column; the sizes GPTQModel's kernels take), e.g. 128", source)
    for key in ("calib_samples", "calib_max_tokens"):
        _require(getattr(q, key) >= 1, f"quantize.{key}={getattr(q, key)} must be >= 1", source)
    _require(q.min_expert_tokens >= 0,
             f"quantize.min_expert_tokens={q.min_expert_tokens} must be >= 0 (0 = never fall back)", source)


# ----------------------------------------------------------------------------------------------------
# Reading the YAML file: duplicate keys and YAML 1.1 floats


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader for params files. It refuses what a params file never needs and PyYAML would take:
    a key repeated in one mapping (plain PyYAML keeps the last silently, so `lr` set twice would drop a
    value without a word); anchors and aliases (no params key needs one, and a 2 KB file of nested aliases
    expands to gigabytes: refusing them all is simpler and safer than bounding the expansion); the merge
    key `<<`; keys that are not names (`1:`, `~:`, `[a, b]:`); integers longer than any params value."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent, yaml.ScalarEvent, yaml.SequenceStartEvent, yaml.MappingStartEvent):
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                self._refuse(event.start_mark, f"YAML alias *{event.anchor}: params files take no anchors or "
                                               f"aliases; write the value out")
            if getattr(event, "anchor", None) is not None:
                self._refuse(event.start_mark, f"YAML anchor &{event.anchor}: params files take no anchors or "
                                               f"aliases; write the value out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == MERGE_TAG:
                self._refuse(key_node.start_mark, "the YAML merge key `<<` is not supported in params files; "
                                                  "write the keys out in the section")
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != STR_TAG:
                shown = f"key {key_node.value!r}" if isinstance(key_node, yaml.ScalarNode) else f"a {key_node.id} key"
                self._refuse(key_node.start_mark, f"{shown} is not a name; params keys are names such as lr "
                                                  f"(quote it if it must be text)")
            key = key_node.value
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}:{line}: key {key!r} appears twice in one mapping "
                                  f"(first at line {seen[key]}); keep one of them")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        digits = sum(c.isdigit() for c in node.value)
        if digits > INT_DIGITS_MAX:
            self._refuse(node.start_mark, f"an integer of {digits} digits; no params value needs more than "
                                          f"{INT_DIGITS_MAX} (seed < 2^32, sizes far below); fix the value")
        return super().construct_yaml_int(node)

    def _refuse(self, mark: yaml.Mark, message: str) -> None:
        raise ConfigError(f"{mark.name}:{mark.line + 1}: {message}")


MERGE_TAG, STR_TAG = "tag:yaml.org,2002:merge", "tag:yaml.org,2002:str"
INT_DIGITS_MAX = 30
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def read_yaml(path: Path) -> Any:
    """Parse a params file with the refusals of _UniqueKeyLoader; a syntax error names the file and line."""
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a params file; pass the YAML file (e.g. --params params.yaml)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (byte 0x{data[err.start]:02x}); save the file as "
                          f"UTF-8") from None
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
# Range checks: values that would otherwise pass here and fail late (or silently misbehave)

SEED_MAX = 2**32 - 1  # numpy's and torch.manual_seed's range
N_POSITIONS_MAX = 65536  # the position table and activations beyond this do not fit one 16 GB GPU


def _check_ranges(p: Params, source: str) -> None:
    """Ranges that no run can use, checked before any stage works; each message names the key and the fix."""
    m, t, e = p.model.architecture, p.train, p.eval
    _require(0 <= p.seed <= SEED_MAX, f"seed={p.seed} must be in 0..{SEED_MAX} (2^32-1), e.g. 1337", source)
    for key in ("beta1", "beta2"):
        _require(0.0 <= getattr(t, key) < 1.0,
                 f"train.{key}={getattr(t, key)} must be in [0, 1), e.g. beta1: 0.9, beta2: 0.95", source)
    _require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0 (0 = no decay)", source)
    _require(t.grad_clip >= 0, f"train.grad_clip={t.grad_clip} must be >= 0 (0 = no clipping)", source)
    _require(m.moe_every <= m.n_layer,
             f"model.moe_every={m.moe_every} must be <= model.n_layer={m.n_layer}, or the model has no MoE "
             f"layer at all; lower moe_every (1 = every layer)", source)
    _require(m.n_positions <= N_POSITIONS_MAX,
             f"model.n_positions={m.n_positions} must be <= {N_POSITIONS_MAX}: the position table and the "
             f"activations of such sequences need tens of GB; use the longest train.seq_len you train on", source)
    _require(len(e.prompts) >= 1 and all(prompt.strip() for prompt in e.prompts),
             "eval.prompts must list at least one non-empty prompt (the evaluate stage samples a reply to "
             "each)", source)
    _require(m.capacity_factor <= m.num_experts / m.num_experts_per_tok,
             f"model.capacity_factor={m.capacity_factor} must be <= model.num_experts / model.num_experts_per_tok = "
             f"{m.num_experts / m.num_experts_per_tok:g} (there every expert can take every token, so no token is "
             f"dropped); use 0 for dropless routing", source)
    _require(p.tokenizer.vocab_size <= VOCAB_SIZE_MAX,
             f"tokenizer.vocab_size={p.tokenizer.vocab_size} must be <= {VOCAB_SIZE_MAX} (2^20; the largest "
             f"published vocabularies hold ~256k tokens), e.g. 50257", source)
    _check_weights_fit(m, p.tokenizer.vocab_size, source)
    _check_deepspeed_file(t.deepspeed, source)
    _require(m.moe_backend != "tutel" or importlib.util.find_spec("tutel") is not None,
             "model.moe_backend=tutel but tutel is not installed; tutel is not on PyPI: `pip install "
             "git+https://github.com/microsoft/tutel@main`, or set model.moe_backend: torch (same results)", source)


VOCAB_SIZE_MAX = 2**20  # the BPE trainer allocates per entry: 1e9 panics in Rust (exit 134)


def weight_count(m: MoeChatConfig, vocab_size: int) -> int:
    """Parameters of MoeChatForCausalLM from its sizes alone (the model floor's one count)."""
    return count_params(m, vocab_size).total


def physical_memory_bytes() -> int:
    """This machine's RAM (the init stage builds the fp32 model there, whatever device trains it)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_weights_fit(m: MoeChatConfig, vocab_size: int, source: str) -> None:
    """Refuse, before anything is allocated, a model whose fp32 weights alone exceed this machine's memory
    (n_embd: 1048576 would otherwise fail in the allocator after minutes, or hang in swap)."""
    count = weight_count(m, vocab_size)
    ram = physical_memory_bytes()
    _require(4 * count <= ram,
             f"model sizes n_layer={m.n_layer}, n_embd={m.n_embd}, n_inner={m.n_inner}, num_experts={m.num_experts} "
             f"(vocabulary {vocab_size}) give {count:.3g} parameters, {4 * count / 2**30:,.1f} GiB of fp32 weights, "
             f"more than this machine's {ram / 2**30:,.1f} GiB of memory; lower them (`moechat plan` sizes a model "
             f"for a GPU)", source)


def _check_deepspeed_file(value: Optional[str], source: str) -> None:
    """train.deepspeed as a path: a readable UTF-8 JSON object, checked now rather than when training starts."""
    if value in (None, "zero2", "zero2_offload"):
        return
    path = Path(value)
    _require(path.is_file(), f"train.deepspeed={value!r} is not null, zero2, zero2_offload or an existing JSON "
                             f"file; fix the path or pick one of those", source)
    try:
        given = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{source}: train.deepspeed={value}: not valid UTF-8 ({err.reason} at byte {err.start}); "
                          f"save the DeepSpeed config as UTF-8 JSON") from None
    except (json.JSONDecodeError, RecursionError) as err:
        raise ConfigError(f"{source}: train.deepspeed={value}: not valid JSON ({err}); fix the file") from None
    _require(isinstance(given, dict), f"train.deepspeed={value}: holds a JSON {type(given).__name__}, not an object "
                                      f"of DeepSpeed keys such as {{\"zero_optimization\": {{\"stage\": 2}}}}", source)


def _check_warmup(t: TrainConfig, source: str) -> None:
    """Exactly one warmup key; a warmup that covers a fixed-length run is refused here, one sized from
    the data when the blocks are counted (moechat.train.schedule.build_schedule, before step 0)."""
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
    when it is loaded (moechat.model.upcycle)."""
    _require(0.0 <= m.upcycle_reinit_ratio <= 1.0,
             f"model.upcycle_reinit_ratio={m.upcycle_reinit_ratio} must be in [0, 1] (0 = exact copies of the "
             f"parent MLP, 0.5 = Drop-Upcycling's choice)", source)
    if m.init_layers is None:
        return
    _require(m.init_from is not None,
             f"model.init_layers={list(m.init_layers)} selects blocks of a dense parent, but model.init_from is "
             f"null; set model.init_from (e.g. gpt2-medium) or model.init_layers to null", source)
    _require(len(m.init_layers) == m.architecture.n_layer,
             f"model.init_layers={list(m.init_layers)} names {len(m.init_layers)} blocks but model.n_layer="
             f"{m.architecture.n_layer}; list one parent block per layer, or null for evenly spaced ones", source)
    _require(all(0 <= a < b for a, b in zip(m.init_layers, m.init_layers[1:])) and m.init_layers[0] >= 0,
             f"model.init_layers={list(m.init_layers)} must be increasing block indices >= 0 (0-based)", source)
