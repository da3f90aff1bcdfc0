"""Greedy chat replies of an exported folder, as token ids, printed as one JSON object.

Imports only torch and transformers, so tests/test_export_floor.py runs it with the floor environment's
python (`python tests/floor_generate.py FOLDER`) and in-process with the pinned transformers, and compares
the two. Each prompt is generated alone and all of them as one left-padded batch (the attention mask path),
with sdpa (the default) and eager attention. (flex_attention is left out: on CPU it compiles for a minute
and torch 2.13's CPU inductor cannot compile its kernel for a padding mask; see docs/transformers.md.)
"""

from __future__ import annotations

import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "What is binary search?"},
     {"role": "assistant", "content": "Sure, binary search is nice."},
     {"role": "user", "content": "More?"}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Hi"}],
]
MAX_NEW_TOKENS = 12


BACKENDS = ("sdpa", "eager")


def greedy_replies(folder: str) -> dict:
    """{"transformers": version, backend: {"alone": [new ids per prompt], "batched": [...]}} for PROMPTS."""
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in PROMPTS]
    replies = {"transformers": transformers.__version__}
    for backend in BACKENDS:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                     attn_implementation=backend).eval()
        tokenizer.padding_side = "right"  # one row: no padding either way
        alone = [_generate(model, tokenizer, [t])[0] for t in texts]
        tokenizer.padding_side = "left"
        replies[backend] = {"alone": alone, "batched": _generate(model, tokenizer, texts)}
    return replies


def _generate(model, tokenizer, texts: list[str]) -> list[list[int]]:
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return out[:, batch["input_ids"].shape[1]:].tolist()


if __name__ == "__main__":
    print(json.dumps(greedy_replies(*sys.argv[1:])))
