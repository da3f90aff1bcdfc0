"""Third-party output that no user can act on, kept out of a stage's one summary line.

Warnings that libraries log at import time: torchao's missing CUDA kernels on a CPU machine ("Failed to load
..._C_mxfp8.so"), torch's pytree `register_constant` deprecations (both logged while transformers imports
torchao, which GPTQModel installs), DeepSpeed's "Setting accelerator to CPU" and bitsandbytes'
optional-kernel notice; and library progress bars. Nothing here runs at import: `moechat.stage.run_stage`
calls `quiet_third_party` before a stage's `main` imports those libraries, `moechat chat` calls it before
loading a model, and `moechat.model.auto` calls `quiet_loggers` before it imports transformers.
MOECHAT_VERBOSE=1 keeps everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from typing import TextIO

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "DeepSpeed", "bitsandbytes.backends.cpu")
# Library progress bars (transformers "Loading weights" / "Writing model shards", datasets' map and save
# bars) say nothing a stage's summary line does not; in a log file each becomes one long line of \r updates.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


class _ErrorsOnly(logging.Filter):
    """A filter besides the level: DeepSpeed resets its logger's level when it is first imported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_loggers() -> None:
    """Keep only the errors of `NOISY_LOGGERS` (and their child loggers); a no-op with MOECHAT_VERBOSE=1."""
    if os.environ.get("MOECHAT_VERBOSE"):
        return
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)  # a level reaches child loggers (bitsandbytes.backends.cpu.ops), a filter not
        if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
            logger.addFilter(_ErrorsOnly())


def quiet_progress_bars(interactive: bool) -> None:
    """Turn off library progress bars; off a terminal (a log, `moechat demo`) the stage's own tqdm bar too.

    Environment variables, read by the libraries when they are imported, so this runs before them; a value
    the user set wins.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if not interactive:
        os.environ.setdefault("TQDM_DISABLE", "1")


def quiet_third_party() -> None:
    """Drop the warnings of `NOISY_LOGGERS`, keep their errors, silence progress bars; no-op with MOECHAT_VERBOSE=1.
    Call it before the libraries are imported: they read the environment and log their warnings then."""
    if os.environ.get("MOECHAT_VERBOSE"):
        return
    quiet_progress_bars(interactive=sys.stderr.isatty())
    quiet_loggers()
# stdlib loggers that print while GPTQModel is imported or loads a model: torchao ("Failed to load
# .../_C_mxfp8...so" on CPU), torch's pytree ("Enum subclass ... register_constant() is deprecated"),
# tokenicer (its "Auto fixed pad_token_id" INFO lines), DeepSpeed ("Setting accelerator to CPU") and
# bitsandbytes ("Failed to load CPU gemm_4bit_forward from kernels-community" on AVX512-BF16 CPUs).
LIBRARY_LOGGERS = ("torchao", "torch.utils._pytree", "tokenicer", "DeepSpeed", "bitsandbytes")


# logbar prints info / warn / error itself, but GPTQModel also calls the stdlib `Logger.warning` on it
# (e.g. "HF: overriding trust_remote_code"), which no handler takes: Python's last-resort stderr printer.
LOGBAR_LOGGER = "logbar"


FAILURE_TAIL_LINES = 40


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


_ERROR_LINE = re.compile(r"(ERROR|CRIT)\b")


def _error_lines(text: str) -> list[str]:
    """The ERROR / CRIT lines of captured output (logbar writes "\\r" + level label + message)."""
    lines = (_ANSI.sub("", part).strip() for line in text.split("\n") for part in line.split("\r"))
    return [line for line in lines if _ERROR_LINE.match(line)]


@contextlib.contextmanager
def library_output(log: TextIO, where: str = "the captured output") -> Iterator[None]:
    """Move GPTQModel's console output into `log` (readable: a file opened "w+" or a StringIO) for the block.

    GPTQModel logs through logbar, which prints every line (its banner at import, kernel choice,
    generation_config dumps, progress bars, timing tables) to `sys.stdout` itself rather than through
    logging handlers, so the block redirects stdout; the stdlib loggers in `LIBRARY_LOGGERS` and
    `LOGBAR_LOGGER` and Python warnings (transformers' `rope_scaling` FutureWarning) go to the same log.
    Nothing is filtered, only moved. tokenicer calls `logging.basicConfig(level=INFO)` when imported; the
    root logger's level and handlers are put back afterwards so other libraries' INFO lines stay off the
    console. Errors stay visible: ERROR / CRIT lines are repeated on stderr when the block ends, and when it
    raises, the last lines of `log` are written to stderr before the exception propagates.
    """
    root = logging.getLogger()
    root_state = (root.level, list(root.handlers))
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    propagate = {name: logging.getLogger(name).propagate for name in LIBRARY_LOGGERS}
    for name in (*LIBRARY_LOGGERS, LOGBAR_LOGGER):
        logging.getLogger(name).addHandler(handler)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).propagate = False

    def to_log(message, category, filename, lineno, file=None, line=None) -> None:
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    def captured() -> str:
        log.flush()
        log.seek(0)
        return log.read()

    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.showwarning = to_log
            yield
    except BaseException:
        tail = captured().splitlines()[-FAILURE_TAIL_LINES:]
        print(f"--- last {len(tail)} lines of {where} ---\n" + "\n".join(tail) + "\n---", file=sys.stderr)
        raise
    else:
        for line in _error_lines(captured()):
            print(f"{line} (from {where})", file=sys.stderr)
    finally:
        for name in (*LIBRARY_LOGGERS, LOGBAR_LOGGER):
            logging.getLogger(name).removeHandler(handler)
        for name, value in propagate.items():
            logging.getLogger(name).propagate = value
        root.setLevel(root_state[0])
        root.handlers[:] = root_state[1]
        log.flush()


@contextlib.contextmanager
def library_bars_off() -> Iterator[None]:
    """Every tqdm bar created inside the block is disabled, on a terminal too; a no-op with MOECHAT_VERBOSE=1.

    For libraries whose bars ignore TQDM_DISABLE: lm-eval passes `disable=False` explicitly (an argument wins
    over the environment), and tqdm reads TQDM_* once, when it is imported. Keep only library calls inside.
    """
    if os.environ.get("MOECHAT_VERBOSE"):
        yield
        return
    from tqdm import std

    original = std.tqdm.__init__

    def disabled(self, *args, **kwargs) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        std.tqdm.__init__ = original
