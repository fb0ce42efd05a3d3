"""Process-wide settings a run makes before anything is built: CPU threads (also for the jobs of Hydra's
joblib launcher, which share one machine), TF32, inductor's cache folder, and Dynamo's caches emptied for
a compiled run. Under DDP every process applies them (`act_lightning.train.prepare`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from act_lightning.launch import check_writable_folder


def apply_process_settings(cfg: DictConfig) -> None:
    """`threads` (intra-op CPU threads of this process) and `tf32` (TF32 matmuls and convolutions on GPUs
    that have them), set before anything is built. Under DDP every process runs this.

    threads=auto leaves the choice to Lightning and PyTorch, which give each process the usable cores
    divided by the processes per node (or $OMP_NUM_THREADS when it is set), except in a job of Hydra's
    joblib launcher, which runs its jobs side by side on this machine: there each job gets its share of
    the cores (`threads_beside_other_jobs`). An integer is set here and exported, so the processes
    Lightning starts for DDP use it too. Several runs sharing one machine need it: two runs with two
    threads each on two cores run far slower together than two with one thread each
    (docs/performance.md)."""
    threads = cfg.get("threads", "auto")
    if threads == "auto":
        threads = threads_beside_other_jobs() or "auto"
    if threads != "auto":
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be auto or a positive integer, got {threads!r}")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
    tf32 = cfg.get("tf32", True)
    if not isinstance(tf32, bool):  # 'off' would count as true
        raise ValueError(f"tf32 must be true or false; got {tf32!r}")
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    use_compile_cache(cfg.get("compile_cache"))
    if OmegaConf.select(cfg, "model.speed.compile", default=False):
        # The jobs of a multirun share one process (Hydra's basic launcher): Dynamo's caches would carry
        # each job's graphs into the next, where networks of other settings add theirs until, past
        # torch._dynamo.config.recompile_limit (8 per function), a network runs eagerly, silently but for
        # a warning; CUDA graph trees would keep the last job's memory pools. Each compiled run starts
        # afresh, as a job of its own process would (inductor's cache on disk spares the code generation).
        torch._dynamo.reset()


def job_launcher() -> DictConfig | None:
    """The launcher config (`hydra.launcher`) of the Hydra job this process runs; None outside one
    (`train(cfg)` called from Python: a notebook, a test)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().launcher if HydraConfig.initialized() else None


def threads_beside_other_jobs() -> int | None:
    """threads=auto in a job of Hydra's joblib launcher (hydra/launcher=joblib, two_local_jobs): the usable
    cores divided by its n_jobs, the jobs it runs at a time (joblib's negative counts: all cores but
    -1 - n_jobs), at least one each; None in any other process, and where $OMP_NUM_THREADS is set (it is
    the count then, as it is for Lightning). A launch that runs fewer jobs than n_jobs leaves cores idle;
    threads=N sets the count."""
    launcher = job_launcher()
    if launcher is None or os.environ.get("OMP_NUM_THREADS"):
        return None
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = launcher.get("n_jobs") or 1
    if jobs < 0:
        jobs = max(1, cores + 1 + jobs)
    return max(1, cores // jobs)


def use_compile_cache(folder) -> None:
    """`compile_cache`: where inductor keeps what it compiled (graphs, Triton kernels), exported so that
    DDP's processes use it too. null: torch's default, a folder under the machine's temporary directory.
    A folder that outlives the job (shared by the nodes of a cluster) lets a resumed or requeued run, and
    every job of a sweep, find inductor's code generation done: most of a compile that takes minutes on
    a GPU (tracing the networks still runs; docs/performance.md)."""
    if folder is None:
        return
    path = Path(str(folder)).expanduser().absolute()
    check_writable_folder(path, "compile_cache")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # the Triton kernels go under it, in triton/
