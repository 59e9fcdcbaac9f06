"""Compile every Triton kernel variant fastdiff launches, ahead of time, for GPUs not present.

A kernel compiles once per *variant*: the constexprs (feature flags, BLOCK), the pointer
dtypes, which integers equal 1 or divide by 16 and which pointers are 16-byte aligned (what
Triton specializes on), and num_warps. This module

* collects the variants the library really launches (`collect`): it runs its public paths,
  `Sampler.sample(backend="triton")` over solver x prediction x CFG x clip/threshold/rescale x
  corrector x model dtype x img2img, `add_noise`, `elbo` and `schedule_tables`, on tiny shapes, with
  every kernel's launcher intercepted (`record_launches`; in Triton's interpreter on a CPU),
  and reduces each launch to Triton's own specialization of it (`Variant`);
* compiles each distinct variant for sm_90 and sm_80 with `triton.compile(ASTSource(...),
  target=GPUTarget(...))` and the ptxas of Triton's wheel, in a pool of processes
  (`compile_variants`), and reads registers, spills and shared memory (`Compiled`).

A compile here is the one the GPU would do on first launch (same source, signature, options,
target), so it also fills the Triton cache before a GPU run: `python -m fastdiff.kernel_compile
--arch 90 --jobs 16` (benchmarks/gpu_check.sh does). It proves the kernels compile and how
many registers they take; it cannot tell their speed or their numerics on silicon.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import itertools
import json
import multiprocessing
import os
import pkgutil
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch

from .results_tables import pipe_table

ARCHS = (90, 80)  # H100/H200, A100
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PREDICTIONS = ("epsilon", "v_prediction", "sample")
EXTRAS = ("none", "clip", "threshold", "rescale")  # what shapes D besides the affine map
SAMPLE_SHAPE = (4, 16, 16)  # N = 1024: one full tile per sample, as a latent's chunks are


# ---------------------------------------------------------------- launches ------------
@dataclass
class Launch:
    """One kernel launch as its launcher made it."""

    kernel: object  # the JITFunction / InterpretedFunction
    args: tuple
    kwargs: dict
    grid: tuple


def kernel_objects() -> dict[str, object]:
    """Every @triton.jit object of fastdiff.kernels' modules, by 'module:name' (launched ones
    and their device helpers alike)."""
    from triton.runtime.jit import KernelInterface

    import fastdiff.kernels as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, KernelInterface) and getattr(obj, "fn", None) is not None \
                    and obj.fn.__module__ == module.__name__:
                found[f"{module.__name__}:{name}"] = obj
    return found


@contextlib.contextmanager
def record_launches(execute: bool = True):
    """Record every kernel launch in the block: yields a list of Launch. execute=False records
    without running them (the outputs stay unwritten): launch geometry at any size, at no cost."""
    launches: list[Launch] = []
    patched = []
    for kernel in kernel_objects().values():
        run = kernel.run

        def recording(*args, grid, warmup, _run=run, _kernel=kernel, **kwargs):
            if not warmup:
                launches.append(Launch(_kernel, args, dict(kwargs), tuple(grid)))
            return _run(*args, grid=grid, warmup=warmup, **kwargs) if execute else None

        kernel.run = recording  # an instance attribute: kernel[grid](...) calls self.run
        patched.append(kernel)
    try:
        yield launches
    finally:
        for kernel in patched:
            del kernel.run


# ---------------------------------------------------------------- variants ------------
@dataclass
class Variant:
    """What Triton compiles one launch into: kernel 'module:name', signature, constexprs,
    attributes (divisibility), launch options; `key` identifies it."""

    kernel: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    key: str

    @property
    def family(self) -> str:
        return self.kernel.split(":")[1].strip("_").removesuffix("_kernel")

    @property
    def dtype(self) -> str:
        """The model-side dtype: the pointee of out_ptr (fp32 for a kernel without one)."""
        return self.signature.get("out_ptr", "*fp32").lstrip("*")

    def named_constexprs(self, arg_names) -> dict:
        return {arg_names[path[0]]: value for path, value in self.constexprs.items()}


def _jit_function(kernel):
    """A JITFunction over the kernel's Python source (the interpreter wraps it otherwise)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    return JITFunction(kernel.fn, **kernel.kwargs)


