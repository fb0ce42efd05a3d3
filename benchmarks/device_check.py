"""Everything issue 21 measures on a GPU, in one or two calls (--budget, --only): bench_train.py's CIFAR-10
ablation of the levers, the iteration compiled with CUDA graphs, the profile of the defaults (where the
kernel time goes, by family, and how long the device waits for the host), the CUDA tests (the host
synchronisation check and the numerics tests among them), ImageNet 64 at 320 + 320 in one pass against two
micro-batches of 160, a 50k-sample FID end to end, the diffusion-start recipes, then what an earlier run
measured already. Each step runs in a process of its own with its own time limit; a failed or timed-out
step is recorded and the next one runs. Steps are ordered by what they are worth: the last are the first
to be skipped when the budget runs out.

A session has 15 minutes of device time, the machine's start included (about 90 s). The sessions of
2026-12-04 held 580 + 255 s, 655 s and 612 s (the third: one call of `--budget 570`, timeout 600 s; the
machine went back before a second call). Plan on `--budget 540` with a timeout of 600 s (the first step's
cold compile needs most of it; a step past its limit gets 10 s to stop, and packing the compile cache,
up to two gzip passes over hundreds of MB, follows the steps), then at once (the machine is
held 30 s idle), warm, the rest with `--only` and `--previous` (the first call's summary.json, so that
a step that needs an earlier one, or is its fallback, knows how that one ended): inductor's cache on the
machine makes a second compile of the same graphs short; on a new machine, the carried cache does
(below). The results are written after every step, so a call cut short returns what it measured
(bench_train.py writes its JSON after every run, so a step stopped at its limit keeps the runs it
finished). The budget counts from the script's start (unpacking a carried cache included); the env step
checks that torch sees CUDA, and no step runs after it fails.
Steps known not to fit a card's memory are skipped on it (ImageNet 64 in one pass on an 80 GB H100):
name the nvidia-h200 kind to run them, and to compare with the H200 figures of 2026-12-04.
`profile_train.py --timed 16` times an iteration without the profiler, then profiles it, after one
compile.

Writes at most eight files into $OUT (or --out): summary.md (what each step found, in tables),
summary.json (every step's status and results), profile.md (the profiles' top-20 tables), logs.txt (each
step's command and the end of its output), traces.tar (Chrome traces) and up to three parts of
compile_cache.tar.gz (inductor's cache after the steps, or its AOTAutograd and FX graph entries alone,
which bundle the graphs' Triton kernels, when the whole does not fit: see below).

A cold compile of the CIFAR-10 networks took about five minutes on an H200, a third of a session. Every
step compiles into one inductor cache (--cache, exported as ACT_COMPILE_CACHE and TORCHINDUCTOR_CACHE_DIR),
which the run packs into $OUT; carried to the next session's machine, it spares that session the code
generation of every graph that did not change (the tracing still runs). Inductor's cache keys hold the
card's name and the torch and Triton versions: a cache helps only on the same card model (an H200's is all
misses on an H100), so the second call should run on the machine the first left warm. Here, after a run:

    mkdir -p .compile_cache && rm -f .compile_cache/compile_cache.tar.gz.*   # no part of an older run
    cp <files_at>/compile_cache.tar.gz.* <files_at>/summary.json .compile_cache/
    grep -qx '/.compile_cache/' .git/info/exclude || echo '/.compile_cache/' >> .git/info/exclude

and carry [".whl", ".compile_cache"]: device_check.py unpacks the parts it finds there before its steps
(`--previous .compile_cache/summary.json` for the first call's outcomes).

On the device machine, after benchmarks/device_wheels.sh made .whl here (what its image lacks):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \\
        .whl/*.whl && export PYTHONPATH=/tmp/site && python3 benchmarks/device_check.py
    python benchmarks/device_check.py --dry-run        # the steps, their time limits and commands
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
MEMORY = "model.r1_interval=2"  # R1 at k = 2: the measured iterations include the R1 pass's memory
LEVERS = ["classic_attention", "contiguous_layout", "float32_levers", "bf16_parts"]  # not measured yet
# one run each, and the JSON written after every run: a step stopped at its limit keeps what it measured
QUICK = ["--repeats", "1", "--no-flops", "--no-sampling", "--side-by-side", "0", "--save-every-run"]
STARTED = time.monotonic()  # the budget counts from here: unpacking a carried cache is part of the call
MAX_FILE = 15 * 2**20  # the device tool returns files of up to 16 MiB
CACHE_PARTS = 3  # of the tool's eight files, what the five others leave (64 MiB in all)
MAX_TOTAL = 62 * 2**20  # all files together (the tool's 64 MiB, less a margin for the last rewrite)
CACHE_NAME = "compile_cache.tar.gz"
PACKAGES = (  # what the steps import besides torch: versions in the env step's output
    *("triton", "lightning", "torchmetrics", "diffusers", "huggingface_hub", "safetensors"),
    *("hydra-core", "omegaconf", "lpips", "torch-fidelity", "numpy"),
)


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout: int  # seconds at most
    needs: int  # seconds that must be left to start it
    result: str | None = None  # the JSON file it writes, relative to the work folder
    after: str | None = None  # runs only if this earlier step passed (its profile needs what it measured)
    unless: str | None = None  # skipped if this earlier step passed (a fallback for it)
    min_gpu_gib: float = 0  # skipped on a GPU with less memory, GiB (known not to fit there)
    required: bool = False  # if it does not pass, no later step runs (they would measure nothing)


def imagenet64_step(name: str, batch: int, extra: list[str], min_gpu_gib: float = 0) -> Step:
    """One ImageNet 64 run of the defaults at this half-batch per pass (its own process: running out
    of memory ends that step only)."""
    argv = [
        *("--configs", "imagenet64", "--ablate", "--no-baseline", "--no-bf16", "--batch", str(batch)),
        *("--iterations", "3", "--warmup", "1", *QUICK, "--set", MEMORY, *extra),
        *("--output", f"{name}.json"),
    ]
    argv = [sys.executable, str(BENCH / "bench_train.py"), *argv]
    return Step(name, argv, 150, 60, f"{name}.json", min_gpu_gib=min_gpu_gib)


def fid_step(num_samples: int = 50_000, train_extra: str = "", eval_extra: str = "") -> Step:
    """Issue 21, item 4: a 50k-sample FID of a full-size CIFAR-10 checkpoint, end to end through
    `python -m act_lightning.evaluate` (start-up, sampling, Inception features, reference statistics and
    the distance), timed by the wall clock. Speed does not depend on the weights: a checkpoint of two
    iterations and a random Inception stand in; the reference statistics come from 256 synthetic images
    (a real run caches the training set's: eval.reference_cache). The extras add overrides (a CPU check)."""
    py = shlex.quote(sys.executable)
    train = (
        f"{py} -m act_lightning.train experiment=cifar10 data=synthetic iterations=2 logger=csv "
        "eval.inception_weights=random eval.num_samples=500 eval.reference_cache=null "
        f"model.lpips_pretrained=false hydra.run.dir=fid_run {train_extra}"
    )
    evaluate = (
        f"{py} -m act_lightning.evaluate ckpt=fid_run/checkpoints/last.ckpt num_samples={num_samples} "
        f"samplers=[1-step] output=fid_50k.json hydra.run.dir=fid_eval {eval_extra}"
    )
    timed = (
        f"set -e; {train}; start=$(date +%s.%N); {evaluate}; end=$(date +%s.%N); "
        f"{py} -c \"import json,sys; r=json.load(open('fid_50k.json')); "
        f"r['wall_seconds']=float(sys.argv[2])-float(sys.argv[1]); "
        f"json.dump(r, open('fid_50k.json', 'w'), indent=2)\" $start $end"
    )
    return Step("fid_50k", ["bash", "-c", timed], 240, 90, "fid_50k.json")


# 16 timed iterations (R1 in one: the experiment's mix) after 18 of warm-up (R1 at k = 0 and 16, and the
# iterations after them: see lever_step)
TIMING = ["--iterations", "16", "--warmup", "18"]
# The augmenting variants' warm-up: their R1 pass augments the reals from k = 16 on (p rises at k = 0), a
# graph first called at 16 and recorded at 32
AUGMENTING_WARMUP = 33


def lever_step(
    name: str,
    lever: str,
    timeout: int = 420,
    needs: int = 130,
    unless: str | None = None,
    warmup: int = 18,
    after: str | None = None,
) -> Step:
    """The defaults against the defaults with `lever` (one of bench_train.py's LEVERS: compile,
    cuda_graphs, ... COMPILED, or an eager one) in one process, each in a process of its own: on the H200
    of 2026-12-04 building and compiling one variant took minutes, so each gets its own time limit. The
    default `needs` assumes inductor's cache warm from an earlier step of the same graphs; `after` and
    `unless`: Step's; `warmup` iterations before the 16 timed (one R1 iteration among them, the
    experiment's mix). The default 18 runs R1 twice before the clock starts (k = 0, 16), and the
    iterations after them (1, 17): compiled variants compile in their first calls, and under CUDA graphs
    the R1 iteration's graphs are recorded at their second call, which would otherwise be timed (eager
    variants need only a first R1 iteration). The iteration after an R1 update may run the augmentation
    pipeline at p = 0 (lazy_augment skips it only once the new p has reached the host, which a GPU running
    behind the host has not): its compiled graph, too, is called at k = 1 and recorded at 17."""
    py = sys.executable
    argv = [py, str(BENCH / "bench_train.py"), "--configs", "cifar10", "--ablate", "cifar10", "--options"]
    argv += ["--no-baseline", "--no-bf16", "--levers", lever, *TIMING[:2], "--warmup", str(warmup)]
    argv += [*QUICK, "--output", f"{name}.json"]
    return Step(name, argv, timeout, needs, f"{name}.json", after=after, unless=unless)


def steps() -> list[Step]:
    """The plan, in order of value (paths relative to the work folder, where each step runs)."""
    py, tests = sys.executable, str(ROOT / "tests")
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors"]
    # the card, torch's CUDA, and the version of every package the steps import (the GPU image's own
    # and the carried wheels': a result is only comparable with the versions it ran with)
    versions = (  # one line, so that --dry-run prints one line per step
        "import importlib.metadata as m, torch; "
        "print('torch', torch.__version__, 'cuda', torch.version.cuda); "
        "v = {}; [v.setdefault(d.metadata['Name'].lower().replace('_', '-'), d.version) "
        "for d in m.distributions()]; "  # the first on sys.path: what imports
        f"[print(n, v.get(n.replace('_', '-'), 'missing')) for n in {PACKAGES!r}]"
    )
    # and CUDA there: without it every later step would run on the CPU, past its time limit
    cuda = "import sys, torch; print(sys.version); sys.exit(0 if torch.cuda.is_available() else 'no CUDA')"
    env_check = (
        "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "
        f"{shlex.quote(py)} -c {shlex.quote(versions)} && {shlex.quote(py)} -c {shlex.quote(cuda)}"
    )
    bench = [py, str(BENCH / "bench_train.py"), "--configs", "cifar10", "--ablate", "cifar10", "--options"]
    # with 16 iterations timed unprofiled first (one R1 pass, as the experiment's mix)
    profile = [py, str(BENCH / "profile_train.py"), "--variants", "defaults", "--timed", "16"]
    compiled = ["--set", "model.speed.compile=true"]
    notebooks = str(ROOT / "tests" / "integration" / "test_notebooks.py")
    gpu_tests = str(ROOT / "tests" / "integration" / "test_gpu.py")
    classic = "model.speed.fast_attention=false"
    flex = "model.speed.flex_attention=true"
    cuda_graphs = [*compiled, "model.speed.compile_mode=reduce-overhead"]
    # Order (after the third H200 session of 2026-12-04, benchmarks/results/h200_2026-12-04c.md): the
    # compiled iteration ran 4.25 it/s with 125 ms of kernels per 235 ms iteration (the host launching
    # them is the bound), float32 fused attention 37 ms of those kernels, and the R1 iteration (one in 16)
    # ran D eagerly with 6,700 more launches. So first the candidate for 10 it/s against the defaults in
    # one process: CUDA graphs, flex_attention's generated flash kernel (TF32, no score matrix in memory)
    # and the R1 pass compiled: one cold compile, up to 540 s. Then its profile (warm: the same graphs);
    # only if the candidate fails, at once, CUDA graphs with classic attention (TF32 bmm, softmax fused by
    # inductor, the score matrices written) and its profile. Then cuDNN's autotuner (eager, never
    # measured), the augmentation's cost, the candidate with the autotuner (warm) and augmenting, then the
    # candidate without compile_r1 (warm but for the R1 graph: what that lever buys). Then the eager
    # steps (ImageNet 64 in one pass on 141 GB, the eager profile beside the compiled ones), then what needs
    # a cold compile of its own (inductor's cache of one mode did not shorten the other's compile: a mode,
    # or another attention, is other graphs), then what was measured already.
    candidate = [*cuda_graphs, flex, "model.speed.compile_r1=true", "model.speed.compile_augment=true"]
    return [
        Step("env", ["bash", "-c", env_check], 30, 10, required=True),
        lever_step("bench_cuda_graphs_flex_r1", "cuda_graphs_flex_r1", timeout=540, needs=150),
        Step(
            "profile_cuda_graphs_flex_r1",
            [*profile, "--out", "profile_cuda_graphs_flex_r1", *candidate],
            300,
            120,
            "profile_cuda_graphs_flex_r1/profile.json",
            after="bench_cuda_graphs_flex_r1",
        ),
        lever_step(  # the fallback, at once if the candidate fails (a cold compile of its own)
            "bench_cuda_graphs_classic", "cuda_graphs_classic", 500, 150, unless="bench_cuda_graphs_flex_r1"
        ),
        Step(
            "profile_cuda_graphs_classic",
            [*profile, "--out", "profile_cuda_graphs_classic", *cuda_graphs, classic],
            300,
            120,
            "profile_cuda_graphs_classic/profile.json",
            after="bench_cuda_graphs_classic",
        ),
        lever_step("bench_cudnn_benchmark", "cudnn_benchmark", 120, 60, warmup=5),  # eager: about a minute
        lever_step("bench_augmenting", "augmenting", 120, 60, warmup=AUGMENTING_WARMUP),  # its cost
        lever_step(  # the candidate's graphs again (a warm cache) with cuDNN's autotuner
            "bench_cuda_graphs_flex_r1_cudnn",
            "cuda_graphs_flex_r1_cudnn",
            300,
            150,
            after="bench_cuda_graphs_flex_r1",
        ),
        lever_step(  # the candidate while augmenting (its pipeline compiled: one more graph, a cold compile)
            "bench_cuda_graphs_flex_r1_augmenting",
            "cuda_graphs_flex_r1_augmenting",
            300,
            180,
            warmup=AUGMENTING_WARMUP,
            after="bench_cuda_graphs_flex_r1",
        ),
        lever_step("bench_cuda_graphs_flex", "cuda_graphs_flex", 300, 150),
        lever_step(  # what compiling the augmentation buys the candidate (its pipeline eager)
            "bench_cuda_graphs_flex_r1_augmenting_eagerly",
            "cuda_graphs_flex_r1_augmenting_eagerly",
            300,
            150,
            warmup=AUGMENTING_WARMUP,
            after="bench_cuda_graphs_flex_r1_augmenting",
        ),
        # fits 141 GB without checkpointing? (not 80: 2026-12-04, first H200 session)
        imagenet64_step("imagenet64_one_pass", 320, [], min_gpu_gib=100),
        Step(  # the eager defaults the same way, beside it
            "profile",
            [*profile, "--out", "profile"],
            150,
            60,
            "profile/profile.json",
        ),
        lever_step("bench_compile_classic", "compile_classic", timeout=420, needs=300),
        lever_step("bench_cuda_graphs", "cuda_graphs", needs=300),  # 2026-12-04: compiling after 175 s
        lever_step("bench_compile", "compile", needs=300),  # 2026-12-04: 1.20x the defaults of that day
        Step(  # 2026-12-04 (third session): 4.25 it/s, 125 ms of kernels without R1
            "profile_compiled",
            [*profile, "--out", "profile_compiled", *compiled],
            500,
            300,
            "profile_compiled/profile.json",
        ),
        imagenet64_step("imagenet64_two_passes", 160, ["data.global_batch_size=320"]),  # 0.615 it/s
        Step(  # issue 22's full-scale recipes: their iteration speed, for the cost the README quotes
            "bench_diffusion_start",
            [py, str(BENCH / "bench_train.py"), "--configs", "cifar10_ect", "cifar10_ect_act"]
            + ["cifar10_diffusion", "--ablate", "--no-baseline", "--no-bf16", "--iterations", "10"]
            + ["--warmup", "4", "--repeats", "1", "--no-sampling", "--side-by-side", "0", "--no-flops"]
            + ["--save-every-run"]
            + ["--output", "bench_diffusion_start.json"],
            180,
            60,
            "bench_diffusion_start.json",
        ),
        # the candidate's own numerics test first, alone: four cold compiles in one step ran past its limit
        # with nothing printed (pytest -q says what failed only at its end)
        Step("compile_test_flex", [*pytest, "-rA", "-k", "inductor and flex", gpu_tests], 300, 150),
        Step("compile_tests", [*pytest, "-rA", "-k", "inductor and not flex", gpu_tests], 400, 150),
        Step(  # measured in the second session of 2026-12-04, as are profile, cuda_tests and fid_50k
            "bench_levers",
            [
                *bench,
                "--levers",
                *LEVERS,
                "--no-baseline",
                "--no-bf16",
                *TIMING,
                *QUICK,
                "--output",
                "bench.json",
            ],
            200,
            90,
            "bench.json",
        ),
        # test_notebooks needs nbformat, which the GPU machine's image lacks (none of its tests is a GPU's)
        Step(  # passed in the second session of 2026-12-04
            "cuda_tests",
            [*pytest, "-m", "gpu", "-k", "not inductor", "--ignore", notebooks, tests],
            200,
            60,
        ),
        fid_step(),
        imagenet64_step(
            "imagenet64_one_pass_generator_checkpointing", 320, ["model.speed.gradient_checkpointing=true"]
        ),
        imagenet64_step(  # measured 2026-12-04: 0.532 it/s, 71.3 GB
            "imagenet64_one_pass_checkpointing",
            320,
            ["model.speed.gradient_checkpointing=true", "model.speed.lpips_checkpointing=true"],
        ),
    ]


# What of inductor's cache a warm compile reads: the AOTAutograd and FX graph entries (these bundle the
# graphs' Triton kernels) first; the rest (the generated modules, Triton's own cache) if it fits too.
CACHE_CORE = ("aotautograd", "fxgraph")
CACHE_SKIP = ("locks", "precompiled_headers")  # lock files; the CPU's precompiled C++ headers


def _tar_gz(cache: Path, names: list[str], whole: Path) -> int:
    with tarfile.open(whole, "w:gz", compresslevel=3) as tar:  # fast: it runs inside the call's limit
        for name in names:
            tar.add(cache / name, arcname=name)
    return whole.stat().st_size


def _folder_bytes(path: Path) -> int:
    """A file's size, or the size of the files under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def pack_cache(
    cache: Path, out: Path, part_size: int = MAX_FILE, parts: int = CACHE_PARTS, total: int = MAX_TOTAL
) -> str:
    """`cache` as out/compile_cache.tar.gz.0, .1, ... of at most `part_size` bytes each, if `parts` of them
    hold it, and with the files already in `out` no more than `total` bytes: the whole cache, else its
    AOTAutograd and FX graph entries alone (CACHE_CORE), else nothing. Each part is written under a
    temporary name and then renamed: a call cut short leaves no truncated part. Says what it did."""
    names = sorted(p.name for p in cache.iterdir() if p.name not in CACHE_SKIP) if cache.is_dir() else []
    if not names:
        return "compile cache: empty, not packed"
    used = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and not f.name.startswith(CACHE_NAME))
    limit = min(part_size * parts, total - used)
    whole = cache.parent / f"{cache.name}.packed.tar.gz"  # beside it: nothing half-written in `out`
    tiers = [("whole", names), ("AOTAutograd and FX graph entries", [n for n in names if n in CACHE_CORE])]
    said = []
    for label, chosen in tiers:
        raw = sum(_folder_bytes(cache / n) for n in chosen)
        if not chosen or raw > 10 * limit:  # not worth compressing: it would not fit
            said.append(f"{label}: {raw / 2**20:.0f} MiB unpacked, not tried")
            continue
        size = _tar_gz(cache, chosen, whole)
        if size > limit:
            said.append(f"{label}: {size / 2**20:.1f} MiB packed, over the {limit / 2**20:.1f} MiB left")
            continue
        needed = -(-size // part_size)
        with open(whole, "rb") as f:
            for i in range(needed):
                part = out / f"{CACHE_NAME}.{i}"
                part.with_name(f".{part.name}.writing").write_bytes(f.read(part_size))
                os.replace(part.with_name(f".{part.name}.writing"), part)
        whole.unlink()
        kept = f"compile cache ({label}): {size / 2**20:.1f} MiB in {needed} part(s) {CACHE_NAME}.N"
        return "; ".join([kept, *said])
    whole.unlink(missing_ok=True)
    return "compile cache not kept: " + "; ".join(said)


def unpack_cache(carried: Path, cache: Path) -> str:
    """The parts of a packed cache in `carried` (an earlier run's), unpacked into `cache`. Says what it
    did. The archive is this script's own; extracted with tarfile's data filter all the same (no links out
    of the folder, no devices, no permissions beyond the user's)."""
    numbered = {p.suffix[1:]: p for p in carried.glob(f"{CACHE_NAME}.*")}
    if not numbered:
        return "compile cache: none carried (cold compiles)"
    parts = [numbered.get(str(i)) for i in range(len(numbered))]
    if None in parts:
        return f"compile cache: parts {sorted(numbered)} are not 0..{len(numbered) - 1}: not used"
    cache.mkdir(parents=True, exist_ok=True)
    joined = cache.parent / f"{cache.name}.carried.tar.gz"
    unpacked = cache.parent / f"{cache.name}.unpacking"  # whole or not at all: no half-extracted entry
    shutil.rmtree(unpacked, ignore_errors=True)
    with open(joined, "wb") as f:
        for part in parts:
            f.write(part.read_bytes())
    try:
        with tarfile.open(joined) as tar:
            tar.extractall(unpacked, filter="data")
        shutil.copytree(unpacked, cache, dirs_exist_ok=True)
    except (tarfile.TarError, OSError, EOFError, shutil.Error) as err:
        return f"compile cache: the carried parts did not unpack ({err}): cold compiles"
    finally:
        joined.unlink()
        shutil.rmtree(unpacked, ignore_errors=True)
    return f"compile cache: unpacked {len(parts)} carried part(s) into {cache}"


def gpu_memory_gib() -> float | None:
    """The first GPU's memory in GiB, None where nvidia-smi cannot say."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return float(out.stdout.split()[0]) / 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def run_step(step: Step, work: Path, seconds: float, cache: Path | None = None) -> dict:
    """Runs `step` in `work` for at most `seconds`; its output goes to work/<name>.log. With `cache`, every
    compile of the step keeps its graphs and kernels there."""
    env = {
        **os.environ,
        **({"ACT_COMPILE_CACHE": str(cache), "TORCHINDUCTOR_CACHE_DIR": str(cache)} if cache else {}),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "PYTHONWARNINGS": "ignore",
        "TORCH_LOGS": "graph_breaks,recompiles",  # what a compiled step breaks on or compiles again
    }
    log = work / f"{step.name}.log"
    start = time.monotonic()
    with open(log, "w") as out:
        out.write(f"$ {shlex.join(step.argv)}\n")
        out.flush()
        # a process group of its own (killpg at its time limit), in this session: a new session
        # (setsid) would outlive a call the device tool ends, holding the GPU for the next call
        proc = subprocess.Popen(
            step.argv, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=os.setpgrp
        )
        try:
            rc = proc.wait(timeout=seconds)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _kill(proc.pid, signal.SIGKILL)
                proc.wait()
            rc, status = None, "timed out"
    text = log.read_text(errors="replace")
    if status == "failed" and "OutOfMemoryError" in text:
        status = "out of GPU memory"
    outcome = {"name": step.name, "status": status, "rc": rc, "seconds": round(time.monotonic() - start, 1)}
    if step.result and (work / step.result).is_file():
        try:
            outcome["result"] = json.loads((work / step.result).read_text())
        except (ValueError, OSError) as err:  # cut short by the time limit: the log still has the output
            outcome["result_error"] = repr(err)
    return outcome


def _kill(group: int, sig: int) -> None:
    """Signals a step's process group, which may have ended on its own in the meantime."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def run_all(
    plan: list[Step],
    work: Path,
    budget: float,
    cache: Path | None = None,
    previous: list[dict] = (),
    done: Callable[[list[dict]], None] = lambda outcomes: None,
    gpu_gib: float | None = None,
) -> list[dict]:
    """Runs the steps of `plan` that the budget, `after` and `unless` allow, calling `done` with the
    outcomes so far after each. `previous`: an earlier call's outcomes (--previous), which `after` and
    `unless` also read (the steps it ran, and those it skipped for a step that did not pass or one that
    did: their dependents are skipped as they were); a step neither call ran or decided (one skipped for
    the budget) is unknown: its dependents run. `gpu_gib`: the
    card's memory in GiB, for `min_gpu_gib` (None: unknown, every step runs). A `required` step that
    does not pass skips every later one."""
    deadline = time.monotonic() + budget
    outcomes: list[dict] = []
    for step in plan:
        left = deadline - time.monotonic()
        passed = {o["name"]: o["status"] == "ok" for o in previous if decided(o)}
        passed.update({o["name"]: o["status"] == "ok" for o in outcomes})
        broken = [s.name for s in plan if s.required and passed.get(s.name) is False]
        if broken:
            outcomes.append({"name": step.name, "status": f"skipped ({broken[0]} did not pass)"})
            continue
        if step.after in passed and not passed[step.after]:
            outcomes.append({"name": step.name, "status": f"skipped ({step.after} did not pass)"})
            continue
        if passed.get(step.unless):
            outcomes.append({"name": step.name, "status": f"skipped ({step.unless} passed)"})
            continue
        if gpu_gib is not None and gpu_gib < step.min_gpu_gib:
            status = f"skipped ({gpu_gib:.0f} GiB on the GPU, needs {step.min_gpu_gib})"
            outcomes.append({"name": step.name, "status": status})
            continue
        if left < step.needs:
            outcomes.append({"name": step.name, "status": f"skipped ({left:.0f} s left, needs {step.needs})"})
            continue
        print(f"{step.name} (at most {min(step.timeout, left):.0f} s) ...", flush=True)
        began = time.monotonic()
        try:
            outcomes.append(run_step(step, work, min(step.timeout, left), cache))
        except Exception as err:  # noqa: BLE001 - this script's own fault: recorded, the next step runs
            seconds = round(time.monotonic() - began, 1)
            outcomes.append({"name": step.name, "status": f"error: {err!r}", "seconds": seconds})
        print(f"  {outcomes[-1]['status']} in {outcomes[-1]['seconds']} s", flush=True)
        done(outcomes)
    return outcomes


def read_previous(path: Path, parser: argparse.ArgumentParser) -> list[dict]:
    """The outcomes of an earlier call's summary.json (--previous), read before anything is unpacked or
    run: a missing or foreign file is refused in one line."""
    try:
        steps = json.loads(path.read_text())["steps"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        parser.error(
            f"--previous {path}: not an earlier call's summary.json ({err!r}); copy it from files_at"
        )
    if not isinstance(steps, list) or not all(isinstance(o, dict) and "name" in o for o in steps):
        parser.error(f"--previous {path}: its steps are not a list of outcomes")
    return steps


def decided(outcome: dict) -> bool:
    """Whether an outcome says if its step passed: it ran, or it was skipped for another step's outcome
    (and so did not pass); not one skipped for the time left or the card's memory."""
    status = outcome.get("status", "")
    return "seconds" in outcome or status.endswith(" did not pass)") or status.endswith(" passed)")


def _fmt(value, spec: str = ",.2f") -> str:
    return "-" if value is None else format(value, spec)


def profile_lines(profile: dict) -> list[str]:
    """Per variant and kind of iteration: wall time, idle fraction, launches, syncs; the sync check."""
    lines = [
        "| variant | iteration | wall ms | device idle | kernel launches | host syncs |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in profile["variants"].items():
        rows = {
            **v["kinds"],
            f"mean at r1_interval={v['r1_interval']}": v["per_iteration_at_r1_interval"] or {},
        }
        for kind, k in rows.items():
            idle = _fmt(k.get("device_idle_fraction"), ".1%")
            if k.get("not_traced"):  # no kernel in the trace: the device figures measure nothing
                idle += f" (no kernels traced in {k['not_traced']:.0%}: not measured)"
            lines.append(
                f"| {name} | {kind} | {_fmt(k.get('wall_ms'), ',.1f')} | {idle} | "
                f"{_fmt(k.get('kernel_launches'), ',.0f')} | {_fmt(k.get('host_syncs_total'), ',.1f')} |"
            )
    for name, v in profile["variants"].items():
        timed = v.get("timed") or {}
        if timed.get("it_per_s"):
            lines.append(f"\n{name}, not profiled: {timed['it_per_s']:.3f} it/s over {timed['iterations']}")
    for name, v in profile["variants"].items():
        sync = v["sync_debug"]
        if isinstance(sync, dict):
            found = f"{sync['warnings']} synchronising calls under warn, error mode: {sync['error_mode']}"
            lines.append(f"\n{name}: {found}")
            lines += [f"- `{place}`" for place in sync["places"]]
    return lines


def bench_lines(bench: dict) -> list[str]:
    """The defaults, the baseline and each lever (against the defaults), with peak memory."""
    lines = ["| config | variant | it/s | against | peak MB | run s |", "|---|---|---|---|---|---|"]
    seconds = {c: r.get("run_seconds", {}) for c, r in bench["configs"].items()}

    def row(config: str, label: str, rate, against: str, peak) -> None:
        key = {"defaults": "fast", "baseline": "baseline", "defaults + bf16-mixed": "bf16"}.get(
            label, label.replace("defaults + ", "fast+")
        )
        run = "/".join(f"{x:.0f}" for x in seconds[config].get(key, [])) or "-"
        lines.append(
            f"| {config} | {label} | {_fmt(rate, '.3f')} | {against} | {_fmt(peak, ',.0f')} | {run} |"
        )

    for config, r in bench["configs"].items():
        row(config, "defaults", r["iterations_per_s"], "", r["peak_memory_mb"])
        if r.get("baseline_iterations_per_s"):
            speedup = f"defaults {_fmt(r['speedup'])}x"
            row(config, "baseline", r["baseline_iterations_per_s"], speedup, r["baseline_peak_memory_mb"])
        if "bf16" in r:
            row(config, "defaults + bf16-mixed", r["bf16"]["iterations_per_s"], "", None)
        for name, lever in r.get("levers", {}).items():
            speedup = f"{_fmt(lever['speedup'])}x the defaults"
            row(config, f"defaults + {name}", lever["iterations_per_s"], speedup, lever.get("peak_memory_mb"))
    for config, r in bench["configs"].items():
        lines += compile_lines(config, r.get("compile", {}))
    cut = bench.get("cut_short")  # the step stopped at its time limit: the runs it finished
    if cut:
        lines.append(f"\n{cut['config']}, stopped before its end; the runs it finished:")
        lines += [
            f"- {name}: {', '.join(f'{x:.3f}' for x in rates)} it/s" for name, rates in cut["runs"].items()
        ]
        lines += compile_lines(cut["config"], cut.get("compile", {}))
    return lines


def compile_lines(config: str, compiled: dict) -> list[str]:
    """What torch.compile did in each compiled variant (bench_train's CompileWatch): graphs, breaks, cache
    hits, every graph inductor left without CUDA graphs, with its reason, and every operation it cut out
    of one (graph partitioning), with its reason."""
    lines = []
    for name, c in compiled.items():
        fx, aot = c["fx_graph_cache"], c["aot_autograd_cache"]
        lines.append(
            f"\n{config} {name.replace('fast+', 'defaults + ')}: {c['graphs']} graphs, {c['graph_breaks']} "
            f"graph breaks; FX graph cache {fx['hits']} hits / {fx['misses']} misses, AOTAutograd cache "
            f"{aot['hits']} / {aot['misses']}; CUDA graphs skipped: {c['cudagraph_skips']}, recorded "
            f"{c['cudagraph_recordings']} times, {c['cudagraph_recordings_timed']} after the clock started; "
            "the slow (compiling) iterations: "
            + (", ".join(f"{k}: {v} s" for k, v in c.get("slow_iterations", {}).items()) or "none")
        )
        if c["cudagraph_recordings_timed"]:
            lines.append(
                f"- **not a valid timing**: {c['cudagraph_recordings_timed']} CUDA graph recordings timed"
            )
        lines += [f"- {reason}" for reason in c["cudagraph_skip_reasons"]]
        cuts = c.get("cudagraph_partitions", [])  # (results from before the watch kept them: none)
        lines += [f"- cut out of a CUDA graph, {cut}" for cut in cuts]
    return lines


def fid_lines(result: dict) -> list[str]:
    """The 50k FID's wall clock and where it went: evaluate's stages (`stage_seconds`); what they leave of
    the wall clock is the interpreter's start, the imports and Hydra."""
    inner = result["results"]["1-step"].get("seconds")
    lines = [
        f"{result['num_samples']:,}-sample FID end to end: {result['wall_seconds']:.1f} s "
        f"(the sampler's own seconds in evaluate's report: {_fmt(inner, '.1f')} s)"
    ]
    stages = result.get("stage_seconds")
    if stages:  # an evaluate from before the stages were timed has none
        start = result["wall_seconds"] - stages["total"]
        parts = ", ".join(f"{name} {value:.1f}" for name, value in stages.items() if name != "total")
        lines.append(f"stages (s): start-up and imports {start:.1f}, {parts}")
    return lines


def summary_markdown(outcomes: list[dict], machine: str, notes: list[str] = ()) -> str:
    lines = ["# Device check (issue 21)", "", machine, *[f"\n{n}" for n in notes], ""]
    lines += ["| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {o['name']} | {o['status']} | {o.get('seconds', '-')} |" for o in outcomes]
    for o in outcomes:
        if "result" not in o:
            continue
        lines += ["", f"## {o['name']}", ""]
        try:
            result = o["result"]
            if "wall_seconds" in result:  # fid_50k: evaluate's own timings beside the total
                lines += fid_lines(result)
            else:
                lines += profile_lines(result) if "variants" in result else bench_lines(result)
        except Exception as err:  # noqa: BLE001 - a result of another shape: the JSON still has it
            lines.append(f"(no table: {err!r}; see summary.json)")
    return "\n".join(lines) + "\n"


def tail(path: Path, limit: int = 60_000) -> str:
    text = path.read_text(errors="replace") if path.is_file() else "(no log)"
    return text if len(text) <= limit else f"[... {len(text) - limit} characters]\n" + text[-limit:]


def write_outputs(outcomes: list[dict], work: Path, out: Path, machine: str, notes: list[str] = ()) -> None:
    """summary.md, summary.json, profile.md, logs.txt and traces.tar (each under the tool's 16 MiB)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary_markdown(outcomes, machine, notes))
    summary = {"machine": machine, "notes": list(notes), "steps": outcomes}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logs = [f"===== {o['name']}: {o['status']}\n{tail(work / (o['name'] + '.log'))}" for o in outcomes]
    (out / "logs.txt").write_text("\n".join(logs)[-MAX_FILE:])
    names = ("profile", "profile_compiled", "profile_cuda_graphs_flex_r1", "profile_cuda_graphs_classic")
    profiles = [work / d / "profile.md" for d in names]
    (out / "profile.md").write_text(
        "\n".join(p.read_text() for p in profiles if p.is_file()) or "(no profile)\n"
    )
    # one iteration without R1 of each variant first (the eager "before" is the largest), then the R1
    # iterations; smallest first within each, as many as fit
    traces = sorted(
        work.glob("profile*/trace_*.json.gz"),
        key=lambda p: (not p.name.endswith("_no_r1.json.gz"), p.stat().st_size),
    )
    total = 0
    with tarfile.open(out / "traces.tar", "w") as tar:
        for path in traces:
            if total + path.stat().st_size > MAX_FILE:
                continue
            total += path.stat().st_size
            tar.add(path, arcname=f"{path.parent.name}_{path.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=480, help="seconds for all steps together")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", ROOT / "benchmarks" / "results" / "device_check")),
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/act_device_check"),
        help="the steps' own outputs, in a new sub-folder for each call",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("/tmp/act_compile_cache"),
        help="inductor's cache for every step; packed into --out at the end",
    )
    parser.add_argument(
        "--carried",
        type=Path,
        default=ROOT / ".compile_cache",
        help="where an earlier run's packed cache (compile_cache.tar.gz.N) was carried to",
    )
    parser.add_argument("--only", nargs="*", default=None, help="these steps alone, in this order")
    parser.add_argument(
        "--previous",
        type=Path,
        default=None,
        help="an earlier call's summary.json: its outcomes decide `after` and `unless` steps too",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the steps and exit")
    args = parser.parse_args()
    by_name = {s.name: s for s in steps()}
    unknown = sorted(set(args.only or ()) - set(by_name))
    if unknown:
        parser.error(f"--only: no step named {', '.join(unknown)}; the steps: {', '.join(by_name)}")
    plan = list(by_name.values()) if args.only is None else [by_name[n] for n in args.only]
    previous = read_previous(args.previous, parser) if args.previous else []
    if args.dry_run:
        for s in plan:
            print(f"{s.name}\t{s.timeout}\t{s.needs}\t{shlex.join(s.argv)}")
        return
    # a folder of this call's own: a second call on the warm machine never reports the first one's
    # results, profiles or traces as its own (a step that fails there leaves the earlier result file)
    args.work = args.work / time.strftime("call_%Y%m%d-%H%M%S")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{os.uname().nodename}; {time.strftime('%Y-%m-%d %H:%M')}; budget {args.budget:.0f} s"
    notes = [unpack_cache(args.carried, args.cache)]
    print(notes[0], flush=True)

    def write(outcomes: list[dict]) -> None:  # after every step: a call cut short returns what it found
        write_outputs(outcomes, args.work, args.out, machine, notes)

    gpu_gib = gpu_memory_gib()
    budget = args.budget - (time.monotonic() - STARTED)  # the unpacking and nvidia-smi count too
    outcomes = run_all(plan, args.work, budget, args.cache, previous, write, gpu_gib)
    write(outcomes)
    try:
        notes.append(pack_cache(args.cache, args.out))
    except Exception as err:  # noqa: BLE001 - the results are written already; only the cache is lost
        notes.append(f"compile cache not kept: {err!r}")
    write(outcomes)
    print((args.out / "summary.md").read_text())


if __name__ == "__main__":
    main()
