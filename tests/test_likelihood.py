"""fastdiff.elbo against closed forms: Gaussian data N(mu, v^2) and its exact denoiser.

For that data and model every quantity of the bound is a Gaussian integral: the tests
recompute each term independently in float64 (textbook posterior, the KL of two Gaussians,
the discretized Gaussian through math.erf) and the expected bound in closed form.
"""
import math

import pytest
import torch
from gaussian_model import GaussianDenoiser

import fastdiff
from fastdiff import rng
from fastdiff.likelihood import elbo, log_likelihood
from fastdiff.rng import STREAM_DEQUANT, STREAM_ELBO

MU, V = 0.7, 0.5
LN2 = math.log(2)


def schedule(T):  # Ho et al.'s linear betas, rescaled to T steps (Nichol & Dhariwal 2021)
    return fastdiff.Schedule.linear(T, 1e-4 * 1000 / T, min(0.02 * 1000 / T, 0.5))


def data(B, dims, seed=0):
    return MU + V * torch.randn(B, dims, generator=torch.Generator().manual_seed(seed))


def textbook(s):
    """Ho et al. 2020, eqs. 6-7, float64: abar, abar_prev, posterior mean coefficients and variance."""
    b = s.betas
    abar = torch.cumprod(1 - b, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    coef_x0, coef_xt = b * prev.sqrt() / (1 - abar), (1 - prev) * (1 - b).sqrt() / (1 - abar)
    return abar, prev, coef_x0, coef_xt, b * (1 - prev) / (1 - abar)


def exact_x0(x_t, abar):  # E[x0 | x_t] for x0 ~ N(MU, V^2)
    a = math.sqrt(abar)
    return MU + V * V * a * (x_t - a * MU) / (abar * V * V + 1 - abar)


def expected_bound(s, variance):
    """E over x0 ~ data and x_t of each term (nats per dim): [T] (t = 0 the decoder) and the prior."""
    abar, prev, c0, _, var_q = textbook(s)
    b = s.betas
    post = V * V * (1 - abar) / (abar * V * V + 1 - abar)  # Var[x0 | x_t] = E (x0 - D)^2
    var_p = var_q if variance == "fixed_small" else b
    terms = 0.5 * ((var_p / var_q).log() + var_q / var_p - 1) + c0**2 * post / (2 * var_p)
    terms[0] = 0.5 * math.log(2 * math.pi * b[0]) + post[0] / (2 * b[0])  # continuous decoder N(D, beta_0)
    prior = 0.5 * (abar[-1] * (MU * MU + V * V) - abar[-1] - (1 - abar[-1]).log())
    return terms, prior


ENTROPY = 0.5 * math.log(2 * math.pi * math.e * V * V)  # E[-log p(x0)] per dim, nats


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
def test_every_term_is_the_gaussian_kl_in_float64(variance):
    T, B, dims = 40, 3, 10
    s = schedule(T)
    x0 = data(B, dims)
    seeds = [5, 2**40, 17]
    r = elbo(GaussianDenoiser(s), s, x0, seeds=seeds, variance=variance, decoder="gaussian", batch_timesteps=7)
    abar, prev, c0, c1, var_q = textbook(s)
    want = torch.empty(B, T, dtype=torch.float64)
    for t in range(T):
        z = rng.randn(seeds, t, STREAM_ELBO, (dims,)).double()  # the documented draw of x_t
        x_t = abar[t].sqrt() * x0.double() + (1 - abar[t]).sqrt() * z
        D = exact_x0(x_t, float(abar[t]))
        if t == 0:  # -log N(x0; D, beta_0)
            var = float(s.betas[0])
            want[:, 0] = (0.5 * math.log(2 * math.pi * var) + (x0.double() - D) ** 2 / (2 * var)).sum(1)
            continue
        m_q, m_p = c0[t] * x0.double() + c1[t] * x_t, c0[t] * D + c1[t] * x_t
        vq = var_q[t]
        vp = vq if variance == "fixed_small" else s.betas[t]
        want[:, t] = (0.5 * (torch.log(vp / vq) + (vq + (m_q - m_p) ** 2) / vp - 1)).sum(1)
    want /= dims * LN2
    torch.testing.assert_close(r.terms, want, rtol=2e-4, atol=1e-6)
    prior = 0.5 * (abar[-1] * x0.double() ** 2 + (1 - abar[-1]) - 1 - torch.log(1 - abar[-1])).sum(1) / (dims * LN2)
    torch.testing.assert_close(r.prior, prior, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.decoder, want[:, 0])
    torch.testing.assert_close(r.diffusion, want[:, 1:].sum(1))
    torch.testing.assert_close(r.bpd, r.prior + r.diffusion + r.decoder)
    torch.testing.assert_close(r.nats, r.bpd * dims * LN2)


def test_discretized_decoder_is_the_gaussian_mass_of_the_bin():
    T, B, dims = 20, 2, 12
    s = schedule(T)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (B, dims), generator=g).double() / 127.5 - 1
    x0[0, :3] = torch.tensor([-1.0, 1.0, 1 / 255])  # both open end bins and one near the middle
    r = elbo(GaussianDenoiser(s), s, x0.float(), seeds=[1, 2], timesteps=None)
    var = float(s.betas[0])
    abar0 = float(s.alphas_cumprod[0])
    z = rng.randn([1, 2], 0, STREAM_ELBO, (dims,)).double()
    D = exact_x0(math.sqrt(abar0) * x0 + math.sqrt(1 - abar0) * z, abar0)
    Phi = lambda u: 0.5 * (1 + math.erf(u / math.sqrt(2)))  # noqa: E731
    want = torch.zeros(B, dtype=torch.float64)
    for b in range(B):
        for e in range(dims):
            x, m, sd = float(x0[b, e]), float(D[b, e]), math.sqrt(var)
            hi = 1.0 if x > 0.999 else Phi((x + 1 / 255 - m) / sd)
            lo = 0.0 if x < -0.999 else Phi((x - 1 / 255 - m) / sd)
            want[b] -= math.log(hi - lo)
    torch.testing.assert_close(r.decoder, want / (dims * LN2), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="decoder='discretized' needs x0"):
        elbo(GaussianDenoiser(s), s, x0.float() + 0.001)


