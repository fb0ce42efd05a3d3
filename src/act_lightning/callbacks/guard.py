"""Stops a run whose updates keep being skipped for non-finite losses or gradients."""

from __future__ import annotations

import lightning as L

from act_lightning.callbacks.checkpoint import LastCheckpoint
from act_lightning.checkpoints import checkpoint_iteration, read_checkpoint
from act_lightning.checks import check_count
from act_lightning.readback import DeferredRead


class DivergenceError(RuntimeError):
    """The run diverged: `max_bad_iterations` iterations in a row had a non-finite loss or gradient."""


class DivergenceGuard(L.Callback):
    """ACTModule skips every update whose loss or gradient is not finite (no NaN reaches the weights or
    the optimiser state) and counts those iterations on the device. This callback reads the count and
    stops the run, with a message that names the iteration and the loss that went bad first, once
    `max_bad_iterations` iterations in a row were bad. The last checkpoint written stays as it was.

    On a single GPU the count is copied to the host without waiting for the device, and read one
    iteration later; under DDP every rank reads it at once, so all stop at the same iteration."""

    def __init__(self, max_bad_iterations: int = 10) -> None:
        check_count(max_bad_iterations, "guard.max_bad_iterations")
        self.max_bad_iterations = max_bad_iterations
        self._read = DeferredRead()

    def _streak(self, trainer, pl_module) -> int | None:
        streak = pl_module.bad.streak
        if streak.device.type != "cuda" or trainer.world_size > 1:
            return int(streak)
        value = self._read.poll()
        if not self._read.in_flight:
            self._read.submit(streak)
        return value

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        streak = self._streak(trainer, pl_module)
        if streak is not None and streak >= self.max_bad_iterations:
            raise DivergenceError(
                f"training diverged: {pl_module.bad.report()} (guard.max_bad_iterations="
                f"{self.max_bad_iterations}). Those updates were skipped: no NaN reached the weights or a "
                f"checkpoint. {what_to_do(trainer, int(pl_module.bad.since))}"
            )


def what_to_do(trainer, since: int) -> str:
    """The checkpoints a diverged run has on disk, with their iterations, and how to go on: from one
    written before the first bad iteration, `since + 1` (as metrics.csv and checkpoints count: after
    `since` good ones) with other draws or lower learning rates, or again with a lower learning rate."""
    last = next((c.path for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)
    found = {}
    for path in sorted(last.parent.glob("*.ckpt")) if last is not None else []:
        try:
            found[path] = checkpoint_iteration(read_checkpoint(path, "checkpoint", mmap=True))
        except (OSError, ValueError, KeyError):
            continue  # unreadable: not one to continue from
    again = "start again with a lower learning rate (model.optimizer.lr, model.d_optimizer.lr)"
    if not found:
        return f"No checkpoint was written: {again}."
    listed = ", ".join(f"{p.name} (iteration {k})" for p, k in found.items())
    before = [p for p, k in found.items() if k <= since]
    if not before:
        return f"On disk: {listed}, none from before iteration {since + 1}: {again}."
    best = max(before, key=found.get)
    rates = "model.optimizer.lr,model.d_optimizer.lr"
    return (
        f"On disk: {listed}. Continue from {best.name}, written before iteration {since + 1}, in a new "
        f"folder (hydra.run.dir=NEW ckpt_path={best}) with other random draws (seed=OTHER "
        f"resume_changes=[seed]) or lower learning rates (model.optimizer.lr=LR model.d_optimizer.lr=LR "
        f"resume_changes=[{rates}]): as it is, resume is exact and repeats the same iterations. Or {again}."
    )
