"""A callback that makes the disk look full from a given ACT iteration on: every later `torch.save` in this
process fails as a write to a full disk does (the command's own process, also when the tests start it as
a new interpreter)."""

from __future__ import annotations

import errno

import lightning as L
import torch


class DiskFullAfter(L.Callback):
    def __init__(self, at: int) -> None:
        self.at, self.save = at, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.k == self.at and self.save is None:
            self.save = torch.save

            def full(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")

            torch.save = full

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer, pl_module, stage) -> None:
        if self.save is not None:
            torch.save, self.save = self.save, None
