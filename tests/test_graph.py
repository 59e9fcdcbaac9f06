"""The captured loop: static buffers and baked constants equal a plain loop; on CUDA, one graph."""
import warnings

import pytest
import torch

from fastdiff import SOLVERS, Sampler, Schedule, rng, runners
from gaussian_model import GaussianDenoiser
from reference_loop import plain_loop

SCHEDULE = Schedule.linear()


class Transformed(torch.nn.Module):
    """The Gaussian denoiser with `transform(out, t)` applied to its output."""

    def __init__(self, transform):
        super().__init__()
        self.inner, self.transform = GaussianDenoiser(SCHEDULE), transform

    def forward(self, x, t):
        return self.transform(self.inner(x, t), t)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("cfg", [False, True])
def test_static_buffer_loop_equals_a_plain_loop(solver, cfg):
    model = GaussianDenoiser(SCHEDULE)
    sampler = Sampler(model, SCHEDULE, solver=solver, steps=7, graph="auto")  # eager on the CPU
    seeds, shape = [3, 1, 4], (2, 5)
    kw = {}
    if cfg:
        kw = dict(cond={"class_labels": torch.tensor([1.0, 0.0, 2.0])},
                  uncond={"class_labels": torch.full((3,), -1.0)}, guidance_scale=2.5)
    ours = sampler.sample(shape=(3, *shape), seeds=seeds, **kw)
    want = plain_loop(model, sampler.table, seeds, shape, kw.get("cond"), kw.get("uncond"), kw.get("guidance_scale"))
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    # a second run reuses the static buffers and gives the same answer
    torch.testing.assert_close(sampler.sample(shape=(3, *shape), seeds=seeds, **kw), ours, rtol=0, atol=0)


def test_runner_cache_is_bounded_lru():
    sampler = Sampler(GaussianDenoiser(SCHEDULE), SCHEDULE, steps=3, max_graphs=2)
    for b in (1, 2, 3, 2):
        sampler.sample(shape=(b, 4), seeds=range(b))
    assert len(sampler._runners) == 2
    assert [k[1] for k in sampler._runners] == [3, 2]  # batch 1 was evicted, 2 is most recent
    sampler.clear_graphs()
    assert len(sampler._runners) == 0



