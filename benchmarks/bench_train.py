"""Training speed against the baseline: ACT iterations per second of each configuration with the
library's defaults and with `perf=baseline` (the reference code's straightforward path: float32 eager, TF32
off, Python loops for the EMA and the optimisers, every logged value read off the device, augmentation
run at p = 0, classic attention, D's halves in two passes), measured in the same process, interleaved,
medians of several repeats (timings on a shared machine swing by 2x, so only ratios measured together
mean anything). Then each
speed option on its own against the baseline, each lever (LEVERS: gradient checkpointing, bf16 in
LPIPS or the target pass, compiling, CUDA graphs) on its own against the defaults, bf16 autocast as an
option, peak memory, the iteration's FLOP count (and model FLOP utilisation on a GPU), one-step sampling
and FID feature extraction images per second, and on the CPU two runs side by side with each thread
setting.

Writes benchmarks/results/latest.json (--output) and prints a table.

    python benchmarks/bench_train.py                      # CPU: reduced batches; GPU: the paper's batches
    python benchmarks/bench_train.py --configs cifar10 --repeats 5 --ablate cifar10
    python benchmarks/bench_train.py --configs imagenet64 --ablate --no-baseline --batch 320 \\
        --set model.speed.gradient_checkpointing=true     # overrides added to every variant
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import act_lightning.resolvers  # noqa: F401  (registers the config resolvers)
from act_lightning.process import apply_process_settings

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_ddp import IterationClock  # noqa: E402
from bench_fid import measure  # noqa: E402

# On the CPU, per configuration: half-batch, timed iterations, warm-up iterations, at most this many
# repeats (an LSUN Cat iteration at 256x256 takes about a minute here even at 2 + 2 images).
CPU_PLAN = {
    "quickstart": (64, 60, 5, None),
    "cifar10": (4, 3, 1, None),
    "imagenet64": (2, 2, 1, 2),
    "lsun_cat256": (2, 1, 1, 1),
}
# Timed and warm-up iterations at the paper's batch. The experiments run R1 every 16th iteration: 32
# timed hold exactly their mix, and 18 of warm-up run the R1 pass and the iteration after it twice (k = 0,
# 1, 16, 17: the one after an R1 update may run the augmentation pipeline at p = 0, until the new p has
# reached the host), so that under CUDA graphs (a graph's first call warms up, its second records) no
# recording falls in the timed window.
GPU_PLAN = (32, 18)
BASELINE = ["perf=baseline", "trainer.strategy=auto"]  # one device here; bench_ddp.py measures the strategy
FAST: list[str] = []  # the library's defaults
BF16 = ["trainer.precision=bf16-mixed"]
# Each option alone on top of the baseline: what it buys by itself.
OPTIONS = {
    "channels_last": ["model.speed.channels_last=true"],
    "fast_attention": ["model.speed.fast_attention=true"],
    "foreach_ema": ["model.speed.foreach_ema=true"],
    "joint_d_pass": ["model.speed.joint_d_pass=true"],
    "lazy_augment": ["model.speed.lazy_augment=true"],
    "no_log_sync": ["model.speed.sync_logs=false"],
    "foreach_optimizers": ["model.optimizer.foreach=true", "model.d_optimizer.foreach=true"],
    "tf32": ["tf32=true"],  # GPUs only
    # GPUs only unless --compile: minutes of code generation on a CPU
    "compile": ["model.speed.compile=true"],
}
# Each lever alone on top of the defaults (issue 21): what it buys against today's iteration.
LEVERS = {
    "gradient_checkpointing": ["model.speed.gradient_checkpointing=true"],
    "lpips_checkpointing": ["model.speed.lpips_checkpointing=true"],
    "bf16_lpips": ["model.speed.bf16_lpips=true"],  # changes the numerics
    "bf16_target": ["model.speed.bf16_target=true"],  # changes the numerics
    # The H200 profile of 2026-12-04 (docs/performance.md): float32 attention without tensor cores took 19%
    # of the kernel time, NCHW <-> NHWC copies around GroupNorm and the convolutions 11%
    "classic_attention": ["model.speed.fast_attention=false"],
    "contiguous_layout": ["model.speed.channels_last=false"],
    # cuDNN times its algorithms for each convolution's shapes once and keeps the fastest (the defaults:
    # its heuristics' pick); convolutions' matrix kernels were 49 ms of the 125 compiled. GPUs only.
    "cudnn_benchmark": ["trainer.benchmark=true"],
    # both float32 levers together, and both bf16 ones together (the most bf16 the options allow)
    "float32_levers": ["model.speed.fast_attention=false", "model.speed.channels_last=false"],
    "bf16_parts": ["model.speed.bf16_lpips=true", "model.speed.bf16_target=true"],
    # GPUs only unless --compile
    "compile": ["model.speed.compile=true"],
    "cuda_graphs": ["model.speed.compile=true", "model.speed.compile_mode=reduce-overhead"],
    # The compiled H200 profile of 2026-12-04 (third session): float32 fused attention is 37 of the 125 ms
    # of kernels; inductor keeps diffusers' classic attention as TF32 bmm and fuses its softmax (a plain
    # matmul-softmax-matmul it would turn back into the fused kernel)
    "compile_classic": ["model.speed.compile=true", "model.speed.fast_attention=false"],
    "cuda_graphs_classic": [
        "model.speed.compile=true",
        "model.speed.compile_mode=reduce-overhead",
        "model.speed.fast_attention=false",
    ],
    # Classic attention still writes every score matrix (8 channels per head: 16 heads x 256 x 256 per image,
    # 25 ms of kernels eager); flex_attention's generated flash kernel writes none (TF32 dot products)
    "compile_flex": ["model.speed.compile=true", "model.speed.flex_attention=true"],
    "cuda_graphs_flex": [
        "model.speed.compile=true",
        "model.speed.compile_mode=reduce-overhead",
        "model.speed.flex_attention=true",
    ],
    # The R1 iteration (one in 16) ran D eagerly: 79 ms of kernels and 6,700 more launches than the others
    # (compiled profile); compile_r1 makes it one more (CUDA) graph. compile_augment compiles the
    # augmentation pipeline too (skipped at p = 0 once the host knows p, so mostly the augmenting variants
    # below see it; the iteration after an R1 update may run it before the new p has reached the host)
    "cuda_graphs_flex_r1": [
        "model.speed.compile=true",
        "model.speed.compile_mode=reduce-overhead",
        "model.speed.flex_attention=true",
        "model.speed.compile_r1=true",
        "model.speed.compile_augment=true",
    ],
}
# the same with cuDNN's autotuner: inductor leaves the convolutions to cuDNN (49 ms of the 125)
LEVERS["cuda_graphs_flex_r1_cudnn"] = [*LEVERS["cuda_graphs_flex_r1"], "trainer.benchmark=true"]
# Not a speed option: the iteration while the augmentation pipeline runs. Every variant starts at p = 0,
# where the pipeline is skipped (lazy_augment); CIFAR-10's controller raises p whenever the R1 statistic
# passes model.r1_threshold, and then each iteration augments the generator's prediction and D's fakes and
# reals (in one call with joint_d_pass), some 290 kernel launches a call (451 before 2026-12-05), eagerly,
# outside any compiled graph. A threshold of 0 raises p at the first R1 iteration (k = 0), so every later
# one augments.
LEVERS["augmenting"] = ["model.r1_threshold=0"]
LEVERS["cuda_graphs_flex_r1_augmenting"] = [*LEVERS["cuda_graphs_flex_r1"], *LEVERS["augmenting"]]
# the same with the pipeline eager (its default: about 600 launches an iteration between the graphs)
LEVERS["cuda_graphs_flex_r1_augmenting_eagerly"] = [
    o for o in LEVERS["cuda_graphs_flex_r1_augmenting"] if o != "model.speed.compile_augment=true"
]
GPU_ONLY = ("cudnn_benchmark", "cuda_graphs_flex_r1_cudnn")  # no effect on the CPU (or compiled: GPU only)
COMPILED = tuple(name for name, overrides in LEVERS.items() if "model.speed.compile=true" in overrides)
PEAK_TFLOPS = {  # dense tensor-core peaks (NVIDIA data sheets, SXM parts): (fp32, tf32, bf16)
    "H100": (67.0, 494.7, 989.4),
    "H200": (67.0, 494.7, 989.4),
    "A100": (19.5, 156.0, 312.0),
}


def experiment_batch(config: str) -> int:
    """The experiment's own half-batch per forward pass (80 for CIFAR-10)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"experiment={config}", "run_dir=/tmp/x"]).data.batch_size


