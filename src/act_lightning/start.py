"""Where a launch starts: the checkpoint it continues from (`resolve_resume`: the run folder's own
last.ckpt with resume=auto, else `ckpt_path`, else a fresh start), that checkpoint compared with the
launch's config (act_lightning.resume), the run's history with this launch appended (`StartPoint`), and
the run folder's lock (`RunLock`), which keeps a second live launch out of the folder."""

from __future__ import annotations

import fcntl
import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from act_lightning.checkpoints import (
    UnreadableCheckpoint,
    checkpoint_iteration,
    read_checkpoint,
    reference_start,
    run_start,
)
from act_lightning.environment import describe as describe_environment
from act_lightning.environment import environment
from act_lightning.init_from import InitWeights
from act_lightning.launch import rank_zero_warning
from act_lightning.resume import check_resume, global_batch, world_size

log = logging.getLogger(__name__)


def another_folder() -> str:
    """How a user names another run folder: hydra.run.dir, or in a multirun (whose job folders are
    hydra.sweep.dir/<job>, and where hydra.run.dir is not read) another hydra.sweep.dir."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return "another hydra.sweep.dir (each job's folder is in it)" if multirun else "another hydra.run.dir"


def resolve_resume(cfg: DictConfig) -> tuple[Path | None, dict | None]:
    """The checkpoint this run starts from, and its contents (None, None for a fresh start).

    resume=auto: the run folder's own `checkpoints/last.ckpt` when there is one (a requeued or resumed
    job; a `ckpt_path` is then not read), else `ckpt_path`, else a fresh start. A folder that holds other
    checkpoints but no last.ckpt continues from the newest of them (`newest_checkpoint`), or from the one
    `ckpt_path` names among them: a fresh start, or another run's checkpoint, would overwrite its
    best.ckpt, snapshots and metrics.csv. resume=never: a run folder that holds any checkpoint is
    refused."""
    folder = Path(cfg.callbacks.checkpoint.dirpath)
    own, held = folder / "last.ckpt", held_checkpoints(folder)
    if held and cfg.get("resume", "auto") == "never":
        raise FileExistsError(
            f"the run folder {cfg.run_dir} already holds checkpoints ({', '.join(held)} in {folder}); pass "
            f"resume=auto to continue that run or choose {another_folder()}"
        )
    if own.is_file():
        try:
            checkpoint = read_checkpoint(
                own, "resume=auto found", mmap=True, check=checkpoint_iteration, checksums=True
            )
        except UnreadableCheckpoint as err:
            message = f"resume=auto continues from {own}, which is {err.reason}. {damaged_last_advice(own)}"
            raise UnreadableCheckpoint(message, err.reason) from None
        say_unread_ckpt_path(cfg, own, checkpoint)
        return own, checkpoint
    path = Path(cfg.ckpt_path) if cfg.get("ckpt_path") else None
    if path is not None and (not held or path.resolve().parent == folder.resolve()):
        return path, read_checkpoint(path, "ckpt_path", mmap=True, check=checkpoint_iteration, checksums=True)
    if held:
        path, checkpoint = newest_checkpoint(folder, held)
        log.warning(
            "%s holds no last.ckpt (a launch killed before its first one, or one moved aside): the run "
            "continues from its newest checkpoint, %s (iteration %d); ckpt_path=CHECKPOINT names another",
            folder,
            path.name,
            checkpoint_iteration(checkpoint),
        )
        say_unread_ckpt_path(cfg, path, checkpoint)
        return path, checkpoint
    return None, None


def newest_checkpoint(folder: Path, held: list[str]) -> tuple[Path, dict]:
    """The checkpoint of the highest iteration among a run folder's `held` ones, and its contents: where a
    folder without last.ckpt continues. That is a launch killed (kill -9, the out-of-memory killer, a
    joblib sweep's Ctrl-C) after its first best.ckpt and before its first last.ckpt, or a run whose
    damaged last.ckpt was moved aside. Every one of them holds the full training state, put in place
    after the metrics rows up to its iteration, so the run continues from it exactly. One that cannot be
    read is named: it is moved aside, or another is named with ckpt_path."""
    found = []
    for name in held:
        try:
            checkpoint = read_checkpoint(
                folder / name, "resume=auto found", mmap=True, check=checkpoint_iteration
            )
        except UnreadableCheckpoint as err:
            message = (
                f"{folder} holds no last.ckpt, and resume=auto continues from the newest of its checkpoints "
                f"({', '.join(held)}); {name} is {err.reason}. Move it aside, or name the checkpoint to "
                "continue from with ckpt_path=CHECKPOINT"
            )
            raise UnreadableCheckpoint(message, err.reason) from None
        found.append((checkpoint_iteration(checkpoint), name))
    _, name = max(found)
    path = folder / name  # read again with its checksums, which only the one a run resumes from needs
    return path, read_checkpoint(
        path, "resume=auto found", mmap=True, check=checkpoint_iteration, checksums=True
    )


def held_checkpoints(folder: Path) -> list[str]:
    """The checkpoints (`*.ckpt`, not a save's temporaries) a run folder's checkpoint folder holds."""
    return sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []


def say_unread_ckpt_path(cfg: DictConfig, own: Path, checkpoint: dict) -> None:
    """A `ckpt_path` given to a folder that has its own last.ckpt is not read: said at info level when it
    is where the run started (a requeued job keeps its command line), as a warning otherwise."""
    if not cfg.get("ckpt_path") or Path(cfg.ckpt_path).resolve() == own.resolve():
        return
    started = [
        o for o in run_start(checkpoint.get("act_history")).get("overrides", ()) if o.startswith("ckpt_path=")
    ]
    same = started and Path(started[-1].split("=", 1)[1]).resolve() == Path(cfg.ckpt_path).resolve()
    (log.info if same else log.warning)(
        "resume=auto continues this run from its own %s; ckpt_path=%s is not read%s",
        own,
        cfg.ckpt_path,
        " (the run started from it)" if same else f" (a new run from it needs {another_folder()})",
    )


# What a run writes into its folder besides its checkpoints and launch records (the loggers' files, the
# evaluation's summary and curve, the sample grids)
RUN_OUTPUTS = (
    "metrics.csv",
    "metric_summary.json",
    "fid_curve.png",
    "hparams.yaml",
    "samples",
    "tensorboard",
)


def set_aside_outputs(run_dir: Path) -> Path | None:
    """A new run in a folder that holds an earlier run's outputs but no checkpoint to continue (deleted,
    or a crash before the first save): those outputs are moved into `replaced/<date>_<time>-<us>/`, where the
    new run would overwrite some and leave others (the sample grids of later iterations, TensorBoard's
    events) mixed with its own. Returns that folder, or None when there was nothing to move."""
    found = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not found:
        return None
    kept = run_dir / "replaced" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    kept.mkdir(parents=True)
    for path in found:
        os.replace(path, kept / path.name)
    return kept


def damaged_last_advice(last: Path) -> str:
    """What to do when the run's own last.ckpt cannot be read (resume=auto always prefers it)."""
    others = [name for name in held_checkpoints(last.parent) if name != last.name]
    if not others:
        return (
            "Move it aside (this run has no other checkpoint) and start afresh with "
            "hydra.run.dir=NEW_FOLDER resume=never"
        )
    return (
        f"Move it aside: resume=auto then continues from the newest of this run's other checkpoints "
        f"({', '.join(others)}), or from the one ckpt_path=CHECKPOINT names among them; or start afresh "
        "with hydra.run.dir=NEW_FOLDER resume=never"
    )


class RunLock:
    """An exclusive lock on `<run_dir>/.lock` held while a launch checks and trains: a second launch into
    the same folder is refused instead of interleaving its checkpoints and metrics with the first. The
    operating system releases it when the process ends, however it ends (kill -9 included). Taking it
    writes nothing into an existing lock file; `claim` writes this process's id once training starts."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(self.fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise RuntimeError(
                f"the run folder {run_dir} is in use by another live run (process {owner}); wait for it or "
                f"choose {another_folder()}"
            ) from None

    def claim(self) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def launch_overrides() -> list[str]:
    """This launch's command-line overrides ([] when composed without a Hydra run: tests, notebooks)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: the checkpoint Lightning restores (None: a fresh start, or weights only), the
    iteration, the W&B run to continue, from a weights-only checkpoint the weights, and the run's history
    (the launches that trained it, this one last; kept in every checkpoint as `act_history`)."""

    ckpt_path: Path | None = None
    iteration: int = 0
    wandb_id: str | None = None
    weights: dict | None = None
    history: tuple[dict, ...] = ()
    init: InitWeights | None = None  # init_from's generator weights (a fresh start only)
    evaluation_left: bool = False  # the checkpoint's own iteration is still to be evaluated (a stop left it)


def tunes_a_diffusion_model(cfg: DictConfig) -> bool:
    """ECT's curriculum, which tunes a diffusion model (model.curriculum or model.schedule.curriculum)."""
    curriculum = cfg.model.get("curriculum") or OmegaConf.select(cfg, "model.schedule.curriculum")
    return curriculum == "ect" and cfg.model.get("objective", "consistency") == "consistency"


def start_point(cfg: DictConfig, resolved: dict, init: InitWeights | None = None) -> StartPoint:
    """The run's start (see `resolve_resume`), after the launch's config (`resolved`) is compared with the
    checkpoint's (act_lightning.resume). A weights-only checkpoint (act_lightning.convert_reference) holds
    networks but no optimiser or loop state: the run starts from its weights with new optimisers."""
    ckpt_path, checkpoint = resolve_resume(cfg)
    raw = OmegaConf.to_container(cfg, resolve=False)
    world = world_size(resolved["trainer"])
    entry = {
        "iteration": 0,
        "launched": datetime.now().isoformat(timespec="seconds"),
        "overrides": launch_overrides(),
        "changes": {},
        "world_size": world,
        "global_batch": global_batch(resolved, world),
        "environment": environment(),
    }
    log.info("launched with %s", describe_environment(entry["environment"]))
    if checkpoint is None:
        entry["new_run"] = True
        if init is not None:
            entry["init_from"] = init.path
            if init.generator is not None:  # a converted model's architecture: a resume may need it
                entry["init_generator"] = init.generator
            if init.converted_from is not None:  # the model it came from, once the file is gone
                entry["init_converted_from"] = init.converted_from
        elif tunes_a_diffusion_model(cfg):
            rank_zero_warning(
                log,
                "ECT's curriculum (model.curriculum=ect) without init_from: ECT tunes a pretrained diffusion "
                "model (Geng et al. 2024), and this run starts from random weights; pass init_from=<a "
                "diffusion run's last.ckpt or a converted DDPM> (README: Start from a diffusion model)",
            )
        return StartPoint(history=(entry,), init=init)
    iteration = checkpoint_iteration(checkpoint)
    # resolved both: a relative ckpt_path to the run's own snapshot (a roll-back) was taken for a new run
    own = ckpt_path.resolve().parent == Path(cfg.callbacks.checkpoint.dirpath).resolve()
    wandb_id = checkpoint.get("act_wandb_id") if own else None  # a new run is a W&B run of its own
    where = f"{'resume=auto found ' if own else 'ckpt_path='}{ckpt_path} (iteration {iteration})"
    fresh = f"start a new run in {another_folder()}" if own else "start a new run without ckpt_path"
    changes = check_resume(checkpoint, resolved, raw, where, fresh, entry["overrides"])
    entry.update(iteration=iteration, changes=changes)
    if not own:  # a new run from another run's checkpoint: its history comes first, this launch starts it
        entry["new_run"] = True
    say_unread_init(checkpoint, init if own else None)
    left = evaluation_left(checkpoint, iteration)  # (Lightning reads the file again to restore it)
    say_changes(changes, iteration, finished=iteration >= cfg.iterations and not left)
    history = (*checkpoint.get("act_history", ()), entry)
    if checkpoint.get("act_weights_only"):
        log.info("%s holds weights only: training starts from them with new optimiser state", ckpt_path)
        released = reference_start(checkpoint)
        if released is not None:  # one of the paper's checkpoints: what trained it stays in the history
            entry["started_from"] = released
        return StartPoint(None, iteration, wandb_id, checkpoint["state_dict"], history)
    return StartPoint(ckpt_path, iteration, wandb_id, None, history, evaluation_left=left)


def say_changes(changes: dict, iteration: int, finished: bool) -> None:
    """What becomes of the changes `resume_changes` allowed: kept in the run's history, or, for a run
    finished at its checkpoint, nothing (no iteration is trained with them)."""
    if changes and finished:
        log.info(
            "resume_changes %s: the run is finished at iteration %d; nothing is trained or kept",
            changes,
            iteration,
        )
    elif changes:
        rank_zero_warning(
            log, "resume_changes at iteration %d (kept in the run's history): %s", iteration, changes
        )


def say_unread_init(checkpoint: dict, init: InitWeights | None) -> None:
    """A continuation reads no `init_from`: a warning when it names another file than the one the run
    started from (the run goes on from its own checkpoint; the file was taken for the new weights)."""
    started = (checkpoint.get("act_history") or [{}])[0].get("init_from")
    same = started is not None and init is not None and Path(started).resolve() == Path(init.path).resolve()
    if init is not None and not same:  # (the same file given as another relative path: nothing to say)
        rank_zero_warning(
            log,
            "init_from=%s is not read: the run continues from its own checkpoint (it started from %s); "
            f"a new run from that file needs {another_folder()}",
            init.path,
            started,
        )


def evaluation_left(checkpoint: dict, iteration: int) -> bool:
    """Whether a checkpoint holds an evaluation of its own iteration that a stop left to the run's
    continuation (FrechetEvaluation's `deferred`): at the run's last iteration, that evaluation is all
    there is left to do."""
    states = (checkpoint.get("callbacks") or {}).values()
    return any(isinstance(state, dict) and state.get("deferred") == iteration for state in states)
