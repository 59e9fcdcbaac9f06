"""The public Sampler API: errors, batch invariance, guidance, thresholding, img2img."""

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff import Sampler, Schedule, make_grid
from fastdiff.solvers import build_table, solver_options
from gaussian_model import GaussianDenoiser

SCHEDULE = Schedule.linear(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)


def model():
    return GaussianDenoiser(SCHEDULE)


def test_the_documented_api_runs():
    x_T = torch.randn(4, 2, 3, 3)
    sampler = fastdiff.Sampler(model(), SCHEDULE, solver="dpmpp_2m", steps=20, prediction="epsilon",
                               spacing="leading", eta=0.0, guidance_scale=None)
    assert sampler.sample(noise=x_T).shape == x_T.shape
    x = sampler.sample(shape=(4, 2, 3, 3), seeds=[1, 2, 3, 4])
    assert x.shape == (4, 2, 3, 3) and x.dtype == torch.float32
    labels, null = torch.tensor([0, 1, 2, 3]), torch.full((4,), 10)
    x = sampler.sample(noise=x_T, cond={"class_labels": labels}, uncond={"class_labels": null}, guidance_scale=4.0)
    assert torch.isfinite(x).all()
    ts = sampler.timesteps
    assert ts.shape == (20,) and bool((ts[1:] < ts[:-1]).all())
    assert ts[0].item() == 950 and ts[-1].item() == 0  # leading spacing, no offset


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="rk4"), re.escape("unknown solver 'rk4'; allowed: " + ", ".join(fastdiff.SOLVERS))),
    (dict(prediction="score"), "unknown prediction 'score'; allowed: epsilon, sample, v_prediction"),
    (dict(spacing="middle"), "unknown spacing 'middle'; allowed: leading, trailing, linspace"),
    (dict(steps=0), r"steps must be an integer in \[1, num_train_timesteps=1000\]"),
    (dict(steps=1001), r"steps must be an integer in \[1, num_train_timesteps=1000\]"),
    (dict(eta=-0.1), re.escape("eta must be a number in [0, inf), got -0.1")),
    (dict(sigmas="polyexponential"), "unknown sigmas"),
    (dict(variance="learned"), "unknown variance 'learned'; allowed: fixed_small, fixed_large"),
    (dict(backend="cuda"), "unknown backend 'cuda'; allowed: auto, torch, triton"),
    (dict(graph=True), "graph=True needs a CUDA device"),
    (dict(corrector="ald"), "unknown corrector"),
    (dict(snr=0.3), "snr=0.3 set the corrector; they need corrector='langevin'"),
    (dict(corrector="langevin", corrector_steps=0), "corrector_steps must be a positive integer, got 0"),
    (dict(compile="max-autotune"), "compile must be True or False, got 'max-autotune'"),
    (dict(solver="plms", warmup="rk4"), "unknown warmup 'rk4' for plms; allowed: pseudo_improved_euler, "
                                        "pseudo_runge_kutta"),
    (dict(solver="plms", warmup="pseudo_runge_kutta", steps=3),
     r"needs steps >= 4 \(img2img: int\(steps \* strength\) >= 4\); got 3"),
    (dict(solver="plms", warmup="pseudo_runge_kutta", sigmas="karras"), "needs a spaced grid"),
    (dict(solver="plms", warmup="pseudo_runge_kutta", timesteps=[900, 700, 500, 300]), "needs a spaced grid"),
])
def test_constructor_errors_name_the_parameter_and_allowed_values(kwargs, match):
    if kwargs.get("graph") is True and torch.cuda.is_available():
        pytest.skip("CUDA is present: graph=True is valid")
    with pytest.raises(ValueError, match=match):
        Sampler(model(), SCHEDULE, **kwargs)


NON_DEFAULT = dict(eta=0.7, variance="fixed_large", solver_order=1, lower_order_final=False,
                   warmup="pseudo_runge_kutta")


