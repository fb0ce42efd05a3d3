"""Where an ACT iteration's time goes: torch.profiler over a few CIFAR-10 iterations, those with the R1
pass and those without reported apart, for the baseline (`perf=baseline`) and the library's defaults.

Per kind of iteration: the top 20 operators by self time on the device (on the CPU: CPU time), the
device's idle fraction, kernel launches (on the CPU the aten operator calls stand in for them), host
synchronisations (cudaStreamSynchronize, cudaDeviceSynchronize, cudaEventSynchronize and device-to-host
copies in the trace), and a Chrome trace of one iteration of each kind. On a GPU, one iteration of each
kind then runs under `torch.cuda.set_sync_debug_mode("warn")`, which names every synchronising call with
its Python stack, and one under "error", the proof that none is left.

The profiled run sets model.r1_interval=2 (--r1-interval), so both kinds come in few iterations (R1 at
even k); an iteration costs the same whatever the interval, and the report also gives the average over
the experiment's own interval. The module, trainer and batches are bench_train.py's.

Writes profile.json, profile.md and trace_<variant>_<kind>.json.gz into --out.

    python benchmarks/profile_train.py                          # GPU: 80 + 80; CPU: 4 + 4
    python benchmarks/profile_train.py --variants defaults --set model.speed.compile=true --out /tmp/p
    python benchmarks/profile_train.py --variants defaults --timed 16    # its speed unprofiled too
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.autograd import DeviceType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_train import BASELINE, CPU_PLAN, LEVERS, CompileWatch, compose_cfg, experiment_batch, fit  # noqa: E402

# float32_levers: the defaults with classic attention and NCHW (bench_train.py's lever; on demand)
VARIANTS = {"baseline": BASELINE, "defaults": [], "float32_levers": LEVERS["float32_levers"]}
DEFAULT_VARIANTS = ["baseline", "defaults"]
ITERATION = "act_iteration"  # the record_function range around each profiled iteration
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# the host's launch calls: under CUDA graphs one cudaGraphLaunch runs a graph's many kernels, which the
# device's kernel count still counts one by one
LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
)
TOP = 20


def _union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def _is_device(event) -> bool:
    """A kernel, copy or memset on the device: not a record_function range mirrored on the device's
    timeline (the iteration's own range spans it whole, so counting it made the device look busy)."""
    return (
        event.device_type == DeviceType.CUDA
        and not getattr(event, "is_user_annotation", False)
        and event.name != ITERATION
    )


# Where the time goes, by what launched it: the first rule that matches a kernel's chain of operators
# (outermost first, "autograd::engine::evaluate_function: XBackward0" for the backward of X) or its own
# name decides its family.
FAMILIES = (
    # model.speed.flex_attention: inductor's flash-attention template (its kernels are `triton_tem_*`;
    # under max-autotune matmul templates would be counted here too)
    ("attention (flex_attention, Triton)", (), ("flex_attention", "triton_tem_")),
    # inductor's generated kernels (compiled networks): fused elementwise work and reductions
    ("fused by inductor (Triton)", (), ("triton_",)),
    ("layout copies (contiguous)", ("aten::contiguous",), ()),
    (
        "attention",
        ("scaled_dot_product", "Attention", "bmm", "softmax", "Softmax", "Bmm"),
        ("fmha", "attention"),
    ),
    (
        "convolutions: matrix kernels",
        (),
        (
            "xmma",
            "gemm",
            "cutlass",
            "cudnn_convolution",
            "mkldnn_convolution",
            "convolution_backward",
            "conv_depthwise",
            "implicit",
        ),
    ),
    ("convolutions: bias and other elementwise", ("conv", "Convolution"), ()),
    (
        "group norm",
        ("group_norm", "GroupNorm"),
        ("GroupNorm", "group_norm", "RowwiseMoments", "GammaBeta", "ComputeInternalGradients"),
    ),
    ("optimisers and EMA", ("Optimizer.", "_foreach", "lerp"), ("multi_tensor_apply",)),
    ("linear layers", ("linear", "addmm", "aten::mm", "Addmm", "MmBackward"), ()),
    ("pooling and resizing", ("pool", "Pool", "upsample", "Upsample", "interpolate"), ()),
    (
        "reductions",
        ("aten::sum", "aten::mean", "aten::norm", "aten::var", "SumBackward", "MeanBackward"),
        ("reduce_kernel",),
    ),
)


def family(chain: list[str], leaf: str) -> str:
    """The family of one kernel (on the CPU: one innermost operator) launched under `chain`."""
    for name, ops, leaves in FAMILIES:
        if any(o in c for o in ops for c in chain) or any(k in leaf for k in leaves):
            return name
    return "elementwise and other"


def breakdown(items: list[tuple[list[str], str, float]]) -> dict[str, dict]:
    """Time (ms) and count per family, most first; items are (chain, leaf name, microseconds)."""
    out: dict[str, dict] = {}
    for chain, leaf, us in items:
        entry = out.setdefault(family(chain, leaf), {"ms": 0.0, "count": 0})
        entry["ms"] += us / 1e3
        entry["count"] += 1
    return _ranked(out)


def _ranked(families: dict[str, dict]) -> dict[str, dict]:
    """{family: {ms, count}} most time first, each with its share of the total."""
    total = sum(e["ms"] for e in families.values()) or 1.0
    ranked = sorted(families.items(), key=lambda item: -item[1]["ms"])
    return {name: {**e, "share": e["ms"] / total} for name, e in ranked}


GRAPH_CALL = "## Call CompiledFxGraph"  # inductor's range around one compiled graph's kernels
NOT_COMPILED = "not compiled (eager)"


def graph_of(chain: list[str]) -> str:
    """Which compiled graph launched a kernel: the forward of a dynamo frame ("Torch-Compiled Region:
    0/1" is frame 0's second compile) or a backward (named by its graph's hash), else not compiled."""
    call = next((c for c in chain if c.startswith(GRAPH_CALL)), None)
    if call is None:
        return NOT_COMPILED
    graph = call.removeprefix(GRAPH_CALL).strip(" #")[:10]
    if any("CompiledFunctionBackward" in c for c in chain):
        return f"backward {graph}"
    region = next((c for c in chain if c.startswith("Torch-Compiled Region")), "forward")
    return f"{region.removeprefix('Torch-Compiled Region: ')} forward {graph}"


def by_graph(items: list[tuple[list[str], str, float]], calls: list) -> dict[str, dict] | None:
    """Kernel time, kernels and host time (the graph's call, as profiled) per compiled graph, in the
    order the graphs ran; None when nothing was compiled."""
    out: dict[str, dict] = {}
    for event in calls:  # in the order they started
        entry = out.setdefault(graph_of(_chain(event)), {"ms": 0.0, "count": 0, "host_ms": 0.0})
        entry["host_ms"] += (event.time_range.end - event.time_range.start) / 1e3
    if not out:
        return None
    for chain, _leaf, us in items:
        entry = out.setdefault(graph_of(chain), {"ms": 0.0, "count": 0, "host_ms": 0.0})
        entry["ms"] += us / 1e3
        entry["count"] += 1
    return out


def _chain(event) -> list[str]:
    names = []
    while event is not None:
        if event.name != ITERATION:
            names.append(event.name)
        event = event.cpu_parent
    return names[::-1]


def launched(inside: list, cuda: bool) -> list[tuple[list[str], str, float]]:
    """(chain, kernel, microseconds) of every kernel the iteration's operators launched; on the CPU the
    aten operators' self time stands in for kernels."""
    if cuda:
        return [(_chain(e), k.name, k.duration) for e in inside for k in getattr(e, "kernels", ())]
    return [(_chain(e), e.name, e.self_cpu_time_total) for e in inside if e.name.startswith("aten::")]


def summarise(prof, cuda: bool) -> dict:
    """One profiled iteration: wall time, device busy time and idle fraction, kernel launches (operator
    calls on the CPU), host synchronisations, and every operator's self time."""
    events = list(prof.events())
    window = next(e for e in events if e.name == ITERATION).time_range
    device = [e for e in events if _is_device(e)]
    copies = [e for e in device if e.name.startswith(("Memcpy", "Memset"))]
    kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset"))]
    inside = [e for e in events if not _is_device(e) and window.start <= e.time_range.start <= window.end]
    out: dict = {"wall_ms": (window.end - window.start) / 1e3}
    items = launched(inside, cuda)
    out["families"] = breakdown(items)
    calls = sorted((e for e in inside if e.name.startswith(GRAPH_CALL)), key=lambda e: e.time_range.start)
    out["graphs"] = by_graph(items, calls)
    if cuda:
        end = max([window.end, *(e.time_range.end for e in device)])
        busy = _union_us([(e.time_range.start, e.time_range.end) for e in device])
        syncs = {name: sum(e.name == name for e in inside) for name in SYNC_CALLS}
        syncs["Memcpy DtoH"] = sum("DtoH" in e.name for e in copies)
        # a copy from pageable host memory makes the host wait for it (the sync found on 2026-12-04, which
        # only torch.cuda.set_sync_debug_mode had named)
        syncs["Memcpy HtoD from pageable memory"] = sum("HtoD (Pageable" in e.name for e in copies)
        out |= {
            # a profiler that traced no kernel (some CUPTI versions trace nothing from CUDA graphs recorded
            # before it started): 1, and this iteration's device figures measure nothing
            "not_traced": int(not kernels),
            "device_busy_ms": busy / 1e3,
            "device_idle_fraction": 1 - busy / (end - window.start),
            "device_idle_ms": (end - window.start - busy) / 1e3,  # waiting for the host: launches, Python
            "kernel_launches": len(kernels),  # kernels run on the device, a CUDA graph's included
            "host_launch_calls": sum(e.name in LAUNCH_CALLS for e in inside),
            "memcpy_memset": len(copies),
            "host_syncs": syncs,
            "host_syncs_total": sum(syncs.values()),
        }
    else:
        out |= {"device_idle_fraction": None, "host_syncs": None, "host_syncs_total": None}
        # innermost aten operators (aten::conv2d calls aten::convolution ... down to the kernel's operator)
        aten = [e for e in inside if e.name.startswith("aten::")]
        out["operator_calls"] = sum(
            not any(c.name.startswith("aten::") for c in e.cpu_children) for e in aten
        )
    out["operators"] = operator_table(prof.key_averages(), cuda)
    return out


def operator_table(averages, cuda: bool) -> dict:
    """Calls and self time of each operator, every microsecond counted once. On a GPU: the kernel time
    of the host-side events that launched it (the kernels themselves and the device's mirror of each
    record_function range, which spans its kernels again, are left out). On the CPU: the self CPU time of
    operators; record_function ranges (Optimizer.step#RAdam.step, the iteration) are not operators, and
    their self time is the Python running between their operators."""
    timed = "self_device_time_total" if cuda else "self_cpu_time_total"
    return {
        a.key: {"calls": a.count, "self_ms": getattr(a, timed) / 1e3}
        for a in averages
        if a.key != ITERATION
        and getattr(a, timed) > 0
        and (a.device_type == DeviceType.CPU if cuda else not getattr(a, "is_user_annotation", False))
    }


def export_trace(prof, path: Path) -> None:
    """The Chrome trace, gzipped: written as JSON, then compressed in 1 MiB pieces (torch's own .gz export
    writes its millions of lines one by one: 3x slower, 6.2-7.3 s against 2.1 s for a 62 MB trace)."""
    with tempfile.TemporaryDirectory(prefix="trace-") as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as fin, gzip.open(path, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)


class ProfileIterations(L.Callback):
    """Profiles iterations `first` .. `first + count - 1`, each in a profiler session of its own (the
    device is synchronised outside the measured range); exports one Chrome trace of each kind."""

    def __init__(self, first: int, count: int, r1_interval: int, trace_prefix: Path, cuda: bool) -> None:
        self.first, self.count, self.r1_interval = first, count, r1_interval
        self.trace_prefix, self.cuda = trace_prefix, cuda
        self.kinds: dict[str, list[dict]] = {"r1": [], "no_r1": []}
        self.traces: dict[str, str] = {}
        self._prof = self._range = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.first <= pl_module.k < self.first + self.count:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._range = torch.profiler.record_function(ITERATION)
        self._range.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._prof is None:
            return
        self._range.__exit__(None, None, None)
        if self.cuda:
            torch.cuda.synchronize()  # the iteration's kernels land in the trace
        self._prof.__exit__(None, None, None)
        kind = "r1" if (pl_module.k - 1) % self.r1_interval == 0 else "no_r1"
        self.kinds[kind].append(summarise(self._prof, self.cuda))
        if kind not in self.traces:
            path = Path(f"{self.trace_prefix}_{kind}.json.gz")
            export_trace(self._prof, path)
            self.traces[kind] = path.name
        self._prof = self._range = None


class SyncDebug(L.Callback):
    """From iteration `first` on, each iteration under `torch.cuda.set_sync_debug_mode`: "warn" for
    `warn_count` iterations (every synchronising call made from Python recorded with its stack), then
    "error" for `error_count` (the first synchronising call raises, also in the backward; none: the
    iterations are free of them). Two of each at consecutive k: an R1 iteration and one without, whatever
    the interval's parity."""

    def __init__(self, first: int, warn_count: int, error_count: int = 2) -> None:
        self.first, self.warn_count, self.error_count = first, warn_count, error_count
        self.warnings: list[dict] = []
        self.error: str | None = None
        self.error_stack: list[str] | None = None
        self.error_iterations: list[int] = []  # the "error" iterations that ran through
        self.mode: str | None = None
        self._caught = None
        self._k: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        k = pl_module.k
        if not self.first <= k < self.first + self.warn_count + self.error_count:
            return
        self._k = k
        self.mode = "warn" if k < self.first + self.warn_count else "error"
        if self.mode == "warn":
            self._caught = warnings.catch_warnings()
            self._caught.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._record(k)
        torch.cuda.set_sync_debug_mode(self.mode)

    def _record(self, k: int):
        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if "synchroniz" not in str(message):
                return
            stack = [
                f"{Path(f.filename).name}:{f.lineno} {f.name}"
                for f in traceback.extract_stack()[:-1]
                if "lightning" in f.filename or "torch/optim" in f.filename
            ]
            self.warnings.append({"iteration": k, "message": str(message)[:200], "stack": stack[-6:]})

        return show

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.mode is None:
            return
        torch.cuda.set_sync_debug_mode(0)
        if self._caught is not None:
            self._caught.__exit__(None, None, None)
            self._caught = None
        if self.mode == "error":
            self.error_iterations.append(self._k)
        self.mode = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Before Lightning's teardown, which moves the optimisers' state to the host (a synchronising
        copy that would raise again and hide the first error)."""
        torch.cuda.set_sync_debug_mode(0)

    def failed(self, err: RuntimeError) -> bool:
        """Records an "error" iteration's synchronising call; False for any other failure (out of memory,
        a bug: raised as it is)."""
        torch.cuda.set_sync_debug_mode(0)
        if self.mode != "error" or "synchroniz" not in str(err):
            return False
        self.error = "".join(traceback.format_exception_only(err)).strip()[:2000]
        frames = traceback.extract_tb(err.__traceback__)
        self.error_stack = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames][-12:]
        return True

    def report(self) -> dict:
        return {
            "warn_iterations": self.warn_count,
            "warnings": len(self.warnings),
            "places": sorted({" <- ".join(reversed(w["stack"])) for w in self.warnings}),
            "error_iterations": self.error_iterations,
            "error_mode": "passed" if len(self.error_iterations) == self.error_count else self.error,
            "error_stack": self.error_stack,
        }


class TimedWindow(L.Callback):
    """Iterations per second over iterations `start` .. `start + count - 1`, not profiled, with R1 at the
    experiment's own interval `r1_interval` (the profiled ones run it every `--r1-interval`), the device
    synchronised at both ends. Compiling in the warm-up before it, one process gives a compiled
    iteration's speed and its profile."""

    def __init__(self, start: int, count: int, r1_interval: int, cuda: bool) -> None:
        self.start, self.stop, self.r1_interval, self.cuda = start, start + count, r1_interval, cuda
        self.it_per_s: float | None = None
        self.began = self._profiled_interval = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.k == self.start < self.stop:
            self._profiled_interval = pl_module.hparams.r1_interval
            pl_module.hparams.r1_interval = self.r1_interval
            self.began = self._now()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.k == self.stop and self.began is not None:  # k counts the iterations done
            self.it_per_s = (self.stop - self.start) / (self._now() - self.began)
            pl_module.hparams.r1_interval = self._profiled_interval


