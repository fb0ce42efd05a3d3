"""Reading a device scalar on the host without waiting for the device.

`int(tensor)` on a CUDA tensor blocks the host until every kernel queued before it has run, which empties
the queue the GPU works from. `DeferredRead` copies the value into pinned host memory asynchronously and
hands it over once the copy has landed (typically one iteration later). On the CPU there is nothing to
wait for: the value is read at once.
"""

from __future__ import annotations

import torch
from torch import Tensor


class DeferredRead:
    """`submit(t)` starts a copy of the scalar `t`; `poll()` returns its value once the copy has landed,
    else None. A new `submit` while a copy is in flight replaces it (only the latest value matters)."""

    def __init__(self) -> None:
        self._pending: tuple[Tensor, torch.cuda.Event] | None = None
        self._ready: float | int | bool | None = None

    def submit(self, tensor: Tensor) -> None:
        if tensor.device.type != "cuda":
            self._pending, self._ready = None, tensor.item()
            return
        host = torch.empty((), dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending, self._ready = (host, event), None

    def poll(self) -> float | int | bool | None:
        if self._pending is not None and self._pending[1].query():
            self._ready = self._pending[0].item()
            self._pending = None
        value, self._ready = self._ready, None
        return value

    @property
    def in_flight(self) -> bool:
        return self._pending is not None or self._ready is not None