@pytest.mark.parametrize("solver", fastdiff.SOLVERS)
def test_an_option_the_solver_does_not_use_is_rejected_naming_both(solver):
    takes = solver_options(solver)
    for name, value in NON_DEFAULT.items():
        if name in takes:
            Sampler(model(), SCHEDULE, solver=solver, steps=4, **{name: value})  # its own option: accepted
        else:
            with pytest.raises(ValueError, match=f"{name}=.*solver {solver!r}"):
                Sampler(model(), SCHEDULE, solver=solver, steps=4, **{name: value})


def test_solver_options_are_the_builders_keywords():
    assert solver_options("ddim") == ("eta", "use_clipped_model_output")
    assert solver_options("dpmpp_2m") == ("solver_order", "lower_order_final")
    with pytest.raises(ValueError, match="solver 'ddpm' does not use the option 'eta'"):
        build_table("ddpm", make_grid(SCHEDULE, 4), "epsilon", eta=0.5)


def test_unknown_schedule_name():
    with pytest.raises(ValueError, match="unknown schedule 'exp'; allowed: cosine, linear, scaled_linear, sigmoid"):
        Schedule.named("exp")


def test_sample_errors():
    sampler = Sampler(model(), SCHEDULE, steps=5)
    with pytest.raises(ValueError, match="guidance_scale needs uncond="):
        sampler.sample(shape=(2, 3), seeds=[0, 1], guidance_scale=3.0)
    with pytest.raises(ValueError, match=r"noise shape \(2, 3\) does not match shape \(2, 4\)"):
        sampler.sample(noise=torch.randn(2, 3), shape=(2, 4))
    with pytest.raises(ValueError, match="len\\(seeds\\) must equal the batch size 2, got 3"):
        sampler.sample(shape=(2, 3), seeds=[0, 1, 2])
    with pytest.raises(ValueError, match="len\\(seeds\\) must equal the batch size 2, got 1"):
        sampler.sample(noise=torch.randn(2, 3), seeds=[0])
    with pytest.raises(ValueError, match="needs noise=x_T or shape"):
        sampler.sample()
    allowed = r"seeds must be integers in \[0, 2\*\*63\), got "
    for bad, shown in (([0, 1.5], "1.5"), ([0, torch.tensor(1.7)], "tensor"), ([0, True], "True"),
                       (torch.tensor([0.0, 1.0]), "a torch.float32 tensor"), ([0, -1], "-1"),
                       (torch.tensor([0, -1]), "-1"), ([0, 2**63], str(2**63))):
        with pytest.raises(ValueError, match=allowed + re.escape(shown)):  # never rounded, never wrapped
            sampler.sample(shape=(2, 3), seeds=bad)
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(sampler.sample(shape=(1, 3), seeds=np.int64(5)),
                               sampler.sample(shape=(1, 3), seeds=[5]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="strength must be a number in \\(0, 1\\]"):
        sampler.sample(shape=(2, 3), seeds=[0, 1], init=torch.zeros(2, 3), strength=1.5)
    with pytest.raises(ValueError, match="batched along dim 0"):
        sampler.sample(shape=(2, 3), seeds=[0, 1], cond={"class_labels": torch.zeros(3)})


class OneValueAt:
    """Sets one element of the k-th call's output (0-based; everywhere=True: all of it) to
    `value`; every other call is clean."""

    def __init__(self, k, value, everywhere=False):
        self.k, self.value, self.everywhere, self.calls = k, value, everywhere, 0
        self.inner = model()

    def __call__(self, x, t, **kw):
        out = self.inner(x, t, **kw)
        self.calls += 1
        if self.calls - 1 == self.k:
            out = torch.full_like(out, self.value) if self.everywhere else out.clone()
            out.view(-1)[5] = self.value
        return out


@pytest.mark.parametrize("solver", fastdiff.SOLVERS)
def test_nonfinite_output_names_step_and_timestep(solver):
    sampler = Sampler(OneValueAt(3, float("nan"), everywhere=True), SCHEDULE, solver=solver, steps=10)
    t3 = sampler.timesteps[3].item()
    with pytest.raises(FloatingPointError, match=f"non-finite model output at step 3 \\(timestep {t3:g}\\)"):
        sampler.sample(shape=(2, 4), seeds=[0, 1])


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_one_nonfinite_element_is_reported_at_its_step(value):
    sampler = Sampler(OneValueAt(4, value), SCHEDULE, solver="dpmpp_2m", steps=10)
    with pytest.raises(FloatingPointError, match="non-finite model output at step 4 "):
        sampler.sample(shape=(3, 4), seeds=[0, 1, 2])


@pytest.mark.parametrize("dtype, huge", [(torch.float32, 3.0e38), (torch.float64, 1.0e308)])
def test_huge_finite_output_is_not_reported(dtype, huge):
    """The dtype's largest values everywhere at the last call: a finite output, so never reported
    as a non-finite one (a plain sum would overflow to inf), while one inf in a float64 output
    still is. 3e38 fits the float32 update at the last step (D = (x - 0.3 * 3e38) / 0.95); 1e308
    does not, and the sample becoming inf is reported as such, at that step."""
    sampler = Sampler(OneValueAt(9, huge, everywhere=True), SCHEDULE, solver="ddim", steps=10, dtype=dtype)
    if dtype == torch.float32:
        assert torch.isfinite(sampler.sample(shape=(3, 64), seeds=[0, 1, 2])).all()
    else:
        with pytest.raises(FloatingPointError, match="non-finite sample at step 9 .*model outputs were finite"):
            sampler.sample(shape=(3, 64), seeds=[0, 1, 2])
        sampler = Sampler(OneValueAt(2, float("inf")), SCHEDULE, solver="ddim", steps=10, dtype=dtype)
        with pytest.raises(FloatingPointError, match="non-finite model output at step 2 "):
            sampler.sample(shape=(3, 64), seeds=[0, 1, 2])


def test_nonfinite_output_of_a_corrector_call_is_reported():
    sampler = Sampler(OneValueAt(3, float("nan")), SCHEDULE, solver="ddim", steps=5, corrector="langevin")
    # calls: row 0, corrector at row 1's level, row 1, corrector at row 2's level (the 4th call)
    with pytest.raises(FloatingPointError, match="non-finite model output at step 2 "):
        sampler.sample(shape=(2, 4), seeds=[0, 1])


@pytest.mark.parametrize("solver", ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "unipc", "heun"])
def test_a_seed_gives_the_same_sample_alone_and_in_any_batch(solver):
    sampler = Sampler(model(), SCHEDULE, solver=solver, steps=8)
    seeds = [11, 5, 2**40 + 3, 7, 0]
    batch = sampler.sample(shape=(5, 3, 4, 4), seeds=seeds)
    for i in (0, 2, 4):
        alone = sampler.sample(shape=(1, 3, 4, 4), seeds=[seeds[i]])
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=0)
    other = sampler.sample(shape=(2, 3, 4, 4), seeds=[seeds[2], 99])
    torch.testing.assert_close(other[0], batch[2], rtol=0, atol=0)


