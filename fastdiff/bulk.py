"""Bulk generation: many seeds on many ranks, one file per sample, resumable.

    torchrun --nproc_per_node 8 -m fastdiff sample --seeds 0-49999 --outdir out/
    python -m fastdiff.bulk --seeds 0-999 --outdir out/ --nproc 2     # local spawn, no torchrun

Each rank takes seeds[rank::world] and samples them in batches; sample `s` goes to
DIR/{s:06d}.png (or .npy, raw float32 [C, H, W]), written to a temporary file in DIR,
fsynced and renamed into place, so a file that exists is complete. A rerun skips what is
on disk: a crash costs only the batch in flight. Because a sample depends only on its seed
(counter-based noise), the files do not depend on the world size or the batch size.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .distributed import PeerFailedError, RankFailedError, Ranks, current_ranks, distributed, launch  # noqa: F401
from .seeds import parse_seed_range

FORMATS = ("png", "npy")
TMP_PREFIX, TMP_SUFFIX = ".fastdiff-", ".tmp"  # temporary files; stale ones are removed at start
PNG_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


class BulkError(RuntimeError):
    """A bulk run that cannot go on: unwritable output, a failed rank, a bad option."""


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


@contextmanager
def atomic_open(path: Path):
    """A binary file whose contents appear at `path` only when complete: written to a
    temporary file in the same directory, fsynced, renamed. Errors name the path."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise BulkError(f"cannot write {path}: {_os_message(e)}") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def _os_message(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else str(e)


def _fsync_dir(outdir: Path) -> None:
    """Make the renames durable (POSIX; not possible on Windows)."""
    try:
        fd = os.open(outdir, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(outdir: Path) -> int:
    """Delete temporary files left by a killed run; returns how many."""
    n = 0
    for name in os.listdir(outdir):
        if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX):
            os.unlink(outdir / name)
            n += 1
    return n


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
        raise BulkError(f"cannot read {path}: {_os_message(e)}") from e


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
             log=print) -> BulkResult:
    """Sample every seed not yet in `outdir` with this rank's share of the work.

    sampler: a fastdiff.Sampler; sample_shape: (C, H, W). classes: class ids for a
    class-conditional model (seed s gets classes[s % len(classes)]); with guidance_scale,
    classifier-free guidance against `null_class`. Call on every rank (collectives inside);
    rank 0 shows a progress bar of the global count, prints the summary and writes `npz`.
    """
    ranks = ranks or current_ranks()
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
    if guidance_scale is not None and (classes is None or null_class is None):
        raise ValueError("guidance_scale needs a class-conditional model (classes and null_class)")
    outdir = Path(outdir)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BulkError(f"cannot create {outdir}: {_os_message(e)}") from e
    if ranks.rank == 0:
        remove_stale_temporaries(outdir)
    ranks.barrier()  # nobody writes before the stale temporaries are gone

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
                _fsync_dir(outdir)
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
    cond = uncond = None
    if classes is not None:
        y = class_labels(seeds, classes)
        cond = {label_key: y}
        if guidance_scale is not None:
            uncond = {label_key: torch.full_like(y, null_class)}
    x = sampler.sample(shape=(len(seeds), *sample_shape), seeds=seeds, cond=cond, uncond=uncond,
                       guidance_scale=guidance_scale)
    return x[:n]


def summary(result: BulkResult, outdir: Path) -> str:
    per_rank = ", ".join(f"rank {r}: {v:.1f}/s" for r, v in enumerate(result.rank_rates))
    return (f"fastdiff: {result.total} samples in {outdir} ({result.new} new, {result.total - result.new} "
            f"already there) in {result.seconds:.1f} s; {per_rank}; total {result.samples_per_s:.1f} samples/s"
            + (f"; wrote {result.npz}" if result.npz is not None else ""))