def _launch_options(jit) -> dict:
    """The keyword options JITFunction.run adds to a launch's own (num_warps, ...)."""
    from triton import knobs

    extra = {"debug": bool(jit.debug) or bool(knobs.runtime.debug)}
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            extra[name] = getattr(knobs.compilation, name)
    return extra


def specialize(launch: Launch, arch: int = ARCHS[0]) -> Variant:
    """The variant Triton compiles for this launch on `arch` (its own binder and packing)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit_function(launch.kernel)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kwargs = {**launch.kwargs, **_launch_options(jit)}
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    _, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    name = f"{jit.fn.__module__}:{jit.fn.__name__}"
    plain = lambda d: {k: (v.value if hasattr(v, "value") else v) for k, v in d.items()}  # noqa: E731
    key = json.dumps([name, signature, sorted(plain(constexprs).items()), sorted(attrs.items()),
                      sorted(kwargs.items())], default=str)
    return Variant(name, signature, plain(constexprs), attrs, kwargs, key)


# ---------------------------------------------------------------- the library's paths --
class TinyDenoiser(torch.nn.Module):
    """An output in the model's dtype, conditioned on `y`: enough to drive every kernel path."""

    def forward(self, x, t, y=None):
        out = 0.5 * x + (t / 1000).to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return out if y is None else out + 0.1 * y.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))


def sampler_configs(full: bool):
    """(Sampler keywords, sample keywords, batch) per run: the full product, or a covering set
    (every value of every option, every solver with every dtype) for the quick check."""
    from fastdiff import SOLVERS

    options = [PREDICTIONS, (False, True), EXTRAS, (None, "langevin"), (False, True), (1, 2)]
    if full:
        combos = [(s, d, *rest) for s, d in itertools.product(SOLVERS, DTYPES)
                  for rest in itertools.product(*options)]
    else:
        combos = [(s, d, *(values[(i + j) % len(values)] for j, values in enumerate(options)))
                  for i, (s, d) in enumerate(itertools.product(SOLVERS, DTYPES))]
    for solver, dtype, prediction, cfg, extra, corrector, img2img, batch in combos:
        if extra == "rescale" and not cfg:
            if not full:
                cfg = True  # rescaled CFG needs CFG
            else:
                continue
        kw = dict(solver=solver, steps=4, prediction=prediction, dtype=dtype, corrector=corrector,
                  clip_sample=extra == "clip", thresholding=extra == "threshold",
                  guidance_rescale=0.7 if extra == "rescale" else 0.0)
        sample_kw = {}
        if cfg:
            sample_kw = dict(cond={"y": torch.ones(batch)}, uncond={"y": torch.zeros(batch)}, guidance_scale=3.0)
        if img2img:
            sample_kw.update(init=torch.zeros(batch, *SAMPLE_SHAPE), strength=0.6)
        yield kw, sample_kw, batch
    for dtype in DTYPES:  # PNDM's Runge-Kutta warm-up: inner rows that read 2-3 history slots and push nothing
        yield dict(solver="plms", warmup="pseudo_runge_kutta", steps=4, dtype=dtype), {}, 1


def library_runs(full: bool = False) -> list:
    """The library's kernel paths (see the module docstring) as a list of calls."""
    from fastdiff import Sampler, Schedule, add_noise, elbo
    from fastdiff.kernels import schedule_tables

    schedule = Schedule.linear()
    model = TinyDenoiser()

    def sample(kw, sample_kw, batch):
        sampler = Sampler(model, schedule, backend="triton", graph=False, **kw)
        sampler.sample(shape=(batch, *SAMPLE_SHAPE), seeds=range(batch), **sample_kw)

    def noise(dtype, given, shape):
        x0 = torch.zeros(shape, dtype=dtype)
        z = torch.ones(shape, dtype=dtype) if given else None
        add_noise(x0, 500, schedule, noise=z, seeds=None if given else range(shape[0]), backend="triton")

    def bound(dtype):
        elbo(model, schedule, torch.zeros(2, *SAMPLE_SHAPE), timesteps=2, decoder="gaussian", backend="triton",
             dtype=dtype)

    runs = [functools.partial(sample, *config) for config in sampler_configs(full)]
    runs += [functools.partial(bound, dtype) for dtype in DTYPES]
    runs += [functools.partial(noise, *case) for case in
             itertools.product(DTYPES, (False, True), [(2, *SAMPLE_SHAPE), (5, 3), (1, 7)])]
    runs += [functools.partial(schedule_tables, torch.linspace(1e-4, 0.02, T, dtype=torch.float64))
             for T in ((2, 1000, 4096, 8192) if full else (1000,))]
    return runs


