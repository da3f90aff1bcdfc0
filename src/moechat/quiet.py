"""Warnings that third-party libraries log at import time and no user can act on, kept to their errors.

torchao's missing CUDA kernels on a CPU machine ("Failed to load ..._C_mxfp8.so"), torch's pytree
`register_constant` deprecations (both logged while transformers imports torchao, which GPTQModel installs),
DeepSpeed's "Setting accelerator to CPU" and bitsandbytes' optional-kernel notice. `moechat.modeling` and
the stage scripts quiet them; MOECHAT_VERBOSE=1 keeps everything.
"""

from __future__ import annotations

import logging
import os

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "DeepSpeed", "bitsandbytes.backends.cpu")


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