def profile_variant(name: str, overrides: list[str], args, device: torch.device) -> dict:
    """Warm-up, `--timed` iterations timed without the profiler, the profiled iterations (R1 at even k),
    then on a GPU the sync-debug iterations."""
    cuda = device.type == "cuda"
    first, count = args.warmup + args.timed, 2 * args.iterations
    extra = [*overrides, f"model.r1_interval={args.r1_interval}", *args.set]
    own = compose_cfg(args.config, args.batch, 1, [*overrides, *args.set]).model.r1_interval
    debug_iterations = 4 if cuda else 0  # two under "warn", two under "error" (one of each kind each)
    cfg = compose_cfg(args.config, args.batch, first + count + debug_iterations, extra)
    timed = TimedWindow(args.warmup, args.timed, own, cuda)
    profiler = ProfileIterations(first, count, args.r1_interval, args.out / f"trace_{name}", cuda)
    sync = SyncDebug(first + count, 2) if cuda else None
    watch = CompileWatch() if cfg.model.speed.get("compile") else None  # read even if the run fails
    try:
        fit(cfg, device, warmup=first, callbacks=[timed, profiler, *([sync] if sync else [])], watch=watch)
    except RuntimeError as err:  # the "error" iteration's first synchronising call, or a failure
        if sync is None or not sync.failed(err):
            raise
    kinds = {kind: average(runs) for kind, runs in profiler.kinds.items() if runs}
    return {
        "overrides": extra,
        "kinds": kinds,
        "r1_interval": own,
        "per_iteration_at_r1_interval": weighted(kinds, own),
        "timed": {"iterations": args.timed, "it_per_s": timed.it_per_s, "r1_interval": own},
        "traces": profiler.traces,
        "sync_debug": sync.report() if sync else "n/a on the CPU",
        # recordings after the clock started: in the timed or the profiled iterations (none expected)
        "compile": watch.report(timed_from=timed.began) if watch else None,
    }