def collect(full: bool = False, jobs: int = 1) -> list[Variant]:
    """The distinct variants the library's paths launch, in first-launch order. The paths run
    in Triton's interpreter on the CPU: here if it is on and jobs is 1, else in `jobs`
    spawned processes, each taking every jobs-th run."""
    if os.environ.get("TRITON_INTERPRET") == "1" and jobs == 1:
        return _collect_part(full, 0, 1)
    with _environ("TRITON_INTERPRET", "1"), ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_collect_part, [full] * jobs, range(jobs), [jobs] * jobs))
    return list({v.key: v for variants in parts for v in variants}.values())


def _collect_part(full: bool, part: int, parts: int) -> list[Variant]:
    with record_launches() as launches:
        for run in library_runs(full)[part::parts]:
            run()
    variants = {}
    for launch in launches:
        v = specialize(launch)
        variants.setdefault(v.key, v)
    return list(variants.values())


def features(v: Variant) -> set:
    """What a variant turns on: its constexpr values, argument types and attributes."""
    return ({("constexpr", path, repr(value)) for path, value in v.constexprs.items()}
            | {("type", name, ty) for name, ty in v.signature.items()}
            | {("attr", path, json.dumps(attr)) for path, attr in v.attrs.items()})


def covering(variants: list[Variant]) -> list[Variant]:
    """A few variants that together show every feature of each kernel family and model dtype,
    the one with most features first (greedy set cover): the quick check's set."""
    chosen = []
    for group in sorted({(v.family, v.dtype) for v in variants}):
        pool = [v for v in variants if (v.family, v.dtype) == group]
        uncovered = set().union(*map(features, pool))
        while uncovered:
            best = max(pool, key=lambda v: len(features(v) & uncovered))
            chosen.append(best)
            uncovered -= features(best)
    return chosen


# ---------------------------------------------------------------- compiling -----------
@dataclass
class Compiled:
    """One variant compiled for one arch: ptxas's report, Triton's shared memory, or the error."""

    variant: Variant
    arch: int
    registers: int = 0
    spill_stores: int = 0  # bytes
    spill_loads: int = 0
    stack: int = 0  # bytes of stack frame (spills live there)
    shared: int = 0  # bytes of shared memory Triton allocated
    seconds: float = 0.0
    error: str = ""


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_path() -> str | None:
    """The ptxas Triton compiles sm_80/sm_90 with (its wheel's, or TRITON_PTXAS_PATH), if any."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(ARCHS[0]).path
    except Exception:
        return None
    return path if path and os.path.exists(path) else None


def _worker_init(cache_dir: str | None) -> None:
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report: registers and spills
    knobs.compilation.always_compile = True  # a cache hit has no report
    if cache_dir:
        knobs.cache.dir = cache_dir


def _compile_one(task: tuple[Variant, int]) -> Compiled:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend

    variant, arch = task
    module, name = variant.kernel.split(":")
    jit = getattr(importlib.import_module(module), name)
    target = GPUTarget("cuda", arch, 32)
    result = Compiled(variant, arch)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        options = make_backend(target).parse_options(variant.options)
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(jit, variant.signature, variant.constexprs, variant.attrs),
                                    target=target, options=options.__dict__)
        result.shared = int(kernel.metadata.shared)
        report = log.getvalue()
        stack, stores, loads = map(int, _PTXAS.search(report).groups())
        result.stack, result.spill_stores, result.spill_loads = stack, stores, loads
        result.registers = int(_REGS.search(report).group(1))
    except Exception as e:  # reported per variant; the caller fails on any
        result.error = f"{type(e).__name__}: {e}"[:2000]
    result.seconds = time.perf_counter() - start
    return result


def compile_variants(variants: list[Variant], archs=ARCHS, jobs: int | None = None,
                     cache_dir: str | None = None) -> list[Compiled]:
    """Compile every variant for every arch in `jobs` processes (spawned without Triton's
    interpreter); `cache_dir` None: Triton's own cache (what a GPU run reads)."""
    return compile_tasks([(v, arch) for v in variants for arch in archs], jobs, cache_dir)


