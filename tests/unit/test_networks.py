"""The networks of act_lightning.nn: reference sizes, shapes, smoke variants, R1's double backward, and
the consistency function's boundary condition (docs/algorithm.md, sections 1, 3, 8, 10)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor
from hydra.utils import instantiate
from omegaconf import OmegaConf

from act_lightning.consistency import karras_sigmas
from act_lightning.nn import Discriminator, UNetGenerator, consistency_function

CONF = Path(__file__).resolve().parents[2] / "conf" / "model"
DATA = {  # what each experiment's data config provides to the interpolations
    "cifar10": {"image_size": 32, "channels": 3, "num_classes": None},
    "imagenet64": {"image_size": 64, "channels": 3, "num_classes": 1000},
    "lsun_cat256": {"image_size": 256, "channels": 3, "num_classes": None},
    "digits": {"image_size": 8, "channels": 1, "num_classes": None},
}
REFERENCE_PARAMS = {  # docs/algorithm.md, section 8, in millions
    ("generator", "cifar10"): 27.50,
    ("generator", "imagenet64"): 107.60,
    ("generator", "lsun_cat256"): 113.67,
    ("discriminator", "cifar10"): 17.98,
    ("discriminator", "imagenet64"): 53.90,
    ("discriminator", "lsun_cat256"): 56.99,
}
SMOKE = {"channel_divisor": 8, "norm_num_groups": 4, "layers_per_block": 1}  # what debug=smoke overrides


def preset_config(kind: str, name: str):
    """conf/model/<kind>/<name>.yaml with the experiment's data keys filled in."""
    root = OmegaConf.create({"data": DATA[name], kind: OmegaConf.load(CONF / kind / f"{name}.yaml")})
    return root[kind]


def preset(kind: str, name: str, **overrides):
    # the discriminator configs are partials (the module builds D only when gan_ratio > 0): build it here
    return instantiate(preset_config(kind, name), _partial_=False, **overrides)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_discriminator(**kwargs) -> Discriminator:
    args = dict(
        image_size=8,
        in_channels=1,
        block_out_channels=[8, 8],
        down_block_types=["AttnDownBlock2D", "DownBlock2D"],
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=4,
        final_norm=True,
    )
    return Discriminator(**(args | kwargs))