# ---- command line: the bulk mode of `fastdiff sample` ---------------------------------
def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    """Add bulk mode to the `fastdiff sample` parser (fastdiff/sample_cmd.py has the shared
    options: --model, --solver, --steps, --guidance-scale, --classes, --seeds, --device)."""
    g = p.add_argument_group("bulk mode", "--seeds A-B --outdir DIR: one file per seed, shared across the "
                             "ranks of a torchrun job; a rerun skips the files already there. "
                             "Seed s gets class classes[s %% len(classes)] (default: s %% num_classes).")
    g.add_argument("--outdir", default=None, help="write DIR/{seed:06d}.png (or .npy) instead of a grid")
    g.add_argument("--batch", type=int, default=64, help="samples per batch and rank (default %(default)s)")
    g.add_argument("--format", choices=FORMATS, default="png", help="png (uint8) or npy (raw float32)")
    g.add_argument("--npz", default=None, help="also collect every sample into one .npz (rank 0, at the end)")
    g.add_argument("--nproc", type=int, default=None, help="spawn this many local ranks (instead of torchrun)")
    p.set_defaults(run=sample_main)


def sample_main(args: argparse.Namespace) -> int:
    """`fastdiff sample`: bulk mode with --outdir, else the grid of sample_cmd."""
    if args.outdir is None:
        from .sample_cmd import main as grid_main

        return grid_main(args)
    try:
        run(args)
    except BulkError as e:
        where = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and \
            not isinstance(e, PeerFailedError) else ""
        print(f"fastdiff: error: {where}{e}", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> BulkResult | None:
    """A bulk run from `fastdiff sample` options: joins the process group of torchrun or
    spawns --nproc local ranks. Raises ValueError (bad options) or BulkError."""
    from .solvers import check_solver

    if args.seeds is None:
        raise ValueError("bulk mode (--outdir) needs --seeds, e.g. --seeds 0-49999")
    seeds = parse_seed_range(args.seeds)
    check_solver(args.solver)
    if args.steps < 1 or args.batch < 1:
        raise ValueError(f"--steps and --batch must be >= 1, got {args.steps} and {args.batch}")
    if args.nproc is not None and "RANK" not in os.environ:
        launch(args.nproc, _run_rank, args)
        return None
    return _run_rank(args, seeds)


def _load(model: str, device):
    from .models.pretrained import PRETRAINED, load_from_file, load_pretrained

    return load_pretrained(model, device=device) if model in PRETRAINED else load_from_file(model, device=device)


def _run_rank(args: argparse.Namespace, seeds: list[int] | None = None) -> BulkResult:
    from .sample_cmd import parse_classes
    from .sampler import Sampler

    seeds = seeds if seeds is not None else parse_seed_range(args.seeds)
    with distributed(args.device) as (ranks, device):
        loaded = _load(args.model, device)
        meta = loaded.metadata
        if loaded.schedule is None or "image_shape" not in meta:
            raise ValueError(f"--model {args.model!r} is not a diffusion model (no schedule/image_shape in its JSON)")
        classes = parse_classes(args.classes, meta.get("num_classes"))
        w = args.guidance_scale
        guided = classes is not None and w not in (0.0, 1.0)  # as in the grid mode: 1 is the conditional model
        sampler = Sampler(loaded.model, loaded.schedule, solver=args.solver, steps=args.steps,
                          backend=args.backend, device=device, **loaded.sampler_options())
        return generate(sampler, seeds, args.outdir, sample_shape=meta["image_shape"], batch=args.batch,
                        fmt=args.format, data_range=tuple(meta.get("data_range", (-1.0, 1.0))), classes=classes,
                        null_class=meta.get("null_class", meta.get("num_classes")),
                        guidance_scale=w if guided else None, npz=args.npz, progress=not args.no_progress,
                        ranks=ranks)


def main(argv: list[str] | None = None) -> int:
    """`python -m fastdiff.bulk ARGS` is `fastdiff sample ARGS`."""
    from .cli import main as cli_main

    return cli_main(["sample", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
