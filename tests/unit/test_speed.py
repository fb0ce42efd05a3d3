"""The speed options change how the iteration runs, never what it computes: against the baseline
(`perf=baseline`) the losses, the weights and the augmentation state agree to float tolerance."""

import os
import re

import lightning as L
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from act_lightning.augment import AugmentPipe
from act_lightning.nn.attention import FlexAttnProcessor
from act_lightning.process import apply_process_settings
from tests.conftest import CONF, compose
from tests.helpers_training import SMALL, fit_recording

LPIPS = ["model.distance=lpips", "model.lpips_pretrained=false"]
# R1 at k = 0, 2, 4 with a threshold of 0: p rises after the first R1 step, so iterations 1.. augment
# (the lazy path must then run the pipeline) while iteration 0 runs with p == 0 (the lazy path skips it).
# gan_ratio 0.3, the paper's CIFAR-10 value: at the quickstart's 0.95 the adversarial updates amplify the
# paths' float rounding past the comparison's 1e-4 within five iterations (3e-4 on loss_d, measured)
ACTIVE = ["iterations=5", "model.r1_interval=2", "model.r1_threshold=0", "model.ada_length=100"]
ACTIVE += ["model.schedule.gan_ratio=0.3"]
# Two resolutions, not the digits networks' three, each block kind still in G and D (attention in the second
# and in the middle): the compiled run below traces each network several times (62 s against 71 s here)
SHALLOW = ["model.generator.block_out_channels=[32,32]", "model.discriminator.block_out_channels=[32,32]"]
SHALLOW += ["model.generator.down_block_types=[DownBlock2D,AttnDownBlock2D]"]
SHALLOW += ["model.generator.up_block_types=[AttnUpBlock2D,UpBlock2D]"]
SHALLOW += ["model.discriminator.down_block_types=[DownBlock2D,AttnDownBlock2D]"]


def test_the_fast_path_computes_what_the_baseline_computes(cfg_factory):
    # four iterations, not ACTIVE's five: at the fifth (an R1 iteration) the adversarial updates have
    # amplified the paths' float rounding (channels-last convolutions alone: 2.8e-4 on loss_d at seed 1)
    # past the comparison's 1e-4 for some augmentation draws; up to the fourth it stays below 7e-5
    active = [*ACTIVE, "iterations=4"]
    fast, fast_rows = fit_recording(cfg_factory([*SMALL, *active]))
    slow, slow_rows = fit_recording(cfg_factory([*SMALL, *active, "perf=baseline"]))
    assert fast.speed.channels_last and fast.speed.fast_attention and fast.speed.lazy_augment
    assert not slow.speed.channels_last and slow.speed.sync_logs and not slow.speed.foreach_ema
    assert fast.speed.joint_d_pass and not slow.speed.joint_d_pass
    assert float(fast.aug_p) > 0  # the augmentation did switch on during the run
    assert len(fast_rows) == len(slow_rows) == 4
    for a, b in zip(fast_rows, slow_rows, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    for (name, p), q in zip(fast.state_dict().items(), slow.state_dict().values(), strict=True):
        if p.is_floating_point():
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_the_augmentation_pipeline_runs_only_once_p_can_be_non_zero(cfg_factory, monkeypatch):
    calls = []  # (p, how many batches) of each pass of the pipeline
    together = AugmentPipe.together

    def counting(self, *batches, p, **kwargs):
        calls.append((float(p), len(batches)))
        return together(self, *batches, p=p, **kwargs)

    monkeypatch.setattr(AugmentPipe, "together", counting)  # every call of the pipeline runs through it
    quiet = [*SMALL, "iterations=3", "model.r1_threshold=1e9"]
    fit_recording(cfg_factory(quiet))
    assert calls == []  # p stays 0: nothing to draw, nothing to resample
    fit_recording(cfg_factory([*quiet, "model.speed.lazy_augment=false"]))
    # the baseline's way resamples every image at p = 0: the generator's prediction, then D's two halves
    # (in one pass: model.speed.joint_d_pass)
    assert calls == [(0.0, 1), (0.0, 2)] * 3
    calls.clear()
    fit_recording(cfg_factory([*SMALL, *ACTIVE, "model.speed.joint_d_pass=false"]))
    assert [n for _, n in calls] == [1, 1, 1] * 4 and min(p for p, _ in calls) > 0  # iterations 1-4


def test_the_r1_pass_runs_the_classic_attention_and_the_others_the_fused_kernel(cfg_factory):
    model = instantiate(cfg_factory(SMALL).model)
    disc = model.discriminator
    processors = lambda: {type(m.processor) for m in disc._attention}  # noqa: E731
    assert disc._attention and processors() == {AttnProcessor2_0}
    fused = disc._attention[0].processor
    with disc.double_backward_safe():
        assert processors() == {AttnProcessor}
    assert disc._attention[0].processor is fused  # the same object: a compiled forward's guards hold
    baseline = instantiate(cfg_factory([*SMALL, "perf=baseline"]).model)
    assert {type(m.processor) for m in baseline.discriminator._attention} == {AttnProcessor}
    # the generators: diffusers' fused default, the classic kernel without fast_attention
    for built, kind in ((model, AttnProcessor2_0), (baseline, AttnProcessor)):
        for net in (built.generator, built.target):
            layers = [m for m in net.modules() if isinstance(m, Attention)]
            assert layers and {type(m.processor) for m in layers} == {kind}


def test_channels_last_puts_every_convolution_weight_in_nhwc(cfg_factory):
    model = instantiate(cfg_factory(SMALL).model)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)


