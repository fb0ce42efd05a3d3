"""The benchmark scripts' arithmetic and bookkeeping, with the training runs, processes and clocks they
time replaced by stand-ins: a slip here would waste a lent GPU's one run or publish a wrong figure."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.utils import counters
from torch.autograd import DeviceType

from tests.conftest import ROOT, needs_inductor_2_11
from tests.integration.test_benchmarks import _load_benchmark


@pytest.fixture
def lightning_log_levels():
    """The scripts' main() quiets Lightning's loggers: their levels are put back afterwards."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


def _ticks(step: float = 1.0, limit: int = 1000):
    """A perf_counter that moves `step` seconds a call (and stops a loop that would never end)."""
    now = [-step]

    def perf_counter() -> float:
        now[0] += step
        if now[0] > limit * step:
            raise RuntimeError("the clock was read too often: a loop that does not end")
        return now[0]

    return perf_counter


def test_bench_train_plans_the_papers_batch_on_a_gpu_and_the_reduced_one_on_the_cpu():
    bench = _load_benchmark("bench_train")
    parse = bench.build_parser().parse_args
    # 32 timed, 18 of warm-up (R1 and the iteration after it twice before the clock), three repeats
    assert bench.plan("cifar10", True, parse([])) == (80, 32, 18, 3)
    assert bench.plan("imagenet64", False, parse(["--repeats", "5"])) == (2, 2, 1, 2)  # at most 2 on the CPU
    assert bench.plan("cifar10_ect", False, parse([])) == (4, 3, 1, 3)  # others: CIFAR-10-sized
    given = parse(["--warmup", "0", "--iterations", "7", "--batch", "3", "--repeats", "2"])
    assert bench.plan("quickstart", False, given) == (3, 7, 0, 2)  # --warmup 0 is kept, not read as unset


def test_bench_train_builds_each_option_on_the_baseline_each_lever_on_the_defaults_and_set_last():
    bench = _load_benchmark("bench_train")
    s = "model.speed.channels_last=false"
    args = bench.build_parser().parse_args(
        [*("--options", "channels_last", "compile", "tf32", "--levers", "cuda_graphs", "bf16_lpips")]
        + ["--compile", "--set", s]
    )
    assert bench.variants_to_run(False, args, ablate=True) == {
        "baseline": [*bench.BASELINE, s],
        "fast": [s],
        "bf16": [*bench.BF16, s],
        "baseline+channels_last": [*bench.BASELINE, "model.speed.channels_last=true", s],
        "baseline+compile": [*bench.BASELINE, "model.speed.compile=true", s],  # --compile; tf32: GPUs only
        "fast+cuda_graphs": [*bench.LEVERS["cuda_graphs"], s],
        "fast+bf16_lpips": ["model.speed.bf16_lpips=true", s],
    }
    assert set(bench.variants_to_run(False, args, ablate=False)) == {"baseline", "fast"}  # bf16: ablations
    defaults = bench.build_parser().parse_args(["--no-baseline", "--options", "channels_last", "--levers"])
    assert set(bench.variants_to_run(False, defaults, ablate=True)) == {"fast", "bf16"}


def test_bench_train_takes_medians_and_compares_options_with_the_baseline_and_levers_with_the_defaults(
    monkeypatch,
):
    bench = _load_benchmark("bench_train")
    rates = {  # per variant, one a repeat: medians 1, 3, 6, 1.5, 1.5 (means differ)
        "baseline": [1.0, 1.0, 4.0],
        "fast": [2.0, 3.0, 10.0],
        "bf16": [6.0, 6.0, 6.0],
        "baseline+channels_last": [1.5, 1.5, 1.5],
        "fast+gradient_checkpointing": [1.5, 1.5, 1.5],
    }
    args = bench.build_parser().parse_args(
        [*("--options", "channels_last", "--levers", "gradient_checkpointing", "--repeats", "3")]
        + ["--iterations", "4", "--warmup", "2", "--batch", "8"]
    )
    variants = bench.variants_to_run(False, args, ablate=True)
    assert list(variants) == list(rates)
    name_of = {tuple(v): name for name, v in variants.items()}
    calls = []

    def fit(cfg, device, warmup):
        name = name_of[cfg["overrides"]]
        calls.append((name, cfg["iterations"], warmup))
        run = sum(c[0] == name for c in calls) - 1
        out = {"it_per_s": rates[name][run], "seconds": 1.0, "peak_mb": 10.0 * (run + 1)}
        return out | ({"compile": {"run": run}} if name.startswith("fast+") else {})

    monkeypatch.setattr(
        bench, "compose_cfg", lambda c, b, n, extra: {"iterations": n, "overrides": tuple(extra)}
    )
    monkeypatch.setattr(bench, "fit", fit)
    monkeypatch.setattr(bench, "cpu_peak_memory_mb", lambda config, batch, variant: 100.0 + len(variant))
    monkeypatch.setattr(bench, "extra_measurements", lambda *a: {})
    result = bench.measure_config("quickstart", torch.device("cpu"), args, ablate=True)
    assert {(n, w) for _, n, w in calls} == {(6, 2)}  # warm-up + timed iterations, the clock after 2
    assert [calls[5 * r][0] for r in range(3)] == ["baseline", "fast", "bf16"]  # each repeat rotates
    assert (result["batch"], result["timed_iterations"], result["repeats"]) == (8, 4, 3)
    assert (result["iterations_per_s"], result["baseline_iterations_per_s"], result["speedup"]) == (3, 1, 3)
    assert (result["peak_memory_mb"], result["baseline_peak_memory_mb"]) == (100.0, 102.0)
    assert result["options"] == {"channels_last": {"iterations_per_s": 1.5, "speedup": 1.5}}
    lever = result["levers"]["gradient_checkpointing"]
    assert (lever["iterations_per_s"], lever["speedup"], lever["peak_memory_mb"]) == (1.5, 0.5, 101.0)
    assert result["bf16"] == {"iterations_per_s": 6.0, "speedup": 6.0}
    assert result["compile"] == {"fast+gradient_checkpointing": {"run": 2}}  # the last run's
    assert result["runs"]["fast"] == [2.0, 3.0, 10.0]
    # on a GPU the peak is the largest of the runs' (torch's own counter, no probe process)
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    calls.clear()
    on_gpu = bench.measure_config("cifar10", torch.device("cuda"), args, ablate=True)
    assert on_gpu["peak_memory_mb"] == 30.0 and on_gpu["device"] == "NVIDIA H200"