class Guided:
    """The guided output u + w (c - u), computed outside the sampler."""

    def __init__(self, inner, w, null=10):
        self.inner, self.w, self.null = inner, w, null

    def __call__(self, x, t, class_labels):
        u = self.inner(x, t, class_labels=torch.full_like(class_labels, self.null) * 0 - 0.5)
        c = self.inner(x, t, class_labels=class_labels)
        return u + self.w * (c - u)


@pytest.mark.parametrize("solver", fastdiff.SOLVERS)
def test_classifier_free_guidance_combines_the_two_halves(solver):
    w = 3.0
    labels = torch.tensor([0.0, 1.0, -1.0])
    null = torch.full((3,), -0.5)
    ours = Sampler(model(), SCHEDULE, solver=solver, steps=6).sample(
        shape=(3, 8), seeds=[1, 2, 3], cond={"class_labels": labels}, uncond={"class_labels": null},
        guidance_scale=w)
    manual = Sampler(Guided(model(), w), SCHEDULE, solver=solver, steps=6).sample(
        shape=(3, 8), seeds=[1, 2, 3], cond={"class_labels": labels})
    torch.testing.assert_close(ours, manual, rtol=1e-5, atol=1e-5)
    # a per-sample guidance scale: sample 1 alone with its own scale gives the same
    per = Sampler(model(), SCHEDULE, solver=solver, steps=6).sample(
        shape=(3, 8), seeds=[1, 2, 3], cond={"class_labels": labels}, uncond={"class_labels": null},
        guidance_scale=torch.tensor([1.0, w, 7.0]))
    torch.testing.assert_close(per[1], ours[1], rtol=1e-6, atol=1e-6)


