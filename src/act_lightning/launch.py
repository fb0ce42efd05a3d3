"""A launch into a run folder: its own record, and no write before its checks pass.

A run folder belongs to the run: its checkpoints, metrics, samples and logs. Every launch into it (the
first, a resume, a requeue, a launch refused because the folder is in use, finished or holds another
experiment) keeps its Hydra record apart, under `.hydra/launches/<date>_<time>_<microseconds>/`
(config.yaml, hydra.yaml, overrides.yaml and the launch's log, train.log), so no launch rewrites the
record of another. The run's own config is the one its checkpoint holds (`act_config`), with the launches
that trained it (`act_history`). The processes a launch starts for DDP log into the same folder (and
print only their warnings and errors to its console: `RankZeroConsole`); those of
other ranks that something besides the launch starts, each with its own copy of the command (SLURM's
tasks, torchrun's workers), keep no record and log to their console only, so a launch has one record
however many processes run it (`act_lightning.resolvers.launch_record`).

`CheckRunFolder`, a Hydra callback, refuses a run folder that cannot be written before Hydra writes the
record or opens the log (Hydra's own message would be "Unable to configure handler 'file'").
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from act_lightning.resolvers import started_by_the_launch


def check_writable_folder(folder: Path, key: str) -> None:
    """The folder exists and takes files, or its nearest existing ancestor does (nothing is created)."""
    probe = Path(folder).expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"{key}={folder}: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise PermissionError(
            f"{key}={folder}: cannot write into {probe} ({err.strerror}): choose a folder you can write, "
            f"or make {probe} writable"
        ) from None


SLURM_COUNTS = ("nodes", "tasks_per_node", "gpus_per_node")  # hydra.launcher's, numbers in its schema


def slurm_launcher(config: DictConfig) -> DictConfig | None:
    """The multirun's launcher config when it is submitit's SLURM launcher, else None."""
    launcher = OmegaConf.select(config, "hydra.launcher")
    if launcher is None or "SlurmLauncher" not in str(launcher.get("_target_", "")):
        return None
    return launcher


def check_slurm_here(config: DictConfig) -> None:
    """A SLURM multirun is submitted with SLURM's `sbatch`: without it (a machine off the cluster) submitit
    failed after Hydra made the sweep folder, in a traceback ('Could not detect "srun"')."""
    if slurm_launcher(config) is not None and shutil.which("sbatch") is None:
        raise ValueError(
            "hydra/launcher=submitit_slurm submits its jobs with SLURM's sbatch, which this machine does not "
            "have: launch it from a login node of a SLURM cluster (Hydra's basic launcher, the default, runs "
            "a sweep's jobs here one after another)"
        )


def check_slurm_counts(config: DictConfig) -> None:
    """The SLURM launcher's node, task and GPU counts that repeat another key are numbers (ValueError
    naming that key, `trainer.devices` or `trainer.num_nodes` in the shipped config, otherwise). Hydra
    builds the launcher before any job and would refuse `trainer.devices=auto` (the ddp trainer's
    default) with an interpolation error deep in a traceback."""
    launcher = slurm_launcher(config)
    if launcher is None:
        return
    # read unresolved: the launcher's schema would refuse a value that is no number as it resolves it (a
    # value set on the command line it checks as Hydra composes: only interpolations are left)
    unresolved = OmegaConf.to_container(launcher, resolve=False)
    swept, fixed = multirun_keys(config)
    # a swept config group (experiment=a,b, trainer=x,y) may set the counts per job: they must then be
    # fixed on the command line, whose values win over the groups'
    choices = OmegaConf.select(config, "hydra.runtime.choices", default=None) or {}
    groups = {k: v for k, v in swept.items() if k in choices}
    for field in SLURM_COUNTS:
        raw = unresolved.get(field)  # "${trainer.devices}" in the shipped config
        source = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
        if source is None:
            continue
        key = source.group(1)
        if key in swept:  # the launcher resolves its counts once and submits every job with them
            raise ValueError(
                f"{key}={swept[key]} is swept, but a SLURM multirun asks for one allocation for all its "
                f"jobs (hydra.launcher.{field} repeats {key}): set {key} on the command line, or launch one "
                f"multirun per value of {key}"
            )
        if groups and key not in fixed:
            group, values = next(iter(groups.items()))
            raise ValueError(
                f"{group}={values} is swept and may set {key} per job, but a SLURM multirun asks for one "
                f"allocation for all its jobs (hydra.launcher.{field} repeats {key}): set {key} on the "
                f"command line (it wins over the config groups), or launch one multirun per value of {group}"
            )
        value = OmegaConf.select(config, key, default=None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            continue
        if isinstance(value, str) and value.isdigit() and int(value) > 0:
            continue
        raise ValueError(
            f"{key}={value}: a SLURM launch (hydra/launcher=submitit_slurm) asks for a number of "
            f"{'nodes' if field == 'nodes' else 'GPUs and tasks per node'}, so set {key} to one "
            f"(e.g. {key}={2 if field == 'nodes' else 8})"
        )


def multirun_keys(config: DictConfig) -> tuple[dict[str, str], set[str]]:
    """The keys (and config groups) a multirun sweeps (`trainer.devices=4,8`, `range(...)`, ...), with their
    values as typed, and those the command line sets to one value. The sweeps are the command line's and
    every key of the sweeper's `hydra.sweeper.params` (Hydra's basic sweeper and Optuna's), even one
    given one value: the jobs get it, but not the multirun's own config, from which Hydra builds the
    launcher. A multirun's own config holds neither."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    task = list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
    parsed = list(zip(parser.parse_overrides(task), task))
    swept = {o.key_or_group: text.split("=", 1)[1] for o, text in parsed if o.is_sweep_override()}
    fixed = {o.key_or_group for o, _ in parsed if not o.is_sweep_override()}
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None)
    params = OmegaConf.to_container(params, resolve=False) if isinstance(params, DictConfig) else {}
    for key, value in params.items():
        try:
            key = parser.parse_override(f"{key}={value}").key_or_group  # (+key, ++key: key)
        except HydraException:  # a form only the sweeper reads
            key = key.lstrip("+")
        if key not in fixed:  # the command line's value wins over the sweeper's
            swept.setdefault(key, str(value))
    return swept, fixed


