"""Guidance over time: a guidance interval (Kynkaenniemi et al. 2024) and per-row schedules.

Inside the interval a row's weight is f(sigma) * s_b and the model sees [uncond; cond] (2B
rows); outside it the weight is 1 and the model sees the conditional half only (B rows).
Checked against a plain per-row loop (tests/reference_loop.py) that guides only where told,
with a spy model that records every call's batch size, and the fused kernel (Triton's
interpreter here) against the torch executor.
"""
import math

import pytest
import torch

from fastdiff import Sampler, Schedule
from gaussian_model import GaussianDenoiser
from reference_loop import plain_loop

SCHEDULE = Schedule.linear()
B, SHAPE = 3, (2, 5)
COND = {"class_labels": torch.linspace(-1, 1, B)}
UNCOND = {"class_labels": torch.zeros(B)}
INTERVAL = (0.5, 5.0)  # inside for some middle rows of an 8-step grid, outside at both ends


class Spy(torch.nn.Module):
    """The Gaussian denoiser, recording the batch size of every call."""

    def __init__(self, prediction="epsilon"):
        super().__init__()
        self.model, self.sizes = GaussianDenoiser(SCHEDULE, prediction=prediction), []

    def forward(self, x, t, **kw):
        self.sizes.append(x.shape[0])
        return self.model(x, t, **kw)


def sampler(solver="dpmpp_2m", **kw):
    spy = Spy()
    return Sampler(spy, SCHEDULE, solver=solver, steps=8, **kw), spy


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def inside(s, interval=INTERVAL):
    return interval[0] <= s <= interval[1]


@pytest.mark.parametrize("solver,corrector", [("dpmpp_2m", None), ("heun", None), ("ddim", "langevin")])
def test_model_sees_2b_inside_the_interval_and_b_outside(solver, corrector):
    sp, spy = sampler(solver, guidance_scale=3.0, guidance_interval=INTERVAL, corrector=corrector)
    sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, uncond=UNCOND)
    sigma = sp.table.sigma.tolist()
    want = []
    for r, s in enumerate(sigma):
        want.append(2 * B if inside(s) else B)
        if corrector and r + 1 < len(sigma):  # the corrector's sub-steps call the model at row r + 1's level
            want.append(2 * B if inside(sigma[r + 1]) else B)
    assert spy.sizes == want
    assert B in want and 2 * B in want  # the interval splits this grid


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "ddpm"])
def test_interval_equals_a_loop_that_guides_only_inside(solver):
    sp, spy = sampler(solver, guidance_scale=3.0, guidance_interval=INTERVAL)
    got = sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, uncond=UNCOND)
    w = [3.0 if inside(s) else None for s in sp.table.sigma.tolist()]
    want = plain_loop(spy.model, sp.table, list(range(B)), SHAPE, COND, UNCOND, w)
    assert rel_err(got, want) < 1e-5
    full = plain_loop(spy.model, sp.table, list(range(B)), SHAPE, COND, UNCOND, 3.0)
    assert rel_err(got, full) > 1e-3  # the interval changed the result: the check can fail


def test_nested_conditioning_is_halved_too():
    """Conditioning nested in dicts/lists: an unguided row's call gets every tensor's cond half."""
    spy = Spy()

    def nested(x, t, extra):
        assert extra["labels"][0].shape[0] == x.shape[0]
        return spy(x, t, class_labels=extra["labels"][0])

    sp = Sampler(nested, SCHEDULE, solver="dpmpp_2m", steps=8, guidance_scale=3.0, guidance_interval=INTERVAL)
    got = sp.sample(shape=(B, *SHAPE), seeds=range(B), cond={"extra": {"labels": [COND["class_labels"]]}},
                    uncond={"extra": {"labels": [UNCOND["class_labels"]]}})
    flat, _ = sampler(guidance_scale=3.0, guidance_interval=INTERVAL)
    assert torch.equal(got, flat.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, uncond=UNCOND))
    assert B in spy.sizes and 2 * B in spy.sizes


def ramp(sigma):
    return 1.0 + 2.0 * math.exp(-sigma / 4)