def test_bench_train_derives_tflops_and_model_flop_utilisation_from_the_defaults_rate(monkeypatch):
    bench = _load_benchmark("bench_train")
    args = bench.build_parser().parse_args([])  # sampling on: not for the quickstart
    counted = []  # the overrides the count ran with: --set's, those of every measured variant
    monkeypatch.setattr(
        bench, "flops_per_iteration", lambda config, batch, device, extra=(): counted.append(extra) or 2e9
    )
    monkeypatch.setattr(bench, "measure", lambda *a: pytest.fail("the quickstart has no sampling rate"))
    on_cpu = bench.extra_measurements("quickstart", torch.device("cpu"), args, 4, 3.0)
    assert on_cpu == {"flops_per_iteration": 2e9, "achieved_tflops": pytest.approx(0.006)}
    cfg = SimpleNamespace(trainer=SimpleNamespace(precision="32-true"), tf32=True)
    monkeypatch.setattr(bench, "compose_cfg", lambda *a: cfg)
    monkeypatch.setattr(bench, "peak_tflops", lambda device, precision, tf32: 100.0)
    no_sampling = bench.build_parser().parse_args(["--no-sampling", "--set", "data.global_batch_size=160"])
    on_gpu = bench.extra_measurements("cifar10", torch.device("cuda"), no_sampling, 80, 3.0)
    assert on_gpu["model_flop_utilisation"] == pytest.approx(6e9 / 100e12)
    assert counted == [[], ["data.global_batch_size=160"]]  # two passes of 80 counted as they ran


def test_bench_train_counts_an_iterations_flops_over_the_lazy_r1_schedule(monkeypatch):
    bench = _load_benchmark("bench_train")
    cfg = SimpleNamespace(model=SimpleNamespace(r1_interval=16))
    composed = []
    monkeypatch.setattr(bench, "compose_cfg", lambda *a: composed.append(a) or cfg)
    # iteration 0 runs the R1 pass, iteration 1 does not
    monkeypatch.setattr(
        bench,
        "fit",
        lambda cfg, device, warmup, callbacks: callbacks[0].per_iteration.update({0: 1700, 1: 100}),
    )
    assert bench.flops_per_iteration("cifar10", 4, torch.device("cpu")) == 100 + 1600 / 16
    bench.flops_per_iteration("cifar10", 4, torch.device("cpu"), ["model.r1_interval=2"])
    assert composed[-1] == ("cifar10", 4, 2, ["model.r1_interval=2"])
    with bench._FlopCount() as mode:  # every matmul counted, not the last alone
        a = torch.ones(2, 3)
        a @ torch.ones(3, 4)
        a @ torch.ones(3, 5)
    assert mode.total == 2 * 2 * 3 * 4 + 2 * 2 * 3 * 5


def test_bench_train_picks_the_peak_of_the_cards_model_at_the_runs_precision(monkeypatch):
    bench = _load_benchmark("bench_train")
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda")
    assert bench.peak_tflops(cuda, "bf16-mixed", False) == 989.4
    assert bench.peak_tflops(cuda, "32-true", True) == 494.7
    assert bench.peak_tflops(cuda, "32-true", False) == 67.0
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert bench.peak_tflops(cuda, "32-true", False) is None  # unknown: no MFU


def test_the_compile_watch_counts_the_cuda_graph_recordings_after_the_clock_started():
    bench = _load_benchmark("bench_train")
    watch = bench.CompileWatch()
    watch._record, watch.recordings = object(), [1.0, 2.0, 3.0]  # as if the manager's method were wrapped
    report = watch.report(timed_from=1.5)
    assert (report["cudagraph_recordings"], report["cudagraph_recordings_timed"]) == (3, 2)


def test_the_cpu_memory_probe_resets_the_high_water_mark_after_the_first_iteration_only(monkeypatch):
    bench = _load_benchmark("bench_train")
    written = []

    class Proc:  # /proc/self: the writes to clear_refs kept, a status with its peak
        def __init__(self, path):
            self.path = path

        def write_text(self, text):
            written.append((self.path, text))

        def read_text(self):
            return "VmRSS:\t  1024 kB\nVmHWM:\t  2048 kB\n"

    monkeypatch.setattr(bench, "Path", Proc)
    peak = bench.PeakRSS()
    resets = []
    for k in (1, 2, 3):  # k counts the iterations done
        peak.on_train_batch_end(None, SimpleNamespace(k=k), None, None, k - 1)
        resets.append(len(written))
    peak.on_train_end(None, None)
    assert resets == [1, 1, 1] and written == [("/proc/self/clear_refs", "5")] and peak.peak_mb == 2.0


def test_bench_train_merges_its_configs_into_an_earlier_output_and_prints_the_flops(
    tmp_path, monkeypatch, capsys, lightning_log_levels
):
    bench = _load_benchmark("bench_train")
    seen = []

    def row(batch: int) -> dict:
        none = dict.fromkeys(
            ("baseline_iterations_per_s", "speedup", "peak_memory_mb", "baseline_peak_memory_mb")
        )
        return {**none, "batch": batch, "iterations_per_s": 2.0, "options": {}}

    def measure_config(config, device, args, ablate, progress=None):
        seen.append(ablate)
        if progress is not None:  # --save-every-run: written over the output while measuring
            progress({"fast": [{"it_per_s": 2.0}]})
        return row(4) | {"flops_per_iteration": 2.5e9, "achieved_tflops": 0.005}

    monkeypatch.setattr(bench, "measure_config", measure_config)
    monkeypatch.setattr(bench, "side_by_side", lambda iterations: {"threads=1": [9.0, 9.0]})
    out = tmp_path / "latest.json"
    earlier = {"configs": {"cifar10": row(2), "quickstart": row(2)}, "side_by_side": {"threads=1": [1.0]}}
    out.write_text(json.dumps({**earlier, "machine": "earlier"}))
    argv = ["bench_train.py", "--configs", "quickstart", "--ablate", "--device", "cpu", "--merge", "--output"]
    # the earlier output is read before a run's progress is written over it (it merged that instead)
    monkeypatch.setattr(sys, "argv", [*argv, str(out), "--side-by-side", "0", "--save-every-run"])
    bench.main()
    merged = json.loads(out.read_text())
    assert "cut_short" not in merged
    assert merged["configs"]["cifar10"] == row(2) and merged["configs"]["quickstart"]["batch"] == 4
    assert merged["side_by_side"] == {"threads=1": [1.0]}  # none measured: the earlier one kept
    assert merged["machine"].startswith("earlier; quickstart: ") and seen == [False]  # not in --ablate
    assert "2.5 GFLOP per iteration, 0.005 TFLOP/s" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", [*argv, str(out), "--side-by-side", "5"])
    bench.main()
    assert json.loads(out.read_text())["side_by_side"] == {"threads=1": [9.0, 9.0]}  # the new one