# The gap E[-ELBO] - E[-log p(x0)] of the exact model (bits/dim, from expected_bound): with
# fixed_small the early terms, where the posterior variance is far below the true reverse
# variance, cost most of it; fixed_large is nearly tight for this data.
GAPS = {(100, "fixed_small"): 1.8036, (100, "fixed_large"): 0.0158,
        (1000, "fixed_small"): 0.6584, (1000, "fixed_large"): 0.0016}


@pytest.mark.parametrize("T,variance", list(GAPS))
def test_bound_of_the_exact_model_lies_above_the_entropy_by_the_closed_form_gap(T, variance):
    s = schedule(T)
    terms, prior = expected_bound(s, variance)
    gap = float(terms.sum() + prior - ENTROPY) / LN2
    assert gap == pytest.approx(GAPS[(T, variance)], abs=1e-4)
    B, dims = 6, 64
    r = elbo(GaussianDenoiser(s), s, data(B, dims, seed=T), variance=variance, decoder="gaussian",
             batch_timesteps=250)
    # the library's bound, averaged over 384 data dims and one x_t draw per timestep, against
    # the expectation; the Monte-Carlo error of that mean is ~0.02 bits/dim (spread below)
    mean, err = float(r.bpd.mean()), float(r.bpd.std() / math.sqrt(B))
    expected = gap + ENTROPY / LN2
    assert abs(mean - expected) < 4 * err + 1e-3, (mean, expected, err)
    assert mean > ENTROPY / LN2 or variance == "fixed_large"
    # each timestep's mean against its expectation: the random part of a term is a scaled
    # chi-square of B * dims = 384 degrees of freedom, relative spread sqrt(2/384) = 7%
    want = terms / LN2
    assert bool(((r.terms.mean(0) - want).abs() <= 0.3 * want.abs() + 1e-3).all())


def test_fixed_small_gap_sits_in_the_first_timesteps():
    s = schedule(100)
    x0 = data(4, 64)
    small = elbo(GaussianDenoiser(s), s, x0, variance="fixed_small", decoder="gaussian", batch_timesteps=100)
    large = elbo(GaussianDenoiser(s), s, x0, variance="fixed_large", decoder="gaussian", batch_timesteps=100)
    excess = (small.terms - large.terms).mean(0)  # same draws: the difference is the variance choice
    assert float(excess[1:11].sum()) > 0.7 * float(excess.sum()) > 0


