"""Training entry point: `python -m act_lightning.train experiment=cifar10 [key=value ...]`.

`train(cfg)` is a plain function (tests call it); `main()` is the thin Hydra shell, and returns the run's
best metric so that a Hydra sweeper (Optuna) can minimise it.

Everything that can be checked before training is checked before anything is written into the run
folder (`prepare`): the configuration, the folder not in use by another live run (a lock file), the
checkpoint to resume from and that this launch's config may continue it (act_lightning.resume), the
checkpoint folder, the global batch on these devices, the data and the pretrained weights; `main` says
why a launch is refused in one line and exits 2. A run that fails for a reason its message explains (it
diverged, the disk filled up) says so in one line too and exits 1. A finished run resumed does nothing
more, and a run stopped by `stop_after` or by a signal continues with `resume=auto`. Each launch's Hydra
record is kept apart (act_lightning.launch); where a launch starts, and the folder's lock, are
act_lightning.start's; the process-wide settings (threads, TF32, inductor's cache) act_lightning.process's.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from act_lightning.atomic import remove_stale_temporaries
from act_lightning.callbacks import (
    AtomicCheckpointIO,
    DivergenceError,
    IterationProgressBar,
    LastCheckpoint,
    TakeStopSignals,
)
from act_lightning.callbacks.evaluation import normalised_value
from act_lightning.checkpoints import (
    checkpoint_iteration,
    no_space_error,
    out_of_space,
    read_checkpoint,
)
from act_lightning.checks import check_count
from act_lightning.commands import CONFIG_DIR, refusal, refuse
from act_lightning.compat import (
    ignore_few_batches_warning,
    ignore_frozen_modules_warning,
    ignore_lightning_leafspec_warning,
    quiet_litlogger_tip,
    without_wandb_anonymous,
)
from act_lightning.consistency import check_iterations
from act_lightning.data.base import DataError, DataUnavailable, check_batch_sizes
from act_lightning.init_from import describe, load_init, read_init, use_generator
from act_lightning.launch import check_writable_folder, log_to_record
from act_lightning.loggers import check_wandb_names, wandb_offline
from act_lightning.metrics.reference import check_reference_images
from act_lightning.process import apply_process_settings, job_launcher
from act_lightning.resolvers import is_first_process
from act_lightning.resume import world_size
from act_lightning.seeds import check_seed
from act_lightning.start import RunLock, StartPoint, set_aside_outputs, start_point
from act_lightning.sweeps import check_sweep

log = logging.getLogger(__name__)

RESUME = ("auto", "never")


def check_accelerator(accelerator: str) -> None:
    """A GPU asked for where torch sees none, refused by key (Lightning's own message names no key)."""
    mps = accelerator == "gpu" and torch.backends.mps.is_available()  # Lightning's gpu is CUDA or MPS
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available() and not mps:
        raise ValueError(
            f"trainer.accelerator={accelerator}: torch sees no GPU here (torch.cuda.is_available() is "
            "False); train on the CPU with trainer.accelerator=cpu (or auto, which takes a GPU where there "
            "is one)"
        )
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            "trainer.accelerator=mps: torch sees no Apple GPU here (torch.backends.mps.is_available() is "
            "False); use trainer.accelerator=auto, which takes the GPU there is, or cpu"
        )


def check_devices(trainer) -> None:
    """`trainer.devices` and `trainer.num_nodes` as Lightning takes them, refused by key before the run
    folder is written (Lightning's own messages name `Trainer(devices=0)` or `num_nodes`)."""
    nodes = trainer.get("num_nodes", 1)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"trainer.num_nodes={nodes}: the number of machines, a whole number of at least 1")
    devices = trainer.get("devices", "auto")
    text = str(devices).strip()
    if isinstance(devices, (list, tuple, ListConfig)) or "," in text:  # device indices: [0, 1] or "0,1"
        parts = list(devices) if not isinstance(devices, str) else [d.strip() for d in text.split(",") if d]
        fine = bool(parts) and all(str(d).isdigit() and not isinstance(d, bool) for d in parts)
    else:
        count = text.isdigit() and int(text) > 0
        fine = not isinstance(devices, bool) and (text in ("auto", "-1") or count)
    if not fine:
        raise ValueError(
            f"trainer.devices={devices}: the devices per machine are a number of at least 1, auto (the one "
            "device, or every GPU under trainer=ddp), -1 (every device) or a list of GPU indices such as "
            "[0,1]"
        )


