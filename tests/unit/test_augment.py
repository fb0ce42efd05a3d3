"""AugmentPipe (exactness, shapes, gradients, per-example probabilities) and the p controller."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from act_lightning.augment import (
    AugmentPipe,
    _compose,
    _Constants,
    _Draws,
    _is_identity,
    _scale2d,
    _translate2d,
    r1_controller_update,
)

GEOMETRY = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
COLOR = ("brightness", "contrast", "lumaflip", "hue", "saturation")


def only(*ops: str, **kwargs) -> AugmentPipe:
    """A pipe with only the named operations enabled."""
    return AugmentPipe(**{name: float(name in ops) for name in GEOMETRY + COLOR}, **kwargs)


def images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def changed(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the example was modified."""
    return (out != x).flatten(1).any(dim=1)


# ---------------------------------------------------------------------------------------------------
# Identity and bookkeeping


@pytest.mark.parametrize("p", [0, 0.0])
def test_python_zero_is_a_no_op(p):
    x = images(4, 3, 16, 16)
    assert AugmentPipe()(x, p) is x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6, 1, 8, 8), (6, 3, 32, 32)])
def test_tensor_zero_is_exactly_the_identity(shape, dtype):
    x = images(*shape).to(dtype).requires_grad_()
    out = AugmentPipe()(x, torch.tensor(0.0), generator=seeded())
    assert out.dtype == dtype
    assert torch.equal(out, x)  # bit for bit, not approximately
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (5, 3, 32, 32), (3, 3, 64, 64)])
def test_shape_and_dtype_are_preserved(shape):
    x = images(*shape)
    out = AugmentPipe()(x, 0.7, generator=seeded())
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()


