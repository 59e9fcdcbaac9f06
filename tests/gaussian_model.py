"""The exact denoiser of Gaussian data N(mu, s^2 I): a model whose right answer is known.

For x_t = alpha x0 + sigma eps with x0 ~ N(mu, s^2), E[x0 | x_t] = mu + s^2 alpha (x_t - alpha mu)
/ (alpha^2 s^2 + sigma^2), and the probability-flow ODE keeps u = (x_t - alpha mu) /
sqrt(alpha^2 s^2 + sigma^2) constant, so the exact clean endpoint from x_t is mu + s u.
"""
import math

import torch


class GaussianDenoiser(torch.nn.Module):
    def __init__(self, schedule, mu=0.7, s=0.5, prediction="epsilon"):
        super().__init__()
        self.schedule, self.mu, self.s, self.prediction = schedule, mu, s, prediction
        self.calls = 0
        # log-sigma table on the model's device: interpolating it is graph-safe (no host sync)
        self.register_buffer("log_sigma", schedule.sigmas.log())

    def abar(self, t):
        """alphas_cumprod at fractional t, log-sigma interpolated (Schedule.sigma_at), on device."""
        t = t.detach().double()
        lo = t.floor().long().clamp(0, self.log_sigma.numel() - 2)
        w = t - lo
        log_s = (1 - w) * self.log_sigma[lo] + w * self.log_sigma[lo + 1]
        return 1.0 / (1.0 + torch.exp(2 * log_s))

    def forward(self, x, t, **kwargs):
        self.calls += 1
        abar = self.abar(t).reshape(-1, *([1] * (x.ndim - 1)))
        a, sg = abar.sqrt(), (1 - abar).sqrt()
        xd = x.double()
        mu = self.mu
        if "class_labels" in kwargs:  # a class-conditional mean: mu + label
            mu = mu + kwargs["class_labels"].double().reshape(-1, *([1] * (x.ndim - 1)))
        x0 = mu + self.s**2 * a * (xd - a * mu) / (a * a * self.s**2 + sg * sg)
        eps = (xd - a * x0) / sg
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - sg * x0}[self.prediction]
        return out.to(x.dtype)


def exact_endpoint(x_t, abar, mu=0.7, s=0.5):
    a, sg = math.sqrt(abar), math.sqrt(1 - abar)
    u = (x_t - a * mu) / math.sqrt(a * a * s * s + sg * sg)
    return mu + s * u
