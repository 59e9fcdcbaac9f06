"""`fastdiff train` on tiny settings: the loss falls, the files appear, the model reloads."""
from __future__ import annotations

import csv
import math

import pytest
import torch

import fastdiff.train as train_module
from fastdiff import load_pretrained
from fastdiff.train import TrainConfig, learning_rate, train

TINY = {"steps": 40, "batch_size": 32, "lr": 2e-3, "warmup": 5, "image_size": 8, "base_channels": 16,
        "channel_mults": (1, 2), "num_res_blocks": 1, "attention_resolutions": (), "save_every": 0}


def test_tiny_training_lowers_the_loss_and_writes_files(tmp_path, monkeypatch):
    calls = []
    real_add_noise = train_module.add_noise

    def spy(x0, t, schedule, **kw):  # training must noise through the library's add_noise
        calls.append(kw)
        return real_add_noise(x0, t, schedule, **kw)

    monkeypatch.setattr(train_module, "add_noise", spy)
    result = train(TrainConfig(**TINY), tmp_path, progress=False)
    assert len(calls) == TINY["steps"] and all("noise" in kw for kw in calls)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)

    for name in ("digits.safetensors", "digits.json", "loss.csv", "loss.png"):
        assert (tmp_path / name).exists(), name
    with open(tmp_path / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == TINY["steps"] and set(rows[0]) == {"step", "loss", "lr", "seconds"}

    pre = load_pretrained(tmp_path / "digits.safetensors")
    assert pre.image_shape == (1, 8, 8) and pre.num_classes == 10 and pre.null_class == 10
    assert pre.prediction == "epsilon" and pre.data_range == (-1.0, 1.0)
    torch.testing.assert_close(pre.schedule.alphas_cumprod, result.schedule.alphas_cumprod)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 900.0])
    with torch.no_grad():  # what shipped is the EMA model
        torch.testing.assert_close(pre.model(x, t), result.model(x, t))


def test_label_dropout_uses_the_null_class(monkeypatch):
    seen = []

    class Spy(train_module.UNet):
        def forward(self, x, t, class_labels=None):
            if self.training:
                seen.append(class_labels.clone())
            return super().forward(x, t, class_labels=class_labels)

    monkeypatch.setattr(train_module, "UNet", Spy)
    train(TrainConfig(**{**TINY, "steps": 3, "label_dropout": 0.5}), progress=False)
    labels = torch.cat(seen)
    assert (labels == 10).any() and (labels < 10).any() and labels.max() == 10


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup=10)
    assert learning_rate(cfg, 0) == pytest.approx(1e-4)
    assert learning_rate(cfg, 10) == pytest.approx(1e-3)
    assert learning_rate(cfg, 99) == pytest.approx(1e-4, rel=1e-2)  # cosine to a tenth
    timed = TrainConfig(steps=100, lr=1e-3, warmup=10, max_minutes=1.0)
    assert learning_rate(timed, 11, seconds=60.0) == pytest.approx(1e-4)  # out of time: annealed


def test_max_minutes_stops_early(tmp_path):
    result = train(TrainConfig(**{**TINY, "max_minutes": 0.0}), tmp_path, progress=False)
    assert len(result.losses) == 1 and (tmp_path / "digits.safetensors").exists()


@pytest.mark.parametrize("change, name", [({"label_dropout": 1.5}, "label_dropout"), ({"steps": 0}, "steps"),
                                          ({"schedule": "sqrt"}, "schedule")])
def test_config_errors(change, name):
    with pytest.raises(ValueError, match=name):
        train(TrainConfig(**{**TINY, **change}), progress=False)


def test_train_cli(tmp_path, capsys):
    from fastdiff.cli import main

    code = main(["train", "--out", str(tmp_path), "--steps", "2", "--batch-size", "4", "--image-size", "8",
                 "--base-channels", "16", "--channel-mults", "1,2", "--num-res-blocks", "1",
                 "--attention-resolutions", "", "--no-progress"])
    assert code == 0
    assert "2 steps" in capsys.readouterr().out
    assert (tmp_path / "digits.json").exists()
    assert math.isfinite(float((tmp_path / "loss.csv").read_text().splitlines()[-1].split(",")[1]))


def test_ema_update_follows_the_recurrence():
    # e <- d e + (1 - d) p, by hand: from 0 with d = 0.5 and p = 1, 2, 3: 0.5, 1.25, 2.125
    ema, model = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(ema.weight)
    for p, want in ((1.0, 0.5), (2.0, 1.25), (3.0, 2.125)):
        torch.nn.init.constant_(model.weight, p)
        train_module.ema_update(ema, model, 0.5)
        assert ema.weight.item() == want


def test_training_ships_the_ema_of_the_weight_sequence(tmp_path, monkeypatch):
    # The weights after each optimizer step are the known sequence; what ships must be their EMA
    # with the warmed-up decay min(ema_decay, (1 + k) / (10 + k)) at step k (0.1, 0.15, 0.15, 0.15
    # for ema_decay 0.15), starting from the initial weights, and digits.json records the decay.
    snapshots, initial = [], []
    real_update = train_module.ema_update

    def spy(ema, model, decay):
        if not initial:
            initial.extend(e.detach().clone() for e in ema.parameters())
        snapshots.append([p.detach().clone() for p in model.parameters()])
        real_update(ema, model, decay)

    monkeypatch.setattr(train_module, "ema_update", spy)
    steps, decay = 4, 0.15
    result = train(TrainConfig(**{**TINY, "steps": steps, "ema_decay": decay}), tmp_path, progress=False)
    assert len(snapshots) == steps
    want = [e.double() for e in initial]
    for k, params in enumerate(snapshots):
        d = min(decay, (1 + k) / (10 + k))
        want = [d * e + (1 - d) * p.double() for e, p in zip(want, params)]
    for got, expected in zip(result.model.parameters(), want):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(result.model.parameters(), snapshots[-1]))  # not the raw model
    assert load_pretrained(tmp_path / "digits.safetensors").metadata["training"]["ema_decay"] == decay
    online = load_pretrained(tmp_path / "online.safetensors")  # the last step's weights, beside the EMA
    for got, last in zip(online.model.parameters(), snapshots[-1]):
        torch.testing.assert_close(got, last)
    assert online.metadata["weights"] == "online (not the EMA)"
