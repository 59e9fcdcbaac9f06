"""Bulk generation: many seeds on many ranks, one file per sample, resumable.

    torchrun --nproc_per_node 8 -m fastdiff sample --seeds 0-49999 --outdir out/
    fastdiff sample --seeds 0-999 --outdir out/ --nproc 2     # local spawn, no torchrun

This module is the library loop, `generate()`; the command line is fastdiff/sample_cmd.py.
Each rank takes seeds[rank::world] and samples them in batches; sample `s` goes to
DIR/{s:06d}.png (or .npy, raw float32 [C, H, W]), written to a temporary file in DIR,
fsynced and renamed into place, so a file that exists is complete. A rerun skips what is
on disk: a crash costs only the batch in flight. Because a sample depends only on its seed
(counter-based noise), the files do not depend on the world size or the batch size. Rank 0
holds a lock on DIR for the whole run, so a second run into DIR waits, then skips the files
the first one wrote (fastdiff/output_files.py).
"""
from __future__ import annotations

import io
import os
import time
import zipfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .class_conditioning import class_conditioning
from .distributed import Ranks, current_ranks
from .output_files import (OutputError, atomic_open, check_run_settings, folder_lock, fsync_dir, os_message,
                           remove_stale_temporaries, write_atomic)

FORMATS = ("png", "npy")
PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class BulkError(OutputError):
    """A bulk run that cannot go on: unwritable or unreadable output."""


@dataclass
class BulkResult:
    total: int  # samples on disk for the requested seeds
    new: int  # written by this run (all ranks)
    seconds: float  # wall time of the slowest rank's sampling loop
    rank_rates: list[float]  # samples/s of each rank
    npz: Path | None = None

    @property
    def samples_per_s(self) -> float:
        return self.new / self.seconds if self.seconds > 0 else 0.0


# ---- files ----------------------------------------------------------------------------
def sample_path(outdir: str | Path, seed: int, fmt: str) -> Path:
    return Path(outdir) / f"{seed:06d}.{fmt}"


def to_uint8(x: torch.Tensor, data_range: tuple[float, float]) -> np.ndarray:
    """[B, C, H, W] floats in data_range -> uint8 [B, H, W, C] (rounded, clipped)."""
    lo, hi = data_range
    u8 = ((x.float() - lo) * (255.0 / (hi - lo))).round_().clamp_(0, 255).to(torch.uint8)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


def encode(sample: np.ndarray, fmt: str) -> bytes:
    """One sample as file bytes: png from uint8 [H, W, C]; npy from float32 [C, H, W]."""
    buf = io.BytesIO()
    if fmt == "png":
        from PIL import Image

        mode = PNG_MODES[sample.shape[-1]]
        Image.fromarray(sample[..., 0] if mode == "L" else sample, mode=mode).save(buf, format="png")
    else:
        np.save(buf, sample, allow_pickle=False)
    return buf.getvalue()


def read_sample(path: Path, fmt: str) -> np.ndarray:
    """The inverse of encode: uint8 [H, W, C] or float32 [C, H, W]."""
    if fmt == "npy":
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im)
    return a[..., None] if a.ndim == 2 else a


def _read_for_npz(path: Path, fmt: str) -> np.ndarray:
    try:
        return read_sample(path, fmt)
    except OSError as e:  # not an OSError any more, so not reported as a write error
        raise BulkError(f"cannot read {path}: {os_message(e)}") from e