class RankZeroConsole(logging.Filter):
    """Hydra's console handler (`hydra.job_logging.filters`): in the DDP processes a launch starts itself
    (Lightning's, rank > 0; `resolvers.started_by_the_launch`), which print to rank 0's console, only
    warnings and errors pass, so that each of rank 0's lines ("launched with ...", "finished at ...") is
    not printed once per process. Every line of theirs is in their own log beside the launch's
    (`train_ddp_process_<rank>.log`)."""

    def __init__(self) -> None:
        super().__init__()
        self.quiet = started_by_the_launch()

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.quiet or record.levelno >= logging.WARNING


def rank_zero_warning(logger: logging.Logger, message: str, *args: Any) -> None:
    """A warning that every process of a run would give alike (about the config, not about the process):
    logged by global rank 0 only. RankZeroConsole lets the other DDP processes' warnings through to rank
    0's console, where it would otherwise appear once per process."""
    from lightning.pytorch.utilities import rank_zero_only  # here: importing this module loads no Lightning

    if rank_zero_only.rank == 0:
        logger.warning(message, *args)


class LaunchLog(logging.FileHandler):
    """Hydra's job log (`hydra.job_logging.handlers.file`) in the launch's record folder, created first."""

    def __init__(self, filename: str, **kwargs: Any) -> None:
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename, **kwargs)


def log_to_record(logger: logging.Logger, message: str) -> None:
    """`message` as an error of `logger` in the launch's log file (`LaunchLog`) only, not on the console
    (where the command says it itself): a refused launch's record says why."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LaunchLog):
            handler.handle(record)


class CheckRunFolder(Callback):
    """Refuses, in one line and before Hydra writes anything, a run (or sweep) folder that cannot be
    written."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")
        try:
            check_slurm_counts(config)
            check_slurm_here(config)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    @staticmethod
    def _check(config: DictConfig, key: str) -> None:
        try:
            check_writable_folder(Path(str(OmegaConf.select(config, key))), key)
        except OSError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
