"""The shared entry of every stage script: third-party chatter filtered, user errors as one line.

A stage's useful output is its one summary line (and, in a terminal, the training progress bar); warnings
that every run prints and no user can act on (torchao's missing CUDA kernels on a CPU machine, torch's
pytree deprecations, DeepSpeed's "Setting accelerator to CPU") and library progress bars bury it. Set
MOECHAT_VERBOSE=1 to see them again.

Every script in stages/ has one shape: module-level imports of the standard library and this module only,
`main(argv) -> int` that parses its flags into `parser` and imports the libraries it uses, and
`run_stage(main)` under `if __name__ == "__main__":`. `run_stage` quiets third-party output before calling
`main`, so the filters are in place when those libraries are imported; importing this module does nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

from moechat.errors import MoechatError
from moechat.quiet import quiet_third_party


def run_stage(main: Callable[[], Optional[int]]) -> NoReturn:
    """Quiet third-party output, then run a stage's `main`; an error the user can fix (MoechatError) prints as
    one line and exits 1 (or the error's `exit_code`), Ctrl-C prints one line and exits 130."""
    quiet_third_party()
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