def test_rescaled_cfg_follows_lin_et_al():
    w, phi = 5.0, 0.7
    labels, null = torch.tensor([1.0, 2.0]), torch.full((2,), -0.5)

    class Rescaled(Guided):
        def __call__(self, x, t, class_labels):
            c = self.inner(x, t, class_labels=class_labels)
            g = super().__call__(x, t, class_labels)
            dims = tuple(range(1, g.ndim))
            r = g * (c.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True))
            return phi * r + (1 - phi) * g

    kw = dict(shape=(2, 16), seeds=[4, 5])
    ours = Sampler(model(), SCHEDULE, solver="ddim", steps=5, guidance_rescale=phi).sample(
        cond={"class_labels": labels}, uncond={"class_labels": null}, guidance_scale=w, **kw)
    manual = Sampler(Rescaled(model(), w), SCHEDULE, solver="ddim", steps=5).sample(
        cond={"class_labels": labels}, **kw)
    torch.testing.assert_close(ours, manual, rtol=1e-5, atol=1e-5)


def test_classifier_guidance_moves_the_score():
    # log p(y|x_t) = -|x_t - m|^2 / 2: its gradient is (m - x_t); with epsilon prediction the
    # guided model is eps - sigma * scale * grad (Dhariwal & Nichol, Algorithm 2's form)
    m, scale = 2.0, 1.5

    def classifier(x, t, **kw):
        return -0.5 * ((x - m) ** 2).flatten(1).sum(1)

    class Manual:
        def __init__(self):
            self.inner = model()

        def __call__(self, x, t, **kw):
            abar = SCHEDULE.alphas_cumprod_at(t.double()).reshape(-1, 1).float()
            return self.inner(x, t) - (1 - abar).sqrt() * scale * (m - x)

    kw = dict(shape=(3, 4), seeds=[0, 1, 2])
    ours = Sampler(model(), SCHEDULE, solver="ddim", steps=5, classifier=classifier, classifier_scale=scale).sample(**kw)
    manual = Sampler(Manual(), SCHEDULE, solver="ddim", steps=5).sample(**kw)
    torch.testing.assert_close(ours, manual, rtol=1e-4, atol=1e-4)


def test_clip_and_dynamic_thresholding_bound_the_sample():
    wide = GaussianDenoiser(SCHEDULE, mu=0.0, s=3.0)
    kw = dict(shape=(4, 64), seeds=range(4))
    free = Sampler(wide, SCHEDULE, solver="ddim", steps=10).sample(**kw)
    assert free.abs().max() > 2
    clipped = Sampler(wide, SCHEDULE, solver="ddim", steps=10, clip_sample=True, clip_range=1.5).sample(**kw)
    assert clipped.abs().max() <= 1.5 + 1e-5
    dyn = Sampler(wide, SCHEDULE, solver="ddim", steps=10, thresholding=True, dynamic_thresholding_ratio=0.9,
                  sample_max_value=2.0).sample(**kw)
    assert dyn.abs().max() <= 1.0 + 1e-5  # D is divided by its per-sample threshold


def test_img2img_runs_the_last_steps_from_the_noised_init():
    m = model()
    sampler = Sampler(m, SCHEDULE, solver="ddim", steps=20)
    init = torch.full((2, 8), 3.0)
    x = sampler.sample(shape=(2, 8), seeds=[0, 1], init=init, strength=0.25)
    assert m.calls == 5  # int(20 * 0.25) model evaluations
    full = sampler.sample(shape=(2, 8), seeds=[0, 1])
    # a weak strength stays near the init; a full run forgets it
    assert (x - init).abs().mean() < (full - init).abs().mean()


