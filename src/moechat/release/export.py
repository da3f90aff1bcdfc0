"""Export the trained model as a self-contained Hugging Face folder anyone can load without moechat.

`models/export/` holds config.json with `auto_map` (AutoConfig, AutoModel, AutoModelForCausalLM), the two
self-contained code files (configuration_moechat.py, modeling_moechat.py), safetensors weights sharded past
`max_shard_size`, the tokenizer with its ChatML template, generation_config.json (eos = <|im_end|>, pad = <|pad|>) and a model
card whose figures are read from the model itself and from the prepare, train and eval metrics (the export
stage's deps in dvc.yaml), never typed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from moechat.errors import MoechatError
from moechat.config.params import Params
from moechat.data.oasst import source_kind
from moechat.atomic import atomic_dir

CODE_FILES = ("configuration_moechat.py", "modeling_moechat.py")
# What each Auto class loads from the exported code files (trust_remote_code=True, no moechat needed).
AUTO_MAP = {"AutoConfig": "configuration_moechat.MoeChatConfig", "AutoModel": "modeling_moechat.MoeChatModel",
            "AutoModelForCausalLM": "modeling_moechat.MoeChatForCausalLM"}
# Only the metrics of the stages export depends on (dvc.yaml deps), so the card never shows stale figures.
METRIC_STAGES = ("prepare", "train", "eval")
# Figures of the machine and the moment, not of the model: two runs from the same inputs differ in them, so the
# card (a file of the models/export out) leaves them out and the folder hashes the same; they stay in
# metrics/train.json, which the experiment keeps.
RUN_DEPENDENT_KEYS = ("tokens_per_s", "mfu", "peak_memory_gb")


class ExportError(MoechatError, RuntimeError):
    """The export cannot be written (an input is missing, or the folder would not load elsewhere); the
    message says what is missing and which stage makes it."""


def read_metrics(metrics_dir: Path) -> dict[str, dict[str, Any]]:
    """metrics/{prepare,train,eval}.json by stage name; each must exist (they are the stage's deps)."""
    found = {}
    for stage in METRIC_STAGES:
        path = Path(metrics_dir) / f"{stage}.json"
        if not path.exists():
            raise ExportError(f"{path}: not found; the model card needs it: run `dvc repro {stage}`")
        found[stage] = json.loads(path.read_text())
    return found


def card_dataset(source: str) -> str:
    """The card's `datasets:` entry for `data.source`: a Hub id as is, a local file or folder by its name
    (a local source has no Hub id, and inventing one would link to someone else's dataset)."""
    return source if source_kind(source) == "hub" else Path(source).name


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Stop at <|im_end|> (the end of an assistant turn) and pad with <|pad|>."""
    if tokenizer.eos_token != "<|im_end|>" or tokenizer.pad_token_id is None:
        raise ExportError(f"tokenizer has eos_token={tokenizer.eos_token!r}, pad_token={tokenizer.pad_token!r}; "
                          f"the chat format needs eos <|im_end|> and a pad token: rerun `dvc repro prepare`")
    return GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def export_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: Params,
                 metrics: dict[str, dict[str, Any]], out_dir: Path, max_shard_size: str = "2GB") -> dict[str, Any]:
    """Write the export folder atomically (temporary sibling, then rename); returns a summary."""
    out_dir = Path(out_dir)
    model.generation_config = generation_config(tokenizer)
    add_auto_map(model)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _check_self_contained(tmp)
        (tmp / "README.md").write_text(model_card(model, tokenizer, params, metrics))
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    return {"out": str(out_dir), "shards": shards,
            "weight_bytes": sum((out_dir / s).stat().st_size for s in shards),
            "params": model.parameter_counts()}


def add_auto_map(model: PreTrainedModel) -> None:
    """Put every Auto class of AUTO_MAP into the config before saving: save_pretrained writes only the
    saved class's own entry (AutoModelForCausalLM) and the config's, never the base model's (AutoModel)."""
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), **AUTO_MAP}


def _check_self_contained(folder: Path) -> None:
    """config.json must map AutoConfig, AutoModel and AutoModelForCausalLM to code files next to it."""
    config = json.loads((folder / "config.json").read_text())
    auto_map = config.get("auto_map", {})
    if any(auto_map.get(name) != target for name, target in AUTO_MAP.items()):
        raise ExportError(f"{folder}/config.json has auto_map={auto_map}; import moechat.model.auto before "
                          f"loading the model so register_for_auto_class writes it")
    missing = [f for f in CODE_FILES if not (folder / f).exists()]
    if missing:
        raise ExportError(f"{folder}: save_pretrained did not copy {missing}; the folder would need moechat")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _table(rows: list[tuple[str, Any]]) -> str:
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows])


