"""The exact denoiser of Gaussian data N(mu, s^2 I): a model whose right answer is known.

For x_t = alpha x0 + sigma eps with x0 ~ N(mu, s^2), E[x0 | x_t] = mu + s^2 alpha (x_t - alpha mu)
/ (alpha^2 s^2 + sigma^2), and the probability-flow ODE keeps u = (x_t - alpha mu) /
sqrt(alpha^2 s^2 + sigma^2) constant, so the exact clean endpoint from x_t is mu + s u.
"""
import math

import torch


class GaussianDenoiser(torch.nn.Module):
    """The exact eps / x0 / v for data N(mu, s^2) at (fractional) timestep t.

    `schedule` is a fastdiff Schedule or a raw alphas_cumprod tensor (a diffusers scheduler's);
    t is a [B] tensor or a scalar (as diffusers' loops pass it).
    """

    def __init__(self, schedule, mu=0.7, s=0.5, prediction="epsilon"):
        super().__init__()
        self.mu, self.s, self.prediction = mu, s, prediction
        self.calls = 0
        abar = schedule.double() if torch.is_tensor(schedule) else schedule.alphas_cumprod
        # log-sigma table on the model's device: interpolating it is graph-safe (no host sync);
        # +inf at zero terminal SNR
        self.register_buffer("log_sigma", ((1.0 - abar) / abar).sqrt().log())

    def abar(self, t):
        """alphas_cumprod at fractional t, log-sigma interpolated (Schedule.sigma_at), on device.
        At an integer t the table's value itself, so an infinite end never meets a zero weight."""
        t = t.detach().double()
        ls = self.log_sigma
        lo = t.floor().long().clamp(0, ls.numel() - 2)
        w = t - lo
        mix = (1 - w) * ls[lo] + w * ls[lo + 1]
        log_s = torch.where(w == 0, ls[lo], torch.where(w == 1, ls[lo + 1], mix))
        return torch.sigmoid(-2 * log_s)  # 1 / (1 + sigma^2)

    def forward(self, x, t, **kwargs):
        self.calls += 1
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
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


class FlowGaussianDenoiser(torch.nn.Module):
    """The exact velocity for data N(mu, s^2) under flow matching, x_r = (1 - r) x0 + r eps.

    The model sees x_r and t = r * T. E[x0 | x_r] = mu + s^2 (1 - r)(x_r - (1 - r) mu) /
    ((1 - r)^2 s^2 + r^2) and the velocity E[eps - x0 | x_r] = (x_r - E[x0 | x_r]) / r; also
    "epsilon" and "sample" outputs of the same process.
    """

    def __init__(self, num_train_timesteps=1000, mu=0.7, s=0.5, prediction="flow"):
        super().__init__()
        self.T, self.mu, self.s, self.prediction = num_train_timesteps, mu, s, prediction
        self.calls = 0

    def forward(self, x, t, **kwargs):
        self.calls += 1
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        r = (t.double() / self.T).reshape(-1, *([1] * (x.ndim - 1)))
        xd = x.double()
        x0 = self.mu + self.s**2 * (1 - r) * (xd - (1 - r) * self.mu) / ((1 - r) ** 2 * self.s**2 + r * r)
        eps = (xd - (1 - r) * x0) / r
        out = {"flow": eps - x0, "epsilon": eps, "sample": x0}[self.prediction]
        return out.to(x.dtype)


def flow_exact_endpoint(x_r, r, mu=0.7, s=0.5):
    """The probability-flow ODE keeps (x_r - (1 - r) mu) / sqrt((1 - r)^2 s^2 + r^2) constant."""
    u = (x_r - (1 - r) * mu) / math.sqrt((1 - r) ** 2 * s * s + r * r)
    return mu + s * u