def test_large_images():
    x = images(2, 3, 256, 256)
    out = AugmentPipe()(x, 1.0, generator=seeded())
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_half_precision_under_cpu_autocast():
    x = images(8, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = AugmentPipe()(x.bfloat16(), torch.tensor(0.5), generator=seeded())
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    # The warp ran in float32: the same draws on the float32 input agree to bfloat16 precision.
    reference = AugmentPipe()(x.bfloat16().float(), torch.tensor(0.5), generator=seeded())
    torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.02)


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="channels"):
        AugmentPipe()(images(2, 2, 8, 8), 0.5)
    with pytest.raises(ValueError, match="B, C, H, W"):
        AugmentPipe()(images(3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="square"):
        AugmentPipe()(images(2, 3, 8, 16), 0.5)
    only("xflip", "scale")(images(2, 3, 8, 16), 0.5)  # fine without 90-degree rotations


# ---------------------------------------------------------------------------------------------------
# Full pipeline at p = 1


@pytest.mark.parametrize("channels", [1, 3])
def test_gradients_reach_the_input(channels):
    x = images(8, channels, 16, 16).requires_grad_()
    weights = images(8, channels, 16, 16, seed=1)
    (AugmentPipe()(x, torch.tensor(1.0), generator=seeded()) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(dim=1) > 0).all()  # every example receives a gradient


@pytest.mark.parametrize("shape", [(64, 1, 8, 8), (64, 3, 32, 32)])
def test_every_example_changes_at_p_one(shape):
    x = images(*shape)
    out = AugmentPipe()(x, torch.tensor(1.0), generator=seeded())
    assert changed(out, x).float().mean() >= 0.95


def test_seeded_generator_is_reproducible():
    x = images(16, 3, 16, 16)
    pipe = AugmentPipe()
    first = pipe(x, torch.tensor(0.5), generator=seeded(3))
    again = pipe(x, torch.tensor(0.5), generator=seeded(3))
    other = pipe(x, torch.tensor(0.5), generator=seeded(4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # A Python p and a tensor p take the same draws.
    assert torch.equal(first, pipe(x, 0.5, generator=seeded(3)))


# ---------------------------------------------------------------------------------------------------
# Single operations: probabilities and exactness


def test_each_example_is_augmented_with_probability_p():
    # Brightness changes every example it is applied to (its offset is never exactly 0).
    x = images(4000, 1, 8, 8)
    for p in (0.25, 0.5):
        rate = changed(only("brightness")(x, torch.tensor(p), generator=seeded()), x).float().mean()
        assert abs(rate.item() - p) < 0.03


def test_xflip_is_exact_and_flips_half_of_the_applied_examples():
    # As in ADA, an applied x-flip draws flip / no flip with probability 1/2 each.
    x = images(2000, 3, 8, 8)
    for p, expected in ((1.0, 0.5), (0.5, 0.25)):
        out = only("xflip")(x, torch.tensor(p), generator=seeded())
        flipped = (out == x.flip(-1)).flatten(1).all(dim=1)
        kept = (out == x).flatten(1).all(dim=1)
        assert (flipped | kept).all()  # every output is exactly one of the two
        assert abs(flipped.float().mean().item() - expected) < 0.04


def _quarter_turns(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(4, B) bool: example b of `out` is x[b] turned by k quarter turns (torch.rot90's sense)."""
    return torch.stack([(out == torch.rot90(x, k, dims=(2, 3))).flatten(1).all(dim=1) for k in range(4)])


def test_rotate90_is_exact_and_draws_0_or_270_degrees_as_the_reference():
    x = images(400, 3, 8, 8)
    hits = _quarter_turns(only("rotate90")(x, 1.0, generator=seeded()), x)
    assert (hits.sum(dim=0) == 1).all()  # every output is exactly one quarter turn of its input
    share = hits.float().mean(dim=1)  # in torch.rot90's (counter-clockwise) quarter turns
    assert share[0] > 0.4 and share[3] > 0.4  # unturned, or 270 degrees: a quarter turn clockwise ...
    assert share[1] == 0 and share[2] == 0  # ... never 90 or 180 degrees


def test_rotate90_with_adas_four_way_draw():
    x = images(400, 3, 8, 8)
    hits = _quarter_turns(only("rotate90", rotate90_turns=(0, 1, 2, 3))(x, 1.0, generator=seeded()), x)
    assert (hits.sum(dim=0) == 1).all()
    assert (hits.float().mean(dim=1) > 0.15).all()  # every quarter turn occurs
    with pytest.raises(ValueError, match="model.augment.rotate90_turns"):
        AugmentPipe(rotate90_turns=(0, 4))


def test_integer_translation_is_an_exact_reflected_shift():
    x = images(64, 1, 16, 16)
    out = only("xint")(x, 1.0, generator=seeded())
    padded = F.pad(x, [2, 2, 2, 2], mode="reflect")  # xint_max = 1/8 -> at most 2 pixels
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    windows = torch.stack([padded[..., 2 - dy : 18 - dy, 2 - dx : 18 - dx] for dy, dx in shifts])
    matches = (windows == out).flatten(2).all(dim=2)  # (shifts, B)
    assert matches.any(dim=0).all()
    assert matches[shifts.index((0, 0))].float().mean() < 0.3  # most examples did move


def test_the_filters_are_built_once_per_size_and_equal_fresh_ones(monkeypatch):
    """The resampler's filter matrices depend on the image size only: the pipeline builds them at the first
    call for a size and reuses them after, with the images a fresh build would give bit for bit, whatever
    the order in which sizes come (a cache keyed on the wrong thing would hand one size another's)."""
    import act_lightning.augment as augment

    builds = []
    build = augment._Filters.build.__func__
    monkeypatch.setattr(
        augment._Filters, "build", classmethod(lambda cls, *a: builds.append(a[:2]) or build(cls, *a))
    )
    pipe = AugmentPipe(rotate90=0)  # 90-degree turns need square images; the sizes below are not all
    p, built_by_the_pipe = torch.tensor(0.5), []
    for height, width in [(16, 16), (24, 24), (16, 24), (16, 16), (16, 24), (24, 24)]:
        x = images(6, 3, height, width, seed=height + width)
        uniform, normal = augment._Draws.draw(6, x.device, seeded(height * width))
        cached = pipe(x, p, generator=seeded(height * width))
        built_by_the_pipe += builds
        builds.clear()
        fresh = pipe.transform(x, p, uniform, normal)  # filters=None: built here, not cached
        assert builds.pop() == (height, width) and not builds
        assert changed(cached, x).any() and torch.equal(cached, fresh), (height, width)
    assert built_by_the_pipe == [(16, 16), (24, 24), (16, 24)]
    with torch.inference_mode():  # built first where no gradient is taken, used later where one is
        pipe(images(2, 3, 8, 8), 1.0)
    x = images(2, 3, 8, 8).requires_grad_(True)
    pipe(x, 1.0, generator=seeded()).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    square, oblong = pipe.filters(16, 16, torch.device("cpu")), pipe.filters(16, 24, torch.device("cpu"))
    assert square.up_h is square.up_w and square.down_h is square.down_w  # one pair for both axes
    assert oblong.up_h.shape == (61, 16) and oblong.up_w.shape == (93, 24)  # 2 P + 1 rows, P = 2 (size - 1)
    assert oblong.down_h.shape == (16, 42) and oblong.down_w.shape == (24, 58)  # 2 size + 12 taps - 2


def test_constants_are_filled_once_per_value():
    fill = _Constants(torch.zeros(5))
    assert fill(1) is fill(1.0) and fill(0) is fill(0.0) and fill(0) is not fill(1)
    assert fill(-0.0) is not fill(0.0) and torch.equal(fill(-0.0).signbit(), torch.ones(5, dtype=torch.bool))
    assert torch.equal(fill(2.5), torch.full((5,), 2.5))


def test_the_eager_pipeline_stays_within_its_operator_budget():
    """Eagerly (the default: `model.speed.compile_augment` is off) every operator call that is not a view is
    a kernel launch on a GPU, where the iteration is bound by launching: once p > 0 the pipeline runs twice
    an iteration (the generator's prediction; D's two halves in one call). At CIFAR-10's shapes with every
    operation enabled a forward makes 293 calls (451 when each matrix filled its own constants, each chain
    started from an identity product and each call rebuilt the resampler's filters); a change that adds
    many more should say why."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += not func.is_view
            return func(*args, **(kwargs or {}))

    pipe, x = AugmentPipe(), images(80, 3, 32, 32)
    pipe(x, 0.3)  # the first call for a size builds its filters
    with Count() as count:
        out = pipe(x, torch.tensor(0.3), generator=seeded())
    assert changed(out, x).any()
    assert 200 < count.calls <= 300, count.calls


def test_batches_augmented_together_are_what_calls_in_turn_give():
    """`together`: D's fake and real halves in one pass of the pipeline, each example with the random numbers
    its own call would have drawn, the generator left where the calls in turn leave it; the images agree to
    float rounding (the resampler's products see a larger batch) and gradients reach every batch."""
    pipe = AugmentPipe()
    a, b = images(5, 3, 16, 16, seed=1), images(7, 3, 16, 16, seed=2).requires_grad_(True)
    p = torch.tensor(0.1)
    one_by_one_g, together_g = seeded(0), seeded(0)
    one_by_one = (pipe(a, p, generator=one_by_one_g), pipe(b, p, generator=one_by_one_g))
    together = pipe.together(a, b, p=p, generator=together_g)
    assert [t.shape for t in together] == [a.shape, b.shape]
    for alone, joint, x in zip(one_by_one, together, (a, b)):
        assert changed(alone, x).any() and not changed(alone, x).all()  # some examples untouched
        torch.testing.assert_close(joint, alone, atol=1e-5, rtol=0)
        assert torch.equal(changed(joint, x), changed(alone, x))  # untouched examples exactly as they came
    assert torch.equal(together_g.get_state(), one_by_one_g.get_state())
    (grad,) = torch.autograd.grad(together[1].square().sum(), b)
    (expected,) = torch.autograd.grad(one_by_one[1].square().sum(), b)
    torch.testing.assert_close(grad, expected, atol=1e-4, rtol=1e-5)
    # a Python zero hands back the batches themselves; batches of other dtypes run one by one
    assert all(out is x for out, x in zip(pipe.together(a, b, p=0.0), (a, b)))
    assert pipe.together(p=p) == ()
    half = a.to(torch.bfloat16)
    mixed = pipe.together(half, b.detach(), p=p, generator=seeded(4))
    assert mixed[0].dtype == torch.bfloat16 and torch.equal(mixed[0], pipe(half, p, generator=seeded(4)))


def test_resampler_is_near_identity_and_agrees_with_integer_shifts():
    pipe = AugmentPipe()
    x = images(4, 3, 16, 16)
    fill = _Constants(torch.zeros(4))
    identity = torch.eye(3).expand(4, 3, 3)
    # up -> down with the orthogonal sym6 filter reconstructs the input up to float rounding
    torch.testing.assert_close(pipe._resample(x, identity), x, atol=2e-5, rtol=0)
    # ... and a whole-pixel translation through it equals the exact blitted shift: the two paths agree
    # on where pixel centres are and in which direction the matrices act.
    shift = _translate2d(torch.full((4,), -1.0), 1.0, fill) @ _scale2d(1.0, 1.0, fill)
    torch.testing.assert_close(pipe._resample(x, shift), pipe._execute_blit(x, shift), atol=2e-5, rtol=0)


def test_constant_images_stay_constant_under_any_warp():
    # The filters have unit DC gain and the border is a reflection of unbounded extent: even a strong
    # zoom-out (where ADA's padding margin runs out and it reads zeros) reads only image content.
    x = torch.full((64, 3, 16, 16), 0.7)
    pipe = only(*GEOMETRY, scale_std=1.5, aniso_std=1.0, xfrac_std=1.0)
    torch.testing.assert_close(pipe(x, 1.0, generator=seeded()), x, atol=1e-4, rtol=0)


def test_general_geometry_changes_content_without_amplifying():
    x = images(32, 3, 32, 32)
    for op in ("scale", "rotate", "aniso", "xfrac"):
        out = only(op)(x, 1.0, generator=seeded())
        assert changed(out, x).float().mean() > 0.9, op
        # a low-pass resampling (of white noise here) does not add energy
        assert out.square().mean() <= 1.05 * x.square().mean(), op


def test_brightness_shifts_the_mean():
    x = images(16, 3, 16, 16)
    out = only("brightness")(x, 1.0, generator=seeded())
    shift = (out - x).flatten(2)  # (B, C, H*W): one offset per example, the same in every channel
    torch.testing.assert_close(shift, shift[:, :1, :1].expand_as(shift), atol=1e-6, rtol=0)
    assert (shift[:, 0, 0].abs() > 1e-4).all()


def test_contrast_scales_around_zero():
    x = images(16, 3, 16, 16)
    out = only("contrast")(x, 1.0, generator=seeded())
    gain = out.flatten(1) / x.flatten(1)
    torch.testing.assert_close(gain, gain[:, :1].expand_as(gain), atol=1e-4, rtol=1e-4)


def test_hue_and_saturation_keep_the_luma():
    x = images(16, 3, 16, 16)
    for op in ("hue", "saturation"):
        out = only(op)(x, 1.0, generator=seeded())
        assert changed(out, x).all()
        torch.testing.assert_close(out.mean(dim=1), x.mean(dim=1), atol=1e-5, rtol=0)


def test_lumaflip_reflects_the_luma():
    x = images(200, 3, 8, 8)
    out = only("lumaflip")(x, 1.0, generator=seeded())
    reflected = x - 2 * x.mean(dim=1, keepdim=True)  # Householder reflection along (1, 1, 1) / sqrt(3)
    is_reflected = ((out - reflected).abs() < 1e-5).flatten(1).all(dim=1)
    kept = (out == x).flatten(1).all(dim=1)
    assert (is_reflected | kept).all() and 0.3 < is_reflected.float().mean() < 0.7


def test_grey_images_skip_the_colour_only_ops():
    x = images(16, 1, 8, 8)
    assert torch.equal(only("lumaflip", "hue", "saturation")(x, 1.0, generator=seeded()), x)
    out = only("brightness", "contrast")(x, 1.0, generator=seeded())
    assert changed(out, x).all()
    full = AugmentPipe()(x, 1.0, generator=seeded())
    assert full.shape == x.shape and torch.isfinite(full).all() and changed(full, x).all()


@pytest.mark.parametrize("channels", [3, 1])
def test_the_compiled_transform_is_one_graph_and_computes_what_the_eager_one_computes(channels):
    """model.speed.compile_augment: all but the two random draws (`transform`) traces as one graph, with no
    break (under CUDA graphs one replay), and compiled it returns the eager pipeline's images and input
    gradients from the same generator state, which it leaves where the eager pipeline leaves it. The
    backend is AOTAutograd's graphs with eager kernels (inductor's code generation takes a minute here):
    what tracing may change is caught, and the kernels are the eager ones, so the results agree exactly."""
    pipe = AugmentPipe()
    x = images(16, channels, 16, 16)
    p = torch.tensor(0.1)  # some examples untouched (returned as they came), some augmented
    uniform, normal = torch.rand(21, 16), torch.randn(7, 16)
    explained = torch._dynamo.explain(pipe.transform)(x, p, uniform, normal)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    eager_x = x.clone().requires_grad_(True)
    eager_g = seeded(3)
    eager = pipe(eager_x, p, generator=eager_g)
    eager.square().sum().backward()
    pipe.compile_transform(backend="aot_eager", dynamic=False)
    compiled_x = x.clone().requires_grad_(True)
    compiled_g = seeded(3)
    compiled = pipe(compiled_x, p, generator=compiled_g)
    compiled.square().sum().backward()
    assert changed(eager.detach(), x).any() and not changed(eager.detach(), x).all()
    assert torch.equal(compiled, eager)
    assert torch.equal(compiled_x.grad, eager_x.grad)
    assert torch.equal(compiled_g.get_state(), eager_g.get_state())  # the same draws, eagerly
    assert pipe(x, 0.0) is x  # a Python zero still returns at once


def test_the_transform_keeps_every_value_on_the_images_device():
    """Traced for CUDA tensors (fake ones: no GPU needed), no value of the transform's graph lives on the
    host: a host tensor in a graph is a copy to the device, which inductor cuts out of a CUDA graph and runs
    on its own (an assignment of a number into a slice of a tensor once made one)."""
    from tests.helpers_fake_cuda import fake_cuda, skip_unless_traceable, traced_devices

    skip_unless_traceable()

    pipe = AugmentPipe()
    mode = fake_cuda(pipe)
    with mode:
        p, uniform, normal = (
            torch.full((), 0.5, device="cuda"),
            torch.rand(21, 4, device="cuda"),
            torch.randn(7, 4, device="cuda"),
        )
        x = torch.rand(4, 3, 16, 16, device="cuda")
    values = traced_devices(mode, lambda *a: pipe.transform(*a), x, p, uniform, normal)
    assert len(values) > 300  # the whole pipeline was traced
    assert {device for _, device in values} == {"cuda"}, [v for v in values if v[1] != "cuda"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_synchronisation_on_cuda():
    pipe = AugmentPipe().cuda()
    x = images(16, 3, 32, 32).cuda().requires_grad_()
    p, r1_ema = torch.tensor(0.5, device="cuda"), torch.tensor(0.0, device="cuda")
    pipe(x, p)  # warm-up: lazy CUDA initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = pipe(x, p)
        out.square().sum().backward()
        p, r1_ema = r1_controller_update(
            p, r1_ema, out.square().mean(), threshold=1e4, batch_size=160, interval=16, ada_length=5e5
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert p.device.type == "cuda" and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------------
# The sampled matrices: StyleGAN2-ADA's distributions, and the order in which operations compose


N = 4000  # examples per statistical test: a share is known to +-0.008, a std to about 1 %


def sample(pipe: AugmentPipe, kind: str, p: float, *size: int, batch: int = N) -> torch.Tensor:
    """The (B, R, R) matrices `pipe._sample_{kind}` ('blit', 'geometry' or 'color') draws from a seeded
    generator; `size` is (height, width) for the geometric kinds, (channels,) for colour. The tests
    pass with other seeds too (checked for 0, 1 and 2: their margins are some 4 standard errors)."""
    draws = _Draws(*_Draws.draw(batch, torch.device("cpu"), seeded()))
    return getattr(pipe, f"_sample_{kind}")(draws, torch.tensor(p), *size)


def log2_std(gain: torch.Tensor) -> float:
    return gain.log2().std().item()


def assert_uniform_over_the_circle(angle: torch.Tensor) -> None:
    """A quarter (+-0.03) of the angles in each quadrant of [-pi, pi]."""
    quadrant = torch.floor((angle + torch.pi) / (torch.pi / 2)).clamp(0, 3).long()
    share = torch.bincount(quadrant, minlength=4).float() / len(angle)
    assert ((share - 0.25).abs() < 0.03).all(), share


def test_matrix_builders_put_each_entry_in_its_place():
    fill = _Constants(torch.zeros(1))
    expected = torch.tensor([[1.0, 0, 2], [0, 1, 3], [0, 0, 1]])
    assert torch.equal(_translate2d(2.0, 3.0, fill)[0], expected)  # tx in the first row, ty in the second
    assert torch.equal(_scale2d(2.0, 3.0, fill)[0], torch.tensor([[2.0, 0, 0], [0, 3, 0], [0, 0, 1]]))


def test_compose_is_the_matrix_product_in_order():
    """`_compose(a, b)` is a @ b (b acts first on a column vector); None is the identity."""
    a, b = torch.randn(2, 5, 3, 3, generator=seeded())
    torch.testing.assert_close(_compose(a, b), a @ b)
    assert not torch.allclose(a @ b, b @ a)  # the two orders differ: the test tells them apart
    assert _compose(None, b) is b and _compose(a, None) is a and _compose(None, None) is None


def test_rotation_probability_is_p_over_both_rotations():
    """ADA rotates twice (around the anisotropic scaling), each time with p_rot = 1 - sqrt(1 - p), so that
    an example is rotated at all with probability p; the rotation multiplier scales p first, and p_rot is
    clamped to 1 where multiplier * p exceeds 1."""
    for multiplier, p, expected in ((1, 0.5, 0.5), (1, 0.2, 0.2), (0.5, 0.8, 0.4), (2, 0.75, 1.0)):
        pipe = AugmentPipe(**{**{name: 0.0 for name in GEOMETRY + COLOR}, "rotate": multiplier})
        g = sample(pipe, "geometry", p, 16, 16)
        rotated = ~_is_identity(g)
        assert abs(rotated.float().mean().item() - expected) < 0.03, (multiplier, p)


def test_rotation_angle_is_uniform_over_the_full_circle():
    """rotate_max = 1: each angle is uniform in [-pi, pi], so at p = 1 (both rotations applied) the total
    angle is uniform over the circle: a quarter of the examples in each quadrant."""
    g = sample(only("rotate"), "geometry", 1.0, 16, 16)
    angle = torch.atan2(g[:, 1, 0], g[:, 0, 0])
    assert_uniform_over_the_circle(angle)


def test_isotropic_scaling_is_log2_normal_with_std_0_2():
    g = sample(only("scale"), "geometry", 1.0, 16, 16)
    assert torch.equal(g[:, 0, 0], g[:, 1, 1])  # isotropic
    assert abs(g[:, 0, 0].log2().mean().item()) < 0.02
    assert abs(log2_std(g[:, 0, 0]) - 0.2) < 0.01  # ADA: scale_std = 0.2, of log2 of the gain


def test_anisotropic_scaling_preserves_area_and_is_log2_normal_with_std_0_2():
    """ADA's aniso scales x by s and y by 1 / s (s = 2^(0.2 n)): the area is unchanged."""
    g = sample(only("aniso"), "geometry", 1.0, 16, 16)
    torch.testing.assert_close(g[:, 0, 0] * g[:, 1, 1], torch.ones(N))
    assert abs(log2_std(g[:, 0, 0]) - 0.2) < 0.01


def test_anisotropic_scaling_acts_between_the_two_rotations():
    """ADA: pre-rotation, anisotropic scaling, post-rotation, so the stretch axes are random on both the
    input and the output side; g_inv^T g_inv and g_inv g_inv^T are both diagonal if the anisotropic
    scaling came before or after both rotations."""
    g = sample(only("rotate", "aniso"), "geometry", 1.0, 16, 16)[:, :2, :2]
    for gram in (g.transpose(1, 2) @ g, g @ g.transpose(1, 2)):
        assert (gram[:, 0, 1].abs() > 1e-3).float().mean() > 0.9


def test_fractional_translation_std_is_0_125_of_each_side():
    """ADA: xfrac_std = 0.125 of the image size, per axis (width for x, height for y), independently."""
    height, width = 16, 32
    g = sample(only("xfrac"), "geometry", 1.0, height, width)
    tx, ty = -g[:, 0, 2], -g[:, 1, 2]
    assert abs(tx.std().item() / (0.125 * width) - 1) < 0.05
    assert abs(ty.std().item() / (0.125 * height) - 1) < 0.05
    assert abs(torch.corrcoef(torch.stack([tx, ty]))[0, 1].item()) < 0.1


def test_integer_translation_covers_both_directions_up_to_0_125_of_each_side():
    """ADA: xint_max = 0.125 of the image size: whole-pixel shifts in [-W/8, W/8] and [-H/8, H/8]."""
    height, width = 16, 32
    g = sample(only("xint"), "blit", 1.0, height, width)
    tx, ty = -g[:, 0, 2], -g[:, 1, 2]
    assert set(tx.tolist()) == set(range(-4, 5)) and set(ty.tolist()) == set(range(-2, 3))
    assert abs(tx.mean().item()) < 0.2 and abs(ty.mean().item()) < 0.1


def test_brightness_offset_has_std_0_2():
    c = sample(only("brightness"), "color", 1.0, 3)
    offset = c[:, 0, 3]
    assert torch.equal(c[:, :3, 3], offset[:, None].expand(N, 3))
    assert abs(offset.std().item() - 0.2) < 0.01


def test_contrast_gain_is_log2_normal_with_std_0_5():
    c = sample(only("contrast"), "color", 1.0, 3)
    assert abs(log2_std(c[:, 0, 0]) - 0.5) < 0.025


def test_saturation_gain_is_log2_normal_with_std_1():
    """Saturation scales the chroma by s: C = I + (s - 1)(I - v v^T), so s = C[0, 0] - C[0, 1]."""
    c = sample(only("saturation"), "color", 1.0, 3)
    assert abs(log2_std(c[:, 0, 0] - c[:, 0, 1]) - 1.0) < 0.05


def test_hue_angle_is_uniform_over_the_full_circle():
    """hue_max = 1: the rotation around the grey axis v is uniform in [-pi, pi]. For Rodrigues' matrix,
    trace = 1 + 2 cos(theta) and C[2, 1] - C[1, 2] = 2 v_x sin(theta)."""
    c = sample(only("hue"), "color", 1.0, 3)[:, :3, :3]
    cos = (c.diagonal(dim1=1, dim2=2).sum(dim=1) - 1) / 2
    sin = (c[:, 2, 1] - c[:, 1, 2]) * 3**0.5 / 2
    angle = torch.atan2(sin, cos)
    assert_uniform_over_the_circle(angle)


def test_contrast_acts_after_brightness():
    """ADA's colour chain: brightness, then contrast (around 0): c (x + b), whose offset is c b."""
    both = sample(only("brightness", "contrast"), "color", 1.0, 3)  # brightness draws first: the same b
    brightness = sample(only("brightness"), "color", 1.0, 3)
    gain = both[:, 0, 0]
    torch.testing.assert_close(both[:, :3, 3], gain[:, None] * brightness[:, :3, 3])


def test_colour_matrix_acts_on_the_colour_column():
    """c_out = C[:3, :3] @ c_in + C[:3, 3] for a general (not symmetric) C, as the pipeline applies it."""
    x = images(6, 3, 4, 5)
    c = torch.randn(6, 4, 4, generator=seeded())
    expected = torch.einsum("bij,bjhw->bihw", c[:, :3, :3], x) + c[:, :3, 3, None, None]
    torch.testing.assert_close(AugmentPipe._execute_color(x, c), expected)
    pipe, p = only("hue"), torch.tensor(1.0)
    uniform, normal = _Draws.draw(6, x.device, seeded())
    hue = pipe._sample_color(_Draws(uniform, normal), p, 3)
    expected = torch.einsum("bij,bjhw->bihw", hue[:, :3, :3], x)
    torch.testing.assert_close(pipe.transform(x, p, uniform, normal), expected)


# ---------------------------------------------------------------------------------------------------
# Controllers


STEP = dict(batch_size=100, interval=10, ada_length=10_000)  # p moves by 0.1 per update


def test_r1_controller_ema_and_direction():
    p, ema = torch.tensor(0.5), torch.tensor(0.0)
    p, ema = r1_controller_update(p, ema, torch.tensor(200.0), beta=0.9, threshold=10.0, **STEP)
    assert ema.item() == pytest.approx(20.0)  # 0.9 * 0 + 0.1 * 200
    assert p.item() == pytest.approx(0.6)  # 20 > 10: more augmentation
    p, ema = r1_controller_update(p, ema, torch.tensor(0.0), beta=0.9, threshold=10.0, **STEP)
    assert ema.item() == pytest.approx(18.0)  # still above the threshold
    assert p.item() == pytest.approx(0.7)
    p, ema = r1_controller_update(p, ema, 0.0, beta=0.5, threshold=10.0, **STEP)
    assert ema.item() == pytest.approx(9.0)  # the *updated* EMA decides: 9 < 10
    assert p.item() == pytest.approx(0.6)
    p, ema = r1_controller_update(p, ema, 11.0, beta=0.0, threshold=11.0, **STEP)
    assert p.item() == pytest.approx(0.5)  # equal to the threshold is not above it


def test_r1_controller_clips_to_the_unit_interval():
    p, ema = r1_controller_update(0.95, 0.0, 1e9, threshold=1.0, **STEP)
    assert p.item() == 1.0
    p, ema = r1_controller_update(p, ema, 1e9, threshold=1.0, **STEP)
    assert p.item() == 1.0
    p, _ = r1_controller_update(0.05, 0.0, 0.0, threshold=1.0, **STEP)
    assert p.item() == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_r1_leaves_the_controller_as_it_is(bad):
    """The module passed nan_to_num(r1): an infinite R1 became 3.4e38, r1_ema some 1e37, and p stayed at
    its maximum for about 17,000 CIFAR-10 iterations (and every checkpoint kept that r1_ema)."""
    p, ema = r1_controller_update(
        torch.tensor(0.3), torch.tensor(5.0), torch.tensor(bad), threshold=10.0, **STEP
    )
    assert (p.item(), ema.item()) == pytest.approx((0.3, 5.0))
    p, ema = r1_controller_update(p, ema, torch.tensor(200.0), beta=0.9, threshold=10.0, **STEP)
    assert (p.item(), ema.item()) == pytest.approx((0.4, 24.5))  # the next finite R1 counts as usual


def test_r1_controller_keeps_dtype_device_and_detaches():
    r1 = torch.tensor(3.0, requires_grad=True) * 2
    p, ema = r1_controller_update(torch.tensor(0.0), torch.tensor(0.0), r1, threshold=1e4, **STEP)
    assert p.dtype == ema.dtype == torch.float32 and p.ndim == ema.ndim == 0
    assert not ema.requires_grad
    assert ema.item() == pytest.approx(0.07 * 6.0)  # default beta = 0.93
