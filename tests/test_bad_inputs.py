"""Bad input, area by area (issue 19): every case asserts the exception's exact type and that
its message names the parameter; a non-finite value is reported with what became non-finite
and where; and hypothesis corrupts one argument at a time of a valid call."""
import io
import math
import re
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastdiff
from fastdiff import Sampler, Schedule, add_noise, make_grid, runners
from gaussian_model import GaussianDenoiser

S = Schedule.linear()
NAN, INF = float("nan"), float("inf")
SHAPE = (2, 3)
HAS_CUDA = torch.cuda.is_available()


def model(prediction="epsilon"):
    return GaussianDenoiser(S, prediction=prediction)


def log_p(x, t, **kw):
    """A classifier's log p(y | x_t): a Gaussian around 1."""
    return -0.5 * ((x - 1) ** 2).flatten(1).sum(1)


def names(message: str, param: str) -> bool:
    """`param` appears in `message` as a name of its own (not inside a longer identifier)."""
    return re.search(rf"(?<![\w.]){re.escape(param)}(?!\w)", message) is not None


def assert_rejects(exc, param, call):
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    assert names(str(info.value), param), f"{param!r} not named in: {info.value}"


def sampler(**kw):
    return Sampler(**{"model": model(), "schedule": S, "steps": 4, **kw})