def compose_cfg(config: str, batch: int, iterations: int, extra: list[str]):
    overrides = [
        f"experiment={config}",
        "eval=null",
        "guard=null",
        f"iterations={iterations}",
        f"data.batch_size={batch}",
        "data.global_batch_size=null",  # one device, no accumulation: the batch is the batch measured
        "run_dir=/tmp/bench-train",
        *extra,
    ]
    if config != "quickstart":  # speed does not depend on the weights; the VGG file may be absent
        overrides += ["data=synthetic", "model.lpips_pretrained=false"]
        # pinned, as the experiments' data are (a pageable copy to the GPU waits for the device)
        overrides += ["data.pin_memory=true"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if config != "quickstart":  # at least one global batch of both halves (micro-batches: --set)
        cfg.data.length = max(64, 2 * batch, 2 * (cfg.data.global_batch_size or 0))
    return cfg


class CompileWatch(L.Callback):
    """What torch.compile did during a run, from torch's own counters: graphs compiled, graph breaks,
    cache hits, and the graphs inductor left without CUDA graphs under `compile_mode=reduce-overhead`,
    with its reasons. A skipped graph launches its kernels one by one, and inductor says so only in a
    warning among the compile logs: a CUDA graphs variant that runs no faster should say why here.
    Under inductor's graph partitioning (its default in recent torch) a graph is not skipped whole:
    inductor cuts it around each operation it cannot capture (a copy between devices, an operation on
    the host's tensors, a data-dependent shape) and launches those parts' kernels one by one, which it
    logs only at debug level; the watch keeps each such cut with its reason and operation as well
    (seen where a graph is compiled, not where it comes from inductor's cache).

    Also when each CUDA graph was recorded (CUDA graph trees run a graph's first call as a warm-up, record
    it at the second, replay it from the third; a recording costs about what an uncaptured run does):
    `report(timed_from)` counts the recordings made after the timing began, which a fair measurement has
    none of. As a callback of the run it also notes each iteration that took `slow` seconds or more (the
    iterations that compiled), printed as they end: a step that runs out of time says how far it got."""

    def __init__(self, slow: float = 5.0) -> None:
        self.reasons: list[str] = []
        self.partitions: list[str] = []  # "<reason>: <operation>" of each cut around uncapturable work
        self.recordings: list[float] = []  # time.perf_counter() of each CUDA graph recording
        self.slow, self.slow_iterations = slow, {}
        self._handler: logging.Handler | None = None
        self._record = self._partition = None
        self._began = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._began = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        seconds = time.perf_counter() - self._began  # the host's time: what compiling takes
        if seconds >= self.slow:
            self.slow_iterations[pl_module.k - 1] = round(seconds, 1)
            print(f"    iteration {pl_module.k - 1}: {seconds:.1f} s (compiling)", flush=True)

    def __enter__(self) -> CompileWatch:
        """Counts from zero, listens to inductor's loggers and counts CUDA graph recordings. Only through
        what torch's versions have long had (the device machine's torch is not this one): what is missing
        is left uncounted, never an error that would cost a lent GPU's run."""
        from torch._dynamo.utils import counters

        watch = self
        counters.clear()  # this run's counts (a bench process runs one variant at a time)

        class Reasons(logging.Handler):  # inductor's skip warnings, which propagate from its loggers
            def emit(self, record: logging.LogRecord) -> None:
                first = record.getMessage().splitlines()[0].strip()  # the stack trace follows: long
                skipped = first.startswith("skipping cudagraph")
                if skipped and record.levelno >= logging.WARNING and first not in watch.reasons:
                    watch.reasons.append(first)

        self._handler = Reasons()
        logging.getLogger("torch._inductor").addHandler(self._handler)
        self._watch_partitions()
        try:
            from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
        except ImportError:
            return self
        record = self._record = getattr(CUDAGraphTreeManager, "record_function", None)
        if record is not None:

            def recording(manager, *args, **kwargs):
                watch.recordings.append(time.perf_counter())
                return record(manager, *args, **kwargs)

            CUDAGraphTreeManager.record_function = recording
        return self

    def _watch_partitions(self) -> None:
        """Wraps inductor's `Scheduler.should_partition` (the reason a node cannot be captured, or None)
        to keep the reasons it gives for the nodes of graphs on a GPU while CUDA graphs are on."""
        try:
            from torch._inductor import config
            from torch._inductor.scheduler import Scheduler
            from torch._inductor.utils import is_gpu
            from torch._inductor.virtualized import V
        except ImportError:
            return
        partition = self._partition = getattr(Scheduler, "should_partition", None)
        if partition is None:
            return
        watch = self

        def partitioning(scheduler, node, *args, **kwargs):
            reason = partition(scheduler, node, *args, **kwargs)
            if reason and config.triton.cudagraphs and len(watch.partitions) < 50:
                with contextlib.suppress(Exception):  # a report, never a failed compile
                    if any(is_gpu(device) for device in V.graph.device_types):
                        origin = node.node.get_origin_node() if node.node is not None else None
                        what = f"{reason if isinstance(reason, str) else 'partitioned'}: " + (
                            str(origin.target) if origin is not None else type(node.node).__name__
                        )
                        if what not in watch.partitions:
                            watch.partitions.append(what)
            return reason

        Scheduler.should_partition = partitioning

    def __exit__(self, *exc) -> None:
        logging.getLogger("torch._inductor").removeHandler(self._handler)
        if self._partition is not None:
            from torch._inductor.scheduler import Scheduler

            Scheduler.should_partition = self._partition
        if self._record is not None:
            from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

            CUDAGraphTreeManager.record_function = self._record

    def report(self, timed_from: float | None = None) -> dict:
        """The counts; with `timed_from` (a perf_counter time) also the recordings made after it."""
        from torch._dynamo.utils import counters

        inductor, aot = counters["inductor"], counters["aot_autograd"]
        counted = self._record is not None  # (a torch without the method: recordings not counted)
        timed = None if timed_from is None or not counted else sum(t > timed_from for t in self.recordings)
        return {
            "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "graph_break_reasons": dict(counters["graph_break"]),  # each reason: how often (issue 21)
            "fx_graph_cache": {
                "hits": inductor["fxgraph_cache_hit"],
                "misses": inductor["fxgraph_cache_miss"],
            },
            "aot_autograd_cache": {"hits": aot["autograd_cache_hit"], "misses": aot["autograd_cache_miss"]},
            "cudagraph_skips": inductor["cudagraph_skips"],
            "cudagraph_skip_reasons": list(self.reasons),
            "cudagraph_partitions": list(self.partitions),  # the cuts, "<reason>: <operation>" (GPU only)
            "cudagraph_recordings": len(self.recordings) if counted else None,
            "cudagraph_recordings_timed": timed,
            "slow_iterations": dict(self.slow_iterations),  # iteration: seconds, those >= `slow`
        }


def fit(cfg, device: torch.device, warmup: int, callbacks=(), watch: CompileWatch | None = None) -> dict:
    """One short training run in this process; iterations per second from iteration `warmup` on. A
    compiled run also reports what torch.compile did (CompileWatch; `watch`: the caller's, which it can
    read even if the run fails)."""
    if watch is None and cfg.model.speed.get("compile"):
        watch = CompileWatch()
    start = time.perf_counter()
    apply_process_settings(cfg)  # a compiled run: Dynamo's caches reset (none of an earlier variant's)
    L.seed_everything(0, verbose=False)
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    with tempfile.TemporaryDirectory() as tmp:
        clock_file = Path(tmp) / "clock.json"
        clock = IterationClock(str(clock_file), warmup)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            precision=cfg.trainer.precision,
            benchmark=cfg.trainer.get("benchmark"),  # as the config says (each variant its own value)
            max_epochs=-1,
            logger=False,
            log_every_n_steps=cfg.trainer.log_every_n_steps,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
            callbacks=[clock, *callbacks, *([watch] if watch is not None else [])],
            default_root_dir=tmp,
        )
        with watch or contextlib.nullcontext():
            trainer.fit(model, datamodule=datamodule)
        result = json.loads(clock_file.read_text())
    if watch is not None:
        result["compile"] = watch.report(timed_from=clock.start)
    result["seconds"] = time.perf_counter() - start  # the whole run: building, compiling, warm-up, timing
    del model, trainer, datamodule
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