def test_schedule_times_per_sample_scales_equals_a_per_row_loop():
    sp, spy = sampler(guidance_scale=ramp, guidance_interval=(0.0, 20.0))
    scales = torch.tensor([1.0, 1.5, 2.5])
    got = sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, uncond=UNCOND, guidance_scale=scales)
    sigma = sp.table.sigma.tolist()
    w = [ramp(s) * scales if s <= 20.0 else None for s in sigma]
    want = plain_loop(spy.model, sp.table, list(range(B)), SHAPE, COND, UNCOND, w)
    assert rel_err(got, want) < 1e-5
    # a [B] tensor scale is a device value: its rows stay 2B inside the interval
    assert spy.sizes == [2 * B if s <= 20.0 else B for s in sigma]


def test_rows_whose_weight_is_exactly_one_skip_the_unconditional_half():
    def steps_then_off(sigma):  # guidance 4 at high noise, then exactly 1 / 2 (times the scale 2: 1)
        return 2.0 if sigma > 2.0 else 0.5

    sp, spy = sampler(guidance_scale=steps_then_off)
    got = sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, uncond=UNCOND, guidance_scale=2.0)
    sigma = sp.table.sigma.tolist()
    assert spy.sizes == [2 * B if s > 2.0 else B for s in sigma]
    want = plain_loop(spy.model, sp.table, list(range(B)), SHAPE, COND, UNCOND,
                      [4.0 if s > 2.0 else None for s in sigma])
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("solver", ["dpmpp_2m", "heun", "ddpm"])
def test_fused_kernel_equals_torch_with_an_interval_and_a_schedule(solver, kernel_device):
    cond = {k: v.to(kernel_device) for k, v in COND.items()}
    uncond = {k: v.to(kernel_device) for k, v in UNCOND.items()}
    outs = []
    for backend in ("triton", "torch"):
        sp = Sampler(GaussianDenoiser(SCHEDULE).to(kernel_device), SCHEDULE, solver=solver, steps=6,
                     guidance_scale=ramp, guidance_interval=(0.3, 8.0), backend=backend, device=kernel_device)
        outs.append(sp.sample(shape=(B, 3, 7), seeds=range(B), cond=cond, uncond=uncond,
                              guidance_scale=torch.tensor([1.0, 2.0, 0.5], device=kernel_device)))
    assert rel_err(*outs) < 1e-5


@pytest.mark.parametrize("interval,match", [
    ((5.0, 1.0), "guidance_interval"), ((-1.0, 2.0), "guidance_interval"), ((math.nan, 2.0), "guidance_interval"),
    ((1.0, 2.0, 3.0), "guidance_interval"), ("0.5,5", "guidance_interval"), ((True, 2.0), "guidance_interval"),
])
def test_bad_intervals_are_refused_by_name(interval, match):
    with pytest.raises(ValueError, match=match):
        sampler(guidance_scale=3.0, guidance_interval=interval)
    sp, _ = sampler(guidance_scale=3.0)
    with pytest.raises(ValueError, match=match):
        sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, uncond=UNCOND, guidance_interval=interval)


