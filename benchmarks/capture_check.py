"""Would inductor capture every graph a run compiles as CUDA graphs on a GPU? A check that runs on the CPU.

Under `model.speed.compile_mode=reduce-overhead` inductor replays each compiled graph as a CUDA graph, unless
it finds a reason not to: an input the graph mutates, an input that is not a tensor, inputs whose memory
overlaps, a graph on several devices, or, under graph partitioning (torch's default since 2.9), an operation
it cannot capture (a data-dependent shape, a copy between devices, an operation marked unsafe), which it cuts
out of the graph and launches one by one. A graph so skipped or cut runs no faster, and inductor says so
only in a warning or at debug level. All of those reasons come from the traced graph, and only one depends
on the machine: a graph on the CPU is never captured. This script runs a training job on the CPU with that
one reason set aside and the capture itself left out, records every other reason inductor finds, graph by
graph and node by node, and fails when there is one. So a candidate's graphs are checked before a GPU is
lent (a host-device copy is the one cut a CPU run cannot show: tests/unit/test_speed.py traces the networks
with fake CUDA tensors for that).

    python benchmarks/capture_check.py                      # the GPU candidate, augmentation running
    python benchmarks/capture_check.py --out capture.json model.speed.compile_augment=false

The overrides after the options replace or extend the default run (the CIFAR-10 networks at the smoke
test's widths with the candidate's options; `--no-defaults` starts from the plain quickstart). It patches
inductor's internals (torch 2.11 to 2.14 checked): on another torch it stops and says which is missing.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from unittest import mock

import torch

CANDIDATE = [
    *("experiment=cifar10", "debug=smoke", "data=synthetic", "logger=csv", "eval=null", "iterations=6"),
    *("model.speed.compile=true", "model.speed.compile_mode=reduce-overhead"),
    *("model.speed.flex_attention=true", "model.speed.compile_r1=true", "model.speed.compile_augment=true"),
    "model.r1_threshold=0",  # p rises at the first R1 iteration: the pipeline's graphs are compiled too
]


@dataclass
class Record:
    graphs: list[dict] = field(default_factory=list)  # per compiled graph: what inductor would decide
    cuts: list[list[str]] = field(default_factory=list)  # [reason, node] of each operation it would cut out
    nodes_checked: int = 0  # the partitioner's calls
    devices: list[list[str]] = field(default_factory=list)  # each graph's devices that are not one GPU
    skips: int = 0  # graphs inductor decided not to capture before recording them here

    def problems(self) -> list[str]:
        """Each reason inductor would have to skip a graph or cut an operation out of it, on a GPU."""
        found = [f"cut: {reason} ({node})" for reason, node in self.cuts]
        for i, graph in enumerate(self.graphs):
            kind = "backward" if graph["backward"] else "forward"
            found += [f"graph {i} ({kind}): {r}" for r in graph["fail_reasons"]]
            if graph["disabled"]:
                found.append(f"graph {i} ({kind}): {graph['disabled']}")
            if graph["mutated_inputs"]:
                found.append(f"graph {i} ({kind}): mutates its inputs {graph['mutated_inputs']}")
            if graph["non_tensor_inputs"]:
                found.append(f"graph {i} ({kind}): inputs that are not tensors {graph['non_tensor_inputs']}")
        found += [f"a graph on {', '.join(d)}: not one GPU" for d in self.devices]
        if self.skips:
            found.append(f"{self.skips} graph(s) skipped before their reasons could be recorded")
        return found


def _internals():
    """Inductor's functions this check wraps, or an error that names what this torch lacks."""
    import torch._inductor.cudagraph_utils as cudagraph_utils
    import torch._inductor.output_code as output_code
    import torch._inductor.scheduler as scheduler

    wanted = {
        cudagraph_utils: ["check_multiple_devices_or_any_cpu_nodes"],
        output_code: ["cudagraph_post_compile", "cudagraph_partition_post_compile"],
        scheduler.Scheduler: ["should_partition"],
        scheduler.BaseSchedulerNode: ["is_gpu"],
    }
    missing = [
        f"{getattr(o, '__name__', o)}.{n}" for o, names in wanted.items() for n in names if not hasattr(o, n)
    ]
    if missing:
        raise RuntimeError(f"torch {torch.__version__} lacks {', '.join(missing)}: this check needs updating")
    return cudagraph_utils, output_code, scheduler


