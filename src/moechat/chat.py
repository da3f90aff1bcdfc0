"""`moechat chat <model dir>`: talk to an exported (full-precision) or quantized (GPTQ) moechat model.

Interactive by default: replies stream token by token, the conversation history goes back through the
chat template each turn, `/reset` starts over, `/exit` (or end of input) quits. `--prompt "..."` answers
once and exits. Uses the GPU when one is visible (`--device` overrides).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Optional, TextIO

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from moechat.evaluate import generate_reply, pick_device

PROMPT = "you> "
BOT = "bot> "


def load_for_chat(model_dir: Path, device: torch.device) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A quantized folder through GPTQModel's kernels, anything else with transformers (remote code)."""
    from moechat.quantize import is_quantized_dir

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: no config.json; pass models/export or models/quantized "
                                f"(built by `dvc repro`)")
    if is_quantized_dir(model_dir):
        from moechat.quantize import load_quantized

        # GPTQModel logs its config and kernel choice on stdout; keep stdout for the conversation.
        with contextlib.redirect_stdout(sys.stderr):
            return load_quantized(model_dir, device=str(device))
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
        self.history.append({"role": "user", "content": text})
        self._fit_history()
        streamer = _Streamer(self.tokenizer, self.out)
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


class _Streamer(TextStreamer):
    """TextStreamer that writes to a chosen stream (stdout by default) and skips the prompt."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text)
        self.out.flush()


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moechat chat", description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path, help="models/export (full precision) or models/quantized (GPTQ)")
    p.add_argument("--prompt", help="answer this one message and exit")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None, help="make sampling repeatable")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise SystemExit(f"moechat chat: --max-new-tokens={args.max_new_tokens} must be >= 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise SystemExit(f"moechat chat: --temperature={args.temperature} must be >= 0 and "
                         f"--top-p={args.top_p} in (0, 1]")
    model, tokenizer = load_for_chat(args.model_dir, pick_device(args.device))
    chat = Chat(model, tokenizer, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    if args.prompt is not None:
        chat.reply(args.prompt)
        return 0
    interactive(chat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
