"""Nested conditioning: dicts, lists and tuples of tensors at any depth as model keyword
arguments (as diffusers' added_cond_kwargs and ControlNet residuals), CFG over them, their
static copies between runs, and bad leaves refused by their path."""
import re

import pytest
import torch

from fastdiff import Sampler, Schedule, conditioning
from reference_loop import plain_loop

SCHEDULE = Schedule.linear(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02)


class NestedModel(torch.nn.Module):
    """An epsilon model that reads every leaf of SDXL/ControlNet-shaped conditioning."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, *, added_cond_kwargs, residuals, mode):
        self.calls.append((added_cond_kwargs, residuals, mode))
        text, ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        shift = text.mean(1)[:, None, None] + 0.01 * ids.sum(1)[:, None, None]
        res = residuals[0] + residuals[1][1]["deep"]  # a list holding a tuple holding a dict
        out = 0.3 * x + 0.2 * torch.tanh(shift + res) + 1e-4 * t[:, None, None]
        return out * 0.5 if mode == "half" else out


def nested(batch, seed, mode="full"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(batch, *s, generator=g)  # noqa: E731
    return {"added_cond_kwargs": {"text_embeds": r(6), "time_ids": r(3)},
            "residuals": [r(2, 3), (None, {"deep": r(2, 3)})], "mode": mode}


@pytest.mark.parametrize("solver", ["dpmpp_2m", "ddpm"])
def test_nested_conditioning_with_cfg_equals_two_model_calls(solver):
    model = NestedModel()
    sampler = Sampler(model, SCHEDULE, solver=solver, steps=6)
    seeds = [3, 4]
    cond, uncond = nested(2, 0), nested(2, 1)
    got = sampler.sample(shape=(2, 2, 3), seeds=seeds, cond=cond, uncond=uncond, guidance_scale=3.0)
    # the model saw [uncond; cond] leaf by leaf, and the option as given
    added, residuals, mode = model.calls[0]
    torch.testing.assert_close(added["time_ids"], torch.cat([uncond["added_cond_kwargs"]["time_ids"],
                                                             cond["added_cond_kwargs"]["time_ids"]]))
    torch.testing.assert_close(residuals[1][1]["deep"], torch.cat([uncond["residuals"][1][1]["deep"],
                                                                   cond["residuals"][1][1]["deep"]]))
    assert residuals[1][0] is None and mode == "full" and isinstance(residuals[1], tuple)
    want = plain_loop(model, sampler.table, torch.tensor(seeds), (2, 3), cond=cond, uncond=uncond, w=3.0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # new values are copied into the loop's static buffers: the result follows them
    cond2 = nested(2, 5)
    got2 = sampler.sample(shape=(2, 2, 3), seeds=seeds, cond=cond2, uncond=uncond, guidance_scale=3.0)
    want2 = plain_loop(model, sampler.table, torch.tensor(seeds), (2, 3), cond=cond2, uncond=uncond, w=3.0)
    torch.testing.assert_close(got2, want2, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, got2)
    # a non-tensor leaf is part of the runner's key: another value is another runner, obeyed
    half = nested(2, 0, mode="half")
    got3 = sampler.sample(shape=(2, 2, 3), seeds=seeds, cond=half)
    want3 = plain_loop(model, sampler.table, torch.tensor(seeds), (2, 3), cond=half)
    torch.testing.assert_close(got3, want3, atol=1e-5, rtol=1e-5)
    assert model.calls[-1][2] == "half" and len(sampler._runners) == 2


def test_bad_nested_leaves_are_refused_by_path():
    sampler = Sampler(NestedModel(), SCHEDULE, steps=2)
    kw = dict(shape=(2, 2, 3), seeds=[0, 1], guidance_scale=2.0)
    bad = nested(2, 0)
    bad["added_cond_kwargs"]["time_ids"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=re.escape("cond['added_cond_kwargs']['time_ids'] must be batched along "
                                                   "dim 0 with 2 rows, got shape (3, 3)")):
        sampler.sample(cond=bad, uncond=nested(2, 1), **kw)
    bad = nested(2, 0)
    bad["residuals"][1][1]["deep"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=re.escape("uncond['residuals'][1][1]['deep'] must be batched along dim 0 "
                                                   "with 2 rows, got a 0-d tensor")):
        sampler.sample(cond=nested(2, 1), uncond=bad, **kw)
    bad = nested(2, 0)
    bad["added_cond_kwargs"]["text_embeds"] = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=re.escape("cond['added_cond_kwargs']['text_embeds'] and "
                                                   "uncond['added_cond_kwargs']['text_embeds'] must have the same "
                                                   "shape after dim 0, got (2, 6) and (2, 5)")):
        sampler.sample(cond=nested(2, 1), uncond=bad, **kw)
    bad = nested(2, 0)
    bad["residuals"] = bad["residuals"][:1]
    with pytest.raises(ValueError, match=re.escape("cond['residuals'] and uncond['residuals'] must have the same "
                                                   "length, got 2 and 1")):
        sampler.sample(cond=nested(2, 1), uncond=bad, **kw)
    bad = nested(2, 0)
    del bad["added_cond_kwargs"]["time_ids"]
    with pytest.raises(ValueError, match=re.escape("cond['added_cond_kwargs'] and uncond['added_cond_kwargs'] "
                                                   "must have the same keys")):
        sampler.sample(cond=nested(2, 1), uncond=bad, **kw)
    with pytest.raises(ValueError, match=re.escape("cond['mode']='full' and uncond['mode']='half' differ")):
        sampler.sample(cond=nested(2, 1), uncond=nested(2, 0, mode="half"), **kw)
    bad = nested(2, 0)
    bad["residuals"] = tuple(bad["residuals"])
    with pytest.raises(ValueError, match=re.escape("cond['residuals'] is a list but uncond['residuals'] is a "
                                                   "tuple")):
        sampler.sample(cond=nested(2, 1), uncond=bad, **kw)
    with pytest.raises(ValueError, match="cond must be a dict of model keyword arguments, got list"):
        sampler.sample(cond=[torch.zeros(2, 3)], shape=(2, 2, 3), seeds=[0, 1])


def test_static_copies_do_not_alias_the_callers_tensors():
    tree = nested(2, 0)
    static = conditioning.copy_into(None, tree)
    leaf = tree["added_cond_kwargs"]["time_ids"]
    assert static["added_cond_kwargs"]["time_ids"].data_ptr() != leaf.data_ptr()
    again = nested(2, 7)
    assert conditioning.copy_into(static, again) is static  # same signature: copied in place
    torch.testing.assert_close(static["residuals"][1][1]["deep"], again["residuals"][1][1]["deep"])
    assert conditioning.signature(nested(2, 0)) != conditioning.signature(nested(2, 0, mode="half"))
