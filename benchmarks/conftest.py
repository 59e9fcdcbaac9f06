"""The benchmark suite's plumbing: device, copy bandwidth, a synced timer, the results file.

    pytest benchmarks/ --benchmark-only                  # the full suite on this machine's device
    pytest benchmarks/ --benchmark-only --bench-quick    # tiny sizes: checks every case runs

Cases live in bench_step.py (the per-step update) and bench_loop.py (whole loops and
their one-time costs), built from fastdiff.bench. Timing is pytest-benchmark's, with a
timer that synchronizes CUDA, so each round brackets finished device work. At session end
the pytest-benchmark JSON (raw samples + each case's extra_info) is summarized by
report.py into benchmarks/results/<date>-<device>.json (ratios and targets), then
rendered to .md and .png beside it.
"""
from __future__ import annotations

import datetime
import json
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
import torch

from fastdiff import bench

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402 -- benchmarks/report.py, importable once HERE is on the path

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SESSION_START = time.perf_counter()
COPY_KEY = pytest.StashKey[dict]()


def device_slug() -> str:
    if DEVICE.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(DEVICE).lower()).strip("-")


def pytest_addoption(parser):
    g = parser.getgroup("fastdiff benchmarks")
    g.addoption("--bench-quick", action="store_true",
                help="tiny sizes and few rounds: checks that every case runs; not a measurement")
    g.addoption("--bench-out", default=None,
                help="results file (default: benchmarks/results/<date>-<device>.json; "
                     "with --bench-quick: .benchmarks/quick-<device>.json)")
    g.addoption("--bench-budget", type=float, default=None,
                help="seconds: cases that would start later are skipped, visibly")


def pytest_collect_file(file_path, parent):
    # pytest collects a file named on the command line itself; add only the others
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(config, items):
    # the per-step cases first: they are quick and hold three targets, so a --bench-budget
    # that runs out cuts the last (largest) loops instead
    items.sort(key=lambda item: 0 if item.path.name == "bench_step.py" else 1)


def results_path(config) -> Path:
    out = config.getoption("--bench-out")
    if out:
        return Path(out)
    if config.getoption("--bench-quick"):
        return Path(config.rootpath) / ".benchmarks" / f"quick-{device_slug()}.json"
    return HERE / "results" / f"{datetime.date.today().isoformat()}-{device_slug()}.json"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # pytest-benchmark writes its JSON (every raw sample) only when asked: always ask, beside
    # nothing we commit, so the session-end hook below can summarize it.
    if getattr(config.option, "benchmark_json", "absent") is None and not config.option.collectonly:
        raw = Path(config.rootpath) / ".benchmarks" / (results_path(config).stem + ".pytest-benchmark.json")
        raw.parent.mkdir(parents=True, exist_ok=True)
        import pytest_benchmark

        # 5.x takes a path; 4.x an open binary file (argparse.FileType("wb"))
        old = int(pytest_benchmark.__version__.split(".")[0]) < 5
        config.option.benchmark_json = raw.open("wb") if old else raw


def pytest_report_header(config):
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU"
    return (f"fastdiff benchmarks on {name}: torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"results -> {results_path(config)}")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return DEVICE


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--bench-quick")


@pytest.fixture(scope="session")
def copy_bandwidth(request, quick) -> float:
    """Device copy bandwidth (bytes/s, read + written), measured once per run."""
    bps, timing, nbytes = bench.copy_bandwidth(DEVICE, (1 << 24) if quick else None)
    request.config.stash[COPY_KEY] = {"GBps": bps / 1e9, "bytes_per_copy": nbytes, **timing.as_dict()}
    return bps


@pytest.fixture(autouse=True)
def _time_budget(request):
    budget = request.config.getoption("--bench-budget")
    if budget is not None and time.perf_counter() - SESSION_START > budget:
        pytest.skip(f"--bench-budget {budget:g} s spent before this case")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Summarize the run into the results file (+ .md, .png) once pytest-benchmark has its JSON."""
    if not output_json.get("benchmarks"):
        return
    meta = {
        "device": DEVICE.type,
        "device_name": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU",
        "quick": config.getoption("--bench-quick"),
        "command": "pytest " + " ".join(shlex.quote(a) for a in config.invocation_params.args),
        "machine": bench.machine_summary(DEVICE),
        "copy_bandwidth": config.stash.get(COPY_KEY, None),
        "elapsed_s": time.perf_counter() - SESSION_START,
    }
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(DEVICE)
        meta["machine"].update(gpu_memory_GiB=round(props.total_memory / 2**30, 1),
                               cuda=torch.version.cuda, sm_count=props.multi_processor_count)
    results = report.summarize(output_json, meta)
    path = results_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1))
    md, png = report.write_report(path)
    tr = config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(f"fastdiff results: {path}, {md}" + (f", {png}" if png else ""))
