"""Tracing for a GPU without one: modules' parameters and buffers as fake CUDA tensors, and the device of
every value in the graph that make_fx traces a function to (what inductor would compile for a GPU)."""

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx


def fake_cuda(*modules: nn.Module) -> FakeTensorMode:
    """Every parameter and buffer of `modules` (their submodules too) replaced in place by a fake CUDA
    tensor of the returned mode; create the inputs under it (`with mode:`)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        for module in (m for top in modules for m in top.modules()):
            for name, param in list(module.named_parameters(recurse=False)):
                fake = mode.from_tensor(param.detach()).to("cuda")
                module._parameters[name] = nn.Parameter(fake, param.requires_grad)
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None:
                    module._buffers[name] = mode.from_tensor(buffer).to("cuda")
    return mode


def traced_devices(mode: FakeTensorMode, run, *args) -> list[tuple[str, str]]:
    """(node, device type) of every tensor value in the graph of `run(*args)`, traced under `mode`."""
    with mode:
        graph = make_fx(run, tracing_mode="fake")(*args).graph
    values = [(str(n.target), n.meta.get("val")) for n in graph.nodes]
    return [(target, value.device.type) for target, value in values if isinstance(value, torch.Tensor)]
