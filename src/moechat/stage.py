"""The shared entry of every stage script: third-party chatter filtered, user errors as one line.

A stage's useful output is its progress bars and its one summary line; warnings that every run prints
and no user can act on (torchao's missing CUDA kernels on a CPU machine, torch's pytree deprecations,
DeepSpeed's "Setting accelerator to CPU") bury it. Set MOECHAT_VERBOSE=1 to see them again.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

from moechat.config import MoechatError

NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "DeepSpeed")


class _ErrorsOnly(logging.Filter):
    """A filter, not a level: DeepSpeed resets its logger's level when it is first imported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def quiet_third_party() -> None:
    """Drop the warnings of `NOISY_LOGGERS`, keep their errors; no-op with MOECHAT_VERBOSE=1."""
    if os.environ.get("MOECHAT_VERBOSE"):
        return
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
            logger.addFilter(_ErrorsOnly())


# A stage script imports this module before the libraries that log at import time (transformers pulls in
# torchao there), so the filters must be in place when this module loads, not only when run_stage runs.
quiet_third_party()


def run_stage(main: Callable[[], Optional[int]]) -> NoReturn:
    """Run a stage's `main`; an error the user can fix (MoechatError) prints as one line and exits 1 (or the
    error's `exit_code`), Ctrl-C prints one line and exits 130."""
    stage = Path(sys.argv[0]).stem
    try:
        code = main() or 0
    except MoechatError as err:
        print(f"{stage}: error: {err}", file=sys.stderr)
        code = getattr(err, "exit_code", 1)
    except KeyboardInterrupt:  # outside a stage's own handling: nothing half-written is ever published
        print(f"{stage}: interrupted; outputs are written atomically, so `dvc repro` starts this stage again",
              file=sys.stderr)
        code = 130
    sys.exit(code)
