import math

import pytest
import torch

from act_lightning import losses
from act_lightning.consistency import ConsistencySchedule


def test_pseudo_huber_hand_computed():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.zeros(2, 3, 4, 4)
    b[0, 0, 0, 0] = 3.0
    b[0, 0, 0, 1] = 4.0
    c = 0.00054 * math.sqrt(48)
    d = losses.pseudo_huber_distance(a, b)
    assert d.shape == (2,)
    assert d[0].item() == pytest.approx(math.sqrt(25 + c**2) - c, rel=1e-6)
    assert d[1].item() == 0.0
    # behaves like L2 norm for large and like a scaled squared error for small differences
    assert losses.pseudo_huber_distance(a, b, c=1.0)[0].item() == pytest.approx(math.sqrt(26) - 1, rel=1e-6)


def test_l1_l2_per_example():
    a, b = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    b[1] *= 2
    assert torch.allclose(losses.l2_distance(a, b), torch.tensor([1.0, 4.0]))
    assert torch.allclose(losses.l1_distance(a, b), torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("name", ["ssim", "msssim"])
@pytest.mark.parametrize("size", [8, 32])
def test_structural_distances(name, size):
    torch.manual_seed(0)
    x = torch.rand(3, 3, size, size) * 2 - 1
    fn = losses.build_distance(name)
    same = fn(x, x)
    other = fn(x, x.roll(1, 0))
    assert same.shape == (3,)
    assert same.abs().max().item() < 1e-4
    assert (other > 0.05).all()


def test_msssim_at_32_uses_two_scales_with_the_standard_weights_renormalised():
    """At 32 x 32 an 11 x 11 window fits two scales: MS-SSIM = cs_1^w1 * ssim_2^w2 with MS-SSIM's first
    two weights (0.0448, 0.2856) scaled to sum to 1, computed here scale by scale (raw weights would give
    a distance about three times smaller)."""
    import torch.nn.functional as F
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    a, b = (x + 1) / 2, (y + 1) / 2
    _, cs1 = ssim(a, b, data_range=1.0, kernel_size=11, reduction="none", return_contrast_sensitivity=True)
    s2 = ssim(F.avg_pool2d(a, 2), F.avg_pool2d(b, 2), data_range=1.0, kernel_size=11, reduction="none")
    w1, w2 = 0.0448 / (0.0448 + 0.2856), 0.2856 / (0.0448 + 0.2856)
    expected = 1 - cs1.relu() ** w1 * s2.relu() ** w2
    assert torch.allclose(losses.msssim_distance(x, y), expected, atol=1e-5)


def test_lpips_plumbing_with_random_backbone():
    torch.manual_seed(0)
    d = losses.build_distance("lpips", lpips_pretrained=False, lpips_resize=64)  # 224: the same, 12x slower
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 16, 16) * 2 - 1
    out = d(x, y)
    assert out.shape == (2,)
    assert d(y, y).abs().max().item() < 1e-6
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in d.parameters())  # frozen
    d.train()
    assert not d.net.training  # stays in eval mode
    # the target is clipped to [-1, 1] before the comparison
    assert torch.allclose(d(x.detach(), y * 5), d(x.detach(), (y * 5).clamp(-1, 1)))


def test_lpips_resizes_to_model_lpips_resize():
    seen = []
    d = losses.build_distance("lpips", lpips_pretrained=False, lpips_resize=64)
    assert d.resize == 64 and losses.build_distance("l2", lpips_resize=None) is losses.l2_distance
    first = d.net.net.slice1  # VGG's first block: what it sees is the resized image
    first.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[-1]))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for size in (64, 224, None):
        d.resize = size
        d(x, x.flip(0))
    assert seen == [64, 64, 224, 224, 32, 32]  # prediction and target, at each size (null: as they are)
    for bad in (16, 0, "64"):
        with pytest.raises(ValueError, match="model.lpips_resize must be null .* or an integer >= 32"):
            losses.build_distance("lpips", lpips_pretrained=False, lpips_resize=bad)


def test_lpips_grayscale_input():
    d = losses.build_distance("lpips", lpips_pretrained=False, lpips_resize=64)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert d(x, x.flip(0)).shape == (2,)