def model_card(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, params: Params,
               metrics: dict[str, dict[str, Any]]) -> str:
    """README.md for the export folder: architecture, measured parameter counts, data, training, eval."""
    c = model.config
    counts = model.parameter_counts()
    moe_layers = [i for i in range(c.n_layer) if c.is_moe_layer(i)]
    d, t = params.data, params.train
    sections = [
        "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags: [moechat, mixture-of-experts, "
        f"chatml]\ndatasets: [{json.dumps(card_dataset(d.source))}]\n---\n",
        "# moechat MoE chat model\n",
        "A GPT-2-style decoder with sparse Mixture-of-Experts MLPs, trained as a ChatML assistant on OpenAssistant "
        "OASST1 by the moechat DVC pipeline. Load it with `trust_remote_code=True` (the model code ships in this "
        "folder).\n",
        "## Architecture\n",
        _table([("layers", c.n_layer), ("width (n_embd)", c.n_embd), ("heads", c.n_head),
                ("MLP width (n_inner)", c.n_inner), ("context (n_positions)", c.n_positions),
                ("vocabulary", c.vocab_size), ("MoE blocks (0-based)", moe_layers),
                ("experts per MoE block", c.num_experts), ("experts per token (top-k)", c.num_experts_per_tok),
                ("capacity factor (0 = dropless)", c.capacity_factor),
                ("router", "linear, fp32 softmax, top-k renormalised"),
                ("tied embeddings", c.tie_word_embeddings)]) + "\n",
        "## Parameters (counted from the weights)\n",
        _table([("total", counts["total"]), ("active per token", counts["active"]),
                ("total, without embeddings", counts["total_non_embedding"]),
                ("active, without embeddings", counts["active_non_embedding"])]) + "\n",
        "## Data\n",
        _table([("source", d.source), ("revision", d.revision), ("languages", list(d.langs) or "all"),
                ("thread policy", d.thread_policy), ("validation share of trees", d.val_fraction),
                ("synthetic messages kept", d.include_synthetic)]
               + _metric_rows(metrics.get("prepare", {}))) + "\n",
        "Chat format (ChatML): `<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n...<|im_end|>`; the "
        "loss covers assistant tokens only. eos = `<|im_end|>`, pad = `<|pad|>`.\n",
        "## Training\n",
        _table([("sequence length", t.seq_len), ("micro-batch", t.micro_batch_size),
                ("gradient accumulation", t.grad_accum), ("epochs", t.epochs), ("max steps", t.max_steps),
                ("learning rate (peak / min)", f"{t.lr:g} / {t.min_lr:g}"), ("warmup steps", t.warmup_steps),
                ("weight decay", t.weight_decay), ("optimizer", t.optimizer), ("precision", t.precision),
                ("aux loss coef", c.aux_loss_coef), ("z-loss coef", c.z_loss_coef), ("seed", params.seed)]
               + _metric_rows(metrics.get("train", {}))) + "\n",
        "Throughput and peak memory depend on the machine: they are in the run's `metrics/train.json`, not here.\n",
        "## Evaluation (validation split, assistant tokens)\n",
        _eval_section(metrics.get("eval")),
        "## Use\n",
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        "tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n"
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)\n"
        "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello!\"}], add_generation_prompt=True,\n"
        "                              return_tensors=\"pt\", return_dict=True)\n"
        "out = model.generate(**ids, max_new_tokens=64)\n"
        "print(tok.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n```\n",
        "or `moechat chat <this folder>`.\n",
    ]
    return "\n".join(sections)


def _metric_rows(m: dict[str, Any]) -> list[tuple[str, Any]]:
    """Top-level scalar entries of a metrics file, less the run-dependent ones (RUN_DEPENDENT_KEYS)."""
    return [(k.replace("_", " "), v) for k, v in m.items()
            if k not in RUN_DEPENDENT_KEYS and isinstance(v, (int, float, str)) and not isinstance(v, bool)]


def _eval_section(ev: Optional[dict[str, Any]]) -> str:
    if not ev:
        return "No metrics/eval.json was found when this folder was exported.\n"
    rows = [("loss", ev["loss"]), ("perplexity", ev["perplexity"]), ("next-token accuracy", ev["accuracy"]),
            ("tokens", ev["tokens"])]
    router = ev.get("router")
    if router:
        rows += [("mean expert-share CV", router["mean_cv"]), ("dead experts (all layers)", router["dead_experts"]),
                 ("dropped share", router["dropped_share"]), ("mean router entropy (nats)", router["mean_entropy"])]
    return _table(rows) + "\n"
