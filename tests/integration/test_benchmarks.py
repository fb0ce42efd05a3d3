"""`make bench` runs three scripts; each runs here in a quick mode, so the benchmarks do not rot.
(The timings themselves are not tested: speed goes in benchmarks, never in tests.)"""

from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import COMMAND_ENV, ROOT, needs_inductor_2_11, run_module
from tests.helpers_warm import WarmInterpreter


def _bench(script: str, *args: str, timeout: int = 300):
    """`python benchmarks/SCRIPT ARGS`, run in this process (tests.conftest.run_module)."""
    env = COMMAND_ENV
    return run_module(ROOT / "benchmarks" / script, list(args), env=env, timeout=timeout)


@pytest.mark.slow
def test_make_bench_scripts_run_in_quick_mode(tmp_path):
    assert "bench_ddp.py" in (ROOT / "Makefile").read_text()
    result = _bench("bench_data.py", "--sources", "cifar10", "--workers", "0", "--seconds", "0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    result = _bench(
        "bench_fid.py", "--experiments", "cifar10", "--device", "cpu", "--batch-size", "2", "--seconds", "0.2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "ddp.json"
    # one process per strategy keeps it quick; `make bench` runs two
    result = _bench(
        "bench_ddp.py",
        "--processes",
        "1",
        "--iterations",
        "4",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads(out.read_text())["results"]
    assert set(table) == {"ddp", "ddp_find_unused_parameters_true"}
    assert all(row["it_per_s"] > 0 for row in table.values())


@pytest.mark.slow
def test_bench_train_writes_the_table_against_the_baseline(tmp_path):
    assert "bench_train.py" in (ROOT / "Makefile").read_text()
    out = tmp_path / "latest.json"
    result = _bench(
        "bench_train.py",
        "--configs",
        "quickstart",
        "--ablate",
        "quickstart",
        "--repeats",
        "1",
        "--iterations",
        "2",
        "--warmup",  # one warm-up iteration per variant, not the quickstart's five: speed is not tested
        "1",
        "--side-by-side",
        "0",
        "--levers",
        "gradient_checkpointing",
        "--options",  # four of the options (each alone on the baseline): the others take the same path
        "channels_last",
        "lazy_augment",
        "joint_d_pass",
        "foreach_ema",
        "--no-memory",  # each probe is a process of its own: one probe is tested below
        "--output",
        str(out),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text())["configs"]["quickstart"]
    for key in ("iterations_per_s", "baseline_iterations_per_s", "speedup"):
        assert row[key] > 0, key
    assert row["speedup"] == row["iterations_per_s"] / row["baseline_iterations_per_s"]
    assert row["peak_memory_mb"] is None and row["baseline_peak_memory_mb"] is None
    assert row["batch"] == 64 and "CPU" in row["device"]
    assert row["compile"] == {}  # nothing compiled, nothing to report (a compiled run: below)
    assert set(row["options"]) == {"channels_last", "lazy_augment", "joint_d_pass", "foreach_ema"}
    assert row["bf16"]["iterations_per_s"] > 0
    lever = row["levers"]["gradient_checkpointing"]  # on the defaults, not on the baseline
    assert set(row["levers"]) == {"gradient_checkpointing"} and lever["peak_memory_mb"] is None
    assert lever["speedup"] == lever["iterations_per_s"] / row["iterations_per_s"]
    # the FLOP count: the quickstart's networks at 8x8, three generator and about three critic passes
    assert 1e9 < row["flops_per_iteration"] < 1e11
    assert "baseline" in result.stdout and "speedup" in result.stdout


@pytest.mark.slow
def test_the_cpu_memory_probe_reads_a_fresh_processs_peak_after_the_first_iteration(monkeypatch):
    """bench_train's peak memory on the CPU: a process of its own per variant, its high-water mark reset
    after the networks are built. The process is started as `sys.executable`: a child of the warm
    interpreter here (tests.helpers_warm), 8 s of imports less than a new interpreter."""
    monkeypatch.setattr(sys, "executable", WarmInterpreter.executable())
    bench = _load_benchmark("bench_train")
    small = bench.cpu_peak_memory_mb("quickstart", 4, ["threads=1"])
    assert 100 < small < 20_000  # MB: torch and the quickstart's networks, not the interpreter alone


@pytest.mark.slow
def test_profile_train_writes_the_tables_and_traces_of_both_kinds_of_iteration(tmp_path):
    out = tmp_path / "profile"
    result = _bench(
        *("profile_train.py", "--config", "quickstart", "--batch", "4", "--iterations", "1", "--timed", "2"),
        *("--out", str(out)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "profile.json").read_text())
    assert report["device"] == "cpu" and report["batch"] == 4
    assert set(report["variants"]) == {"baseline", "defaults"}
    for name, variant in report["variants"].items():
        assert "model.r1_interval=2" in variant["overrides"] and variant["r1_interval"] == 16
        assert variant["timed"]["iterations"] == 2 and variant["timed"]["it_per_s"] > 0
        assert set(variant["kinds"]) == {"r1", "no_r1"} and variant["sync_debug"] == "n/a on the CPU"
        r1, plain = variant["kinds"]["r1"], variant["kinds"]["no_r1"]
        for kind in (r1, plain):
            assert kind["iterations"] == 1 and kind["wall_ms"] > 0 and kind["operator_calls"] > 100
            assert kind["device_idle_fraction"] is None and kind["host_syncs_total"] is None
            top = kind["top_operators"]
            assert 0 < len(top) <= 20 and all(
                top[i]["self_ms"] >= top[i + 1]["self_ms"] for i in range(len(top) - 1)
            )
            assert {"name", "calls", "self_ms", "share"} <= set(top[0]) and top[0]["name"].startswith(
                "aten::"
            )
            families = kind["families"]  # every aten operator's self time, by what launched it
            assert abs(sum(f["share"] for f in families.values()) - 1) < 1e-6
            assert {"convolutions: matrix kernels", "group norm", "optimisers and EMA"} <= set(families)
        assert r1["operator_calls"] > plain["operator_calls"]  # the R1 pass: D twice more, double backward
        mean = variant["per_iteration_at_r1_interval"]["operator_calls"]
        assert mean == (r1["operator_calls"] + 15 * plain["operator_calls"]) / 16
        assert variant["traces"] == {"r1": f"trace_{name}_r1.json.gz", "no_r1": f"trace_{name}_no_r1.json.gz"}
        with gzip.open(out / variant["traces"]["r1"]) as f:
            assert any(e.get("name") == "act_iteration" for e in json.load(f)["traceEvents"])
    table = (out / "profile.md").read_text()
    assert "## baseline" in table and "## defaults" in table and "Top 20 operators by self CPU time" in table
    assert "| mean at r1_interval=16 |" in table and "standing in for kernel launches" in table
    assert "| convolutions: matrix kernels |" in table
    assert "it/s over 2 iterations (R1 every 16, as the experiment runs it)" in table


def test_the_timed_window_runs_at_the_experiments_r1_interval_and_gives_it_back():
    """profile_train's unprofiled iterations (after the warm-up, before the profiled ones): R1 at the
    experiment's interval inside the window, the profile's own interval before and after it."""
    from types import SimpleNamespace

    profile = _load_benchmark("profile_train")
    window = profile.TimedWindow(start=2, count=4, r1_interval=16, cuda=False)
    module = SimpleNamespace(k=0, hparams=SimpleNamespace(r1_interval=2))
    seen = []
    for k in range(8):  # the trainer's order: batch start, the step (k += 1), batch end
        module.k = k
        window.on_train_batch_start(None, module, None, k)
        seen.append(module.hparams.r1_interval)
        module.k = k + 1
        window.on_train_batch_end(None, module, None, None, k)
    assert seen == [2, 2, 16, 16, 16, 16, 2, 2] and window.it_per_s > 0
    idle = profile.TimedWindow(start=2, count=0, r1_interval=16, cuda=False)
    for k in range(4):
        module.k = k
        idle.on_train_batch_start(None, module, None, k)
        module.k = k + 1
        idle.on_train_batch_end(None, module, None, None, k)
    assert idle.it_per_s is None and module.hparams.r1_interval == 2


def test_profile_families_sort_kernels_by_what_launched_them():
    """Chains and kernel names as an H200 trace of the CIFAR-10 iteration has them."""
    profile = _load_benchmark("profile_train")
    conv = ["aten::conv2d", "aten::convolution", "aten::_convolution"]
    copy = ["aten::contiguous", "aten::clone", "aten::copy_"]
    ew = "void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<"
    items = [
        (conv, "sm90_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc_tilesize128x128x32", 100.0),
        ([*conv, "aten::add_"], ew + "at::native::CUDAFunctor_add<float> >", 25.0),
        ([*conv, *copy], ew + "at::native::direct_copy_kernel_cuda", 20.0),
        (["aten::group_norm", *copy], ew + "at::native::direct_copy_kernel_cuda", 10.0),
        (
            ["aten::group_norm", "aten::native_group_norm"],
            "void at::native::RowwiseMomentsCUDAKernel<float>",
            5.0,
        ),
        (
            ["autograd::engine::evaluate_function: ScaledDotProductEfficientAttentionBackward0"],
            "fmha_cutlassB_f32_aligned_64x64_k32_sm80",
            50.0,
        ),
        (
            ["autograd::engine::evaluate_function: ConvolutionBackward0"],
            "sm90_xmma_dgrad_implicit_gemm",
            40.0,
        ),
        (["Optimizer.step#RAdam.step", "aten::_foreach_mul_"], "multi_tensor_apply_kernel", 4.0),
        (["aten::pow"], "void at::native::vectorized_elementwise_kernel<4, pow_tensor_scalar", 3.0),
        (  # a compiled network's fused kernel: its own family, whatever operators it fused
            ["CompiledFunction", "triton_per_fused_native_group_norm_silu_3"],
            "triton_per_fused_native_group_norm_silu_3",
            2.0,
        ),
        (  # model.speed.flex_attention: inductor's flash-attention template, a Triton kernel of its own
            ["CompiledFunction", "triton_tem_fused_flex_attention_0"],
            "triton_tem_fused_flex_attention_0",
            1.0,
        ),
    ]
    result = profile.breakdown(items)
    assert list(result) == [
        "convolutions: matrix kernels",
        "attention",
        "layout copies (contiguous)",
        "convolutions: bias and other elementwise",
        "group norm",
        "optimisers and EMA",
        "elementwise and other",
        "fused by inductor (Triton)",
        "attention (flex_attention, Triton)",
    ]
    assert result["convolutions: matrix kernels"]["count"] == 2
    assert result["convolutions: matrix kernels"]["ms"] == pytest.approx(0.14)
    assert result["layout copies (contiguous)"]["ms"] == pytest.approx(0.03)
    assert result["attention"]["share"] == pytest.approx(50 / 260)


def test_profile_attributes_kernels_to_the_compiled_graph_that_launched_them():
    """Chains as an H200 trace of the compiled CIFAR-10 iteration has them: a forward under its dynamo
    frame's region, a backward under CompiledFunctionBackward, and kernels outside any graph."""
    from types import SimpleNamespace

    profile = _load_benchmark("profile_train")
    fwd = ["Torch-Compiled Region: 0/1", "CompiledFunction", "## Call CompiledFxGraph fghodjn3gviy6ccg ##"]
    bwd = [
        "autograd::engine::evaluate_function: CompiledFunctionBackward",
        "CompiledFunctionBackward",
        "## Call CompiledFxGraph fvx3scmniuzn7z6q ##",
    ]
    assert profile.graph_of([*fwd, "triton_poi_fused_add_0"]) == "0/1 forward fghodjn3gv"
    assert profile.graph_of([*bwd, "aten::convolution_backward"]) == "backward fvx3scmniu"
    assert profile.graph_of(["Optimizer.step#RAdam.step", "aten::_foreach_mul_"]) == profile.NOT_COMPILED

    def call(chain, start, end):  # a profiler event with its parents
        parent = None
        for name in chain:
            parent = SimpleNamespace(name=name, cpu_parent=parent)
        parent.time_range = SimpleNamespace(start=start, end=end)
        return parent

    items = [
        ([*fwd, "triton_poi_fused_add_0"], "triton_poi_fused_add_0", 300.0),
        ([*fwd, "aten::convolution"], "sm90_xmma_fprop", 700.0),
        ([*bwd, "triton_red_fused_1"], "triton_red_fused_1", 2000.0),
        (["aten::_foreach_mul_"], "multi_tensor_apply_kernel", 50.0),
    ]
    graphs = profile.by_graph(items, [call(fwd, 0.0, 5000.0), call(bwd, 9000.0, 19000.0)])
    assert list(graphs) == ["0/1 forward fghodjn3gv", "backward fvx3scmniu", profile.NOT_COMPILED]
    assert graphs["0/1 forward fghodjn3gv"] == {"ms": 1.0, "count": 2, "host_ms": 5.0}
    assert graphs["backward fvx3scmniu"] == {"ms": 2.0, "count": 1, "host_ms": 10.0}
    assert graphs[profile.NOT_COMPILED] == {"ms": 0.05, "count": 1, "host_ms": 0.0}
    assert profile.by_graph(items[3:], []) is None  # nothing compiled: no table


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_device_check_plan_parses_with_the_scripts_it_calls(tmp_path):
    """The GPU check runs once per lent session: a misspelt option in its plan would waste it, so every
    step that calls bench_train.py or profile_train.py is parsed by that script's own parser here."""
    check = _load_benchmark("device_check")
    parsers = {name: _load_benchmark(name).build_parser() for name in ("bench_train", "profile_train")}
    plan = check.steps()
    # the candidate, its profile, and at once its fallback if it fails (a cold compile needs the time)
    first = ["env", "bench_cuda_graphs_flex_r1", "profile_cuda_graphs_flex_r1", "bench_cuda_graphs_classic"]
    then = ["profile_cuda_graphs_classic", "bench_cudnn_benchmark", "bench_augmenting"]
    then += [
        "bench_cuda_graphs_flex_r1_cudnn",
        "bench_cuda_graphs_flex_r1_augmenting",
        "bench_cuda_graphs_flex",
        "bench_cuda_graphs_flex_r1_augmenting_eagerly",
    ]
    assert [s.name for s in plan][:11] == [*first, *then]
    by_name = {s.name: s for s in plan}
    assert by_name["bench_cuda_graphs_classic"].unless == "bench_cuda_graphs_flex_r1"
    assert by_name["profile_cuda_graphs_classic"].after == "bench_cuda_graphs_classic"
    # one pass of 320 did not fit an 80 GB card (2026-12-04): skipped there, not a minute spent failing
    assert by_name["imagenet64_one_pass"].min_gpu_gib > 80 > by_name["imagenet64_two_passes"].min_gpu_gib
    for lever in ("cudnn", "augmenting"):  # the candidate's graphs again (warm), and only if it compiled
        assert by_name[f"bench_cuda_graphs_flex_r1_{lever}"].after == "bench_cuda_graphs_flex_r1"
    bench = _load_benchmark("bench_train")
    assert bench.LEVERS["augmenting"] == ["model.r1_threshold=0"]  # p rises at the first R1 iteration
    candidate_augmenting = bench.LEVERS["cuda_graphs_flex_r1_augmenting"]
    assert candidate_augmenting == [*bench.LEVERS["cuda_graphs_flex_r1"], *bench.LEVERS["augmenting"]]
    assert "model.speed.compile_augment=true" in bench.LEVERS["cuda_graphs_flex_r1"]  # the candidate's
    for lever, compiled in (
        ("cuda_graphs_flex_r1_augmenting", True),
        ("cuda_graphs_flex_r1_augmenting_eagerly", False),
    ):
        speed = bench.compose_cfg("cifar10", 4, 2, bench.LEVERS[lever]).model.speed
        assert (speed.compile_augment, speed.compile_r1, speed.compile_mode) == (
            compiled,
            True,
            "reduce-overhead",
        )
    assert (
        by_name["bench_cuda_graphs_flex_r1_augmenting_eagerly"].after
        == "bench_cuda_graphs_flex_r1_augmenting"
    )
    for kind in ("flex_r1", "flex", "classic"):
        argv = by_name[f"bench_cuda_graphs_{kind}"].argv
        levers = argv[argv.index("--levers") + 1 : argv.index("--iterations")]
        assert levers[-1] == f"cuda_graphs_{kind}"
        if kind != "flex":
            assert by_name[f"profile_cuda_graphs_{kind}"].after == f"bench_cuda_graphs_{kind}"
    assert by_name["bench_cuda_graphs_classic"].unless == "bench_cuda_graphs_flex_r1"  # its fallback
    profiled = by_name["profile_cuda_graphs_flex_r1"].argv  # the candidate that bench measured
    assert {"model.speed.flex_attention=true", "model.speed.compile_r1=true"} <= set(profiled)
    assert len({s.name for s in plan}) == len(plan)
    levers = next(s for s in plan if s.name == "bench_levers").argv
    assert {"classic_attention", "contiguous_layout", "float32_levers", "bf16_parts"} <= set(levers)
    # each times its iterations unprofiled first
    for name in ("profile", "profile_compiled", "profile_cuda_graphs_flex_r1", "profile_cuda_graphs_classic"):
        argv = next(s for s in plan if s.name == name).argv
        assert argv[argv.index("--timed") + 1] == "16"
    parsed = 0
    for step in plan:
        script = next((a for a in step.argv if a.endswith(".py")), None)
        if script is None or Path(script).stem not in parsers:
            continue
        args = parsers[Path(script).stem].parse_args(step.argv[step.argv.index(script) + 1 :])
        parsed += 1
        if "reduce-overhead" in " ".join(step.argv) or "cuda_graphs" in " ".join(step.argv):
            # R1 (every 16th: k = 0, 16, ...) twice in the warm-up, so that no CUDA graph is recorded in the
            # timed window (a graph's second call records it); profile_train warms up with R1 every 2nd
            at_least = 4 if Path(script).stem == "profile_train" else 17
            assert args.warmup >= at_least, (step.name, args.warmup)
        if Path(script).stem == "bench_train" and args.levers:  # the CIFAR-10 lever steps
            assert args.iterations % 16 == 0, step.name  # the experiment's mix of R1 iterations exactly
        if "--set" in step.argv and Path(script).stem == "bench_train":
            assert args.set, step.name
    assert parsed >= 7
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(plan)
    only = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "device_check.py"),
            "--dry-run",
            "--only",
            "cuda_tests",
            "env",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert [line.split("\t")[0] for line in only.stdout.splitlines()] == [
        "cuda_tests",
        "env",
    ]  # in that order


def test_bench_train_synthetic_set_holds_one_global_batch_of_micro_batches():
    """`--set data.global_batch_size=...` above the half-batch (micro-batches, as ImageNet 64's two
    passes of 160) needs a synthetic set of at least one global batch of both halves."""
    bench = _load_benchmark("bench_train")
    cfg = bench.compose_cfg("imagenet64", 4, 1, ["data.global_batch_size=40"])
    assert cfg.data.length >= 2 * 40 and cfg.data.batch_size == 4
    assert bench.compose_cfg("imagenet64", 40, 1, []).data.length >= 2 * 40


def test_profile_train_refuses_a_warmup_it_cannot_time(monkeypatch, capsys):
    profile = _load_benchmark("profile_train")
    for bad in ("0", "3"):
        monkeypatch.setattr(sys, "argv", ["profile_train.py", "--warmup", bad])
        with pytest.raises(SystemExit) as stop:
            profile.main()
        assert stop.value.code == 2
        assert f"--warmup must be an even number >= 2 (the clock starts after the warm-up); got {bad}" in (
            capsys.readouterr().err
        )


def test_profile_operator_table_counts_each_microsecond_once():
    """A kernel appears in torch's averages twice (itself, and as the self device time of the operator
    that launched it), a record_function range three times (on the host, its mirror on the device, which
    spans its kernels again). The table keeps the operators: on a GPU by the kernel time they launched,
    on the CPU by their own time, never the Python inside a range (it once topped the CPU table)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    profile = _load_benchmark("profile_train")

    def avg(key, device, cpu_us, device_us, annotation=False):
        return SimpleNamespace(
            key=key, count=2, device_type=device, is_user_annotation=annotation,
            self_cpu_time_total=cpu_us, self_device_time_total=device_us,
        )  # fmt: skip

    averages = [
        avg("aten::convolution", DeviceType.CPU, 300.0, 4000.0),
        avg("sm90_xmma_fprop_implicit_gemm", DeviceType.CUDA, 0.0, 4000.0),
        avg("Optimizer.step#RAdam.step", DeviceType.CPU, 16000.0, 0.0, annotation=True),
        avg("Optimizer.step#RAdam.step", DeviceType.CUDA, 0.0, 12000.0, annotation=True),
        avg("triton_poi_fused_add_0", DeviceType.CPU, 20.0, 500.0, annotation=True),  # launched a kernel
        avg(profile.ITERATION, DeviceType.CPU, 900.0, 0.0, annotation=True),
        avg("aten::empty", DeviceType.CPU, 50.0, 0.0),
    ]
    assert profile.operator_table(averages, cuda=True) == {
        "aten::convolution": {"calls": 2, "self_ms": 4.0},
        "triton_poi_fused_add_0": {"calls": 2, "self_ms": 0.5},
    }
    assert profile.operator_table(averages, cuda=False) == {
        "aten::convolution": {"calls": 2, "self_ms": 0.3},
        "aten::empty": {"calls": 2, "self_ms": 0.05},
    }


def test_profile_averages_each_family_over_the_runs_counting_a_missing_one_as_zero():
    profile = _load_benchmark("profile_train")
    runs = [
        {"families": {"a": {"ms": 2.0, "count": 1, "share": 1.0}}, "operators": {}},
        {
            "families": {
                "a": {"ms": 4.0, "count": 3, "share": 1 / 3},
                "b": {"ms": 8.0, "count": 1, "share": 2 / 3},
            },
            "operators": {},
        },
    ]
    mean = profile.average(runs)["families"]
    assert list(mean) == ["b", "a"]  # most time first
    assert mean["b"] == {"ms": 4.0, "count": 0.5, "share": 4 / 7}
    assert mean["a"] == {"ms": 3.0, "count": 2.0, "share": 3 / 7}


def test_bench_train_measures_gpu_only_levers_on_a_gpu_alone():
    bench = _load_benchmark("bench_train")
    levers = ["--levers", "cudnn_benchmark", "cuda_graphs_flex", "classic_attention"]
    args = bench.build_parser().parse_args(["--options", "--no-baseline", "--no-bf16", *levers])
    on_cpu = bench.variants_to_run(False, args, ablate=True)
    on_gpu = bench.variants_to_run(True, args, ablate=True)
    assert set(on_cpu) == {"fast", "fast+classic_attention"}  # no cuDNN, and no compile without --compile
    assert set(on_gpu) == {"fast", "fast+cudnn_benchmark", "fast+cuda_graphs_flex", "fast+classic_attention"}
    assert "trainer.benchmark=true" in on_gpu["fast+cudnn_benchmark"]


def test_device_check_runs_a_profile_after_its_benchmark_passed_and_a_fallback_only_if_it_failed(tmp_path):
    check = _load_benchmark("device_check")
    ok, fail = ["bash", "-c", "exit 0"], ["bash", "-c", "exit 3"]
    plan = [
        check.Step("a", fail, 10, 0),
        check.Step("a_profile", ok, 10, 0, after="a"),
        check.Step("b", ok, 10, 0, unless="a"),
        check.Step("b_profile", ok, 10, 0, after="b"),
        check.Step("c", ok, 10, 0, unless="b"),
        check.Step("d", ok, 10, 0, after="elsewhere", unless="elsewhere"),  # another call's step: runs
        check.Step("e", ["bash", "-c", 'echo "$ACT_COMPILE_CACHE $TORCHINDUCTOR_CACHE_DIR" > e.txt'], 10, 0),
    ]
    outcomes = check.run_all(plan, tmp_path, budget=60, cache=tmp_path / "cache")
    statuses = {o["name"]: o["status"] for o in outcomes}
    assert statuses == {
        "a": "failed",
        "a_profile": "skipped (a did not pass)",
        "b": "ok",
        "b_profile": "ok",
        "c": "skipped (b passed)",
        "d": "ok",
        "e": "ok",
    }
    cache = str(tmp_path / "cache")  # every step compiles into the one cache that the run packs
    assert (tmp_path / "e.txt").read_text().split() == [cache, cache]


def test_device_check_reads_an_earlier_calls_outcomes_and_skips_what_does_not_fit_the_card(tmp_path):
    """A second call (`--only ... --previous summary.json`) runs a profile only if its benchmark passed in
    the first and a fallback only if that failed; a step too large for the card's memory is skipped; a
    step the script itself fails to run is recorded and the next one runs; after each step the outcomes
    so far are handed on (main writes them, so a call cut short returns them)."""
    check = _load_benchmark("device_check")
    ok = ["bash", "-c", "exit 0"]
    previous = [
        {"name": "passed", "status": "ok", "seconds": 1.0},
        {"name": "failed", "status": "failed", "seconds": 1.0},
        {"name": "not_run", "status": "skipped (10 s left, needs 60)"},
    ]
    plan = [
        check.Step("after_passed", ok, 10, 0, after="passed"),
        check.Step("fallback_of_passed", ok, 10, 0, unless="passed"),
        check.Step("after_failed", ok, 10, 0, after="failed"),
        check.Step("fallback_of_failed", ok, 10, 0, unless="failed"),
        check.Step("after_not_run", ok, 10, 0, after="not_run"),
        check.Step("large", ok, 10, 0, min_gpu_gib=100),
        check.Step("broken", ["/nonexistent/program"], 10, 0),
        check.Step("small", ok, 10, 0, min_gpu_gib=40),
    ]
    seen = []
    outcomes = check.run_all(
        plan, tmp_path, 60, previous=previous, done=lambda o: seen.append(len(o)), gpu_gib=79.2
    )
    statuses = {o["name"]: o["status"] for o in outcomes}
    assert statuses.pop("broken").startswith("error: FileNotFoundError")
    assert statuses == {
        "after_passed": "ok",
        "fallback_of_passed": "skipped (passed passed)",
        "after_failed": "skipped (failed did not pass)",
        "fallback_of_failed": "ok",
        "after_not_run": "ok",  # unknown: runs
        "large": "skipped (79 GiB on the GPU, needs 100)",
        "small": "ok",
    }
    assert seen == [1, 4, 5, 7, 8]  # after each step that ran
    unknown = check.run_all([check.Step("large", ok, 10, 0, min_gpu_gib=100)], tmp_path, 60, gpu_gib=None)
    assert unknown[0]["status"] == "ok"  # the card's memory unknown: it runs


def test_device_check_writes_its_summary_after_each_step_and_keeps_it_when_packing_fails(
    tmp_path, monkeypatch
):
    check = _load_benchmark("device_check")
    out = tmp_path / "out"
    # the second step passes only if the first one's outcome is in $OUT while it runs
    seen_first = f"grep -q '\"first\"' {out}/summary.json && test -f {out}/logs.txt"
    plan = [
        check.Step("first", ["bash", "-c", "exit 0"], 10, 0),
        check.Step("second", ["bash", "-c", seen_first], 10, 0),
    ]
    monkeypatch.setattr(check, "steps", lambda: plan)
    monkeypatch.setattr(check, "pack_cache", lambda cache, out: 1 / 0)
    monkeypatch.setattr(
        sys,
        "argv",
        ["device_check.py", "--out", str(out), "--work", str(tmp_path / "work")]
        + ["--cache", str(tmp_path / "cache"), "--carried", str(tmp_path / "none"), "--budget", "60"],
    )
    check.main()
    summary = json.loads((out / "summary.json").read_text())
    assert [(o["name"], o["status"]) for o in summary["steps"]] == [("first", "ok"), ("second", "ok")]
    assert summary["notes"][-1] == "compile cache not kept: ZeroDivisionError('division by zero')"


def test_device_check_packs_the_compile_cache_into_parts_that_the_next_run_unpacks(tmp_path):
    check = _load_benchmark("device_check")
    cache, carried = tmp_path / "cache", tmp_path / "carried"
    noise = random.Random(0).randbytes  # random bytes do not compress; seeded, so every run packs the same
    core = {"fxgraph/ab/entry": noise(3000)}
    rest = {"triton/0/XY/kernel.cubin": noise(2500), "top": b"1"}
    skipped = {"locks/a.lock": b"", "precompiled_headers/h.gch": b"2"}
    for name, data in {**core, **rest, **skipped}.items():
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_bytes(data)

    def packed(part_size: int, parts: int) -> tuple[str, dict]:
        out, fresh = tmp_path / f"out{part_size}_{parts}", tmp_path / f"fresh{part_size}_{parts}"
        out.mkdir()
        said = check.pack_cache(cache, out, part_size=part_size, parts=parts)
        files = sorted(out.iterdir())
        assert [p.name for p in files] == [f"compile_cache.tar.gz.{i}" for i in range(len(files))]
        assert all(p.stat().st_size <= part_size for p in files) and len(files) <= parts
        if files:
            assert f"unpacked {len(files)} carried part(s)" in check.unpack_cache(out, fresh)
        got = {str(p.relative_to(fresh)): p.read_bytes() for p in fresh.rglob("*") if p.is_file()}
        return said, got

    said, got = packed(1000, 3)  # neither the whole nor the core fits 3 kB
    assert said.startswith("compile cache not kept") and got == {}
    said, got = packed(1000, 4)  # the core alone fits
    assert "AOTAutograd and FX graph entries" in said and got == core
    said, got = packed(2000, 4)  # the whole cache fits: all but the locks and the CPU's headers
    assert "(whole)" in said and got == {**core, **rest}
    assert not list(tmp_path.glob("*.tar.gz"))  # no archive left behind
    carried.mkdir()
    (carried / "compile_cache.tar.gz.1").write_bytes(b"x")  # a part missing
    assert "not used" in check.unpack_cache(carried, tmp_path / "other")
    assert "none carried" in check.unpack_cache(tmp_path / "nothing", tmp_path / "other")
    assert "empty" in check.pack_cache(tmp_path / "nothing", tmp_path)


def test_device_check_summary_shows_each_variants_unprofiled_speed():
    check = _load_benchmark("device_check")
    kind = {"wall_ms": 300.0, "device_idle_fraction": 0.1, "kernel_launches": 6000, "host_syncs_total": 0}
    variant = {
        "kinds": {"no_r1": kind},
        "r1_interval": 16,
        "per_iteration_at_r1_interval": kind,
        "timed": {"iterations": 16, "it_per_s": 4.5, "r1_interval": 16},
        "sync_debug": {"warnings": 0, "error_mode": "passed", "places": []},
    }
    result = {"variants": {"defaults": variant}}
    text = check.summary_markdown([{"name": "profile", "status": "ok", "seconds": 9, "result": result}], "m")
    assert "defaults, not profiled: 4.500 it/s over 16" in text and "| defaults | no_r1 | 300.0 |" in text


def test_device_check_summary_splits_the_50k_fid_into_start_up_and_evaluates_stages():
    check = _load_benchmark("device_check")
    stages = {"checkpoint": 0.4, "networks": 2.1, "reference": 3.0, "real_references": 0.0, "samplers": 18.4}
    result = {
        "num_samples": 50_000,
        "wall_seconds": 38.5,
        "results": {"1-step": {"fid": 1.0, "seconds": 18.4}},
        "stage_seconds": {**stages, "total": 23.9},
    }
    text = check.summary_markdown([{"name": "fid_50k", "status": "ok", "seconds": 40, "result": result}], "m")
    wall = "50,000-sample FID end to end: 38.5 s (the sampler's own seconds in evaluate's report: 18.4 s)"
    assert wall in text
    assert "stages (s): start-up and imports 14.6, checkpoint 0.4, networks 2.1, reference 3.0, " in text
    del result["stage_seconds"]  # an evaluate from before the stages were timed
    outcome = {"name": "fid_50k", "status": "ok", "result": result}
    assert "stages" not in check.summary_markdown([outcome], "m")


def test_the_compile_watch_keeps_each_operation_inductor_cuts_out_of_a_cuda_graph(monkeypatch):
    """Under graph partitioning inductor does not skip a graph whole: it cuts the operations it cannot
    capture out of it (their kernels then launch one by one) and says so at debug level only. The watch
    keeps each cut's reason and operation, for graphs on a GPU while CUDA graphs are on, once each, and
    puts inductor's own method back afterwards; device_check's summary lists them."""
    from types import SimpleNamespace

    from torch._inductor import config
    from torch._inductor.scheduler import Scheduler
    from torch._inductor.virtualized import V

    bench, check = _load_benchmark("bench_train"), _load_benchmark("device_check")
    reasons = {"copy": "DeviceCopy ops", "nonzero": "unbacked binding ops", "add": None}
    monkeypatch.setattr(Scheduler, "should_partition", lambda self, node: reasons[node.name])
    own = Scheduler.should_partition

    def node(name, target=None):
        origin = None if target is None else SimpleNamespace(target=target)
        return SimpleNamespace(name=name, node=SimpleNamespace(get_origin_node=lambda: origin))

    def decide(devices, *nodes):
        with V.set_graph_handler(SimpleNamespace(device_types=devices)):
            return [Scheduler.should_partition(None, n) for n in nodes]

    nodes = [node("copy", "aten._to_copy.default"), node("nonzero"), node("add", "aten.add.Tensor")]
    watch = bench.CompileWatch()
    with watch, config.patch({"triton.cudagraphs": True}):
        decided = decide({"cuda"}, *nodes, nodes[0])
        assert decided == ["DeviceCopy ops", "unbacked binding ops", None, "DeviceCopy ops"]
        decide({"cpu"}, node("copy", "aten.cpu_only.default"))  # a graph on the host: no CUDA graph to cut
        with config.patch({"triton.cudagraphs": False}):
            decide({"cuda"}, node("copy", "aten.no_cuda_graphs.default"))
    assert Scheduler.should_partition is own
    decide({"cuda"}, node("copy", "aten.after_the_run.default"))
    report = watch.report()
    assert report["cudagraph_partitions"] == [
        "DeviceCopy ops: aten._to_copy.default",
        "unbacked binding ops: SimpleNamespace",
    ]
    compiled = {**report, "graphs": 3, "cudagraph_recordings": 1, "cudagraph_recordings_timed": 0}
    text = "\n".join(check.compile_lines("cifar10", {"fast+cuda_graphs": compiled}))
    assert "\n- cut out of a CUDA graph, DeviceCopy ops: aten._to_copy.default" in text
    del compiled["cudagraph_partitions"]  # a result from before the watch kept them
    assert "cut out" not in "\n".join(check.compile_lines("cifar10", {"fast+cuda_graphs": compiled}))


@pytest.mark.slow
@needs_inductor_2_11
def test_a_compiled_bench_run_reports_its_graphs_and_every_cuda_graph_skip_with_its_reason(monkeypatch):
    """A CUDA graphs variant whose graphs inductor skipped runs no faster, and inductor says why only in a
    warning among the compile logs: bench_train's CompileWatch puts the count and the reasons in the
    results (the warning here is raised as inductor raises it), and device_check's summary shows them.
    It also counts the CUDA graph recordings, and those made after the clock started (a recording costs
    about an uncaptured run: the timed iterations should have none)."""
    import torch
    from torch._inductor.cudagraph_trees import CUDAGraphTreeManager
    from torch._inductor.cudagraph_utils import log_cudagraph_skip_and_bump_counter

    bench, check = _load_benchmark("bench_train"), _load_benchmark("device_check")
    skip = "skipping cudagraphs due to mutated inputs (1 instances). Found from : \n  File x.py, line 1"
    recorded = []
    monkeypatch.setattr(CUDAGraphTreeManager, "record_function", lambda manager, *a: recorded.append(a))

    class SkipOnce(bench.L.Callback):  # as inductor does while compiling under reduce-overhead
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            CUDAGraphTreeManager.record_function(None, pl_module.k)  # k = 0 warms up, 1 is timed

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if pl_module.k == 1:
                log_cudagraph_skip_and_bump_counter(skip)
                log_cudagraph_skip_and_bump_counter(skip)  # the same graph again: one reason

    # a run after another (another variant, a repeat) compiles its own graphs: the fit empties Dynamo's
    # caches first (apply_process_settings, test_speed.py), so nothing is left to reuse or to fill up (past
    # its recompile limit a network would run eagerly)
    resets, reset = [], torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(len(recorded)) or reset())
    cfg = bench.compose_cfg("quickstart", 4, 2, ["model.speed.compile=eager", "threads=1"])
    watch = bench.CompileWatch(slow=0.0)  # every iteration noted as slow
    result = bench.fit(cfg, torch.device("cpu"), warmup=1, callbacks=[SkipOnce()], watch=watch)
    assert resets == [0]  # once, before the first iteration
    compiled = result["compile"]
    assert compiled["graphs"] >= 3 and compiled["graph_breaks"] == 0  # G, D, the target at least
    assert compiled["cudagraph_skips"] == 2
    assert list(compiled["slow_iterations"]) == [0, 1] and compiled["slow_iterations"][0] > 0
    assert recorded == [(0,), (1,)]  # through the watch to the manager's own method, now back in place
    assert (compiled["cudagraph_recordings"], compiled["cudagraph_recordings_timed"]) == (2, 1)
    CUDAGraphTreeManager.record_function(None, 2)
    assert len(watch.recordings) == 2
    assert compiled["cudagraph_skip_reasons"] == [
        "skipping cudagraphs due to mutated inputs (1 instances). Found from :"
    ]
    log_cudagraph_skip_and_bump_counter("skipping cudagraphs after the run")  # the handler is gone
    assert watch.reasons == compiled["cudagraph_skip_reasons"]
    bench_result = {
        "configs": {
            "cifar10": {
                "iterations_per_s": 4.0,
                "peak_memory_mb": 1.0,
                "compile": {"fast+cuda_graphs": compiled},
            }
        }
    }
    text = check.summary_markdown(
        [{"name": "bench", "status": "ok", "seconds": 9, "result": bench_result}], "m"
    )
    assert "cifar10 defaults + cuda_graphs:" in text and "CUDA graphs skipped: 2" in text
    assert "recorded 2 times, 1 after the clock started" in text
    assert f"the slow (compiling) iterations: 0: {compiled['slow_iterations'][0]} s, 1: " in text
    assert "\n- skipping cudagraphs due to mutated inputs" in text


@needs_inductor_2_11
def test_the_capture_check_finds_what_would_keep_a_graph_from_a_cuda_graph():
    """benchmarks/capture_check.py on graphs with a known answer: a data-dependent shape (`nonzero`) is cut
    out of its graph, an input mutated in place is reported, a plain graph passes; on the CPU, which
    inductor never captures, as a GPU would decide (also where there is a GPU); a buffer mutated in place
    is not a problem."""
    import torch

    check = _load_benchmark("capture_check")

    def plain(x):
        return torch.sin(x) * 2 + 1

    def data_dependent(x):
        return x.sum() + torch.nonzero(x > 0).float().sum()

    def mutating(x):
        return x.add_(1) * 2

    class Counting(torch.nn.Module):  # mutates a buffer: a static input, which CUDA graph trees allow
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x * self.calls

    def answer(fn):
        torch._dynamo.reset()
        with check.watching(pretend=True) as record:
            torch.compile(fn, mode="reduce-overhead", dynamic=False)(torch.randn(32))
        return record

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        clean, cut, mutated = answer(plain), answer(data_dependent), answer(mutating)
        counting = answer(Counting())
    torch._dynamo.reset()
    assert len(counting.graphs) == 1 and counting.problems() == []
    assert len(clean.graphs) == 1 and clean.nodes_checked > 0
    assert clean.problems() == []
    # nonzero and the operations that use its data-dependent size
    assert cut.cuts and {reason for reason, _ in cut.cuts} == {"unbacked binding ops"}
    assert any(p.startswith("cut: unbacked binding ops") for p in cut.problems())
    assert mutated.graphs[0]["mutated_inputs"] == [0]
    assert any("mutates its inputs [0]" in p for p in mutated.problems())
