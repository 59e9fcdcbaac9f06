"""`fastdiff sample` and `fastdiff eval` with tiny settings; errors are one line, exit status 2."""
from __future__ import annotations

import pytest
import torch

from fastdiff.cli import main
from fastdiff.models import UNet, UNetConfig, save_model

TINY = UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(), num_groups=8, num_classes=10)
METADATA = {"image_shape": [1, 8, 8], "num_classes": 10, "null_class": 10, "data_range": [-1.0, 1.0],
            "prediction": "epsilon", "schedule": {"name": "linear", "num_train_timesteps": 1000}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return save_model(model, tmp_path_factory.mktemp("model") / "tiny.safetensors", METADATA)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdiff: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]


def test_sample_tiny_model(tmp_path, capsys, tiny_model):
    from PIL import Image

    out = tmp_path / "grid.png"
    code, stdout, _ = run_cli(capsys, "sample", "--model", tiny_model, "--steps", 2, "--per-class", 2,
                              "--classes", "1,7", "--seeds", "10-13", "--out", out, "--no-progress")
    assert code == 0
    assert f"wrote {out}" in stdout and "model evaluations/s" in stdout and "sampling took" in stdout
    image = Image.open(out)
    assert image.size == (2 * (8 * 4 + 2) + 2, 2 * (8 * 4 + 2) + 2)  # 2 rows x 2 columns of 32x32 cells


def test_sample_is_reproducible_per_seed(tmp_path, capsys, tiny_model):
    import numpy as np
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    run_cli(capsys, "sample", "--model", tiny_model, "--steps", 2, "--per-class", 1, "--classes", 3,
            "--seeds", 5, "--out", a, "--no-progress")
    run_cli(capsys, "sample", "--model", tiny_model, "--steps", 2, "--per-class", 1, "--classes", 3,
            "--seeds", 5, "--out", b, "--no-progress", "--solver", "dpmpp_2m")
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_sample_embedded_model(tmp_path, capsys):
    out = tmp_path / "samples.png"
    code, stdout, _ = run_cli(capsys, "sample", "--steps", 2, "--per-class", 1, "--out", out, "--no-progress")
    assert code == 0 and out.exists() and "10 rows x 1" in stdout


@pytest.mark.parametrize("args, fragments", [
    (["--solver", "nope"], ["unknown solver 'nope'", "dpmpp_2m"]),
    (["--classes", "12"], ["--classes", "out of range", "0..9"]),
    (["--classes", "a,b"], ["--classes"]),
    (["--out", "/nonexistent-dir/x.png"], ["--out", "does not exist"]),
    (["--out", "."], ["--out", "directory"]),
    (["--out", "grid.unknownext"], ["--out", "extension"]),
    (["--steps", "0"], ["--steps"]),
    (["--steps", "two"], ["--steps", "invalid int"]),
    (["--seeds", "0-3"], ["--seeds", "need one per sample"]),
    (["--device", "cuda:7" if not torch.cuda.is_available() else "nonsense"], ["--device"]),
    (["--frobnicate"], ["unrecognized arguments"]),
])
def test_sample_errors(capsys, tiny_model, args, fragments):
    code, _, err = run_cli(capsys, "sample", "--model", tiny_model, "--no-progress", *args)
    assert_one_line_error(code, err, *fragments)


def test_sample_bad_model_files(tmp_path, capsys):
    garbage = tmp_path / "bad.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    code, _, err = run_cli(capsys, "sample", "--model", garbage)
    assert_one_line_error(code, err, "bad.json", "not found")
    garbage.with_suffix(".json").write_text("{}")
    code, _, err = run_cli(capsys, "sample", "--model", garbage)
    assert_one_line_error(code, err, "format")
    code, _, err = run_cli(capsys, "sample", "--model", tmp_path / "missing.safetensors")
    assert_one_line_error(code, err, "not found")


def test_top_level(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 2 and "sample" in out and "train" in out and "eval" in out
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    code, _, err = run_cli(capsys, "frobnicate")
    assert_one_line_error(code, err, "invalid choice")


# ---- eval -------------------------------------------------------------------------------
def test_eval_tiny(tmp_path, capsys, tiny_model):
    """A tiny model judged by the 16x16 classifier: upsampled here only to exercise the plumbing."""
    out = tmp_path / "q.md"
    code, stdout, _ = run_cli(capsys, "eval", "--model", _upsampled_tiny(tmp_path), "--solvers", "ddim,heun",
                              "--nfes", 3, "--num-samples", 10, "--batch", 5, "--no-ddpm-1000", "--out", out,
                              "--no-progress")
    assert code == 0, stdout
    text = out.read_text()
    assert "| ddim | 3 | 3 | 3 | 10 |" in text and "| heun | 3 | 3 | 2 | 10 |" in text  # heun: (3 + 1) // 2 steps
    assert "samples per cell: 10" in text
    assert out.with_suffix(".png").exists()


def _upsampled_tiny(tmp_path):
    config = UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(), num_groups=8, num_classes=10)
    torch.manual_seed(0)
    return save_model(UNet(config), tmp_path / "tiny16.safetensors", {**METADATA, "image_shape": [1, 16, 16]})


@pytest.mark.parametrize("args, fragments", [
    (["--solvers", "ddim,rk4"], ["unknown solver 'rk4'"]),
    (["--nfes", "0"], ["--nfes"]),
    (["--num-samples", "0"], ["--num-samples"]),
    (["--out", "table.txt"], ["--out", ".md"]),
])
def test_eval_errors(capsys, args, fragments):
    code, _, err = run_cli(capsys, "eval", "--no-progress", *args)
    assert_one_line_error(code, err, *fragments)


def test_heun_nfe_matches_the_sampler():
    from fastdiff import Sampler, Schedule
    from fastdiff.evaluate import NFES, SOLVERS, steps_for_nfe

    schedule = Schedule.linear()
    for solver in SOLVERS:
        for nfe in NFES:
            steps = steps_for_nfe(solver, nfe)
            sampler = Sampler(lambda x, t: x, schedule, solver=solver, steps=steps)
            # heun: two evaluations per step but one for the last, so an even budget leaves one unused
            expected = 2 * steps - 1 if solver == "heun" else nfe
            assert sampler.num_model_evals == expected <= nfe, (solver, nfe)


def test_frechet_distance():
    from fastdiff.evaluate import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    cov = a @ a.T + torch.eye(6, dtype=torch.float64)
    mu = torch.randn(6, generator=g, dtype=torch.float64)
    assert abs(frechet_distance(mu, cov, mu, cov)) < 1e-9
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 + |mu1 - mu2|^2
    d1, d2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 4.0, 1.0])
    m1, m2 = torch.zeros(3), torch.tensor([1.0, 0.0, 2.0])
    expected = float(((d1.sqrt() - d2.sqrt()) ** 2).sum() + ((m1 - m2) ** 2).sum())
    assert frechet_distance(m1, torch.diag(d1), m2, torch.diag(d2)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("scale, batch", [("1", 2), ("0", 4), ("3", 4)])
def test_guidance_scale_one_skips_the_unconditional_half(tmp_path, capsys, tiny_model, scale, batch):
    code, stdout, _ = run_cli(capsys, "sample", "--model", tiny_model, "--steps", 1, "--per-class", 1,
                              "--classes", "1,2", "--guidance-scale", scale, "--out", tmp_path / "g.png",
                              "--no-progress")
    assert code == 0 and f"a batch of {batch}" in stdout
