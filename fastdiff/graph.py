"""One CUDA graph for the whole sampling loop: every model call, guidance, fused step and
history update of all N steps. Capture happens here and nowhere else.

The loop (fastdiff/loop.py) already runs on static buffers with per-row constants baked
in and per-sample values (seeds, guidance scales, conditioning) in device tensors, so a
replay only needs its inputs copied in: new seeds, a new guidance scale or new
conditioning never re-capture.  The first call warms up (autotuning, lazy init, the
allocator; torch.compile's compilation), then captures; later calls replay.
"""
from __future__ import annotations

import copy
import time
import warnings

import torch

from .loop import Loop
from .solvers.table import StepTable


def compile_model(model):
    """torch.compile the model (default mode) before capture; a conv net in channels_last.

    Mode: "default". DESIGN.md's H200 measurement (SD1.5-shaped U-Net, CFG, fp16) put
    torch.compile default + channels_last inside our graph at 6.3 ms/step against 11.9 eager;
    "reduce-overhead" brings its own CUDA graphs, which cannot nest inside ours.

    The model passed in is never modified: converting it in place would swap its weight
    tensors under any graph already captured over it (a replay would read freed memory). A
    conv net whose conv weights are not channels_last yet is compiled from a channels_last
    *copy*: one more set of weights in memory, and a snapshot, so later changes to the
    original (load_state_dict, LoRA fusing) do not reach it. Convert the model yourself
    (`model.to(memory_format=torch.channels_last)`) to compile it without a copy.
    """
    if isinstance(model, torch.nn.Module):
        convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        if convs and not all(w.is_contiguous(memory_format=torch.channels_last) for w in convs):
            try:
                model = copy.deepcopy(model).to(memory_format=torch.channels_last)
            except Exception as e:  # e.g. offload hooks that cannot be copied
                warnings.warn(f"compile=True: the model could not be copied ({type(e).__name__}: {e}); "
                              "compiling it as it is, without channels_last", stacklevel=3)
    return torch.compile(model, mode="default", fullgraph=False, dynamic=False)


class GraphRunner:
    """Warm up once, capture the loop into one CUDA graph, replay it for every later call."""

    def __init__(self, loop: Loop, table: StepTable):
        if loop.bufs.x.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.loop, self.table = loop, table
        self.graph: torch.cuda.CUDAGraph | None = None
        self.timings: dict[str, float] = {}  # one-time costs: warm-up, capture (seconds)

    def _capture(self) -> torch.Tensor:
        loop = self.loop
        start = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop.run()  # warm-up: a real run; its result is this call's answer
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        result = loop.bufs.x.clone()
        out_sums = loop.bufs.out_sums.clone()
        self.timings["warmup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop.run()
        torch.cuda.synchronize()
        self.timings["capture_s"] = time.perf_counter() - start
        self.graph = graph
        loop.bufs.out_sums.copy_(out_sums)  # the warm-up's check, not the capture's
        return result

    def run(self, x0, seeds, cfg_w, kwargs, progress=False):
        bufs = self.loop.bufs
        bufs.load(x0, seeds, cfg_w, kwargs, float(self.table.c_in[0]))
        if self.graph is None:
            result = self._capture()
        else:
            self.graph.replay()
            result = bufs.x.clone()
        self.loop.raise_if_nonfinite()
        return result

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
