"""OmegaConf resolvers used by the configs in conf/ (registered when `act_lightning` is imported)."""

from __future__ import annotations

import os
import warnings
from datetime import datetime

from omegaconf import OmegaConf


def lazy_regularisation_beta2(beta2: float, r1_interval: int) -> float:
    """The discriminator's second-moment decay when R1 runs every `r1_interval` iterations.

    Lazy regularisation (StyleGAN2) takes a penalty step every `r1_interval` iterations, so the
    optimiser's averaging horizon is corrected by c = interval / (interval + 1). The ACT reference writes
    this as beta2 * c (0.99 * 16/17, with its interval of 16 hard-coded); StyleGAN2 uses beta2 ** c. We
    keep the reference's form, derived from the configured interval.
    """
    return float(beta2) * int(r1_interval) / (int(r1_interval) + 1)


LAUNCH_ENV = "ACT_LAUNCH"  # <launch name>@<pid of the launching process>, inherited by its DDP processes


def launch_name() -> str:
    """`${act.launch:}`: this launch's name, `<date>_<time>_<microseconds>` when it started, the folder of
    its record under the run folder's `.hydra/launches/` (act_lightning.launch). A process started by the
    launching one (Lightning's DDP processes) shares its name; any other process gets its own."""
    name, _, pid = os.environ.get(LAUNCH_ENV, "").rpartition("@")
    if name and pid in (str(os.getpid()), str(os.getppid())):
        return name
    name = datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    os.environ[LAUNCH_ENV] = f"{name}@{os.getpid()}"
    return name


RANKS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order (fabric's rank_zero)


def started_beside_the_launch() -> bool:
    """This process is one of a run's processes other than rank 0 that something besides the launch
    started, each with its own copy of the command: a SLURM task (submitit's, srun's), a torchrun worker,
    the processes of a node other than the first (NODE_RANK). The DDP processes the launch starts itself
    (Lightning's, which inherit its name) are not: `started_by_the_launch`."""
    return not _started_by_launching_process() and _other_rank()


def started_by_the_launch() -> bool:
    """This process is one of a run's processes other than rank 0 that the launch started itself
    (Lightning's DDP processes, which inherit its name): it shares the launch's console and record."""
    return _started_by_launching_process() and _other_rank()


def _started_by_launching_process() -> bool:
    name, _, pid = os.environ.get(LAUNCH_ENV, "").rpartition("@")
    return bool(name) and pid == str(os.getppid())


def is_first_process() -> bool:
    """This process is a run's global rank 0 by the environment (RANK, LOCAL_RANK, SLURM_PROCID, ... and
    NODE_RANK, which Lightning's rank_zero_only does not read: the first process of a second node set up
    by NODE_RANK alone took the run folder's lock as rank 0 too)."""
    return not _other_rank()


def _other_rank() -> bool:
    rank = next((os.environ[key] for key in RANKS if key in os.environ), "0")
    return _positive(rank) or _positive(os.environ.get("NODE_RANK", "0"))


def _positive(value: str) -> bool:
    return value.strip().isdigit() and int(value) > 0


def launch_record() -> str | None:
    """`${act.launch_record:}`: the launch's record folder in the run folder, `.hydra/launches/<name>`
    (Hydra's `output_subdir`); null in a process `started_beside_the_launch`, so that a launch keeps one
    record, its rank 0's, however many SLURM tasks or torchrun workers run it."""
    return None if started_beside_the_launch() else f".hydra/launches/{launch_name()}"


def launch_log(output_dir: str, job_name: str) -> str:
    """`${act.launch_log:OUTPUT_DIR,JOB_NAME}`: the launch's log file in its record folder; the null device
    in a process `started_beside_the_launch`, which logs to its console only (submitit keeps each task's
    under the sweep's `.submitit/`)."""
    record = launch_record()
    return os.devnull if record is None else f"{output_dir}/{record}/{job_name}.log"


def in_folder(folder: str | None, name: str) -> str | None:
    """`${act.in_folder:FOLDER,NAME}`: FOLDER/NAME, or null when there is no folder (data without files,
    such as data=synthetic, have nothing to cache beside them)."""
    return None if folder is None else f"{folder}/{name}"


def study_seed(seed: int, storage: str | None, study_name: str) -> int:
    """The Optuna sampler's seed of a session: the run's seed, plus the trials the study already holds in
    `storage`. A study continued in a later multirun drew the very trials of its first session again (the
    sampler seeded alike proposes the same startup points); this way each session draws new ones, and a
    session is still reproduced from the same storage."""
    if not storage:
        return int(seed)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        held = {s.study_name: s.n_trials for s in optuna.study.get_all_study_summaries(storage=storage)}
    except Exception:  # noqa: BLE001 - a storage not yet created (or unreadable): the sweeper says so
        held = {}
    return int(seed) + int(held.get(study_name, 0))


def register_resolvers() -> None:
    resolvers = (
        ("act.lazy_beta2", lazy_regularisation_beta2),
        ("act.launch", launch_name),
        ("act.launch_record", launch_record),
        ("act.launch_log", launch_log),
        ("act.in_folder", in_folder),
        ("act.study_seed", study_seed),
    )
    for name, resolver in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


# conf/hydra/launcher/submitit_slurm.yaml gives hydra-submitit-launcher's `submitit_slurm` our defaults under
# the same name, so `hydra/launcher=submitit_slurm` picks them; Hydra 1.3 validates such a file against the
# plugin's schema (which is what we want) but warns that it does so on every run.
warnings.filterwarnings(
    "ignore", message=r"\s*'hydra/launcher/submitit_slurm' is validated against ConfigStore"
)