def test_the_ddp_clock_times_the_iterations_after_the_warmup(tmp_path):
    ddp = _load_benchmark("bench_ddp")
    path = tmp_path / "clock.json"
    clock = ddp.IterationClock(str(path), warmup=2)
    clock._now = lambda pl_module: 0.5 * pl_module.k  # half a second an iteration
    module = SimpleNamespace(k=0, device=torch.device("cpu"))
    for k in range(1, 7):
        module.k = k
        clock.on_train_batch_end(None, module, None, None, k - 1)
    clock.on_train_end(SimpleNamespace(is_global_zero=False), module)
    assert not path.exists()  # rank 0 alone writes
    clock.on_train_end(SimpleNamespace(is_global_zero=True), module)
    assert json.loads(path.read_text()) == {"it_per_s": 2.0, "peak_mb": None, "peak_reserved_mb": None}


def test_bench_ddp_alternates_the_strategies_and_reports_medians_and_the_plain_ddp_speedup(
    tmp_path, monkeypatch
):
    ddp = _load_benchmark("bench_ddp")
    rates = {"ddp": [1.0, 2.0, 9.0], "ddp_find_unused_parameters_true": [1.0, 1.0, 1.0]}
    peaks = [None, 5.0, 3.0]
    order = []

    def run(strategy, args, out):
        order.append(strategy)
        r = sum(s == strategy for s in order) - 1
        return {"it_per_s": rates[strategy][r], "peak_mb": peaks[r]}

    monkeypatch.setattr(ddp, "run", run)
    out = tmp_path / "ddp.json"
    monkeypatch.setattr(sys, "argv", ["bench_ddp.py", "--repeats", "3", "--output", str(out)])
    ddp.main()
    report = json.loads(out.read_text())
    plain, search = report["results"]["ddp"], report["results"]["ddp_find_unused_parameters_true"]
    assert (plain["it_per_s"], plain["peak_mb"], search["it_per_s"]) == (2.0, 5.0, 1.0)
    assert report["speedup"] == 2.0  # plain ddp / find_unused
    plain_first = ["ddp", "ddp_find_unused_parameters_true"]
    assert order == [*plain_first, *plain_first[::-1], *plain_first]


def test_bench_ddp_runs_the_training_cli_with_its_clock_one_thread_per_cpu_process(tmp_path, monkeypatch):
    ddp = _load_benchmark("bench_ddp")
    out = tmp_path / "ddp-0.json"
    ran = []

    def run(cmd, cwd, env, capture_output, text):
        ran.append((cmd, env))
        out.write_text(json.dumps({"it_per_s": 3.0, "peak_mb": None}))
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(ddp.subprocess, "run", run)
    args = SimpleNamespace(
        experiment="quickstart", iterations=4, warmup=1, device="cpu", processes=2, batch_size=80
    )
    assert ddp.run("ddp", args, out) == {"it_per_s": 3.0, "peak_mb": None}
    ((cmd, env),) = ran
    assert {"trainer.strategy=ddp", "trainer.devices=2", "+callbacks.clock.warmup=1", "iterations=4"} <= set(
        cmd
    )
    assert env["OMP_NUM_THREADS"] == "1"  # the processes share the cores


def test_bench_fid_rate_counts_images_after_one_warmup_call(monkeypatch):
    fid = _load_benchmark("bench_fid")
    monkeypatch.setattr(fid, "time", SimpleNamespace(perf_counter=_ticks()))
    calls = []
    # clock reads: start 0, then 1 and 2 (a call each), 3 ends the window; 20 images in 4 s
    assert fid.rate(lambda: calls.append(1), 10, 2.5, torch.device("cpu")) == 5.0
    assert len(calls) == 3  # the warm-up call, then two timed
    monkeypatch.setattr(fid, "time", SimpleNamespace(perf_counter=_ticks()))
    assert fid.rate(lambda: None, 10, 0.0, torch.device("cpu")) > 0  # one call at least, however short


def test_bench_fid_measures_the_feature_extractor_and_the_sampler_apart(monkeypatch):
    fid = _load_benchmark("bench_fid")
    now = _ticks()
    extra = [0.0]
    monkeypatch.setattr(fid, "time", SimpleNamespace(perf_counter=lambda: now() + extra[0]))

    def extractor(images):  # ten seconds a call: the slower of the two
        extra[0] += 10.0

    size, extract, sample = fid.measure("quickstart", extractor, 2, 0.0, torch.device("cpu"))
    assert size == 8 and extract < sample


def test_bench_fid_projects_the_evaluation_time_from_both_rates_and_the_distance(monkeypatch, capsys):
    fid = _load_benchmark("bench_fid")

    class Extractor:
        def __init__(self, weights):
            pass

        def to(self, device):
            return self

    monkeypatch.setattr(fid, "InceptionFeatures", Extractor)
    monkeypatch.setattr(fid.np, "cov", lambda x, rowvar: 0.0)
    monkeypatch.setattr(fid, "frechet_distance", lambda *stats: 0.0)
    monkeypatch.setattr(fid, "time", SimpleNamespace(perf_counter=_ticks(60.0)))  # the distance: 60 s
    monkeypatch.setattr(fid, "measure", lambda *a: (32, 100.0, 25.0))
    monkeypatch.setattr(sys, "argv", ["bench_fid.py", "--experiments", "cifar10", "--device", "cpu"])
    fid.main()
    # 1/100 + 1/25 s an image: 50k in 2,500 s and 10k in 500 s, each plus the distance's minute
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cifar10"))
    assert line.split()[1:] == ["32", "100.0", "25.0", "42.7", "m", "9.3", "m"]


