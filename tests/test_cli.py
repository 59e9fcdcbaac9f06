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


def grid_cells(path, rows, cols, size=8, scale=4, pad=2):
    """The cells of a grid PNG back at their own size: uint8 [rows * cols, size, size]."""
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(path))
    step = size * scale + pad
    span = size * scale
    return np.stack([a[pad + r * step: pad + r * step + span: scale, pad + c * step: pad + c * step + span: scale]
                     for r in range(rows) for c in range(cols)])


def test_a_grid_cell_depends_only_on_its_seed(tmp_path, capsys, tiny_model):
    import numpy as np

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out, seeds in ((a, "5,9"), (b, "9,5")):
        assert run_cli(capsys, "sample", "--model", tiny_model, "--steps", 2, "--per-class", 2, "--classes", 3,
                       "--seeds", seeds, "--out", out, "--no-progress")[0] == 0
    ca, cb = grid_cells(a, 1, 2), grid_cells(b, 1, 2)
    assert np.array_equal(ca[0], cb[1]) and np.array_equal(ca[1], cb[0]) and not np.array_equal(ca[0], ca[1])


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
def test_eval_tiny(tmp_path, capsys, tiny_model, monkeypatch):
    """A tiny model judged by the 16x16 classifier: upsampled here only to exercise the plumbing.
    Without --out the table goes to the current directory, named after the model."""
    model = _upsampled_tiny(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run_cli(capsys, "eval", "--model", model, "--solvers", "ddim,heun", "--nfes", 3,
                              "--num-samples", 10, "--batch", 5, "--no-ddpm-1000", "--no-progress")
    assert code == 0, stdout
    out = tmp_path / "quality-tiny16.md"
    text = out.read_text()
    assert "| ddim | 3 | 3 | 3 | 10 |" in text and "| heun | 3 | 3 | 2 | 10 |" in text  # heun: (3 + 1) // 2 steps
    assert "samples per cell: 10" in text
    assert out.with_suffix(".png").exists()
    assert not (tmp_path / "benchmarks").exists()


def _upsampled_tiny(tmp_path):
    config = UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                        attention_resolutions=(), num_groups=8, num_classes=10)
    torch.manual_seed(0)
    return save_model(UNet(config), tmp_path / "tiny16.safetensors", {**METADATA, "image_shape": [1, 16, 16]})