# ---- Sampler construction -----------------------------------------------------------------
CONSTRUCTION = [
    (dict(model=None), "model"),
    (dict(schedule="linear"), "schedule"),
    pytest.param(dict(device="cuda"), "device", marks=pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")),
    (dict(device="cuda:99"), "device"),
    (dict(device="gpu"), "device"),
    (dict(device="mps"), "device"),
    (dict(dtype=torch.int32), "dtype"),
    (dict(dtype="float16"), "dtype"),
    (dict(final_alpha_cumprod=2), "final_alpha_cumprod"),
    (dict(final_alpha_cumprod=0.0), "final_alpha_cumprod"),
    (dict(final_alpha_cumprod=NAN), "final_alpha_cumprod"),
    (dict(sigmas="karras", rho=0), "rho"),
    (dict(sigmas="karras", rho=NAN), "rho"),
    (dict(sigmas="karras", rho="7"), "rho"),
    (dict(timesteps=[NAN, 3]), "timesteps"),
    (dict(timesteps=[3, NAN]), "timesteps"),
    (dict(timesteps=[INF, 3]), "timesteps"),
    (dict(classifier=log_p, classifier_scale=NAN), "classifier_scale"),
    (dict(classifier=log_p, classifier_scale="1"), "classifier_scale"),
    (dict(classifier="log_p"), "classifier"),
    (dict(guidance_scale=NAN), "guidance_scale"),
    (dict(guidance_rescale="0.5"), "guidance_rescale"),
    (dict(guidance_rescale=1.5), "guidance_rescale"),
    (dict(solver="ddim", eta=INF), "eta"),
    (dict(solver="ddim", eta="0"), "eta"),
    (dict(clip_sample=True, clip_range=NAN), "clip_range"),
    (dict(thresholding=True, dynamic_thresholding_ratio="0.9"), "dynamic_thresholding_ratio"),
    (dict(thresholding=True, sample_max_value=0.5), "sample_max_value"),
    (dict(corrector="langevin", snr="0.1"), "snr"),
    (dict(steps=2.5), "steps"),
    (dict(max_graphs=0), "max_graphs"),
]


@pytest.mark.parametrize("kwargs, param", CONSTRUCTION)
def test_sampler_construction_rejects_naming_the_parameter(kwargs, param):
    assert_rejects(ValueError, param, lambda: sampler(**kwargs))


# ---- sample() inputs ----------------------------------------------------------------------
def _with(value, index=4, dtype=torch.float32):
    x = torch.randn(SHAPE).to(dtype)
    x.view(-1)[index] = value
    return x


OK_INIT = torch.zeros(SHAPE)
SAMPLE_INPUTS = [
    (dict(noise=_with(NAN)), "noise"),
    (dict(noise=_with(-INF, 0)), "noise"),
    (dict(noise=torch.ones(SHAPE, dtype=torch.int64)), "noise"),
    (dict(noise=np.zeros(SHAPE, dtype=np.float32)), "noise"),
    (dict(init=_with(NAN), strength=0.5), "init"),
    (dict(init=_with(INF, 5), strength=0.5), "init"),
    (dict(init=OK_INIT, strength="0.5"), "strength"),
    (dict(init=OK_INIT, strength=NAN), "strength"),
    (dict(init=OK_INIT, strength=0), "strength"),
    (dict(strength=0.5), "strength"),
    (dict(progress="yes"), "progress"),
    (dict(progress=1), "progress"),
    (dict(seeds=[0, -1]), "seeds"),
    (dict(shape=(2, 0), seeds=None), "shape"),
    (dict(guidance_scale=NAN, cond={"class_labels": torch.zeros(2)}, uncond={"class_labels": torch.ones(2)}),
     "guidance_scale"),
    (dict(cond="class_labels"), "cond"),
    (dict(cond={"class_labels": torch.zeros(3)}), "cond"),
]


@pytest.mark.parametrize("kwargs, param", SAMPLE_INPUTS)
def test_sample_inputs_are_rejected_naming_the_parameter(kwargs, param):
    call = {"shape": SHAPE, "seeds": [0, 1]} if "noise" not in kwargs else {}
    call.update(kwargs)
    assert_rejects(ValueError, param, lambda: sampler().sample(**call))


# ---- what the model returns ---------------------------------------------------------------
def _inner(x, t, **kw):
    return GaussianDenoiser(S)(x, t)


MODEL_OUTPUTS = [
    (lambda x, t: torch.tensor(0.1), ValueError, r"model returned shape \(\) for an input x of shape \(2, 3\)"),
    (lambda x, t: _inner(x, t)[:1], ValueError, r"model returned shape \(1, 3\) for an input x of shape \(2, 3\)"),
    (lambda x, t: _inner(x, t)[:, :2], ValueError, r"model returned shape \(2, 2\)"),
    (lambda x, t: _inner(x, t)[None], ValueError, r"model returned shape \(1, 2, 3\)"),
    (lambda x, t: _inner(x, t).long(), TypeError, "model returned a torch.int64 tensor"),
    (lambda x, t: _inner(x, t) > 0, TypeError, "model returned a torch.bool tensor"),
    (lambda x, t: None, TypeError, "model returned NoneType"),
    (lambda x, t: {"sample": _inner(x, t)}, TypeError, "model returned dict"),
    (lambda x, t: _inner(x, t).numpy(), TypeError, "model returned ndarray"),
]


@pytest.mark.parametrize("fn, exc, match", MODEL_OUTPUTS)
def test_a_model_output_that_is_not_shaped_like_its_input_is_an_error(fn, exc, match):
    with pytest.raises(exc, match=match):  # never broadcast, cast or unwrapped by guesswork
        Sampler(fn, S, steps=3).sample(shape=SHAPE, seeds=[0, 1])


@pytest.mark.parametrize("use", ["invert", "elbo", "log_likelihood"])
def test_inversion_and_likelihoods_check_the_model_output_too(use):
    """The same check (loop.checked_output) wherever the library calls the model."""
    first_row = lambda x, t, **kw: _inner(x, t)[:1]  # noqa: E731
    x0 = torch.randn(SHAPE)
    call = {"invert": lambda: Sampler(first_row, S, steps=10).invert(x0),
            "elbo": lambda: fastdiff.elbo(first_row, S, x0, seeds=[0, 1], timesteps=4, decoder="gaussian"),
            "log_likelihood": lambda: fastdiff.log_likelihood(first_row, S, x0, steps=2, seeds=[0, 1])}[use]
    with pytest.raises(ValueError, match=r"model returned shape \(1, 3\) for an input x of shape"):
        call()


def test_a_guided_model_must_return_both_halves():
    half = Sampler(lambda x, t, class_labels: _inner(x, t)[: x.shape[0] // 2], S, steps=3)
    with pytest.raises(ValueError, match=r"model returned shape \(2, 3\) for an input x of shape \(4, 3\)"):
        half.sample(shape=SHAPE, seeds=[0, 1], cond={"class_labels": torch.zeros(2)},
                    uncond={"class_labels": torch.ones(2)}, guidance_scale=2.0)


# ---- non-finite values: which one, and where ---------------------------------------------
class HugeFrom:
    """The wrapped model's output, replaced by `value` everywhere from call `k` (0-based) on."""

    def __init__(self, k, value, prediction="epsilon"):
        self.k, self.value, self.calls, self.inner = k, value, 0, model(prediction)

    def __call__(self, x, t, **kw):
        out = self.inner(x, t, **kw)
        self.calls += 1
        return torch.full_like(out, self.value) if self.calls > self.k else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("numel", [7, fastdiff.loop.SMALL_PROBE - 1, fastdiff.loop.SMALL_PROBE + 5])
def test_the_probe_is_nonfinite_exactly_when_the_tensor_is(numel, dtype):
    """Both probe forms (float64 sum below SMALL_PROBE elements, aminmax above) against
    isfinite().all(): tensors full of the dtype's largest values stay finite; one NaN, +inf,
    -inf, or +inf with -inf, anywhere, does not."""
    big = torch.finfo(dtype).max
    gen = torch.Generator().manual_seed(numel)
    cases = [torch.full((numel,), big, dtype=dtype), torch.full((numel,), -big, dtype=dtype),
             (torch.rand(numel, generator=gen) * 2 - 1).to(dtype) * big]
    for bad in ([math.nan], [math.inf], [-math.inf], [math.inf, -math.inf]):
        x = torch.randn(numel, generator=gen).to(dtype)
        where = torch.randperm(numel, generator=gen)[:len(bad)]
        x[where] = torch.tensor(bad, dtype=dtype)
        cases.append(x)
    for x in cases:
        probe = torch.zeros((), dtype=torch.float64)
        fastdiff.loop.add_nonfinite_probe(probe, x.view(1, -1))
        assert bool(torch.isfinite(probe)) == bool(torch.isfinite(x).all())


def test_a_finite_but_huge_epsilon_is_reported_where_the_sample_overflows():
    """epsilon = 3e38 (finite) from step 3 on. DDIM is Euler in the VE coordinates x / alpha
    (Karras et al. 2022), so with a constant epsilon x_t / alpha_t = x_3 / alpha_3 + (s_t - s_3)
    eps after step 3 (s the VE sigma): the sample is about alpha_t (s_3 - s_t) 3e38 in size (x_3
    is O(1)), and passes float32's maximum 3.4e38 first after step k computed here. (The torch
    executor folds D into the update, so D = (x - sigma eps) / alpha, which alone would exceed
    the maximum a step earlier, is never formed.)"""
    smp = Sampler(HugeFrom(3, 3e38), S, solver="ddim", steps=10)
    t = smp.timesteps.tolist()  # DDIM's next level is the next listed timestep on this grid
    s = [float(S.sigma_at(v)) for v in t]
    size = [3e38 * (s[3] - s[n]) / math.sqrt(1 + s[n] ** 2) for n in range(4, len(t))]  # after step n - 1
    k = 3 + next(i for i, v in enumerate(size) if v > torch.finfo(torch.float32).max)
    with pytest.raises(FloatingPointError, match=rf"non-finite sample at step {k} \(timestep {t[k]:g}\): "
                                                 "the model outputs were finite"):
        smp.sample(shape=SHAPE, seeds=[0, 1])


@pytest.mark.parametrize("solver", fastdiff.SOLVERS)
def test_a_finite_but_huge_v_is_reported_as_a_sample_overflow(solver):
    smp = Sampler(HugeFrom(1, 3e38, "v_prediction"), S, solver=solver, steps=6, prediction="v_prediction")
    with pytest.raises(FloatingPointError, match="non-finite sample at step [1-5] .*model outputs were finite"):
        smp.sample(shape=SHAPE, seeds=[0, 1])


def test_a_huge_guidance_scale_is_reported_as_a_sample_overflow():
    """A model returning its label: u + w (c - u) with c - u = 1 and w = 1e38 is finite, but
    D = (x - sigma out) / alpha overflows at the first step (sigma / alpha there: ~157)."""
    labels = dict(cond={"class_labels": torch.ones(2)}, uncond={"class_labels": torch.zeros(2)})
    smp = Sampler(lambda x, t, class_labels: torch.zeros_like(x) + class_labels[:, None], S, solver="ddim", steps=4)
    with pytest.raises(FloatingPointError, match=r"non-finite sample at step 0 .*guidance scale"):
        smp.sample(shape=SHAPE, seeds=[0, 1], guidance_scale=1e38, **labels)


@pytest.mark.parametrize("k", [0, 2])
def test_a_classifier_gradient_that_is_not_finite_is_reported_as_such(k):
    calls = []

    def nan_from_k(x, t, **kw):
        calls.append(1)
        return log_p(x, t) * (NAN if len(calls) > k else 1.0)

    smp = sampler(solver="ddim", classifier=nan_from_k)
    tk = smp.timesteps[k].item()
    with pytest.raises(FloatingPointError, match=rf"non-finite classifier gradient at step {k} \(timestep {tk:g}\)"):
        smp.sample(shape=SHAPE, seeds=[0, 1])


def test_nonfinite_noise_and_init_are_named_before_any_model_call():
    m = model()
    smp = Sampler(m, S, steps=4)
    with pytest.raises(ValueError, match="noise holds non-finite values"):
        smp.sample(noise=_with(NAN))
    with pytest.raises(ValueError, match="init holds non-finite values"):
        smp.sample(shape=SHAPE, seeds=[0, 1], init=_with(INF), strength=0.5)
    assert m.calls == 0


# ---- add_noise ----------------------------------------------------------------------------
X0 = torch.randn(SHAPE)
ADD_NOISE = [
    (dict(x0=_with(NAN)), "x0"),
    (dict(x0=torch.ones(SHAPE, dtype=torch.int64)), "x0"),
    (dict(x0=[[0.0, 1.0, 2.0]] * 2), "x0"),
    (dict(t=NAN), "t"),
    (dict(t=torch.tensor([5.0, NAN])), "t"),
    (dict(t=1000), "t"),
    (dict(t=-0.5), "t"),
    (dict(t="5"), "t"),
    (dict(t=torch.tensor([1, 2, 3])), "t"),
    (dict(noise=_with(INF), seeds=None), "noise"),
    (dict(noise=torch.randn(2, 4), seeds=None), "noise"),
    (dict(seeds=None), "seeds"),
    (dict(seeds=[0.5, 1]), "seeds"),
    (dict(schedule="linear"), "schedule"),
    (dict(schedule=Schedule.flow_matching(), t=NAN), "t"),
    (dict(schedule=Schedule.flow_matching(), t=1000.0), "t"),
    (dict(backend="cuda"), "backend"),
]


@pytest.mark.parametrize("kwargs, param", ADD_NOISE)
def test_add_noise_rejects_naming_the_parameter(kwargs, param):
    call = {"x0": X0, "t": 10, "schedule": S, "seeds": [0, 1], **kwargs}
    assert_rejects(ValueError, param, lambda: add_noise(call.pop("x0"), call.pop("t"), call.pop("schedule"), **call))


# ---- schedules and grids ------------------------------------------------------------------
SCHEDULES = [
    (lambda: Schedule.from_betas("abc"), "betas"),
    (lambda: Schedule.from_betas([0.1, NAN]), "betas"),
    (lambda: Schedule.from_betas([]), "betas"),
    (lambda: Schedule.from_betas([0.0, 0.1]), "betas"),
    (lambda: Schedule.from_betas(torch.tensor([0.1j])), "betas"),
    (lambda: Schedule.from_alphas_cumprod("x"), "alphas_cumprod"),
    (lambda: Schedule.linear(num_train_timesteps=-1), "num_train_timesteps"),
    (lambda: Schedule.named("exp"), "schedule"),
    (lambda: Schedule.sigmoid(tau=0), "tau"),
    (lambda: S.input_scaled(0), "b"),
    (lambda: S.sigma_at(NAN), "timesteps"),
    (lambda: make_grid(S, 5, sigmas="karras", rho=0), "rho"),
    (lambda: make_grid(S, 2, timesteps=[NAN, 3]), "timesteps"),
    (lambda: make_grid(S, 2, sigmas=[1.0, 0.5], timesteps=[NAN]), "timesteps"),
    (lambda: make_grid(S, 3, sigmas=[1.0, NAN, 0.0]), "sigmas"),
    (lambda: make_grid(S, 3, sigmas=[1.0, "0.5", 0.0]), "sigmas"),
    (lambda: make_grid(S, 2, timesteps="99, 3"), "timesteps"),
    (lambda: make_grid(Schedule.flow_matching(), 2, timesteps=[NAN, 3.0]), "timesteps"),
    (lambda: make_grid(S, 5, spacing="middle"), "spacing"),
]  # from_diffusers(num_train_timesteps=-1): tests/test_diffusers_equivalence.py (diffusers is slow to import)


@pytest.mark.parametrize("call, param", SCHEDULES)
def test_schedules_and_grids_reject_naming_the_parameter(call, param):
    assert_rejects(ValueError, param, call)


# ---- progress -----------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_defaults_to_a_bar_per_step_on_a_cpu_terminal_only(monkeypatch):
    bars = []

    def recorded(*args):  # the bars actually made (progress_bar returns None when off)
        bar = make_bar(*args)
        if bar is not None:
            bars.append(bar)
        return bar

    make_bar = runners.progress_bar
    monkeypatch.setattr(runners, "progress_bar", recorded)
    smp = sampler(steps=5)
    for tty, progress, shown in [(True, None, True), (True, "auto", True), (True, False, False),
                                 (False, None, False), (False, True, True)]:
        err = Terminal() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        bars.clear()
        smp.sample(shape=SHAPE, seeds=[0, 1], progress=progress)
        assert ("sampling:" in err.getvalue()) == shown == bool(bars), (tty, progress, err.getvalue())
        if shown:
            assert bars[0].total == bars[0].n == 5  # one tick per model evaluation, all done
    monkeypatch.setattr(sys, "stderr", None)  # pythonw, some services: 'auto' is simply off
    bars.clear()
    smp.sample(shape=SHAPE, seeds=[0, 1])
    assert not bars


@pytest.mark.cuda
def test_progress_with_a_captured_graph_counts_calls(monkeypatch):
    bars = []
    make_bar = runners.progress_bar
    monkeypatch.setattr(runners, "progress_bar", lambda *args: bars.append(make_bar(*args)) or bars[-1])
    smp = Sampler(model().cuda(), S, steps=5, device="cuda")
    for _ in range(2):  # the capture, then a replay
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        bars.clear()
        smp.sample(shape=SHAPE, seeds=[0, 1], progress=True)
        assert "sampling (one CUDA graph)" in err.getvalue()
        assert bars[0].total == bars[0].n == 1 and bars[0].unit == "call"
    assert smp.num_cached_graphs == 1
    bars.clear()
    smp.sample(shape=SHAPE, seeds=[0, 1])  # 'auto' on CUDA: no bar
    assert not bars


# ---- one wrong argument at a time ----------------------------------------------------------
def _text(allowed=()):
    return st.text(max_size=6).filter(lambda s: s not in allowed)


def _numbers_outside(lo, hi, lo_ok=False, hi_ok=True):
    """Numbers outside lo..hi (lo excluded unless lo_ok, hi included unless not hi_ok), NaN, text."""
    below = st.floats(max_value=lo, allow_nan=False, exclude_max=lo_ok)
    above = st.floats(min_value=hi, allow_nan=False, exclude_min=hi_ok) if hi < INF else st.nothing()
    return st.one_of(below, above, st.just(NAN), _text())


def _bad_list(bad_values):
    """A list of valid timesteps with one bad value inserted somewhere."""
    return st.tuples(st.lists(st.floats(0, 999), max_size=3), st.sampled_from(bad_values), st.integers(0, 3)).map(
        lambda a: a[0][: a[2]] + [a[1]] + a[0][a[2]:])


def _tensor_with_bad_value():
    return st.tuples(st.sampled_from([NAN, INF, -INF]), st.integers(0, 5)).map(lambda a: _with(a[0], a[1]))


# parameter -> (bad values, other arguments the parameter needs to be read)
CONSTRUCTOR_ARGS = {
    "steps": (st.one_of(st.integers(max_value=0), st.integers(1001, 10**9), st.floats(0.5, 20), _text(),
                        st.booleans()), {}),
    "eta": (_numbers_outside(0, INF, lo_ok=True), {"solver": "ddim"}),
    "final_alpha_cumprod": (st.one_of(_numbers_outside(0, 1), st.none()), {}),
    "rho": (st.one_of(_numbers_outside(0, INF), st.just(INF)), {"sigmas": "karras"}),
    "classifier_scale": (st.one_of(st.sampled_from([NAN, INF, -INF]), _text()), {"classifier": log_p}),
    "guidance_scale": (st.one_of(st.sampled_from([NAN, INF, -INF]), _text()), {}),
    "guidance_rescale": (_numbers_outside(0, 1, lo_ok=True), {}),
    "clip_range": (st.one_of(_numbers_outside(0, INF), st.just(INF)), {"clip_sample": True}),
    "dynamic_thresholding_ratio": (_numbers_outside(0, 1), {"thresholding": True}),
    "sample_max_value": (st.one_of(_numbers_outside(1, INF, lo_ok=True), st.just(INF)), {"thresholding": True}),
    "snr": (st.one_of(_numbers_outside(0, INF), st.just(INF)), {"corrector": "langevin"}),
    "corrector_steps": (st.one_of(st.integers(max_value=0), st.floats(0.5, 3), _text()), {"corrector": "langevin"}),
    "solver": (_text(fastdiff.SOLVERS), {}),
    "prediction": (_text(("epsilon", "sample", "v_prediction")), {}),
    "spacing": (_text(("leading", "trailing", "linspace")), {}),
    "variance": (_text(("fixed_small", "fixed_large")), {"solver": "ddpm"}),
    "backend": (_text(("auto", "torch", "triton")), {}),
    "corrector": (_text(), {}),
    "graph": (st.one_of(_text(("auto",)), st.integers(2, 9)), {}),
    "compile": (st.one_of(_text(), st.integers(2, 9)), {}),
    "max_graphs": (st.one_of(st.integers(max_value=0), st.floats(0.5, 3), _text()), {}),
    "dtype": (st.sampled_from([torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64, "float16", 32]),
              {}),
    "device": (st.sampled_from(["gpu", "tpu", "cuda:99", "mps", 3.5]), {}),
    "timesteps": (_bad_list([NAN, INF, -INF, -1.0, 1000.0]), {}),
}
SAMPLE_ARGS = {
    "noise": (st.one_of(_tensor_with_bad_value(), st.just(torch.ones(SHAPE, dtype=torch.int32))), {}),
    "init": (_tensor_with_bad_value(), {"strength": 0.5}),
    "strength": (st.one_of(_numbers_outside(0, 1), st.none()), {"init": OK_INIT}),
    "seeds": (st.one_of(st.lists(st.integers(-10, -1), min_size=2, max_size=2),
                        st.lists(st.floats(0.5, 9.5), min_size=2, max_size=2),
                        st.lists(st.integers(0, 9), min_size=3, max_size=4)), {}),
    "progress": (st.one_of(_text(("auto",)), st.integers(2, 9)), {}),
}
ADD_NOISE_ARGS = {
    "x0": (st.one_of(_tensor_with_bad_value(), st.just(torch.ones(SHAPE, dtype=torch.int64))), {}),
    "t": (st.one_of(st.floats(max_value=0, exclude_max=True), st.floats(min_value=999, exclude_min=True),
                    st.sampled_from([NAN, INF, "10"]), st.lists(st.floats(0, 999), min_size=3, max_size=3)), {}),
    "noise": (_tensor_with_bad_value(), {"seeds": None}),
    "seeds": (st.one_of(st.none(), st.lists(st.integers(-9, -1), min_size=2, max_size=2)), {}),
    "backend": (_text(("auto", "torch", "triton")), {}),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), where=st.sampled_from(["Sampler", "sample", "add_noise"]))
def test_property_one_wrong_argument_gives_a_value_error_naming_it(data, where):
    """A valid call with one argument replaced by a bad value: a ValueError (not a TypeError,
    IndexError or a deep torch error) whose message names that argument."""
    table = {"Sampler": CONSTRUCTOR_ARGS, "sample": SAMPLE_ARGS, "add_noise": ADD_NOISE_ARGS}[where]
    param = data.draw(st.sampled_from(sorted(table)), label="param")
    bad_values, needs = table[param]
    value = data.draw(bad_values, label="value")
    if param == "device" and HAS_CUDA and value == "cuda:99" and torch.cuda.device_count() > 99:
        return
    if where == "add_noise":
        call = {"x0": X0, "t": 10, "seeds": [0, 1], **needs, param: value}
        assert_rejects(ValueError, param, lambda: add_noise(call.pop("x0"), call.pop("t"), S, **call))
        return
    context = dict(solver=data.draw(st.sampled_from(fastdiff.SOLVERS), label="solver"),
                   steps=data.draw(st.integers(1, 4), label="steps"))
    if where == "Sampler":
        context.update(needs)
        context[param] = value
        assert_rejects(ValueError, param, lambda: sampler(**context).sample(shape=SHAPE, seeds=[0, 1]))
    else:
        call = {"shape": SHAPE, "seeds": [0, 1], **needs, param: value}
        if param == "noise":
            del call["shape"]
        assert_rejects(ValueError, param, lambda: sampler(**context).sample(**call))
