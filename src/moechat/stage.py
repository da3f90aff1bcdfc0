"""The shared entry of every stage script: third-party chatter filtered, user errors as one line.

A stage's useful output is its one summary line (and, in a terminal, the training progress bar); warnings
that every run prints and no user can act on (torchao's missing CUDA kernels on a CPU machine, torch's
pytree deprecations, DeepSpeed's "Setting accelerator to CPU") and library progress bars bury it. Set
MOECHAT_VERBOSE=1 to see them again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

from moechat.config import MoechatError

from moechat.quiet import quiet_loggers


# Library progress bars (transformers "Loading weights" / "Writing model shards", datasets' map and save
# bars) say nothing a stage's summary line does not; in a log file each becomes one long line of \r updates.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


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
    """Drop the warnings of `NOISY_LOGGERS`, keep their errors, silence progress bars; no-op with MOECHAT_VERBOSE=1."""
    if os.environ.get("MOECHAT_VERBOSE"):
        return
    quiet_progress_bars(interactive=sys.stderr.isatty())
    quiet_loggers()


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
