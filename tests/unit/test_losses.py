import math

import pytest
import torch

from act_lightning import losses


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


def test_lpips_plumbing_with_random_backbone():
    torch.manual_seed(0)
    d = losses.build_distance("lpips", lpips_pretrained=False)
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


def test_lpips_grayscale_input():
    d = losses.build_distance("lpips", lpips_pretrained=False)
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert d(x, x.flip(0)).shape == (2,)


def test_lpips_missing_weights_names_file_and_place(tmp_path):
    missing = tmp_path / "nowhere" / "vgg16-397923af.pth"
    with pytest.raises(FileNotFoundError) as err:
        losses.LPIPSDistance(weights=str(missing))
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and str(missing) in message
    assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message


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
    with pytest.raises(ValueError, match="could not read"):
        losses.LPIPSDistance(weights=str(path))


def test_unknown_distance_names_the_key():
    with pytest.raises(ValueError, match="model.distance must be one of"):
        losses.build_distance("l3")


def test_gan_losses():
    logits = torch.tensor([-2.0, 0.0, 3.0])
    assert torch.allclose(losses.generator_adversarial_loss(logits), torch.log1p(torch.exp(-logits)))
    assert torch.allclose(losses.discriminator_fake_loss(logits), torch.log1p(torch.exp(logits)))
    assert torch.allclose(losses.discriminator_real_loss(logits), torch.log1p(torch.exp(-logits)))


def test_r1_gradient_norm_matches_finite_differences():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )
    net = net.double()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    norms = losses.r1_gradient_norm(net(x).flatten(), x)
    eps = 1e-6
    for b in range(3):
        grad = torch.zeros(12, dtype=torch.float64)
        base = x[b : b + 1].detach().flatten()
        for i in range(12):
            e = torch.zeros(12, dtype=torch.float64)
            e[i] = eps
            up = net((base + e).view(1, 3, 2, 2)).item()
            down = net((base - e).view(1, 3, 2, 2)).item()
            grad[i] = (up - down) / (2 * eps)
        assert norms[b].item() == pytest.approx(grad.square().sum().item(), rel=1e-6)
    # the double backward reaches the weights
    norms.sum().backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0