class _FlopCount(TorchDispatchMode):
    """Sums torch's FLOP formulas (matmuls, convolutions, attention; forward and backward) over the ops
    that run. FlopCounterMode itself also tracks modules with autograd hooks, which the R1 pass's
    `autograd.grad(create_graph=True)` does not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class CountFlops(L.Callback):
    """FLOPs of each iteration."""

    def __init__(self) -> None:
        self.per_iteration: dict[int, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.mode = _FlopCount()
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mode.__exit__(None, None, None)
        self.per_iteration[pl_module.k - 1] = self.mode.total


def flops_per_iteration(config: str, batch: int, device: torch.device, extra: list[str] = ()) -> float:
    """Averaged over the lazy R1 schedule: iteration 0 runs the R1 pass, iteration 1 does not. `extra`:
    the overrides every measured variant runs with (--set: micro-batches, the R1 interval), so that the
    count is the measured iteration's."""
    cfg = compose_cfg(config, batch, 2, list(extra))
    counter = CountFlops()
    fit(cfg, device, warmup=1, callbacks=[counter])
    with_r1, without = counter.per_iteration[0], counter.per_iteration[1]
    return without + (with_r1 - without) / cfg.model.r1_interval


def peak_tflops(device: torch.device, precision: str, tf32: bool) -> float | None:
    name = torch.cuda.get_device_name(device)
    for key, (fp32, tf32_peak, bf16) in PEAK_TFLOPS.items():
        if key in name:
            return bf16 if "16" in precision else tf32_peak if tf32 else fp32
    return None