def compile_tasks(tasks: list[tuple[Variant, int]], jobs: int | None = None,
                  cache_dir: str | None = None) -> list[Compiled]:
    """compile_variants over explicit (variant, arch) pairs."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    # a pool that raises if a worker dies (multiprocessing.Pool would wait forever)
    with _environ("TRITON_INTERPRET", None), ProcessPoolExecutor(
            jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
            initargs=(cache_dir,)) as pool:
        return list(pool.map(_compile_one, tasks))


@contextlib.contextmanager
def _environ(name: str, value: str | None):
    """Set (or, with None, unset) an environment variable for processes spawned in the block."""
    old = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if old is not None:
            os.environ[name] = old


# ---------------------------------------------------------------- report --------------
def summary_rows(results: list[Compiled]) -> list[dict]:
    """Per kernel family, model dtype and arch: variants, registers, spills, stack, shared."""
    groups: dict[tuple, list[Compiled]] = {}
    for r in results:
        groups.setdefault((r.variant.family, r.variant.dtype, r.arch), []).append(r)
    rows = []
    for (family, dtype, arch), rs in sorted(groups.items()):
        ok = [r for r in rs if not r.error]
        span = lambda f: f"{min(map(f, ok))}-{max(map(f, ok))}" if ok else "-"  # noqa: E731
        rows.append(dict(kernel=family, dtype=dtype, arch=f"sm_{arch}", variants=len(rs), errors=len(rs) - len(ok),
                         registers=span(lambda r: r.registers),
                         spilling=sum(r.spill_stores + r.spill_loads > 0 for r in ok),
                         max_spill=max((max(r.spill_stores, r.spill_loads) for r in ok), default=0),
                         stack=span(lambda r: r.stack), shared=span(lambda r: r.shared),
                         seconds=round(sum(r.seconds for r in rs), 1)))
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = ["kernel", "model dtype", "arch", "variants", "errors", "registers", "variants spilling",
            "max spill (bytes)", "stack (bytes)", "shared (bytes)", "compile s"]
    return "\n".join(pipe_table(head, [[str(v) for v in r.values()] for r in rows]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastdiff.kernel_compile", description=__doc__.split("\n")[0])
    p.add_argument("--full", action="store_true", help="the full sweep (the default: the covering quick set)")
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (90 80)")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: all cores)")
    p.add_argument("--cache-dir", default=None, help="Triton cache to fill (default: Triton's own)")
    p.add_argument("--json", default=None, help="write every variant's result here")
    a = p.parse_args(argv)
    if ptxas_path() is None:
        sys.exit("fastdiff.kernel_compile: no ptxas (Triton's wheel bundles one; or set TRITON_PTXAS_PATH)")
    start = time.perf_counter()
    variants = collect(a.full, a.jobs or os.cpu_count() or 1)
    collected = time.perf_counter() - start
    results = compile_variants(variants, a.arch, a.jobs, a.cache_dir)
    print(f"{len(variants)} variants collected in {collected:.0f} s; {len(results)} compiles in "
          f"{time.perf_counter() - start - collected:.0f} s ({a.jobs or os.cpu_count()} jobs)")
    print(markdown_table(summary_rows(results)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([dict(kernel=r.variant.kernel, arch=r.arch, registers=r.registers,
                            spill_stores=r.spill_stores, spill_loads=r.spill_loads, stack=r.stack, shared=r.shared,
                            seconds=r.seconds, error=r.error, signature=r.variant.signature,
                            constexprs={str(k): v for k, v in r.variant.constexprs.items()}) for r in results], f)
    errors = [r for r in results if r.error]
    for r in errors[:5]:
        print(f"FAILED {r.variant.kernel} sm_{r.arch}: {r.error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
