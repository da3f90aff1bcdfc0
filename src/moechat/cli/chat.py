"""`moechat chat <model dir>`: talk to an exported (full-precision) or quantized (GPTQ) moechat model.

Interactive by default: replies stream token by token, the conversation history goes back through the
chat template each turn, `/help` lists the commands, `/reset` starts over, `/exit`, end of input or Ctrl-C
quits. `--prompt "..."`
answers once and exits. Uses the GPU when one is visible (`--device` overrides).

Safe with a folder from anywhere: the model is built from the installed moechat code, never from the
folder's Python files (`--trust-remote-code` opts in to those), weights are read from safetensors only,
and what the user types is text: a typed `<|im_start|>` cannot open a turn. Quiet: stdout carries only
the conversation, notices go to stderr, and loaders' output (progress bars, GPTQModel's banner) shows
only with `--verbose`, which also turns one-line errors back into tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import sys
import uuid
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Iterator, Optional, TextIO

from moechat.cli.chat_template import render_chat
from moechat.config.params import EvalConfig
from moechat.device import resolve_device
from moechat.eval.generate import leaves_room_for_a_prompt
from moechat.errors import MoechatError
from moechat.model.folder import TRUST_FLAG, read_config

if TYPE_CHECKING:  # torch / transformers load after the arguments and the folder are checked
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PROMPT = "you> "
BOT = "bot> "
MAX_NEW_TOKENS = 256  # the reply cap when --max-new-tokens is not given, for models with n_positions >= 512
INTERRUPTED = 130  # the shell's exit status for a Ctrl-C
FOLDERS = "pass models/export or models/quantized (built by `dvc repro`)"  # the fix for a missing or empty folder
BROKEN_PIPE = 141  # the shell's exit status for a writer whose reader left (128 + SIGPIPE), as `yes | head`
MAX_SEED = 2**32 - 1  # torch.manual_seed takes any int64; numpy's range keeps seeds portable
COMMANDS = {"/help": "list these commands", "/reset": "clear the conversation and start over",
            "/exit": "quit (so do end of input and Ctrl-C)"}


class ChatError(MoechatError, ValueError):
    """A chat input the user can fix (a flag, the folder, stdin); printed as one line."""


class PromptTooLong(ChatError):
    """The latest user turn alone does not fit the model's positions with room for the reply."""




