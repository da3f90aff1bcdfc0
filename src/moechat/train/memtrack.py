"""Peak bytes of tensor storages alive during a region, counted by torch itself rather than by the host
allocator: the CPU counterpart of `torch.cuda.max_memory_allocated` that the planner is tested against.

Every aten op's output storages are recorded (by base pointer) with a weakref finalizer that forgets them when
torch frees them; the running sum of their sizes, read after every op, gives the peak. Storages alive before
the region (weights, gradients, optimizer state) are passed in as `resident` and counted once, so a view or an
in-place update of them adds nothing. Neither glibc's arenas nor a caching allocator enters the figure, so it
is the same on any machine for the same code.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveStorages(TorchDispatchMode):
    """`with LiveStorages(resident) as m: ...`; then `m.peak` is the largest sum of live storage bytes seen
    after any op, resident ones included, and `m.live` the sum now."""

    def __init__(self, resident: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._sizes: dict[int, int] = {}
        for t in resident:
            storage = t.untyped_storage()
            self._sizes.setdefault(storage.data_ptr(), storage.nbytes())
        self._pinned = set(self._sizes)  # resident: never forgotten inside the region
        self.live = sum(self._sizes.values())
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage())
        self.peak = max(self.peak, self.live)
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if ptr in self._sizes or nbytes == 0:
            return
        self._sizes[ptr] = nbytes
        self.live += nbytes
        weakref.finalize(storage, self._forget, ptr)

    def _forget(self, ptr: int) -> None:
        if ptr not in self._pinned:
            self.live -= self._sizes.pop(ptr, 0)


def step_peak_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
                    precision: str) -> int:
    """Peak live storage bytes of a training micro-batch (forward with labels, backward) that runs while the
    gradients and the optimizer state exist, as the second micro-batch of an accumulation step does on a GPU.
    One micro-batch and an optimizer step run first to create them; `precision` is fp32 or bf16 (CPU autocast).
    The model is called as `moechat.train.train_step` calls it (no KV cache, router statistics returned)."""

    def forward_backward() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch, use_cache=False, output_router_stats=True).loss
        loss.backward()

    forward_backward()
    optimizer.step()
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    with LiveStorages([*model.parameters(), *grads, *state, *batch.values()]) as tracker:
        forward_backward()
    return tracker.peak
