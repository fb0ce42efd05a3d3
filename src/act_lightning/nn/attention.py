"""The networks' attention inside compiled graphs on a GPU (`model.speed.flex_attention`).

The CIFAR-10 networks attend with 8 channels per head (16 or 32 heads over 256 positions). In float32,
`F.scaled_dot_product_attention` runs a memory-efficient kernel without tensor cores there: 37 of the 125 ms
of kernels of a compiled CIFAR-10 iteration on an H200 (docs/performance.md). diffusers' classic processor
writes every score matrix to memory (16 heads x 256 x 256 per image). `flex_attention`, compiled, is a flash
kernel that inductor generates for the shapes at hand (TF32 dot products where TF32 matmuls are on); its
Triton dot products need at least 16 channels per head, so narrower heads are padded with zeros, which
leaves the scores, the softmax and the output's first channels as they were.

`FlexAttnProcessor` computes what diffusers' `AttnProcessor2_0` computes for the self-attention of an image
(group norm, projections, heads, attention at scale 1/sqrt(channels per head), output projection, residual,
rescale). Only where torch.compile traces it for a CUDA tensor does its attention run as `flex_attention`;
eager (sampling, the R1 pass's double backward has the classic processor anyway) and on the CPU, whose
flex_attention has no backward, it is the fused kernel, the same operation as `AttnProcessor2_0`'s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_HEAD_DIM = 16  # Triton's tl.dot: flex_attention's generated kernels want at least 16 channels per head
FLEX_DEVICES = ("cuda",)  # where compiled graphs run flex_attention (the CPU's has no backward)


def padded_flex_attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, heads, N, d) by `flex_attention`, with d padded by zeros to
    the next power of two of at least 16 channels: the zeros add nothing to q k^T, and v's zero channels
    give output channels that are cut off again. The scale is the unpadded d's."""
    from torch.nn.attention.flex_attention import flex_attention

    d = query.shape[-1]
    width = max(MIN_HEAD_DIM, 1 << (d - 1).bit_length())
    if width != d:
        query, key, value = (F.pad(t, (0, width - d)) for t in (query, key, value))
    out = flex_attention(query, key, value, scale=d**-0.5)
    return out[..., :d] if width != d else out


def attention(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
    """Attention over (B, heads, N, d): flex_attention's generated kernel inside a graph that torch.compile
    traces for a CUDA device, else the fused kernel (`F.scaled_dot_product_attention`)."""
    if torch.compiler.is_compiling() and query.device.type in FLEX_DEVICES:
        return padded_flex_attention(query, key, value)
    return F.scaled_dot_product_attention(query, key, value)


def check_self_attention(module: nn.Module) -> None:
    """FlexAttnProcessor covers diffusers' image self-attention as the UNet blocks build it; a layer with
    cross-attention, a spatial norm or query/key norms is another computation."""
    extras = {
        "cross-attention": getattr(module, "is_cross_attention", False),
        "a spatial norm": getattr(module, "spatial_norm", None) is not None,
        "query/key norms": getattr(module, "norm_q", None) is not None
        or getattr(module, "norm_k", None) is not None,
    }
    found = [name for name, present in extras.items() if present]
    if found:
        raise ValueError(
            "model.speed.flex_attention covers the image self-attention of diffusers' UNet blocks; an "
            f"attention layer of this network has {', '.join(found)}: set model.speed.flex_attention=false"
        )


class FlexAttnProcessor:
    """diffusers' attention processor for an image's self-attention (`AttnProcessor2_0`'s computation) whose
    attention is `attention` above: flex_attention in graphs compiled for a GPU."""

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        if hidden_states.ndim != 4 or encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(
                "FlexAttnProcessor (model.speed.flex_attention) attends over an image (B, C, H, W) to "
                "itself, without a mask or encoder states"
            )
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        x = hidden_states.view(batch, channels, height * width).transpose(1, 2)  # (B, N, C)
        if attn.group_norm is not None:
            x = attn.group_norm(x.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        heads = attn.heads
        head_dim = key.shape[-1] // heads
        query, key, value = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (query, key, value))
        out = attention(query, key, value)  # (B, heads, N, d)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))  # projection, dropout
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