@contextmanager
def watching(pretend: bool | None = None) -> Iterator[Record]:
    """While open, inductor's CUDA-graph decisions are recorded into the Record it yields (with `pretend`,
    by default when there is no GPU, the CPU is taken for one in them), and no graph is captured (each
    runs as compiled). Inductor's caches are off, so every graph is compiled and checked afresh."""
    cudagraph_utils, output_code, scheduler = _internals()
    from torch._dynamo.utils import counters

    record = Record()

    should_partition = scheduler.Scheduler.should_partition

    # Without a GPU every graph is on the CPU, which is taken for one; with a GPU, decisions are as they are
    # (an operation on the host inside a GPU graph is then a cut like any other).
    if pretend is None:
        pretend = not torch.cuda.is_available()

    def partition(self, node):
        reason = should_partition(self, node)  # what inductor does (on the CPU: cut everything)
        record.nodes_checked += 1
        as_gpu = reason
        if pretend:
            with mock.patch.object(scheduler.BaseSchedulerNode, "is_gpu", lambda _: True):
                as_gpu = should_partition(self, node)  # what it would decide on a GPU
        if as_gpu:
            record.cuts.append([as_gpu, str(node.get_name())])
        return reason

    device_check = cudagraph_utils.check_multiple_devices_or_any_cpu_nodes

    def devices_of(mapping):
        used = [d for d in mapping if d.type != "meta"]
        if pretend and all(d.type == "cpu" for d in used):
            return None  # the CPU alone passes, as a GPU would
        reason = device_check(mapping)
        if reason:
            record.devices.append([str(d) for d in used])
        return reason

    def post_compile(example_inputs, graph, cudagraphs, constants, device_index):
        info = graph.cudagraph_info
        static = graph.fx_kwargs.get("static_input_idxs") or ()
        record.graphs.append(
            {
                "backward": bool(graph.fx_kwargs.get("is_backward")),
                "inference": bool(graph.fx_kwargs.get("is_inference")),
                "fail_reasons": [] if info is None else list(info.cudagraph_fail_reasons),
                "disabled": graph.disabled_cudagraphs_reason,
                # mutated inputs other than static ones (parameters, buffers), which CUDA graph trees allow
                "mutated_inputs": sorted(set(graph.mutated_input_idxs) - set(static)),
                "non_tensor_inputs": [
                    type(t).__name__
                    for t in example_inputs
                    if not isinstance(t, (torch.Tensor, torch.SymInt, torch.Generator))
                ],
            }
        )
        # the capture itself is left out: the graph runs as compiled

    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with (
        mock.patch.object(scheduler.Scheduler, "should_partition", partition),
        mock.patch.object(cudagraph_utils, "check_multiple_devices_or_any_cpu_nodes", devices_of),
        mock.patch.object(output_code, "cudagraph_post_compile", post_compile),
        mock.patch.object(output_code, "cudagraph_partition_post_compile", post_compile),
        mock.patch.object(inductor_config, "fx_graph_cache", False),
        mock.patch.object(functorch_config, "enable_autograd_cache", False),
    ):
        skipped = counters["inductor"]["cudagraph_skips"]
        try:
            yield record
        finally:
            record.skips = counters["inductor"]["cudagraph_skips"] - skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write the record (graphs, cuts, problems) to this JSON file")
    parser.add_argument("--no-defaults", action="store_true", help="only the given overrides, not CANDIDATE")
    parser.add_argument("overrides", nargs="*", help="the training run's Hydra overrides")
    args = parser.parse_args(argv)
    overrides = [*([] if args.no_defaults else CANDIDATE), *args.overrides]
    with tempfile.TemporaryDirectory() as run_dir, watching() as record:
        argv_was = sys.argv
        sys.argv = ["act_lightning.train", *overrides, f"hydra.run.dir={run_dir}"]
        try:
            runpy.run_module("act_lightning.train", run_name="__main__")
        except SystemExit as e:
            if e.code:
                raise
        finally:
            sys.argv = argv_was
    from torch._dynamo.utils import counters

    breaks = dict(counters["graph_break"])
    problems = record.problems() + [f"graph break: {reason} ({n})" for reason, n in breaks.items()]
    summary = {
        "torch": torch.__version__,
        "overrides": overrides,
        **asdict(record),
        "graph_breaks": breaks,
        "problems": problems,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
    backward = sum(g["backward"] for g in record.graphs)
    print(
        f"torch {torch.__version__}: {len(record.graphs)} graphs compiled ({backward} backward), "
        f"{record.nodes_checked} partitioner calls, {len(breaks)} graph breaks"
    )
    print("\n".join(problems) if problems else "every graph would be captured whole")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