def test_bad_schedules_and_intervals_without_guidance_are_refused():
    with pytest.raises(ValueError, match="guidance_scale"):
        sampler(guidance_scale="3.0")  # neither a number, a tensor nor a callable
    sp, _ = sampler(guidance_scale=lambda s: math.nan)
    with pytest.raises(ValueError, match=r"guidance_scale\(.*nan"):
        sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, uncond=UNCOND)
    sp, _ = sampler(guidance_scale=lambda s: "high")
    with pytest.raises(ValueError, match="guidance schedule must return a finite number"):
        sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, uncond=UNCOND)
    sp, _ = sampler(guidance_scale=ramp)
    with pytest.raises(ValueError, match=f"guidance_scale must be a number or have {B} entries"):
        sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, uncond=UNCOND, guidance_scale=torch.ones(B + 1))
    sp, spy = sampler(guidance_interval=INTERVAL)  # the Sampler's interval applies to guided calls only
    sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND)
    assert spy.sizes == [B] * sp.table.rows
    with pytest.raises(ValueError, match="guidance_interval needs classifier-free guidance"):
        sp.sample(shape=(B, *SHAPE), seeds=range(B), cond=COND, guidance_interval=INTERVAL)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_one_graph_holds_both_batch_shapes_on_cuda(backend):
    """The captured loop (2B rows inside the interval, B outside) equals the eager loop, and
    replays for new seeds and scales without a new capture."""
    cond = {k: v.cuda() for k, v in COND.items()}
    uncond = {k: v.cuda() for k, v in UNCOND.items()}
    kw = dict(solver="heun", steps=8, guidance_scale=ramp, guidance_interval=INTERVAL, backend=backend, device="cuda")
    eager = Sampler(GaussianDenoiser(SCHEDULE).cuda(), SCHEDULE, graph=False, **kw)
    graph = Sampler(GaussianDenoiser(SCHEDULE).cuda(), SCHEDULE, graph=True, **kw)
    for seeds, scale in (([0, 1, 2], 2.0), ([5, 6, 7], 3.0)):
        want = eager.sample(shape=(B, 4, 8, 8), seeds=seeds, cond=cond, uncond=uncond, guidance_scale=scale)
        got = graph.sample(shape=(B, 4, 8, 8), seeds=seeds, cond=cond, uncond=uncond, guidance_scale=scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert graph.num_cached_graphs == 1


# ---- the command line: fastdiff sample / eval --guidance-interval ---------------------------
def run_cli(capsys, *argv):
    from fastdiff.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_sample_with_an_interval_counts_its_model_rows(tmp_path, capsys):
    from fastdiff.models.pretrained import load_pretrained

    code, out, err = run_cli(capsys, "sample", "--steps", 6, "--classes", "1,2", "--per-class", 1,
                             "--guidance-interval", "0.28,5.42", "--out", tmp_path / "g.png", "--no-progress")
    assert code == 0, err
    from fastdiff.sample_cmd import DEFAULT_SOLVER

    loaded = load_pretrained("digits")
    options = loaded.sampler_options(DEFAULT_SOLVER)
    sigma = Sampler(loaded.model, loaded.schedule, solver=DEFAULT_SOLVER, steps=6, **options).table.sigma.tolist()
    rows = sum(2 if inside(s, (0.28, 5.42)) else 1 for s in sigma)
    assert 6 < rows < 12 and f"{rows} rows per sample" in out and "for sigma in [0.28, 5.42]" in out


@pytest.mark.parametrize("argv, fragment", [
    (["sample", "--guidance-interval", "5,1"], "--guidance-interval '5,1': guidance_interval must be"),
    (["sample", "--guidance-interval", "0.3"], "--guidance-interval must be LO,HI"),
    (["sample", "--guidance-interval", "0.3,5", "--guidance-scale", "1"], "--guidance-interval needs guidance"),
    (["eval", "--guidance-interval=-1,5"], "guidance_interval must be"),
    (["eval", "--guidance-interval", "0.3,5", "--guidance-scale", "1"], "--guidance-interval needs guidance"),
])
def test_cli_refuses_bad_intervals(capsys, argv, fragment):
    code, _, err = run_cli(capsys, *argv, "--no-progress")
    assert code == 2 and fragment in err


def test_cli_eval_adds_a_row_per_interval(tmp_path, capsys):
    out = tmp_path / "q.md"
    code, stdout, err = run_cli(capsys, "eval", "--solvers", "dpmpp_2m", "--nfes", 3, "--num-samples", 10,
                                "--batch", 10, "--no-ddpm-1000", "--guidance-interval", "0.5,20",
                                "--out", out, "--no-progress")
    assert code == 0, err
    text = out.read_text()
    assert "| dpmpp_2m | 3 | 3 | 3 | 10 |" in text  # full guidance: 6 model rows per sample
    assert "| dpmpp_2m, guided for sigma in [0.5, 20] | 3 | 3 | 3 | 10 |" in text
    rows = {line.split("|")[1].strip(): int(line.split("|")[-2]) for line in text.splitlines()
            if line.startswith("| dpmpp_2m") and line.count("|") == 10}  # the every-cell table
    assert rows["dpmpp_2m"] == 6 and 3 <= rows["dpmpp_2m, guided for sigma in [0.5, 20]"] < 6
