"""DDP on Lightning's plain `ddp` strategy (a DDP wrapper per network, as ACTModule does it) against
`ddp_find_unused_parameters_true` (Lightning's wrapper of the whole module, searching every backward's
graph for the parameters it used): iterations per second and peak memory, through the training CLI.

On the CPU: two processes (gloo), one thread each, on the quickstart. On a GPU: one process per GPU
(NCCL); with a single GPU that is a world of one, where the comparison shows the cost of the search and
of the whole-module wrapper without any communication. Runs alternate between the strategies and the
table gives medians, because timings on a shared machine swing.

    python benchmarks/bench_ddp.py                                   # CPU, 2 processes, quickstart
    python benchmarks/bench_ddp.py --device cuda --experiment cifar10 --iterations 60
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("ddp", "ddp_find_unused_parameters_true")


class IterationClock(L.Callback):
    """Rank 0 writes the seconds from iteration `warmup` to the last one, and the peak GPU memory."""

    def __init__(self, path: str, warmup: int) -> None:
        self.path, self.warmup, self.start = path, warmup, None

    def _now(self, pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.k == self.warmup:
            if pl_module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            self.start = self._now(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        seconds = self._now(pl_module) - self.start
        cuda = pl_module.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        # what the caching allocator held: whether a run fits a card depends on it too (fragmentation)
        reserved = torch.cuda.max_memory_reserved() / 2**20 if cuda else None
        if trainer.is_global_zero:
            iterations = pl_module.k - self.warmup
            row = {"it_per_s": iterations / seconds, "peak_mb": peak, "peak_reserved_mb": reserved}
            Path(self.path).write_text(json.dumps(row))


def run(strategy: str, args, out: Path) -> dict:
    overrides = [
        f"experiment={args.experiment}",
        "data=synthetic",
        "eval=null",
        "guard=null",
        f"iterations={args.iterations}",
        "callbacks.samples.every_n_iterations=1000000",
        "callbacks.checkpoint.every_n_iterations=1000000",
        f"trainer.strategy={strategy}",
        "logger=csv",
        "+callbacks.clock._target_=bench_ddp.IterationClock",
        f"+callbacks.clock.path={out}",
        f"+callbacks.clock.warmup={args.warmup}",
        f"hydra.run.dir={out.parent / strategy / str(time.monotonic_ns())}",
    ]
    if args.device == "cpu":
        overrides += ["trainer.accelerator=cpu", f"trainer.devices={args.processes}"]
        overrides += ["trainer.precision=32-true"]
    else:
        overrides += ["trainer.accelerator=gpu", "trainer.devices=-1"]
    if args.experiment != "quickstart":
        overrides += ["model.lpips_pretrained=false", f"data.batch_size={args.batch_size}"]
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'benchmarks'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "WANDB_MODE": "offline",
        "PYTHONWARNINGS": "ignore",
    }
    if args.device == "cpu":  # one thread per process: the processes share the cores
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "act_lightning.train", *overrides]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{strategy} failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--processes", type=int, default=2, help="CPU processes (gloo)")
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20, help="iterations before the clock starts")
    parser.add_argument("--batch-size", type=int, default=80, help="images per half-batch (not quickstart)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="JSON file for the results")
    args = parser.parse_args()

    results: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for strategy in STRATEGIES if r % 2 == 0 else reversed(STRATEGIES):  # alternate the order
                results[strategy].append(run(strategy, args, Path(tmp) / f"{strategy}-{r}.json"))
    gpus = torch.cuda.device_count()
    where = f"{args.processes} CPU processes" if args.device == "cpu" else f"{gpus} GPU(s)"
    timed = args.iterations - args.warmup
    print(f"{args.experiment}, {where}, {timed} timed iterations, {args.repeats} runs each")
    print(f"{'strategy':34s} {'it/s (median)':>14s} {'runs':>24s} {'peak MB':>9s}")
    table = {}
    for strategy, runs in results.items():
        rates = [x["it_per_s"] for x in runs]
        peak = max((x["peak_mb"] or 0) for x in runs) or None
        table[strategy] = {"it_per_s": statistics.median(rates), "runs": rates, "peak_mb": peak}
        shown = " ".join(f"{v:.2f}" for v in rates)
        print(f"{strategy:34s} {statistics.median(rates):14.2f} {shown:>24s} {peak or float('nan'):9.0f}")
    speedup = table["ddp"]["it_per_s"] / table["ddp_find_unused_parameters_true"]["it_per_s"]
    print(f"plain ddp / find_unused: {speedup:.2f}x")
    if args.output:
        report = {"config": vars(args), "results": table, "speedup": speedup}
        Path(args.output).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
