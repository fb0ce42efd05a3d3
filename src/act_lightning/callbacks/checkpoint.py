"""Checkpoints that count ACT iterations, are written atomically, and are written when a run is stopped:
by `stop_after`, by Ctrl-C, or by a scheduler's signal (preemption, time limit)."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from act_lightning.atomic import atomic_write, remove_stale_temporaries, temporary_name
from act_lightning.checks import check_count
from act_lightning.compat import is_lightning_handler, take_lightning_sigterm

log = logging.getLogger(__name__)

# SIGTERM: preemption and `scancel`; SIGINT: Ctrl-C; SIGUSR1 / SIGUSR2: the warning a SLURM job asks for
# before its time limit (`--signal`; Lightning's convention is USR1, submitit's USR2).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


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


def save_for_later(trainer: L.Trainer, paths: list[Path]) -> list[tuple[Path, Path]]:
    """Writes the training state to each path's temporary name (`temporary_name`) and returns the
    (temporary, final) pairs for `put_in_place`. Lightning hands an iteration's own metrics row to the
    loggers after `on_train_batch_end`, where the iteration's checkpoints are taken (`last.ckpt`, and
    `best.ckpt` by the evaluation), so they are put in place once that row is on disk: a kill -9 in
    between leaves the previous checkpoint, whose rows are all on disk, and a temporary that the next
    start removes. A checkpoint is then never on disk without the rows up to its iteration, which are all
    that a run resumed from it keeps."""
    pending = [(temporary_name(path), Path(path)) for path in paths]
    try:
        for temporary, _ in pending:
            trainer.save_checkpoint(temporary, weights_only=False)  # full training state
    except BaseException:
        for temporary, _ in pending:
            temporary.unlink(missing_ok=True)
        raise
    return pending


def put_in_place(trainer: L.Trainer, pending: list[tuple[Path, Path]]) -> None:
    """Renames checkpoints that `save_for_later` wrote into place, after flushing the loggers (the rows up
    to their iteration are in them by now). Only rank 0 writes checkpoints, so only it renames."""
    if not pending:
        return
    for logger in trainer.loggers:
        logger.save()
    if trainer.is_global_zero:
        _sync_csv_rows(trainer)
        for temporary, path in pending:
            os.replace(temporary, path)


def _sync_csv_rows(trainer: L.Trainer) -> None:
    """metrics.csv onto the disk before a checkpoint is renamed into place: the checkpoint's own bytes are
    synced, the CSV writer's appended rows only flushed, so a lost node (a power loss, a kernel panic)
    could keep the checkpoint without its rows."""
    for logger in trainer.loggers:
        path = getattr(getattr(logger, "_experiment", None), "metrics_file_path", None)
        if path and os.path.isfile(path):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class TakeStopSignals(L.Callback):
    """The first callback of a training run: it hands the stop signals to `checkpoint` as training starts,
    before the other callbacks' start-up work (the evaluation's reference statistics and first FID, which
    can take minutes). Lightning's own SIGTERM handler, in place until then, ends a run with status 0 and
    no checkpoint; under DDP it also broadcasts from inside the handler on the rank that received the
    signal, a collective the other ranks never join: the job hung."""

    def __init__(self, checkpoint: LastCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_train_start(self, trainer, pl_module) -> None:
        self.checkpoint.take_signals(trainer)


class LastCheckpoint(L.Callback):
    """Saves `dirpath/last.ckpt` every `every_n_iterations` ACT iterations, when training ends, and when
    the run is stopped unfinished (before its last iteration, or with the last one's evaluation left to
    its continuation). `keep_snapshots` also keeps `iter_<k>.ckpt` for those iterations (not for a launch
    stopped before its first iteration, which saves the state it started from): `true` every one, a
    number N the newest N (older ones are deleted after each save; a diverged or damaged run then has a
    checkpoint from before to continue from), `false` or 0 none.

    A run stops early after `stop_after` iterations of this process, or at the end of the iteration in
    which a stop signal arrives (SIGTERM, SIGINT, SIGUSR1, SIGUSR2): the checkpoint then holds a
    consistent state, never half an iteration. `stopped_by` says which signal stopped it (the training
    entry point exits non-zero then, and a SLURM job is requeued); a second Ctrl-C stops at once.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_iterations: int = 1000,
        filename: str = "last.ckpt",
        keep_snapshots: bool | int = False,
        stop_after: int | None = None,
    ) -> None:
        check_count(every_n_iterations, "callbacks.checkpoint.every_n_iterations")
        if isinstance(keep_snapshots, bool) or keep_snapshots is None:
            keep_snapshots = None if keep_snapshots else 0  # None: every snapshot
        elif not isinstance(keep_snapshots, int) or keep_snapshots < 0:
            raise ValueError(
                "callbacks.checkpoint.keep_snapshots must be true (all), false or a number of snapshots "
                f">= 0, got {keep_snapshots!r}"
            )
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"stop_after must be a positive number of iterations or null, got {stop_after}")
        self.path = Path(dirpath) / filename
        self.every = every_n_iterations
        self.keep_snapshots = keep_snapshots
        self.stop_after = stop_after
        self.stopped_by: int | None = None  # the signal that stopped the run, once it has
        self.stopped_early = False
        self._signal: int | None = None  # the stop signal this process received
        self._agreed: int | None = None  # the one any rank received, as all ranks agreed on it
        self._previous: dict[int, Any] = {}  # the handlers ours replaced while training runs
        self.took_signals = False  # ours were installed (before that, Ctrl-C is Python's KeyboardInterrupt)
        self._handed_over: dict[int, Any] = {}  # the same, after training (for `requeue`)
        self._start = 0
        self._decided: tuple[int, bool] | None = None  # (iteration, stop after it), once decided
        self._saved_at = -1
        self._before_training = False  # stopped before the launch's first iteration (stop_before_training)
        self._left: int | None = None  # an iteration whose evaluation gave way (leave_to_continuation)
        self._pending: list[tuple[Path, Path]] = []  # (temporary, final) names of a save not in place yet

    # -- saving ---------------------------------------------------------------------------------------
    # The iteration's checkpoint is written under a temporary name (its state is the iteration's, exactly)
    # and renamed into place once the iteration's metrics row is on disk (`save_for_later`): at the next
    # iteration's start, at the epoch's end or when training ends.
    def _save(self, trainer: L.Trainer, iteration: int) -> None:
        if iteration == self._saved_at:
            return
        self._commit(trainer)
        for logger in trainer.loggers:  # rows up to the previous iteration (the evaluation's included)
            logger.save()
        targets = [self.path]
        # a launch stopped before its first iteration saves the state it started from: no snapshot of it,
        # which an uninterrupted run would not have (of the untrained network at 0, or a second one)
        if self.keep_snapshots != 0 and not self._before_training:
            targets.append(self.path.parent / f"iter_{iteration:07d}.ckpt")
        self._pending = save_for_later(trainer, targets)
        self._saved_at = iteration

    def _commit(self, trainer: L.Trainer) -> None:
        """Renames the checkpoint `_save` wrote into place (`put_in_place`)."""
        pending, self._pending = self._pending, []  # tried once: a failed rename is not tried again
        put_in_place(trainer, pending)
        if pending and trainer.is_global_zero:
            self._remove_old_snapshots()

    def _remove_old_snapshots(self) -> None:
        """Deletes all but the newest `keep_snapshots` iter_<k>.ckpt (every one is kept when it is None)."""
        if self.keep_snapshots is None:
            return
        snapshots = sorted(self.path.parent.glob("iter_*.ckpt"))  # iterations zero-padded: sorted in time
        for old in snapshots[: -self.keep_snapshots]:
            old.unlink(missing_ok=True)
            log.info("removed %s (keep_snapshots=%d)", old, self.keep_snapshots)

    def setup(self, trainer, pl_module, stage: str) -> None:
        # A kill during a save leaves its temporary file (`.last.ckpt.<random>.tmp`, as large as the
        # checkpoint); nothing else clears it. The run folder's lock keeps other runs out of this folder,
        # and a temporary that a live save is writing is locked: the others are remains.
        if stage == "fit" and trainer.is_global_zero:
            for path in remove_stale_temporaries(self.path.parent):
                log.info("removed %s, left by a save that was interrupted", path)

    def take_signals(self, trainer) -> None:
        """Installs the stop-signal handlers, once per fit: `TakeStopSignals`, the first callback, calls it
        as training starts, before the other callbacks' start-up work; this one's `on_train_start` too."""
        if self._previous:
            return
        self._install_handlers()
        self.took_signals = True
        if take_lightning_sigterm(trainer):  # arrived before: ours from now on
            self._on_signal(signal.SIGTERM, None)

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = pl_module.k
        self.take_signals(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._commit(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._commit(trainer)

    def signalled(self, trainer, pl_module) -> bool:
        """Whether a stop signal has reached any rank, the same answer on every rank (all of them call it
        together: a scheduler's signal may reach one task only). The evaluation asks it between its rounds
        of sampling, to give way to the checkpoint (`stop_here`)."""
        signum = self._signal or 0
        if trainer.world_size > 1:
            agreed = trainer.strategy.reduce(torch.tensor(signum, device=pl_module.device), reduce_op="max")
            signum = int(agreed)
        if signum:
            self._agreed = signum
        return bool(signum)

    def stopping(self, trainer, pl_module) -> bool:
        """Whether the run stops after the current iteration (a stop signal on any rank, or `stop_after`),
        decided once per iteration and alike on every rank: the callbacks that run before this one (the
        evaluation) ask it too, and leave their work at a stop to the run's continuation."""
        k = pl_module.k
        if self._decided is None or self._decided[0] != k:
            signalled = self.signalled(trainer, pl_module)
            after = self.stop_after is not None and k - self._start >= self.stop_after
            self._decided = (k, signalled or after)
        return self._decided[1]

    def stop_here(self, k: int) -> None:
        """Stop after iteration k, whatever `stopping` decided for it: a signal that came during that
        iteration's evaluation, which gave way to this checkpoint."""
        self._decided = (k, True)

    @property
    def signalled_stop(self) -> bool:
        """Whether a stop signal (not `stop_after`) is what stops the run, as `signalled` found."""
        return self._agreed is not None

    def leave_to_continuation(self, k: int) -> None:
        """The evaluation at iteration k gave way to a stop: the run stops after k unfinished, even at its
        last iteration, and its continuation makes that evaluation (`act_lightning.train` does not call a
        run at its end whose evaluation was left so finished)."""
        self._decided = (k, True)
        self._left = k

    def stop_before_training(self, trainer, pl_module) -> None:
        """Stop before this launch's first iteration: a signal came during the evaluation it starts with
        (the untrained network's, or one a stop left to it), which gave way. The checkpoint, of the
        iteration it started from, is saved as training ends."""
        self._decided = (pl_module.k, True)
        self._before_training = True
        self._stop(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        k = pl_module.k
        stop = self.stopping(trainer, pl_module)
        unfinished = k < pl_module.hparams.iterations or self._left == k
        if k % self.every == 0 or (stop and unfinished):
            self._save(trainer, k)
        if stop and unfinished:
            self._stop(trainer, pl_module)

    def _stop(self, trainer, pl_module) -> None:
        self.stopped_early = True
        self.stopped_by = self._agreed  # every rank's: it exits, and requeues, as rank 0 does
        trainer.should_stop = True
        reason = (
            f"signal {signal.Signals(self._agreed).name}" if self._agreed else f"stop_after={self.stop_after}"
        )
        if trainer.is_global_zero:
            log.warning(
                "Stopped at iteration %d of %d (%s); checkpoint %s. Continue with resume=auto.",
                pl_module.k,
                pl_module.hparams.iterations,
                reason,
                self.path,
            )

    def on_train_end(self, trainer, pl_module) -> None:
        self._save(trainer, pl_module.k)
        self._commit(trainer)
        if trainer.world_size > 1:  # no rank leaves (exits, perhaps non-zero: a stop) before rank 0 renamed
            trainer.strategy.barrier("act_last_checkpoint")
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:  # the state written is the iteration's, whatever failed after it: keep it
            self._commit(trainer)
        finally:
            self._restore_handlers()

    def summary(self) -> dict[str, Any]:
        """For the training entry point: the signal that stopped the run early (None: it was not)."""
        return {"stopped_by": self.stopped_by}

    # -- signals ----------------------------------------------------------------------------------------
    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for signum in STOP_SIGNALS:
            # Lightning's own SIGTERM handler would end the run with status 0 and no checkpoint; a
            # launcher's (submitit's requeue on SIGUSR2) is called after the checkpoint is written.
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            if is_lightning_handler(handler):
                handler = signal.SIG_DFL
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._handed_over, self._previous = self._previous, {}

    def _on_signal(self, signum: int, frame) -> None:
        if self._signal == signal.SIGINT and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once, without a checkpoint
        self._signal = signum
        print(
            f"\n[act] {signal.Signals(signum).name} received: stopping after this iteration with a "
            "checkpoint" + (" (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""),
            file=sys.stderr,
            flush=True,
        )

    def requeue(self, is_global_zero: bool) -> None:
        """After a stop by a scheduler's time-limit signal (SIGUSR1 / SIGUSR2): hand over to the launcher's
        own handler when there is one (submitit requeues the job and exits), else requeue the SLURM job
        with `scontrol requeue`, as Lightning's auto-requeue does. A requeued job continues with
        resume=auto from the checkpoint just written."""
        if self.stopped_by not in REQUEUE_SIGNALS:
            return
        previous = self._handed_over.get(self.stopped_by)
        if callable(previous) and not is_lightning_handler(previous):
            previous(self.stopped_by, None)
            return
        job = os.environ.get("SLURM_JOB_ID")
        if is_global_zero and job:
            array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
            job = f"{array_job}_{task}" if array_job and task else job
            if shutil.which("scontrol") is None:  # SLURM's variables without its tools (a container in a job)
                log.warning("SLURM_JOB_ID=%s but no scontrol here: the job is not requeued; relaunch it", job)
                return
            result = subprocess.call(["scontrol", "requeue", job])
            log.warning("scontrol requeue %s: %s", job, "done" if result == 0 else f"failed ({result})")
