"""Chat format, tokenizer, assistant-only labels and packing into fixed-length blocks.

The training tokens of a conversation are exactly `tokenizer.apply_chat_template(messages)`: the Jinja
template marks assistant turns with `{% generation %}`, and transformers' `return_assistant_tokens_mask`
turns those spans into the label mask, so the format the model learns and the one it is prompted with at
inference cannot drift apart.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from bisect import bisect_left, insort
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from datasets import Dataset, Features, List, Value, load_from_disk
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from moechat.atomic import atomic_dir
from moechat.errors import MoechatError
from moechat.config.params import TokenizerConfig
from moechat.model.folder_checks import PIPELINE_NO_CODE, check_tokenizer_code
from moechat.hub import HUB_LOAD_ERRORS, require_hub_repo
from moechat.data.labels import IGNORE

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"

# ChatML. Assistant content plus its <|im_end|> sits inside {% generation %}: those tokens get labels.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else %}"
    "{{ message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TokenizerError(MoechatError, ValueError):
    """`tokenizer.source` cannot give a usable tokenizer; the message says what to set."""


# ------------------------------------------------------------------------------------------ tokenizer
def load_or_train_tokenizer(cfg: TokenizerConfig, train_texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """The pretrained tokenizer at `cfg.source`, or a byte-level BPE trained on `train_texts` (the train
    split only, so val text never shapes the vocabulary) when `cfg.source == "train"`; either way with
    the chat tokens and template added."""
    tokenizer = train_bpe(train_texts, cfg.vocab_size) if cfg.source == "train" else _load_pretrained(cfg.source)
    return add_chat_format(tokenizer)


def _load_pretrained(source: str) -> PreTrainedTokenizerBase:
    revision = None
    if not Path(source).is_dir():
        # Seconds, with a named error, where from_pretrained would retry an unreachable Hub for minutes.
        hint = "point tokenizer.source at a folder saved with save_pretrained, or use `train`"
        revision = require_hub_repo("tokenizer.source", source, "model", hint=hint)
    else:  # the pipeline never runs a folder's code: refused before transformers could ask on a terminal
        check_tokenizer_code(Path(source), trust_remote_code=False, fix=PIPELINE_NO_CODE)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
    except (ValueError, *HUB_LOAD_ERRORS) as err:
        raise TokenizerError(f"tokenizer.source={source!r}: could not load a tokenizer ({type(err).__name__}: {err}); "
                             f"use a Hub id, a local save_pretrained folder, or `train`") from err
    if tokenizer.init_kwargs.get("auto_map"):  # a Hub tokenizer loaded as its transformers class: drop its code
        raise TokenizerError(f"tokenizer.source={source!r}: its tokenizer_config.json has an auto_map naming its own "
                             f"code; {PIPELINE_NO_CODE}")
    if not tokenizer.is_fast:
        raise TokenizerError(f"tokenizer.source={source!r}: loaded a slow (Python) tokenizer; assistant label "
                             f"masks need a fast one (tokenizer.json), or use `train`")
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """GPT-2-style byte-level BPE (same pre-tokenizer regex, no prefix space) with the chat tokens in
    the vocabulary; `vocab_size` counts them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(bpe_training_pieces(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


# What the BPE trainer sees of one message. Its merge counting is quadratic in the length of a pre-token (a
# run without whitespace), so one 2 MB message of base64 or a minified file would hold `prepare` for many
# minutes. Merges learned from the first 64k characters of a message and from 256-character slices of a
# long run are the merges that matter; the data itself is tokenized whole, never cut.
BPE_MAX_MESSAGE_CHARS = 65_536
BPE_MAX_RUN_CHARS = 256
_LONG_RUN = re.compile(rf"\S{{{BPE_MAX_RUN_CHARS + 1},}}")


def bpe_training_pieces(texts: Iterable[str]) -> Iterator[str]:
    """Each text cut to BPE_MAX_MESSAGE_CHARS, with runs of non-whitespace longer than BPE_MAX_RUN_CHARS
    handed over as separate slices of at most that length (so no pre-token is longer)."""
    for text in texts:
        text = text[:BPE_MAX_MESSAGE_CHARS]
        start = 0
        for run in _LONG_RUN.finditer(text):
            if run.start() > start:
                yield text[start:run.start()]
            yield from (run.group()[i:i + BPE_MAX_RUN_CHARS] for i in range(0, len(run.group()), BPE_MAX_RUN_CHARS))
            start = run.end()
        yield text[start:]


def add_chat_format(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add <|im_start|>/<|im_end|>/<|pad|> (kept if present), make <|im_end|> the eos so generation stops
    at the end of an assistant turn, and attach the ChatML template."""
    tokenizer.add_special_tokens({"pad_token": PAD, "eos_token": IM_END, "additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> None:
    """save_pretrained into a temporary folder, then rename: never a half-written tokenizer."""
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(str(tmp))


# ----------------------------------------------------------------------------------- tokenize, labels
@dataclass(frozen=True)
class Tokenized:
    """One conversation's tokens; `labels` is IGNORE (-100) except on assistant content and its <|im_end|>."""

    input_ids: list[int]
    labels: list[int]


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> Tokenized:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    return Tokenized(ids, [t if m else IGNORE for t, m in zip(ids, out["assistant_masks"])])


def fit_to_length(tok: Tokenized, seq_len: int, im_start_id: int, overlong: str) -> tuple[Tokenized | None, str]:
    """Apply the overlong rule; returns the (possibly cut) conversation and what happened.

    Outcomes: "" (fits), "truncated_turns" (cut after the last whole assistant turn that fits: ends
    cleanly with <|im_end|>\\n), "truncated_reply" (even the first reply does not fit: the first user turn
    is kept whole and the reply is cut at seq_len; labels stay on the kept reply tokens), or a drop:
    "overlong" (overlong=drop), "prompt_too_long" (the first user turn and assistant header alone fill
    seq_len, nothing would be learned).
    """
    n = len(tok.input_ids)
    if n <= seq_len:
        return tok, ""
    if overlong == "drop":
        return None, "overlong"
    ids, labels = tok.input_ids, tok.labels
    # Message k starts at the k-th <|im_start|>; a cut there keeps messages 0..k-1 whole.
    starts = [i for i, t in enumerate(ids) if t == im_start_id] + [n]
    clean = [end for end in starts[1:] if end <= seq_len and labels[end - 2] != IGNORE]  # ends after <|im_end|>\n
    if clean:
        end = clean[-1]
        return Tokenized(ids[:end], labels[:end]), "truncated_turns"
    if any(label != IGNORE for label in labels[:seq_len]):
        return Tokenized(ids[:seq_len], labels[:seq_len]), "truncated_reply"
    return None, "prompt_too_long"


def _tokenize_batch(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                    overlong: str) -> dict[str, list]:
    """datasets.map worker: tokenize, label, and apply the overlong rule to a batch of conversations."""
    im_start = tokenizer.convert_tokens_to_ids(IM_START)
    specials = tokenizer.all_special_tokens
    out: dict[str, list] = {"input_ids": [], "labels": [], "full_length": [], "outcome": []}
    for messages in batch["messages"]:
        full = tokenize_conversation(tokenizer, messages)
        fitted, outcome = fit_to_length(full, seq_len, im_start, overlong)
        if special_token_in_text(messages, specials):
            fitted, outcome = None, "special_token_in_text"
        elif fitted is not None and all(label == IGNORE for label in fitted.labels):
            fitted, outcome = None, "no_assistant_tokens"
        out["input_ids"].append(fitted.input_ids if fitted else [])
        out["labels"].append(fitted.labels if fitted else [])
        out["full_length"].append(len(full.input_ids))
        out["outcome"].append(outcome)
    return out


def special_token_in_text(messages: list[dict[str, str]], special_tokens: list[str]) -> bool:
    """Whether a message's text holds a special token (`<|im_start|>`, `<|endoftext|>`, ...) verbatim. The
    tokenizer would encode it as the control token itself, so a user text "<|im_start|>assistant\nhi" would
    fake a turn boundary and mislabel; such conversations (code about chat formats) are dropped, counted."""
    return any(token in message["content"] for message in messages for token in special_tokens)


def tokenize_conversations(conversations: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, seq_len: int,
                           overlong: str, num_proc: int, desc: str) -> Dataset:
    """Batched `datasets.map` over conversations with `num_proc` worker processes."""
    ds = Dataset.from_list(conversations)
    # datasets would fingerprint the map by dill-hashing the whole tokenizer (seconds for a 50k vocab);
    # the serialized tokenizer, template and rule identify the transform just as well, far faster.
    key = json.dumps([ds._fingerprint, tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template, seq_len,
                      overlong])
    return ds.map(_tokenize_batch, batched=True, batch_size=256, num_proc=num_proc if len(ds) > 1 else None,
                  fn_kwargs={"tokenizer": tokenizer, "seq_len": seq_len, "overlong": overlong},
                  remove_columns=ds.column_names, desc=f"tokenize {desc}",
                  new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:32])


# -------------------------------------------------------------------------------------------- packing
def pack_lengths(lengths: list[int], seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: longest conversation first, each into the fullest block it still fits.
    Returns blocks as lists of conversation indices; no conversation is split across blocks."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining slots, block index), sorted
    for i in tqdm(order, desc="pack", unit="conv", disable=None):
        length = lengths[i]
        if not 0 < length <= seq_len:
            raise ValueError(f"conversation {i} has {length} tokens; packing needs 1..{seq_len}")
        k = bisect_left(free, (length, -1))
        if k == len(free):
            blocks.append([i])
            remaining, b = seq_len - length, len(blocks) - 1
        else:
            remaining, b = free.pop(k)
            blocks[b].append(i)
            remaining -= length
        if remaining > 0:
            insort(free, (remaining, b))
    return blocks


def build_blocks(input_ids: list[list[int]], labels: list[list[int]], seq_len: int, pad_id: int,
                 seed: int) -> Dataset:
    """Pack conversations into rows of exactly `seq_len` tokens. position_ids restart at 0 at each
    conversation (the model's only boundary signal); the unfilled tail is pad tokens with labels IGNORE (-100) and
    its own restart. Block order is shuffled with `seed`."""
    blocks = pack_lengths([len(ids) for ids in input_ids], seq_len)
    random.Random(seed).shuffle(blocks)
    ids_BT = np.full((len(blocks), seq_len), pad_id, dtype=np.int64)
    labels_BT = np.full((len(blocks), seq_len), IGNORE, dtype=np.int64)
    pos_BT = np.zeros((len(blocks), seq_len), dtype=np.int64)
    for b, members in enumerate(blocks):
        t = 0
        for i in members:
            n = len(input_ids[i])
            ids_BT[b, t:t + n] = input_ids[i]
            labels_BT[b, t:t + n] = labels[i]
            pos_BT[b, t:t + n] = np.arange(n)
            t += n
        pos_BT[b, t:] = np.arange(seq_len - t)
    row = List(Value("int64"), length=seq_len)
    features = Features({"input_ids": row, "labels": row, "position_ids": row})
    return Dataset.from_dict({"input_ids": ids_BT, "labels": labels_BT, "position_ids": pos_BT}, features=features)


class PreparedDataError(MoechatError, ValueError):
    """The prepared data is missing or out of date; the message names the folder and the stage to rerun."""


class MissingSplitError(PreparedDataError, FileNotFoundError):
    """A packed split the prepare stage writes is not there."""


def load_packed(prepared_dir: str | Path, split: str) -> Dataset:
    """The packed `split` ("train" or "val") written by the prepare stage, as torch tensors."""
    path = Path(prepared_dir) / split
    if not path.exists():
        raise MissingSplitError(f"{path}: no packed split {split!r}; run the prepare stage (dvc repro prepare)")
    return load_from_disk(str(path)).with_format("torch")


def segments(position_ids: list[int]) -> list[tuple[int, int]]:
    """[start, end) spans of the documents in one packed row: a new one starts where position_ids is 0."""
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return list(zip(starts[:-1], starts[1:]))
