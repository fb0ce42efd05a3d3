"""model.speed.flex_attention: the attention of compiled graphs on a GPU as flex_attention's generated kernel,
the same computation as diffusers' fused processor. flex_attention has no backward on the CPU, so these
tests let the CPU stand in for the GPU where they say so (`as_if_on_gpu`): torch's own dense backward of
flex_attention then runs, which checks the padding of narrow heads and the routing; the generated Triton
kernels themselves are checked on a GPU (tests/integration/test_gpu.py)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from hydra.utils import instantiate

import act_lightning.nn.attention as attention_module
from act_lightning.nn.attention import FlexAttnProcessor, attention, padded_flex_attention
from act_lightning.speed import SpeedOptions
from tests.helpers_training import SMALL

FLEX = ["model.speed.flex_attention=true"]


def _image_attention(channels=32, head_dim=8):
    """diffusers' attention layer as the UNet blocks build it (group norm, residual, rescale)."""
    torch.manual_seed(0)
    return Attention(
        channels,
        heads=channels // head_dim,
        dim_head=head_dim,
        norm_num_groups=8,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
        rescale_output_factor=2.0,
    )


def _output_and_gradients(attn, processor, x):
    attn.set_processor(processor)
    out = attn(x)
    return out, torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])


def test_eager_the_processor_is_diffusers_fused_processor_bit_for_bit():
    attn = _image_attention()
    x = torch.randn(2, 32, 4, 4, requires_grad=True)
    fused, fused_grads = _output_and_gradients(attn, AttnProcessor2_0(), x)
    flex, flex_grads = _output_and_gradients(attn, FlexAttnProcessor(), x)
    assert torch.equal(flex, fused)
    assert all(torch.equal(a, b) for a, b in zip(flex_grads, fused_grads, strict=True))
    classic, _ = _output_and_gradients(attn, AttnProcessor(), x)
    assert not torch.equal(classic, fused)  # (another kernel: the comparison above can tell them apart)
    torch.testing.assert_close(classic, fused)


