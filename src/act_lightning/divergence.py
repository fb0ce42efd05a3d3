"""The divergence guard's side inside the iteration: a non-finite loss or gradient never reaches the
weights or the optimiser state, and bad iterations are counted on the device, with no host
synchronisation (`callbacks.DivergenceGuard` reads the counts and stops the run; docs/algorithm.md)."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

# The terms the guard watches, as bits of the mask of an iteration (which went non-finite first).
GUARDED_TERMS = (
    "train/loss_ct",
    "train/loss_adv",
    "generator gradients",
    "train/loss_fake",
    "train/loss_real",
    "train/r1",
    "discriminator gradients",
    "train/loss_dsm",  # diffusion training's denoising loss (model.objective=diffusion)
)


_SAME_WIDTH_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}  # by element size


def guard_mask(bad: dict[str, Tensor], world_size: int = 1) -> Tensor:
    """The bits of GUARDED_TERMS that are bad in `bad` (term -> bool tensor; a term not there is good), on
    any rank: under DDP the flags are all-reduced (one small collective, no host synchronisation), so every
    rank counts the same bad iterations and the guard stops them all at once. A loss bad on one rank only
    (an fp16 overflow there) was counted by that rank alone: it stopped, and the others waited for it in
    their next collective."""
    unknown = set(bad) - set(GUARDED_TERMS)
    if unknown:
        raise KeyError(f"not a guarded term: {', '.join(sorted(unknown))}")
    device = next(iter(bad.values())).device
    flags = torch.stack(
        [bad.get(name, torch.zeros((), dtype=torch.bool, device=device)) for name in GUARDED_TERMS]
    ).to(torch.int32)
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    weights = 2 ** torch.arange(len(GUARDED_TERMS), device=device)
    return (flags.long() * weights).sum()


def describe_terms(mask: int) -> str:
    return ", ".join(name for bit, name in enumerate(GUARDED_TERMS) if mask >> bit & 1) or "unknown"


def skip_if_nonfinite(
    net: nn.Module, loss_bad: Tensor, scaled: bool, world_size: int, wait_free: bool | None = None
) -> Tensor:
    """Turns the coming update of `net` into a zero-gradient one when a loss or gradient is not finite,
    without a host synchronisation. With the paper's beta1 = 0 the weights then stay as they are; the
    optimiser sees a zero gradient. Under fp16 loss scaling (`scaled`) overflowing scaled gradients are the
    scaler's business (it skips that step and lowers the scale): only the losses are checked there, and
    the gradients reach the scaler as they are (a bad loss multiplies them by 0: a non-finite entry then
    turns NaN, which the scaler skips too). Under DDP a loss can go bad on one rank only: all ranks skip
    together and their weights stay equal. `wait_free` (default: on CUDA) keeps the host from waiting
    for the flag; on the CPU nothing is queued, so reading it costs nothing.
    Returns whether the gradients themselves were non-finite."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.bool, device=loss_bad.device)
    if scaled:
        grads_bad = torch.zeros((), dtype=torch.bool, device=loss_bad.device)
    else:
        norms = torch._foreach_norm(grads, math.inf)  # max |g| per tensor: NaN and inf propagate
        grads_bad = ~torch.stack(norms).isfinite().all()
    bad = grads_bad | loss_bad
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        bad = bad.to(torch.int32)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad = bad.bool()
    if not (grads[0].is_cuda if wait_free is None else wait_free):
        if bool(bad):
            torch._foreach_zero_(grads)
        return grads_bad
    if scaled:  # inf * 0 is NaN: the scaler sees the overflow and skips the step
        torch._foreach_mul_(grads, (~bad).to(grads[0].dtype))
        return grads_bad
    # NaN * 0 is NaN, so the product is taken of the bits: each gradient seen as integers of its width
    # (a view), times 1 keeps every bit, times 0 gives +0.0. One fused kernel for all the tensors, where
    # clearing the non-finite entries first (nan_to_num) launched one per tensor (526 per CIFAR-10
    # iteration over both updates), and the host, not the GPU, bounds the iteration (docs/performance.md).
    bits = [g.view(_SAME_WIDTH_INT[g.element_size()]) for g in grads]
    torch._foreach_mul_(bits, (~bad).to(torch.int32))
    return grads_bad


class BadIterations(nn.Module):
    """Counts bad iterations in device tensors: the current streak, the total, the iteration that started
    the streak and its mask of terms. Kept in checkpoints, so a resumed run goes on counting as the
    uninterrupted run does (`train/skipped_updates`, a streak across a stop); a checkpoint from before
    they were kept loads with zeros."""

    NAMES = ("streak", "total", "since", "terms")

    def __init__(self) -> None:
        super().__init__()
        for name in self.NAMES:
            self.register_buffer(name, torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name in self.NAMES:  # (load_state_dict hands each module a copy of the caller's dict)
            state_dict.setdefault(prefix + name, torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def record(self, mask: Tensor, iteration: int) -> None:
        is_bad = mask > 0
        streak = torch.where(is_bad, self.streak + 1, torch.zeros_like(self.streak))
        first = streak == 1  # the first bad iteration of a streak names what went wrong
        self.since.copy_(torch.where(first, torch.full_like(self.since, iteration), self.since))
        self.terms.copy_(torch.where(first, mask, self.terms))
        self.streak.copy_(streak)
        self.total.add_(is_bad.long())

    def report(self) -> str:
        """What the guard stops the run with (reads the device: call it outside the iteration)."""
        return (  # `since` counts the iterations before the first bad one: that is iteration since + 1
            f"{int(self.streak)} bad iterations in a row since iteration {int(self.since) + 1} "
            f"(first non-finite: {describe_terms(int(self.terms))})"
        )
