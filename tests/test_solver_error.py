"""fastdiff.solver_error on an exact model: Gaussian data, where the probability-flow ODE's
endpoint is closed form, with and without classifier-free guidance."""
import math

import pytest
import torch

from fastdiff import Schedule, rng
from fastdiff.models.pretrained import Pretrained
from fastdiff.seeds import as_seeds
from fastdiff.solver_error import LEVEL, reference_solution, solver_error
from gaussian_model import GaussianDenoiser, exact_endpoint

SCHEDULE = Schedule.linear()
MU, S, SHAPE, N = 0.0, 0.5, (1, 2, 3), 5
# one class (mean MU) and the null class (mean MU + 1, GaussianDenoiser adds the label);
# an asymmetric data range so that the model's sampler options do not clip D
METADATA = {"num_classes": 1, "null_class": 1, "image_shape": list(SHAPE), "data_range": [-4.0, 5.0],
            "prediction": "epsilon"}


def loaded():
    return Pretrained(GaussianDenoiser(SCHEDULE, mu=MU, s=S), SCHEDULE, METADATA)


def exact(w: float) -> torch.Tensor:
    """The guided ODE's endpoint from each seed's noise: eps is affine in the data mean with a
    slope that does not depend on it, so u + w (c - u) is the denoiser of N(mu_u + w (mu_c - mu_u), S^2)."""
    x_T = rng.randn(as_seeds(range(N), N, torch.device("cpu")), 0, rng.STREAM_INIT, SHAPE).double()
    mu_guided = (MU + 1) + w * (MU - (MU + 1))
    return exact_endpoint(x_T, float(SCHEDULE.alphas_cumprod[-1]), mu=mu_guided, s=S), x_T