class PeakRSS(L.Callback):
    """The process's peak resident memory during the iterations after the first (Linux resets the
    high-water mark (VmHWM) on writing 5 to /proc/self/clear_refs, so building the networks (LPIPS
    builds all of VGG16 before keeping its features) does not count)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.k == 1:
            Path("/proc/self/clear_refs").write_text("5")

    def on_train_end(self, trainer, pl_module) -> None:
        status = Path("/proc/self/status").read_text()
        self.peak_mb = int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1]) / 1024


def cpu_peak_memory_mb(config: str, batch: int, variant: list[str]) -> float:
    """Peak resident memory of a fresh process during the second iteration of the variant (memory freed
    by an earlier run may stay resident in this one, so each variant gets a process of its own)."""
    cmd = [sys.executable, __file__, "--memory-probe", config, str(batch), json.dumps(variant)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe of {config} {variant} failed:\n{result.stderr[-3000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def side_by_side(iterations: int) -> dict:
    """Two quickstart runs started together on this machine, with threads=auto and with threads=1."""
    out = {}
    for threads in ("auto", "1"):
        with tempfile.TemporaryDirectory() as tmp:
            procs, files = [], []
            for i in range(2):
                path = Path(tmp) / f"clock{i}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "act_lightning.train",
                    "eval=null",
                    "guard=null",
                    f"iterations={iterations}",
                    f"threads={threads}",
                    "callbacks.samples.every_n_iterations=1000000",
                    "callbacks.checkpoint.every_n_iterations=1000000",
                    "+callbacks.clock._target_=bench_ddp.IterationClock",
                    f"+callbacks.clock.path={path}",
                    "+callbacks.clock.warmup=10",
                    f"hydra.run.dir={tmp}/run{i}",
                ]
                env = {**os.environ, "PYTHONPATH": str(ROOT / "benchmarks"), "PYTHONWARNINGS": "ignore"}
                env.pop("OMP_NUM_THREADS", None)
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL))
                files.append(path)
            for p in procs:
                if p.wait() != 0:
                    raise RuntimeError(f"side-by-side run with threads={threads} failed")
            out[f"threads={threads}"] = [json.loads(f.read_text())["it_per_s"] for f in files]
    return out


def plan(config: str, cuda: bool, args) -> tuple[int, int, int, int]:
    """Half-batch, timed iterations, warm-up iterations and repeats of a configuration."""
    if cuda:
        batch, (timed, warmup), repeats = experiment_batch(config), GPU_PLAN, args.repeats
    else:
        batch, timed, warmup, cap = CPU_PLAN.get(config, CPU_PLAN["cifar10"])  # others: CIFAR-10-sized
        repeats = min(args.repeats, cap or args.repeats)
    warmup = args.warmup if args.warmup is not None else warmup
    return args.batch or batch, args.iterations or timed, warmup, repeats


def variants_to_run(cuda: bool, args, ablate: bool) -> dict[str, list[str]]:
    """The defaults ("fast"), the baseline, and with `ablate` each option on the baseline, each lever on
    the defaults and bf16-mixed; `--set` overrides added to every one."""
    variants = {"baseline": BASELINE, "fast": FAST, "bf16": BF16}
    if ablate:
        for name in args.options if args.options is not None else OPTIONS:
            if name in ("tf32", "compile") and not cuda and not (name == "compile" and args.compile):
                continue
            variants[f"baseline+{name}"] = BASELINE + OPTIONS[name]
        for name in args.levers if args.levers is not None else LEVERS:
            if (name in COMPILED and not cuda and not args.compile) or (name in GPU_ONLY and not cuda):
                continue
            variants[f"fast+{name}"] = FAST + LEVERS[name]
    if not (args.bf16 and ablate):  # bf16 is measured with the ablations
        del variants["bf16"]
    if not args.baseline:  # the defaults alone (a paper configuration's speed, not what the options buy)
        variants = {name: v for name, v in variants.items() if not name.startswith("baseline")}
    return {name: [*v, *args.set] for name, v in variants.items()}


def measure_config(config: str, device: torch.device, args, ablate: bool, progress=None) -> dict:
    """Every variant of `config`, timed; `progress(runs)` after each run (the runs so far, by variant)."""
    cuda = device.type == "cuda"
    batch, timed, warmup, repeats = plan(config, cuda, args)
    variants = variants_to_run(cuda, args, ablate)
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no variant always goes first
        for name in order:
            cfg = compose_cfg(config, batch, warmup + timed, variants[name])
            runs[name].append(fit(cfg, device, warmup))
            done = runs[name][-1]
            print(
                f"  {config} {name} run {r}: {done['it_per_s']:.3f} it/s ({done['seconds']:.0f} s)",
                flush=True,
            )
            if done.get("compile"):
                print(f"    compiled: {json.dumps(done['compile'])}", flush=True)
            if progress is not None:
                progress(runs)

    def rate(name: str) -> float:
        return statistics.median(x["it_per_s"] for x in runs[name])

    def peak(name: str) -> float | None:
        if cuda:
            return max(x["peak_mb"] for x in runs[name])
        return cpu_peak_memory_mb(config, batch, variants[name]) if args.memory else None

    def against(name: str, reference: float | None) -> dict:
        return {"iterations_per_s": rate(name), "speedup": rate(name) / reference if reference else None}

    base = rate("baseline") if "baseline" in runs else None
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads",
        "batch": batch,
        "timed_iterations": timed,
        "repeats": repeats,
        "extra_overrides": args.set,
        "iterations_per_s": rate("fast"),
        "baseline_iterations_per_s": base,
        "speedup": rate("fast") / base if base else None,
        "peak_memory_mb": peak("fast"),
        "peak_reserved_memory_mb": max((x.get("peak_reserved_mb") or 0) for x in runs["fast"]) or None,
        "baseline_peak_memory_mb": peak("baseline") if base else None,
        "runs": {name: [x["it_per_s"] for x in xs] for name, xs in runs.items()},
        "run_seconds": {name: [round(x["seconds"], 1) for x in xs] for name, xs in runs.items()},
        # what torch.compile did in each compiled variant's last run (CompileWatch)
        "compile": {name: xs[-1]["compile"] for name, xs in runs.items() if "compile" in xs[-1]},
        "options": {n.split("+", 1)[1]: against(n, base) for n in variants if n.startswith("baseline+")},
        "levers": {
            n.split("+", 1)[1]: against(n, rate("fast")) | {"peak_memory_mb": peak(n)}
            for n in variants
            if n.startswith("fast+")
        },
    }
    if "bf16" in variants:
        result["bf16"] = against("bf16", base)
    return result | extra_measurements(config, device, args, batch, rate("fast"))


def extra_measurements(config: str, device: torch.device, args, batch: int, rate: float) -> dict:
    """The FLOP count (and MFU on a GPU) at the defaults' rate; sampling and FID feature rates."""
    cuda, result = device.type == "cuda", {}
    if args.flops:
        flops = flops_per_iteration(config, batch, device, args.set)
        result["flops_per_iteration"] = flops
        result["achieved_tflops"] = flops * rate / 1e12
        if cuda:
            cfg = compose_cfg(config, batch, 1, list(args.set))
            peak_tf = peak_tflops(device, str(cfg.trainer.precision), bool(cfg.tf32))
            result["model_flop_utilisation"] = flops * rate / (peak_tf * 1e12) if peak_tf else None
    if config != "quickstart" and args.sampling:
        from act_lightning.metrics.inception import InceptionFeatures, WeightsError

        try:
            extractor = InceptionFeatures(None)
        except WeightsError:
            extractor = InceptionFeatures("random")  # same cost
        sample_batch = 250 if cuda else 16
        _, features, sampling = measure(config, extractor.to(device), sample_batch, args.seconds, device)
        result["sampling_images_per_s"] = sampling
        result["fid_features_images_per_s"] = features
    return result


