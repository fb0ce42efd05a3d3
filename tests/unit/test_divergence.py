"""The guard's bookkeeping inside the iteration (act_lightning.divergence), as functions."""

import pytest
import torch
from torch import nn

from act_lightning.divergence import GUARDED_TERMS, BadIterations, guard_mask, skip_if_nonfinite

TRUE, FALSE = torch.tensor(True), torch.tensor(False)


def test_the_mask_sets_the_bit_of_each_bad_term_in_guarded_order():
    assert int(guard_mask({"train/loss_ct": FALSE, "generator gradients": FALSE})) == 0
    assert int(guard_mask({"train/loss_adv": TRUE})) == 1 << 1
    bad = {name: TRUE for name in ("train/loss_ct", "train/r1", "discriminator gradients")}
    assert int(guard_mask(bad)) == 1 | 1 << 5 | 1 << 6
    assert len(GUARDED_TERMS) == 8 and GUARDED_TERMS[-1] == "train/loss_dsm"
    with pytest.raises(KeyError, match="train/loss_typo"):
        guard_mask({"train/loss_typo": TRUE})


def test_the_counters_name_the_first_bad_iteration_of_a_streak():
    bad = BadIterations()
    for k, mask in enumerate([0, 1 << 3, 1 << 0, 0, 1 << 6]):
        bad.record(torch.tensor(mask), k)
    assert int(bad.total) == 3 and int(bad.streak) == 1 and int(bad.since) == 4
    assert (
        bad.report()
        == "1 bad iterations in a row since iteration 4 (first non-finite: discriminator gradients)"
    )
    assert not bad.state_dict()  # not in checkpoints: a resumed run counts afresh


def test_a_nonfinite_loss_or_gradient_zeroes_the_update_and_only_a_gradient_is_reported():
    net = nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    assert not skip_if_nonfinite(net, FALSE, scaled=False, world_size=1)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))  # a good update is kept
    assert not skip_if_nonfinite(net, TRUE, scaled=False, world_size=1)  # a bad loss: zeroed, grads fine
    assert all(not p.grad.any() for p in net.parameters())
    net.weight.grad[0, 0] = float("inf")
    assert skip_if_nonfinite(net, FALSE, scaled=False, world_size=1)
    assert all(p.grad.isfinite().all() and not p.grad.any() for p in net.parameters())
    net.weight.grad[0, 0] = float("nan")  # under fp16 loss scaling the scaler handles the gradients
    assert not skip_if_nonfinite(net, FALSE, scaled=True, world_size=1)


@pytest.mark.parametrize("wait_free", [False, True])
def test_under_loss_scaling_overflowing_gradients_reach_the_scaler(wait_free):
    """fp16: the gradient scaler finds the overflow (inf or NaN) in the scaled gradients, skips that step
    and lowers its scale; the guard must not erase it. Both paths: reading the flag (the CPU's) and
    without waiting for it (CUDA's), run here on CPU tensors."""
    net = nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    net.weight.grad[0, 0] = float("inf")
    bias = net.bias.grad.clone()
    assert not skip_if_nonfinite(net, FALSE, scaled=True, world_size=1, wait_free=wait_free)
    assert net.weight.grad[0, 0] == float("inf") and torch.equal(net.bias.grad, bias)
    # a bad loss: no usable update. The finite gradients become 0; the overflow is zeroed where the flag
    # is read, and turns NaN (inf * 0) where it is not, so the scaler skips that step
    assert not skip_if_nonfinite(net, TRUE, scaled=True, world_size=1, wait_free=wait_free)
    assert not net.bias.grad.any() and not net.weight.grad[0, 1]
    overflow = net.weight.grad[0, 0]
    assert overflow.isnan() if wait_free else overflow == 0
    # without loss scaling a non-finite gradient is the guard's: zeroed, reported
    net.weight.grad[0, 0] = float("nan")
    assert skip_if_nonfinite(net, FALSE, scaled=False, world_size=1, wait_free=wait_free)
    assert all(p.grad.isfinite().all() and not p.grad.any() for p in net.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_guard_waits_for_nothing_and_leaves_overflow_to_the_scaler():
    net = nn.Linear(2, 1).cuda()
    net(torch.ones(1, 2, device="cuda")).sum().backward()
    net.weight.grad[0, 0] = float("inf")
    torch.cuda.set_sync_debug_mode("error")  # the default path on CUDA reads no flag
    try:
        skip_if_nonfinite(net, FALSE.cuda(), scaled=True, world_size=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert net.weight.grad[0, 0].item() == float("inf")