def test_model_output_object_with_sample_attribute():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    inner = model()
    x = Sampler(lambda x, t: Out(inner(x, t)), SCHEDULE, steps=3).sample(shape=(2, 3), seeds=[0, 1])
    y = Sampler(inner, SCHEDULE, steps=3).sample(shape=(2, 3), seeds=[0, 1])
    torch.testing.assert_close(x, y)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    solver=st.sampled_from(list(fastdiff.SOLVERS) + ["bogus"]),
    prediction=st.sampled_from(["epsilon", "sample", "v_prediction", "x0"]),
    spacing=st.sampled_from(["leading", "trailing", "linspace", "log"]),
    steps=st.integers(-2, 1002),
    eta=st.floats(-1, 2, allow_nan=False),
    batch=st.integers(1, 3),
    seeds_len=st.integers(0, 4),
    guidance=st.sampled_from([None, 0.0, 2.5, float("nan")]),
    with_uncond=st.booleans(),
    sigmas=st.sampled_from([None, "karras", "exponential"]),
)
def test_property_any_arguments_give_a_sample_or_a_clear_error(solver, prediction, spacing, steps, eta, batch,
                                                               seeds_len, guidance, with_uncond, sigmas):
    steps = min(steps, 12) if steps <= 1000 else steps  # keep runs short; > 1000 stays invalid
    try:
        sampler = Sampler(GaussianDenoiser(SCHEDULE, prediction=prediction if prediction != "x0" else "sample"),
                          SCHEDULE, solver=solver, steps=steps, prediction=prediction, spacing=spacing, eta=eta,
                          sigmas=sigmas)
        labels = torch.zeros(batch)
        x = sampler.sample(shape=(batch, 2), seeds=list(range(seeds_len)), guidance_scale=guidance,
                           cond={"class_labels": labels}, uncond={"class_labels": labels - 1} if with_uncond else None)
    except ValueError as e:
        # the error names a parameter this draw got wrong (an independent list of what is wrong)
        wrong = {"solver"} if solver == "bogus" else set()
        wrong |= {"prediction"} if prediction == "x0" else set()
        wrong |= {"spacing"} if spacing == "log" else set()
        wrong |= {"steps"} if not 1 <= steps <= 1000 else set()
        wrong |= {"eta"} if eta < 0 or (eta != 0 and solver != "ddim") or eta > 1 else set()
        wrong |= {"seeds"} if seeds_len != batch else set()
        wrong |= {"guidance_scale", "uncond"} if (guidance is None) == with_uncond or guidance != guidance else set()
        named = {p for p in wrong if p in str(e)}
        assert named and len(str(e)) < 300, (str(e), wrong)
        return
    assert x.shape == (batch, 2) and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("solver", fastdiff.SOLVERS)
def test_default_grid_when_none_is_named(solver):
    from fastdiff.solvers import DEFAULT_SIGMAS, STRIDE_PREV

    named = DEFAULT_SIGMAS.get(solver)
    want = make_grid(SCHEDULE, 10, sigmas=named, stride_prev=named is None and solver in STRIDE_PREV)
    got = Sampler(model(), SCHEDULE, solver=solver, steps=10).grid
    torch.testing.assert_close(got.abar, want.abar, rtol=0, atol=0)
    torch.testing.assert_close(got.abar_to, want.abar_to, rtol=0, atol=0)
    # a named grid always wins: spacing alone gives integer timesteps, sigmas alone that sigma grid
    trailing = Sampler(model(), SCHEDULE, solver=solver, steps=10, spacing="trailing")
    assert trailing.timesteps[0].item() == 999 and trailing.grid.t.frac().eq(0).all()
    karras = Sampler(model(), SCHEDULE, solver=solver, steps=10, sigmas="karras").grid
    torch.testing.assert_close(karras.sigma, make_grid(SCHEDULE, 10, sigmas="karras").sigma, rtol=0, atol=0)