def write_npz(path: Path, outdir: Path, seeds: list[int], fmt: str, labels: np.ndarray | None) -> Path:
    """Every sample in one .npz, in seed order: arr_0 (uint8 [N, H, W, C] for png, the layout
    FID tools read; float32 [N, C, H, W] for npy), seeds, and labels when conditional.
    Streams one file at a time into the archive, so it never holds all samples in memory."""
    first = _read_for_npz(sample_path(outdir, seeds[0], fmt), fmt)
    header = {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False,
              "shape": (len(seeds), *first.shape)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f, zipfile.ZipFile(f, "w", allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for s in seeds:
                a = _read_for_npz(sample_path(outdir, s, fmt), fmt)
                if a.shape != first.shape or a.dtype != first.dtype:
                    raise BulkError(f"{sample_path(outdir, s, fmt)} is {a.dtype} {a.shape}, "
                                    f"expected {first.dtype} {first.shape}")
                member.write(np.ascontiguousarray(a).tobytes())
        extras = {"seeds": np.asarray(seeds, dtype=np.int64)}
        if labels is not None:
            extras["labels"] = labels
        for name, value in extras.items():
            b = io.BytesIO()
            np.save(b, value, allow_pickle=False)
            zf.writestr(name + ".npy", b.getvalue())
    return path


# ---- the per-rank loop ----------------------------------------------------------------
def class_labels(seeds, classes) -> torch.Tensor:
    """The class of seed s is classes[s % len(classes)] (with every class: s % num_classes)."""
    s = torch.as_tensor(list(seeds), dtype=torch.int64)
    return torch.as_tensor(list(classes), dtype=torch.int64)[s % len(classes)]


def generate(sampler, seeds, outdir, *, sample_shape, batch: int = 64, fmt: str = "png",
             data_range=(-1.0, 1.0), classes=None, null_class: int | None = None, guidance_scale=None,
             label_key: str = "class_labels", npz=None, progress: bool = True, ranks: Ranks | None = None,
             settings: dict | None = None, log=print) -> BulkResult:
    """Sample every seed not yet in `outdir` with this rank's share of the work.

    sampler: a fastdiff.Sampler; sample_shape: (C, H, W). classes: class ids for a
    class-conditional model (seed s gets classes[s % len(classes)]); guidance_scale as in
    fastdiff.conditioning (0: the unconditional model, 1 or None: the conditional model,
    else classifier-free guidance against `null_class`). settings: what the files depend on
    (solver, steps, ...), recorded in DIR and checked against an earlier run's record. Call
    on every rank (collectives inside); rank 0 holds DIR's lock for the run, shows a progress
    bar of the global count, prints the summary and writes `npz`.
    """
    ranks = ranks or current_ranks()
    if str(outdir) == "":
        raise ValueError("outdir must name a folder, got ''")
    seeds = list(dict.fromkeys(int(s) for s in seeds))  # unique, in order
    if not seeds:
        raise ValueError("seeds: no seeds to sample")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    sample_shape = tuple(int(s) for s in sample_shape)
    if fmt == "png" and (len(sample_shape) != 3 or sample_shape[0] not in PNG_MODES):
        raise ValueError(f"png needs samples [C, H, W] with C in 1, 3, 4, got {list(sample_shape)}; use npy")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if guidance_scale not in (None, 1.0) and (classes is None or null_class is None):
        raise ValueError("guidance_scale needs a class-conditional model (classes and null_class)")
    if npz is not None and Path(npz).suffix != ".npz":
        raise ValueError(f"npz must end in .npz, got {str(npz)!r}")
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BulkError(f"cannot create {outdir}: {os_message(e)}") from e
    with ExitStack() as lock:
        if ranks.rank == 0:
            lock.enter_context(folder_lock(outdir))
            remove_stale_temporaries(outdir)  # safe: a live run would hold the lock
            if settings is not None:
                check_run_settings(outdir, settings)
        ranks.barrier()  # nobody writes before rank 0 holds the lock and the stale temporaries are gone
        return _generate_locked(sampler, seeds, outdir, sample_shape, batch, fmt, data_range, classes, null_class,
                                guidance_scale, label_key, npz, progress, ranks, log)


def _generate_locked(sampler, seeds, outdir, sample_shape, batch, fmt, data_range, classes, null_class,
                     guidance_scale, label_key, npz, progress, ranks, log) -> BulkResult:
    on_disk = set(os.listdir(outdir))
    mine = [s for s in seeds[ranks.rank::ranks.world] if sample_path(outdir, s, fmt).name not in on_disk]
    batches = [mine[i:i + batch] for i in range(0, len(mine), batch)]
    # Ranks loop in step (one all-reduce per batch), so each runs the longest rank's count.
    n_batches = int(max(_per_rank(ranks, len(batches))))
    n_pending = int(ranks.all_sum([len(mine)])[0])
    bar = None
    if progress and ranks.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(seeds), initial=len(seeds) - n_pending, desc="sampling", unit="sample",
                   dynamic_ncols=True)
    written, start = 0, time.perf_counter()
    try:
        for i in range(n_batches):
            chunk = batches[i] if i < len(batches) else []
            if chunk:
                x = _sample_batch(sampler, chunk, batch, sample_shape, classes, null_class, guidance_scale, label_key)
                files = to_uint8(x, data_range) if fmt == "png" else x.cpu().numpy()
                for s, sample in zip(chunk, files):
                    write_atomic(sample_path(outdir, s, fmt), encode(sample, fmt))
                fsync_dir(outdir)
                written += len(chunk)
            (done,) = ranks.all_sum([len(chunk)])
            if bar is not None:
                bar.update(int(done))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start

    # (These all-reduces also mean every rank's files are on disk before rank 0 reads them.)
    counts, times = _per_rank(ranks, written), _per_rank(ranks, seconds)
    rates = [c / t if t > 0 else 0.0 for c, t in zip(counts, times)]
    result = BulkResult(total=len(seeds), new=int(sum(counts)), seconds=max(times), rank_rates=rates)
    if ranks.rank == 0:
        if npz is not None:
            labels = class_labels(seeds, classes).numpy() if classes is not None else None
            result.npz = write_npz(Path(npz), outdir, seeds, fmt, labels)
        log(summary(result, outdir))
    return result


def _per_rank(ranks: Ranks, value: float) -> list[float]:
    """Every rank's value: an all-reduce (sum) of a row that is zero but at this rank."""
    row = [0.0] * ranks.world
    row[ranks.rank] = float(value)
    return ranks.all_sum(row)


def _sample_batch(sampler, seeds, batch, sample_shape, classes, null_class, guidance_scale, label_key):
    """x0 [len(seeds), *S]. On CUDA the batch is padded to full size (repeating the last
    seed; discarded) so that one captured graph serves every batch."""
    n = len(seeds)
    if sampler.device.type == "cuda" and n < batch:
        seeds = seeds + [seeds[-1]] * (batch - n)
    cond = uncond = w = None
    if classes is not None:
        cond, uncond, w = class_conditioning(class_labels(seeds, classes), null_class, guidance_scale, label_key)
    x = sampler.sample(shape=(len(seeds), *sample_shape), seeds=seeds, cond=cond, uncond=uncond, guidance_scale=w)
    return x[:n]


def summary(result: BulkResult, outdir: Path) -> str:
    per_rank = ", ".join(f"rank {r}: {v:.1f}/s" for r, v in enumerate(result.rank_rates))
    return (f"fastdiff: {result.total} samples in {outdir} ({result.new} new, {result.total - result.new} "
            f"already there) in {result.seconds:.1f} s; {per_rank}; total {result.samples_per_s:.1f} samples/s"
            + (f"; wrote {result.npz}" if result.npz is not None else ""))
