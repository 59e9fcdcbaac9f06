"""Runners: how a Sampler executes one loop (a table on one batch shape).

`EagerRunner` runs the static-buffer loop (fastdiff/loop.py) as it is: the CPU, graph=False.
`GraphRunner` makes it one CUDA graph: every model call, guidance, fused step and history
update of all N steps. The loop already runs on static buffers with per-row constants baked
in and per-sample values (seeds, guidance scales, conditioning) in device tensors, so a
replay only needs its inputs copied in: new seeds, a new guidance scale or new conditioning
never re-capture. The first call warms up (autotuning, lazy init, the allocator;
torch.compile's compilation), then captures; later calls replay. With graph="auto" a loop
that cannot be captured (a model that reads a tensor on the host, or branches on one) falls
back to running eagerly, with one warning. `capture_graph` is the one capture recipe, also
used by the benchmarks.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable

import torch

from .loop import Loop
from .solvers.table import StepTable


def compile_model(model):
    """torch.compile the model (default mode) before capture; a conv net in channels_last.

    Mode: "default". A prototype H200 measurement (docs/architecture.md) (SD1.5-shaped U-Net, CFG, fp16) put
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


def capture_graph(body: Callable[[], object], warmup: Callable[[], object] | None = None,
                  between: Callable[[], object] | None = None) -> tuple[torch.cuda.CUDAGraph, dict[str, float]]:
    """Run `warmup` (default: `body`) once on a side stream, so lazy initialisation, autotuning
    and compilation happen outside the capture, then `between()`, then capture one call of
    `body` into a CUDA graph. Returns (graph, {"warmup_s", "capture_s"}), synchronised."""
    start = time.perf_counter()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        (warmup or body)()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if between is not None:
        between()
    timings = {"warmup_s": time.perf_counter() - start}
    start = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    torch.cuda.synchronize()
    timings["capture_s"] = time.perf_counter() - start
    return graph, timings


def progress_bar(total: int, unit: str, desc: str, progress):
    """A tqdm bar on stderr that disappears when done, or None when `progress` is False (the
    Sampler decides); a dict `progress` holds tqdm options that override these (a pipeline's
    set_progress_bar_config, `disable=True` included)."""
    if progress is False or progress is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(**{"total": total, "desc": desc, "unit": unit, "leave": False,
                   **(progress if isinstance(progress, dict) else {})})


class EagerRunner:
    """Runs the static-buffer loop without capture (CPU, graph=False, or a failed graph='auto')."""

    graph = None

    def __init__(self, loop: Loop, table: StepTable):
        self.loop, self.table = loop, table
        self.timings: dict[str, float] = {}  # one-time costs (seconds); none when eager

    def run(self, x0, seeds, cfg_w, kwargs, progress=False):
        bufs = self.loop.bufs
        bufs.load(x0, seeds, cfg_w, kwargs, float(self.table.c_in[0]))
        bar = progress_bar(self.table.rows, "step", "sampling", progress)
        try:
            self.loop.run(progress=bar)
        finally:
            if bar is not None:
                bar.close()
        self.loop.raise_if_nonfinite()
        return bufs.x.clone()

    def release(self) -> None:
        pass


class GraphRunner(EagerRunner):
    """Warm up once, capture the loop into one CUDA graph, replay it for every later call.

    on_capture_error: None re-raises a failed capture (graph=True); otherwise it is called
    with the error and this runner runs eagerly from then on (graph="auto"): the warm-up,
    a complete eager run, is the first call's answer either way.
    """

    def __init__(self, loop: Loop, table: StepTable, on_capture_error: Callable[[Exception], None] | None = None):
        super().__init__(loop, table)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.on_capture_error = on_capture_error
        self.eager = False  # True after a capture failed under graph="auto"

    def _capture(self) -> torch.Tensor:
        bufs = self.loop.bufs
        saved = {}

        def keep_warmup():  # the warm-up is a real run: its result and check are this call's
            saved["x"], saved["probes"] = bufs.x.clone(), bufs.probes.clone()

        try:
            self.graph, timings = capture_graph(self.loop.run, between=keep_warmup)
        except Exception as e:
            if self.on_capture_error is None or "x" not in saved:  # graph=True, or the warm-up itself failed
                raise
            self.eager = True
            self.on_capture_error(e)
        else:
            self.timings.update(timings)
        bufs.probes.copy_(saved["probes"])  # the warm-up's check, not the capture's
        return saved["x"]

    def run(self, x0, seeds, cfg_w, kwargs, progress=False):
        if self.eager:
            return super().run(x0, seeds, cfg_w, kwargs, progress)
        bufs = self.loop.bufs
        bufs.load(x0, seeds, cfg_w, kwargs, float(self.table.c_in[0]))
        # one replay runs every step: the bar counts this call (the first: warm-up and capture)
        bar = progress_bar(1, "call", "sampling (one CUDA graph)", progress)
        try:
            if self.graph is None:
                result = self._capture()
            else:
                self.graph.replay()
                result = bufs.x.clone()
            self.loop.raise_if_nonfinite()  # reads the probes: waits for the replay
            if bar is not None:
                bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return result

    def release(self) -> None:
        if self.graph is not None:
            self.graph.reset()
            self.graph = None