class TinyConvDenoiser(torch.nn.Module):
    """Two convolutions and a timestep factor: a conv net torch.compile turns around in seconds."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)
        for p in self.parameters():
            p.data = 0.2 * torch.randn(p.shape, generator=gen)

    def forward(self, x, t, **kwargs):
        return self.b(torch.nn.functional.silu(self.a(x)) * (t / 1000).reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("device, graph", [("cpu", False), pytest.param("cuda", True, marks=pytest.mark.cuda)])
def test_compile_true_samples_like_eager(device, graph, monkeypatch):
    """compile=True runs the loop over torch.compile(a channels_last copy of a conv net): the
    samples equal eager ones up to the compiler's reordering of float sums.

    TF32 off: cuDNN convolves in TF32 on sm_80+ by default (10-bit mantissa, ~5e-4 relative per
    product), and channels_last picks other algorithms than NCHW, so the two would differ by
    TF32's rounding, not the compiler's; this test is about the compiler."""
    if device == "cuda":  # (matmul TF32 is off by default; the net has no matmul anyway)
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = TinyConvDenoiser().to(device).eval().requires_grad_(False)
    weight, weight_ptr = model.a.weight, model.a.weight.data_ptr()
    args = dict(solver="dpmpp_2m", steps=6, device=device)
    want = Sampler(model, SCHEDULE, graph=False, **args).sample(shape=(3, 3, 8, 8), seeds=[0, 1, 2])
    compiled = Sampler(model, SCHEDULE, graph=graph, compile=True, **args)
    got = compiled.sample(shape=(3, 3, 8, 8), seeds=[0, 1, 2])
    assert compiled._compiled_model is not None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled.sample(shape=(3, 3, 8, 8), seeds=[0, 1, 2]), got, rtol=0, atol=0)
    # the model passed in is untouched (a channels_last copy was compiled): graphs captured
    # over it elsewhere still read live weights, at the same addresses
    assert weight.is_contiguous() and model.a.weight.data_ptr() == weight_ptr

# ---------------------------------------------------------------- CUDA only ----------
@pytest.mark.cuda
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_graph_equals_eager_on_cuda(solver, backend):
    model = GaussianDenoiser(SCHEDULE).cuda()
    kw = dict(cond={"class_labels": torch.tensor([1.0, 0.0, 2.0], device="cuda")},
              uncond={"class_labels": torch.full((3,), -1.0, device="cuda")}, guidance_scale=2.5)
    eager = Sampler(model, SCHEDULE, solver=solver, steps=8, backend=backend, graph=False, device="cuda")
    graph = Sampler(model, SCHEDULE, solver=solver, steps=8, backend=backend, graph=True, device="cuda")
    want = eager.sample(shape=(3, 4, 8, 8), seeds=[0, 1, 2], **kw)
    first = graph.sample(shape=(3, 4, 8, 8), seeds=[0, 1, 2], **kw)  # warm-up + capture
    replay = graph.sample(shape=(3, 4, 8, 8), seeds=[0, 1, 2], **kw)
    assert graph.num_cached_graphs == 1
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replay, want, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_new_guidance_scale_and_seeds_replay_without_recapture():
    model = GaussianDenoiser(SCHEDULE).cuda()
    cond = {"class_labels": torch.tensor([1.0, 2.0], device="cuda")}
    uncond = {"class_labels": torch.zeros(2, device="cuda")}
    graph = Sampler(model, SCHEDULE, solver="dpmpp_2m_sde", steps=6, graph=True, device="cuda")
    eager = Sampler(model, SCHEDULE, solver="dpmpp_2m_sde", steps=6, graph=False, device="cuda")
    graph.sample(shape=(2, 16), seeds=[0, 1], cond=cond, uncond=uncond, guidance_scale=2.0)
    runner = next(iter(graph._runners.values()))
    captured = runner.graph
    for w, seeds in ((5.0, [7, 8]), (0.0, [0, 3]), (torch.tensor([2.0, 9.0]), [5, 6]), (torch.ones(2), [1, 2])):
        got = graph.sample(shape=(2, 16), seeds=seeds, cond=cond, uncond=uncond, guidance_scale=w)
        want = eager.sample(shape=(2, 16), seeds=seeds, cond=cond, uncond=uncond, guidance_scale=w)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert runner.graph is captured and graph.num_cached_graphs == 1
    # a number scale of exactly 1 calls the model on the conditional half only: its own graph
    got = graph.sample(shape=(2, 16), seeds=[4, 5], cond=cond, uncond=uncond, guidance_scale=1.0)
    want = eager.sample(shape=(2, 16), seeds=[4, 5], cond=cond, uncond=uncond, guidance_scale=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graph.num_cached_graphs == 2


@pytest.mark.cuda
def test_graph_cache_bound_holds_on_cuda():
    model = GaussianDenoiser(SCHEDULE).cuda()
    sampler = Sampler(model, SCHEDULE, steps=4, graph=True, device="cuda", max_graphs=2)
    for b in (1, 2, 3, 4):
        sampler.sample(shape=(b, 8), seeds=range(b))
    assert sampler.num_cached_graphs == 2
    sampler.clear_graphs()
    assert sampler.num_cached_graphs == 0


@pytest.mark.cuda
def test_nonfinite_check_inside_the_graph_reports_the_step():
    nan_late = Transformed(lambda out, t: torch.where(t.reshape(-1, 1) < 300, out * float("nan"), out))  # no host branch
    sampler = Sampler(nan_late.cuda(), SCHEDULE, steps=10, graph=True, device="cuda")
    for _ in range(2):  # capture, then replay
        with pytest.raises(FloatingPointError, match="non-finite model output at step"):
            sampler.sample(shape=(2, 8), seeds=[0, 1])


def test_compile_model_copies_only_what_it_must(monkeypatch):
    """A conv net already in channels_last is compiled as it is (no second set of weights); one
    that cannot be copied is compiled as it is, with a warning naming why."""
    from fastdiff import runners

    compiled_from = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compiled_from.append(m) or m)
    fresh = TinyConvDenoiser()
    runners.compile_model(fresh)
    assert compiled_from[-1] is not fresh and compiled_from[-1].a.weight.is_contiguous(
        memory_format=torch.channels_last)
    ready = TinyConvDenoiser().to(memory_format=torch.channels_last)
    runners.compile_model(ready)
    assert compiled_from[-1] is ready

    class Uncopyable(TinyConvDenoiser):
        def __deepcopy__(self, memo):
            raise RuntimeError("hooked")

    odd = Uncopyable()
    with pytest.warns(UserWarning, match="could not be copied \\(RuntimeError: hooked\\)"):
        runners.compile_model(odd)
    assert compiled_from[-1] is odd


def _failing_capture(calls):
    """A capture_graph whose warm-up runs and whose capture then fails, as a host read does."""
    def capture_graph(body, warmup=None, between=None):
        calls.append(body)
        (warmup or body)()
        between()
        raise RuntimeError("operation not permitted when stream is capturing")
    return capture_graph


def test_auto_falls_back_to_eager_when_capture_fails(monkeypatch):
    """graph='auto': a failed capture warns once with the reason, and this call and every later
    one give the eager loop's answer; graph=True's runner re-raises instead."""
    model = GaussianDenoiser(SCHEDULE)
    sampler = Sampler(model, SCHEDULE, solver="dpmpp_2m_sde", steps=4)  # CPU: an eager runner to borrow from
    want = sampler.sample(shape=(2, 8), seeds=[3, 4])
    eager = next(iter(sampler._runners.values()))
    calls = []
    monkeypatch.setattr(runners, "capture_graph", _failing_capture(calls))
    runner = runners.GraphRunner(eager.loop, eager.table, on_capture_error=sampler._capture_failed)
    seeds = torch.tensor([3, 4])
    args = (sampler.init_noise_sigma * rng.randn(seeds, 0, rng.STREAM_INIT, (8,)), seeds, None, {})
    with pytest.warns(RuntimeWarning, match=r"graph='auto'.*could not be captured.*\(RuntimeError: operation not "
                                            r"permitted when stream is capturing\); running it eagerly"):
        first = runner.run(*args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning only
        second = runner.run(*args)
    assert len(calls) == 1 and runner.graph is None and runner.timings == {}
    torch.testing.assert_close(first, want, rtol=0, atol=0)
    torch.testing.assert_close(second, want, rtol=0, atol=0)
    strict = runners.GraphRunner(eager.loop, eager.table, on_capture_error=None)  # graph=True
    with pytest.raises(RuntimeError, match="stream is capturing"):
        strict.run(*args)


@pytest.mark.cuda
def test_auto_runs_a_host_reading_model_eagerly_on_cuda():
    model = Transformed(lambda out, t: out * 0.5 if out.abs().max().item() > 1e6 else out).cuda()  # a host read
    want = Sampler(model, SCHEDULE, steps=4, graph=False, device="cuda").sample(shape=(2, 8), seeds=[0, 1])
    auto = Sampler(model, SCHEDULE, steps=4, device="cuda")
    with pytest.warns(RuntimeWarning, match="could not be captured"):
        got = auto.sample(shape=(2, 8), seeds=[0, 1])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = auto.sample(shape=(3, 8), seeds=[0, 1, 2])  # a new batch shape: eager without retrying
    torch.testing.assert_close(again[:2], want, rtol=0, atol=0)
    assert auto.num_cached_graphs == 0
    with pytest.raises(RuntimeError):
        Sampler(model, SCHEDULE, steps=4, graph=True, device="cuda").sample(shape=(2, 8), seeds=[0, 1])


@pytest.mark.cuda
def test_timings_report_the_newest_capture():
    sampler = Sampler(GaussianDenoiser(SCHEDULE).cuda(), SCHEDULE, steps=4, device="cuda")
    assert sampler.timings == {}
    sampler.sample(shape=(2, 8), seeds=[0, 1])
    assert set(sampler.timings) == {"warmup_s", "capture_s"} and all(v > 0 for v in sampler.timings.values())
