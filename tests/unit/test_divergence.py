"""The guard's bookkeeping inside the iteration (act_lightning.divergence), as functions."""

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from act_lightning.divergence import (
    GUARDED_TERMS,
    BadIterations,
    describe_terms,
    guard_mask,
    skip_if_nonfinite,
)
from act_lightning.readback import DeferredRead

TRUE, FALSE = torch.tensor(True), torch.tensor(False)


def test_under_ddp_every_rank_counts_a_term_bad_on_any_rank(tmp_path):
    """A loss bad on one rank only (an fp16 overflow there, with finite gradients) was counted by that rank
    alone: its guard stopped it, and the other ranks died in their next collective (gloo) or hung (NCCL).
    Two gloo processes: rank 1's L_ct is bad, and both ranks' masks say so."""
    from tests.helpers_ddp import run_two_ranks

    out = tmp_path / "mask"
    run_two_ranks({"mode": "guard", "world_size": 2, "store": str(tmp_path / "store"), "out": str(out)})
    assert [int(open(f"{out}.{rank}").read()) for rank in (0, 1)] == [1, 1]  # L_ct's bit on both


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
    for k, mask in enumerate([0, 1 << 3, 1 << 0]):
        bad.record(torch.tensor(mask), k)
    assert (int(bad.streak), int(bad.since), int(bad.terms)) == (2, 1, 1 << 3)  # the streak's first names it
    for k, mask in enumerate([0, 1 << 6], start=3):
        bad.record(torch.tensor(mask), k)
    assert int(bad.total) == 3 and int(bad.streak) == 1 and int(bad.since) == 4
    assert (
        bad.report()
        == "1 bad iterations in a row since iteration 5 (first non-finite: discriminator gradients)"
    )
    kept = BadIterations()
    kept.load_state_dict(bad.state_dict())  # in checkpoints: a resumed run goes on counting
    assert [int(v) for v in kept.state_dict().values()] == [1, 3, 4, 1 << 6]
    kept.load_state_dict({})  # a checkpoint from before they were kept: zeros, not a missing-key error
    assert [int(v) for v in kept.state_dict().values()] == [0, 0, 0, 0]


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


def test_without_waiting_a_good_update_keeps_every_bit_and_a_bad_one_is_zero_in_one_operation():
    """The wait-free path (CUDA's, run here on CPU tensors) multiplies the gradients' bits by the flag:
    a good update is the same bits (signed zeros, subnormals), a bad one +0.0 everywhere, NaN and inf
    included, in whatever width a gradient has; and the operations it runs do not grow with the number of
    tensors (each used to get a nan_to_num of its own, a kernel launch apiece on a GPU)."""

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name not in ("aten::view", "aten::detach"):  # these launch nothing
                self.ops.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    def net_with(grads: list[Tensor]) -> nn.Module:
        net = nn.ParameterList([nn.Parameter(torch.zeros_like(g)) for g in grads])
        for p, g in zip(net, grads, strict=True):
            p.grad = g.clone()
        return net

    def bits(t: Tensor) -> Tensor:
        return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])

    special = [0.0, -0.0, 1e-45, -3.5, 2.0**100]
    grads = [
        torch.tensor(special),
        torch.tensor(special, dtype=torch.float64),
        torch.tensor([0.5, -0.0, 3.0], dtype=torch.bfloat16),
        torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    ]
    net = net_with(grads)
    assert not skip_if_nonfinite(net, FALSE, scaled=False, world_size=1, wait_free=True)
    for p, g in zip(net, grads, strict=True):
        assert torch.equal(bits(p.grad), bits(g))  # bit for bit
    net[0].grad[1] = float("nan")
    net[2].grad[0] = float("-inf")
    assert skip_if_nonfinite(net, FALSE, scaled=False, world_size=1, wait_free=True)
    for p in net:
        assert not bits(p.grad).any()  # +0.0: every bit clear
    counts = []
    for n in (3, 30):
        many = net_with([torch.randn(4) for _ in range(n)])
        many[0].grad[0] = float("nan")
        with Count() as seen:
            assert skip_if_nonfinite(many, FALSE, scaled=False, world_size=1, wait_free=True)
        assert all(not p.grad.any() for p in many)
        counts.append(len(seen.ops))
    assert counts[0] == counts[1], counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_guard_waits_for_nothing_zeroes_a_bad_update_and_leaves_overflow_to_the_scaler():
    net = nn.Linear(2, 1).cuda()
    net(torch.ones(1, 2, device="cuda")).sum().backward()
    net.weight.grad[0, 0] = float("inf")
    torch.cuda.set_sync_debug_mode("error")  # the default path on CUDA reads no flag
    try:
        skip_if_nonfinite(net, FALSE.cuda(), scaled=True, world_size=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert net.weight.grad[0, 0].item() == float("inf")
    # without loss scaling: the bits' product on the device, no wait; a good update keeps every bit
    good = [p.grad.clone() for p in net.parameters()]
    net.weight.grad[0, 0] = 0.25
    good[0][0, 0] = 0.25
    torch.cuda.set_sync_debug_mode("error")
    try:
        flags = [skip_if_nonfinite(net, FALSE.cuda(), scaled=False, world_size=1)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), good, strict=True))
    net.bias.grad[0] = float("nan")
    torch.cuda.set_sync_debug_mode("error")
    try:
        flags.append(skip_if_nonfinite(net, FALSE.cuda(), scaled=False, world_size=1))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [bool(f) for f in flags] == [False, True]
    assert all(not p.grad.view(torch.int32).any() for p in net.parameters())  # +0.0 everywhere


