"""How the networks run, not what they compute: the speed options of `model.speed` (docs/performance.md).
`perf=baseline` turns them all off (the reference's straightforward path).

Every option computes the same thing to float tolerance, except the two bf16 ones (`bf16_lpips`,
`bf16_target`): they change the numerics, so they are off by default and a resumed run changes them only
through `resume_changes`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class SpeedOptions:
    channels_last: bool = True  # NHWC weights and activations for every convolution
    compile: bool | str = False  # torch.compile the networks: true (inductor) or a backend name
    compile_mode: str | None = None  # inductor's mode; reduce-overhead: CUDA graphs of the compiled graphs
    fast_attention: bool = True  # fused attention kernel (classic in D's R1 pass); false: classic everywhere
    flex_attention: bool = False  # with compile, on a GPU: attention in the graphs as flex_attention's kernel
    compile_r1: bool = False  # with compile, on one device: the R1 pass one more compiled graph (not eager)
    compile_augment: bool = False  # with compile: the augmentation pipeline's transform compiled too
    foreach_ema: bool = True  # the target EMA in one fused op over all tensors (false: a Python loop)
    joint_d_pass: bool = True  # D and the augmentation see D's two halves in one pass (D: two with R1)
    lazy_augment: bool = True  # skip the augmentation pipeline while p == 0 (an exact no-op then)
    sync_logs: bool = False  # read every logged value off the device each iteration (the baseline's way)
    gradient_checkpointing: bool = False  # G's blocks recompute their activations in the backward
    lpips_checkpointing: bool = False  # LPIPS recomputes its VGG activations in the backward
    bf16_lpips: bool = False  # LPIPS's VGG under bf16 autocast (changes the numerics)
    bf16_target: bool = False  # the teacher's pass under bf16 autocast (changes the numerics)

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # a switch given as text ('no', 'off') would count as true
            value = getattr(self, field.name)
            if field.name not in ("compile", "compile_mode") and not isinstance(value, bool):
                raise ValueError(f"model.speed.{field.name} must be true or false; got {value!r}")
        if not isinstance(self.compile, (bool, str)) or self.compile == "":
            raise ValueError(
                f"model.speed.compile must be true, false or a backend name; got {self.compile!r}"
            )
        if isinstance(self.compile, str):  # torch.compile names no key when it refuses one
            from torch._dynamo import list_backends

            known = list_backends(exclude_tags=())
            if self.compile not in known:
                raise ValueError(
                    f"model.speed.compile={self.compile!r} is no torch.compile backend; true (inductor) "
                    f"or one of {', '.join(known)}"
                )
        if self.compile_mode is not None and self.compile_mode not in COMPILE_MODES:
            raise ValueError(
                f"model.speed.compile_mode must be null or one of {', '.join(COMPILE_MODES)}; "
                f"got {self.compile_mode!r}"
            )
        if self.compile_mode is not None and self.compile not in (True, "inductor"):
            raise ValueError(
                "model.speed.compile_mode is inductor's: it needs model.speed.compile=true, got "
                f"model.speed.compile={self.compile!r}"
            )
        if self.flex_attention and not self.compile:
            raise ValueError(
                "model.speed.flex_attention replaces the attention kernel inside compiled graphs: it needs "
                "model.speed.compile=true (eager, flex_attention would write every score matrix)"
            )
        for key, what in (("compile_r1", "the R1 pass"), ("compile_augment", "the augmentation pipeline")):
            if getattr(self, key) and not self.compile:
                raise ValueError(
                    f"model.speed.{key} compiles {what} as the networks are compiled: it needs "
                    "model.speed.compile=true"
                )
        if self.flex_attention and not self.fast_attention:
            raise ValueError(
                "model.speed.flex_attention runs the fused kernel outside compiled graphs: it needs "
                "model.speed.fast_attention=true (false asks for the classic kernel everywhere)"
            )

    def apply(
        self,
        nets: Iterable[nn.Module | None],
        discriminator: nn.Module | None,
        generator: nn.Module | None = None,
        distance: object = None,
        augment: object = None,
    ) -> None:
        """Puts the networks in the chosen memory format, attention kernel, checkpointing and compiled
        form. `generator` is the online network (the only one that trains through a consistency loss),
        `distance` the consistency distance (the LPIPS options leave any other distance alone), `augment`
        the augmentation pipeline (compiled with `compile_augment`)."""
        nets = [n for n in nets if isinstance(n, nn.Module)]
        if self.channels_last:  # NHWC weights: cuDNN's and oneDNN's convolutions then run NHWC throughout
            for net in nets:
                net.to(memory_format=torch.channels_last)
        if self.fast_attention and hasattr(discriminator, "use_fast_attention"):
            discriminator.use_fast_attention(True, flex=self.flex_attention)
        if self.flex_attention:  # D's (above) outside its R1 pass, which keeps the classic kernel
            for net in nets:
                if net is not discriminator:
                    use_flex_attention(net)
        if not self.fast_attention:  # diffusers' UNets default to the fused kernel: the classic one instead
            for net in nets:
                if net is not discriminator:
                    classic_attention(net)
        if self.gradient_checkpointing:
            unet = getattr(generator, "unet", None)
            if not hasattr(unet, "enable_gradient_checkpointing"):
                raise ValueError(
                    "model.speed.gradient_checkpointing needs a diffusers UNet generator (model.generator: "
                    f"act_lightning.nn.UNetGenerator); got {type(generator).__name__}"
                )
            unet.enable_gradient_checkpointing(recompute)  # active only where gradients are taken
        if hasattr(distance, "checkpointing"):  # LPIPS
            distance.checkpointing, distance.bf16 = self.lpips_checkpointing, self.bf16_lpips
        if self.compile:  # in place, so state-dict keys stay as they are
            for net in nets:
                net.compile(**self.compile_options())
        if self.compile_augment and augment is not None:  # its random draws stay eager
            augment.compile_transform(**self.compile_options())

    def compile_options(self) -> dict:
        """torch.compile's arguments: the backend (a string names one), the mode, static shapes (each
        network sees two or three batch sizes, one static graph each, never a symbolic one; CUDA graphs,
        compile_mode=reduce-overhead, record static shapes only)."""
        backend = "inductor" if self.compile is True else str(self.compile)
        return {"backend": backend, "mode": self.compile_mode, "dynamic": False}

    def begin_step(self) -> None:
        """At the start of each training iteration. With CUDA graphs (compile_mode=reduce-overhead) the
        graphs' outputs live in memory that the next replay overwrites: this tells torch that the last
        iteration's outputs are dead, so replaying is safe (an output still read after it fails loudly)."""
        if self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()