class _Loader:
    """A DataModule of batches of 3 + 3 images; it stops a loop that would never end."""

    batch_size = 3

    def __init__(self, **kwargs):
        self.batches = 0

    def prepare_data(self):
        pass

    def setup(self, stage):
        pass

    def train_dataloader(self):
        for _ in range(10):
            self.batches += 1
            assert self.batches < 200, "a loop that does not end"
            yield torch.zeros(6)

    def on_after_batch_transfer(self, batch, index):
        return SimpleNamespace(gen=batch[:3], disc=batch[3:])


def test_bench_data_counts_both_halves_after_the_workers_start(monkeypatch):
    data = _load_benchmark("bench_data")
    made = []
    monkeypatch.setattr(data, "time", SimpleNamespace(perf_counter=_ticks()))

    def loader(**kwargs):
        made.append(_Loader())
        return made[-1]

    # the clock starts after 2 batches (2 x workers with workers), then 4 batches of 6 images, 6 s in all
    assert data.measure(loader, {}, 0, 3.5, torch.device("cpu")) == (4.0, 6)
    assert data.measure(loader, {}, 2, 3.5, torch.device("cpu")) == (4.0, 6)
    assert [m.batches for m in made] == [6, 8]


def test_bench_data_skips_workers_for_the_in_memory_set_and_shows_the_iterations_fed(monkeypatch, capsys):
    data = _load_benchmark("bench_data")
    monkeypatch.setattr(
        data, "build", lambda source, root, scale: [("cifar10", {}), ("cifar10 in_memory", {})]
    )
    measured = []

    def measure(cls, kwargs, workers, seconds, device):
        measured.append(workers)
        return 320.0, 160

    monkeypatch.setattr(data, "measure", measure)
    monkeypatch.setattr(sys, "argv", ["bench_data.py", "--sources", "cifar10", "--workers", "0", "2"])
    data.main()
    assert measured == [0, 2, 0]
    assert capsys.readouterr().out.splitlines()[-1].split()[-4:] == ["0", "320", "160", "2.00"]


def test_the_capture_check_names_each_graphs_kind_and_the_graphs_skipped_unrecorded():
    check = _load_benchmark("capture_check")
    graph = {"fail_reasons": [], "disabled": None, "mutated_inputs": [1], "non_tensor_inputs": []}
    record = check.Record(
        graphs=[{**graph, "backward": False}, {**graph, "backward": True}],
        devices=[["cpu", "cuda:0"]],
        skips=2,
    )
    assert record.problems() == [
        "graph 0 (forward): mutates its inputs [1]",
        "graph 1 (backward): mutates its inputs [1]",
        "a graph on cpu, cuda:0: not one GPU",
        "2 graph(s) skipped before their reasons could be recorded",
    ]


@needs_inductor_2_11
def test_the_capture_check_counts_only_the_skips_of_its_own_run():
    check = _load_benchmark("capture_check")
    counters["inductor"]["cudagraph_skips"] += 5  # an earlier run's
    try:
        with check.watching(pretend=True) as record:
            counters["inductor"]["cudagraph_skips"] += 1
        assert record.skips == 1
    finally:
        counters["inductor"]["cudagraph_skips"] -= 6


def test_the_capture_check_runs_the_candidate_with_the_given_overrides_and_fails_on_a_problem(
    tmp_path, monkeypatch
):
    check = _load_benchmark("capture_check")
    found = check.Record()
    argv = []

    @contextmanager
    def watching():
        yield found

    monkeypatch.setattr(check, "watching", watching)
    monkeypatch.setattr(check.runpy, "run_module", lambda name, run_name: argv.append(sys.argv[1:]))
    out = tmp_path / "capture.json"
    counters.pop("graph_break", None)
    assert check.main(["--out", str(out), "iterations=2"]) == 0
    assert argv[0][:-1] == [*check.CANDIDATE, "iterations=2"]  # the given override last: it wins
    assert json.loads(out.read_text())["overrides"] == [*check.CANDIDATE, "iterations=2"]
    found.cuts.append(["unbacked binding ops", "buf3"])
    counters["graph_break"]["data-dependent branching"] += 1
    try:
        assert check.main(["--out", str(out), "--no-defaults", "iterations=2"]) == 1
    finally:
        counters.pop("graph_break", None)
    assert json.loads(out.read_text())["problems"] == [
        "cut: unbacked binding ops (buf3)",
        "graph break: data-dependent branching (1)",
    ]


def test_profile_device_time_is_the_union_of_the_kernels_intervals():
    profile = _load_benchmark("profile_train")
    assert profile._union_us([(20.0, 30.0), (0.0, 10.0), (5.0, 15.0), (12.0, 14.0)]) == 25.0


def _event(name, start, end, device=DeviceType.CPU, **more):
    return SimpleNamespace(
        name=name,
        device_type=device,
        time_range=SimpleNamespace(start=start, end=end),
        cpu_parent=None,
        **more,
    )


def test_profile_summary_on_a_gpu_counts_idle_time_launches_and_syncs_inside_the_iteration():
    """The device idle until its last kernel ends (past the iteration's range on the host); the iteration's
    range mirrored on the device is no kernel; a synchronising call after the iteration is not its own."""
    profile = _load_benchmark("profile_train")
    cuda = DeviceType.CUDA
    gemm = SimpleNamespace(name="sm90_xmma_gemm", duration=20.0)
    events = [
        _event(profile.ITERATION, 0.0, 100.0),
        _event("aten::mm", 10.0, 12.0, kernels=[gemm]),
        _event("cudaStreamSynchronize", 50.0, 51.0),
        _event("cudaLaunchKernel", 11.0, 11.5),
        _event("cudaGraphLaunch", 20.0, 21.0),  # one launch of a graph's many kernels
        _event("cudaDeviceSynchronize", 150.0, 151.0),  # after the iteration
        _event(profile.ITERATION, 0.0, 100.0, cuda),  # the iteration's range, mirrored on the device
        _event("Optimizer.step#RAdam.step", 0.0, 100.0, cuda, is_user_annotation=True),
        _event("sm90_xmma_gemm", 10.0, 30.0, cuda),
        _event("elementwise_kernel", 60.0, 130.0, cuda),
        _event("Memcpy DtoH (Device -> Pageable)", 40.0, 45.0, cuda),
        _event("Memcpy HtoD (Pageable -> Device)", 5.0, 6.0, cuda),
        _event("Memcpy HtoD (Pageable -> Device)", 7.0, 8.0, cuda),
    ]
    prof = SimpleNamespace(events=lambda: events, key_averages=lambda: [])
    out = profile.summarise(prof, cuda=True)
    busy = 20 + 70 + 5 + 1 + 1
    assert out["wall_ms"] == 0.1 and out["device_busy_ms"] == busy / 1e3
    assert out["device_idle_fraction"] == pytest.approx(1 - busy / 130)
    assert out["device_idle_ms"] == pytest.approx((130 - busy) / 1e3)
    assert (out["kernel_launches"], out["memcpy_memset"], out["host_launch_calls"]) == (2, 3, 2)
    assert out["host_syncs"] == {
        "cudaStreamSynchronize": 1,
        "cudaDeviceSynchronize": 0,
        "cudaEventSynchronize": 0,
        "Memcpy DtoH": 1,
        "Memcpy HtoD from pageable memory": 2,
    }
    assert out["host_syncs_total"] == 4
    assert out["families"]["convolutions: matrix kernels"]["ms"] == 0.02


