"""Tiny model, tokenizer and data shared by the release tests (evaluate, export, quantize, chat).

Everything is built offline in seconds: a byte-level BPE trained on a few sentences with the ChatML
tokens and template (the data package's own helpers), and a 2-block MoeChat model (block 1 is MoE).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import moechat.model.auto  # noqa: F401  (registers the Auto classes)
from moechat.model.configuration_moechat import MoeChatConfig
from moechat.data.chat_format import add_chat_format, build_blocks, tokenize_conversation, train_bpe
from moechat.model.modeling_moechat import MoeChatForCausalLM

TOPICS = ["the sea", "a red fox", "python lists", "autumn leaves", "mixture of experts", "green tea",
          "the moon", "a small boat", "binary search", "mountain rivers"]


def conversations(n: int = 10) -> list[dict[str, Any]]:
    """Short two-turn chats in the prepare stage's JSONL shape."""
    out = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        out.append({"message_tree_id": f"tree-{i}", "messages": [
            {"role": "user", "content": f"Tell me about {t}."},
            {"role": "assistant", "content": f"Sure, {t} is nice."},
            {"role": "user", "content": "More?"},
            {"role": "assistant", "content": f"People like {t}."}]})
    return out


def tiny_tokenizer():
    texts = [m["content"] for c in conversations() for m in c["messages"]] * 3
    return add_chat_format(train_bpe(texts, vocab_size=400))


def tiny_model(tokenizer, seed: int = 0, **overrides: Any) -> MoeChatForCausalLM:
    cfg = dict(vocab_size=len(tokenizer), n_positions=128, n_embd=64, n_layer=2, n_head=4, n_inner=128,
               num_experts=4, num_experts_per_tok=2, moe_every=2, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return MoeChatForCausalLM(MoeChatConfig(**cfg)).eval()


def save_model(model: MoeChatForCausalLM, tokenizer, folder: Path) -> Path:
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def packed(tokenizer, convs: list[dict[str, Any]], seq_len: int = 128):
    """Packed blocks exactly as the prepare stage writes them (torch format)."""
    toks = [tokenize_conversation(tokenizer, c["messages"]) for c in convs]
    ds = build_blocks([t.input_ids for t in toks], [t.labels for t in toks], seq_len, tokenizer.pad_token_id, seed=0)
    return ds.with_format("torch")


def write_prepared(tokenizer, folder: Path, n_train: int = 12, n_val: int = 6, seq_len: int = 128) -> Path:
    """A data/prepared-like folder: packed train/val splits and the conversations JSONL files."""
    convs = conversations(n_train + n_val)
    train, val = convs[:n_train], convs[n_train:]
    folder.mkdir(parents=True, exist_ok=True)
    packed(tokenizer, train, seq_len).save_to_disk(str(folder / "train"))
    packed(tokenizer, val, seq_len).save_to_disk(str(folder / "val"))
    for name, rows in (("train", train), ("val", val)):
        (folder / f"conversations_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def tiny_params(path: Path, **sections: dict[str, Any]) -> Path:
    """A params.yaml for the stage scripts: the project's file with the tiny preset and `sections` merged."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((root / "params.yaml").read_text())
    from moechat.config.params import merge

    raw = merge(raw, yaml.safe_load((root / "presets" / "tiny.yaml").read_text()))
    raw = merge(raw, sections)
    path.write_text(yaml.safe_dump(raw))
    return path


def export_tiny(folder: Path, seed: int = 6) -> tuple[MoeChatForCausalLM, Any]:
    """The tiny model exported as the export stage writes it, into `folder`/export (the chat tests' model)."""
    from moechat.config.params import load_params
    from moechat.release.export import export_model

    tokenizer = tiny_tokenizer()
    model = tiny_model(tokenizer, seed=seed)
    export_model(model, tokenizer, load_params(Path(__file__).resolve().parents[2] / "params.yaml"), {},
                 folder / "export")
    return model, tokenizer
