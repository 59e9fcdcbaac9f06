"""torch.distributed for bulk sampling: which rank am I, init/teardown, and a local launcher.

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set) `distributed()` joins the process group
over gloo whatever the sampling device: the collectives carry a few numbers per batch, and
NCCL refuses two ranks on one GPU ("Duplicate GPU detected"), which more ranks than GPUs
(torchrun --nproc_per_node 2 on a one-GPU machine) gives. `launch(n, fn)` spawns n local ranks without torchrun and,
when one dies, names the rank that failed first rather than the peers whose collectives
broke because of it.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


class RankFailedError(RuntimeError):
    """A worker process of a spawned run died or raised."""

    def __init__(self, rank: int, detail: str):
        super().__init__(f"rank {rank} failed: {detail}")
        self.rank = rank


class PeerFailedError(RuntimeError):
    """A collective failed on this rank: usually another rank died first."""



@dataclass(frozen=True)
class Ranks:
    """This process's place in the run; collectives are no-ops for a single process."""

    rank: int = 0
    world: int = 1
    comm_device: torch.device = torch.device("cpu")  # NCCL reduces CUDA tensors only

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        try:
            dist.all_reduce(t)
        except Exception as e:
            raise PeerFailedError(f"rank {self.rank}: a collective failed, probably because another rank "
                                  f"died: {e}") from e
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            self.all_sum([0.0])  # an all-reduce: NCCL's barrier() guesses the device


def current_ranks() -> Ranks:
    """The Ranks of an initialized process group, or a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    comm = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return Ranks(dist.get_rank(), dist.get_world_size(), comm)


@contextmanager
def distributed(device: str | None = None):
    """Join the process group that torchrun (or launch) describes in RANK/WORLD_SIZE, over
    gloo (module docstring). Yields (Ranks, the device to sample on)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    use_cuda = torch.device(device).type == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    visible = torch.cuda.device_count() if use_cuda else 0
    if use_cuda and world > 1 and device != "cuda" and visible > 1:
        raise ValueError(f"--device {device} would put all {world} ranks on one of the {visible} GPUs; use "
                         "--device cuda (rank r samples on cuda:LOCAL_RANK)")
    # cuda: this rank's GPU, LOCAL_RANK modulo the GPUs it sees (one each under per-rank
    # CUDA_VISIBLE_DEVICES, as SLURM's --gpus-per-task gives)
    sample_device = torch.device("cuda", local_rank % visible) if device == "cuda" else torch.device(device)
    if use_cuda:
        torch.cuda.set_device(sample_device)
    created = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")  # not NCCL: ranks may share a GPU (module docstring)
        created = True
    yield current_ranks(), sample_device
    # Not on an error: the connections stay open until this rank has recorded its error and
    # exits, so ranks blocked on it fail later (launch blames the earliest record).
    if created:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_entry(rank: int, world: int, port: int, errdir: str, fn, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        fn(*args)
    except Exception as e:
        # Written before this process exits and its connections close, i.e. before any
        # rank that waits on it fails: the earliest record is the cause.
        record = {"time": time.time(), "victim": isinstance(e, PeerFailedError), "error": f"{type(e).__name__}: {e}"}
        Path(errdir, f"{rank}.json").write_text(json.dumps(record))
        raise


def launch(nprocs: int, fn, *args) -> None:
    """Run fn(*args) in `nprocs` spawned processes with RANK/WORLD_SIZE set, as torchrun
    would. When one fails, terminate the others and raise RankFailedError naming the rank
    that failed first (not the ranks whose collectives then broke)."""
    import torch.multiprocessing as mp

    if nprocs < 1:
        raise ValueError(f"nprocs must be >= 1, got {nprocs}")
    with tempfile.TemporaryDirectory(prefix="fastdiff-launch-") as errdir:
        ctx = mp.start_processes(_spawn_entry, args=(nprocs, _free_port(), errdir, fn, args), nprocs=nprocs,
                                 join=False, start_method="spawn")
        died = _wait_for_failure(ctx.processes)
        if not died:
            return
        for p in ctx.processes:
            p.terminate()
        for p in ctx.processes:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        records = {int(f.stem): json.loads(f.read_text()) for f in Path(errdir).glob("*.json")}
    # Candidates: ranks that raised (their own time), ranks that died without raising (when
    # seen dead); a victim of a broken collective is blamed only if nothing else failed.
    candidates = {r: (rec["victim"], rec["time"], rec["error"]) for r, rec in records.items()}
    for r, (seen, code) in died.items():
        if r not in candidates:
            how = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            candidates[r] = (False, seen, how)
    rank = min(candidates, key=lambda r: candidates[r][:2])
    raise RankFailedError(rank, candidates[rank][2])


def _wait_for_failure(processes) -> dict[int, tuple[float, int]]:
    """Wait until all exit (returns {}) or one fails: {rank: (time seen dead, exit code)}."""
    from multiprocessing.connection import wait

    alive = {p.sentinel: rank for rank, p in enumerate(processes)}
    while alive:
        ready = wait(list(alive))
        seen = time.time()
        died = {}
        for sentinel in ready:
            rank = alive.pop(sentinel)
            processes[rank].join()
            if processes[rank].exitcode != 0:
                died[rank] = (seen, processes[rank].exitcode)
        if died:
            return died
    return {}