def check_digits_features(cfg: DictConfig) -> None:
    """eval.features=digits (the quickstart's) reads 8 x 8 grey images: other images failed in the
    classifier's first convolution, a traceback at the first evaluation."""
    if cfg.eval.get("features") != "digits":
        return
    shape = (int(cfg.data.channels), int(cfg.data.image_size))
    if shape != (1, 8):
        raise ValueError(
            f"eval.features=digits measures 8x8 grey images (the quickstart's digits); data.channels="
            f"{shape[0]} data.image_size={shape[1]}: give eval.features=inception (FID) or eval=null"
        )


def check_config(cfg: DictConfig) -> None:
    """Configuration errors that can be seen before anything is built, named by their keys."""
    check_iterations(cfg.iterations)
    check_seed(cfg.get("seed"), high=2**32 - 1)  # Lightning seeds numpy too
    if cfg.get("resume", "auto") not in RESUME:
        raise ValueError(f"resume must be one of {', '.join(RESUME)}; got {cfg.resume!r}")
    if OmegaConf.select(cfg, "callbacks.checkpoint") is None:
        raise ValueError(
            "callbacks.checkpoint=null: a training run always keeps checkpoints/last.ckpt (resuming, "
            "preemption and the divergence guard need it); to save less often raise "
            "callbacks.checkpoint.every_n_iterations"
        )
    check_run_length(cfg.get("trainer") or {})
    check_precision(OmegaConf.select(cfg, "trainer.precision", default="32-true"))
    check_two_step_tau(cfg)
    check_accelerator(str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")))
    check_devices(cfg.get("trainer") or {})
    gen = cfg.model.get("generator") or {}
    # this library's UNetGenerator keeps it at model.generator.dropout, a converted DDPM's in its unet's
    dropouts = [d for d in (gen.get("dropout"), (gen.get("unet") or {}).get("dropout")) if d is not None]
    if cfg.model.get("shared_dropout") and dropouts and not any(dropouts):
        raise ValueError(  # here, not in the module: checkpoints of such runs still load
            "model.shared_dropout=true shares the dropout masks of the online and the teacher pass, but the "
            "generator has no dropout: set model.generator.dropout > 0 (iCT: 0.3 on CIFAR-10), or "
            "model.shared_dropout=false"
        )
    if "batch_size" in cfg.data:  # before resume's global batch reads it
        check_batch_sizes(cfg.data.batch_size, cfg.data.get("global_batch_size"))
        check_batch_under_global(cfg.data.batch_size, cfg.data.get("global_batch_size"))
    if cfg.get("eval") is not None:  # before the sample grid, whose interval is eval.every's by default
        check_count(cfg.eval.get("every"), "eval.every")
        reference = cfg.eval.get("reference")
        if reference is not None and str(reference) != "train" and Path(str(reference)).is_file():
            check_reference_images(Path(str(reference)), int(cfg.data.image_size), int(cfg.data.channels))
    check_class_embeddings(cfg)
    if OmegaConf.select(cfg, "logger.wandb") is not None:
        check_wandb_names(cfg.logger.wandb)
    for name in ("generator", "discriminator"):
        net = cfg.model.get(name)
        for key, data_key in (("image_size", "image_size"), ("in_channels", "channels")):
            if net is not None and key in net and net[key] != cfg.data[data_key]:
                converted = name == "generator" and cfg.get("init_from") and "unet" in net  # set by the file
                source = f" (init_from={cfg.init_from} is a model of such images: train it on data of theirs)"
                raise ValueError(
                    f"model.{name}.{key}={net[key]} differs from data.{data_key}={cfg.data[data_key]}"
                    + (source if converted else "")
                )
    if cfg.get("eval") is not None:  # after the networks' shapes, which name the first mismatch
        check_digits_features(cfg)


def check_batch_under_global(batch_size: int, global_batch_size: int | None) -> None:
    """data.batch_size is the most images per forward pass on a device; under an experiment's fixed
    global batch, one above it was dropped without a word (data.batch_size=160 on experiment=cifar10
    trained 80 per half, not the reference's --batch_size 160)."""
    if global_batch_size is not None and batch_size > global_batch_size:
        raise ValueError(
            f"data.batch_size={batch_size} exceeds data.global_batch_size={global_batch_size}, the images "
            "per half-batch over all devices that this run trains with (data.batch_size only caps a "
            f"device's forward pass): to train with {batch_size} per half-batch, set "
            f"data.global_batch_size={batch_size}"
        )


def check_class_embeddings(cfg: DictConfig) -> None:
    """The generator's class embeddings where the data give labels, none where they do not, and as many as
    the data's classes in each network (fewer: a label without one fails inside the network)."""
    gen = cfg.model.generator
    classes = cfg.data.get("num_classes")
    if gen.get("num_class_embeds") and not classes:
        raise ValueError(
            f"model.generator.num_class_embeds={gen.num_class_embeds}: a class-conditional network needs "
            "labels, but data.num_classes is null. Use a labelled data source or set num_class_embeds: null."
        )
    if classes and "num_class_embeds" in gen and not gen.get("num_class_embeds"):
        raise ValueError(
            f"data.num_classes={classes} gives every image a label, but model.generator.num_class_embeds is "
            f"null: the generator would never see them. Set model.generator.num_class_embeds={classes} for a "
            "class-conditional generator, or data.num_classes=null to train unconditionally."
        )
    unet = gen.get("unet")  # a converted diffusers model's backbone (init_from): unconditional
    if classes and OmegaConf.is_dict(unet) and not unet.get("num_class_embeds"):
        raise ValueError(
            f"data.num_classes={classes} gives every image a label, but model.generator is a converted "
            f"unconditional model (init_from={cfg.get('init_from')}), which never sees them: its samples "
            "would be labelled with classes it did not draw. Set data.num_classes=null to tune it "
            "unconditionally."
        )
    for name in ("generator", "discriminator"):
        embeds = (cfg.model.get(name) or {}).get("num_class_embeds")
        if classes and embeds and embeds < classes:
            raise ValueError(
                f"model.{name}.num_class_embeds={embeds} is fewer than data.num_classes={classes}: labels "
                f"{embeds}..{classes - 1} would have no embedding. Set "
                f"model.{name}.num_class_embeds={classes}"
            )


PRECISIONS = ("32-true", "32", 32, "16-mixed", "bf16-mixed")  # the weights and optimiser states float32


def check_precision(precision: object) -> None:
    """Lightning's precisions that train here: float32, or float32 weights under fp16 or bf16 autocast.
    The half and 64-bit `-true` ones cast the weights, which the float32 noise and preconditioning do not
    match (a dtype error at the first pass, after the run started)."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"trainer.precision={precision}: this library trains in 32-true (the default), 16-mixed or "
            "bf16-mixed (float32 weights under autocast; on a CPU Lightning runs 16-mixed as bf16-mixed)"
        )


def check_run_length(trainer) -> None:
    """Lightning's own run lengths stay unbounded: the module stops the trainer at `iterations` (its steps
    are two per iteration, its epochs the data's), and a stop of Lightning's would end the run without the
    final evaluation, as finished, leaving a run no relaunch continues."""
    for key, unbounded, instead in (
        ("max_steps", (-1, None), "iterations=N (ACT iterations; Lightning counts two steps each)"),
        ("max_epochs", (-1, None), "iterations=N"),
        ("max_time", (None,), "stop_after=N (iterations of this launch; the run continues when relaunched)"),
    ):
        value = trainer.get(key)
        if value not in unbounded:
            raise ValueError(f"trainer.{key}={value}: the run's length is not Lightning's; use {instead}")


def check_two_step_tau(cfg: DictConfig) -> None:
    """`two_step_tau`, the 2-step sampler's second noise level: a number between the schedule's sigma_min
    and sigma_max (the first step is at sigma_max)."""
    tau = cfg.get("two_step_tau")
    low, high = (OmegaConf.select(cfg, f"model.schedule.{k}") for k in ("sigma_min", "sigma_max"))
    if tau is None or low is None or high is None or not 0 < low < high:
        return  # an invalid schedule is refused by its own check, naming sigma_min and sigma_max
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not low < tau < high:
        raise ValueError(
            f"two_step_tau={tau}: the 2-step sampler's second noise level must be a number between "
            f"model.schedule.sigma_min={low:g} and model.schedule.sigma_max={high:g}: set two_step_tau "
            "along with sigma_max"
        )


def run_name(cfg: DictConfig) -> str:
    """`<experiment>[<overrides>]`, e.g. `cifar10[model.schedule.gan_ratio=0.1,seed=1]`: tells sweep jobs
    apart."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().job.override_dirname
    except ValueError:  # composed without a Hydra run (tests, notebooks)
        overrides = ""
    return f"{cfg.experiment_name}[{overrides}]" if overrides else str(cfg.experiment_name)


class CheckpointIO(AtomicCheckpointIO):
    """Atomic checkpoint writes; a full disk is said as such, with the space the checkpoint needs."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        except Exception as err:
            if out_of_space(err):
                raise no_space_error(checkpoint, path) from None
            raise


# -- loggers -------------------------------------------------------------------------------------------


def build_loggers(cfg: DictConfig, resume_iteration: int | None, wandb_id: str | None = None) -> list:
    """The loggers of cfg.logger. A resumed run keeps metrics.csv's rows up to its checkpoint's iteration
    (and only those: rows of iterations after it are logged again) and continues its W&B run."""
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if logger_cfg is None:
            continue
        target = logger_cfg.get("_target_")
        if target and issubclass(hydra.utils.get_class(target), WandbLogger):
            offline = wandb_offline(logger_cfg)
            name = logger_cfg.get("name") or run_name(cfg)
            resume = {"id": wandb_id, "resume": "allow"} if wandb_id else {}
            wandb = hydra.utils.instantiate(logger_cfg, offline=offline, name=name, **resume)
            loggers.append(without_wandb_anonymous(wandb))
        elif "resume_step" in logger_cfg:
            loggers.append(hydra.utils.instantiate(logger_cfg, resume_step=resume_iteration))
        elif target and issubclass(hydra.utils.get_class(target), TensorBoardLogger) and resume_iteration:
            # TensorBoard's events of the iterations after the checkpoint (logged before a kill -9) are
            # dropped where this launch logs them again: each step once, as metrics.csv keeps them
            loggers.append(hydra.utils.instantiate(logger_cfg, purge_step=resume_iteration + 1))
        else:
            loggers.append(hydra.utils.instantiate(logger_cfg))
    return loggers


def finish_wandb(failed: bool) -> None:
    """Ends this job's W&B run, so the next job of a multirun starts its own (with its own name/config)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        try:
            wandb.finish(exit_code=1 if failed else 0)
        except Exception as err:  # noqa: BLE001 - its service gone (a scheduler's SIGTERM reaches it too)
            log.warning(
                "W&B's run did not finish cleanly (%s: %s): its last records may be missing from it",
                type(err).__name__,
                err,
            )


# -- a launch: every check and everything built before the first write; then training -----------------


@dataclass
class Launch:
    """A launch whose checks passed: where it starts, the run folder's lock (None on DDP ranks > 0) and
    what it built (None: the run is finished, nothing to do). Nothing is written into the folder yet."""

    start: StartPoint
    lock: RunLock | None
    parts: tuple | None


def build(cfg: DictConfig, start: StartPoint, resolved: dict) -> tuple:
    """Data, module (with the start's weights), callbacks and trainer of `cfg`, with its loggers; nothing
    started and nothing written (the loggers record the config when training starts)."""
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data)
    world = world_size(resolved["trainer"])
    if world is not None:  # a global batch these devices cannot share: refused before any process starts
        datamodule.batch_layout(world)
    datamodule.check_source()
    if world is not None:  # a set smaller than one global batch, where the source can count it cheaply
        datamodule.check_train_size(world)
    model: L.LightningModule = hydra.utils.instantiate(cfg.model)
    if start.init is not None:
        load_init(model, start.init)  # (said once they fit: a refusal is the launch's only word on them)
        log.info("init_from=%s: a new run from its generator weights", describe(start.init))
    if start.weights is not None:
        own = model.state_dict()
        model.load_state_dict({**own, **{k: v for k, v in start.weights.items() if k in own}})
        model.k = start.iteration
    model.run_config, model.run_history, model.wandb_id = resolved, list(start.history), start.wandb_id
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    # The checkpoint callback runs last at every iteration: its checkpoint holds what the others
    # (the evaluation's history, the best value) recorded at that iteration. The progress bar runs just
    # before it, so its read-out shows an evaluation of this iteration, the last one's too.
    callbacks.sort(key=lambda c: (isinstance(c, LastCheckpoint), isinstance(c, IterationProgressBar)))
    # and the stop signals are the checkpoint's from the start of training, before any other callback's
    callbacks.insert(0, TakeStopSignals(next(c for c in callbacks if isinstance(c, LastCheckpoint))))
    loggers = build_loggers(cfg, start.iteration if start.ckpt_path is not None else None, start.wandb_id)
    ignore_few_batches_warning()  # logging counts iterations across epochs (compat.FEW_BATCHES_WARNING)
    ignore_lightning_leafspec_warning()  # torch's deprecation, raised by Lightning's loop every iteration
    quiet_litlogger_tip()  # an advertisement at every Trainer's start (compat.LITLOGGER_TIP)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[CheckpointIO()]
    )
    return datamodule, model, callbacks, trainer