def test_a_deferred_read_on_the_cpu_gives_each_value_once():
    """act_lightning.readback.DeferredRead, as the guard and the module use it off a GPU."""
    read = DeferredRead()
    assert read.poll() is None and not read.in_flight
    read.submit(torch.tensor(3))
    assert read.in_flight
    read.submit(torch.tensor(5))  # only the latest value matters
    assert read.poll() == 5 and not read.in_flight
    assert read.poll() is None  # handed over once


def test_the_report_names_the_terms_of_a_mask_in_guarded_order_and_unknown_for_none():
    assert describe_terms(1 << 2 | 1 << 4 | 1 << 3) == "generator gradients, train/loss_fake, train/loss_real"
    assert describe_terms(int(guard_mask({"train/loss_real": TRUE}))) == "train/loss_real"
    assert describe_terms(0) == "unknown"


def test_a_network_without_gradients_is_left_alone_and_reports_none_even_with_a_bad_loss():
    net = nn.Linear(2, 1)  # no backward yet (a network this iteration does not train)
    for wait_free in (False, True):
        assert not skip_if_nonfinite(net, TRUE, scaled=False, world_size=1, wait_free=wait_free)
    assert all(p.grad is None for p in net.parameters())


def test_without_waiting_a_bad_loss_zeroes_the_update_but_is_not_reported_as_bad_gradients():
    net = nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    assert not skip_if_nonfinite(net, TRUE, scaled=False, world_size=1, wait_free=True)
    assert all(not p.grad.any() for p in net.parameters())


@pytest.mark.parametrize("wait_free", [False, True])
def test_under_ddp_a_bad_loss_on_another_rank_skips_the_update_on_every_rank(monkeypatch, wait_free):
    """Two ranks, the other one bad: the flags are all-reduced with MAX, so this rank's good update is
    zeroed too (the weights stay equal); what it reports is its own gradients' state."""
    import torch.distributed as dist

    reduced = []

    def all_reduce(tensor, op):  # the other rank's flag is 1 (bad)
        reduced.append(tensor.dtype)
        other = torch.ones_like(tensor)
        tensor.copy_(
            torch.maximum(tensor, other) if op == dist.ReduceOp.MAX else torch.minimum(tensor, other)
        )

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    net = nn.Linear(2, 1)
    net(torch.ones(1, 2)).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    assert not skip_if_nonfinite(net, FALSE, scaled=False, world_size=1, wait_free=wait_free)
    assert reduced == [] and all(torch.equal(p.grad, g) for p, g in zip(net.parameters(), grads))
    assert not skip_if_nonfinite(net, FALSE, scaled=False, world_size=2, wait_free=wait_free)
    assert reduced == [torch.int32] and all(not p.grad.any() for p in net.parameters())
