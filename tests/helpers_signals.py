"""A callback that sends this process a signal at a given ACT iteration, as a scheduler or a user would."""

from __future__ import annotations

import os

import lightning as L


class SendSignalAt(L.Callback):
    def __init__(self, signum: int, at: int) -> None:
        self.signum, self.at = signum, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.k == self.at:
            os.kill(os.getpid(), self.signum)