def classic_attention(net: nn.Module) -> None:
    """Every diffusers attention layer of `net` on the classic processor (baddbmm, softmax, bmm: the
    matmuls on tensor cores under TF32, where the fused kernel runs float32 without them)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    for module in net.modules():
        if isinstance(module, Attention):
            module.set_processor(AttnProcessor())


def use_flex_attention(net: nn.Module) -> None:
    """Every diffusers attention layer of `net` on `FlexAttnProcessor`: flex_attention's generated kernel
    where a compiled graph runs on a GPU, the fused kernel elsewhere (act_lightning.nn.attention)."""
    from diffusers.models.attention_processor import Attention

    from act_lightning.nn.attention import FlexAttnProcessor, check_self_attention

    processor = FlexAttnProcessor()
    for module in net.modules():
        if isinstance(module, Attention):
            check_self_attention(module)
            module.set_processor(processor)


def recompute(module: nn.Module, *args):
    """`module(*args)`, its activations recomputed in the backward (diffusers' default without its
    cached version check, which Dynamo warns about)."""
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def in_bf16(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`fn` under bf16 autocast, its result in float32 (what consumes it stays float32)."""

    def run(*args: Tensor) -> Tensor:
        with torch.autocast(args[0].device.type, dtype=torch.bfloat16):
            return fn(*args).float()

    return run
