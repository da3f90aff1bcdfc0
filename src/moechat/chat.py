"""`moechat chat <model dir>`: talk to an exported (full-precision) or quantized (GPTQ) moechat model.

Interactive by default: replies stream token by token, the conversation history goes back through the
chat template each turn, `/reset` starts over, `/exit` (or end of input) quits. `--prompt "..."` answers
once and exits. Uses the GPU when one is visible (`--device` overrides). GPTQModel's load-time output
(banner, kernel choice, config dumps) is kept off the terminal unless `--verbose`; stdout carries only the
conversation.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TextIO

if TYPE_CHECKING:  # torch / transformers load in main(), after the log levels are set
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PROMPT = "you> "
BOT = "bot> "
MAX_NEW_TOKENS = 256  # the reply cap when --max-new-tokens is not given, for models with n_positions >= 512


def model_positions(model_dir: Path) -> Optional[int]:
    """`n_positions` from the folder's config.json (None when it has none), read before the slow load."""
    config = Path(model_dir) / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass models/export or models/quantized "
                                f"(built by `dvc repro`)")
    return json.loads(config.read_text()).get("n_positions")


def resolve_max_new_tokens(requested: Optional[int], n_positions: Optional[int]) -> int:
    """The reply cap: `requested` when it leaves room for a prompt, else a ValueError naming the flag;
    unset = min(256, n_positions // 2), so half the context stays for the history (trimmed to fit)."""
    if requested is None:
        return MAX_NEW_TOKENS if n_positions is None else max(1, min(MAX_NEW_TOKENS, n_positions // 2))
    if requested < 1:
        raise ValueError(f"--max-new-tokens={requested} must be >= 1")
    if n_positions is not None and requested >= n_positions:
        raise ValueError(f"--max-new-tokens={requested} must be < the model's n_positions={n_positions}; pass at "
                         f"most {n_positions - 1}, or leave it out for min({MAX_NEW_TOKENS}, n_positions // 2) = "
                         f"{max(1, min(MAX_NEW_TOKENS, n_positions // 2))}")
    return requested


def load_for_chat(model_dir: Path, device: torch.device, verbose: bool = False
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A quantized folder through GPTQModel's kernels, anything else with transformers (remote code).

    GPTQModel prints ~50 lines while loading; they are discarded (shown on stderr if the load fails), or
    with `verbose` all go to stderr. stdout stays the conversation either way."""
    from moechat.quantize import is_quantized_dir

    model_dir = Path(model_dir)
    model_positions(model_dir)  # the config.json check, with its message
    if is_quantized_dir(model_dir):
        from moechat.quantize import library_output, load_quantized

        if verbose:
            with contextlib.redirect_stdout(sys.stderr):
                return load_quantized(model_dir, device=str(device))
        with io.StringIO() as log, library_output(log, "GPTQModel's output"):
            return load_quantized(model_dir, device=str(device))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True, dtype=dtype).to(device)
    return model.eval(), AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)


class Chat:
    """One conversation: history in ChatML messages, one streamed reply per user turn."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                 temperature: float, top_p: float, seed: Optional[int], out: TextIO = sys.stdout):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.out = out
        self.history: list[dict[str, str]] = []

    def reply(self, text: str) -> str:
        """Add the user turn, stream the assistant's answer to `out`, keep both in the history."""
        from moechat.evaluate import generate_reply

        self.history.append({"role": "user", "content": text})
        self._fit_history()
        streamer = _streamer(self.tokenizer, self.out)
        seed = None if self.seed is None else self.seed + len(self.history)
        answer = generate_reply(self.model, self.tokenizer, self.history, self.max_new_tokens, self.temperature,
                                self.top_p, seed=seed, streamer=streamer)
        self.out.write("\n")
        self.out.flush()
        self.history.append({"role": "assistant", "content": answer.strip()})
        return answer

    def _fit_history(self) -> None:
        """Drop the oldest exchanges until prompt + reply fit the model's positions (the latest user turn stays)."""
        limit = getattr(self.model.config, "n_positions", None)
        if limit is None:
            return
        while len(self.history) > 1:
            ids = self.tokenizer.apply_chat_template(self.history, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"]
            if len(ids) + self.max_new_tokens <= limit:
                return
            del self.history[:2]

    def reset(self) -> None:
        self.history.clear()


def _streamer(tokenizer: PreTrainedTokenizerBase, out: TextIO) -> Any:
    """A TextStreamer that writes to `out` (stdout by default) and skips the prompt."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def interactive(chat: Chat, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    out.write("moechat: type a message; /reset clears the conversation, /exit quits.\n")
    while True:
        out.write(PROMPT)
        out.flush()
        line = stdin.readline()
        if not line:  # end of input
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            chat.reset()
            out.write("(conversation cleared)\n")
            continue
        out.write(BOT)
        chat.reply(text)


def _max_new_tokens_arg(text: str) -> Optional[int]:
    """`auto` (None: decided once the model's n_positions is known) or an integer."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moechat chat", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", type=Path, help="models/export (full precision) or models/quantized (GPTQ)")
    p.add_argument("--prompt", help="answer this one message and exit; without it, an interactive session")
    p.add_argument("--max-new-tokens", type=_max_new_tokens_arg, default="auto",
                   help=f"reply length cap in tokens, < the model's n_positions; auto = "
                        f"min({MAX_NEW_TOKENS}, n_positions // 2)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--verbose", action="store_true", help="show the loaders' own output (GPTQModel) on stderr")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:  # before transformers is first imported: it logs torchao's kernel warnings then
        from moechat.stage import quiet_third_party

        quiet_third_party()
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SystemExit(f"moechat chat: --temperature={args.temperature} must be >= 0 and "
                         f"--top-p={args.top_p} in (0, 1]")
    try:  # before torch and the model load (seconds to minutes), so a bad value fails at once
        max_new_tokens = resolve_max_new_tokens(args.max_new_tokens, model_positions(args.model_dir))
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"moechat chat: {err}") from None
    from moechat.evaluate import pick_device

    try:
        device = pick_device(args.device)
    except ValueError as err:
        raise SystemExit(f"moechat chat: {err}") from None
    model, tokenizer = load_for_chat(args.model_dir, device, verbose=args.verbose)
    chat = Chat(model, tokenizer, max_new_tokens, args.temperature, args.top_p, args.seed)
    if args.prompt is not None:
        chat.reply(args.prompt)
        return 0
    interactive(chat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