def prepare(cfg: DictConfig) -> Launch:
    """Every check of a launch, before anything is written into its run folder: the configuration, the
    folder not in use by a live run, the checkpoint to start from and that this config may continue it,
    the checkpoint folder, the global batch on these devices, the data and the pretrained weights."""
    # first: a converted model's file sets model.generator; not needed (nor read) when the run resumes
    # from its own checkpoint and the file has gone since the run started from it
    init = None if _init_gone_on_resume(cfg) else read_init(cfg)
    check_config(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_local_multirun(resolved["trainer"])
    check_sweep(cfg)
    check_torchrun_names_its_run_folder()
    check_torchrun_world_size(resolved["trainer"])
    lock = RunLock(Path(cfg.run_dir)) if rank_zero_only.rank == 0 and is_first_process() else None
    try:
        start = start_point(cfg, resolved, init)
        # a run at its end is finished, unless a stop left its last evaluation to this launch
        if start.iteration >= cfg.iterations and not (start.evaluation_left and cfg.get("eval") is not None):
            if start.evaluation_left:
                left = start.iteration
                log.warning("eval=null: the evaluation at iteration %d that a stop left is not made", left)
            return Launch(start, lock, None)
        check_writable_folder(Path(cfg.callbacks.checkpoint.dirpath), "callbacks.checkpoint.dirpath")
        apply_process_settings(cfg)
        L.seed_everything(cfg.seed, workers=True)
        return Launch(start, lock, build(cfg, start, resolved))
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def check_torchrun_names_its_run_folder() -> None:
    """Under torchrun every worker starts the command itself, and Hydra names the run folder from each
    worker's clock: workers a second apart made two folders (one left empty) and logged each other's. The
    folder must be named (`hydra.run.dir=`), as the README's torchrun command does."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if "TORCHELASTIC_RUN_ID" not in os.environ or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    named = any(o.split("=", 1)[0].lstrip("+") == "hydra.run.dir" for o in hydra_cfg.overrides.hydra)
    if hydra_cfg.mode == RunMode.RUN and not named:
        raise ValueError(
            "torchrun starts every worker with this command, and each would name the run folder from its own "
            "clock: give it with hydra.run.dir=FOLDER (README: torchrun)"
        )


def check_torchrun_world_size(trainer: dict) -> None:
    """Under torchrun the devices and nodes must make its world size: with trainer.devices=1 (debug=smoke
    sets it) Lightning trains on one device in each worker, and every worker trained a run of its own into
    the same folder, each overwriting the others' files; a larger count failed in each worker with
    Lightning's traceback."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or "WORLD_SIZE" not in os.environ:
        return
    devices, nodes = trainer.get("devices", "auto"), int(trainer.get("num_nodes") or 1)
    if str(devices) in ("auto", "-1"):  # Lightning's own choice, which it checks against the world size
        return
    count, world = world_size(trainer), int(os.environ["WORLD_SIZE"])  # devices x nodes, as Lightning counts
    if count is not None and count != world:
        raise ValueError(
            f"torchrun started {world} workers, and trainer.devices={devices} x trainer.num_nodes={nodes} "
            f"make {count}: each worker would train a run of its own into the same folder; give "
            f"trainer.devices and trainer.num_nodes that make {world} (README: torchrun)"
        )


def check_local_multirun(trainer: dict) -> None:
    """Lightning starts a node's other DDP ranks with this process's own command line (its private
    `_hydra_subprocess_cmd`). In a multirun launched here (`-m` with Hydra's basic or joblib launcher)
    that line holds `-m` and the whole sweep, so every rank would run the sweep again, in step with the
    first only by luck: refused. Under SLURM (hydra/launcher=submitit_slurm) SLURM starts every rank."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = str(job_launcher().get("_target_", ""))
    world = world_size(trainer)
    per_node = None if world is None else world // int(trainer.get("num_nodes", 1) or 1)
    starts_ranks = not any(way in str(trainer.get("strategy", "")) for way in ("spawn", "fork"))
    if "SlurmLauncher" in launcher or not starts_ranks or (per_node is not None and per_node < 2):
        return
    devices = trainer.get("devices")
    raise ValueError(
        f"a multirun (-m) launched here with trainer.devices={devices} on each node: Lightning starts the "
        "other DDP ranks with this command line, sweep and all, so each would run the whole sweep again. "
        "Launch each job on its own (without -m), sweep through SLURM (hydra/launcher=submitit_slurm), or "
        "use one device per job (trainer.devices=1)"
    )


def _init_gone_on_resume(cfg: DictConfig) -> bool:
    """The launch continues its run from the run's own last.ckpt (resume=auto), and `init_from` is not there
    to read: True when it names a file that has gone (the weights it gave are in that checkpoint). A run
    that started from a converted model gets that model's generator config from its history
    (`init_generator`), whether init_from is given again, gone, or left out: model.generator is as the file
    set it at the first launch. So does a launch from such a run's checkpoint (`ckpt_path`, a new run in
    another folder), which was refused as trained with another model.generator."""
    path, folder = cfg.get("init_from"), OmegaConf.select(cfg, "callbacks.checkpoint.dirpath")
    if folder is None or cfg.get("resume", "auto") != "auto" or (path and cfg.get("ckpt_path")):
        return False  # (both: read_init refuses them)
    if path and Path(path).expanduser().exists():
        return False  # read_init reads it (and sets model.generator from it)
    last = Path(folder) / "last.ckpt"
    if not last.is_file():
        last = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else last
        if not last.is_file():
            return False
    try:
        history = read_checkpoint(last, "resume=auto found", mmap=True).get("act_history") or [{}]
    except Exception:
        if path:
            raise
        return False  # a damaged checkpoint: resolve_resume says what to do about it
    started = history[0]
    generator = started.get("init_generator")
    if generator is not None and (not path or started.get("init_from") == str(path)):
        use_generator(cfg, generator)
        if not path:
            log.info(
                "the run started from init_from=%s, a converted model: model.generator is its architecture, "
                "from the run's history",
                started.get("init_from"),
            )
    if path:
        log.info(
            "init_from=%s is gone; the run resumes from its own checkpoint, which holds those weights", path
        )
    return bool(path)


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metric_summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def finished(cfg: DictConfig, start: StartPoint) -> dict[str, Any]:
    log.info(
        "%s is at iteration %d, and iterations=%d: the run is finished, nothing to do",
        start.ckpt_path or "the checkpoint",
        start.iteration,
        cfg.iterations,
    )
    best = (_read_summary(Path(cfg.run_dir)).get("best") or {}).get("value")
    return {
        "iteration": start.iteration,
        "run_dir": cfg.run_dir,
        "best": best,
        "finished": True,
        "metrics": {},
    }


def stopped_at_once(cfg: DictConfig, before_training: bool = False) -> str:
    """What a second Ctrl-C leaves, or one before training started (`before_training`: the data's
    download, the checks of the set-up, before the stop signals are taken): no checkpoint of its own; the
    last one written before, if any."""
    last = Path(cfg.callbacks.checkpoint.dirpath) / "last.ckpt"
    try:
        kept = f"{last} (iteration {checkpoint_iteration(read_checkpoint(last, 'last', mmap=True))})"
    except (OSError, ValueError, KeyError):
        kept = None
    then = f"the last one, {kept}, continues with resume=auto" if kept else "there is none from before"
    how = (
        "stopped by Ctrl-C before training started"
        if before_training
        else "stopped at once by a second Ctrl-C"
    )
    return f"{how}: no checkpoint was written for this stop; {then}"


def fit(cfg: DictConfig, launch: Launch) -> dict[str, Any]:
    """Trains the launch's run; returns a summary with the run's best metric (`best`), or exits non-zero
    when a signal stopped it (128 + the signal; 130 after a second Ctrl-C, which writes no checkpoint)."""
    datamodule, model, callbacks, trainer = launch.parts
    if launch.lock is not None:
        launch.lock.claim()
        # what a kill during an atomic write of metric_summary.json or metrics.csv left (the checkpoint
        # callback clears its own folder)
        for path in remove_stale_temporaries(cfg.run_dir):
            log.info("removed %s, left by a write that was interrupted", path)
        kept = set_aside_outputs(Path(cfg.run_dir)) if launch.start.ckpt_path is None else None
        if kept is not None:  # a new run, in a folder an earlier one wrote into without a checkpoint left
            log.warning(
                "the folder held an earlier run's outputs and no checkpoint to continue: moved to %s", kept
            )
    failed = True
    try:  # the loggers record the config as training starts (ACTModule.on_fit_start)
        with warnings.catch_warnings():  # for this run only: the next job of a multirun has its own modules
            ignore_frozen_modules_warning(model)  # LPIPS' network is frozen in eval mode (compat)
            trainer.fit(model, datamodule=datamodule, ckpt_path=launch.start.ckpt_path)
        failed = False
    except SystemExit as stop:  # Lightning ends a KeyboardInterrupt with sys.exit(1)
        if not isinstance(stop.__context__, KeyboardInterrupt):
            raise
        early = not next(c for c in callbacks if isinstance(c, LastCheckpoint)).took_signals
        print(f"\n[act] {stopped_at_once(cfg, before_training=early)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
    finally:
        finish_wandb(failed)

    summary = {
        "iteration": model.k,
        "run_dir": str(cfg.run_dir),
        "best": None,
        "finished": model.k >= cfg.iterations,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    for callback in callbacks:  # what each callback has to say about the run (the best metric, a stop)
        summary.update(callback.summary() if hasattr(callback, "summary") else {})
    if summary.get("stopped_by") is not None:
        next(c for c in callbacks if isinstance(c, LastCheckpoint)).requeue(trainer.is_global_zero)
        if trainer.world_size > 1:  # a rank's non-zero exit can end the job's other tasks (srun's
            trainer.strategy.barrier("act_requeued")  # KillOnBadExit): not before rank 0 has requeued
        raise SystemExit(128 + int(summary["stopped_by"]))  # the scheduler sees a job that did not finish
    return summary


def run(cfg: DictConfig, launch: Launch) -> dict[str, Any]:
    try:
        return finished(cfg, launch.start) if launch.parts is None else fit(cfg, launch)
    finally:
        if launch.lock is not None:
            launch.lock.release()


def failed(err: Exception, status: int = 1) -> NoReturn:
    """A launch refused by its checks (status 2), or a run that trained, then failed for a reason its
    message explains (DivergenceError; a disk that filled up during a save; status 1): the message in one
    line and that exit status (`refuse`; with HYDRA_FULL_ERROR=1 it raises the error). A job of a multirun
    logs that line and raises the error instead: a sweeper records that job as failed (Optuna:
    `hydra.sweeper.max_failure_rate`) and goes on or stops as it is told, where an exit would end the whole
    sweep at that job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        log.error("error: %s", refusal(err))  # the line `refuse` would print
        raise err
    log_to_record(log, f"error: {refusal(err)}")  # the launch's record says why, as a job's log does
    refuse(err, status=status)  # its one line (or, with HYDRA_FULL_ERROR=1, the error raised)