def print_table(report: dict) -> None:
    def fmt(value, spec: str) -> str:
        return format(value, spec) if value is not None else "-"

    print(f"\n{report['machine']}")
    print(
        f"{'config':12s} {'batch':>5s} {'it/s':>8s} {'baseline':>9s} {'speedup':>8s} {'peak MB':>8s} "
        f"{'base MB':>8s} {'sample img/s':>12s} {'FID img/s':>10s}"
    )
    for name, r in report["configs"].items():
        print(
            f"{name:12s} {r['batch']:5d} {r['iterations_per_s']:8.3f} "
            f"{fmt(r['baseline_iterations_per_s'], '9.3f'):>9s} "
            f"{fmt(r['speedup'], '7.2f'):>7s}x {fmt(r['peak_memory_mb'], '8.0f'):>8s} "
            f"{fmt(r['baseline_peak_memory_mb'], '8.0f'):>8s} "
            f"{fmt(r.get('sampling_images_per_s'), '12.1f'):>12s} "
            f"{fmt(r.get('fid_features_images_per_s'), '10.1f'):>10s}"
        )
        rows = {f"baseline + {k}": v for k, v in r["options"].items()}
        rows |= {f"defaults + {k}": v for k, v in r.get("levers", {}).items()}
        if "bf16" in r:
            rows["defaults + bf16-mixed"] = r["bf16"]
        for label, o in rows.items():
            print(f"    {label:32s} {o['iterations_per_s']:8.3f} it/s {fmt(o['speedup'], '6.2f')}x")
        if "flops_per_iteration" in r:
            mfu = r.get("model_flop_utilisation")
            print(
                f"    {r['flops_per_iteration'] / 1e9:.1f} GFLOP per iteration, "
                f"{r['achieved_tflops']:.3f} TFLOP/s" + (f", MFU {mfu:.1%}" if mfu is not None else "")
            )
    if "side_by_side" in report:
        for setting, rates in report["side_by_side"].items():
            print(
                f"two quickstart runs side by side, {setting}: "
                + ", ".join(f"{x:.2f}" for x in rates)
                + " it/s"
            )


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor as /proc/cpuinfo names it (model name, family and model) and whether it computes bf16
    natively: bf16 autocast was 1.77x faster than float32 on Zen 4 cores with AVX-512 bf16 and an order of
    magnitude slower on Zen 3 cores without, and sessions of this project ran on both."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda key: next(iter(re.findall(rf"^{key}\s*: (.*)$", text, flags=re.M)), "?")  # noqa: E731
    flags = set(field("flags").split())
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    native = f"bf16: {', '.join(bf16)}" if bf16 else "no native bf16"
    return f"{field('model name')}, family {field('cpu family')} model {field('model')}, {native}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=list(CPU_PLAN))
    parser.add_argument("--ablate", nargs="*", default=["quickstart", "cifar10"], help="configs to ablate")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=None, help="timed iterations (default per config)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up iterations (default per config)")
    parser.add_argument("--batch", type=int, default=None, help="half-batch (default: per config)")
    parser.add_argument("--options", nargs="*", choices=list(OPTIONS), default=None, help="options to ablate")
    parser.add_argument("--levers", nargs="*", choices=list(LEVERS), default=None, help="levers to ablate")
    parser.add_argument("--set", nargs="*", default=[], help="overrides added to every variant")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false", help="the defaults only")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window of sampling/FID rates")
    parser.add_argument("--compile", action="store_true", help="also measure compiling on the CPU")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip CPU memory probes")
    parser.add_argument("--no-flops", dest="flops", action="store_false")
    parser.add_argument("--no-sampling", dest="sampling", action="store_false")
    parser.add_argument("--side-by-side", type=int, default=150, help="iterations per run; 0: skip")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    parser.add_argument("--merge", action="store_true", help="add these configs to an existing --output")
    parser.add_argument(
        "--save-every-run",
        action="store_true",
        help="write --output after every run too (the runs so far under cut_short): a process stopped at a "
        "time limit keeps what it measured",
    )
    parser.add_argument("--memory-probe", nargs=3, help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    if args.memory_probe:  # a child of cpu_peak_memory_mb
        config, batch, variant = args.memory_probe
        peak = PeakRSS()
        fit(compose_cfg(config, int(batch), 2, json.loads(variant)), torch.device("cpu"), 1, [peak])
        print(peak.peak_mb)
        return

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )
    report = {
        "machine": f"{machine}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}",
        "configs": {},
    }
    out = Path(args.output)
    # read before anything is written there (--save-every-run writes it after every run)
    previous = json.loads(out.read_text()) if args.merge and out.is_file() else None

    def progress(config: str, runs: dict) -> None:
        """The configs measured so far and this one's runs, written after each run (--save-every-run): a
        process stopped at its time limit (the device check's steps) leaves what it measured. The whole
        report replaces it."""
        running = {name: [x["it_per_s"] for x in xs] for name, xs in runs.items() if xs}
        compiled = {name: xs[-1]["compile"] for name, xs in runs.items() if xs and "compile" in xs[-1]}
        partial = {**report, "cut_short": {"config": config, "runs": running, "compile": compiled}}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(partial, indent=2) + "\n")

    for config in args.configs:
        print(f"{config} ...", flush=True)
        saving = (lambda runs, c=config: progress(c, runs)) if args.save_every_run else None
        report["configs"][config] = measure_config(config, device, args, config in args.ablate, saving)
    if device.type == "cpu" and args.side_by_side:
        report["side_by_side"] = side_by_side(args.side_by_side)
    if previous is not None:
        previous.pop("cut_short", None)  # a run stopped before its end: its finished configs merge
        report["configs"] = {**previous["configs"], **report["configs"]}
        if "side_by_side" in previous and "side_by_side" not in report:
            report["side_by_side"] = previous["side_by_side"]
        report["machine"] = previous["machine"] + f"; {', '.join(args.configs)}: {report['machine']}"
    print_table(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