def test_lpips_missing_weights_names_file_and_place(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as err:
        losses.LPIPSDistance(weights=str(missing))
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and str(missing) in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
    assert "(model.lpips_weights)" in message and "torchvision's cache" not in message  # the user's path


def test_lpips_loads_torchvision_vgg16_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()
    path = tmp_path / "vgg16-397923af.pth"
    torch.save(vgg.state_dict(), path)
    d = losses.LPIPSDistance(weights=str(path))
    assert torch.equal(d.net.net.slice1._modules["0"].weight, vgg.features[0].weight)
    assert torch.equal(d.net.net.slice5._modules["28"].weight, vgg.features[28].weight)


def test_lpips_rejects_a_foreign_weights_file(tmp_path):
    path = tmp_path / "vgg16-397923af.pth"
    torch.save({"something": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not torchvision's VGG16"):
        losses.LPIPSDistance(weights=str(path))
    path.write_bytes(b"truncated")
    with pytest.raises(
        ValueError, match=r"could not read .* a truncated download\?\); expected 'vgg16-397923af.pth'"
    ):
        losses.LPIPSDistance(weights=str(path))


def test_unknown_distance_names_the_key():
    with pytest.raises(ValueError, match="model.distance must be one of"):
        losses.build_distance("l3")


# -- the two updates, as pure functions ------------------------------------------------------------

SCHEDULE = ConsistencySchedule(gan_ratio=0.6, mid_weight=0.2)


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 4, 4, generator=g) * 2 - 1, torch.randn(n, 1, 4, 4, generator=g)


class LinearCritic(torch.nn.Module):
    """D(x) = <W, x> + b: its gradient with respect to the image is W, so R1 has a closed form."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randn(1, 1, 4, 4, generator=g))
        self.bias = torch.nn.Parameter(torch.tensor(0.1))

    def forward(self, x, sigma, labels):
        return (x * self.weight).flatten(1).sum(1) + self.bias


def test_generator_losses_against_a_hand_computation():
    x, z = _batch()
    sigmas = SCHEDULE.sigmas(11)
    j = torch.tensor([1, 4, 7, 10])
    critic = LinearCritic()
    out = losses.generator_losses(
        x,
        None,
        j,
        z,
        sigmas=sigmas,
        schedule=SCHEDULE,
        online=lambda x, s, y: 0.5 * x,
        target=lambda x, s, y: 0.25 * x,
        distance=losses.l2_distance,
        critic=critic,
        augment=lambda images: images.flip(-1),  # D judges the augmented prediction (ADA on G's term too)
    )
    t_hi, t_lo = sigmas[j].view(-1, 1, 1, 1), sigmas[j - 1].view(-1, 1, 1, 1)
    pred, target = 0.5 * (x + t_hi * z), 0.25 * (x + t_lo * z)
    loss_ct = (pred - target).square().flatten(1).mean(1)  # the consistency term is not augmented
    logits = (pred.flip(-1) * critic.weight).flatten(1).sum(1) + critic.bias
    loss_adv = torch.log1p(torch.exp(-logits))  # softplus(-D(pred))
    lam = 0.6 * (j.double() / 10) ** math.log(0.2 / 0.6, 0.5)  # gan_ratio * w(t_hi), w by hand
    torch.testing.assert_close(out.consistency, loss_ct)
    torch.testing.assert_close(out.adversarial, loss_adv)
    torch.testing.assert_close(out.lam, lam.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.objective(), (1 - out.lam) * loss_ct + out.lam * loss_adv)
    # the target network's pass carries no gradient; the adversarial term reaches D's parameters
    # unless the caller freezes them (the module does, so the generator's loss never trains D)
    out.objective().sum().backward()
    assert critic.weight.grad is not None


def test_ict_weighting_scales_the_consistency_term_only():
    # the same pass with loss_weighting=ict: each example's L_ct is multiplied by 1 / (t_hi - t_lo) in the
    # objective, the adversarial term and lambda are untouched (docs/algorithm.md, section 3)
    x, z = _batch()
    ict = ConsistencySchedule(gan_ratio=0.6, mid_weight=0.2, loss_weighting="ict")
    sigmas, j = ict.sigmas(11), torch.tensor([1, 4, 7, 10])
    nets = {"online": lambda x, s, y: 0.5 * x, "target": lambda x, s, y: 0.25 * x}
    args = dict(sigmas=sigmas, online=nets["online"], target=nets["target"], distance=losses.l2_distance)
    critic = LinearCritic()
    plain = losses.generator_losses(
        x, None, j, z, schedule=SCHEDULE, critic=critic, augment=lambda i: i, **args
    )
    weighted = losses.generator_losses(
        x, None, j, z, schedule=ict, critic=critic, augment=lambda i: i, **args
    )
    gap = sigmas[j] - sigmas[j - 1]
    torch.testing.assert_close(weighted.weight, 1 / gap)
    assert torch.equal(plain.weight, torch.ones(4))
    for name in ("consistency", "adversarial", "lam"):
        assert torch.equal(getattr(weighted, name), getattr(plain, name))
    expected = (1 - plain.lam) * plain.consistency / gap + plain.lam * plain.adversarial
    torch.testing.assert_close(weighted.objective(), expected)


def test_generator_losses_without_a_discriminator_are_plain_consistency_training():
    x, z = _batch()
    out = losses.generator_losses(
        x,
        None,
        torch.tensor([1, 2, 3, 4]),
        z,
        sigmas=SCHEDULE.sigmas(5),
        schedule=SCHEDULE,
        online=lambda x, s, y: x,
        target=lambda x, s, y: 0 * x,
        distance=losses.l1_distance,
    )
    assert torch.equal(out.lam, torch.zeros(4)) and torch.equal(out.adversarial, torch.zeros(4))
    torch.testing.assert_close(out.objective(), out.consistency)


@pytest.mark.parametrize("with_r1", [True, False])
def test_discriminator_losses_with_a_linear_critic(with_r1):
    x, z = _batch(6)
    fake_x, real_x = x[:3], x[3:]
    sigmas = SCHEDULE.sigmas(11)
    fake_j, real_j = torch.tensor([2, 5, 10]), torch.tensor([1, 6, 9])
    critic = LinearCritic()
    out = losses.discriminator_losses(
        fake_x,
        None,
        fake_j,
        z[:3],
        real_x,
        None,
        real_j,
        sigmas=sigmas,
        schedule=SCHEDULE,
        online=lambda x, s, y: 0.5 * x,
        critic=critic,
        augment=lambda images: images,
        r1_gamma=10.0,
        with_r1=with_r1,
    )
    t_fake = sigmas[fake_j].view(-1, 1, 1, 1)
    w_fake = SCHEDULE.weight(sigmas[fake_j], 11)
    w_real = SCHEDULE.weight(sigmas[real_j], 11)
    fake = 0.5 * (fake_x + t_fake * z[:3])
    d = lambda v: (v * critic.weight).flatten(1).sum(1) + critic.bias  # noqa: E731
    torch.testing.assert_close(out.fake, torch.nn.functional.softplus(d(fake)) * w_fake)
    torch.testing.assert_close(out.real, torch.nn.functional.softplus(-d(real_x)) * w_real)
    # dD/dr = W for every example: R1 = (gamma / 2) w(t') ||W||^2
    r1 = 5.0 * w_real * critic.weight.square().sum() if with_r1 else torch.zeros(3)
    torch.testing.assert_close(out.r1, r1.detach())
    torch.testing.assert_close(out.objective(0.6), 0.6 * (out.fake + out.real + out.r1))
    out.objective(0.6).sum().backward()
    if with_r1:  # the double backward reaches D's weights through the penalty
        assert critic.weight.grad is not None


@pytest.mark.parametrize("with_r1", [True, False])
def test_d_halves_augmented_together_are_what_two_calls_give(with_r1):
    """model.speed.joint_d_pass: the iteration's `DrawnAugmentation` takes the fake and the real half in one
    pass (`together`), with the random numbers the two calls would take in turn: the losses of a joint run
    and of two passes (joint=False, the reference's way) agree to float rounding."""
    from act_lightning.augment import AugmentPipe, DrawnAugmentation, draw_augmentation

    x, z = _batch(8)
    sigmas = SCHEDULE.sigmas(11)
    fake_j, real_j = torch.tensor([2, 5, 10, 3]), torch.tensor([1, 6, 9, 4])
    critic = LinearCritic()
    pipe, calls = AugmentPipe(), []

    def run(joint: bool):
        g = torch.Generator().manual_seed(3)
        draws = [draw_augmentation(4, torch.device("cpu"), g) for _ in range(2)]  # fakes, then reals
        augmentation = DrawnAugmentation(pipe, torch.tensor(0.7), draws)
        spy = type("Spy", (), {})  # counts the pipeline's calls of either kind
        spy.__call__ = lambda self, images: calls.append(1) or augmentation(images)
        spy.together = lambda self, *batches: calls.append(len(batches)) or augmentation.together(*batches)
        return losses.discriminator_losses(
            x[:4], None, fake_j, z[:4], x[4:], None, real_j, sigmas=sigmas, schedule=SCHEDULE,
            online=lambda x, s, y: 0.5 * x, critic=critic, augment=spy(), r1_gamma=10.0,
            with_r1=with_r1, joint=joint,
        )  # fmt: skip

    joint, apart = run(True), run(False)
    assert calls == [2, 1, 1]  # one call with both halves, then two
    for name in ("fake", "real", "r1"):
        torch.testing.assert_close(getattr(joint, name), getattr(apart, name), atol=1e-5, rtol=1e-5)
    assert (joint.r1 > 0).all() if with_r1 else (joint.r1 == 0).all()


def test_r1_penalty_matches_finite_differences():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )
    critic = lambda x, s, y: net(x).flatten()  # noqa: E731
    schedule = ConsistencySchedule(gan_ratio=0.3)  # w = 1
    x = torch.randn(3, 1, 4, 4)
    out = losses.discriminator_losses(
        x,
        None,
        torch.tensor([1, 1, 1]),
        torch.zeros_like(x),
        x,
        None,
        torch.tensor([1, 2, 3]),
        sigmas=schedule.sigmas(5),
        schedule=schedule,
        online=lambda x, s, y: x,
        critic=critic,
        augment=lambda images: images,
        r1_gamma=2.0,
        with_r1=True,
    )
    net64 = net.double()
    eps = 1e-6
    for b in range(3):
        base = x[b].double().flatten()
        grad = torch.zeros(16, dtype=torch.float64)
        for i in range(16):
            e = torch.zeros(16, dtype=torch.float64)
            e[i] = eps
            grad[i] = (net64((base + e).view(1, 1, 4, 4)) - net64((base - e).view(1, 1, 4, 4))).item() / (
                2 * eps
            )
        assert out.r1[b].item() == pytest.approx(grad.square().sum().item(), rel=1e-4)  # gamma / 2 = 1


def test_r1_of_a_float64_discriminator_is_computed_in_float64():
    """Gradient checks run D in float64: the R1 pass casts half precision up to float32, never float64
    down (it failed: "Input type (float) and bias type (double) should be the same")."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1)).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    _, _, grad = losses.logits_and_r1_gradient(
        lambda v, s, y: net(v).flatten(), x, torch.ones(3), None, x, torch.ones(3), None
    )
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, net[1].weight.view(1, 1, 4, 4).expand(3, 1, 4, 4), rtol=0, atol=0)


def test_the_traceable_r1_pass_computes_what_the_double_backward_computes(cfg_factory):
    # The smoke discriminator (group norm, classic attention, SiLU, convolutions) in its R1 mode: logits,
    # the input gradient, and what the penalty's backward puts in D's parameters, with both ways.
    from hydra.utils import instantiate

    from act_lightning.module import Critic

    torch.manual_seed(0)
    disc = instantiate(cfg_factory(["debug=smoke", "data=synthetic"]).model).discriminator
    critic = Critic(disc, "identity")
    g = torch.Generator().manual_seed(1)
    fake, real = (torch.randn(3, 1, 8, 8, generator=g) for _ in range(2))  # digits
    t_fake, t_real = torch.tensor([0.5, 2.0, 40.0]), torch.tensor([0.1, 1.0, 10.0])
    results = []
    for r1_pass in (losses.logits_and_r1_gradient, losses.logits_and_r1_gradient_traceable):
        disc.zero_grad()
        with disc.double_backward_safe():
            fake_logits, real_logits, grad = r1_pass(critic, fake, t_fake, None, real, t_real, None)
        (fake_logits.sum() + real_logits.sum() + grad.square().sum()).backward()
        weights = torch.cat([p.grad.flatten() for p in disc.parameters() if p.requires_grad])
        results.append((fake_logits, real_logits, grad, weights))
    assert disc._attention  # the classic attention's double backward is in it
    # float rounding apart (torch.func orders some sums otherwise: about 2e-6 of each norm under torch
    # 2.14, up to 1.8e-5 under 2.7; a wrong pass differs by the norm's order)
    for a, b in zip(*results, strict=True):
        assert a.norm() > 0 and (a - b).norm() <= 1e-4 * a.norm()


@pytest.mark.parametrize("size", [32, 224, 256])
def test_lpips_always_sees_224_pixels_as_the_reference(size):
    distance = losses.LPIPSDistance(pretrained_backbone=False)
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, pred, target, normalize):
            seen.append((tuple(pred.shape[-2:]), tuple(target.shape[-2:])))
            return torch.zeros(pred.shape[0], 1, 1, 1)

    distance.net = Recorder()
    distance(torch.zeros(2, 3, size, size), torch.zeros(2, 3, size, size))
    assert seen == [((224, 224), (224, 224))]  # down from 256 too, not only up from 32


def test_r1_runs_in_float32_with_autocast_off_inside_mixed_precision():
    seen = []

    def critic(x, sigma, labels):
        seen.append((x.dtype, torch.is_autocast_enabled("cpu")))
        return (x.float() * 2).flatten(1).sum(1)

    x = torch.rand(4, 1, 4, 4) * 2 - 1
    schedule = ConsistencySchedule(gan_ratio=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = losses.discriminator_losses(
            x[:2],
            None,
            torch.tensor([1, 2]),
            torch.zeros_like(x[:2]),
            x[2:],
            None,
            torch.tensor([1, 2]),
            sigmas=schedule.sigmas(5),
            schedule=schedule,
            online=lambda x, s, y: x,
            critic=critic,
            augment=lambda images: images.to(torch.bfloat16),  # what a half-precision pipeline would hand on
            r1_gamma=10.0,
            with_r1=True,
        )
    assert seen[0][1] is True  # the fake pass runs under the run's autocast ...
    assert seen[1] == (torch.float32, False)  # ... the R1 pass in float32 with autocast off
    assert out.r1.dtype == torch.float32
    torch.testing.assert_close(out.r1, torch.full((2,), 5.0 * 4 * 16))  # (gamma/2) ||2||^2 over 16 pixels


def test_lpips_backbone_built_from_the_convolutions_alone_is_torchvisions_vgg16_features():
    import lpips.pretrained_networks as backbones
    from torchvision.models import vgg16

    whole = backbones.tv.vgg16
    with losses.vgg16_convolutions_only():
        assert backbones.tv.vgg16 is not whole
        features = backbones.tv.vgg16(pretrained=False).features
    assert backbones.tv.vgg16 is whole  # put back
    reference = vgg16().features
    assert str(features) == str(reference)  # the same layers in the same order
    mine, theirs = features.state_dict(), reference.state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}
    for key, w in mine.items():  # torchvision's initialisation: kaiming normal (fan out), zero bias
        if key.endswith("bias"):
            assert not w.any()
        else:
            assert abs(w.std().item() / (2 / (w.shape[0] * w[0, 0].numel())) ** 0.5 - 1) < 0.1, key


def test_lpips_compares_images_in_minus_one_to_one_as_lpips_itself_does():
    # lpips.LPIPS(normalize=False) takes images in [-1, 1]: the distance is that of the resized images
    torch.manual_seed(0)
    d = losses.LPIPSDistance(pretrained_backbone=False, resize=64)
    x, y = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    up = lambda im: torch.nn.functional.interpolate(im, size=64, mode="bilinear", align_corners=False)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(d(x, y), d.net(up(x), up(y), normalize=False).flatten())


def test_the_consistency_target_carries_no_gradient_even_when_it_is_the_online_network():
    # teacher=online (iCT, ECT): theta^- = theta, and the target side still gets no gradient (stopgrad)
    from act_lightning.consistency import ConsistencySchedule

    w = torch.nn.Parameter(torch.tensor(0.7))
    net = lambda x, t, y: w * x / (1 + t.view(-1, 1, 1, 1))  # noqa: E731
    stopped = lambda x, t, y: net(x, t, y).detach()  # noqa: E731
    x, z = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    t_hi, t_lo = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 0.5, 0.1])
    l2 = lambda a, b: ((a - b) ** 2).flatten(1).sum(1)  # noqa: E731
    grads = []
    for target in (net, stopped):
        kw = dict(schedule=ConsistencySchedule(gan_ratio=0.0), online=net, target=target, distance=l2)
        losses.pair_losses(x, None, t_hi, t_lo, z, **kw).consistency.sum().backward()
        grads.append(w.grad.clone())
        w.grad = None
    assert grads[0] == grads[1] and grads[0] != 0


def test_msssim_of_images_too_small_for_two_scales_is_ssim():
    # 20 x 20 with the 11 x 11 window: a second scale needs more than (11 - 1) * 2 = 20 pixels
    torch.manual_seed(0)
    x = torch.rand(3, 3, 20, 20) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    torch.testing.assert_close(losses.msssim_distance(x, y), losses.ssim_distance(x, y))


def test_pseudo_huber_c_zero_and_lpips_resize_32_are_accepted_at_their_bounds():
    a, b = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    b[0, 0, 0, 0], b[0, 0, 0, 1] = 3.0, 4.0
    norm = losses.build_distance("pseudo_huber", pseudo_huber_c=0.0)  # ECT's CIFAR-10 c
    torch.testing.assert_close(norm(a, b), torch.tensor([5.0, 0.0]))
    assert losses.build_distance("lpips", lpips_pretrained=False, lpips_resize=32).resize == 32
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="model.pseudo_huber_c must be null"):
            losses.build_distance("pseudo_huber", pseudo_huber_c=bad)