def test_monte_carlo_timesteps_are_unbiased():
    T, B, dims, n = 50, 4, 16, 48
    s = schedule(T)
    x0 = data(B, dims).repeat(n, 1)  # the same 4 images under n different seeds
    seeds = list(range(B * n))
    full = elbo(GaussianDenoiser(s), s, x0, seeds=seeds, decoder="gaussian", batch_timesteps=T)
    mc = elbo(GaussianDenoiser(s), s, x0, seeds=seeds, decoder="gaussian", timesteps=5)
    assert mc.terms is None and mc.timesteps.shape == (B * n, 5)
    assert int(mc.timesteps.min()) >= 0 and int(mc.timesteps.max()) < T
    diff = (mc.bpd - full.bpd).reshape(n, B).mean(1)  # n independent estimates of the mean bias
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(n)
    torch.testing.assert_close(mc.bpd, mc.prior + mc.diffusion + mc.decoder)


def test_several_draws_per_timestep_shrink_the_monte_carlo_spread():
    s, n = schedule(50), 32
    x0 = data(1, 8).repeat(n, 1)  # one sample under n seeds
    one = elbo(GaussianDenoiser(s), s, x0, seeds=range(n), decoder="gaussian", batch_timesteps=50)
    four = elbo(GaussianDenoiser(s), s, x0, seeds=range(n), decoder="gaussian", batch_timesteps=50, draws=4)
    ratio = float(four.bpd.std() / one.bpd.std())
    assert 0.3 < ratio < 0.75, ratio  # 1/sqrt(4) = 0.5
    err = float(one.bpd.std()) / math.sqrt(n)
    assert abs(float(four.bpd.mean() - one.bpd.mean())) < 4 * err
    same = elbo(GaussianDenoiser(s), s, x0[:2], seeds=range(2), decoder="gaussian", draws=1)
    assert torch.equal(same.bpd, one.bpd[:2])  # draws=1 is the default's draw


@pytest.mark.parametrize("timesteps", [None, 6])
def test_each_sample_is_the_same_alone_or_in_any_batch(timesteps):
    s = schedule(30)
    x0 = data(5, 9)
    seeds = [11, 3, 2**50, 8, 4]
    whole = elbo(GaussianDenoiser(s), s, x0, seeds=seeds, decoder="gaussian", timesteps=timesteps, batch_timesteps=4)
    for b in (0, 3):
        alone = elbo(GaussianDenoiser(s), s, x0[b:b + 1], seeds=seeds[b:b + 1], decoder="gaussian",
                     timesteps=timesteps, batch_timesteps=13)
        for name in ("bpd", "prior", "diffusion", "decoder"):
            assert torch.equal(getattr(alone, name)[0], getattr(whole, name)[b]), name


def test_fused_backend_equals_torch(kernel_device):
    s = schedule(12)
    x0 = torch.randint(0, 256, (3, 1, 5, 7), generator=torch.Generator().manual_seed(0)).float() / 127.5 - 1
    model = GaussianDenoiser(s).to(kernel_device)
    kw = dict(seeds=[1, 2, 3], batch_timesteps=5, variance="fixed_large")
    fused = elbo(model, s, x0.to(kernel_device), backend="triton", **kw)
    ref = elbo(model, s, x0.to(kernel_device), backend="torch", **kw)
    torch.testing.assert_close(fused.terms.cpu(), ref.terms.cpu(), rtol=1e-5, atol=1e-6)


def test_validation():
    s = schedule(10)
    m = GaussianDenoiser(s)
    x0 = data(2, 4)
    for kw, msg in [(dict(variance="learned"), "variance"), (dict(decoder="logistic"), "decoder"),
                    (dict(timesteps=0), "timesteps"), (dict(batch_timesteps=0), "batch_timesteps"),
                    (dict(draws=0), "draws"),
                    (dict(prediction="eps"), "prediction"), (dict(seeds=[1]), "seeds"),
                    (dict(decoder_variance=-1.0), "decoder_variance"), (dict(cond={"y": torch.zeros(3)}), "cond")]:
        with pytest.raises(ValueError, match=msg):
            elbo(m, s, x0, **{"decoder": "gaussian", **kw})
    with pytest.raises(FloatingPointError, match="timestep"):
        elbo(lambda x, t: x * float("nan"), s, x0, decoder="gaussian")


# ---- log_likelihood: the probability-flow ODE ----------------------------------------------

def log_density(x):  # log N(x; MU, V^2) summed over dims, float64
    return (-0.5 * ((x.double() - MU) ** 2 / V**2 + math.log(2 * math.pi * V**2))).flatten(1).sum(1)


