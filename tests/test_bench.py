"""`fastdiff bench` and benchmarks/report.py: a tiny run of the command, and the report on
a synthetic results file (ratios, targets, markdown, plot). Speed itself is never asserted."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fastdiff import bench, cli

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("fastdiff_benchmarks_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timing_median_and_quartiles():
    t = bench.Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median == 3.0
    assert (t.quantile(0.25), t.quantile(0.75), t.iqr) == (2.0, 4.0, 2.0)
    assert t.as_dict()["rounds"] == 5


def test_measure_times_each_function_every_round():
    calls = {"a": 0, "b": 0}

    def count(name):
        calls[name] += 1

    timings = bench.measure({"a": lambda: count("a"), "b": lambda: count("b")}, "cpu", rounds=3, warmup=1,
                            min_round_s=0.0)
    assert set(timings) == {"a", "b"}
    assert all(len(t.samples) == 3 and t.median >= 0 for t in timings.values())
    assert calls == {"a": 4, "b": 4}  # one warm-up + three rounds of one call each


def test_vs_diffusers_reads_the_paired_rounds():
    T = bench.Timing
    fast, slow = T([1.0, 1.1, 0.9, 1.0, 1.05]), T([2.0, 2.2, 1.8, 2.0, 2.1])
    assert bench.vs_diffusers({"fastdiff": fast, "diffusers": slow}) == "2.00x faster"
    assert bench.vs_diffusers({"fastdiff": slow, "diffusers": fast}) == "2.00x slower"
    # round by round the sign flips: the interval holds 1
    noisy = T([1.05, 1.0, 0.96, 1.1, 0.9])
    assert bench.vs_diffusers({"fastdiff": fast, "diffusers": noisy}).startswith("within noise (")
    assert bench.vs_diffusers({"fastdiff": fast}) == "n/a"


def test_median_interval_is_distribution_free():
    nine = [5, 1, 9, 3, 7, 2, 8, 4, 6]
    assert bench.median_interval(nine) == (2, 8, pytest.approx(1 - 2 * 10 / 512))  # 2nd and 8th, 96%
    assert bench.median_interval([4, 1, 3, 2]) == (1, 4, 0.875)  # too few for 90%: the range, 87.5%
    lo, hi, cover = bench.median_interval(list(range(15)))
    assert (lo, hi) == (3, 11) and cover >= 0.90
    with pytest.raises(ValueError, match="equally long"):
        bench.paired_ratio([1.0, 2.0], [1.0])


def test_rounds_rotate():
    assert [bench.rotated(list("abc"), i) for i in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_step_bytes_counts_what_the_step_moves():
    table, _ = bench._step_table("dpmpp_2m", "cpu", None)
    row = table.rows // 2  # reads H0 and pushes D: x r/w + H0 read + push = 4 state tensors
    n = 1000
    assert bench.step_bytes(table, row, n, cfg=False, state_size=4, model_size=2) == n * (4 * 4 + 2 * 2)
    assert bench.step_bytes(table, row, n, cfg=True, state_size=4, model_size=2) == n * (4 * 4 + 4 * 2)
    last = table.rows - 1  # no next model input to write
    assert bench.step_bytes(table, last, n, cfg=False, state_size=4, model_size=4) < \
        bench.step_bytes(table, row, n, cfg=False, state_size=4, model_size=4)


def test_bench_quick_prints_the_table(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--quick", "--rounds", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fastdiff bench on" in text and "step ddpm+CFG" in text and "loop digits" in text
    doc = json.loads(out.read_text())
    assert doc["quick"] and len(doc["rows"]) == 2
    for row in doc["rows"]:
        assert row["fastdiff"]["median_s"] > 0 and row["limit_s"] > 0


def test_bench_compile_adds_a_row_over_the_compiled_model(capsys, monkeypatch):
    """--compile: one more digits row, whose sampler and limit both call runners.compile_model
    (replaced here by a recorder: real compilation is tested in test_graph.py)."""
    import fastdiff.runners

    compiled = []

    def record(model):
        compiled.append(model)
        return model

    monkeypatch.setattr(fastdiff.runners, "compile_model", record)
    assert cli.main(["bench", "--quick", "--rounds", "1", "--compile"]) == 0
    text = capsys.readouterr().out
    assert "dpmpp_2m compile" in text and "limit = compiled model alone x 3" in text
    assert len(compiled) == 2 and compiled[0] is compiled[1]  # the sampler's and the limit's: the same model


def test_bench_rejects_bad_rounds(capsys):
    assert cli.main(["bench", "--rounds", "0"]) == 2
    assert "--rounds" in capsys.readouterr().err


def _bench(name, samples, **info):
    return {"name": name, "extra_info": info, "stats": {"data": samples, "iterations": 1}}


def synthetic_run():
    """A CUDA-like run: two per-step cases and one loop case with its model alone in a graph."""
    step = dict(kind="step", solver="ddpm", scheduler="DDPMScheduler", shape=[16, 4, 64, 64], cfg=True,
                dtype="float16", bytes=8 * 2**20, steps_per_call=1, tensor_MiB=4.0)
    loop = dict(case="cifar10-b1-fp32", model="cifar10", batch=1, steps=50, dtype="float32", cfg=False,
                solver="ddpm", scheduler="DDPMScheduler", sample_shape=[3, 32, 32], note="", model_calls=1)
    benchmarks = [
        _bench("test_step[fused]", [80e-6, 100e-6, 120e-6], **step, impl="fastdiff-triton-graph"),
        _bench("test_step[diffusers]", [4e-3, 5e-3, 6e-3], **step, impl="diffusers"),
        _bench("test_loop[graph]", [0.131, 0.132, 0.133], **loop, kind="loop", impl="fastdiff-graph",
               first_call_s=2.0, warmup_s=1.2, capture_s=0.4),
        _bench("test_loop[compile]", [0.101, 0.1, 0.102], **{**loop, "case": "sd15-b1-fp16", "steps": 25},
               kind="loop", impl="fastdiff-graph-compile", first_call_s=60.0, warmup_s=55.0, capture_s=0.5),
        _bench("test_loop[diffusers]", [1.0, 1.02, 1.04], **loop, kind="loop", impl="diffusers-eager",
               first_call_s=1.5),
        _bench("test_loop[model-graph]", [0.129, 0.13, 0.131], **{**loop, "model_calls": 50}, kind="model",
               impl="model-graph"),
    ]
    pb = {"benchmarks": benchmarks, "datetime": "2026-11-26T10:00:00", "machine_info": {"cpu": {"count": 16}},
          "commit_info": {"id": "0123456789abcdef"}}
    meta = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "command": "pytest benchmarks/",
            "machine": {"python": "3.12.3", "torch": "2.11.0", "triton": "3.6.0", "diffusers": "0.42.1",
                        "gpu": "NVIDIA H100 80GB HBM3"},
            "copy_bandwidth": {"GBps": 3000.0, "bytes_per_copy": 2**30}, "elapsed_s": 300.0}
    return pb, meta


def test_report_summarizes_and_renders(report, tmp_path):
    results = report.summarize(*synthetic_run())
    by_name = {c["name"]: c for c in results["cases"]}
    fused, graph = by_name["test_step[fused]"], by_name["test_loop[graph]"]
    assert fused["median_s"] == pytest.approx(100e-6)
    assert fused["speedup_over_diffusers"] == pytest.approx(50.0)
    assert fused["GBps"] == pytest.approx(8 * 2**20 / 100e-6 / 1e9)
    assert fused["fraction_of_copy"] == pytest.approx(fused["GBps"] / 3000.0)
    assert graph["ratio_to_limit"] == pytest.approx(0.132 / 0.130)  # model-graph holds all 50 calls
    assert graph["speedup_over_diffusers"] == pytest.approx(1.02 / 0.132)
    assert graph["it_per_s"] == pytest.approx(50 / 0.132)
    assert by_name["test_loop[compile]"]["ratio_to_limit"] is None  # no compiled model alone in this run
    targets = {t["target"]: t for t in results["targets"]}
    speedup = targets["speedup over diffusers DDPMScheduler.step + CFG, 16x4x64x64"]
    assert speedup["measured"] == pytest.approx(50.0) and speedup["met"] is True
    assert targets["step time, ddpm + CFG, 16x4x64x64"]["met"] is False  # 100 us > 8 us
    assert targets["cifar10-b1-fp32: speedup over diffusers eager"]["met"] is True
    assert targets["sd15-b1-fp16 CFG with compile=True"]["measured"] == pytest.approx(25 / 0.101)

    path = tmp_path / "2026-11-26-nvidia-h100.json"
    path.write_text(json.dumps(results))
    assert report.main([str(path), "--print"]) == 0
    md = path.with_suffix(".md").read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "2026-11-26" in md and "`pytest benchmarks/`" in md
    assert "| speedup over diffusers DDPMScheduler.step + CFG, 16x4x64x64 | >= 40x | 50 x | yes |" in md
    assert "## One-time costs" in md and "## Per-step update" in md
    pytest.importorskip("matplotlib")
    assert path.with_suffix(".png").stat().st_size > 1000


def test_report_rejects_other_json(report, tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="not a fastdiff results file"):
        report.write_report(path)


def test_report_cpu_compile_limit_and_side_by_side(report):
    """CPU: Sampler(compile=True)'s limit is the compiled model alone, its compile time is its
    first call minus the eager loop's; the side-by-side round gives the digits targets."""
    loop = dict(case="digits-b8-fp32", model="digits", batch=8, steps=20, dtype="float32", cfg=True,
                solver="dpmpp_2m", scheduler="DPMSolverMultistepScheduler", sample_shape=[1, 16, 16], note="",
                model_calls=1)
    benchmarks = [
        _bench("eager", [0.62, 0.63, 0.64], **loop, kind="loop", impl="fastdiff-eager", first_call_s=0.7),
        _bench("compile", [0.41, 0.42, 0.43], **loop, kind="loop", impl="fastdiff-compile", first_call_s=40.7),
        _bench("diffusers", [0.63, 0.64, 0.65], **loop, kind="loop", impl="diffusers-eager", first_call_s=0.7),
        _bench("model", [0.031, 0.0315, 0.032], **loop, kind="model", impl="model-eager"),
        _bench("model-compile", [0.0205, 0.021, 0.0215], **loop, kind="model", impl="model-compile"),
        _bench("side", [3.0, 3.1, 3.2], **loop, kind="side_by_side", impl="interleaved", samples_by_impl={
            "fastdiff": [0.62, 0.63, 0.64], "diffusers-eager": [0.63, 0.64, 0.65], "model-eager": [0.62, 0.63, 0.64],
            "fastdiff-compile": [0.42, 0.43, 0.41], "model-compile": [0.42, 0.43, 0.41],
            "fastdiff-noop": [0.003, 0.003, 0.003], "diffusers-noop": [0.004, 0.004, 0.004]}),
    ]
    pb = {"benchmarks": benchmarks, "datetime": "2026-11-26T10:00:00", "machine_info": {"cpu": {"count": 2}}}
    meta = {"device": "cpu", "device_name": "CPU", "command": "pytest benchmarks/",
            "machine": {"python": "3.11.7", "torch": "2.13.0", "triton": "3.9.0", "diffusers": "0.42.1"}}
    results = report.summarize(pb, meta)
    by_name = {c["name"]: c for c in results["cases"]}
    compiled = by_name["compile"]
    assert compiled["limit"] == "model-compile" and compiled["ratio_to_limit"] == pytest.approx(0.42 / (20 * 0.021))
    assert compiled["compile_s"] == pytest.approx(40.0)
    assert by_name["eager"]["limit"] == "model-eager"
    targets = {t["target"]: t for t in results["targets"]}
    assert targets["digits (CPU): fastdiff loop / (steps x model alone)"]["measured"] == pytest.approx(1.0)
    assert targets["digits (CPU): speedup over the diffusers-style loop, same eager model"]["measured"] == \
        pytest.approx(0.64 / 0.63)
    assert targets["digits (CPU): compile=True loop / (steps x compiled model alone)"]["measured"] == \
        pytest.approx(0.42 / 0.42)
    speedup = targets["digits (CPU): compile=True speedup over the diffusers-style loop (eager model)"]
    assert speedup["measured"] == pytest.approx(0.63 / 0.42) and speedup["met"] is True  # per-round ratios' median
    md = report.markdown(results, None)
    assert "| fastdiff-compile / model-compile | 1.000 | 1.000-1.000 (75%) |" in md and "(compiled model)" in md
    # rounds that disagree on the sign: the interval holds 1, the verdict is "within noise"
    benchmarks[-1]["extra_info"]["samples_by_impl"]["diffusers-eager"] = [0.60, 0.64, 0.66]
    noisy = {t["target"]: t for t in report.summarize(pb, meta)["targets"]}
    eager = noisy["digits (CPU): speedup over the diffusers-style loop, same eager model"]
    assert eager["ci"][0] < 1 < eager["ci"][1] and eager["met"] is None
    assert "| within noise |" in report.markdown(report.summarize(pb, meta), None)


def test_flow_loop_case_computes_flow_match_eulers_loop():
    """The flow own-work case: fastdiff's loop and the diffusers-style FlowMatchEuler loop run the
    same 28 Euler steps (compared on the same start: both models are the no-op velocity)."""
    pytest.importorskip("diffusers")
    lm = bench.flow_model("cpu", batch=2, sample_shape=(1, 4, 4))
    sampler, _ = bench.fastdiff_loop(lm, "cpu")
    scheduler = bench.diffusers_scheduler(lm.solver, **lm.scheduler_config)
    assert lm.info()["scheduler"] == type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    scheduler.set_timesteps(lm.steps)
    torch.testing.assert_close(sampler.timesteps.float(), scheduler.timesteps)
    torch.manual_seed(0)
    want = bench.diffusers_loop(lm, "cpu")()
    torch.manual_seed(0)
    noise = torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(sampler.sample(noise=noise), want, rtol=2e-4, atol=1e-6)