def test_profile_summary_on_the_cpu_counts_innermost_aten_calls_and_no_range_as_an_operator():
    profile = _load_benchmark("profile_train")
    convolution = _event("aten::convolution", 11.0, 19.0, self_cpu_time_total=8.0, cpu_children=[])
    events = [
        _event(profile.ITERATION, 0.0, 100.0, self_cpu_time_total=60.0, cpu_children=[]),
        _event("aten::conv2d", 10.0, 20.0, self_cpu_time_total=2.0, cpu_children=[convolution]),
        convolution,
        _event("aten::add", 20.0, 25.0, self_cpu_time_total=5.0, cpu_children=[]),
        _event("Optimizer.step#RAdam.step", 30.0, 90.0, self_cpu_time_total=50.0, cpu_children=[]),
    ]
    prof = SimpleNamespace(events=lambda: events, key_averages=lambda: [])
    out = profile.summarise(prof, cuda=False)
    assert out["operator_calls"] == 2  # aten::conv2d calls aten::convolution: one call
    assert sum(f["count"] for f in out["families"].values()) == 3  # aten operators only
    assert sum(f["ms"] for f in out["families"].values()) == pytest.approx(0.015)


def test_profile_iterations_profile_only_their_own_window(tmp_path):
    profile = _load_benchmark("profile_train")
    profiled = profile.ProfileIterations(
        first=4, count=2, r1_interval=2, trace_prefix=tmp_path / "t", cuda=False
    )
    for k in (3, 6):  # before the window, and the iteration after it (the sync check's, on a GPU)
        profiled.on_train_batch_start(None, SimpleNamespace(k=k), None, k)
        assert profiled._prof is None


def test_the_timed_window_divides_its_own_iterations_by_their_seconds():
    profile = _load_benchmark("profile_train")
    window = profile.TimedWindow(start=2, count=4, r1_interval=16, cuda=False)
    window._now = iter([10.0, 12.0]).__next__
    module = SimpleNamespace(k=0, hparams=SimpleNamespace(r1_interval=2))
    for k in range(8):
        module.k = k
        window.on_train_batch_start(None, module, None, k)
        module.k = k + 1
        window.on_train_batch_end(None, module, None, None, k)
    assert window.it_per_s == 2.0  # 4 iterations in 2 s


def test_profile_averages_every_figure_over_the_runs_and_keeps_the_top_twenty_operators():
    profile = _load_benchmark("profile_train")
    ops = {f"aten::op{i}": {"calls": 2, "self_ms": float(i + 1)} for i in range(25)}
    runs = [
        {
            "wall_ms": 10.0,
            "host_syncs": {"a": 1, "b": 3},
            "graphs": {"g": {"ms": 2.0, "count": 4, "host_ms": 1.0}},
            "operators": ops,
        },
        {"wall_ms": 20.0, "host_syncs": {"a": 3, "b": 1}, "graphs": {}, "operators": {}},
    ]
    mean = profile.average(runs)
    assert (mean["iterations"], mean["wall_ms"], mean["host_syncs"]) == (2, 15.0, {"a": 2.0, "b": 2.0})
    assert mean["graphs"] == {"g": {"ms": 1.0, "count": 2.0, "host_ms": 0.5}}
    total = sum(range(1, 26)) / 2
    assert mean["operators_self_ms_total"] == total
    top = mean["top_operators"]
    assert len(top) == 20 and top[-1]["name"] == "aten::op5"
    assert top[0] == {"name": "aten::op24", "calls": 1.0, "self_ms": 12.5, "share": 12.5 / total}


def test_profile_weighs_the_two_kinds_of_iteration_by_the_experiments_r1_interval():
    profile = _load_benchmark("profile_train")
    kinds = {
        "r1": {"wall_ms": 170.0, "operator_calls": 32, "host_syncs_total": None},
        "no_r1": {"wall_ms": 10.0, "operator_calls": 16, "host_syncs_total": None},
    }
    assert profile.weighted(kinds, 16) == {"wall_ms": 20.0, "operator_calls": 17.0}  # unknowns left out
    assert profile.weighted({"no_r1": kinds["no_r1"]}, 16) is None  # one kind alone: no mean


def test_profile_variant_times_at_the_experiments_interval_then_profiles_at_its_own(tmp_path, monkeypatch):
    profile = _load_benchmark("profile_train")
    composed = []

    def compose_cfg(config, batch, iterations, extra):
        intervals = [int(o.split("=")[1]) for o in extra if o.startswith("model.r1_interval=")]
        composed.append((iterations, list(extra)))
        return SimpleNamespace(model=SimpleNamespace(r1_interval=(intervals or [16])[-1], speed={}))

    fitted = []
    monkeypatch.setattr(profile, "compose_cfg", compose_cfg)
    monkeypatch.setattr(
        profile, "fit", lambda cfg, device, warmup, callbacks, watch: fitted.append((warmup, callbacks))
    )
    args = profile.build_parser().parse_args(
        [*("--config", "cifar10", "--batch", "4", "--iterations", "3", "--warmup", "4", "--timed", "16")]
        + ["--set", "model.speed.channels_last=false", "--out", str(tmp_path)]
    )
    result = profile.profile_variant("defaults", [], args, torch.device("cpu"))
    overrides = ["model.r1_interval=2", "model.speed.channels_last=false"]
    assert composed[-1] == (4 + 16 + 2 * 3, overrides) and result["overrides"] == overrides
    assert result["r1_interval"] == 16 and result["timed"] == {
        "iterations": 16,
        "it_per_s": None,
        "r1_interval": 16,
    }
    ((warmup, (timed, profiled)),) = fitted
    assert warmup == 20 and (timed.start, timed.stop, timed.r1_interval) == (4, 20, 16)
    assert (profiled.first, profiled.count, profiled.r1_interval) == (20, 6, 2)