def test_ode_log_likelihood_converges_to_the_exact_density():
    s = fastdiff.Schedule.linear()
    x0 = data(3, 8).double()
    exact = -log_density(x0)
    errors = [float((log_likelihood(GaussianDenoiser(s), s, x0, steps=n, exact_trace=True).nats - exact).abs().max())
              for n in (10, 20, 40, 80)]
    # Heun: second order, the error falls ~4x per doubling of steps (5.3, 1.3, 0.31, 0.085 nats)
    assert all(b < a / 3 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1
    r = log_likelihood(GaussianDenoiser(s), s, x0.float(), steps=80, exact_trace=True)  # float32 model path
    torch.testing.assert_close(r.nats, exact, rtol=0, atol=0.1)
    torch.testing.assert_close(r.bpd, r.nats / (8 * LN2))
    torch.testing.assert_close(-r.nats, r.log_prior + r.delta)


class TinyConvDenoiser(torch.nn.Module):
    """A random epsilon-network whose Jacobian is neither diagonal nor isotropic."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1, dtype=torch.float64)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) * (1 + t.double().reshape(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(probe):
    s = fastdiff.Schedule.linear()
    model, n = TinyConvDenoiser(), 64
    x0 = data(2, 9).reshape(2, 1, 3, 3).double()
    exact = log_likelihood(model, s, x0, steps=4, exact_trace=True).nats
    runs = torch.stack([log_likelihood(model, s, x0, steps=4, probe=probe, seeds=[k, k + n]).nats
                        for k in range(n)])  # [n, 2]: independent probes per run
    err = runs.std(0) / math.sqrt(n)
    assert bool((err > 0).all())  # the estimate does vary with the probes
    assert bool(((runs.mean(0) - exact).abs() < 4 * err).all()), (runs.mean(0), exact, err)
    many = torch.stack([log_likelihood(model, s, x0, steps=4, probe=probe, probes=16, seeds=[k, k + n]).nats
                        for k in range(8)])
    assert bool((many.std(0) < runs.std(0)).all())  # 16 probes per evaluation: a smaller spread


def test_ode_log_likelihood_dequantized_and_per_sample():
    s = fastdiff.Schedule.linear()
    x0 = ((data(3, 8).clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    seeds = [4, 9, 2**33]
    r = log_likelihood(GaussianDenoiser(s), s, x0.double(), steps=60, exact_trace=True, dequantize=True, seeds=seeds)
    z = rng.randn(seeds, 0, STREAM_DEQUANT, (8,)).double()  # the documented uniform draw u = Phi(z) - 1/2
    x_u = x0.double() + (torch.special.ndtr(z) - 0.5) * (2 / 255)
    torch.testing.assert_close(r.nats, -log_density(x_u), rtol=0, atol=0.2)
    torch.testing.assert_close(r.bpd, (r.nats - 8 * math.log(2 / 255)) / (8 * LN2))
    alone = log_likelihood(GaussianDenoiser(s), s, x0[1:2].double(), steps=60, exact_trace=True, dequantize=True,
                           seeds=seeds[1:2])
    assert torch.equal(alone.nats[0], r.nats[1])
    hutch = log_likelihood(TinyConvDenoiser(), s, x0.reshape(3, 1, 2, 4).double(), steps=3, seeds=seeds)
    hutch1 = log_likelihood(TinyConvDenoiser(), s, x0[2:].reshape(1, 1, 2, 4).double(), steps=3, seeds=seeds[2:])
    torch.testing.assert_close(hutch1.nats[0], hutch.nats[2], rtol=1e-12, atol=1e-9)


def test_ode_log_likelihood_validation():
    s = schedule(10)
    x0 = data(2, 4)
    m = GaussianDenoiser(s)
    for kw, msg in [(dict(solver="dpmpp_2m"), "solver"), (dict(probe="uniform"), "probe"), (dict(steps=0), "steps"),
                    (dict(probes=0), "probes"), (dict(dequantize=True), "dequantize or bins needs x0")]:
        with pytest.raises(ValueError, match=msg):
            log_likelihood(m, s, x0, **kw)
    with pytest.raises(FloatingPointError, match="non-finite model output at sigma"):
        log_likelihood(lambda x, t: x * float("nan"), s, x0)


def test_randint_is_the_64_bit_philox_value_mod_high():
    seeds = [3, 2**40 + 7]
    got = rng.randint(seeds, 9, 5, 6, 1000)
    for b, seed in enumerate(seeds):
        for k in range(6):
            r0, r1, _, _ = (int(v) for v in rng.philox4x32(seed & 0xFFFFFFFF, seed >> 32, k, 9, 5, 0))
            assert int(got[b, k]) == (r0 * 2**32 + r1) % 1000  # Python integers: no overflow
    assert torch.equal(rng.randint(seeds[1:], 9, 5, 6, 1000), got[1:])
