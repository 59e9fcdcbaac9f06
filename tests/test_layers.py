"""fastdiff's imports, read with ast from every module of fastdiff/ and kernels/: no cycle,
layers that only point down, a core that imports neither diffusers nor the CLI, and no
kernel without a caller in the library."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The layering rule, top to bottom: a module may import its own layer and the layers below.
# Names are module paths under fastdiff; a package name covers its submodules.
LAYERS = [
    # the command line: one `sample` command (grid and bulk mode), eval (with --nll), train
    ("cli", {"__main__", "cli", "sample_cmd", "evaluate", "nll_eval", "train", "models.train_classifier",
             "solver_error", "quality_intervals"}),
    # what the commands share (options, class conditioning, output files) and the library loops they call
    ("front", {"__init__", "integrations", "bench", "bench_cases", "kernel_compile", "distributed", "bulk",
               "command_options", "class_conditioning", "output_files", "results_tables"}),
    # accelerate(pipe) (integrations.pipelines) picks a family; each family builds on what they all share,
    # which builds on the scheduler adapter
    ("pipeline families", {"integrations.pipelines.unconditional", "integrations.pipelines.stable_diffusion",
                           "integrations.pipelines.stable_diffusion_xl", "integrations.pipelines.flow"}),
    ("pipeline loop", {"integrations.pipelines.accelerated"}),
    ("diffusers schedulers", {"integrations.diffusers"}),
    ("sampling", {"sampler", "runners", "loop", "executors", "noising", "likelihood", "inversion", "conditioning"}),
    ("compilers", {"solvers", "models"}),
    ("base", {"schedules", "grids", "kernels", "rng", "guidance", "dtypes", "devices", "columns", "seeds",
              "checks"}),
]
CLI = LAYERS[0][1]
CORE = {"sampling", "compilers", "base"}  # imports neither diffusers nor the CLI
# what a kernel file may import besides its own package (philox): the bottom modules it shares
KERNEL_IMPORTS = {"fastdiff.devices", "fastdiff.dtypes", "fastdiff.rng", "fastdiff.columns"}
# kernels with no library caller yet (schedule_tables has one now: fastdiff.likelihood)
UNCALLED_KERNELS_ALLOWED = set()


def _modules() -> dict[str, Path]:
    files = {p: p.relative_to(ROOT / "fastdiff").with_suffix("") for p in (ROOT / "fastdiff").rglob("*.py")
             if "kernels" not in p.relative_to(ROOT / "fastdiff").parts}
    files.update({p: Path("kernels") / p.relative_to(ROOT / "kernels").with_suffix("")
                  for p in (ROOT / "kernels").rglob("*.py")})
    mods = {}
    for path, rel in files.items():
        parts = ["fastdiff", *rel.parts]
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(fastdiff modules, top-level third-party packages) that module `name` imports, lazily or not."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    ours, theirs = set(), set()

    def add(target: str):
        if target == "fastdiff" or target.startswith("fastdiff."):
            while target not in MODULES:  # `from .x import f`: f is no module, x is
                target = target.rpartition(".")[0]
            ours.add(target)
        else:
            theirs.add(target.partition(".")[0])

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in MODULES else base)
    ours.discard(name)
    return ours, theirs


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def layer_of(module: str) -> int:
    rel = module.removeprefix("fastdiff").removeprefix(".") or "__init__"
    found = [i for i, (_, names) in enumerate(LAYERS)
             for n in names if rel == n or rel.startswith(n + ".")]
    if not found:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it in LAYERS")
    return min(found) if rel in CLI else max(found)  # the most specific entry (models.train_classifier)


def test_every_module_has_a_layer():
    assert len(MODULES) > 30 and "fastdiff.kernels.affine_step" in MODULES
    for module in MODULES:
        layer_of(module)


def test_imports_only_point_down():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m, (deps, _) in GRAPH.items() for d in deps if layer_of(d) < layer_of(m)]
    assert not upward, "\n".join(upward)


def test_the_core_imports_neither_diffusers_nor_the_cli():
    bad = [f"{m} imports {x}" for m, (deps, third) in GRAPH.items() if LAYERS[layer_of(m)][0] in CORE
           for x in sorted(third & {"diffusers"}) + sorted(d for d in deps if layer_of(d) == 0)]
    assert not bad, "\n".join(bad)


def test_kernels_import_only_the_bottom_modules_they_share():
    bad = [f"{m} imports {d}" for m, (deps, _) in GRAPH.items() if m.startswith("fastdiff.kernels")
           for d in deps if d not in KERNEL_IMPORTS and not d.startswith("fastdiff.kernels")]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    """Tarjan's strongly connected components: none with more than one module."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v][0]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_every_kernel_has_a_library_caller():
    callers = {d for m, (deps, _) in GRAPH.items() if not m.startswith("fastdiff.kernels") for d in deps}
    reached, todo = set(), [d for d in callers if d.startswith("fastdiff.kernels.")]
    while todo:  # a kernel's helpers (philox) are called through it
        k = todo.pop()
        if k not in reached:
            reached.add(k)
            todo.extend(d for d in GRAPH[k][0] if d.startswith("fastdiff.kernels."))
    kernels = {m for m in MODULES if m.startswith("fastdiff.kernels.")}
    assert not kernels - reached - UNCALLED_KERNELS_ALLOWED, sorted(kernels - reached - UNCALLED_KERNELS_ALLOWED)


@pytest.mark.parametrize("source, broken", [
    ("from ..sampler import Sampler\n", "fastdiff.solvers.ddim"),  # a solver reaching up to the sampler
    ("from fastdiff.solvers.table import NCOL\n", "fastdiff.kernels.affine_step"),
    ("from .flow import FlowTransformer\n", "fastdiff.integrations.pipelines.accelerated"),  # shared code on a family
])
def test_the_rules_catch_a_broken_import(source, broken):
    """The checks above fail on an upward import (guards against a walker that sees nothing)."""
    deps, _ = _imports(broken, _with_source(broken, source))
    assert any(layer_of(d) < layer_of(broken) or (broken.startswith("fastdiff.kernels") and d not in KERNEL_IMPORTS)
               for d in deps)


def _with_source(module: str, source: str) -> Path:
    import tempfile

    path = Path(tempfile.mkdtemp()) / MODULES[module].name
    path.write_text(source)
    return path