def test_profile_train_refuses_an_odd_timed_window_and_profiles_the_cpus_reduced_batch(
    tmp_path, monkeypatch, capsys, lightning_log_levels
):
    profile = _load_benchmark("profile_train")
    monkeypatch.setattr(sys, "argv", ["profile_train.py", "--timed", "3"])
    with pytest.raises(SystemExit) as stop:
        profile.main()
    assert stop.value.code == 2 and "--timed must be an even number >= 0; got 3" in capsys.readouterr().err
    variant = {"overrides": [], "kinds": {}, "r1_interval": 16, "per_iteration_at_r1_interval": None}
    variant |= {"timed": {}, "sync_debug": "n/a on the CPU", "traces": {}, "compile": None}
    monkeypatch.setattr(profile, "profile_variant", lambda name, overrides, args, device: variant)
    argv = ["profile_train.py", "--device", "cpu", "--variants", "defaults", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    profile.main()
    assert json.loads((tmp_path / "profile.json").read_text())["batch"] == 4  # CIFAR-10's on the CPU


def test_profile_markdown_on_a_gpu_shows_the_idle_fraction_as_a_percentage():
    profile = _load_benchmark("profile_train")
    kind = {"wall_ms": 200.0, "device_busy_ms": 150.0, "device_idle_fraction": 0.25, "kernel_launches": 6000}
    kind |= {
        "host_launch_calls": 90,
        "host_syncs_total": 0,
        "iterations": 1,
        "families": {},
        "top_operators": [],
    }
    variant = {
        "overrides": [],
        "kinds": {"no_r1": kind},
        "r1_interval": 16,
        "per_iteration_at_r1_interval": None,
    }
    variant |= {"sync_debug": {"warnings": 0}}
    report = {
        "device": "cuda",
        "config": "cifar10",
        "batch": 80,
        "machine": "m",
        "variants": {"defaults": variant},
    }
    # 6,000 kernels on the device from 90 launch calls on the host (CUDA graphs launch many at once)
    assert "| no_r1 | 200.0 | 150.0 | 25.0% | 6,000.0 | 90.0 | 0.0 |" in profile.markdown(report)


def test_device_check_gives_a_step_no_more_than_the_budget_left(tmp_path):
    check = _load_benchmark("device_check")
    plan = [check.Step("long", ["bash", "-c", "sleep 20"], 100, 0)]
    (outcome,) = check.run_all(plan, tmp_path, budget=1)
    assert outcome["status"] == "timed out" and outcome["rc"] is None and outcome["seconds"] < 10


def test_device_check_lets_this_calls_outcome_of_a_step_override_the_earlier_calls(tmp_path):
    check = _load_benchmark("device_check")
    ok = ["bash", "-c", "exit 0"]
    plan = [
        check.Step("a", ok, 10, 0),
        check.Step("a_profile", ok, 10, 0, after="a"),
        check.Step("a_fallback", ok, 10, 0, unless="a"),
        check.Step("just_fits", ok, 10, 0, min_gpu_gib=80),
    ]
    previous = [{"name": "a", "status": "failed", "seconds": 1.0}]  # failed before, passes now
    outcomes = check.run_all(plan, tmp_path, 60, previous=previous, gpu_gib=80.0)
    assert [o["status"] for o in outcomes] == ["ok", "ok", "skipped (a passed)", "ok"]


def test_device_check_skips_what_the_earlier_call_skipped_for_another_steps_outcome(tmp_path):
    """A step the first call skipped because its `unless` passed (or its `after` failed) did not pass: a
    second call listing its dependent by hand ran that dependent, a cold compile of minutes. A step the
    first call skipped for the budget is unknown: its dependent runs."""
    check = _load_benchmark("device_check")
    ok = ["bash", "-c", "exit 0"]
    plan = [
        check.Step("fallback_profile", ok, 10, 0, after="fallback"),
        check.Step("b_profile", ok, 10, 0, after="b"),
    ]
    previous = [
        {"name": "fallback", "status": "skipped (candidate passed)"},
        {"name": "b", "status": "skipped (12 s left, needs 60)"},
    ]
    outcomes = check.run_all(plan, tmp_path, 60, previous=previous, gpu_gib=80.0)
    assert [o["status"] for o in outcomes] == ["skipped (fallback did not pass)", "ok"]


def test_device_check_refuses_a_missing_or_foreign_previous_summary_before_unpacking(tmp_path):
    script = str(ROOT / "benchmarks" / "device_check.py")
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"configs": {}}')
    for path, said in ((tmp_path / "none.json", "FileNotFoundError"), (foreign, "KeyError('steps')")):
        args = [sys.executable, script, "--only", "env", "--previous", str(path), "--dry-run"]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60)
        assert (
            done.returncode == 2 and f"--previous {path}: not an earlier call's summary.json" in done.stderr
        )
        assert said in done.stderr


def test_device_check_says_a_step_ran_out_of_gpu_memory_and_keeps_a_result_it_cannot_read(tmp_path):
    check = _load_benchmark("device_check")
    script = "echo torch.OutOfMemoryError: CUDA out of memory; echo '{\"half' > r.json; exit 1"
    outcome = check.run_step(check.Step("big", ["bash", "-c", script], 10, 0, result="r.json"), tmp_path, 10)
    assert outcome["status"] == "out of GPU memory" and outcome["rc"] == 1
    assert "result" not in outcome and outcome["result_error"].startswith("JSONDecodeError")


def test_device_check_compresses_a_cache_larger_than_its_parts_when_it_may_fit(tmp_path):
    check = _load_benchmark("device_check")
    cache = tmp_path / "cache"
    (cache / "fxgraph").mkdir(parents=True)
    (cache / "fxgraph" / "entry").write_bytes(bytes(20_000))  # 20 kB of zeros: a few hundred bytes packed
    out = tmp_path / "out"
    out.mkdir()
    said = check.pack_cache(cache, out, part_size=1000, parts=3)
    assert "(whole)" in said and [p.name for p in out.iterdir()] == ["compile_cache.tar.gz.0"]


