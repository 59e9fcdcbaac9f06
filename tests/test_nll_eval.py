"""`fastdiff eval --nll` on a tiny model, and the Monte-Carlo spread it reports."""
import math

import torch
from gaussian_model import GaussianDenoiser

import fastdiff
from fastdiff.cli import main
from fastdiff.models import UNet, UNetConfig, save_model
from fastdiff.nll_eval import monte_carlo_spread

TINY = UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(), num_groups=8, num_classes=10)
METADATA = {"image_shape": [1, 8, 8], "num_classes": 10, "null_class": 10, "data_range": [-1.0, 1.0],
            "prediction": "epsilon", "schedule": {"name": "linear", "num_train_timesteps": 1000}}


def test_eval_nll_writes_the_figures_and_the_command(tmp_path, capsys):
    torch.manual_seed(0)
    model = save_model(UNet(TINY), tmp_path / "tiny.safetensors", METADATA)
    out = tmp_path / "nll.md"
    code = main(["eval", "--nll", "--model", str(model), "--num-samples", "3", "--batch", "2",
                 "--nll-timesteps", "4", "--nll-ode-steps", "2", "--no-progress", "--out", str(out)])
    stdout, _ = capsys.readouterr()
    assert code == 0 and f"wrote {out}" in stdout
    text = out.read_text()
    assert (f"command: `fastdiff eval --nll --model {model} --num-samples 3 --batch 2 --nll-ode-steps 2 "
            f"--nll-probes 1 --nll-timesteps 4 --out {out}`") in text
    assert "digits: 3 from the classifier's held-out 20% split" in text
    means = {}
    for line in text.splitlines():
        if line.startswith("| ") and " ± " in line and "mean ± s.e." not in line:
            name, value = line.strip("| ").split(" | ")
            means[name] = float(value.split(" ± ")[0])
    parts = means["prior term"] + means["diffusion terms (t >= 2)"] + means["decoder term (t = 1)"]
    assert math.isclose(means["ELBO bound (bpd)"], parts, abs_tol=3e-4)
    assert math.isfinite(means["ODE log-likelihood (bpd, dequantized)"])
    assert main(["eval", "--nll", "--num-samples", "0", "--no-progress"]) == 2


def test_monte_carlo_spread_matches_repeated_draws():
    """The adjacent-timestep estimate of one bound's Monte-Carlo std against the spread of
    40 independent bounds of the same sample (different seeds)."""
    s = fastdiff.Schedule.linear(100, 1e-3, 0.2)
    x0 = (0.7 + 0.5 * torch.randn(1, 16, generator=torch.Generator().manual_seed(0))).repeat(40, 1)
    r = fastdiff.elbo(GaussianDenoiser(s), s, x0, seeds=range(40), decoder="gaussian", batch_timesteps=100)
    measured = float(r.bpd.std())
    estimated = float(monte_carlo_spread(r.terms).mean())
    assert abs(estimated / measured - 1) < 0.35, (estimated, measured)