def average(runs: list[dict]) -> dict:
    """The mean of several iterations' summaries (operators: mean self time and calls per iteration)."""
    out: dict = {"iterations": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = sum(r[key] for r in runs) / len(runs)
        elif key == "families":  # each family's mean over the runs (0 in a run without it)
            means: dict[str, dict] = {}
            for r in runs:
                for name, e in r[key].items():
                    mean = means.setdefault(name, {"ms": 0.0, "count": 0.0})
                    mean["ms"] += e["ms"] / len(runs)
                    mean["count"] += e["count"] / len(runs)
            out[key] = _ranked(means)
        elif key == "graphs" and value is not None:  # each graph's mean of every figure
            out[key] = {
                g: {f: sum(r[key].get(g, {}).get(f, 0) for r in runs) / len(runs) for f in figures}
                for g, figures in value.items()
            }
        elif key == "host_syncs" and value is not None:
            out[key] = {k: sum(r[key][k] for r in runs) / len(runs) for k in value}
        elif key != "operators":
            out[key] = value
    names = {n for r in runs for n in r["operators"]}
    ops = {
        n: {
            "calls": sum(r["operators"].get(n, {}).get("calls", 0) for r in runs) / len(runs),
            "self_ms": sum(r["operators"].get(n, {}).get("self_ms", 0.0) for r in runs) / len(runs),
        }
        for n in names
    }
    total = sum(o["self_ms"] for o in ops.values()) or 1.0
    top = sorted(ops.items(), key=lambda item: -item[1]["self_ms"])[:TOP]
    out["operators_self_ms_total"] = total
    out["top_operators"] = [{"name": n, **o, "share": o["self_ms"] / total} for n, o in top]
    return out


def weighted(kinds: dict, interval: int) -> dict | None:
    """Per iteration over the experiment's lazy R1 schedule: one R1 iteration in every `interval`."""
    if set(kinds) != {"r1", "no_r1"}:
        return None
    keys = ("wall_ms", "device_busy_ms", "kernel_launches", "host_launch_calls", "operator_calls")
    keys += ("host_syncs_total",)
    r1, plain = kinds["r1"], kinds["no_r1"]
    return {
        k: (r1[k] + (interval - 1) * plain[k]) / interval
        for k in keys
        if isinstance(r1.get(k), (int, float)) and isinstance(plain.get(k), (int, float))
    }


def _ms(value) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def markdown(report: dict) -> str:
    """The summary and top-20 tables of every variant."""
    cuda = report["device"] == "cuda"
    launches = (
        "kernel launches" if cuda else "innermost aten operator calls (standing in for kernel launches)"
    )
    ranked = "self device time" if cuda else "self CPU time"
    lines = [
        f"# Profile: {report['config']}, {report['batch']} + {report['batch']}",
        "",
        report["machine"],
        "",
    ]
    for name, v in report["variants"].items():
        lines += [f"## {name} ({' '.join(v['overrides']) or 'the defaults'})", ""]
        lines += [
            f"| iteration | wall ms | device busy ms | device idle | {launches} | host launch calls "
            "| host syncs |"
        ]
        lines += ["|---|---|---|---|---|---|---|"]
        rows = {
            **v["kinds"],
            f"mean at r1_interval={v['r1_interval']}": v["per_iteration_at_r1_interval"] or {},
        }
        for kind, k in rows.items():
            idle, calls = k.get("device_idle_fraction"), k.get("kernel_launches", k.get("operator_calls"))
            idle = "n/a" if idle is None else f"{idle:.1%}"
            if k.get("not_traced"):  # a fraction of the iterations, averaged
                idle = f"{idle} (no kernels traced in {k['not_traced']:.0%} of them: not measured)"
            lines.append(
                f"| {kind} | {_ms(k.get('wall_ms'))} | {_ms(k.get('device_busy_ms'))} | {idle} | "
                f"{_ms(calls)} | {_ms(k.get('host_launch_calls'))} | {_ms(k.get('host_syncs_total'))} |"
            )
        sync = v["sync_debug"]
        timed = v.get("timed") or {}
        if timed.get("it_per_s"):
            lines += [
                "",
                f"Not profiled: {timed['it_per_s']:.3f} it/s over {timed['iterations']} iterations "
                f"(R1 every {timed['r1_interval']}, as the experiment runs it)",
            ]
        lines += ["", f"Sync debug mode: {sync if isinstance(sync, str) else json.dumps(sync)}", ""]
        if v.get("compile"):
            lines += [f"Compiled: {json.dumps(v['compile'])}", ""]
        for kind, k in v["kinds"].items():
            time_of = "kernel time" if cuda else "aten operators' self CPU time"
            lines += [f"Where the {time_of} goes, {kind} (per iteration; what launched it):", ""]
            lines += ["| family | ms | share | kernels |" if cuda else "| family | ms | share | calls |"]
            lines += ["|---|---|---|---|"]
            for fam, f in k.get("families", {}).items():
                lines.append(f"| {fam} | {f['ms']:,.2f} | {f['share']:.1%} | {f['count']:,.0f} |")
            if cuda:
                lines.append(f"| (device idle: waiting for the host) | {_ms(k.get('device_idle_ms'))} | | |")
            lines.append("")
            if k.get("graphs"):
                lines += [f"By compiled graph, {kind} (per iteration, in the order they ran):", ""]
                head = "kernel ms | kernels" if cuda else "aten self CPU ms | aten calls"
                lines += [f"| graph | {head} | host ms (profiled) |", "|---|---|---|---|"]
                for graph, g in k["graphs"].items():
                    host = "-" if graph == NOT_COMPILED else f"{g['host_ms']:,.1f}"
                    lines.append(f"| {graph} | {g['ms']:,.2f} | {g['count']:,.0f} | {host} |")
                lines.append("")
            lines += [f"Top {TOP} operators by {ranked}, {kind} ({k['iterations']} iterations):", ""]
            lines += ["| operator | calls | self ms | share |", "|---|---|---|---|"]
            for op in k["top_operators"]:
                lines.append(
                    f"| `{op['name']}` | {op['calls']:.0f} | {op['self_ms']:,.2f} | {op['share']:.1%} |"
                )
            lines.append("")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="cifar10")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    parser.add_argument("--set", nargs="*", default=[], help="overrides added to every variant")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--batch", type=int, default=None, help="half-batch (GPU: the experiment's; CPU: reduced)"
    )
    parser.add_argument("--iterations", type=int, default=2, help="profiled iterations of each kind")
    parser.add_argument(
        "--warmup",
        type=int,
        default=4,
        help="iterations before the timed and profiled ones (even; the default runs the R1 pass twice: "
        "under CUDA graphs a graph's second call records it, so nothing timed or profiled records)",
    )
    parser.add_argument("--r1-interval", type=int, default=2, help="R1 every this many iterations here")
    parser.add_argument(
        "--timed",
        type=int,
        default=0,
        help="iterations timed without the profiler after the warm-up, at the experiment's R1 interval "
        "(even; a multiple of that interval gives its mix of iterations exactly)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "profile")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.warmup < 2 or args.warmup % 2:  # the profiled R1 iteration falls on an even k after warm-up
        parser.error(
            f"--warmup must be an even number >= 2 (the clock starts after the warm-up); got {args.warmup}"
        )
    if args.timed < 0 or args.timed % 2:  # the profiled iterations start at an even k after it too
        parser.error(f"--timed must be an even number >= 0; got {args.timed}")
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    cuda = device.type == "cuda"
    args.batch = args.batch or (experiment_batch(args.config) if cuda else CPU_PLAN[args.config][0])
    args.out.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    report = {
        "machine": f"{machine}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}",
        "device": device.type,
        "config": args.config,
        "batch": args.batch,
        "variants": {},
    }
    for name in args.variants:
        print(f"{args.config} {name} ...", flush=True)
        report["variants"][name] = profile_variant(name, VARIANTS[name], args, device)
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "profile.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {args.out}/profile.json, profile.md and the traces", file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