@pytest.mark.parametrize("head_dim", [8, 12, 16, 64])
def test_narrow_heads_are_padded_with_zeros_and_keep_their_own_scale(as_if_on_gpu, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    q, k, v = (torch.randn(2, 3, 24, head_dim, generator=g, requires_grad=True) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)  # scale 1 / sqrt(head_dim)
    got = padded_flex_attention(q, k, v)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn(expected.shape, generator=g)
    for a, b in zip(
        torch.autograd.grad(got, (q, k, v), upstream), torch.autograd.grad(expected, (q, k, v), upstream)
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Graphs:
    """A torch.compile backend that keeps the operators of each graph it is given and runs it as traced
    (AOTAutograd's graphs with eager kernels)."""

    def __init__(self):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        self.targets = []

        def keep(gm, example_inputs):
            self.targets += [str(node.target) for node in gm.graph.nodes if node.op == "call_function"]
            return make_boxed_func(gm.forward)

        self.backend = aot_autograd(fw_compiler=keep, bw_compiler=keep)


def test_compiled_graphs_attend_with_flex_attention_where_it_has_a_backward(monkeypatch):
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    for devices, flex in ((("cuda",), False), (("cuda", "cpu"), True)):  # the CPU as it is, then as a GPU
        monkeypatch.setattr(attention_module, "FLEX_DEVICES", devices)
        monkeypatch.setattr(torch.nn.attention.flex_attention, "_validate_device", lambda *tensors: None)
        torch._dynamo.reset()
        graphs = _Graphs()
        out = torch.compile(attention, backend=graphs.backend, fullgraph=True)(q, k, v)
        out.sum().backward()
        ran_flex = any("flex_attention" in t for t in graphs.targets)
        ran_fused = any("scaled_dot_product" in t or "_efficient_attention" in t for t in graphs.targets)
        assert (ran_flex, ran_fused) == (flex, not flex), graphs.targets
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_the_keys_need_a_compile_and_the_fused_kernel_and_install_the_processor(cfg_factory):
    with pytest.raises(ValueError, match="flex_attention .* needs model.speed.compile=true"):
        SpeedOptions(flex_attention=True)
    with pytest.raises(ValueError, match="needs model.speed.fast_attention=true"):
        SpeedOptions(flex_attention=True, compile=True, fast_attention=False)
    model = instantiate(cfg_factory([*SMALL, *FLEX, "model.speed.compile=eager"]).model)
    for net in (model.generator, model.target, model.discriminator):
        layers = [m for m in net.modules() if isinstance(m, Attention)]
        assert layers and {type(m.processor) for m in layers} == {FlexAttnProcessor}
    disc = model.discriminator
    with disc.double_backward_safe():  # R1 differentiates D twice: the classic kernel
        assert {type(m.processor) for m in disc._attention} == {AttnProcessor}
    assert {type(m.processor) for m in disc._attention} == {FlexAttnProcessor}


def test_a_network_with_another_kind_of_attention_is_refused():
    from act_lightning.speed import use_flex_attention

    cross = torch.nn.Sequential(Attention(32, cross_attention_dim=16, heads=4, dim_head=8))
    with pytest.raises(ValueError, match="has cross-attention: set model.speed.flex_attention=false"):
        use_flex_attention(cross)


def test_flex_attention_gets_heads_padded_to_a_power_of_two_of_at_least_16_channels(monkeypatch):
    import torch.nn.attention.flex_attention as flex

    seen = []

    def recording(query, key, value, scale):
        seen.append(((query.shape[-1], key.shape[-1], value.shape[-1]), scale))
        return torch.zeros_like(query)

    monkeypatch.setattr(flex, "flex_attention", recording)
    for head_dim, width in ((4, 16), (8, 16), (12, 16), (16, 16), (24, 32), (32, 32)):
        q = torch.randn(1, 2, 5, head_dim)
        assert padded_flex_attention(q, q, q).shape == q.shape
        assert seen.pop() == ((width,) * 3, head_dim**-0.5), head_dim


def test_the_self_attention_check_names_every_extra_a_layer_has():
    from types import SimpleNamespace

    from act_lightning.nn.attention import check_self_attention

    check_self_attention(_image_attention())  # the UNet blocks' layer: allowed
    extras = {
        "cross-attention": {"is_cross_attention": True},
        "a spatial norm": {"spatial_norm": object()},
        "query/key norms": {"norm_k": object()},
    }
    for name, attributes in extras.items():
        with pytest.raises(ValueError, match=f"has {name}: set model.speed.flex_attention=false"):
            check_self_attention(SimpleNamespace(**attributes))
    with pytest.raises(ValueError, match="has a spatial norm, query/key norms: set"):
        check_self_attention(SimpleNamespace(spatial_norm=object(), norm_q=object()))


def test_compiled_graphs_on_the_cpu_keep_the_fused_kernel_as_shipped():
    q, k, v = (torch.randn(2, 3, 16, 8, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()
    graphs = _Graphs()
    out = torch.compile(attention, backend=graphs.backend, fullgraph=True)(q, k, v)
    out.sum().backward()  # flex_attention has no backward on the CPU
    torch._dynamo.reset()
    assert not any("flex_attention" in t for t in graphs.targets), graphs.targets
    assert q.grad is not None and q.grad.isfinite().all()


def test_the_processor_refuses_a_mask_encoder_states_or_a_sequence_input():
    attn = _image_attention()
    x = torch.randn(2, 32, 4, 4)
    processor = FlexAttnProcessor()
    for kwargs in (
        {"attention_mask": torch.zeros(2, 16, 16)},
        {"encoder_hidden_states": torch.randn(2, 16, 32)},
    ):
        with pytest.raises(ValueError, match="without a mask or encoder states"):
            processor(attn, x, **kwargs)
    with pytest.raises(ValueError, match=r"attends over an image \(B, C, H, W\)"):
        processor(attn, x.flatten(2).transpose(1, 2))