def textbook_ddim(x_T: torch.Tensor, steps: int, w: float) -> torch.Tensor:
    """DDIM (Song et al. 2021, eta = 0) on diffusers' trailing timesteps with its t - T//N stride,
    classifier-free guidance on epsilon; written out step by step."""
    model, abar, T = GaussianDenoiser(SCHEDULE, mu=MU, s=S), SCHEDULE.alphas_cumprod, 1000
    x = x_T.float()
    for t in [round(v) - 1 for v in torch.arange(T, 0, -T / steps).tolist()]:
        a, prev = float(abar[t]), t - T // steps
        a_prev = float(abar[prev]) if prev >= 0 else 1.0
        tt = torch.full((N,), float(t))
        eps_c = model(x, tt, class_labels=torch.zeros(N)).double()
        eps_u = model(x, tt, class_labels=torch.ones(N)).double()
        eps = eps_u + w * (eps_c - eps_u)
        x0 = (x.double() - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = (math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps).float()
    return x.double()


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_reference_is_the_converged_ode_solution(w):
    want, _ = exact(w)
    ref, half = reference_solution(loaded(), torch.zeros(N, dtype=torch.long), list(range(N)), w, 100, N)
    err_ref = (ref.double() - want).square().mean().sqrt()
    err_half = (half.double() - want).square().mean().sqrt()
    assert err_ref < 2e-3 and err_ref < err_half, (err_ref, err_half)
    # halving bounds the reference's error: |half - ref| >= |ref - exact| for a converging solver
    assert (half.double() - ref.double()).square().mean().sqrt() > err_ref


@pytest.mark.parametrize("w", [1.0, 3.0])
def test_solver_error_cells_equal_an_independent_computation(w):
    cells, refs = solver_error(loaded(), solvers=("ddim",), grids=("trailing",), nfes=(4, 8), guidance_scales=(w,),
                               num_samples=N, reference_steps=100, batch=N)
    want, x_T = exact(w)
    assert [(c.solver, c.grid, c.nfe, c.steps) for c in cells] == [("ddim", "trailing", 4, 4), ("ddim", "trailing", 8, 8)]
    assert len(refs) == 1 and refs[0].guidance == w and refs[0].halving_rmse < 2e-2
    for cell in cells:
        x = textbook_ddim(x_T, cell.steps, w)
        err = float((x - want).square().mean().sqrt())
        assert err > 0.02  # a few DDIM steps are visibly off the ODE solution ...
        assert cell.rmse == pytest.approx(err, abs=2e-3)  # ... by what the module reports
        assert cell.off == pytest.approx(float(((x - want).abs() > LEVEL).double().mean()), abs=0.1)
    assert cells[1].rmse < cells[0].rmse


def test_solver_error_rejects_bad_settings():
    with pytest.raises(ValueError, match="grid"):
        solver_error(loaded(), grids=("uniform",), num_samples=1)
    with pytest.raises(ValueError, match="solver"):
        solver_error(loaded(), solvers=("rk4",), num_samples=1)
    with pytest.raises(ValueError, match="deterministic"):
        solver_error(loaded(), solvers=("dpmpp_2m_sde",), num_samples=1)
    with pytest.raises(ValueError, match="reference_steps"):
        solver_error(loaded(), reference_steps=2, num_samples=1)


def test_quality_cell_specs():
    from fastdiff.quality_intervals import parse_cell

    assert parse_cell("dpmpp_2m@20+sigmas=exponential+guidance_rescale=0.7") == (
        "dpmpp_2m", 20, {"sigmas": "exponential", "guidance_rescale": 0.7})
    assert parse_cell("ddim@10+thresholding=1") == ("ddim", 10, {"thresholding": True})
    for bad, name in (("ddim", "solver@nfe"), ("ddim@0", "solver@nfe"), ("rk4@10", "solver"),
                      ("ddim@10+eta=1", "option")):
        with pytest.raises(ValueError, match=name):
            parse_cell(bad)


def test_eval_solver_error_command(tmp_path, capsys):
    import json

    from fastdiff.cli import main

    out = tmp_path / "se.md"
    code = main(["eval", "--solver-error", "--solvers", "ddim", "--grids", "trailing", "--nfes", "2",
                 "--guidance-scales", "1", "--num-samples", "2", "--reference-steps", "4", "--device", "cpu",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(c["solver"], c["grid"], c["nfe"]) for c in result["cells"]] == [("ddim", "trailing", 2)]
    assert result["header"]["command"].startswith("fastdiff eval --solver-error --solvers ddim")
    assert main(["eval", "--solver-error", "--solvers", "dpmpp_2m_sde", "--out", str(out)]) == 2
    assert "deterministic" in capsys.readouterr().err


def test_quality_cell_with_another_model(tmp_path):
    # +model= draws that cell from another model file (same seeds, labels and judge): an exact
    # copy of the shipped weights gives the default cell's features, a perturbed copy does not,
    # and the cache keeps the cells apart.
    from fastdiff.evaluate import Judge
    from fastdiff.models.io import save_model
    from fastdiff.models.pretrained import load_pretrained
    from fastdiff.quality_intervals import draw_cell

    base, judge = load_pretrained("digits"), Judge("cpu")
    copy = save_model(base.model, tmp_path / "copy.safetensors", base.metadata)
    other = load_pretrained("digits")  # its own module: perturbing it leaves `base` alone
    with torch.no_grad():
        for p in other.model.parameters():
            p.mul_(0.9)
    perturbed = save_model(other.model, tmp_path / "perturbed.safetensors", base.metadata)
    specs = ["ddim@2", f"ddim@2+model={copy}", f"ddim@2+model={perturbed}"]
    for _ in range(2):  # the second pass reads the cache
        feats = [draw_cell(base, judge, spec, 1.0, 2, 2, "cpu", tmp_path / "cache")[0] for spec in specs]
        assert torch.equal(feats[0], feats[1]) and not torch.allclose(feats[0], feats[2])
    assert len(list((tmp_path / "cache").iterdir())) == 3


def test_quality_cache_has_a_folder_per_model(tmp_path):
    from pathlib import Path

    from fastdiff.quality_intervals import model_cache

    folders = {model_cache(tmp_path, m) for m in ("digits", "a/digits.safetensors", "b/digits.safetensors")}
    assert len(folders) == 3 and all(Path(f).parent == tmp_path for f in folders)