def resolve_max_new_tokens(requested: Optional[int], n_positions: Optional[int]) -> int:
    """The reply cap: `requested` when it leaves room for a prompt, else a ChatError naming the flag;
    unset = min(256, n_positions // 2), so half the context stays for the history (trimmed to fit)."""
    if requested is None:
        return MAX_NEW_TOKENS if n_positions is None else max(1, min(MAX_NEW_TOKENS, n_positions // 2))
    if requested < 1:
        raise ChatError(f"--max-new-tokens={requested} must be >= 1")
    if not leaves_room_for_a_prompt(requested, n_positions):
        raise ChatError(f"--max-new-tokens={requested} must be < the model's n_positions={n_positions}; pass at "
                        f"most {n_positions - 1}, or leave it out for min({MAX_NEW_TOKENS}, n_positions // 2) = "
                        f"{max(1, min(MAX_NEW_TOKENS, n_positions // 2))}")
    return requested




# ------------------------------------------------------------------------------------------ loading
def load_for_chat(model_dir: Path, device: torch.device, trust_remote_code: bool = False, verbose: bool = False
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model and tokenizer through the checked loaders (`moechat.model.folder.load_model`, or
    `moechat.model.gptq.load_quantized` for a quantized folder), in chat's dtype:
    fp32 on the CPU (16-bit matmuls are ~100x slower there), bf16 on a GPU, fp16 for a quantized folder
    there (the GPTQ kernels' dtype). GPTQModel (imported only for a quantized folder) prints ~50 lines while
    loading: discarded (shown on stderr if the load fails), or with `verbose` on stderr."""
    import torch

    from moechat.model.folder import CHAT_NO_CODE, is_quantized_dir, load_model, load_tokenizer
    from moechat.model.gptq import load_quantized

    quantized = is_quantized_dir(model_dir)
    dtype = torch.float32 if device.type == "cpu" else torch.float16 if quantized else torch.bfloat16
    tokenizer = load_tokenizer(model_dir, trust_remote_code, fix=CHAT_NO_CODE)  # the cheap load first
    render_chat(tokenizer, [{"role": "user", "content": "Hello"}])  # a broken template fails now, not mid-chat
    with gptqmodel_output(verbose) if quantized else contextlib.nullcontext():
        model = (load_quantized if quantized else load_model)(model_dir, device, dtype, trust_remote_code)
    return model, tokenizer


@contextlib.contextmanager
def gptqmodel_output(verbose: bool) -> Iterator[None]:
    """GPTQModel's console output while loading: on stderr with `verbose`, else captured and dropped
    (its last lines shown on stderr if the load fails)."""
    if verbose:
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    from moechat.quiet import library_output

    with io.StringIO() as log, library_output(log, "GPTQModel's output"):
        yield


def quiet_loaders(verbose: bool) -> None:
    """Hide transformers' weight-loading progress bar and warnings unless `verbose`. Call it before
    transformers' first import: the torchao filters must be in place when that import logs its warnings."""
    if verbose:
        return
    from moechat.quiet import quiet_third_party

    quiet_third_party()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# ------------------------------------------------------------------------------------ the prompt
def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids of `messages` through the chat template with the generation prompt, where message text is
    only ever text: a typed `<|im_start|>` (any added token) becomes the ids of its characters, never the
    control token that would forge a turn. Text without added tokens gets the template's usual ids."""
    added = tokenizer.get_added_vocab()
    if not any(token in m["content"] for m in messages for token in added):
        return list(tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"])
    # Render with a unique marker per content; tokenize the template's pieces as usual (their control
    # tokens stay control tokens) and each content with split_special_tokens=True.
    markers = [f"[moechat-text-{uuid.uuid4().hex}]" for _ in messages]
    rendered = render_chat(tokenizer, [m | {"content": k} for m, k in zip(messages, markers)])
    ids: list[int] = []
    for message, marker in zip(messages, markers):
        if rendered.count(marker) != 1:
            raise ChatError("the folder's chat template does not render each message exactly once; re-export "
                            "the model (dvc repro export)")
        piece, rendered = rendered.split(marker)
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
        ids += tokenizer(message["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids + tokenizer(rendered, add_special_tokens=False)["input_ids"]


class Chat:
    """One conversation: history in ChatML messages, one streamed reply per user turn. Replies go to `out`,
    notices (turns dropped to fit the model) to `err`."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int,
                 temperature: float, top_p: float, seed: Optional[int], out: TextIO = sys.stdout,
                 err: TextIO = sys.stderr):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.out, self.err = out, err
        self.history: list[dict[str, str]] = []

    def reply(self, text: str) -> str:
        """Add the user turn, stream the assistant's answer to `out`, keep both in the history. A turn too
        long for the model raises PromptTooLong and leaves the history as it was."""
        import torch

        from moechat.eval.generate import generate_continuation

        self.history.append({"role": "user", "content": text})
        ids = self._fit_history()
        seed = None if self.seed is None else self.seed + len(self.history)
        answer = generate_continuation(self.model, self.tokenizer, torch.tensor([ids]), self.max_new_tokens,
                                       self.temperature, self.top_p, seed=seed,
                                       streamer=_streamer(self.tokenizer, self.out))
        self.out.write("\n")
        self.out.flush()
        self.history.append({"role": "assistant", "content": answer.strip()})
        return answer.lstrip()  # as streamed

    def _fit_history(self) -> list[int]:
        """Prompt ids of the history, dropping the oldest whole exchanges (user + assistant turn) until the
        prompt and the reply fit the model's positions; never cuts inside a turn or its header. A latest
        turn that cannot fit even alone is taken back out (the earlier history stays) and refused."""
        limit = getattr(self.model.config, "n_positions", None)
        if limit is not None:
            alone = len(encode_chat(self.tokenizer, self.history[-1:]))
            if alone + self.max_new_tokens > limit:
                self.history.pop()
                raise PromptTooLong(f"your message is {alone} tokens with its template; the model reads {limit} "
                                    f"positions and keeps {self.max_new_tokens} for the reply, so at most "
                                    f"{limit - self.max_new_tokens} fit: shorten it or lower --max-new-tokens")
        ids = encode_chat(self.tokenizer, self.history)
        dropped = 0
        while limit is not None and len(ids) + self.max_new_tokens > limit:
            del self.history[:2]
            dropped += 2
            ids = encode_chat(self.tokenizer, self.history)
        if dropped:
            self.err.write(f"(dropped the oldest {dropped} turns to fit the model's {limit} positions; "
                           f"/reset starts over)\n")
            self.err.flush()
        return ids

    def reset(self) -> None:
        self.history.clear()


def _streamer(tokenizer: PreTrainedTokenizerBase, out: TextIO) -> Any:
    """A TextStreamer that writes to `out` (stdout by default), skips the prompt and the reply's leading
    whitespace. Training text is stripped, so a reply never starts with a space there, but the byte-level
    vocabulary has a space-prefixed twin of most words (`ĠA` beside `A`) and sampling, above all from a
    quantized model, sometimes picks one as the first token: shown as typed, the reply began with a stray
    space the history (stripped) did not have."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        started = False

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if not self.started:
                text = text.lstrip()
                self.started = bool(text)
            out.write(text)
            out.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# ---------------------------------------------------------------------------------- the session
def read_line(stdin: IO, number: int) -> Optional[str]:
    """Line `number` of `stdin` (bytes, decoded as strict UTF-8, or text); None at end of input."""
    line = stdin.readline()
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ChatError(f"stdin line {number} is not UTF-8 text ({err.reason} at byte {err.start}); send UTF-8, "
                            f"e.g. through `iconv -f latin1 -t utf-8`") from None
    return line or None


def interactive(chat: Chat, stdin: IO = sys.stdin, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
    """The session loop: one reply per line of `stdin` (bytes or text) until /exit or end of input."""
    out.write("moechat: type a message; /help lists the commands, /reset clears the conversation, /exit quits.\n")
    number = 0
    while True:
        out.write(PROMPT)
        out.flush()
        number += 1
        line = read_line(stdin, number)
        if line is None:  # end of input
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/help":
            out.write("".join(f"  {name:<7} {what}\n" for name, what in COMMANDS.items()))
            continue
        if text == "/reset":
            chat.reset()
            out.write("(conversation cleared)\n")
            continue
        out.write(BOT)
        try:
            chat.reply(text)
        except PromptTooLong as too_long:
            out.write("\n")
            err.write(f"({too_long})\n")
            err.flush()


def _max_new_tokens_arg(text: str) -> Optional[int]:
    """`auto` (None: decided once the model's n_positions is known) or an integer."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag; the epilog's command list kept as written."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moechat chat", description=__doc__.splitlines()[0], formatter_class=_Formatter,
                                epilog="commands in a session:\n" + "".join(f"  {name:<7} {what}\n"
                                                                         for name, what in COMMANDS.items()))
    p.add_argument("model_dir", type=Path, help="models/export (full precision) or models/quantized (GPTQ)")
    p.add_argument("--prompt", help="answer this one message and exit; without it, an interactive session")
    p.add_argument("--max-new-tokens", type=_max_new_tokens_arg, default="auto",
                   help=f"reply length cap in tokens, < the model's n_positions; auto = "
                        f"min({MAX_NEW_TOKENS}, n_positions // 2)")
    # the evaluate stage's sampling defaults (params.yaml eval.temperature / eval.top_p), so chat replies
    # read like the samples in metrics/samples.json
    p.add_argument("--temperature", type=float, default=EvalConfig.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=EvalConfig.top_p, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help=f"make sampling repeatable: 0 to {MAX_SEED}")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument(TRUST_FLAG, action="store_true",
                   help="build the model from the folder's own Python files (configuration_moechat.py, "
                        "modeling_moechat.py), which run with your permissions: only for a folder you trust. "
                        "Without it the installed moechat code is used")
    p.add_argument("--verbose", action="store_true",
                   help="show the loaders' output (progress bars, GPTQModel) on stderr, and tracebacks on errors")
    return p


def check_text(text: str, what: str) -> str:
    """`text` when it encodes as UTF-8 (a non-UTF-8 command-line argument arrives as surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ChatError(f"{what} is not UTF-8 text ({err.reason} at character {err.start}); pass UTF-8") from None
    return text


def run(args: argparse.Namespace) -> int:
    """The command behind `main`: every check that needs no model first, then the load, then the chat."""
    check_sampling(args.temperature, args.top_p, args.seed)
    prompt = None if args.prompt is None else check_text(args.prompt, "--prompt")
    config = read_config(args.model_dir, args.trust_remote_code, fix=FOLDERS)
    max_new_tokens = resolve_max_new_tokens(args.max_new_tokens, config.get("n_positions"))
    with loading_notice(args.model_dir, sys.stderr):
        model, tokenizer = load_checked(args)
    chat = Chat(model, tokenizer, max_new_tokens, args.temperature, args.top_p, args.seed, sys.stdout, sys.stderr)
    if prompt is not None:
        chat.reply(prompt)
        return 0
    interactive(chat, sys.stdin.buffer, sys.stdout, sys.stderr)
    return 0


def check_sampling(temperature: float, top_p: float, seed: Optional[int]) -> None:
    """Sampling flags that generate would take and misuse (a NaN temperature samples one token and stops)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ChatError(f"--temperature={temperature} must be a finite number >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:  # also false for NaN
        raise ChatError(f"--top-p={top_p} must be in (0, 1]")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ChatError(f"--seed={seed} must be an integer from 0 to {MAX_SEED}")


@contextlib.contextmanager
def loading_notice(folder: Path, err: TextIO = sys.stderr) -> Iterator[None]:
    """`loading <folder> …` on a terminal's stderr while the model loads (the imports alone take seconds),
    erased once loaded or failed, so the terminal keeps only the conversation or the one-line error."""
    shown = err.isatty()
    if shown:
        err.write(f"loading {folder} …")
        err.flush()
    try:
        yield
    finally:
        if shown:
            err.write("\r\x1b[K")
            err.flush()


def load_checked(args: argparse.Namespace) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """load_for_chat with a folder's failures as one line: a corrupt file, or (with --trust-remote-code)
    folder code that does not even compile; the settings of its generation_config.json chat does not use
    are named on stderr."""
    device = resolve_device(args.device)  # torch only: before transformers and GPTQModel
    quiet_loaders(args.verbose)
    from safetensors import SafetensorError

    from moechat.model.folder import ignored_generation_settings

    try:
        loaded = load_for_chat(args.model_dir, device, args.trust_remote_code, args.verbose)
    except SyntaxError as err:  # the folder's own code, imported by transformers under --trust-remote-code
        if args.verbose:
            raise
        raise ChatError(f"{args.model_dir}: {syntax_error_of(args.model_dir, err)}; the folder's code does not "
                        f"compile: leave out {TRUST_FLAG} to use the installed moechat code") from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as err:  # a corrupt folder
        if args.verbose or isinstance(err, MoechatError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ChatError(f"{args.model_dir}: could not load the model ({type(err).__name__}: {first}); rerun with "
                        f"--verbose for the details") from None
    ignored = ignored_generation_settings(args.model_dir)
    if ignored:
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(ignored.items()))
        print(f"(ignoring {args.model_dir / 'generation_config.json'}: {settings}; chat generates with its own "
              f"--temperature, --top-p and --max-new-tokens)", file=sys.stderr, flush=True)
    return loaded


def syntax_error_of(folder: Path, err: SyntaxError) -> str:
    """`file line N: SyntaxError: msg` for the folder's first Python file that does not compile (transformers
    parses the code as `<unknown>` before importing it), else `err` as raised."""
    for path in sorted(Path(folder).glob("*.py")):
        try:
            compile(path.read_bytes(), path.name, "exec")
        except SyntaxError as found:
            err = found
            break
    return f"{Path(err.filename or '<unknown>').name} line {err.lineno}: SyntaxError: {err.msg}"


def leave_quietly_on_broken_pipe() -> int:
    """stdout's reader left (`moechat chat ... | head -c 1`): point stdout at /dev/null so the interpreter's
    final flush cannot raise again, and exit as a writer killed by SIGPIPE would."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return BROKEN_PIPE


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except BrokenPipeError:
        return leave_quietly_on_broken_pipe()
    except MoechatError as err:
        if args.verbose:
            raise
        print(f"moechat chat: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C at the prompt or mid-reply: leave quietly, the cursor on a new line
        print(flush=True)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
