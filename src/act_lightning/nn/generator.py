"""The generator backbone F_theta: diffusers' UNet2DModel as in the reference code (docs/algorithm.md,
section 10).

The backbone knows nothing of noise schedules: it maps (c_in * x, c_noise, y) to an image-shaped output;
`consistency_function` (precond.py) adds the skip connection that enforces f(x, sigma_min) = x.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn


def scaled_widths(
    prefix: str,
    image_size: int,
    block_out_channels: Sequence[int],
    block_types: dict[str, Sequence[str]],
    norm_num_groups: int,
    channel_divisor: int,
    attention_head_dim: int | None,
) -> list[int]:
    """Check a diffusers block layout and return the widths divided by `channel_divisor`.

    `prefix` is the config group (`model.generator`, `model.discriminator`) so every error names the key
    to change. Every block but the last halves the resolution; attention runs in the `Attn*` blocks and in
    the mid-block (at the last width).
    """
    num_blocks = len(block_out_channels)
    if num_blocks == 0:
        raise ValueError(f"{prefix}.block_out_channels must list at least one width")
    for key, types in block_types.items():
        if len(types) != num_blocks:
            raise ValueError(
                f"{prefix}.{key} has {len(types)} entries but {prefix}.block_out_channels has {num_blocks}: "
                f"give one block type per width"
            )
    if channel_divisor < 1 or any(w % channel_divisor for w in block_out_channels):
        raise ValueError(
            f"{prefix}.channel_divisor={channel_divisor} must be a positive divisor of every width in "
            f"{prefix}.block_out_channels={list(block_out_channels)}"
        )
    widths = [int(w) // channel_divisor for w in block_out_channels]
    if any(w % norm_num_groups for w in widths):
        raise ValueError(
            f"{prefix}.norm_num_groups={norm_num_groups} must divide every width {widths} "
            f"({prefix}.block_out_channels={list(block_out_channels)} / channel_divisor={channel_divisor})"
        )
    factor = 2 ** (num_blocks - 1)
    if image_size % factor:
        raise ValueError(
            f"{prefix}.image_size={image_size} cannot be downsampled {num_blocks - 1} times (once per "
            f"block of {prefix}.block_out_channels={list(block_out_channels)} but the last): "
            f"use a multiple of {factor}"
        )
    if attention_head_dim is not None:
        down_types = next(iter(block_types.values()))
        attention_widths = [w for w, t in zip(widths, down_types, strict=True) if "Attn" in t] + [widths[-1]]
        if any(w % attention_head_dim for w in attention_widths):
            raise ValueError(
                f"{prefix}.attention_head_dim={attention_head_dim} must divide the widths of the attention "
                f"layers {sorted(set(attention_widths))} (after channel_divisor={channel_divisor}); "
                f"null means one head"
            )
    return widths


class UNetGenerator(nn.Module):
    """F_theta(x, c_noise, y) -> (B, C_img, H, W), a diffusers UNet2DModel held as `self.unet`.

    `used_channels` picks the image channels from a wider output (the CIFAR-10 reference predicts 6
    channels and uses 3..5), so released checkpoints load with their original shapes.
    `channel_divisor` divides every width: a tiny network with the same block structure (smoke tests).
    """

    config_prefix = "model.generator"

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int = 3,
        out_channels: int = 3,
        used_channels: Sequence[int] | None = None,
        block_out_channels: Sequence[int],
        down_block_types: Sequence[str],
        up_block_types: Sequence[str],
        layers_per_block: int = 2,
        attention_head_dim: int | None = 8,
        num_class_embeds: int | None = None,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        norm_num_groups: int = 32,
        channel_divisor: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        prefix = self.config_prefix
        widths = scaled_widths(
            prefix,
            image_size,
            block_out_channels,
            {"down_block_types": down_block_types, "up_block_types": up_block_types},
            norm_num_groups,
            channel_divisor,
            attention_head_dim,
        )
        used = list(range(out_channels)) if used_channels is None else [int(c) for c in used_channels]
        if len(used) != in_channels or not all(0 <= c < out_channels for c in used):
            raise ValueError(
                f"{prefix}.used_channels={used} must pick in_channels={in_channels} of the "
                f"out_channels={out_channels} output channels (null = all of them); for images of "
                f"{in_channels} channel(s) (data.channels={in_channels}) with this network give "
                f"{prefix}.out_channels={in_channels} {prefix}.used_channels=null"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_class_embeds = num_class_embeds
        # a plain list (not a buffer: the state dict holds only `unet.*`); None when all channels are used
        self.used_channels = None if used == list(range(out_channels)) else used
        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=tuple(widths),
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            num_class_embeds=num_class_embeds,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
        )

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), already scaled by c_in; c_noise: (B,) or scalar. Labels are ignored by an
        unconditional network (num_class_embeds=None), so a labelled dataset can train one."""
        if self.num_class_embeds is None:
            class_labels = None
        elif class_labels is None:
            raise ValueError(
                f"this generator has num_class_embeds={self.num_class_embeds} (class-conditional) and "
                f"needs class_labels"
            )
        return run_unet(self.unet, x, c_noise, class_labels, self.used_channels)


def run_unet(unet: UNet2DModel, x: Tensor, c_noise: Tensor, class_labels, used_channels) -> Tensor:
    """The backbone's output (B, C, H, W): the UNet's (B, C_out, H, W), restricted to `used_channels`
    (None: all of them). Shared with the exported diffusers pipeline."""
    out = unet(x, c_noise, class_labels=class_labels, return_dict=False)[0]
    return out if used_channels is None else pick_channels(out, used_channels)


def pick_channels(out: Tensor, channels: Sequence[int]) -> Tensor:
    """out[:, channels] as views of consecutive runs (the reference's 3..5: one slice). Indexing with a
    list would copy the list to the device each call, which makes the host wait (a synchronising copy
    from pageable memory, found on an H200 by torch.cuda.set_sync_debug_mode), and gather the values."""
    runs: list[list[int]] = []
    for c in channels:
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    parts = [out[:, run[0] : run[-1] + 1] for run in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