def test_device_check_summary_shows_each_variants_runs_speedups_and_launches():
    check = _load_benchmark("device_check")
    row = {"iterations_per_s": 4.0, "baseline_iterations_per_s": 1.6, "speedup": 2.5, "peak_memory_mb": 100.0}
    row |= {"baseline_peak_memory_mb": 50.0, "levers": {"cudnn": {"iterations_per_s": 5.0, "speedup": 1.25}}}
    row["run_seconds"] = {"fast": [11.0], "baseline": [22.0], "fast+cudnn": [33.0, 34.0]}
    lines = check.bench_lines({"configs": {"cifar10": row}})
    assert "| cifar10 | baseline | 1.600 | defaults 2.50x | 50 | 22 |" in lines
    assert "| cifar10 | defaults + cudnn | 5.000 | 1.25x the defaults | - | 33/34 |" in lines
    kind = {"wall_ms": 300.0, "device_idle_fraction": 0.1, "kernel_launches": 6000, "host_syncs_total": 0}
    variant = {"kinds": {"no_r1": kind}, "r1_interval": 16, "per_iteration_at_r1_interval": None}
    variant |= {"timed": {"iterations": 16, "it_per_s": None}, "sync_debug": "n/a on the CPU"}
    text = "\n".join(check.profile_lines({"variants": {"defaults": variant}}))
    assert "| defaults | no_r1 | 300.0 | 10.0% | 6,000 | 0.0 |" in text and "not profiled" not in text


def test_device_check_fid_stages_leave_out_their_total():
    check = _load_benchmark("device_check")
    result = {"num_samples": 50_000, "wall_seconds": 30.0, "results": {"1-step": {"seconds": 9.0}}}
    result["stage_seconds"] = {"networks": 2.0, "samplers": 9.0, "total": 11.0}
    assert check.fid_lines(result)[1] == "stages (s): start-up and imports 19.0, networks 2.0, samplers 9.0"


def test_device_check_refuses_an_unknown_step_and_reads_the_cards_memory_in_gib(monkeypatch, capsys):
    check = _load_benchmark("device_check")
    monkeypatch.setattr(sys, "argv", ["device_check.py", "--dry-run", "--only", "env", "no_such_step"])
    with pytest.raises(SystemExit) as stop:
        check.main()
    assert stop.value.code == 2 and "--only: no step named no_such_step" in capsys.readouterr().err
    monkeypatch.setattr(check.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout="81559\n"))
    assert check.gpu_memory_gib() == 81559 / 1024
    monkeypatch.setattr(check.subprocess, "run", lambda *a, **k: SimpleNamespace(stdout=""))
    assert check.gpu_memory_gib() is None


def test_device_check_keeps_a_short_log_whole_and_the_end_of_a_long_one(tmp_path):
    check = _load_benchmark("device_check")
    log = tmp_path / "step.log"
    log.write_text("0123456789")
    assert check.tail(log, limit=10) == "0123456789"
    assert check.tail(log, limit=4) == "[... 6 characters]\n6789"


def test_the_device_checks_cuda_tests_select_every_test_skipped_without_cuda_and_no_other():
    """cuda_tests selected by name ('gpu or cuda'), which also ran slow CPU tests named after CUDA graphs
    and would miss a CUDA test named otherwise; `-m gpu` takes the marker the collection gives each test
    skipped without CUDA (tests/conftest.py), whether or not its file marks it."""
    check = _load_benchmark("device_check")
    (step,) = [s for s in check.steps() if s.name == "cuda_tests"]
    files = [
        str(ROOT / "tests" / "unit" / name) for name in ("test_divergence.py", "test_benchmarks_logic.py")
    ]
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider"]
    selection = step.argv[step.argv.index("-m") : step.argv.index("-k") + 2]
    done = subprocess.run([*argv, *selection, *files], capture_output=True, text=True, timeout=300, cwd=ROOT)
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert collected == [
        "tests/unit/test_divergence.py::"
        "test_on_cuda_the_guard_waits_for_nothing_zeroes_a_bad_update_and_leaves_overflow_to_the_scaler"
    ], done.stdout[-2000:]


def test_device_check_runs_nothing_after_a_required_step_fails(tmp_path):
    """Without CUDA (the env step's check) every later step would run on the CPU until its time limit, and
    the call would spend the session's device time measuring nothing."""
    check = _load_benchmark("device_check")
    ok = ["bash", "-c", "exit 0"]
    plan = [check.Step("env", ["bash", "-c", "exit 1"], 10, 0, required=True), check.Step("bench", ok, 10, 0)]
    assert [o["status"] for o in check.run_all(plan, tmp_path, 60)] == [
        "failed",
        "skipped (env did not pass)",
    ]
    (env,) = [s for s in check.steps() if s.name == "env"]
    assert env.required and "torch.cuda.is_available()" in env.argv[-1] and "sys.version" in env.argv[-1]


def test_device_checks_warm_up_covers_the_iterations_after_r1_and_the_augmenting_r1_recordings():
    check = _load_benchmark("device_check")
    warmups = {
        s.name: int(s.argv[s.argv.index("--warmup") + 1]) for s in check.steps() if "--levers" in s.argv
    }
    assert warmups["bench_cuda_graphs_flex_r1"] == 18 and warmups["bench_cudnn_benchmark"] == 5
    augmenting = [name for name in warmups if "augmenting" in name]
    assert len(augmenting) == 3 and all(warmups[name] == 33 for name in augmenting)


def test_device_check_packs_no_more_cache_than_the_other_files_leave_and_no_truncated_part(tmp_path):
    check = _load_benchmark("device_check")
    cache = tmp_path / "cache"
    (cache / "fxgraph").mkdir(parents=True)
    (cache / "fxgraph" / "entry").write_bytes(os.urandom(3000))  # does not compress
    out = tmp_path / "out"
    out.mkdir()
    (out / "logs.txt").write_bytes(bytes(8000))
    said = check.pack_cache(cache, out, part_size=2000, parts=3, total=10_000)  # 2,000 bytes left
    assert "not kept" in said and "over the 0.0 MiB left" in said and not list(out.glob("*cache*"))
    (out / "logs.txt").write_bytes(bytes(10))
    said = check.pack_cache(cache, out, part_size=2000, parts=3, total=10_000)
    assert sorted(p.name for p in out.iterdir()) == [
        "compile_cache.tar.gz.0",
        "compile_cache.tar.gz.1",
        "logs.txt",
    ]
    # a part cut short (a call ended while it was copied) unpacks nothing at all, not the first entries
    (cache / "aotautograd").mkdir()
    (cache / "aotautograd" / "first").write_bytes(b"kept whole or not at all")
    check.pack_cache(cache, out, part_size=2000, parts=3, total=10_000)
    last = sorted(out.glob("compile_cache.tar.gz.*"))[-1]
    last.write_bytes(last.read_bytes()[:100])
    fresh = tmp_path / "fresh"
    assert "did not unpack" in check.unpack_cache(out, fresh)
    assert not list(fresh.rglob("*")) and not list(tmp_path.glob("fresh.*"))


