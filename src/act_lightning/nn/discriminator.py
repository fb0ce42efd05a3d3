"""The discriminator D(x, c_noise, y): the reference encoder built from diffusers blocks
(docs/algorithm.md, section 10, which also says how its construction matches the reference's parameter
counts).

R1 differentiates D's input gradient once more (`create_graph=True`), so the R1 pass runs diffusers'
classic `AttnProcessor`, which supports double backward on every device and dtype; the fused
`AttnProcessor2_0` does not (docs/performance.md). After `use_fast_attention(True)` every other pass uses
the fused kernel and `double_backward_safe()` switches to the classic one around the R1 pass; with False
(the reference's straightforward path) every pass is classic. With `flex=True` (model.speed.flex_attention)
the passes outside R1 run `FlexAttnProcessor` (act_lightning.nn.attention) instead of the fused one. Nothing
differentiates the generator twice: it needs no such switch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, get_down_block
from torch import Tensor, nn

from act_lightning.nn.generator import scaled_widths


class Discriminator(nn.Module):
    """D(x, c_noise, y) -> (B,) logits. Module names follow diffusers' so released checkpoints load."""

    config_prefix = "model.discriminator"

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int = 3,
        block_out_channels: Sequence[int],
        down_block_types: Sequence[str],
        layers_per_block: int = 3,
        attention_head_dim: int | None = 8,
        num_class_embeds: int | None = None,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        final_norm: bool = False,
        norm_num_groups: int = 32,
        channel_divisor: int = 1,
    ):
        super().__init__()
        widths = scaled_widths(
            self.config_prefix,
            image_size,
            block_out_channels,
            {"down_block_types": down_block_types},
            norm_num_groups,
            channel_divisor,
            attention_head_dim,
        )
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_class_embeds = num_class_embeds
        temb_channels = 4 * widths[0]

        # Keep this order: initialisation draws random numbers in creation order, so the initial weights
        # for a given seed depend on it.
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        self._build_embeddings(widths[0], temb_channels, num_class_embeds, flip_sin_to_cos, freq_shift)
        self._build_encoder(
            widths, temb_channels, down_block_types, layers_per_block, attention_head_dim, norm_num_groups
        )
        self._build_head(widths[-1], norm_num_groups, final_norm)

        # One processor object of each kind, kept: switching back and forth hands the same objects to
        # the attention layers, so a compiled forward's guards keep holding (no recompilation).
        self._attention = [m for m in self.modules() if isinstance(m, Attention)]
        self._classic, self._fused = AttnProcessor(), AttnProcessor2_0()
        self.use_fast_attention(False)

    def _build_embeddings(
        self,
        width: int,
        temb_channels: int,
        num_class_embeds: int | None,
        flip_sin_to_cos: bool,
        freq_shift: int,
    ) -> None:
        """time_proj, time_embedding and (class-conditional only) class_embedding."""
        self.time_proj = Timesteps(width, flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(width, temb_channels)
        self.class_embedding = (
            nn.Embedding(num_class_embeds, temb_channels) if num_class_embeds is not None else None
        )

    def _build_encoder(
        self,
        widths: Sequence[int],
        temb_channels: int,
        down_block_types: Sequence[str],
        layers_per_block: int,
        attention_head_dim: int | None,
        norm_num_groups: int,
    ) -> None:
        """down_blocks (each but the last halves the resolution), then mid_block (with attention)."""
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(down_block_types):
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block,
                    in_channels=widths[max(i - 1, 0)],
                    out_channels=widths[i],
                    temb_channels=temb_channels,
                    add_downsample=i < len(widths) - 1,
                    resnet_eps=1e-5,
                    resnet_act_fn="silu",
                    resnet_groups=norm_num_groups,
                    attention_head_dim=attention_head_dim if attention_head_dim is not None else widths[i],
                    downsample_padding=1,
                )
            )
        self.mid_block = UNetMidBlock2D(
            in_channels=widths[-1],
            temb_channels=temb_channels,
            resnet_eps=1e-5,
            resnet_act_fn="silu",
            resnet_groups=norm_num_groups,
            attention_head_dim=attention_head_dim if attention_head_dim is not None else widths[-1],
            add_attention=True,
        )

    def _build_head(self, width: int, norm_num_groups: int, final_norm: bool) -> None:
        """The pooled logit head: optional GroupNorm, SiLU, 2x2 average pool, to_logit."""
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, width, eps=1e-5) if final_norm else None
        self.conv_act = nn.SiLU()
        self.to_logit = nn.Linear(4 * width, 1)
        self.to_logit_fx = nn.Linear(4 * width, 1)  # unused; in the released checkpoints
        # Frozen, so that DDP (which expects a gradient for every trainable parameter) and the optimiser
        # leave it alone; it stays in the state dict, so the released checkpoints load strictly.
        self.to_logit_fx.requires_grad_(False)

    def use_fast_attention(self, fast: bool, flex: bool = False) -> None:
        """True: the fused kernel (`F.scaled_dot_product_attention`) outside `double_backward_safe()`; with
        `flex`, `FlexAttnProcessor` instead (model.speed.flex_attention: flex_attention's kernel in graphs
        compiled for a GPU, the fused kernel elsewhere). Before compiling: a compiled forward guards on the
        processor objects."""
        if flex:
            from act_lightning.nn.attention import FlexAttnProcessor, check_self_attention

            for module in self._attention:
                check_self_attention(module)
            self._fused = FlexAttnProcessor()
        self.fast_attention = bool(fast)
        self._set_processors(self._fused if fast else self._classic)

    def _set_processors(self, processor) -> None:
        for module in self._attention:
            module.processor = processor  # what set_processor does, without its per-call logging

    @contextmanager
    def double_backward_safe(self) -> Iterator[None]:
        """Within: every attention layer runs the classic processor, and a compiled forward (`compile()`)
        runs eagerly: the R1 pass differentiates D twice, which neither supports."""
        from act_lightning.compat import eager_forward  # (Lightning is no import of the exported generator)

        self._set_processors(self._classic)
        try:
            with eager_forward(self):
                yield
        finally:
            self._set_processors(self._fused if self.fast_attention else self._classic)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W); c_noise: (B,) or scalar. Labels are ignored when num_class_embeds=None."""
        c_noise = torch.as_tensor(c_noise, device=x.device)
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(x.shape[0])
        t_emb = self.time_proj(c_noise).to(self.time_embedding.linear_1.weight.dtype)  # (B, C0) float32
        emb = self.time_embedding(t_emb)  # (B, 4 C0)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError(
                    f"this discriminator has num_class_embeds={self.num_class_embeds} (class-conditional) "
                    f"and needs class_labels"
                )
            emb = emb + self.class_embedding(class_labels).to(emb.dtype)

        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h, _ = block(h, emb)
        h = self.mid_block(h, emb)  # (B, C_last, H / 2^(n-1), W / 2^(n-1))
        if self.conv_norm_out is not None:
            # NCHW in: the CPU kernel keeps a channels-last input's layout but torch.compile's tracing
            # assumes NCHW out, so the head's flatten fails under aot_eager (CUDA's kernel is NCHW anyway)
            h = self.conv_norm_out(h.contiguous())
        h = F.adaptive_avg_pool2d(self.conv_act(h), 2).flatten(1)  # (B, 4 C_last)
        return self.to_logit(h).squeeze(1)  # (B,)
