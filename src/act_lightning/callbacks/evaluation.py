"""Periodic Fréchet-distance evaluation (FID with Inception features) of the target network's samples.

Every `every` ACT iterations (and before the first and after the last), one-step samples of
theta^- are drawn from fixed noise and compared with reference statistics: the training set's (computed
once, cached as .npz) or a published file. The noise of sample i does not depend on the number of
processes: the samples come in chunks of `batch_size`, each seeded by its index, and rank r takes chunks
r, r + world, ...; the float64 feature sums are all-reduced. So one GPU or eight give the same FID.

The value goes to every logger at step = ACT iteration (`val/fid`), its best value to the W&B summary,
the curve to `fid_curve.png` and the history to `metric_summary.json` (each entry with the training
seconds so far: wall-clock time since the first iteration, evaluations excluded, carried over resumes);
the best checkpoint by the metric is kept as `best.ckpt`. A callback observes: it never changes training.
A run that stops (a signal, `stop_after`) at an evaluation's iteration, or receives a signal during an
evaluation, is checkpointed first (the evaluation gives way after its current round of sampling); the
continuation makes that evaluation when it starts (`deferred` in the callback's state). The evaluation a
launch starts with gives way too: the run then stops before its first iteration. So does the last
iteration's to a signal (not to `stop_after`, which ends the run there): the run stops unfinished, and its
continuation only makes that evaluation.

`metrics` adds what `python -m act_lightning.evaluate metrics=[...]` computes, from the same samples:
`is`, `kid`, `pr` (from the same features) and `fd_dinov2` (DINOv2's, in the same sampling pass), logged
as `<prefix>/is`, `<prefix>/kid`, `<prefix>/precision`, `<prefix>/recall`, `<prefix>/fd_dinov2` (prefix: the
key's, e.g. `val`) and kept in `metric_summary.json` under `extra`; over all drawn samples, not per subset.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from tqdm.auto import tqdm

from act_lightning.atomic import atomic_write
from act_lightning.callbacks.checkpoint import LastCheckpoint, put_in_place, save_for_later
from act_lightning.checks import check_count
from act_lightning.launch import rank_zero_warning
from act_lightning.metrics.extra import NEED_REAL_IMAGES, ExtraMetrics, check_metrics, real_references
from act_lightning.metrics.fid import (
    FEATURES,
    EvaluationStopped,
    build_feature_extractor,
    check_reference_spec,
    feature_statistics,
    reference_statistics,
    sample_chunks,
    sample_subset_statistics,
)
from act_lightning.metrics.frechet import LazyRoot, frechet_distance
from act_lightning.metrics.inception import check_quantize

log = logging.getLogger(__name__)


def advance(bar: tqdm, n: int) -> None:
    """Moves rank 0's bar by its estimate of all ranks' images (n, its own times the world size), never past
    its total: ranks with fewer or no chunks in the last round showed 1000 of 891, or 8 of 4."""
    bar.update(n if bar.total is None else max(0, min(n, bar.total - bar.n)))


class FrechetEvaluation(L.Callback):
    def __init__(
        self,
        run_dir: str,
        features: str | Callable[[], nn.Module] = "inception",
        key: str = "val/fid",
        label: str = "FID",
        every: int = 5000,
        num_samples: int = 10000,
        batch_size: int = 500,
        seed: int = 0,
        inception_weights: str | None = None,
        download: bool = False,
        reference: str = "train",
        reference_cache: str | None = None,
        reference_max_images: int | None = None,
        quantize: str = "round",
        best_checkpoint: str | None = None,
        subset_size: int | None = None,
        metrics: list[str] | tuple[str, ...] = ("fid",),
        dinov2_weights: str | None = None,
        inception_resize: int | None = None,
    ) -> None:
        check_eval_arguments(every, quantize, num_samples, batch_size, subset_size)
        names = metrics if metrics else ["fid"]
        self.metrics = check_metrics(
            names,
            features if isinstance(features, str) else "custom",
            "eval.metrics",
            count=("eval.num_samples", num_samples),
        )
        self.subset_size = subset_size  # null: one set of num_samples; else the mean over sets of this size
        self.run_dir = Path(run_dir)
        self.features_spec = features
        self.features_name = features if isinstance(features, str) else "custom"  # for caches and summaries
        self.every = every
        self.quantize = quantize
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.key = key
        self.label = label
        self.seed = seed
        self.reference_spec = str(reference)
        self.reference_cache = Path(reference_cache) if reference_cache else None
        self.reference_max_images = reference_max_images
        self.best_checkpoint = Path(best_checkpoint) if best_checkpoint else None
        self.inception_resize = inception_resize  # None: 299 (the protocol); smoke runs: smaller
        # Fail now, before any data is read or network built, if a file the evaluation needs is missing.
        self.inception_weights, self.dinov2_weights = self._required_files(
            features, inception_weights, dinov2_weights, download
        )
        self.dinov2: nn.Module | None = None
        self._real: Tensor | None = None  # real images' features (kid, pr)
        self._dinov2_reference: tuple | None = None  # (mu, sigma, sigma^(1/2)) of real images in DINOv2's
        self.extractor: nn.Module | None = None
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self._reference_root: LazyRoot | None = None  # sigma_ref^(1/2), computed once per run if needed
        self._init_run_state()

    def _init_run_state(self) -> None:
        """What the run's checkpoint carries (`state_dict`), and this process's training clock."""
        self.references: dict[str, float] = {}  # FD of held-out real images and of noise (quickstart)
        self.history: list[tuple[int, float, float]] = []  # (iteration, value, training seconds)
        self.extra_history: list[dict[str, float]] = []  # {"iteration": k, metric: value, ...}
        self.best: tuple[int, float] | None = None
        self._pending_best: list[tuple[Path, Path]] = []  # best.ckpt's save, put in place after its rows
        self._best_at_old_count: tuple[int, float] | None = None  # set aside by a change of count (resume)
        self._seconds_before = 0.0  # training seconds of earlier processes (a resumed run)
        self._clock: float | None = None  # perf_counter at this process's start of training
        self._deferred: int | None = None  # an iteration whose evaluation a stop left to the continuation

    def _required_files(self, features, inception_weights, dinov2_weights, download) -> tuple:
        """The Inception and DINOv2 weights files (None where not needed) and the reference's images,
        each refused by name when missing."""
        inception = dinov2 = None
        if features == "inception":
            from act_lightning.metrics.inception import (
                RANDOM,
                check_inception_resize,
                load_inception_state,
                resolve_inception_weights,
            )

            check_inception_resize(self.inception_resize, inception_weights)
            inception = resolve_inception_weights(inception_weights, download)
            if inception != RANDOM:  # read now: a truncated download failed inside fit, with a traceback
                load_inception_state(inception)
        elif isinstance(features, str) and features not in FEATURES:
            raise ValueError(f"eval.features must be one of {', '.join(FEATURES)}; got {features!r}")
        check_reference_spec(self.reference_spec)
        if "fd_dinov2" in self.metrics:
            from act_lightning.metrics.dinov2 import check_dinov2_weights, resolve_dinov2_weights

            dinov2 = resolve_dinov2_weights(dinov2_weights, download, key="eval.dinov2_weights")
            check_dinov2_weights(dinov2)
        real = [m for m in self.metrics if m in NEED_REAL_IMAGES]
        if real and self.reference_spec != "train":
            from act_lightning.metrics.reference import require_reference_images

            require_reference_images(Path(self.reference_spec), real)
        return inception, dinov2

    # -- set-up -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.extractor is not None:
            return
        spec = self.features_spec
        if isinstance(spec, str):
            self.extractor = build_feature_extractor(
                spec,
                inception_weights=self.inception_weights,
                quantize=self.quantize,
                inception_resize=self.inception_resize,
            )
        else:
            self.extractor = spec()
        self.extractor.eval().requires_grad_(False)
        if self.dinov2_weights is not None:
            from act_lightning.metrics.dinov2 import load_dinov2

            self.dinov2 = load_dinov2(self.dinov2_weights, self.quantize)

    def on_train_start(self, trainer, pl_module) -> None:
        self._clock = None  # runs from the first epoch or iteration on (a callback may serve another fit)
        if self.best is not None and self.best_checkpoint is not None and not self.best_checkpoint.is_file():
            # a run started in a new folder from another run's snapshot (ckpt_path=) carries that run's
            # history and best, but not its best.ckpt: the best is this folder's, from the next evaluation
            log.info("%s is not there: the best is taken anew from the next evaluation", self.best_checkpoint)
            self.best = None
        self._keep_best_at_old_count(trainer, pl_module.k)
        device = pl_module.device
        dm = trainer.datamodule
        self.extractor.to(device)
        self.reference = self._reference_statistics(trainer, dm, device)
        self._reference_root = LazyRoot(self.reference[1])
        self._extra_references(trainer, dm, device)
        k = pl_module.k
        if not self.references and hasattr(dm, "build_held_out_dataset"):
            self.references = self._reference_values(dm, device)
            if k > 0:  # measured anew on a resume at another count (load_state_dict): logged from here on
                self._log(trainer, k, {f"{self.key}_{name}": v for name, v in self.references.items()})
        self._define_wandb_metrics(trainer)
        # k == 0: the untrained network, logged as the curve's start (never the best) at the seconds
        # before (0: no clock runs yet); a run stopped at an evaluation's iteration saved before scoring
        # it: scored now (whatever eval.every is now), at the training seconds it stopped at, from that
        # iteration's weights
        if (k == 0 or self._deferred == k) and not (self.history and self.history[-1][0] == k):
            if self._evaluated_at_start(trainer, pl_module) and k == 0 and self.references:
                # the scale's two ends, once per run, with the untrained network's value: a launch stopped
                # during that evaluation logs neither, and its continuation (from the checkpoint at 0) both
                self._log(trainer, k, {f"{self.key}_{name}": v for name, v in self.references.items()})
        else:
            self._deferred = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # training time starts with the launch's first epoch (none in a launch stopped before its first
        # iteration), after the callbacks before this one drew what they draw at its start (the untrained
        # network's sample grid); before, the clock started ahead of the first evaluation, which then
        # counted whatever passed between the two lines (4 ms once, on a busy machine)
        if self._clock is None:
            self._clock = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._put_best_in_place(trainer)
        # a launch that continues a run stopped mid-epoch starts with no epoch start (Lightning skips the
        # hook when it restarts mid-epoch): its clock starts with its first iteration
        if self._clock is None:
            self._clock = time.perf_counter()

    def _evaluated_at_start(self, trainer, pl_module) -> bool:
        """Makes the evaluation a launch starts with (iteration 0's, or the one a stop left to it); False
        when a stop signal came during it: it gave way, and the run stops before its first iteration (the
        continuation makes it), as during training."""
        checkpoint = _last_checkpoint(trainer)
        if checkpoint is None:
            self._evaluate_and_log(trainer, pl_module)
        elif not self._evaluate_giving_way(
            trainer, pl_module, checkpoint, lambda: checkpoint.stop_before_training(trainer, pl_module)
        ):
            return False
        return True  # (recording it cleared `deferred`)

    def _evaluate_giving_way(self, trainer, pl_module, checkpoint: LastCheckpoint, stop_run) -> bool:
        """Evaluates at iteration k, asking between its rounds of sampling whether a stop signal reached any
        rank (`checkpoint.signalled`, a collective). If one did, it gives way: `stop_run()` stops the run at
        k, the evaluation is left to the continuation, and False is returned. One that came during the last
        round also stops the run at k, and the finished evaluation is kept; at the run's last iteration
        that evaluation was all there was left to do, so the run finishes instead (status 0, no requeue),
        as it does when a signal comes during its last iteration."""
        k = pl_module.k
        try:
            self._evaluate_and_log(trainer, pl_module, lambda: checkpoint.signalled(trainer, pl_module))
        except EvaluationStopped:
            stop_run()
            self._defer(trainer, k, checkpoint)
            return False
        if checkpoint.signalled(trainer, pl_module) and k < pl_module.hparams.iterations:  # its last round
            stop_run()
        return True

    def _reference_values(self, dm, device) -> dict[str, float]:
        """The metric of held-out real images and of uniform noise, the scale's two ends, at the sample
        count of the generated images' metric (`subset_size`, or `num_samples`): a Frechet distance is
        biased upwards by an amount that grows as the count shrinks, so only equal counts compare. Each
        end is the mean over sets of that count, as the generated value is: the noise's over as many sets
        as the generated images fill, the held-out images' over as many as they hold (one, the
        quickstart's 297 at its 297). Fewer held-out images than the count are used whole, and said."""
        # every rank computes these whole (small sets): no all-reduce, or counts would double
        held = torch.stack([x for x, _ in dm.build_held_out_dataset()])
        size = self.subset_size or self.num_samples
        if len(held) < size:
            rank_zero_warning(
                log,
                "the held-out real images (%d, data.held_out) are fewer than the generated images of one "
                "Frechet distance (%d, eval.subset_size or eval.num_samples), so the metric's real "
                "reference is biased differently from it: set eval.subset_size=%d or lower",
                len(held),
                size,
                len(held),
            )

        def mean_distance(sets, real: bool) -> float:
            batches = (part.split(self.batch_size) for part in sets)
            stats = (feature_statistics(self.extractor, b, device, sync=False, real=real) for b in batches)
            return float(np.mean([self._fd(s) for s in stats]))

        g = torch.Generator().manual_seed(99)  # the same noise in every run: the scale's upper end
        noise = torch.rand((self._num_drawn(), *held.shape[1:]), generator=g) * 2 - 1
        held_sets = [held] if len(held) < size else held[: len(held) // size * size].split(size)
        return {
            "real": mean_distance(held_sets, real=True),
            "noise": mean_distance(noise.split(size), real=False),
        }

    def _references_count(self) -> list[int]:
        """What the scale's references depend on besides the data: the count of one Frechet distance and
        the generated images' (the noise's) count."""
        return [self.subset_size or self.num_samples, self._num_drawn()]

    def _num_drawn(self) -> int:
        """Generated images per evaluation: num_samples, or as many whole subsets of it as fit."""
        if self.subset_size is None:
            return self.num_samples
        return self.num_samples // self.subset_size * self.subset_size

    def _keep_best_at_old_count(self, trainer, k: int) -> None:
        """The best checkpoint of values at the old count (`load_state_dict`), renamed best_before_<k>.ckpt
        (k: this continuation's first iteration), so that the next evaluation's does not overwrite it."""
        old, self._best_at_old_count = self._best_at_old_count, None
        path = self.best_checkpoint
        if old is None or path is None or not trainer.is_global_zero or not path.is_file():
            return
        kept = path.with_name(f"{path.stem}_before_{k}{path.suffix}")
        os.replace(path, kept)
        log.info(
            "%s (%s %.4g at iteration %d, at the old count) is kept as %s",
            path,
            self.key,
            old[1],
            old[0],
            kept,
        )

    # -- reference statistics ---------------------------------------------------------------------
    def _reference_statistics(self, trainer, dm, device) -> tuple[np.ndarray, np.ndarray]:
        with self._bar(trainer, f"{self.label}: reference statistics", unit="img") as bar:
            return reference_statistics(
                self.extractor,
                self.reference_spec,
                datamodule=dm,
                features=self.features_name,
                cache=self.reference_cache,
                max_images=self.reference_max_images,
                batch_size=self.batch_size,
                device=device,
                rank=trainer.global_rank,
                world_size=trainer.world_size,
                progress=lambda n: advance(bar, n * trainer.world_size),
            )

    @staticmethod
    def _bar(trainer, desc: str, total: int | None = None, unit: str = "img") -> tqdm:
        """Progress of a long phase, shown by rank 0 (other ranks do their share silently)."""
        return tqdm(total=total, desc=desc, unit=unit, leave=False, disable=trainer.global_rank != 0)

    def _fd(self, stats) -> float:
        return frechet_distance(*stats, *self.reference, sqrt_sigma2=self._reference_root)

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, trainer, pl_module, stop: Callable[[], bool] | None = None) -> float:
        """The metric of `num_samples` one-step samples of the target network (all ranks take part);
        EvaluationStopped when `stop`, asked after each round of sampling, says so."""
        dm = trainer.datamodule
        desc = f"{self.label} at iteration {pl_module.k}"
        size = self.subset_size or self.num_samples
        taps = ExtraMetrics(self.metrics, self.extractor, self.dinov2)
        with self._bar(trainer, desc, total=self._num_drawn()) as bar:
            stats = sample_subset_statistics(
                lambda noise, labels, indices: pl_module.sample(noise, labels),
                taps.extractor,
                self._num_drawn() // size,
                size,
                self.batch_size,
                (dm.channels, dm.image_size, dm.image_size),
                pl_module.hparams.num_classes,
                self.seed,
                pl_module.device,
                trainer.global_rank,
                trainer.world_size,
                progress=lambda n: advance(bar, n * trainer.world_size),
                stop=stop,
            )
        gather = partial(_gathered, trainer, self._num_drawn(), self.batch_size)
        self._last_extra = taps.values(self._real, self._dinov2_reference, gather)
        return float(np.mean([self._fd(part) for part in stats]))  # one value without subsets

    def _extra_references(self, trainer, dm, device) -> None:
        """Real images' features for kid and pr and their DINOv2 statistics for fd_dinov2, from one read
        of up to num_samples images of the reference (`real_references`; every rank computes the same),
        once per callback."""
        if self._real is not None or self._dinov2_reference is not None:
            return
        if self.dinov2 is not None:
            self.dinov2.to(device)
        count = self._num_drawn()
        self._real, self._dinov2_reference, _ = real_references(
            self.metrics, self.reference_spec, dm, self.extractor, self.dinov2, count, self.batch_size, device
        )

    def summary(self) -> dict[str, Any]:
        """For the training entry point (and a sweeper that minimises it): the best value of the metric,
        or its last value when no evaluation after the first improved on anything, None before any."""
        if not self.history:
            return {"best": None}
        return {"best": self.best[1] if self.best is not None else self.history[-1][1]}

    def train_seconds(self, device: torch.device | None = None) -> float:
        """Wall-clock seconds of training so far: since the first iteration, evaluations excluded."""
        if self._clock is None:
            return self._seconds_before
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)  # the iterations queued so far belong to training
        return self._seconds_before + time.perf_counter() - self._clock

    def _evaluate_and_log(self, trainer, pl_module, stop: Callable[[], bool] | None = None) -> float:
        k = pl_module.k
        seconds = self.train_seconds(pl_module.device)
        started = time.perf_counter()
        try:
            return self._evaluate_and_record(trainer, pl_module, k, seconds, stop)
        finally:
            if self._clock is not None:  # the evaluation's own time (given up or not) is not training time
                self._clock += time.perf_counter() - started

    def _evaluate_and_record(self, trainer, pl_module, k: int, seconds: float, stop=None) -> float:
        value = self.evaluate(trainer, pl_module, stop)
        self.history.append((k, value, seconds))
        if self._deferred == k:  # made: not left in the best checkpoint saved below, nor in any after it
            self._deferred = None
        if not math.isfinite(value):  # the divergence guard names the iteration and the loss, and stops
            rank_zero_warning(
                log,
                "%s at iteration %d is %s: the samples are not finite (a diverging run)",
                self.key,
                k,
                value,
            )
        improved = k > 0 and math.isfinite(value) and (self.best is None or value < self.best[1])
        if improved:
            self.best = (k, value)
        extra = getattr(self, "_last_extra", {})
        prefix = self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""
        self._log(trainer, k, {self.key: value, **{prefix + name: v for name, v in extra.items()}})
        if extra:
            self.extra_history.append({"iteration": k, **extra})
        trainer.callback_metrics[self.key] = torch.tensor(value)  # progress bar and train()'s summary
        self._update_wandb_summary(trainer)
        self._write()
        if improved and self.best_checkpoint is not None:  # every rank calls it; rank 0 writes
            self._put_best_in_place(trainer)
            self._pending_best = save_for_later(trainer, [self.best_checkpoint])
        return value

    def _put_best_in_place(self, trainer) -> None:
        """Renames the best checkpoint saved at an evaluation into place, once the loggers hold its
        iteration's rows (at the next iteration's start, the epoch's end, training's end), as the
        checkpoint callback does with last.ckpt: a run continued from best.ckpt after a kill -9 then has
        every metrics row up to it."""
        pending, self._pending_best = self._pending_best, []
        put_in_place(trainer, pending)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._put_best_in_place(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._put_best_in_place(trainer)  # the state written is its iteration's, whatever failed after

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # the last iteration is scored here too, before the checkpoint callback (which runs last) saves
        # it: a save at that iteration (k a multiple of its interval) is not repeated at the end, so an
        # evaluation in on_train_end would be missing from last.ckpt's history and best
        k = pl_module.k
        last = k >= pl_module.hparams.iterations
        if not last and k % self.every != 0:
            return
        # A stop (a signal, stop_after) at this iteration, or a signal during its evaluation, saves the
        # checkpoint first: a scheduler kills seconds after its signal (SLURM's KillWait), and an
        # evaluation can take minutes. The continuation scores this iteration when it starts. At the last
        # iteration only a signal does: stop_after there ends the run, which its evaluation completes.
        checkpoint = _last_checkpoint(trainer)
        if checkpoint is None:  # a trainer built by hand
            self._evaluate_and_log(trainer, pl_module)
        elif checkpoint.stopping(trainer, pl_module) and (not last or checkpoint.signalled_stop):
            self._defer(trainer, k, checkpoint)
        else:
            self._evaluate_giving_way(trainer, pl_module, checkpoint, lambda: checkpoint.stop_here(k))

    def _defer(self, trainer, k: int, checkpoint: LastCheckpoint) -> None:
        self._deferred = k  # in the checkpoint about to be saved (state_dict): its continuation scores k
        checkpoint.leave_to_continuation(k)  # the run stops unfinished at k, even at its last iteration
        if trainer.is_global_zero:
            log.info("the evaluation at iteration %d is left to the run's continuation (a stop)", k)

    def on_train_end(self, trainer, pl_module) -> None:
        # After the last iteration, if nothing scored it (on_train_batch_end and the start do); a
        # run that stops early (stop_after, a signal) is resumed, not scored, so its metrics.csv gets the
        # same rows as an uninterrupted run's, and so is one whose last evaluation gave way to a signal.
        finished = pl_module.k >= pl_module.hparams.iterations and self._deferred != pl_module.k
        if finished and (not self.history or self.history[-1][0] != pl_module.k):
            self._evaluate_and_log(trainer, pl_module)
        for logger in trainer.loggers:
            logger.save()
        self._put_best_in_place(trainer)

    # -- outputs ----------------------------------------------------------------------------------
    @staticmethod
    def _log(trainer, iteration: int, metrics: dict[str, float]) -> None:
        """Straight to the loggers at step = ACT iteration (as the module's metrics are): through
        LightningModule.log, values logged off the `log_every_n_steps` grid would be dropped."""
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=iteration)

    def _define_wandb_metrics(self, trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                # the summary W&B keeps of it is its default, the last value (a number; summary="last"
                # nested it as {"last": ...}, and "min" took the untrained network at iteration 0 too,
                # which best.ckpt and `<key>_best`, set by `_update_wandb_summary`, leave out)
                logger.experiment.define_metric(self.key, step_metric="trainer/global_step")

    def _update_wandb_summary(self, trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero and self.best is not None:
                summary = logger.experiment.summary
                summary[f"{self.key}_best"] = self.best[1]
                summary[f"{self.key}_best_iteration"] = self.best[0]

    @rank_zero_only
    def _write(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "metric": self.key,
            "features": self.features_name,
            "num_samples": self._num_drawn(),
            "subset_size": self.subset_size,
            "reference": self.reference_spec,
            "history": [{"iteration": k, "value": v, "seconds": round(t, 3)} for k, v, t in self.history],
            "best": None if self.best is None else {"iteration": self.best[0], "value": self.best[1]},
            "references": self.references,
        }
        if self.extra_history:
            summary["extra"] = self.extra_history
        normalised = normalised_value(self.history[-1][1], self.references) if self.history else None
        if normalised is not None:  # the last value's; the best's is under best, as train's last line says
            summary["normalised"] = normalised
            if self.best is not None:
                summary["best"]["normalised"] = normalised_value(self.best[1], self.references)
        with atomic_write(self.run_dir / "metric_summary.json") as f:  # never a truncated summary
            f.write(json.dumps(summary, indent=2).encode())
        plot_curve(self.history, self.references, self.run_dir / "fid_curve.png", self.label)

    def state_dict(self) -> dict:
        return {
            "history": self.history,
            "references": self.references,
            "references_count": self._references_count(),
            "best": self.best,
            "train_seconds": self.train_seconds(),
            "extra_history": self.extra_history,
            "deferred": self._deferred,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # entries of checkpoints written before the seconds were recorded get NaN seconds
        self.history = [(*x, float("nan"))[:3] for x in state_dict.get("history", [])]
        self._seconds_before = float(state_dict.get("train_seconds", 0.0))
        self.references = dict(state_dict.get("references", {}))
        count = state_dict.get("references_count")  # absent from checkpoints before 0.3.3: taken as equal
        best = state_dict.get("best")
        self.best = None if best is None else tuple(best)
        if count is not None and list(count) != self._references_count():
            # a continuation at another eval.subset_size or eval.num_samples (resume_changes): a Frechet
            # distance's bias depends on the count, so neither the scale's ends nor the best value measured
            # at the old count compare with the values at the new one
            log.info(
                "the metric was measured at a count of %d (%d drawn); this launch's is %d (%d drawn): %s are "
                "measured anew, the history before stays at the old count",
                *count,
                *self._references_count(),
                "its references and its best" if self.references else "its best",
            )
            self.references, self._best_at_old_count, self.best = {}, self.best, None
        self.extra_history = list(state_dict.get("extra_history", []))
        self._deferred = state_dict.get("deferred")


def _last_checkpoint(trainer) -> LastCheckpoint | None:
    """The run's checkpoint callback (None for a trainer built by hand without one)."""
    return next((c for c in getattr(trainer, "callbacks", ()) if isinstance(c, LastCheckpoint)), None)


def _gathered(trainer, num_samples: int, batch_size: int, features: Tensor) -> Tensor:
    """Every rank's rows of `features` in the samples' order: rank r drew chunks r, r + W, ... of
    `sample_chunks(num_samples, batch_size)`, and the rows are put back chunk by chunk, so that the
    metrics that read rows in order (IS's splits, KID's subsets) give one device's values on any count."""
    if trainer.world_size == 1:
        return features
    import torch.distributed as dist

    parts: list[Any] = [None] * trainer.world_size
    dist.all_gather_object(parts, features.cpu())
    pieces = []
    for rank, part in enumerate(parts):
        chunks = sample_chunks(num_samples, batch_size, rank, trainer.world_size)
        pieces += zip([c for c, _ in chunks], part.split([size for _, size in chunks]), strict=True)
    return torch.cat([rows for _, rows in sorted(pieces, key=lambda piece: piece[0])])


def check_eval_arguments(every: int, quantize: str, num_samples: int, batch_size: int, subset_size) -> None:
    """The evaluation's numeric options, each named by its key."""
    check_count(every, "eval.every")
    check_quantize(quantize)
    check_count(num_samples, "eval.num_samples", 2)  # a covariance needs two samples
    check_count(batch_size, "eval.batch_size")
    if subset_size is not None and not 2 <= subset_size <= num_samples:
        raise ValueError(
            f"eval.subset_size must be null or in [2, eval.num_samples={num_samples}]; got {subset_size}"
        )


def normalised_value(value: float, references: dict[str, float]) -> float | None:
    """A metric value on the scale of its references: 0 = as good as held-out real data, 1 = uniform
    noise (the quickstart's); None without both references."""
    real, noise = references.get("real"), references.get("noise")
    return None if real is None or noise is None else (value - real) / (noise - real)


def plot_curve(history, references: dict[str, float], path: Path, label: str) -> None:
    """The metric against ACT iterations, with the reference values as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if history:
        ks, vs = [x[0] for x in history], [x[1] for x in history]
        ax.plot(ks, vs, marker="o", label="one-step samples (target network)")
    styles = {"real": ("tab:green", "held-out real images"), "noise": ("tab:red", "uniform noise")}
    for name, value in references.items():
        colour, text = styles.get(name, ("gray", name))
        ax.axhline(value, ls="--", color=colour, label=f"{text}: {value:.1f}")
    if history and all(v > 0 for v in vs if not math.isnan(v)):  # a NaN (a diverged run) is not drawn
        ax.set_yscale("log")
    ax.set_xlabel("ACT iteration")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # fixed margins that fit the labels: tight_layout draws the figure once more to measure them (half the
    # time of a plot, which is redrawn at every evaluation)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.12, top=0.97)
    fig.savefig(path)
    plt.close(fig)