def test_device_check_keeps_each_variants_iteration_without_r1_before_any_r1_trace(tmp_path):
    check = _load_benchmark("device_check")
    work, out = tmp_path / "work", tmp_path / "out"
    sizes = {"profile/trace_defaults_no_r1.json.gz": 9000, "profile/trace_defaults_r1.json.gz": 100}
    sizes |= {"profile_compiled/trace_compiled_no_r1.json.gz": 5000}
    for name, size in sizes.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_bytes(bytes(size))
    check.MAX_FILE = 14_050  # both iterations without R1 fit, and then not the R1 trace
    try:
        check.write_outputs([], work, out, "m")
    finally:
        check.MAX_FILE = 15 * 2**20
    with tarfile.open(out / "traces.tar") as tar:
        assert sorted(tar.getnames()) == [
            "profile_compiled_trace_compiled_no_r1.json.gz",
            "profile_trace_defaults_no_r1.json.gz",
        ]


def test_device_check_marks_a_timing_with_a_recording_and_a_profile_without_kernels():
    check = _load_benchmark("device_check")
    compiled = {"graphs": 4, "graph_breaks": 0, "cudagraph_skips": 0, "cudagraph_recordings": 3}
    compiled |= {"fx_graph_cache": {"hits": 0, "misses": 4}, "aot_autograd_cache": {"hits": 0, "misses": 4}}
    compiled |= {"cudagraph_recordings_timed": 1, "cudagraph_skip_reasons": []}
    assert "- **not a valid timing**: 1 CUDA graph recordings timed" in check.compile_lines(
        "cifar10", {"x": compiled}
    )
    compiled["cudagraph_recordings_timed"] = 0
    assert not any("valid" in line for line in check.compile_lines("cifar10", {"x": compiled}))
    kind = {"wall_ms": 300.0, "device_idle_fraction": 1.0, "kernel_launches": 0, "host_syncs_total": 0}
    variant = {"kinds": {"no_r1": kind | {"not_traced": 1.0}}, "r1_interval": 16}
    variant |= {"per_iteration_at_r1_interval": None, "timed": {}, "sync_debug": "n/a"}
    text = "\n".join(check.profile_lines({"variants": {"graphs": variant}}))
    assert "| graphs | no_r1 | 300.0 | 100.0% (no kernels traced in 100%: not measured) | 0 |" in text


def test_sync_debug_checks_an_iteration_of_each_kind_in_error_mode_and_passes_other_failures_on(monkeypatch):
    """The "error" iteration fell on k = first + 2, always an R1 iteration at the profile's interval of 2:
    the iteration without R1, the compiled candidate's other path, was checked under "warn" only. And any
    RuntimeError in it (out of memory) was reported as the synchronising call."""
    profile = _load_benchmark("profile_train")
    modes = []
    monkeypatch.setattr(profile.torch.cuda, "set_sync_debug_mode", modes.append)
    sync = profile.SyncDebug(10, 2)
    module = SimpleNamespace(k=0)
    for k in range(9, 15):
        module.k = k
        sync.on_train_batch_start(None, module, None, 0)
        sync.on_train_batch_end(None, module, None, None, 0)
    assert [m for m in modes if m] == ["warn", "warn", "error", "error"]
    assert sync.report()["error_iterations"] == [12, 13] and sync.report()["error_mode"] == "passed"
    failing = profile.SyncDebug(0, 0)
    module.k = 0
    failing.on_train_batch_start(None, module, None, 0)
    assert not failing.failed(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    failing.on_train_batch_start(None, module, None, 0)
    assert failing.failed(RuntimeError("called a synchronizing CUDA operation"))
    assert failing.report()["error_mode"].startswith("RuntimeError: called a synchronizing CUDA operation")


def test_bench_train_leaves_the_runs_it_finished_when_stopped_and_the_device_check_shows_them(
    monkeypatch, tmp_path
):
    """A device step stopped at its time limit lost every figure (the JSON was written at the end): the
    defaults it had measured survived only as a log line."""
    bench, check = _load_benchmark("bench_train"), _load_benchmark("device_check")
    calls = []

    def fit(cfg, device, warmup, callbacks=()):
        calls.append(1)
        if len(calls) == 2:  # the second variant: the step's time limit
            raise KeyboardInterrupt
        return {"it_per_s": 3.5, "seconds": 1.0, "peak_mb": 0.0}

    monkeypatch.setattr(bench, "fit", fit)
    out = tmp_path / "bench.json"
    argv = ["bench_train.py", "--configs", "cifar10", "--ablate", "cifar10", "--levers", "compile"]
    argv += ["--compile", "--options", "--no-baseline", "--no-bf16", "--repeats", "1", "--output", str(out)]
    argv += ["--save-every-run"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(KeyboardInterrupt):
        bench.main()
    saved = json.loads(out.read_text())
    assert saved["configs"] == {} and saved["cut_short"]["runs"] == {"fast": [3.5]}
    assert "- fast: 3.500 it/s" in check.bench_lines(saved)


def test_bench_train_names_the_processor_and_whether_it_computes_bf16(tmp_path):
    """The machine string said "x86_64, 2 cores": the sessions ran on Zen 4 cores with AVX-512 bf16 and on
    Zen 3 cores without, where bf16 autocast is an order of magnitude slower, and no figure said which."""
    bench = _load_benchmark("bench_train")
    info = tmp_path / "cpuinfo"
    common = "model name\t: AMD EPYC 9R14\ncpu family\t: 25\nmodel\t\t: 17\n"
    info.write_text(common + "flags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert bench.cpu_model(info) == "AMD EPYC 9R14, family 25 model 17, bf16: avx512_bf16"
    info.write_text(common.replace("17", "1") + "flags\t\t: fpu avx2\n")
    assert bench.cpu_model(info).endswith("family 25 model 1, no native bf16")
