"""Checkpoints that count ACT iterations and are written atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from act_lightning.atomic import atomic_write


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the target folder, then renames it over the old checkpoint, so a
    crash or a full disk mid-write never leaves a truncated `last.ckpt` behind."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        with atomic_write(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        # Our checkpoints hold tensors, numbers, strings and plain containers (hyper-parameters are
        # stored as a plain dict): the safe loader suffices and nothing foreign gets unpickled.
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


class LastCheckpoint(L.Callback):
    """Saves `dirpath/last.ckpt` every `every_n_iterations` ACT iterations and when training ends;
    with `keep_snapshots`, also keeps `iter_<k>.ckpt` for each of those iterations."""

    def __init__(
        self,
        dirpath: str,
        every_n_iterations: int = 1000,
        filename: str = "last.ckpt",
        keep_snapshots: bool = False,
    ) -> None:
        if every_n_iterations < 1:
            raise ValueError(
                f"callbacks.checkpoint.every_n_iterations must be >= 1, got {every_n_iterations}"
            )
        self.path = Path(dirpath) / filename
        self.every = every_n_iterations
        self.keep_snapshots = keep_snapshots
        self._saved_at = -1

    def _save(self, trainer: L.Trainer, iteration: int) -> None:
        if iteration != self._saved_at:
            trainer.save_checkpoint(self.path, weights_only=False)  # full training state
            if self.keep_snapshots:
                trainer.save_checkpoint(self.path.parent / f"iter_{iteration:07d}.ckpt", weights_only=False)
            self._saved_at = iteration

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module._k % self.every == 0:
            self._save(trainer, pl_module._k)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module._k)
