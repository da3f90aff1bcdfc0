"""Third-party output that no user can act on, kept out of a stage's one summary line.

Warnings that libraries log at import time: torchao's missing CUDA kernels on a CPU machine ("Failed to load
..._C_mxfp8.so"), torch's pytree `register_constant` deprecations (both logged while transformers imports
torchao, which GPTQModel installs), DeepSpeed's "Setting accelerator to CPU" and bitsandbytes'
optional-kernel notice; and library progress bars. Nothing here runs at import: `moechat.stage.run_stage`
calls `quiet_third_party` before a stage's `main` imports those libraries, `moechat chat` calls it before
loading a model, and `moechat.modeling` calls `quiet_loggers` before it imports transformers.
MOECHAT_VERBOSE=1 keeps everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

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