def test_threads_and_tf32_are_set_per_process_and_checked(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        apply_process_settings(OmegaConf.create({"threads": 1, "tf32": False}))
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        apply_process_settings(OmegaConf.create({"threads": "auto", "tf32": True}))
        assert torch.get_num_threads() == 1  # auto changes nothing that was chosen before
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        with pytest.raises(ValueError, match="threads must be auto or a positive integer, got 0"):
            apply_process_settings(OmegaConf.create({"threads": 0}))
        with pytest.raises(ValueError, match="threads must be auto or a positive integer, got True"):
            apply_process_settings(OmegaConf.create({"threads": True}))  # (torch named no key)
        with pytest.raises(ValueError, match="tf32 must be true or false; got 'off'"):
            apply_process_settings(OmegaConf.create({"threads": "auto", "tf32": "off"}))  # was TF32 on
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True


def test_threads_auto_in_a_joblib_launchers_job_is_its_share_of_the_cores(monkeypatch):
    # Hydra's joblib launcher runs n_jobs jobs side by side in this machine's processes (the ablations'
    # two_local_jobs: two): each gets the usable cores / n_jobs, at least one; any other launcher (a job
    # of its own, SLURM's allocation) leaves auto to Lightning; an integer is the user's, whatever launches
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from act_lightning.process import threads_beside_other_jobs

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads, before = torch.get_num_threads(), HydraConfig.instance().cfg
    cases = [
        (["hydra/launcher=joblib", f"hydra.launcher.n_jobs={n}"], expected)
        for n, expected in [(2, 4), (3, 2), (16, 1), (-1, 1), (-5, 2)]
    ]  # joblib's -k: all cores but k - 1
    cases += [(["hydra/launcher=two_local_jobs"], 4), (["hydra/launcher=submitit_slurm"], None), ([], None)]
    try:
        assert threads_beside_other_jobs() is None  # no Hydra job at all (a test, a notebook)
        for overrides, expected in cases:
            with initialize_config_dir(str(CONF), version_base="1.3"):
                cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            assert threads_beside_other_jobs() == expected, overrides
            torch.set_num_threads(3)
            apply_process_settings(OmegaConf.create({"threads": "auto"}))
            assert torch.get_num_threads() == (expected or 3), overrides  # None: auto changes nothing
            assert os.environ.get("OMP_NUM_THREADS") == (str(expected) if expected else None)
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
            apply_process_settings(OmegaConf.create({"threads": 5}))
            assert torch.get_num_threads() == 5, overrides
            assert threads_beside_other_jobs() is None  # an exported count stays (a job's own, the user's)
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    finally:
        HydraConfig.instance().cfg = before
        torch.set_num_threads(threads)


def test_compile_cache_is_where_inductor_keeps_its_graphs_and_kernels(tmp_path, monkeypatch):
    """compile_cache: exported before anything compiles, so inductor (and DDP's processes, which inherit
    the environment) put their graphs and Triton kernels there; null leaves torch's default."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir, triton_cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    before = torch.get_num_threads()
    apply_process_settings(OmegaConf.create({"compile_cache": None}))
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    folder = tmp_path / "shared" / "inductor"
    apply_process_settings(OmegaConf.create({"compile_cache": str(folder)}))
    assert folder.is_dir() and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder)
    assert cache_dir() == str(folder) and triton_cache_dir(0) == str(folder / "triton" / "0")
    monkeypatch.setenv("ACT_COMPILE_CACHE", str(tmp_path / "from_env"))  # a cluster's default
    assert compose(["debug=smoke"]).compile_cache == str(tmp_path / "from_env")
    monkeypatch.delenv("ACT_COMPILE_CACHE")
    assert compose(["debug=smoke"]).compile_cache is None
    (tmp_path / "a_file").write_text("")
    refused = re.escape(f"compile_cache={tmp_path / 'a_file' / 'x'}: {tmp_path / 'a_file'} is not a folder")
    with pytest.raises(NotADirectoryError, match=refused):
        apply_process_settings(OmegaConf.create({"compile_cache": str(tmp_path / "a_file" / "x")}))
    assert torch.get_num_threads() == before
    torch.backends.cuda.matmul.allow_tf32 = False  # as the other tests expect it


def test_each_compiled_run_starts_with_dynamos_caches_empty():
    """The jobs of a multirun share one process: a compiled job starts as a job of its own process would,
    with nothing of the last job's graphs (which would fill Dynamo's recompile limit until a network ran
    eagerly, and hold CUDA graph trees' memory). An uncompiled run leaves the caches alone."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.backends.cuda.matmul.allow_tf32 = False  # as the runs below set it: Dynamo's guards see it
    double = torch.compile(lambda x: 2 * x, backend="eager")
    x = torch.ones(3)
    double(x)
    compiled = {"model": {"speed": {"compile": "aot_eager"}}, "tf32": False}
    for cfg, compiles in [({"model": {"speed": {"compile": False}}, "tf32": False}, 1), (compiled, 2)]:
        apply_process_settings(OmegaConf.create(cfg))
        double(x)
        assert counters["stats"]["unique_graphs"] == compiles


GRAPH_SOURCES: list[str] = []  # the stack traces in each graph that `act_test_graphs` was given


@torch._dynamo.register_backend(name="act_test_graphs")
def _graphs_backend(gm, example_inputs):
    """aot_eager, keeping where each graph's operations come from."""
    GRAPH_SOURCES.append("\n".join(node.meta.get("stack_trace") or "" for node in gm.graph.nodes))
    return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


@pytest.mark.slow
def test_the_gpu_candidates_compiled_run_computes_what_the_eager_run_computes(cfg_factory, as_if_on_gpu):
    # Every compile option at once, as benchmarks/device_check.py's candidate for the GPU runs them: the
    # networks (G, the target, D, LPIPS), the R1 pass (compile_r1: D's two passes and its input gradient, one
    # graph, with D's classic attention in it), the augmentation's transform (compile_augment, graphs of its
    # own) and flex_attention in the other graphs' attention layers (flex_attention; its dense CPU
    # implementation stands in for the GPU's kernels: as_if_on_gpu), all as AOTAutograd's graphs (forward
    # and backward) with eager kernels: inductor's code generation takes minutes on the CPU. ACTIVE's five
    # iterations: R1 at k = 0, 2 and 4, the augmentation from k = 1 on, in the generator's loss (through it
    # to G) and on D's halves (joint_d_pass), which the R1 passes at 2 and 4 take. Against the eager run of
    # the defaults (the fused attention kernel, nothing compiled) the rows and every weight agree to float
    # tolerance, and no graph breaks (docs/performance.md). One compiled run for the four options: each
    # traces G and D again (about 15 s of this CPU). Compiled networks with an eager R1 pass:
    # test_benchmarks.py's compiled bench run.
    from torch._dynamo.utils import counters

    overrides = [*SMALL, *ACTIVE, *LPIPS, *SHALLOW, "data.batch_size=2"]
    counters.clear()
    GRAPH_SOURCES.clear()
    compiled_run = ["model.speed.compile=act_test_graphs", "model.speed.compile_r1=true"]
    compiled_run += ["model.speed.compile_augment=true", "model.speed.flex_attention=true"]
    compiled, compiled_rows = fit_recording(cfg_factory([*overrides, *compiled_run]))
    for net in (compiled.generator, compiled.discriminator, compiled.distance):
        assert net._compiled_call_impl is not None  # D's restored after the R1 passes
    for net in (compiled.generator, compiled.discriminator):
        layers = [m for m in net.modules() if isinstance(m, Attention)]
        assert layers and all(isinstance(m.processor, FlexAttnProcessor) for m in layers)
    flex = [g for g in GRAPH_SOURCES if "in padded_flex_attention" in g]
    assert len(flex) >= 2  # G's and D's graphs (each with its backward) attend with flex_attention
    assert compiled.augment_pipe._compiled is not None
    assert any("in transform" in g for g in GRAPH_SOURCES)
    assert counters["aot_autograd"]["ok"] >= 6 and not counters["aot_autograd"].get("not_ok")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    r1_graphs = [g for g in GRAPH_SOURCES if "logits_and_r1_gradient_traceable" in g]
    assert len(r1_graphs) == 1 and "get_attention_scores" in r1_graphs[0]  # once; classic attention
    eager, eager_rows = fit_recording(cfg_factory(overrides))
    assert len(compiled_rows) == len(eager_rows) == 5
    assert compiled_rows[-1]["train/aug_p"] > 0
    for a, b in zip(compiled_rows, eager_rows, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7)
    eager_weights = eager.state_dict()
    for name, weight in compiled.state_dict().items():
        if name.startswith(("generator.", "discriminator.")):
            torch.testing.assert_close(weight, eager_weights[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sampling_runs_the_compiled_target_eagerly(cfg_factory):
    """Evaluation and sample grids during a compiled run sample with the target's eager forward: each new
    batch size (and eval mode) would otherwise compile another graph of the generator (about a minute on a
    GPU, under CUDA graphs another memory pool too) for a few forwards. The compiled forward is back
    afterwards."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = instantiate(cfg_factory([*SMALL, "model.speed.compile=aot_eager"]).model)
    shape = (model.generator.unet.config.in_channels, *[model.generator.unet.config.sample_size] * 2)
    x, sigma = torch.randn(2, *shape), torch.full((2,), 1.0)
    with torch.no_grad():
        model.target(x, sigma, None)  # the training loop's no-grad call of the target: one graph
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and model.target._compiled_call_impl is not None
    noise = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    sampled = model.sample(noise * model.schedule.sigma_max)
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled for batch 5 in eval mode
    assert model.target._compiled_call_impl is not None and model.target.training
    eager = instantiate(cfg_factory([*SMALL]).model)
    eager.load_state_dict(model.state_dict())
    assert torch.equal(sampled, eager.sample(noise * eager.schedule.sigma_max))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["cifar10", "imagenet64"])
def test_each_network_compiles_to_one_graph(cfg_factory, experiment):
    model = instantiate(cfg_factory([*SMALL, f"experiment={experiment}", *LPIPS]).model)
    x = torch.randn(2, 3, 32, 32) if experiment == "cifar10" else torch.randn(2, 3, 64, 64)
    labels = None if experiment == "cifar10" else torch.tensor([3, 999])
    sigma = torch.tensor([0.5, 20.0])
    calls = {
        "generator": (model.generator, (x, sigma, labels)),
        "discriminator": (model.discriminator, (x, sigma, labels)),
        "LPIPS": (model.distance, (x, x.flip(-1))),
    }
    for name, (net, args) in calls.items():
        explained = torch._dynamo.explain(net)(*args)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, explained.break_reasons)


def test_the_networks_keep_every_value_on_the_device_they_run_on(cfg_factory):
    """Traced for CUDA tensors (fake ones: no GPU needed), no value of the CIFAR-10 generator's, D's or
    LPIPS's graphs lives on the host: a host tensor in a graph is a copy to the device, which inductor cuts
    out of a CUDA graph (compile_mode=reduce-overhead) and launches on its own (docs/performance.md)."""
    from tests.helpers_fake_cuda import fake_cuda, skip_unless_traceable, traced_devices

    skip_unless_traceable()

    model = instantiate(cfg_factory([*SMALL, "experiment=cifar10", *LPIPS]).model)
    mode = fake_cuda(model)
    with mode:
        x, sigma = torch.randn(2, 3, 32, 32, device="cuda"), torch.rand(2, device="cuda") * 10
    passes = {
        "generator": lambda x, s: model.denoise(model.generator, x, s, None),
        "discriminator": lambda x, s: model.discriminator(x, s, None),
        "LPIPS": lambda x, s: model.distance(x, x.flip(-1)),
    }
    for name, run in passes.items():
        values = traced_devices(mode, run, x, sigma)
        assert len(values) > 100, name
        assert {device for _, device in values} == {"cuda"}, (name, [v for v in values if v[1] != "cuda"])


def _generator_update(cfg, device: str = "cpu") -> tuple[Tensor, Tensor]:
    """L_ct per example (4 pairs from the finest to the coarsest of N = 150 scales) and the generator's
    gradient of the consistency loss of the module built from `cfg`, on `device`."""
    from act_lightning.losses import generator_losses

    L.seed_everything(0)
    model = instantiate(cfg.model).to(device)
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(4, 3, 32, 32, generator=g) * 2 - 1).to(device)
    z = torch.randn(4, 3, 32, 32, generator=g).to(device)
    losses = generator_losses(
        x,
        None,
        torch.tensor([1, 10, 80, 149], device=device),
        z,
        sigmas=model.schedule.sigmas(150).to(device),
        schedule=model.schedule,
        online=lambda x, s, y: model.denoise(model.generator, x, s, y),
        target=model._teacher_pass(),
        distance=model.distance,
    )
    losses.objective().mean().backward()
    return losses.consistency.detach(), torch.cat([p.grad.flatten() for p in model.generator.parameters()])


CIFAR = [*SMALL, "experiment=cifar10", "model.lpips_pretrained=false"]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_computes_the_same_losses_and_gradients(cfg_factory, monkeypatch, device):
    import torch.utils.checkpoint

    calls = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(fn)
        return checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)  # diffusers' blocks call it here
    monkeypatch.setattr("act_lightning.losses.checkpoint", counting)  # LPIPS
    loss, grad = _generator_update(cfg_factory(CIFAR), device)
    assert calls == []
    on = ["model.speed.gradient_checkpointing=true", "model.speed.lpips_checkpointing=true"]
    loss_ckpt, grad_ckpt = _generator_update(cfg_factory([*CIFAR, *on]), device)
    # every resnet of the online network's blocks (13 at this layout) and LPIPS once; the teacher, run
    # without gradients, recomputes nothing
    assert len(calls) == 14 and sum(type(f).__name__ == "LPIPS" for f in calls) == 1
    if device == "cpu":  # the same kernels, recomputed
        assert torch.equal(loss, loss_ckpt) and torch.equal(grad, grad_ckpt)
    else:  # CUDA's attention backward sums in no fixed order: rounding at the gradient's own scale
        # (an H200, 2026-12-04: 0.3% of the elements differed, by up to 2.6e-7; tiny ones relatively much)
        torch.testing.assert_close(loss_ckpt, loss, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(grad_ckpt, grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())
        assert (grad_ckpt - grad).norm() <= 1e-4 * grad.norm()  # a wrong recomputation: order 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "option, grad_bound", [("bf16_lpips", 0.03), ("bf16_target", 0.15)], ids=["lpips", "target"]
)
def test_bf16_stays_within_its_bounds_of_float32(
    cfg_factory, monkeypatch, request, option, grad_bound, device
):
    # Measured on the CPU (docs/performance.md): |dL_ct| about 2e-5 per example (bf16's noise floor of
    # LPIPS), the gradient 0.7% (LPIPS) and 5.7% (target) off float32's in norm. Bounds: about 3x that.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # float32 means float32 on a GPU too
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    request.addfinalizer(lambda: torch.set_float32_matmul_precision(precision))
    loss, grad = _generator_update(cfg_factory(CIFAR), device)
    loss_bf16, grad_bf16 = _generator_update(cfg_factory([*CIFAR, f"model.speed.{option}=true"]), device)
    assert loss_bf16.dtype == grad_bf16.dtype == torch.float32
    assert not torch.equal(loss, loss_bf16)  # bf16 did run
    assert (loss_bf16 - loss).abs().max() < 1e-4
    assert 0 < (grad_bf16 - grad).norm() / grad.norm() < grad_bound


def test_one_discriminator_pass_over_both_halves_equals_two_passes_with_labels(cfg_factory):
    from act_lightning.losses import discriminator_losses

    torch.manual_seed(0)
    model = instantiate(cfg_factory(SMALL).model)
    weight = torch.randn(5, 64, requires_grad=True)  # a class-conditional linear critic
    critic = lambda x, s, y: (x.flatten(1) * weight[y]).sum(1) * s  # noqa: E731
    args = dict(
        sigmas=model.schedule.sigmas(10),
        schedule=model.schedule,
        online=lambda x, s, y: x * 0.5 + y.view(-1, 1, 1, 1),
        critic=critic,
        augment=lambda x: x.flip(-1),
        r1_gamma=10.0,
        with_r1=False,
    )
    x, z, r = torch.randn(3, 2, 1, 8, 8)
    y_fake, y_real = torch.tensor([1, 4]), torch.tensor([0, 3])
    j_fake, j_real = torch.tensor([3, 9]), torch.tensor([1, 5])
    results = []
    for joint in (True, False):
        losses = discriminator_losses(x, y_fake, j_fake, z, r, y_real, j_real, joint=joint, **args)
        (grad,) = torch.autograd.grad(losses.objective(0.3).sum(), weight)
        results.append((losses, grad))
    (a, grad_a), (b, grad_b) = results
    torch.testing.assert_close(a.fake, b.fake)
    torch.testing.assert_close(a.real, b.real)
    torch.testing.assert_close(grad_a, grad_b)


def test_the_compile_keys_are_checked_and_passed_to_torch_compile(monkeypatch):
    from act_lightning.speed import SpeedOptions

    with pytest.raises(ValueError, match="model.speed.compile must be true, false or a backend name"):
        SpeedOptions(compile="")
    with pytest.raises(
        ValueError, match="model.speed.compile='nosuchbackend' is no torch.compile backend; true"
    ):
        SpeedOptions(compile="nosuchbackend")
    assert SpeedOptions(compile="aot_eager").compile == "aot_eager"
    # a switch given as text counted as true: bf16_lpips=no trained in bf16
    with pytest.raises(ValueError, match="model.speed.bf16_lpips must be true or false; got 'no'"):
        SpeedOptions(bf16_lpips="no")
    with pytest.raises(ValueError, match="model.speed.channels_last must be true or false; got 'maybe'"):
        SpeedOptions(channels_last="maybe")
    with pytest.raises(ValueError, match="model.speed.compile_mode must be null or one of default, "):
        SpeedOptions(compile=True, compile_mode="fast")
    with pytest.raises(ValueError, match="needs model.speed.compile=true, got model.speed.compile='eager'"):
        SpeedOptions(compile="eager", compile_mode="reduce-overhead")
    SpeedOptions(compile="inductor", compile_mode="reduce-overhead")  # inductor by name: refused as not true
    with pytest.raises(ValueError, match="compile_augment compiles the augmentation pipeline .* needs model"):
        SpeedOptions(compile_augment=True)
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(kwargs))
    SpeedOptions(compile=True, compile_mode="reduce-overhead").apply([torch.nn.Linear(1, 1)], None)
    # static shapes: a graph per batch size, which CUDA graphs need
    assert seen == [{"backend": "inductor", "mode": "reduce-overhead", "dynamic": False}]
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compiled.append((fn, kwargs)) or "compiled")
    pipe = AugmentPipe()
    SpeedOptions(compile=True).apply([], None, augment=pipe)
    assert not compiled and pipe._compiled is None  # off unless asked for
    SpeedOptions(compile=True, compile_mode="reduce-overhead", compile_augment=True).apply(
        [], None, augment=pipe
    )
    assert compiled == [
        (pipe.transform, {"backend": "inductor", "mode": "reduce-overhead", "dynamic": False})
    ]
    assert pipe._compiled == "compiled"


def test_cuda_graphs_mark_each_iteration_as_a_new_step(cfg_factory, monkeypatch):
    """With compile_mode=reduce-overhead every training iteration first tells torch that the last one's
    graph outputs are dead (replaying overwrites them); without CUDA graphs nothing is marked. The
    compile itself is left out here (a CPU test), the marking is what is checked."""
    marks = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    for mode, expected in (("reduce-overhead", 3), ("default", 0)):
        marks.clear()
        overrides = ["iterations=3", "model.speed.compile=true", f"model.speed.compile_mode={mode}"]
        fit_recording(cfg_factory([*SMALL, *overrides]))
        assert len(marks) == expected, mode


def test_the_r1_pass_compiles_once_and_on_one_device_only(cfg_factory):
    from types import SimpleNamespace

    from act_lightning.speed import SpeedOptions

    with pytest.raises(ValueError, match="compile_r1 compiles the R1 pass .* needs model.speed.compile=true"):
        SpeedOptions(compile_r1=True)
    model = instantiate(
        cfg_factory([*SMALL, "model.speed.compile=eager", "model.speed.compile_r1=true"]).model
    )
    model._trainer = SimpleNamespace(world_size=2)  # D in its DDP wrapper: the R1 pass stays eager
    assert model._r1_pass() is None
    model._trainer = SimpleNamespace(world_size=1)
    compiled = model._r1_pass()
    assert compiled is not None and model._r1_pass() is compiled  # one compiled function, kept
    plain = instantiate(cfg_factory([*SMALL, "model.speed.compile=eager"]).model)
    plain._trainer = SimpleNamespace(world_size=1)
    assert plain._r1_pass() is None


def test_flex_attention_needs_the_compile_and_the_fused_kernel():
    from act_lightning.speed import SpeedOptions

    with pytest.raises(
        ValueError, match="flex_attention replaces the attention kernel .* needs model.speed.compile"
    ):
        SpeedOptions(flex_attention=True)
    with pytest.raises(
        ValueError, match="flex_attention runs the fused kernel .* needs model.speed.fast_attention"
    ):
        SpeedOptions(compile=True, flex_attention=True, fast_attention=False)
    SpeedOptions(compile=True, flex_attention=True)