@pytest.mark.parametrize("args, fragments", [
    (["--solvers", "ddim,rk4"], ["unknown solver 'rk4'"]),
    (["--nfes", "0"], ["--nfes"]),
    (["--num-samples", "0"], ["--num-samples"]),
    (["--num-samples", "1"], ["--num-samples", ">= 2"]),
    (["--guidance-scale", "inf"], ["--guidance-scale"]),
    (["--model", "cifar"], ["'cifar'", "shipped: digits"]),
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


@pytest.mark.parametrize("w, batch", [(0.0, 2), (1.0, 2), (2.5, 4)])
def test_guidance_scale_means_the_same_in_grid_and_bulk_mode(tmp_path, capsys, tiny_model, w, batch):
    """The same flags, the same samples: grid cells and bulk files equal the guidance formula
    u + w (c - u) computed by the Sampler with both halves (w = 0: the unconditional model,
    w = 1: the conditional one), and w = 0 or 1 costs one model call per step."""
    import numpy as np

    from fastdiff import Sampler, load_pretrained
    from fastdiff.bulk import to_uint8

    flags = ["--model", tiny_model, "--steps", 2, "--classes", 3, "--seeds", "4-5", "--guidance-scale", w,
             "--no-progress"]
    code, stdout, _ = run_cli(capsys, "sample", *flags, "--per-class", 2, "--out", tmp_path / "g.png")
    assert code == 0 and f"a batch of {batch}," in stdout
    assert run_cli(capsys, "sample", *flags, "--outdir", tmp_path / "bulk", "--format", "npy")[0] == 0

    from fastdiff.sample_cmd import DEFAULT_SOLVER

    m = load_pretrained(tiny_model)
    sampler = Sampler(m.model, m.schedule, solver=DEFAULT_SOLVER, steps=2, **m.sampler_options(DEFAULT_SOLVER))
    y = torch.tensor([3, 3])
    want = sampler.sample(shape=(2, 1, 8, 8), seeds=[4, 5], cond={"class_labels": y},
                          uncond={"class_labels": torch.full_like(y, 10)}, guidance_scale=w)
    got = np.stack([np.load(tmp_path / "bulk" / f"{s:06d}.npy") for s in (4, 5)])
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    cells = grid_cells(tmp_path / "g.png", 1, 2).astype(int)
    assert np.abs(cells - to_uint8(want, (-1.0, 1.0))[..., 0].astype(int)).max() <= 1  # rounding of x * 127.5


@pytest.mark.parametrize("mode, flag, value, belongs", [
    ("grid", "--format", "npy", "bulk mode"), ("grid", "--npz", "all.npz", "bulk mode"),
    ("grid", "--batch", "4", "bulk mode"), ("grid", "--nproc", "2", "bulk mode"),
    ("bulk", "--per-class", "2", "grid mode"), ("bulk", "--out", "x.png", "grid mode"),
])
def test_a_flag_of_the_other_mode_is_refused(tmp_path, capsys, tiny_model, mode, flag, value, belongs):
    bulk = ["--seeds", "0-1", "--outdir", tmp_path / "o"] if mode == "bulk" else []
    code, _, err = run_cli(capsys, "sample", "--model", tiny_model, "--steps", 1, *bulk, flag, value)
    assert_one_line_error(code, err, flag, belongs)
    assert not (tmp_path / "o").exists()


# ---- bad inputs: each a one-line error naming the flag, exit status 2 --------------------
def _edited_model(tmp_path, tiny_model, name, **json_edits):
    """A copy of the tiny model whose JSON has `json_edits` applied (dotted keys reach inside)."""
    import json
    import shutil

    path = tmp_path / f"{name}.safetensors"
    shutil.copy(tiny_model, path)
    doc = json.loads(tiny_model.with_suffix(".json").read_text())
    for key, value in json_edits.items():
        *outer, last = key.split(".")
        target = doc
        for k in outer:
            target = target[k]
        target[last] = value
    path.with_suffix(".json").write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize("edits, fragments", [
    ({"config.base_channels": "32"}, ["'base_channels'", "must be int", "'32'"]),
    ({"config.channel_mults": [1, "2"]}, ["'channel_mults'"]),
    ({"metadata": [1, 2]}, ["'metadata' must be an object"]),
    ({"metadata.image_shape": [1, 8]}, ["'image_shape'", "[C, H, W]"]),
    ({"metadata.image_shape": [3, 8, 8]}, ["'image_shape'", "[1, 8, 8]"]),
    ({"metadata.schedule": {"name": "zigzag"}}, ["'schedule'"]),
])
def test_model_file_errors_name_the_field(tmp_path, capsys, tiny_model, edits, fragments):
    model = _edited_model(tmp_path, tiny_model, "edited", **edits)
    code, _, err = run_cli(capsys, "sample", "--model", model, "--steps", 1, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, *fragments)


def test_bulk_mode_bad_inputs(tmp_path, capsys, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["sample", "--model", tiny_model, "--steps", 1, "--seeds", "0-1", "--no-progress"]
    cases = [
        (["--outdir", ""], ["--outdir", "''"]),
        (["--outdir", "out", "--npz", "out/000000.png"], ["--npz", ".npz"]),
        (["--outdir", "out", "--batch", "0"], ["--batch"]),
        (["--outdir", "out", "--nproc", "0"], ["--nproc"]),
        (["--outdir", "out", "--guidance-scale", "nan"], ["--guidance-scale", "finite"]),
        (["--outdir", "out", "--backend", "cuda"], ["--backend", "invalid choice"]),
        (["--outdir", "out", "--model", "cifar"], ["'cifar'", "shipped: digits"]),
    ]
    for args, fragments in cases:
        code, _, err = run_cli(capsys, *base, *args)
        assert_one_line_error(code, err, *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a folder


def test_a_rerun_with_other_settings_is_refused(tmp_path, capsys, tiny_model):
    out = tmp_path / "out"
    base = ["sample", "--model", tiny_model, "--seeds", "0-1", "--outdir", out, "--no-progress"]
    assert run_cli(capsys, *base, "--steps", 2)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for args, fragments in ((["--steps", 3], ["--steps 3", "have 2"]),
                            (["--steps", 2, "--solver", "ddim"], ["--solver 'ddim'", "'dpmpp_2m_sde'"]),
                            (["--steps", 2, "--guidance-scale", 0], ["--guidance-scale 0.0", "3.0"]),
                            (["--steps", 2, "--format", "npy"], ["--format 'npy'"]),
                            (["--steps", 3, "--nproc", 2], ["--steps 3"])):  # refused before spawning
        code, _, err = run_cli(capsys, *base, *args)
        assert_one_line_error(code, err, str(out), *fragments)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, stdout, _ = run_cli(capsys, *base, "--steps", 2, "--seeds", "0-2")  # same settings: resumes
    assert code == 0 and "1 new, 2 already there" in stdout


def test_grid_mode_full_disk_names_the_file_and_leaves_nothing(tmp_path, capsys, tiny_model, monkeypatch):
    import errno
    import os

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "grid.png"
    code, _, err = run_cli(capsys, "sample", "--model", tiny_model, "--steps", 1, "--per-class", 1, "--out", out,
                           "--no-progress")
    assert code == 1 and err.strip() == f"fastdiff: error: cannot write {out}: [Errno 28] No space left on device"
    assert list(tmp_path.iterdir()) == []  # no 0-byte PNG, no temporary


def test_output_files_follow_the_umask(tmp_path, capsys, tiny_model):
    import os
    import stat

    old = os.umask(0o027)
    try:
        assert run_cli(capsys, "sample", "--model", tiny_model, "--steps", 1, "--per-class", 1, "--out",
                       tmp_path / "g.png", "--no-progress")[0] == 0
        assert run_cli(capsys, "sample", "--model", tiny_model, "--steps", 1, "--seeds", "0-1", "--outdir",
                       tmp_path / "out", "--npz", tmp_path / "all.npz", "--no-progress")[0] == 0
    finally:
        os.umask(old)
    written = [tmp_path / "g.png", tmp_path / "all.npz", *(tmp_path / "out").iterdir()]
    assert len(written) == 6  # g.png, all.npz, 2 samples, the run record, the lock
    for p in written:
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p.name  # 0666 & ~0027, as open() gives


def test_non_finite_weights_are_a_one_line_error(tmp_path, capsys, tiny_model):
    """Item 5: NaN weights (one process, and --nproc 2 where a rank fails) end in one line."""
    from safetensors.torch import load_file, save_file

    nan = tmp_path / "nan.safetensors"
    tensors = load_file(str(tiny_model))
    tensors["conv_out.bias"] = torch.full_like(tensors["conv_out.bias"], float("nan"))
    save_file(tensors, str(nan))
    nan.with_suffix(".json").write_text(tiny_model.with_suffix(".json").read_text())
    code, _, err = run_cli(capsys, "sample", "--model", nan, "--steps", 2, "--per-class", 1, "--out",
                           tmp_path / "g.png", "--no-progress")
    assert code == 1 and err.startswith("fastdiff: error: non-finite") and len(err.strip().splitlines()) == 1, err
    code, _, err = run_cli(capsys, "sample", "--model", nan, "--steps", 2, "--seeds", "0-3", "--outdir",
                           tmp_path / "out", "--nproc", 2, "--device", "cpu", "--no-progress")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fastdiff: error: rank ") and "failed: FloatingPointError: non-finite" in err


def test_progress_only_on_a_terminal(tmp_path, capsys, tiny_model, monkeypatch):
    """Grid and bulk mode show a bar when stderr is a terminal, unless --no-progress."""
    import sys

    args = ["sample", "--model", tiny_model, "--steps", 2, "--classes", 1]
    for extra, tty, shown in (([], True, True), (["--no-progress"], True, False), ([], False, False),
                              (["--progress"], False, True)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty, raising=False)
        for mode in (["--per-class", 1, "--out", tmp_path / "g.png"], ["--seeds", 0, "--outdir", tmp_path / "o"]):
            code, _, err = run_cli(capsys, *args, *mode, *extra)
            assert code == 0 and ("sampling" in err) == shown, (mode, extra, tty, err)


def test_help_texts():
    from fastdiff.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for name, parser in sub.items():
        text = parser.format_help()
        assert "%%" not in text and "%(" not in text, name
    for action in sub["train"]._actions:
        if action.dest not in ("help", "no_progress", "progress"):
            assert action.help and "default" in action.help, action.option_strings


def test_rate_reads_as_seconds_per_evaluation_when_slow():
    from fastdiff.command_options import rate_text

    assert rate_text(40, 2.0) == "20.0 model evaluations/s"
    assert rate_text(2, 20.0) == "10.00 s per model evaluation"


def test_load_pretrained_takes_a_name_or_a_path(tiny_model):
    import fastdiff

    by_path = fastdiff.load_pretrained(tiny_model)
    assert by_path.image_shape == (1, 8, 8) and by_path.num_classes == 10
    assert fastdiff.load_pretrained(str(tiny_model)).model.config == by_path.model.config
    assert fastdiff.load_pretrained("digits").image_shape == (1, 16, 16)
    with pytest.raises(ValueError, match=r"unknown model 'cifar': .*shipped: digits, digits_classifier"):
        fastdiff.load_pretrained("cifar")


@pytest.mark.parametrize("x_shape, labels, error, fragment", [
    ((2, 1, 8, 8), [1, 2], ValueError, "[B, 1, 16, 16]"),
    ((2, 3, 16, 16), [1, 2], ValueError, "[B, 1, 16, 16]"),
    ((2, 1, 16, 16), [1.7, 2.0], TypeError, "integer tensor"),
    ((2, 1, 16, 16), [11, 2], ValueError, "0..9 (or 10, the null class), got 11"),
    ((2, 1, 16, 16), [1, -1], ValueError, "got -1"),
    ((2, 1, 16, 16), [1, 2, 3], ValueError, "[B] = [2]"),
])
def test_digits_model_input_errors(x_shape, labels, error, fragment):
    import fastdiff

    m = fastdiff.load_pretrained("digits")
    with pytest.raises(error, match=re_escape(fragment)):
        m.model(torch.zeros(x_shape), torch.zeros(x_shape[0]), class_labels=torch.tensor(labels))


def re_escape(text):
    import re

    return re.escape(text)


# ---- train ----------------------------------------------------------------------------
def test_train_bad_inputs(tmp_path, capsys, tiny_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--channel-mults", ""], ["--channel-mults"]),
        (["--channel-mults", "1,x"], ["--channel-mults"]),
        (["--attention-resolutions", "3"], ["--attention-resolutions", "[3]", "16, 8, 4"]),
        (["--ema-decay", "2"], ["--ema-decay", "[0, 1)"]),
        (["--label-dropout", "1"], ["--label-dropout"]),
        (["--init", tiny_model, "--base-channels", "64"], ["--base-channels", "--init"]),
        (["--lr", "-1"], ["--lr"]),
        (["--threads", "0"], ["--threads"]),
        (["--base-channels", "3"], ["--base-channels"]),
        (["--base-channels", "100"], ["--base-channels 100", "not a U-Net that runs"]),
        (["--image-size", "12"], ["--image-size"]),
        (["--steps", "0"], ["--steps"]),
    ]
    for args, fragments in cases:
        code, _, err = run_cli(capsys, "train", "--out", "run", "--no-progress", *args)
        assert_one_line_error(code, err, *fragments)
    assert list(tmp_path.iterdir()) == []


def test_train_diverging_fails_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--out", out, "--steps", 20, "--batch-size", 8, "--image-size", 8,
                           "--base-channels", 16, "--channel-mults", "1,2", "--attention-resolutions", "",
                           "--lr", "1e6", "--warmup", 0, "--no-progress")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fastdiff: error: train: the ") and ("nan" in err or "non-finite" in err), err
    assert not (out / "digits.safetensors").exists()