def explained(err: BaseException) -> bool:
    """A failure during training whose message says what happened and what to do."""
    return isinstance(err, DivergenceError) or (isinstance(err, OSError) and out_of_space(err))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Checks the launch and builds data, module, loggers, callbacks and trainer from `cfg` (`prepare`),
    then fits. Returns a summary with the run's best metric (`best`), or exits non-zero when a signal
    stopped it (a Ctrl-C during the set-up: 130, in one line)."""
    return run(cfg, prepared(cfg))


def prepared(cfg: DictConfig) -> Launch:
    """`prepare`, where a Ctrl-C (before the stop signals are taken: Python's KeyboardInterrupt, raised
    wherever the set-up was) ends the launch in one line with status 130, not in a traceback."""
    try:
        return prepare(cfg)
    except KeyboardInterrupt:
        print(f"\n[act] {stopped_at_once(cfg, before_training=True)}", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None


def where_to_look(run_dir: Path) -> str | None:
    """The line a run ends with after its folder's name: its best metric and the files that show it (the
    best checkpoint, the latest sample grid, the curve), those that are there; None without any."""
    record = _read_summary(run_dir)
    best = record.get("best")
    parts = []
    if best:
        metric = f"best {record.get('metric', 'metric')} {best['value']:.4g} at iteration {best['iteration']}"
        normalised = normalised_value(best["value"], record.get("references") or {})
        if normalised is not None:  # the quickstart's scale: held-out real 0, noise 1
            metric += f" (normalised {normalised:.2g})"
        parts.append(metric)
    files = ["checkpoints/best.ckpt", "samples/last.png", "fid_curve.png", "metric_summary.json"]
    present = [name for name in files if (run_dir / name).is_file()]
    if present:
        parts.append("see " + ", ".join(present))
    return "; ".join(parts) or None


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        launch = prepared(cfg)
    except Exception as err:  # refused by a check: nothing was written into the run folder
        failed(err, status=2)
    try:
        summary = run(cfg, launch)
    except (DataUnavailable, DataError) as err:  # found as Lightning prepares the data: download, checksum
        failed(err, status=2)
    except Exception as err:
        if not explained(err):
            raise
        failed(err)
    state = "finished" if summary["finished"] else "stopped"
    log.info("%s at iteration %d; outputs in %s", state, summary["iteration"], summary["run_dir"])
    said = where_to_look(Path(summary["run_dir"]))
    if said:
        log.info(said)
    return summary["best"]


if __name__ == "__main__":
    # Through the imported module, not this `__main__` copy: a parallel launcher (joblib) pickles the task
    # function, and a function of `__main__` would be pickled by value with everything it refers to.
    from act_lightning.train import main as _main

    _main()
