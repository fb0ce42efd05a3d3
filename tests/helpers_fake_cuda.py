"""Tracing for a GPU without one: modules' parameters and buffers as fake CUDA tensors, and the device of
every value in the graph that make_fx traces a function to (what inductor would compile for a GPU)."""

import functools

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx


def fake_cuda(*modules: nn.Module) -> FakeTensorMode:
    """Every parameter and buffer of `modules` (their submodules too) replaced in place by a fake CUDA
    tensor of the returned mode; create the inputs under it (`with mode:`)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)

    def fake(t: torch.Tensor) -> torch.Tensor:
        # made on the fake device directly: torch 2.9's FakeTensor.to("cuda") asks the CUDA driver first
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")

    with mode:
        for module in (m for top in modules for m in top.modules()):
            for name, param in list(module.named_parameters(recurse=False)):
                module._parameters[name] = nn.Parameter(fake(param), param.requires_grad)
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    module._buffers[name] = fake(buffer)
    return mode


def traced_devices(mode: FakeTensorMode, run, *args) -> list[tuple[str, str]]:
    """(node, device type) of every tensor value in the graph of `run(*args)`, traced under `mode`."""
    with mode:
        graph = make_fx(run, tracing_mode="fake")(*args).graph
    values = [(str(n.target), n.meta.get("val")) for n in graph.nodes]
    return [(target, value.device.type) for target, value in values if isinstance(value, torch.Tensor)]


@functools.cache
def fake_cuda_traceable() -> bool:
    """Whether this torch traces fake CUDA tensors without a CUDA driver: torch 2.9.1's indexing of them
    asks the driver (AcceleratorError on a machine without a GPU), 2.14.1's does not."""
    if torch.cuda.is_available():
        return True
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with mode:
            a = torch.empty(2, device="cuda")
            i = torch.zeros(4, dtype=torch.long, device="cuda")
            make_fx(lambda a, i: a[i], tracing_mode="fake")(a, i)
    except RuntimeError:  # AcceleratorError is one
        return False
    return True


def skip_unless_traceable() -> None:
    if not fake_cuda_traceable():
        pytest.skip(f"torch {torch.__version__} traces fake CUDA tensors only with a CUDA driver")
