"""BPE training time on one message without whitespace: the trainer as it was (the whole message is one
pre-token) against `moechat.data.chat_format.train_bpe` (each run cut into BPE_MAX_RUN_CHARS slices), side by side.

The uncapped trainer is timed up to 50k characters (its time grows with the square of the run); the capped
one on the same lengths and on 2 MB.

    python bench/bpe_cap.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import device_name  # noqa: E402
from moechat.data.chat_format import IM_END, IM_START, PAD, train_bpe  # noqa: E402

VOCAB = 300
UNCAPPED_LENGTHS = (12_500, 25_000, 50_000)
CAPPED_ONLY = (2_000_000,)


def train_uncapped(texts: list[str], vocab_size: int) -> None:
    """The trainer before the cap: the same BPE setup as train_bpe, fed the texts whole."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)


def seconds(fn: Callable[[list[str], int], object], texts: list[str]) -> float:
    t0 = time.perf_counter()
    fn(texts, VOCAB)
    return time.perf_counter() - t0


def main() -> None:
    print(f"device: {device_name()}; one message of 'ab' repeated, plus 'hello world'; vocab {VOCAB}")
    print(f"{'chars':>10} {'uncapped s':>11} {'capped s':>9} {'ratio':>8}")
    for n in UNCAPPED_LENGTHS + CAPPED_ONLY:
        texts = ["hello world", ("ab" * n)[:n]]
        capped = seconds(train_bpe, texts)
        if n in UNCAPPED_LENGTHS:
            uncapped = seconds(train_uncapped, texts)
            print(f"{n:>10} {uncapped:>11.3f} {capped:>9.3f} {uncapped / capped:>7.0f}x")
        else:
            print(f"{n:>10} {'(skipped)':>11} {capped:>9.3f} {'':>8}")


if __name__ == "__main__":
    main()
