"""Notice that the process which started us is gone (kill -9 of `dvc repro`), cheaply, at step boundaries.

When a parent dies its children are re-parented (to init or a subreaper), so `os.getppid()` changes: one
syscall per optimizer step, no signal handler that could interrupt a checkpoint being written. Linux's
PR_SET_PDEATHSIG would deliver a signal mid-step instead; polling keeps the stop at a step boundary, where
the last published checkpoint is intact and nothing is half-written.
"""

from __future__ import annotations

import os

from moechat.errors import MoechatError


class ParentGone(MoechatError, RuntimeError):
    """The process that started the trainer exited; the message says what survives."""


class ParentWatch:
    def __init__(self) -> None:
        self.parent = os.getppid()

    def gone(self) -> bool:
        return os.getppid() != self.parent
