"""The U-Net, safetensors I/O (never pickle), adapters, and the shipped weights."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from fastdiff.models import (
    CallableDenoiser,
    DiffusersUNet,
    ModelFileError,
    UNet,
    UNetConfig,
    adapt,
    load_model,
    load_pretrained,
    save_model,
)
from fastdiff.models.pretrained import weights_path

TINY = UNetConfig(image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), head_channels=8, num_groups=8, num_classes=3)


def tiny_unet(config: UNetConfig = TINY, seed: int = 0) -> UNet:
    """A tiny U-Net with every weight random (the zero-initialised output layers included)."""
    torch.manual_seed(seed)
    model = UNet(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_unet_shapes_and_timesteps():
    model = tiny_unet()
    x = torch.randn(4, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 3])  # 3 is the null class
    out = model(x, torch.tensor([0.0, 10.5, 500.25, 999.0]), class_labels=y)  # fractional t
    assert out.shape == x.shape and torch.isfinite(out).all()
    # a scalar t is broadcast over the batch
    torch.testing.assert_close(model(x, torch.tensor(7.0), class_labels=y),
                               model(x, torch.full((4,), 7.0), class_labels=y))


def test_null_class_is_the_default_and_labels_matter():
    model = tiny_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([100.0, 100.0])
    null = torch.full((2,), TINY.num_classes)
    torch.testing.assert_close(model(x, t), model(x, t, class_labels=null))
    assert not torch.allclose(model(x, t, class_labels=torch.tensor([0, 0])), model(x, t, class_labels=null))


def test_unet_starts_as_zero_output():
    # zero-initialised output convolution: an untrained model predicts 0 (ADM)
    model = UNet(TINY)
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])).abs().max() == 0


def test_config_errors_name_the_parameter():
    with pytest.raises(ValueError, match="num_groups"):
        UNetConfig(base_channels=24, num_groups=32)
    with pytest.raises(ValueError, match="image_size"):
        UNetConfig(image_size=10, channel_mults=(1, 2, 2))


def test_save_load_round_trip(tmp_path):
    model = tiny_unet()
    path = save_model(model, tmp_path / "m.safetensors", metadata={"prediction": "epsilon"},
                      extra={"stats": torch.arange(3, dtype=torch.float64)})
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["architecture"] == "UNet" and doc["config"]["channel_mults"] == [1, 2]
    loaded = load_model(path)
    assert loaded.model.config == model.config and not loaded.model.training
    assert loaded.metadata == {"prediction": "epsilon"}
    assert loaded.extra["stats"].dtype == torch.float64
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0]), torch.tensor([1, 3])
    torch.testing.assert_close(loaded.model(x, t, class_labels=y), model(x, t, class_labels=y), rtol=0, atol=0)


def test_fp16_weights_load_into_fp32(tmp_path):
    model = tiny_unet()
    path = save_model(model, tmp_path / "m.safetensors", dtype=torch.float16)
    loaded = load_model(path).model
    assert next(loaded.parameters()).dtype == torch.float32
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 700.0])
    torch.testing.assert_close(loaded(x, t), model(x, t), rtol=2e-2, atol=2e-2)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    from safetensors import safe_open

    path = save_model(tiny_unet(), tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:  # a valid safetensors file
        assert "conv_in.weight" in f.keys()  # noqa: SIM118 (not a dict)

    def forbidden(*a, **k):
        raise AssertionError("pickle used")

    for name in ("load", "save"):
        monkeypatch.setattr(torch, name, forbidden)
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    load_model(path)
    save_model(tiny_unet(), tmp_path / "again.safetensors")


def test_no_pickle_in_the_source():
    root = Path(__file__).resolve().parents[1] / "fastdiff"
    files = list((root / "models").glob("*.py")) + [root / n for n in ("cli.py", "train.py", "evaluate.py",
                                                                        "sample_cmd.py")]
    for f in files:
        text = f.read_text()
        for bad in ("torch.save(", "torch.load(", "import pickle"):
            assert bad not in text, f"{f.name} uses {bad}"


@pytest.mark.parametrize("corrupt, message", [
    (lambda p: p.with_suffix(".json").unlink(), "not found"),
    (lambda p: p.with_suffix(".json").write_text("{not json"), "not valid JSON"),
    (lambda p: p.write_bytes(b"\x00garbage"), "not a valid safetensors"),
    (lambda p: _edit_json(p, architecture="ResNet"), "unknown architecture 'ResNet'; allowed"),
    (lambda p: _edit_json(p, config={"base_channels": 32}), "does not match its config"),
    (lambda p: _edit_json(p, config={"bogus": 1}), "invalid"),
])
def test_bad_model_files(tmp_path, corrupt, message):
    path = save_model(tiny_unet(), tmp_path / "m.safetensors")
    corrupt(path)
    with pytest.raises(ModelFileError, match=message):
        load_model(path)


def test_missing_and_misnamed_model_files(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "absent.safetensors")
    with pytest.raises(ModelFileError, match=".safetensors"):
        load_model(tmp_path / "weights.pt")


def _edit_json(path: Path, **changes):
    cpath = path.with_suffix(".json")
    doc = json.loads(cpath.read_text())
    for k, v in changes.items():
        doc[k] = {**doc[k], **v} if isinstance(v, dict) else v
    cpath.write_text(json.dumps(doc))


# ---- adapters -------------------------------------------------------------------------
def tiny_diffusers_unet(**extra):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4, **extra).eval()


def test_diffusers_unet2d_adapter():
    unet = tiny_diffusers_unet()
    model = adapt(unet)
    assert isinstance(model, DiffusersUNet)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.5])
    with torch.no_grad():
        out = model(x, t)
        assert torch.is_tensor(out) and out.shape == x.shape
        torch.testing.assert_close(out, unet(x, t).sample)
    with pytest.raises(ValueError, match="no class embedding"):
        model(x, t, class_labels=torch.tensor([0, 1]))


def test_diffusers_class_conditional_adapter():
    unet = tiny_diffusers_unet(num_class_embeds=4)
    model = adapt(unet)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, class_labels=y), unet(x, t, class_labels=y).sample)


def test_diffusers_condition_unet_adapter():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, norm_num_groups=4, attention_head_dim=2).eval()
    model = adapt(unet)
    x, t, ctx = torch.randn(2, 1, 8, 8), torch.tensor([3.0, 900.0]), torch.randn(2, 5, 8)
    with torch.no_grad():
        out = model(x, t, encoder_hidden_states=ctx)
        torch.testing.assert_close(out, unet(x, t, encoder_hidden_states=ctx).sample)


def test_callable_adapter_unwraps_and_passes_t():
    seen = {}

    class Output:
        def __init__(self, sample):
            self.sample = sample

    def fn(x, t, scale=1.0):
        seen["t"] = t
        return Output(x * scale)

    x = torch.randn(2, 1, 4, 4)
    model = adapt(fn)
    assert isinstance(model, CallableDenoiser)
    torch.testing.assert_close(model(x, torch.tensor([1.5, 2.5]), scale=2.0), 2 * x)
    assert seen["t"].dtype == torch.float32
    rounded = CallableDenoiser(lambda x, t: (x + t[:, None, None, None], None), timestep_dtype=torch.long)
    torch.testing.assert_close(rounded(x, torch.tensor([1.4, 2.6])), x + torch.tensor([1.0, 3.0])[:, None, None, None])
    wrapped = nn.Linear(2, 2)
    assert list(CallableDenoiser(wrapped).parameters()) == list(wrapped.parameters())
    unet = tiny_unet()
    assert adapt(unet) is unet  # our UNet already is model(x, t, **cond) -> tensor: passed through
    with pytest.raises(TypeError, match="callable"):
        adapt(42)


def test_adapted_diffusers_unet_runs_in_the_sampler():
    from fastdiff import Sampler, Schedule

    model = adapt(tiny_diffusers_unet(num_class_embeds=4))
    sampler = Sampler(model, Schedule.linear(), solver="dpmpp_2m", steps=2)
    y = torch.tensor([0, 2])
    x = sampler.sample(shape=(2, 1, 8, 8), seeds=[0, 1], cond={"class_labels": y},
                       uncond={"class_labels": torch.tensor([3, 3])}, guidance_scale=2.0)
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all()


# ---- shipped weights -------------------------------------------------------------------
def test_load_pretrained_digits():
    import fastdiff

    pre = fastdiff.load_pretrained("digits")
    assert isinstance(pre.model, UNet) and not pre.model.training
    assert pre.image_shape == (1, 16, 16) and pre.num_classes == 10 and pre.null_class == 10
    assert pre.data_range == (-1.0, 1.0) and pre.prediction == "epsilon"
    assert isinstance(pre.schedule, fastdiff.Schedule) and pre.schedule.num_train_timesteps == 1000
    assert weights_path("digits").stat().st_size < 8 * 2**20  # a few MB at most
    with torch.no_grad():
        out = pre.model(torch.randn(2, 1, 16, 16), torch.tensor([10.0, 990.0]), class_labels=torch.tensor([3, 10]))
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"unknown model 'nope': .*shipped: digits"):
        load_pretrained("nope")


def test_shipped_classifier_and_statistics():
    from fastdiff.models.digits import load_digits

    loaded = load_model(weights_path("digits_classifier"))
    assert loaded.metadata["heldout_accuracy"] >= 0.98
    F = loaded.model.config.feature_dim
    assert loaded.extra["feature_mean"].shape == (F,) and loaded.extra["feature_cov"].shape == (F, F)
    images, labels = load_digits(16)
    with torch.no_grad():
        accuracy = (loaded.model(images).argmax(1) == labels).float().mean().item()
    assert accuracy >= 0.98