def tiny_generator(**kwargs) -> UNetGenerator:
    args = dict(
        image_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=[8, 8],
        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        up_block_types=["AttnUpBlock2D", "UpBlock2D"],
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    return UNetGenerator(**(args | kwargs))


@pytest.mark.parametrize(("kind", "name"), list(REFERENCE_PARAMS))
def test_parameter_counts_match_reference(kind, name):
    with torch.device("meta"):  # no memory, no initialisation: instant even for 100M parameters
        net = preset(kind, name)
    millions = count(net) / 1e6
    assert millions == pytest.approx(REFERENCE_PARAMS[kind, name], rel=5e-3)


def test_digits_networks_are_small():
    with torch.device("meta"):
        assert 0.3e6 < count(preset("generator", "digits")) < 1.0e6
        assert 0.1e6 < count(preset("discriminator", "digits")) < 0.4e6


def test_digits_output_shapes():
    torch.manual_seed(0)
    G, D = preset("generator", "digits"), preset("discriminator", "digits")
    x, c_noise = torch.randn(5, 1, 8, 8), torch.rand(5) * 80
    assert G(x, c_noise).shape == (5, 1, 8, 8)
    assert D(x, c_noise).shape == (5,)
    assert D(x, torch.tensor(3.0)).shape == (5,)  # a scalar c_noise broadcasts over the batch


@pytest.mark.parametrize("name", list(DATA))
def test_smoke_variants_build_and_run(name):
    data = DATA[name]
    batch = 2 if data["image_size"] <= 64 else 1
    x = torch.randn(batch, data["channels"], data["image_size"], data["image_size"])
    c_noise = torch.full((batch,), 2.5)
    labels = torch.randint(0, data["num_classes"], (batch,)) if data["num_classes"] else None
    G, D = preset("generator", name, **SMOKE), preset("discriminator", name, **SMOKE)
    with torch.no_grad():
        assert G(x, c_noise, labels).shape == x.shape
        assert D(x, c_noise, labels).shape == (batch,)


def test_reference_checkpoint_module_names():
    with torch.device("meta"):
        G = preset("generator", "cifar10", **SMOKE)
        D = preset("discriminator", "cifar10", **SMOKE)
    assert all(key.startswith("unet.") for key in G.state_dict())
    keys = set(D.state_dict())
    for key in (
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "mid_block.attentions.0.to_q.weight",
        "conv_norm_out.weight",
        "to_logit.weight",
        "to_logit_fx.weight",
    ):
        assert key in keys
    assert "conv_norm_out.weight" not in preset("discriminator", "lsun_cat256", **SMOKE).state_dict()


def test_used_channels_pick_the_reference_outputs():
    torch.manual_seed(0)
    G = preset("generator", "cifar10", **SMOKE)
    x, c_noise = torch.randn(2, 3, 32, 32), torch.rand(2)
    with torch.no_grad():
        full = G.unet(x, c_noise).sample  # (2, 6, 32, 32)
        assert torch.equal(G(x, c_noise), full[:, 3:6])


def test_pick_channels_equals_indexing_without_copying_a_run():
    from act_lightning.nn.generator import pick_channels

    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    picked = pick_channels(out, [3, 4, 5])
    assert picked.data_ptr() == out[:, 3].data_ptr()  # a view: no index tensor, no gather
    for channels in ([3, 4, 5], [0, 2, 3], [5, 1], [4]):
        assert torch.equal(pick_channels(out, channels), out[:, channels])
    grad = torch.randn(2, 3, 4, 4)
    (a,) = torch.autograd.grad(pick_channels(out, [0, 2, 3]), out, grad)
    (b,) = torch.autograd.grad(out[:, [0, 2, 3]], out, grad)
    assert torch.equal(a, b)


def test_class_conditional_needs_labels_and_unconditional_ignores_them():
    x, c_noise = torch.randn(2, 3, 64, 64), torch.rand(2)
    for kind in ("generator", "discriminator"):
        net = preset(kind, "imagenet64", **SMOKE)
        with pytest.raises(ValueError, match="num_class_embeds=1000"):
            net(x, c_noise)
    G = preset("generator", "cifar10", **SMOKE)
    x, labels = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
    with torch.no_grad():
        assert torch.equal(G(x, c_noise, labels), G(x, c_noise))


@pytest.mark.parametrize(("kind", "cls"), [("generator", UNetGenerator), ("discriminator", Discriminator)])
def test_bad_configs_name_the_key(kind, cls):
    args = OmegaConf.to_container(preset_config(kind, "cifar10"), resolve=True)
    del args["_target_"]
    args.pop("_partial_", None)
    with pytest.raises(ValueError, match=rf"model\.{kind}\.image_size=36 cannot be downsampled 3 times"):
        cls(**(args | SMOKE | {"image_size": 36}))
    with pytest.raises(ValueError, match=rf"model\.{kind}\.norm_num_groups=32"):
        cls(**(args | {"channel_divisor": 8}))
    with pytest.raises(ValueError, match=rf"model\.{kind}\.down_block_types has 3 entries"):
        cls(**(args | {"down_block_types": ["DownBlock2D"] * 3}))
    with pytest.raises(ValueError, match=rf"model\.{kind}\.attention_head_dim=64"):
        cls(**(args | SMOKE | {"attention_head_dim": 64}))
    # through Hydra the same message arrives wrapped in an InstantiationException
    with pytest.raises(Exception, match=rf"model\.{kind}\.image_size=36 cannot be downsampled"):
        preset(kind, "cifar10", image_size=36)


def test_discriminator_attention_supports_double_backward():
    D = preset("discriminator", "cifar10", **SMOKE)
    processors = [m.processor for m in D.modules() if isinstance(m, Attention)]
    assert len(processors) == 2 and all(type(p) is AttnProcessor for p in processors)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    (grad,) = torch.autograd.grad(D(x, torch.rand(2)).sum(), x, create_graph=True)
    grad.square().sum().backward()
    assert D.to_logit.weight.grad is not None and D.to_logit.weight.grad.isfinite().all()


def test_r1_double_backward_matches_finite_differences():
    """d/dtheta ||dD/dx||^2 by double backward == central differences along a random direction (float64)."""
    torch.manual_seed(0)
    D = tiny_discriminator().double()
    for module in D.modules():
        if isinstance(module, Attention):
            module.upcast_softmax = False  # diffusers upcasts to float32, too coarse for a float64 check
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    c_noise = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)

    def penalty() -> torch.Tensor:
        r = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(D(r, c_noise).sum(), r, create_graph=True)
        return grad.square().sum()

    D.zero_grad()
    penalty().backward()
    params = [p for p in D.parameters() if p.grad is not None]
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * v).sum() for p, v in zip(params, direction, strict=True))

    eps = 1e-6
    with torch.no_grad():
        for p, v in zip(params, direction, strict=True):
            p.add_(eps * v)
    plus = penalty().detach()
    with torch.no_grad():
        for p, v in zip(params, direction, strict=True):
            p.sub_(2 * eps * v)
    minus = penalty().detach()
    numeric = (plus - minus) / (2 * eps)
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-5)
    # every weight of the attention layer takes part in the penalty's gradient
    assert all(p.grad.abs().sum() > 0 for p in D.down_blocks[0].attentions[0].to_q.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_r1_double_backward_on_cuda_fp16_autocast():
    torch.manual_seed(0)
    D = preset("discriminator", "cifar10", channel_divisor=4, norm_num_groups=8).cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)
    c_noise = torch.rand(8, device="cuda") * 80
    with torch.autocast("cuda", dtype=torch.float16):
        logits = D(x, c_noise)
        (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
        r1 = grad.float().square().sum(dim=(1, 2, 3)).mean()
    r1.backward()
    assert r1.isfinite() and r1 > 0
    for name, p in D.named_parameters():
        if p.grad is not None:
            assert p.grad.isfinite().all(), name
    assert D.mid_block.attentions[0].to_q.weight.grad.abs().sum() > 0


def test_consistency_function_boundary_condition_is_exact():
    torch.manual_seed(0)

    def backbone(x, c_noise, class_labels):
        return 1e3 * torch.randn_like(x)  # whatever F says, c_out(sigma_min) = 0 silences it

    x = torch.randn(4, 3, 8, 8)
    for sigma in (torch.full((4,), 0.002), torch.tensor(0.002), karras_sigmas(10)[0]):
        assert torch.equal(consistency_function(backbone, x, sigma, sigma_min=0.002), x)


@pytest.mark.parametrize(("kind", "c_noise"), [("identity", 1.0), ("log", 0.0)])
def test_consistency_function_scalings(kind, c_noise):
    # sigma = 1, sigma_data = 0.5, sigma_min = 0.002, by hand:
    c_skip = 0.25 / (0.998**2 + 0.25)  # 0.2006414...
    c_out = 0.998 * 0.5 / math.sqrt(1.25)  # 0.4463010...
    c_in = 1 / math.sqrt(1.25)  # 0.8944271...
    seen = {}

    def backbone(x, noise, class_labels):
        seen.update(x=x, noise=noise, labels=class_labels)
        return torch.full_like(x, 2.0)

    x, labels = torch.randn(2, 1, 4, 4, dtype=torch.float64), torch.tensor([3, 4])
    out = consistency_function(backbone, x, torch.ones(2), labels, c_noise_kind=kind)
    assert torch.allclose(out, c_skip * x + c_out * 2.0, rtol=1e-12, atol=0)
    assert torch.allclose(seen["x"], c_in * x, rtol=1e-12, atol=0)
    assert torch.allclose(seen["noise"], torch.full((2,), c_noise, dtype=torch.float64), atol=1e-12)
    assert seen["labels"] is labels


def test_the_skip_connection_of_a_half_precision_input_is_float32():
    """As NVlabs/edm: whatever the input's and the backbone's precision, c_skip x + c_out F is computed and
    returned in float32, so a bf16 input at sigma_min comes back exactly, in float32."""

    def backbone(x, c_noise, class_labels):
        return torch.zeros_like(x, dtype=torch.bfloat16)

    x = torch.randn(2, 1, 4, 4).to(torch.bfloat16)
    out = consistency_function(backbone, x, torch.tensor(0.002), sigma_min=0.002)
    assert out.dtype == torch.float32 and torch.equal(out, x.float())
    big = consistency_function(backbone, x, torch.tensor(3.0), sigma_min=0.002)
    c_skip = 0.25 / (2.998**2 + 0.25)
    torch.testing.assert_close(big, c_skip * x.float(), rtol=1e-6, atol=0)  # not c_skip rounded to bf16


def test_consistency_function_around_a_generator():
    G = preset("generator", "digits", **SMOKE)
    x = torch.randn(3, 1, 8, 8)
    out = consistency_function(G, x, torch.tensor([0.002, 1.0, 80.0]))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.equal(out[0], x[0])
    assert isinstance(G, UNetGenerator)


def test_block_layouts_at_the_edges_are_checked_by_name_and_one_block_is_allowed():
    G = tiny_generator(block_out_channels=[8], down_block_types=["DownBlock2D"], up_block_types=["UpBlock2D"])
    with torch.no_grad():
        assert G(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"model\.generator\.block_out_channels must list at least one"):
        tiny_generator(block_out_channels=[], down_block_types=[], up_block_types=[])
    with pytest.raises(ValueError, match=r"model\.generator\.channel_divisor=0 must be a positive divisor"):
        tiny_generator(channel_divisor=0)
    # the mid-block attends at the last width even where no down block has attention
    with pytest.raises(ValueError, match=r"model\.discriminator\.attention_head_dim=8 must divide .* \[12\]"):
        tiny_discriminator(
            block_out_channels=[8, 12], down_block_types=["DownBlock2D"] * 2, attention_head_dim=8
        )


def test_used_channels_must_pick_in_channels_existing_output_channels():
    G = tiny_generator(in_channels=1, out_channels=3, used_channels=[2])
    assert G.used_channels == [2]
    for used in ([3], [0, 1], [-1]):
        with pytest.raises(ValueError, match=r"model\.generator\.used_channels="):
            tiny_generator(in_channels=1, out_channels=3, used_channels=used)


def test_the_generator_hands_its_time_embedding_options_to_the_unet():
    config = tiny_generator(flip_sin_to_cos=False, freq_shift=1).unet.config
    assert (config.flip_sin_to_cos, config.freq_shift) == (False, 1)
    config = tiny_generator().unet.config
    assert (config.flip_sin_to_cos, config.freq_shift) == (True, 0)


def test_a_discriminator_without_a_head_width_has_one_head_per_layer_and_a_frozen_spare_head():
    D = tiny_discriminator(
        block_out_channels=[8, 16],
        down_block_types=["DownBlock2D", "AttnDownBlock2D"],
        attention_head_dim=None,
    )
    layers = [m for m in D.modules() if isinstance(m, Attention)]
    assert len(layers) == 2 and all(m.heads == 1 for m in layers)
    assert not any(p.requires_grad for p in D.to_logit_fx.parameters())  # DDP needs a gradient otherwise
    assert all(p.requires_grad for p in D.to_logit.parameters())


def test_the_discriminator_adds_the_class_embedding_and_pools_the_activated_features():
    torch.manual_seed(0)
    D = tiny_discriminator(num_class_embeds=3)
    x, c_noise, labels = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    seen = {}
    D.down_blocks[0].register_forward_hook(lambda m, args, out: seen.update(emb=args[1]))
    D.mid_block.register_forward_hook(lambda m, args, out: seen.update(mid=out))
    with torch.no_grad():
        logits = D(x, c_noise, labels)
        emb = D.time_embedding(D.time_proj(c_noise)) + D.class_embedding(labels)
        h = torch.nn.functional.silu(D.conv_norm_out(seen["mid"]))  # (2, 8, 4, 4)
        pooled = h.unflatten(2, (2, 2)).unflatten(4, (2, 2)).mean(dim=(3, 5)).flatten(1)  # 2x2 cells
        expected = pooled @ D.to_logit.weight.T + D.to_logit.bias
    torch.testing.assert_close(seen["emb"], emb)
    torch.testing.assert_close(logits, expected.squeeze(1))


def test_flex_attention_is_refused_for_a_discriminator_with_another_kind_of_attention():
    D = tiny_discriminator()
    D._attention[0].norm_k = torch.nn.LayerNorm(4)
    with pytest.raises(ValueError, match="has query/key norms: set model.speed.flex_attention=false"):
        D.use_fast_attention(True, flex=True)
